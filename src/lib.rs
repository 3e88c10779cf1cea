pub mod config;
pub mod engine;
pub mod message;
pub mod outcome;
pub mod rules;
pub mod telemetry;
