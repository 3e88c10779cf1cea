//! The daemon config: one TOML file, every section and field optional.
//!
//! Loading reports every problem at once, each with its file, line and column and the
//! dotted key path it concerns, so an operator fixes a config in one edit–check round
//! instead of one round per mistake.
//!
//! One file per section, each with its structs, defaults and checks: `http.rs`, `engine.rs`
//! (`[rules]`, `[engine]`, `[data]`, `[log]`, `[shutdown]`), `broker.rs` (`[broker]`,
//! `[source]`), `store.rs`, `quota/` (`[[tenant]]`, `[[instance]]`, `[quota]`: the model in
//! `mod.rs`, its checks in `check.rs`), `subscription.rs` (`[subscription]`, `[[group]]`) and
//! `tls.rs` (the `tls` tables of `[http]`, `[subscription]`, `[broker]`, `[mqtt]`, `[redis]`
//! and `[store]`).
//! Every check reports through the one reporter in `report.rs`. This file holds [`Config`], loading, and the order in which the
//! sections are checked, which is the order their problems are listed in. Loading reads the
//! config file and nothing else; the secrets it names are read (and the embedded default's
//! demo secret created) only when a caller asks for them
//! ([`subscription::GroupConfig::secret`], [`broker::BrokerConfig::resolved_url`]).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod broker;
mod engine;
mod http;
pub mod mqtt;
pub mod quota;
pub mod redis;
mod report;
#[cfg(test)]
mod robustness;
pub mod store;
pub mod subscription;
pub mod tls;

pub use self::engine::{
    DataConfig, EngineConfig, LogConfig, LogFormat, Ordering, RulesConfig, ShutdownConfig,
};
pub use self::http::{HttpConfig, MIN_TOKEN_BYTES, Scope, TokenConfig};
use self::report::Reporter;
pub use self::report::{ConfigError, line_col};

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
    /// `[mqtt]`: the MQTT broker for `[source.mqtt]` and `to = "mqtt"` actions. Absent in the
    /// embedded default.
    pub mqtt: Option<mqtt::MqttConfig>,
    /// `[source]`: message sources besides the HTTP ingest.
    pub source: broker::SourceConfig,
    /// `[store]`: the embedded record store of outcome records (`iotfwd logs`,
    /// `GET /api/v1/logs`) and their JSON-lines copy.
    pub store: store::StoreConfig,
    /// `[[tenant]]`: tenants and their forwarding quotas (over one: 9324). Declaring any
    /// tenant or instance turns quotas on; with none (the default) they are off. See
    /// docs/quotas.md.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tenant: Vec<quota::TenantQuota>,
    /// `[[instance]]`: instances, each of one tenant, with their products and their
    /// forwarding-TPS specification (over it: 9326).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub instance: Vec<quota::InstanceQuota>,
    /// `[quota]`: per-device quotas (`[quota.device]`, with per-product overrides) and what
    /// happens to products of no instance (`unmapped`, `default_instance`).
    pub quota: quota::QuotaConfig,
    /// `[redis]`: the server of the shared quota buckets (`[quota] backend = "redis"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<redis::RedisConfig>,
    /// `[subscription]`: the AMQP 1.0 endpoint consumer groups connect to. On by default at
    /// 127.0.0.1:5673. See docs/consumer-groups.md.
    pub subscription: subscription::SubscriptionConfig,
    /// `[[group]]`: consumer groups; `to = "group"` actions forward to them. The embedded
    /// default has one, `demo`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<subscription::GroupConfig>,
}

impl Config {
    /// Parses TOML text and validates it.
    ///
    /// A syntax, type or unknown-field error stops deserialization, so at most one of
    /// those is reported; semantic validation then reports every problem it finds.
    /// `file` only labels the errors.
    pub fn from_toml_str(text: &str, file: Option<&Path>) -> Result<Config, Vec<ConfigError>> {
        let config: Config = match toml::from_str(text) {
            Ok(config) => config,
            Err(err) => return Err(vec![ConfigError::from_toml(&err, text, file)]),
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
    /// written in the file (for a default value, of the nearest enclosing key written, if
    /// any).
    pub fn validate(&self, text: Option<&str>, file: Option<&Path>) -> Vec<ConfigError> {
        let mut r = Reporter::new(text, file);
        self.http.validate(&mut r);
        self.rules.validate(&mut r);
        self.engine.validate(&mut r);
        self.data.validate(&mut r);
        self.log.validate(&mut r);
        broker::validate(self, &mut r);
        mqtt::validate(self, &mut r);
        self.shutdown.validate(&mut r);
        self.store.validate(&mut r);
        quota::validate(self, &mut r);
        if let Some(redis) = &self.redis {
            redis.validate(&mut r);
        }
        subscription::validate(self, &mut r);
        r.into_errors()
    }

    /// Every TLS section of the config, each with its key (`http`, `subscription`, `broker`,
    /// `mqtt`, `redis`, `store`): the ones that are used (a client section only with its TLS
    /// url; `[store.tls]` only with an enabled PostgreSQL store).
    pub fn tls_sections(&self) -> Vec<(&'static str, tls::TlsSection<'_>)> {
        let mut sections = Vec::new();
        if let Some(t) = &self.http.tls {
            sections.push(("http", tls::TlsSection::Server(t)));
        }
        if self.subscription.enabled
            && let Some(t) = &self.subscription.tls
        {
            sections.push(("subscription", tls::TlsSection::Server(t)));
        }
        if let Some(b) = &self.broker
            && let Some(t) = &b.tls
        {
            sections.push(("broker", tls::TlsSection::Client(t)));
        }
        if let Some(m) = &self.mqtt
            && let Some(t) = &m.tls
        {
            sections.push(("mqtt", tls::TlsSection::Client(t)));
        }
        if let Some(r) = &self.redis
            && let Some(t) = &r.tls
        {
            sections.push(("redis", tls::TlsSection::Client(t)));
        }
        if self.store.enabled
            && self.store.backend == store::StoreBackend::Postgres
            && let Some(t) = &self.store.tls
        {
            sections.push(("store", tls::TlsSection::Client(t)));
        }
        sections
    }

    /// The problems of the PEM files the TLS sections name, each placed at its key: `read`
    /// opens a section's files (the config does no I/O itself; the TLS module's `check_section`
    /// is the reader) and returns each problem with the key it is about (`cert`, `key`,
    /// `ca_file`). `text` and `file` place the problems as [`Config::validate`] does.
    pub fn check_tls_files(
        &self,
        text: Option<&str>,
        file: Option<&Path>,
        read: impl Fn(&tls::TlsSection<'_>) -> Vec<(&'static str, String)>,
    ) -> Vec<ConfigError> {
        let mut r = Reporter::new(text, file);
        for (section, tls) in self.tls_sections() {
            for (key, problem) in read(&tls) {
                r.report(
                    &[&[
                        report::Seg::Key(section),
                        report::Seg::Key("tls"),
                        report::Seg::Key(key),
                    ]],
                    problem,
                );
            }
        }
        r.into_errors()
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

/// Every problem `text` has as a config, each as `iotfwd check` prints it (none: it loads).
/// For the section files' tests.
#[cfg(test)]
pub(crate) fn errors_of(text: &str) -> Vec<String> {
    match Config::from_toml_str(text, None) {
        Ok(_) => Vec::new(),
        Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::http::MIB;
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
    fn an_unknown_ordering_names_the_key_and_the_choices() {
        let errs = errors("[engine]\nordering = \"fifo\"\n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(2));
        let m = &errs[0].message;
        assert!(m.starts_with("engine.ordering: "), "{m}");
        assert!(m.contains("device") && m.contains("none"), "{m}");
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
        // Beyond loopback without a token: allowed only when said explicitly.
        config.http.allow_anonymous = true;
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
}
