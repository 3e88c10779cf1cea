//! Outcomes: one record per step of a message, with the platform's codes.
//!
//! [`Outcomes::record`] is the only way a step's result leaves the data path: it writes the
//! structured record (JSON via tracing, under the target `iotfwd::outcome`), counts it in
//! `iotfwd_outcomes_total`, and hands it to every attached sink (the record store), so a code can
//! never be logged without being counted.
//!
//! With `store.durability = "acked"` one sink is the one acknowledgements wait for
//! ([`Outcomes::acked_by`]): a source takes [`Outcomes::mark`] before a message's first record
//! and awaits [`Outcomes::committed`] before it acknowledges the message (see [`commit`]).

pub mod codes;
pub mod commit;
mod failure;
pub mod jsonl;
pub mod query;
mod record;
pub mod stats;
pub mod store;
pub mod trace;

pub use codes::{BizCode, Code, Scope};
pub use commit::{CommitLog, Mark, NotCommitted, RecordSender};
pub use failure::Failure;
pub use record::{
    ConnectionEvent, GroupOutcome, Record, Subject, format_time_ms, payload_excerpt,
    ser_opt_time_ms, ser_time_ms,
};

use std::sync::Arc;

use crate::telemetry::Metrics;

/// The recorder every stage calls. Cheap to clone.
#[derive(Clone)]
pub struct Outcomes {
    metrics: Arc<Metrics>,
    sinks: Arc<Vec<RecordSender>>,
    /// The commit log acknowledgements wait for (`store.durability = "acked"`); `None`: they
    /// do not wait.
    acked: Option<Arc<CommitLog>>,
}

impl Outcomes {
    pub fn new(metrics: Arc<Metrics>) -> Outcomes {
        Outcomes {
            metrics,
            sinks: Arc::new(Vec::new()),
            acked: None,
        }
    }

    /// Attaches a sink. Its channel is bounded: when the sink falls behind, `record` waits, which
    /// slows intake instead of dropping records.
    pub fn with_sink(mut self, sink: impl Into<RecordSender>) -> Outcomes {
        Arc::make_mut(&mut self.sinks).push(sink.into());
        self
    }

    /// Makes [`Outcomes::committed`] wait for the sink whose commit log this is.
    pub fn acked_by(mut self, log: Arc<CommitLog>) -> Outcomes {
        self.acked = Some(log);
        self
    }

    /// Where a message's wait for its records starts: take it before its first record.
    pub fn mark(&self) -> Mark {
        self.acked
            .as_ref()
            .map(|log| log.mark())
            .unwrap_or_default()
    }

    /// Resolves once every record recorded so far is committed by the acknowledging sink
    /// (at once when there is none: `store.durability = "async"`). An error means the records
    /// since `mark` may be lost: the source must not acknowledge the message. Counted in
    /// `iotfwd_store_ack_wait_seconds` and `iotfwd_store_acks_refused_total`.
    pub async fn committed(&self, mark: Mark) -> Result<(), NotCommitted> {
        let Some(log) = &self.acked else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let result = log.wait(mark, commit::COMMIT_TIMEOUT).await;
        let store = &self.metrics.store;
        store
            .ack_wait_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            store.acks_refused.inc();
            tracing::warn!("a source message is not acknowledged: {e}");
        }
        result
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records one step's outcome: structured log line, counter, and every sink.
    pub async fn record(&self, record: Record) {
        self.emit(&record);
        for sink in self.sinks.iter() {
            // A closed sink means the daemon is shutting down; the log line above still has it.
            let _ = sink.send(record.clone()).await;
        }
    }

    fn emit(&self, r: &Record) {
        self.metrics
            .outcomes
            .with_label_values(&[r.biz_code.as_str(), &r.code.as_u16().to_string()])
            .inc();
        macro_rules! event {
            ($level:expr) => {
                tracing::event!(
                    target: "iotfwd::outcome",
                    $level,
                    time = %r.time_rfc3339(),
                    traceId = %r.trace_id,
                    messageId = %r.message_id,
                    productKey = %r.product_key,
                    deviceName = %r.device_name,
                    bizCode = %r.biz_code,
                    operation = %r.operation,
                    code = r.code.as_u16(),
                    reason = %r.reason,
                    content = %r.content,
                    tenantId = %r.tenant_id,
                    instanceId = %r.instance_id,
                    "outcome"
                )
            };
        }
        // Successes at DEBUG: one line per step on stderr would cost more than the step
        // (issue 16); every record is in the store, the JSON lines and the metrics anyway.
        if r.code.is_success() {
            event!(tracing::Level::DEBUG);
        } else {
            event!(tracing::Level::WARN);
        }
    }
}
