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
        self.count(&record, 1);
        self.emit(&record);
        if let Some((last, others)) = self.sinks.split_last() {
            for sink in others {
                // A closed sink means the daemon is shutting down; the log line above still
                // has it.
                let _ = sink.send(record.clone()).await;
            }
            let _ = last.send(record).await;
        }
    }

    /// Records several steps' outcomes, in order, as [`Outcomes::record`] does each: one
    /// counter update per run of equal codes and one wait for room per sink, instead of one
    /// per record (a submission's uplinks).
    pub async fn record_all(&self, records: Vec<Record>) {
        let mut run_start = 0;
        for (i, r) in records.iter().enumerate() {
            self.emit(r);
            let next = records.get(i + 1);
            if next.is_none_or(|n| (n.biz_code, n.code) != (r.biz_code, r.code)) {
                self.count(r, (i + 1 - run_start) as u64);
                run_start = i + 1;
            }
        }
        if let Some((last, others)) = self.sinks.split_last() {
            for sink in others {
                let _ = sink.send_all(records.clone()).await;
            }
            let _ = last.send_all(records).await;
        }
    }

    /// Counts `n` records with `r`'s service type and code.
    fn count(&self, r: &Record, n: u64) {
        // The code as text without an allocation (codes have at most 5 digits).
        let mut buf = [0u8; 5];
        let mut at = buf.len();
        let mut code = r.code.as_u16();
        loop {
            at -= 1;
            buf[at] = b'0' + (code % 10) as u8;
            code /= 10;
            if code == 0 {
                break;
            }
        }
        let code = std::str::from_utf8(&buf[at..]).expect("ASCII digits");
        self.metrics
            .outcomes
            .with_label_values(&[r.biz_code.as_str(), code])
            .inc_by(n);
    }

    /// The record's structured log line.
    fn emit(&self, r: &Record) {
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
