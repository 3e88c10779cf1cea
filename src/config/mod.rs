//! The daemon config: one TOML file, every section and field optional.
//!
//! Loading reports every problem at once, each with its file, line and column and the
//! dotted key path it concerns, so an operator fixes a config in one edit–check round
//! instead of one round per mistake.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};

pub mod store;

pub mod broker;

pub mod quota;

pub mod subscription;

const MIB: usize = 1024 * 1024;

/// The whole daemon config.
///
/// Every section and field is optional in the file; `Config::default()` is the embedded
/// default, which needs no broker: HTTP on 127.0.0.1:8080, rules from `./rules`, data
/// under `./data`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct Config {
    /// `[http]`: the HTTP server (ingest endpoint, `/metrics`, `/healthz`, `/api/v1/...`).
    pub http: HttpConfig,
    /// `[rules]`: where forwarding rule files are read from.
    pub rules: RulesConfig,
    /// `[engine]`: micro-batching and rule evaluation.
    pub engine: EngineConfig,
    /// `[data]`: where the daemon keeps its state (outcome log, ...).
    pub data: DataConfig,
    /// `[log]`: the daemon's own diagnostic logging.
    pub log: LogConfig,
    /// `[shutdown]`: graceful shutdown on SIGTERM / Ctrl-C.
    pub shutdown: ShutdownConfig,
    /// `[broker]`: the RabbitMQ broker for `to = "amqp"` actions and `[source.amqp]`.
    /// Absent in the embedded default.
    pub broker: Option<broker::BrokerConfig>,
    /// `[source]`: message sources besides the HTTP ingest.
    pub source: broker::SourceConfig,
    /// `[store]`: the embedded record store of outcome records (`iotfwd logs`,
    /// `GET /api/v1/logs`) and their JSON-lines copy.
    pub store: store::StoreConfig,
    /// `[[tenant]]`: tenants and their forwarding quotas (over one: 9324). Declaring any
    /// tenant or instance turns quotas on; with none (the default) they are off. See
    /// README "Quotas".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tenant: Vec<quota::TenantQuota>,
    /// `[[instance]]`: instances, each of one tenant, with their products and their
    /// forwarding-TPS specification (over it: 9326).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub instance: Vec<quota::InstanceQuota>,
    /// `[quota]`: per-device quotas (`[quota.device]`, with per-product overrides) and what
    /// happens to products of no instance (`unmapped`, `default_instance`).
    pub quota: quota::QuotaConfig,
    /// `[subscription]`: the AMQP 1.0 endpoint consumer groups connect to. On by default at
    /// 127.0.0.1:5673. See README "Consumer groups".
    pub subscription: subscription::SubscriptionConfig,
    /// `[[group]]`: consumer groups; `to = "group"` actions forward to them. The embedded
    /// default has one, `demo`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<subscription::GroupConfig>,
}

/// `[http]`: the HTTP server.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct HttpConfig {
    /// Socket address the HTTP server listens on, as `ip:port` (`[::]:8080` for IPv6).
    /// Host names are not accepted. Default `"127.0.0.1:8080"`.
    pub listen: String,
    /// Largest request body accepted by the ingest endpoint, in bytes; larger bodies are
    /// refused with 413. Range 1..=268435456 (256 MiB). Default `1048576` (1 MiB).
    pub max_body_bytes: usize,
    /// Most messages one ingest request may carry. At least 1. Default `10000`.
    pub max_messages_per_request: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".to_owned(),
            max_body_bytes: MIB,
            max_messages_per_request: 10_000,
        }
    }
}

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch_max_messages: 512,
            batch_max_wait_ms: 2,
            queue_capacity: 8192,
            max_variants_per_rule: 32,
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

/// One problem found in a config file: where (file, and line/column when known) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in, when the config came from a file.
    pub file: Option<PathBuf>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub column: Option<usize>,
    /// What is wrong, starting with the dotted key path when one applies
    /// (`"engine.batch_max_messages: must be ..."`).
    pub message: String,
}

impl ConfigError {
    fn at(
        file: Option<&Path>,
        text: Option<&str>,
        span: Option<Range<usize>>,
        message: String,
    ) -> Self {
        let (line, column) = match (text, span) {
            (Some(text), Some(span)) => {
                let (line, column) = line_col(text, span.start);
                (Some(line), Some(column))
            }
            _ => (None, None),
        };
        ConfigError {
            file: file.map(Path::to_path_buf),
            line,
            column,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}", file.display())?,
            None => f.write_str("config")?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses TOML text and validates it.
    ///
    /// A syntax, type or unknown-field error stops deserialization, so at most one of
    /// those is reported; semantic validation then reports every problem it finds.
    /// `file` only labels the errors.
    pub fn from_toml_str(text: &str, file: Option<&Path>) -> Result<Config, Vec<ConfigError>> {
        let config: Config = match toml::from_str(text) {
            Ok(config) => config,
            Err(err) => {
                let span = err.span();
                // toml's message does not say which key it is about; recover the path from
                // the span so "invalid type: string" becomes actionable.
                let path = span.as_ref().and_then(|span| {
                    let doc = DeTable::parse(text).ok()?;
                    let path = key_path_at(doc.get_ref(), span.start);
                    (!path.is_empty()).then(|| path.join("."))
                });
                let message = match path {
                    Some(path) => format!("{path}: {}", err.message().trim_end()),
                    None => err.message().trim_end().to_owned(),
                };
                return Err(vec![ConfigError::at(file, Some(text), span, message)]);
            }
        };
        let errors = config.validate(Some(text), file);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Reads and parses a config file. An unreadable file is a single error naming it.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_toml_str(&text, Some(path)),
            Err(err) => Err(vec![ConfigError {
                file: Some(path.to_path_buf()),
                line: None,
                column: None,
                message: format!("cannot read config file: {err}"),
            }]),
        }
    }

    /// Semantic checks: value ranges, `http.listen` parses, `engine.queue_capacity >=
    /// engine.batch_max_messages`, non-empty paths and log level.
    ///
    /// Returns every problem, each naming its key path. With the source `text`, each
    /// problem also carries the line and column of the offending value when it was
    /// written in the file (a default value has no position).
    pub fn validate(&self, text: Option<&str>, file: Option<&Path>) -> Vec<ConfigError> {
        let doc = text.and_then(|text| DeTable::parse(text).ok());
        let mut errors = Vec::new();
        let mut report = |keys: &[&[&str]], message: String| {
            // The first key that is actually written in the file gives the position.
            let span = doc
                .as_ref()
                .and_then(|doc| keys.iter().find_map(|path| value_span(doc.get_ref(), path)));
            let path = keys[0].join(".");
            errors.push(ConfigError::at(
                file,
                text,
                span,
                format!("{path}: {message}"),
            ));
        };

        let http = &self.http;
        if http.listen.parse::<SocketAddr>().is_err() {
            report(
                &[&["http", "listen"]],
                format!(
                    "{:?} is not a socket address (expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080)",
                    http.listen
                ),
            );
        }
        if !(1..=256 * MIB).contains(&http.max_body_bytes) {
            report(
                &[&["http", "max_body_bytes"]],
                format!(
                    "{} is out of range (expected 1..={} bytes, i.e. up to 256 MiB)",
                    http.max_body_bytes,
                    256 * MIB
                ),
            );
        }
        if http.max_messages_per_request == 0 {
            report(
                &[&["http", "max_messages_per_request"]],
                "must be at least 1".to_owned(),
            );
        }

        if self.rules.dir.as_os_str().is_empty() {
            report(&[&["rules", "dir"]], "must not be empty".to_owned());
        }

        let engine = &self.engine;
        if !(1..=65_536).contains(&engine.batch_max_messages) {
            report(
                &[&["engine", "batch_max_messages"]],
                format!(
                    "{} is out of range (expected 1..=65536)",
                    engine.batch_max_messages
                ),
            );
        }
        if engine.batch_max_wait_ms > 10_000 {
            report(
                &[&["engine", "batch_max_wait_ms"]],
                format!(
                    "{} is out of range (expected 0..=10000 milliseconds)",
                    engine.batch_max_wait_ms
                ),
            );
        }
        if engine.queue_capacity == 0 {
            report(
                &[&["engine", "queue_capacity"]],
                "must be at least 1 (and at least engine.batch_max_messages)".to_owned(),
            );
        } else if engine.queue_capacity < engine.batch_max_messages {
            report(
                &[
                    &["engine", "queue_capacity"],
                    &["engine", "batch_max_messages"],
                ],
                format!(
                    "{} is smaller than engine.batch_max_messages ({}); the queue must hold at least one full batch",
                    engine.queue_capacity, engine.batch_max_messages
                ),
            );
        }
        if engine.max_variants_per_rule == 0 {
            report(
                &[&["engine", "max_variants_per_rule"]],
                "must be at least 1".to_owned(),
            );
        }

        if self.data.dir.as_os_str().is_empty() {
            report(&[&["data", "dir"]], "must not be empty".to_owned());
        }

        if self.log.level.trim().is_empty() {
            report(
                &[&["log", "level"]],
                "must not be empty (e.g. \"info\" or \"info,iotfwd=debug\")".to_owned(),
            );
        }

        if let Some(b) = &self.broker {
            for (path, message) in b.problems() {
                report(&[path], message);
            }
        }
        if let Some(a) = &self.source.amqp {
            for (path, message) in a.problems() {
                report(&[path], message);
            }
            if self.broker.is_none() {
                report(
                    &[&["source", "amqp"]],
                    "needs a [broker] section with the broker's url".to_owned(),
                );
            }
        }

        if !(1..=600_000).contains(&self.shutdown.grace_ms) {
            report(
                &[&["shutdown", "grace_ms"]],
                format!(
                    "{} is out of range (expected 1..=600000 milliseconds)",
                    self.shutdown.grace_ms
                ),
            );
        }

        for (keys, message) in self.store.problems() {
            let paths: Vec<[&str; 2]> = keys.iter().map(|key| ["store", *key]).collect();
            let paths: Vec<&[&str]> = paths.iter().map(|path| &path[..]).collect();
            report(&paths, message);
        }

        // [[tenant]], [[instance]], [quota]: paths through arrays, so quota.rs places them.
        errors.extend(quota::validate(
            self,
            doc.as_ref().map(|doc| doc.get_ref()),
            text,
            file,
        ));
        errors.extend(subscription::validate(
            self,
            doc.as_ref().map(|doc| doc.get_ref()),
            text,
            file,
        ));

        errors
    }

    /// The config `iotfwd run` uses without `--config`: the defaults, plus the consumer group
    /// `demo` (AccessKey id `demo`, secret created in `data/demo-group.secret`).
    pub fn embedded_default() -> Config {
        let mut config = Config::default();
        config
            .group
            .push(subscription::GroupConfig::demo(&config.data.dir));
        config
    }

    /// The consumer group `id`, if configured.
    pub fn group(&self, id: &str) -> Option<&subscription::GroupConfig> {
        self.group.iter().find(|g| g.id == id)
    }

    /// The HTTP listen address.
    ///
    /// # Panics
    ///
    /// If `http.listen` is not a socket address; [`Config::validate`] rejects such configs,
    /// so this only panics on a config that skipped validation.
    pub fn listen_addr(&self) -> SocketAddr {
        self.http.listen.parse().unwrap_or_else(|_| {
            panic!(
                "http.listen {:?} is not a socket address (config not validated)",
                self.http.listen
            )
        })
    }

    /// `engine.batch_max_wait_ms` as a duration.
    pub fn batch_max_wait(&self) -> Duration {
        Duration::from_millis(self.engine.batch_max_wait_ms)
    }

    /// `shutdown.grace_ms` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown.grace_ms)
    }
}

/// 1-based (line, column) of a byte offset in text.
///
/// The column counts characters, not bytes, so it matches what editors show. An offset
/// past the end is clamped to the end; one inside a multi-byte character points at it.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |pos| pos + 1);
    let column = text[line_start..]
        .char_indices()
        .take_while(|(i, _)| line_start + i < offset)
        .count()
        + 1;
    (line, column)
}

/// Span of the value at a dotted key path, if the document spells it out.
fn value_span(doc: &DeTable<'_>, path: &[&str]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let value = doc.get(*first)?;
    if rest.is_empty() {
        return Some(value.span());
    }
    match value.get_ref() {
        DeValue::Table(table) => value_span(table, rest),
        _ => None,
    }
}

/// The deepest key path whose key or value contains `offset`; empty if none does.
fn key_path_at(table: &DeTable<'_>, offset: usize) -> Vec<String> {
    for (key, value) in table.iter() {
        // Children first: a `[section]` table's own span need not cover its body.
        if let DeValue::Table(inner) = value.get_ref() {
            let mut inner_path = key_path_at(inner, offset);
            if !inner_path.is_empty() {
                inner_path.insert(0, key.get_ref().to_string());
                return inner_path;
            }
        }
        if key.span().contains(&offset) || value.span().contains(&offset) {
            return vec![key.get_ref().to_string()];
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<ConfigError> {
        Config::from_toml_str(text, Some(Path::new("iotfwd.toml")))
            .expect_err("config should be rejected")
    }

    #[test]
    fn default_config_round_trips_and_validates() {
        let config = Config::default();
        assert!(config.validate(None, None).is_empty());
        let text = toml::to_string(&config).unwrap();
        assert_eq!(Config::from_toml_str(&text, None).unwrap(), config);
        assert_eq!(
            config.listen_addr(),
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(config.batch_max_wait(), Duration::from_millis(2));
        assert_eq!(config.shutdown_grace(), Duration::from_secs(10));
        assert_eq!(config.http.max_body_bytes, 1_048_576);
        assert_eq!(config.rules.dir, PathBuf::from("rules"));
        assert_eq!(config.data.dir, PathBuf::from("data"));
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn empty_file_is_default() {
        assert_eq!(Config::from_toml_str("", None).unwrap(), Config::default());
        assert_eq!(
            Config::from_toml_str("# nothing here\n\n", None).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let text = "[engine]\nbatch_max_messages = 64\n\n[log]\nformat = \"json\"\n";
        let config = Config::from_toml_str(text, None).unwrap();
        assert_eq!(config.engine.batch_max_messages, 64);
        assert_eq!(config.engine.queue_capacity, 8192);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.log.level, "info");
        assert_eq!(config.http, HttpConfig::default());
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let text = "[http]\nlisten = \"0.0.0.0:9000\"\nlisten_port = 9000\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 1);
        let err = &errs[0];
        assert_eq!(err.file.as_deref(), Some(Path::new("iotfwd.toml")));
        assert_eq!(err.line, Some(3));
        assert_eq!(err.column, Some(1));
        assert!(err.message.contains("listen_port"), "{err}");
        assert!(err.message.starts_with("http.listen_port: "), "{err}");
        assert!(err.to_string().starts_with("iotfwd.toml:3:1: "), "{err}");
    }

    #[test]
    fn unknown_section_is_rejected() {
        let errs = errors("\n[brokers]\nurl = \"amqp://localhost\"\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains("brokers"), "{}", errs[0]);
        assert_eq!(errs[0].line, Some(2));
    }

    #[test]
    fn type_error_names_key_path() {
        let text = "[engine]\nbatch_max_wait_ms = \"fast\"\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(2));
        assert_eq!(errs[0].column, Some(21));
        assert!(
            errs[0].message.starts_with("engine.batch_max_wait_ms: "),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn dotted_and_inline_keys_get_paths_too() {
        let errs = errors("engine.batch_max_wait_ms = -1\n");
        assert!(
            errs[0].message.starts_with("engine.batch_max_wait_ms: "),
            "{}",
            errs[0]
        );
        let errs = errors("log = { format = \"xml\" }\n");
        assert!(errs[0].message.starts_with("log.format: "), "{}", errs[0]);
        assert_eq!(errs[0].line, Some(1));
    }

    #[test]
    fn syntax_error_has_position() {
        let errs = errors("[http]\nlisten = \n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(2));
        assert!(errs[0].column.is_some());
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let text = "\
[http]
listen = \"nope\"

[engine]
batch_max_messages = 0
queue_capacity = 0
";
        let errs = errors(text);
        let rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "iotfwd.toml:2:10: http.listen: \"nope\" is not a socket address \
                 (expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080)",
                "iotfwd.toml:5:22: engine.batch_max_messages: 0 is out of range (expected 1..=65536)",
                "iotfwd.toml:6:18: engine.queue_capacity: must be at least 1 \
                 (and at least engine.batch_max_messages)",
            ]
        );

        let text = "\
[http]
listen = \"nope\"
max_body_bytes = 0

[engine]
batch_max_messages = 100000
queue_capacity = 1000
";
        let errs = errors(text);
        let rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 4, "{rendered:#?}");
        assert_eq!(
            rendered[0],
            "iotfwd.toml:2:10: http.listen: \"nope\" is not a socket address \
             (expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080)"
        );
        assert!(rendered[1].starts_with("iotfwd.toml:3:18: http.max_body_bytes: "));
        assert!(rendered[2].starts_with("iotfwd.toml:6:22: engine.batch_max_messages: "));
        assert!(rendered[3].starts_with("iotfwd.toml:7:18: engine.queue_capacity: "));
    }

    #[test]
    fn three_problems_at_once() {
        let text = "\
[http]
listen = \"nope\"
[engine]
batch_max_messages = 0
[shutdown]
grace_ms = 0
";
        let errs = errors(text);
        let paths: Vec<&str> = errs
            .iter()
            .map(|e| e.message.split(':').next().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "http.listen",
                "engine.batch_max_messages",
                "shutdown.grace_ms"
            ]
        );
        assert_eq!(
            errs.iter().map(|e| e.line.unwrap()).collect::<Vec<_>>(),
            [2, 4, 6]
        );
    }

    #[test]
    fn queue_capacity_points_at_batch_size_when_only_that_is_written() {
        let errs = errors("[engine]\nbatch_max_messages = 10000\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.starts_with("engine.queue_capacity: "));
        assert_eq!(errs[0].line, Some(2));
    }

    #[test]
    fn all_ranges_are_checked() {
        let mut config = Config::default();
        config.http.max_body_bytes = 256 * MIB + 1;
        config.http.max_messages_per_request = 0;
        config.rules.dir = PathBuf::new();
        config.engine.batch_max_wait_ms = 10_001;
        config.engine.max_variants_per_rule = 0;
        config.data.dir = PathBuf::new();
        config.log.level = "  ".to_owned();
        config.shutdown.grace_ms = 600_001;
        let errs = config.validate(None, None);
        let paths: Vec<&str> = errs
            .iter()
            .map(|e| e.message.split(':').next().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "http.max_body_bytes",
                "http.max_messages_per_request",
                "rules.dir",
                "engine.batch_max_wait_ms",
                "engine.max_variants_per_rule",
                "data.dir",
                "log.level",
                "shutdown.grace_ms",
            ]
        );
        assert!(errs.iter().all(|e| e.line.is_none() && e.file.is_none()));
        assert!(
            errs[0]
                .to_string()
                .starts_with("config: http.max_body_bytes: ")
        );

        let mut config = Config::default();
        config.http.max_body_bytes = 256 * MIB;
        config.engine.batch_max_messages = 65_536;
        config.engine.queue_capacity = 65_536;
        config.engine.batch_max_wait_ms = 0;
        config.shutdown.grace_ms = 600_000;
        config.http.listen = "[::]:0".to_owned();
        assert!(config.validate(None, None).is_empty());
    }

    #[test]
    fn load_reports_unreadable_file() {
        let path = Path::new("/nonexistent/iotfwd-config-test.toml");
        let errs = Config::load(path).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].file.as_deref(), Some(path));
        assert!(
            errs[0]
                .to_string()
                .starts_with("/nonexistent/iotfwd-config-test.toml: cannot read")
        );
    }

    #[test]
    fn error_display_forms() {
        let mut err = ConfigError {
            file: None,
            line: None,
            column: None,
            message: "x: bad".to_owned(),
        };
        assert_eq!(err.to_string(), "config: x: bad");
        err.line = Some(3);
        assert_eq!(err.to_string(), "config:3: x: bad");
        err.column = Some(7);
        err.file = Some(PathBuf::from("a.toml"));
        assert_eq!(err.to_string(), "a.toml:3:7: x: bad");
    }

    #[test]
    fn line_col_positions() {
        let text = "ab\ncd\n\né = 1";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 1), (1, 2));
        assert_eq!(line_col(text, 2), (1, 3));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 6), (3, 1));
        assert_eq!(line_col(text, 7), (4, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_col(text, 9), (4, 2));
        assert_eq!(line_col(text, 8), (4, 2));
        assert_eq!(line_col(text, 1000), (4, 6));
        assert_eq!(line_col("", 0), (1, 1));
    }
}
