//! iotfwd: a rules-engine forwarding daemon for IoT messages.
//!
//! The data path is one straight line, and the modules follow it:
//! `source` (HTTP ingest, later AMQP) -> [`message::Message`] -> [`engine`] (batching, topic index,
//! compiled SQL rules) -> [`action`] -> [`outcome`] (one record per step, counted in [`telemetry`]).
//! Data flows forward only; a module never reaches back into the one before it.

pub mod action;
pub mod bench;
pub mod bench_groups;
pub mod bench_logs;
pub mod bench_pipeline;
pub mod broker;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod health;
pub mod http;
pub mod limits;
pub mod message;
pub mod outcome;
pub mod reload;
pub mod rules;
pub mod source;
pub mod subscription;
pub mod telemetry;
