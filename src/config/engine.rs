//! The small sections of the daemon's own running: `[rules]` (where rule files are read),
//! `[engine]` (micro-batching and rule evaluation), `[data]` (where state is kept), `[log]`
//! (diagnostic logging) and `[shutdown]` (the drain on SIGTERM).
//!
//! Each is a handful of keys with a range check or two, so they share one file rather than
//! five tiny ones; a section that grows gets its own.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::report::{Reporter, Seg};

/// `[rules]`: where rules come from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct RulesConfig {
    /// Directory holding the rule files, one rule per `*.toml` file named by its stem.
    /// Relative paths are relative to the daemon's working directory. Default `"rules"`.
    pub dir: PathBuf,
    /// Reload the rules when a file in `dir` changes (debounced). SIGHUP and
    /// `POST /api/v1/rules/reload` reload them either way. Default `true`.
    pub watch: bool,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: PathBuf::from("rules"),
            watch: true,
        }
    }
}

/// `[engine]`: micro-batching and rule evaluation.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct EngineConfig {
    /// A micro-batch is evaluated as soon as it holds this many messages (or when
    /// `batch_max_wait_ms` has passed). Range 1..=65536. Default `512`.
    pub batch_max_messages: usize,
    /// A micro-batch is evaluated once its oldest message has waited this many
    /// milliseconds, even if it is not full; trades latency for throughput. 0 evaluates
    /// whatever is queued without waiting. Range 0..=10000. Default `2`.
    pub batch_max_wait_ms: u64,
    /// How many messages may wait for the engine. When the queue is full, sources are
    /// slowed down (backpressure) instead of messages being dropped. At least
    /// `batch_max_messages`. Default `8192`.
    pub queue_capacity: usize,
    /// How many compiled type-variants of one rule are kept. A payload field can arrive
    /// with different JSON types (a number here, a string there) and each combination
    /// needs its own compiled plan; beyond this many, further combinations are compiled
    /// for each batch that needs them and not kept, so memory stays bounded.
    /// At least 1. Default `32`.
    pub max_variants_per_rule: usize,
    /// `"device"`: the messages of one device (productKey + deviceName) that pass a rule
    /// reach each destination in the order they were received, while different devices
    /// proceed in parallel; a message waiting for a retry holds the device's later messages
    /// to that destination.
    /// `"none"`: every message runs at once (the last bit of throughput, no order).
    /// See docs/ordering.md. Default `"device"`.
    pub ordering: Ordering,
}

/// Whether the messages of one device keep their order on their way to the destinations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// One device's actions to each destination run one after another, in the order received.
    #[default]
    Device,
    /// No order: every message of a batch is finished concurrently.
    None,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch_max_messages: 512,
            batch_max_wait_ms: 2,
            queue_capacity: 8192,
            max_variants_per_rule: 32,
            ordering: Ordering::Device,
        }
    }
}

/// `[data]`: the daemon's own state on disk.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct DataConfig {
    /// Directory for the daemon's state (the outcome log and its index). Created if
    /// missing. Relative paths are relative to the working directory. Default `"data"`.
    pub dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: PathBuf::from("data"),
        }
    }
}

/// `[log]`: the daemon's diagnostic logging (not the forwarding outcome log).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct LogConfig {
    /// Log filter, as a `tracing` EnvFilter directive such as `"info"` or
    /// `"info,iotfwd::engine=debug"`. The `RUST_LOG` environment variable overrides it.
    /// Default `"info"`.
    pub level: String,
    /// Log line format: `"text"` (human-readable) or `"json"` (one JSON object per line,
    /// for log shippers). Default `"text"`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// How diagnostic log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[shutdown]`: graceful shutdown.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct ShutdownConfig {
    /// On SIGTERM or Ctrl-C, sources stop taking messages and in-flight work gets this
    /// many milliseconds to drain (evaluate, forward, confirm, ack) before the daemon
    /// exits anyway; unacked source messages are then redelivered by the broker.
    /// Range 1..=600000. Default `10000`.
    pub grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_ms: 10_000 }
    }
}

impl RulesConfig {
    /// Reports every problem of `[rules]` into `r`.
    pub(super) fn validate(&self, r: &mut Reporter<'_>) {
        r.if_empty(
            &[Seg::Key("rules"), Seg::Key("dir")],
            self.dir.as_os_str().is_empty(),
        );
    }
}

impl EngineConfig {
    /// Reports every problem of `[engine]` into `r`.
    pub(super) fn validate(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("engine"), Seg::Key(key)];
        r.in_range(
            &at("batch_max_messages"),
            self.batch_max_messages,
            1..=65_536,
            "",
        );
        r.in_range(
            &at("batch_max_wait_ms"),
            self.batch_max_wait_ms,
            0..=10_000,
            " milliseconds",
        );
        if self.queue_capacity == 0 {
            r.report(
                &[&at("queue_capacity")],
                "must be at least 1 (and at least engine.batch_max_messages)".to_owned(),
            );
        } else if self.queue_capacity < self.batch_max_messages {
            r.report(
                &[&at("queue_capacity"), &at("batch_max_messages")],
                format!(
                    "{} is smaller than engine.batch_max_messages ({}); the queue must hold at least one full batch",
                    self.queue_capacity, self.batch_max_messages
                ),
            );
        }
        r.at_least_one(&at("max_variants_per_rule"), self.max_variants_per_rule);
    }
}

impl DataConfig {
    /// Reports every problem of `[data]` into `r`.
    pub(super) fn validate(&self, r: &mut Reporter<'_>) {
        r.if_empty(
            &[Seg::Key("data"), Seg::Key("dir")],
            self.dir.as_os_str().is_empty(),
        );
    }
}

impl LogConfig {
    /// Reports every problem of `[log]` into `r`.
    pub(super) fn validate(&self, r: &mut Reporter<'_>) {
        if self.level.trim().is_empty() {
            r.report(
                &[&[Seg::Key("log"), Seg::Key("level")]],
                "must not be empty (e.g. \"info\" or \"info,iotfwd=debug\")".to_owned(),
            );
        }
    }
}

impl ShutdownConfig {
    /// Reports every problem of `[shutdown]` into `r`.
    pub(super) fn validate(&self, r: &mut Reporter<'_>) {
        r.in_range(
            &[Seg::Key("shutdown"), Seg::Key("grace_ms")],
            self.grace_ms,
            1..=600_000,
            " milliseconds",
        );
    }
}
