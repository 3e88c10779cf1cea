//! iotfwd: a rules-engine forwarding daemon for IoT messages.
//!
//! The data path is one straight line, and the modules follow it; each arrow points down,
//! and no module reaches back into one before it:
//!
//! ```text
//! source      http ingest, RabbitMQ queue              -> message::Message
//!   pipeline  bounded queue, batcher, per-device order, per-message report
//!   engine    topic index -> compiled SQL rules (rules/) on Arrow batches
//!   limits    device / instance / tenant quotas        (9324, 9326)
//!   action    dispatcher: quota, retry, error action, dead letter; destinations amqp/, group/
//!             (broker: RabbitMQ; subscription: AMQP 1.0 consumer groups)
//!   outcome   one record per step, the code catalog, the record store and the commit
//!             tickets the sources wait for before they ack, queries
//! ```
//!
//! Beside the path: [`config`] (the schema, no I/O), [`telemetry`] (every metric),
//! [`control`] (health, reload, the check before a start), [`api`] (the HTTP router, its tokens and bounds),
//! [`daemon`] (wiring only), [`client`] (the AMQP 1.0 consumer client and the CLI's HTTP(S)
//! client), [`tls`] (PEM files and the rustls configs of every TLS link), [`bench`], [`cli`],
//! [`text`].
//! docs/architecture.md draws the same map.

pub mod action;
pub mod api;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod limits;
pub mod message;
pub mod outcome;
pub mod pipeline;
#[cfg(test)]
mod robustness;
pub mod rules;
pub mod source;
pub mod spool;
pub mod subscription;
pub mod telemetry;
pub mod text;
pub mod tls;
