//! Integration tests, in one binary so DataFusion is linked once: golden SQL cases,
//! batch-equivalence properties, the CLI and the HTTP daemon.
mod cli;
mod golden;
mod http;
mod proptest_batch;
