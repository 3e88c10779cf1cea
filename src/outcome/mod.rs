//! Outcomes: one record per step of a message, with the platform's codes.
//!
//! [`Outcomes::record`] is the only way a step's result leaves the data path: it writes the
//! structured record (JSON via tracing, under the target `iotfwd::outcome`), counts it in
//! `iotfwd_outcomes_total`, and hands it to every attached sink (the record store), so a code can
//! never be logged without being counted.

pub mod codes;
mod failure;
pub mod jsonl;
pub mod query;
mod record;
pub mod stats;
pub mod store;
pub mod trace;

pub use codes::{BizCode, Code, Scope};
pub use failure::Failure;
pub use record::{
    ConnectionEvent, GroupOutcome, Record, Subject, format_time_ms, payload_excerpt,
    ser_opt_time_ms, ser_time_ms,
};

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::telemetry::Metrics;

/// The recorder every stage calls. Cheap to clone.
#[derive(Clone)]
pub struct Outcomes {
    metrics: Arc<Metrics>,
    sinks: Arc<Vec<mpsc::Sender<Record>>>,
}

impl Outcomes {
    pub fn new(metrics: Arc<Metrics>) -> Outcomes {
        Outcomes {
            metrics,
            sinks: Arc::new(Vec::new()),
        }
    }

    /// Attaches a sink. Its channel is bounded: when the sink falls behind, `record` waits, which
    /// slows intake instead of dropping records.
    pub fn with_sink(mut self, sink: mpsc::Sender<Record>) -> Outcomes {
        Arc::make_mut(&mut self.sinks).push(sink);
        self
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
