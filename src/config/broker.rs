//! `[broker]` and `[source.amqp]`: RabbitMQ (AMQP 0-9-1) as destination and source.
//!
//! One file for both because `[source.amqp]` consumes from the `[broker]` and is checked
//! against it. The password is resolved ([`BrokerConfig::resolved_url`]) only when the broker
//! is connected, and never logged: [`redact`] is the form to show.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Config;
use super::report::{Reporter, Seg};

/// `[broker]`: the RabbitMQ broker that `to = "amqp"` actions publish to and `[source.amqp]`
/// consumes from. Absent in the embedded default.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct BrokerConfig {
    /// The broker URL, `amqp://user@host:5672/vhost` (`%2f` is the default vhost `/`), or
    /// `amqps://user@host:5671/vhost` for TLS (see `[broker.tls]`). The password may be
    /// written in the URL, but prefer `password_env` or `password_file`: iotfwd never logs it
    /// either way.
    pub url: String,
    /// Name of an environment variable holding the password (overrides one in the URL).
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file holding the password, e.g. a mounted secret (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Publishes that may await their publisher confirm at once, per destination exchange.
    /// Publishes are pipelined under this window, never awaited one at a time. Default 256.
    #[serde(default = "default_confirm_window")]
    pub confirm_window: usize,
    /// Longest pause between reconnection attempts while the broker is down, in ms. The
    /// first retry is after 100 ms, doubling up to this. Default 1000, so consuming and
    /// publishing resume within about a second of the broker coming back.
    #[serde(default = "default_reconnect_max_delay_ms")]
    pub reconnect_max_delay_ms: u64,
    /// How long a publish waits for its publisher confirm, in ms, including the time it waits
    /// while the broker blocks publishers (a memory or disk alarm). A confirm that does not
    /// come in time is a 9325 failure, retried under the action's `retry`. Default 10000.
    #[serde(default = "default_confirm_timeout_ms")]
    pub confirm_timeout_ms: u64,
    /// The dead-letter queue: a forward that failed for good, with no `[error_action]` or
    /// one that failed too, is published (mandatory, confirmed) to a durable exchange of this
    /// name, bound to a durable queue of the same name, which iotfwd declares. Default
    /// `iotfwd.dead` (docs/dead-letters.md).
    #[serde(default = "default_dead_letter_exchange")]
    pub dead_letter_exchange: String,
    /// `[broker.tls]`: for an `amqps://` url, the CA to trust (default: the system's roots)
    /// and a client certificate when the broker asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::ClientTls>,
}

fn default_dead_letter_exchange() -> String {
    "iotfwd.dead".to_owned()
}

fn default_confirm_window() -> usize {
    256
}

fn default_confirm_timeout_ms() -> u64 {
    10_000
}

fn default_reconnect_max_delay_ms() -> u64 {
    1000
}

/// `[source]`: where messages come from besides the HTTP ingest.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct SourceConfig {
    /// `[source.amqp]`: consume device messages from a RabbitMQ queue (needs `[broker]`).
    pub amqp: Option<AmqpSourceConfig>,
    /// `[source.mqtt]`: subscribe to device topics on the `[mqtt]` broker.
    pub mqtt: Option<super::mqtt::MqttSourceConfig>,
}

/// How a consumed message's topic is found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicFrom {
    /// The `topic` header (the default).
    #[default]
    Header,
    /// The routing key, as RabbitMQ's MQTT plugin writes it: `.` separates levels, so
    /// `a.b.c` (or `.a.b.c`, from the MQTT topic `/a/b/c`) is the topic `/a/b/c`; a `/` in the
    /// routing key is a `.` in the topic. A `topic` header still wins when present.
    RoutingKey,
}

/// `[source.amqp]`: the queue iotfwd consumes device messages from.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct AmqpSourceConfig {
    /// The queue to consume.
    pub queue: String,
    /// Unacked messages in flight at once (basic.qos prefetch). Bounds memory and, after a
    /// crash, the redelivered duplicates. Default 256.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Declare the queue (durable) at start. Turn off when the queue is managed elsewhere
    /// (policies, quorum queues). Default true.
    #[serde(default = "default_true")]
    pub declare: bool,
    /// Where the topic comes from: `"header"` (default) or `"routing_key"`.
    #[serde(default)]
    pub topic_from: TopicFrom,
    /// Take the headers `productKey`, `deviceName`, `tenantId` and `instanceId` as the
    /// message's identity instead of the topic's. Only for a queue that nobody but trusted
    /// publishers can write to: whoever can set headers could otherwise speak for any device
    /// and spend another product's quota. When false, such headers are ignored and counted
    /// (`iotfwd_identity_override_ignored_total`). Default false.
    #[serde(default)]
    pub trust_identity_headers: bool,
    /// With `declare`: `"classic"` (default) or `"quorum"` (replicated, for a cluster of
    /// RabbitMQ nodes; `x-queue-type = quorum`). A queue that exists is never changed: a
    /// different type there is an error at start that names the queue.
    #[serde(default)]
    pub queue_type: QueueType,
}

/// The RabbitMQ queue type iotfwd declares a queue with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// RabbitMQ's default queue type.
    #[default]
    Classic,
    /// A replicated quorum queue (`x-queue-type = quorum`).
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` argument to declare with, if any (`classic` needs none).
    pub fn argument(self) -> Option<&'static str> {
        match self {
            QueueType::Classic => None,
            QueueType::Quorum => Some("quorum"),
        }
    }
}

fn default_prefetch() -> u16 {
    256
}

fn default_true() -> bool {
    true
}

/// Reports every problem of `[broker]` and `[source.amqp]` into `r`.
pub(super) fn validate(config: &Config, r: &mut Reporter<'_>) {
    if let Some(broker) = &config.broker {
        broker.validate(r);
    }
    if let Some(amqp) = &config.source.amqp {
        amqp.validate(r);
        if config.broker.is_none() {
            r.report(
                &[&[Seg::Key("source"), Seg::Key("amqp")]],
                "needs a [broker] section with the broker's url".to_owned(),
            );
        }
    }
}

impl BrokerConfig {
    /// A broker at `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> BrokerConfig {
        BrokerConfig {
            url: url.into(),
            password_env: None,
            password_file: None,
            confirm_window: default_confirm_window(),
            reconnect_max_delay_ms: default_reconnect_max_delay_ms(),
            confirm_timeout_ms: default_confirm_timeout_ms(),
            dead_letter_exchange: default_dead_letter_exchange(),
            tls: None,
        }
    }

    /// Whether the url asks for TLS (`amqps://`).
    pub fn is_tls(&self) -> bool {
        url::Url::parse(&self.url).is_ok_and(|u| u.scheme() == "amqps")
    }

    fn validate(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("broker"), Seg::Key(key)];
        match url::Url::parse(&self.url) {
            Ok(u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {
                if u.host_str().is_none_or(str::is_empty) {
                    r.report(&[&at("url")], "has no host".into());
                }
            }
            Ok(u) => r.report(
                &[&at("url")],
                format!("scheme {:?} is not amqp:// or amqps://", u.scheme()),
            ),
            Err(e) => r.report(&[&at("url")], format!("is not a URL: {e}")),
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            r.report(
                &[&at("password_file")],
                "give password_env or password_file, not both".into(),
            );
        }
        if !(1..=65_535).contains(&self.confirm_window) {
            r.report(&[&at("confirm_window")], "must be 1..=65535".into());
        }
        if !(10..=60_000).contains(&self.reconnect_max_delay_ms) {
            r.report(
                &[&at("reconnect_max_delay_ms")],
                "must be 10..=60000".into(),
            );
        }
        if !(100..=600_000).contains(&self.confirm_timeout_ms) {
            r.report(&[&at("confirm_timeout_ms")], "must be 100..=600000".into());
        }
        if let Some(tls) = &self.tls {
            super::tls::validate_client("broker", "amqps", tls, self.is_tls(), r);
        }
        let dlx = &self.dead_letter_exchange;
        if dlx.is_empty() || dlx.starts_with("amq.") || dlx.len() > 255 {
            r.report(
                &[&at("dead_letter_exchange")],
                format!("{dlx:?} cannot be used: give a name of 1 to 255 bytes that does not start with \"amq.\" (the default is \"iotfwd.dead\")"),
            );
        }
    }

    /// The URL with the password from `password_env` / `password_file` filled in.
    pub fn resolved_url(&self) -> Result<String, String> {
        let mut url = url::Url::parse(&self.url).map_err(|e| format!("broker.url: {e}"))?;
        let password = match (&self.password_env, &self.password_file) {
            (Some(var), _) => Some(std::env::var(var).map_err(|_| {
                format!("broker.password_env: environment variable {var} is not set")
            })?),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| format!("broker.password_file {}: {e}", file.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if let Some(p) = password {
            url.set_password(Some(&p))
                .map_err(|_| "broker.url cannot carry a password".to_owned())?;
        }
        Ok(url.to_string())
    }
}

/// A URL safe to log: any password replaced by `***`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<invalid url>".into(),
    }
}

impl AmqpSourceConfig {
    fn validate(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("source"), Seg::Key("amqp"), Seg::Key(key)];
        r.if_empty(&at("queue"), self.queue.trim().is_empty());
        r.at_least_one(&at("prefetch"), usize::from(self.prefetch));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::report::messages;

    fn broker(url: &str) -> BrokerConfig {
        BrokerConfig::new(url)
    }

    #[test]
    fn password_comes_from_a_file_and_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let mut b = broker("amqp://guest@127.0.0.1:5672/%2f");
        b.password_file = Some(file);
        let url = b.resolved_url().unwrap();
        assert_eq!(url, "amqp://guest:s3cret@127.0.0.1:5672/%2f");
        assert_eq!(redact(&url), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!redact(&url).contains("s3cret"));
    }

    #[test]
    fn bad_urls_are_reported() {
        let problems = |url: &str| messages(|r| broker(url).validate(r));
        assert_eq!(problems("http://x").len(), 1);
        assert_eq!(problems("nope").len(), 1);
        assert!(problems("amqp://guest:guest@127.0.0.1:5672/%2f").is_empty());
    }

    #[test]
    fn the_dead_letter_exchange_defaults_and_is_checked() {
        let mut b = broker("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(b.dead_letter_exchange, "iotfwd.dead");
        b.dead_letter_exchange = "amq.direct".into();
        let problems = messages(|r| b.validate(r));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("broker.dead_letter_exchange") && problems[0].contains("amq."),
            "{problems:?}"
        );
    }
}
