//! Sources: where device messages come in. Each turns what it receives into
//! [`crate::message::Message`]s, hands them to the [`crate::pipeline::Pipeline`], and
//! acknowledges its input only when the pipeline says every action of a message is terminal.

pub mod amqp;
pub mod http;
pub mod mqtt;
