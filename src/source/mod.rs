//! Message sources besides the HTTP ingest (which lives in [`crate::http`]).

pub mod amqp;
