//! Integration tests, in one binary so DataFusion is linked once: golden SQL cases,
//! batch-equivalence properties, the CLI, the HTTP daemon and RabbitMQ in and out.
mod cli;
mod console;
mod delivery;
mod deploy;
mod durability;
mod golden;
mod groups;
mod harness;
mod health;
mod http;
mod limits;
mod logs;
mod proptest_batch;
mod rabbit;
mod reload;
mod resilience;
mod shutdown;
mod supervision;
