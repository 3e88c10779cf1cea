//! `[subscription]` and `[[group]]`: the AMQP 1.0 endpoint iotfwd hosts and the consumer
//! groups that business servers consume from (the platform's server-side subscription).
//!
//! One file for both because a group is only reachable through the endpoint, and both are
//! checked together. A group's AccessKey secret is read from its env variable or file only
//! when asked for ([`GroupConfig::secret`]), never at load, so `iotfwd check` needs no secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Config;
use super::report::{Reporter, Seg};

/// `[subscription]`: the AMQP 1.0 endpoint.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct SubscriptionConfig {
    /// Run the endpoint. With no `[[group]]` it accepts no consumer. Default true.
    pub enabled: bool,
    /// Socket address (`ip:port`) of the endpoint. Default `"127.0.0.1:5673"` (5672 is
    /// RabbitMQ's). Production TLS endpoints usually use 5671.
    pub listen: String,
    /// Logged-in connections open at once over all groups; a login beyond it is closed
    /// (`amqp:resource-limit-exceeded`). Sockets still in their handshake do not count here
    /// (see `max_pending_connections`). Default 1024.
    pub max_connections: usize,
    /// Sockets still in their handshake (protocol header, TLS, SASL) at once, over all
    /// peers; a socket beyond it is closed at once. Never takes a `max_connections` slot.
    /// Default 64.
    pub max_pending_connections: usize,
    /// Sockets in their handshake at once from one source IP; one more is closed at once.
    /// Default 8.
    pub max_pending_per_ip: usize,
    /// A socket must finish the protocol header, TLS and SASL (and its Open) within this many
    /// ms of being accepted, or it is closed. Default 5000.
    pub handshake_timeout_ms: u64,
    /// A signed login's timestamp may be at most this many ms from the server's clock (either
    /// way); within it, each signature is accepted once. Default 300000 (5 minutes).
    pub auth_window_ms: u64,
    /// Failed logins from one source IP within a minute before further sockets from that IP
    /// are closed at once, until the minute is over. Default 10.
    pub max_auth_failures_per_ip: u32,
    /// A connection must attach its receiver link within this many ms of connecting, or it
    /// is closed. Default 15000.
    pub attach_timeout_ms: u64,
    /// `[subscription.tls]`: when present the endpoint speaks TLS only (amqps).
    pub tls: Option<TlsConfig>,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            enabled: true,
            listen: "127.0.0.1:5673".to_owned(),
            max_connections: 1024,
            max_pending_connections: 64,
            max_pending_per_ip: 8,
            handshake_timeout_ms: 5_000,
            auth_window_ms: 300_000,
            max_auth_failures_per_ip: 10,
            attach_timeout_ms: 15_000,
            tls: None,
        }
    }
}

/// `[subscription.tls]`: the endpoint's certificate chain and key (see [`super::tls`]).
pub type TlsConfig = super::tls::ServerTls;

/// `[[group]]`: one consumer group.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct GroupConfig {
    /// The group id clients name in `consumerGroupId=` and rules in `group = "..."`.
    pub id: String,
    /// The tenant the group belongs to (for records and metrics). Optional.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The `iotInstanceId=` clients must present. Default `""` (clients send it empty).
    #[serde(default)]
    pub instance: String,
    /// The AccessKey id clients sign with (`authId=`).
    pub access_key_id: String,
    /// Environment variable holding the AccessKey secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// File holding the AccessKey secret (trailing newline ignored), e.g. a mounted secret.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// With `secret_file`: create the file with a random secret (mode 0600) when it does not
    /// exist. The embedded default uses this for its `demo` group. Default false.
    #[serde(default)]
    pub create_secret: bool,
    /// Consumer connections of this group at once; one more is refused with 9600.
    /// Default 128.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A delivery with no outcome after this many ms is 9650 and is redelivered.
    /// Default 30000.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// How long an undelivered message waits for a consumer, in seconds. Default 86400.
    #[serde(default = "default_retention_s")]
    pub retention_s: u64,
    /// Most messages waiting for a consumer; a forward beyond it fails (9325, then the
    /// rule's error action). Default 100000.
    #[serde(default = "default_max_backlog")]
    pub max_backlog: usize,
    /// Deliveries per second to the group's consumers, all together; 0 = unlimited.
    /// Bounds how fast a backlog is pushed when consumers come back. Default 0.
    #[serde(default)]
    pub push_rate: u32,
    /// Unsettled deliveries per consumer connection at once (on top of the link credit the
    /// consumer grants). Default 256.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Exchange that rejected deliveries are published to when the rule has no
    /// `[error_action]`. Needs `[broker]`. Optional.
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
    /// A delivery released (9651) or timed out (9650) this many times is dead-lettered with
    /// its last code instead of being redelivered again (docs/dead-letters.md). Default 16.
    #[serde(default = "default_max_redeliveries")]
    pub max_redeliveries: u32,
    /// With `[broker]`: the type of the backlog queue `iotfwd.group.<id>`, `"classic"`
    /// (default) or `"quorum"` (replicated across a RabbitMQ cluster). Changing it for a queue
    /// that exists needs the queue deleted first (its declare fails otherwise, naming it).
    #[serde(default)]
    pub queue_type: super::broker::QueueType,
    /// How deliveries are spread over the group's consumer connections: `"spread"` (default)
    /// hands each message to any consumer with room, so one device's messages may be
    /// processed out of order; `"device"` keeps each device (productKey + deviceName) on one
    /// consumer connection and hands a device's next message out only once its earlier one
    /// is settled (docs/ordering.md).
    #[serde(default)]
    pub ordering: GroupOrdering,
}

/// `[[group]] ordering`: how a group hands one device's messages to its consumers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupOrdering {
    /// Each message to any consumer with room (round robin): the most parallelism, no order
    /// within a device once there are several consumers.
    #[default]
    Spread,
    /// One unsettled message per device at a time, on the device's own consumer connection.
    Device,
}

fn default_max_redeliveries() -> u32 {
    16
}

fn default_max_connections() -> usize {
    128
}
fn default_ack_timeout_ms() -> u64 {
    30_000
}
fn default_retention_s() -> u64 {
    86_400
}
fn default_max_backlog() -> usize {
    100_000
}
fn default_window() -> usize {
    256
}

impl GroupConfig {
    /// The embedded default's demo group: AccessKey id `demo`, its secret created under the
    /// data directory on first start.
    pub fn demo(data_dir: &Path) -> GroupConfig {
        GroupConfig {
            id: "demo".to_owned(),
            tenant: None,
            instance: String::new(),
            access_key_id: "demo".to_owned(),
            secret_env: None,
            secret_file: Some(data_dir.join("demo-group.secret")),
            create_secret: true,
            max_connections: default_max_connections(),
            ack_timeout_ms: default_ack_timeout_ms(),
            retention_s: default_retention_s(),
            max_backlog: default_max_backlog(),
            push_rate: 0,
            window: default_window(),
            dead_letter_exchange: None,
            max_redeliveries: default_max_redeliveries(),
            queue_type: super::broker::QueueType::Classic,
            ordering: GroupOrdering::Spread,
        }
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    /// The AccessKey secret, from `secret_env` or `secret_file` (creating the file when
    /// `create_secret` is set). The error names the group and the source, never the secret.
    pub fn secret(&self) -> Result<String, String> {
        let at = |field: &str| format!("group {:?}: {field}", self.id);
        match (&self.secret_env, &self.secret_file) {
            (Some(var), _) => std::env::var(var).map_err(|_| {
                format!(
                    "{}: environment variable {var} is not set",
                    at("secret_env")
                )
            }),
            (None, Some(file)) => match std::fs::read_to_string(file) {
                Ok(text) => {
                    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
                    if secret.is_empty() {
                        Err(format!(
                            "{}: {} is empty",
                            at("secret_file"),
                            file.display()
                        ))
                    } else {
                        Ok(secret)
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.create_secret => {
                    create_secret_file(file)
                        .map_err(|e| format!("{}: {}: {e}", at("secret_file"), file.display()))
                }
                Err(e) => Err(format!("{}: {}: {e}", at("secret_file"), file.display())),
            },
            (None, None) => Err(format!("{}: give secret_env or secret_file", at("secret"))),
        }
    }
}

/// Writes a fresh random secret to `file` (mode 0600), failing if it already exists.
fn create_secret_file(file: &Path) -> std::io::Result<String> {
    use std::io::Write as _;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(file) {
        Ok(mut f) => {
            writeln!(f, "{secret}")?;
            Ok(secret)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(file)?.trim_end().to_owned())
        }
        Err(e) => Err(e),
    }
}

/// Reports every problem of `[subscription]` and `[[group]]` into `r`, each at its key.
pub(super) fn validate(config: &Config, r: &mut Reporter<'_>) {
    let s = &config.subscription;
    let key = |k: &'static str| [Seg::Key("subscription"), Seg::Key(k)];
    if s.listen.parse::<std::net::SocketAddr>().is_err() {
        r.report(
            &[&key("listen")],
            format!(
                "{:?} is not a socket address (expected ip:port, e.g. 127.0.0.1:5673)",
                s.listen
            ),
        );
    }
    r.at_least_one(&key("max_connections"), s.max_connections);
    r.at_least_one(&key("max_pending_connections"), s.max_pending_connections);
    r.at_least_one(&key("max_pending_per_ip"), s.max_pending_per_ip);
    r.in_range(
        &key("handshake_timeout_ms"),
        s.handshake_timeout_ms,
        100..=600_000,
        " milliseconds",
    );
    r.in_range(
        &key("auth_window_ms"),
        s.auth_window_ms,
        1_000..=3_600_000,
        " milliseconds",
    );
    r.in_range(
        &key("max_auth_failures_per_ip"),
        s.max_auth_failures_per_ip,
        1..=1_000_000,
        " failed logins per minute",
    );
    r.in_range(
        &key("attach_timeout_ms"),
        s.attach_timeout_ms,
        1_000..=600_000,
        " milliseconds",
    );
    if let Some(tls) = &s.tls {
        super::tls::validate_server("subscription", tls, r);
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, g) in config.group.iter().enumerate() {
        let at = |k: &'static str| [Seg::Key("group"), Seg::Index(i), Seg::Key(k)];
        let valid_id = !g.id.is_empty()
            && g.id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid_id {
            r.report(
                &[&at("id")],
                format!(
                    "{:?} is not a group id (letters, digits, '_', '-' and '.')",
                    g.id
                ),
            );
        } else if let Some(first) = seen.insert(&g.id, i) {
            r.report(
                &[&at("id")],
                format!(
                    "group {:?} is declared twice (first as group[{first}])",
                    g.id
                ),
            );
        }
        if g.access_key_id.trim().is_empty() || g.access_key_id.contains([',', '|', '=']) {
            r.report(
                &[&at("access_key_id")],
                "must be non-empty and hold no ',', '|' or '='".into(),
            );
        }
        if g.instance.contains([',', '|']) {
            r.report(&[&at("instance")], "must hold no ',' or '|'".into());
        }
        match (&g.secret_env, &g.secret_file) {
            (Some(_), Some(_)) => r.report(
                &[&at("secret_file"), &at("secret_env")],
                "give secret_env or secret_file, not both".into(),
            ),
            (None, None) => r.report(
                &[&at("access_key_id"), &at("id")],
                "the group needs its secret: give secret_env or secret_file".into(),
            ),
            _ => {}
        }
        if g.create_secret && g.secret_file.is_none() {
            r.report(&[&at("create_secret")], "needs secret_file".into());
        }
        r.at_least_one(&at("max_connections"), g.max_connections);
        r.in_range(
            &at("ack_timeout_ms"),
            g.ack_timeout_ms,
            1_000..=3_600_000,
            " milliseconds",
        );
        r.in_range(
            &at("retention_s"),
            g.retention_s,
            1..=30 * 86_400,
            " seconds, 30 days",
        );
        r.at_least_one(&at("max_backlog"), g.max_backlog);
        if !(1..=65_536).contains(&g.window) {
            r.report(&[&at("window")], "must be 1..=65536".into());
        }
        r.in_range(
            &at("max_redeliveries"),
            g.max_redeliveries,
            1..=10_000,
            " deliveries before a message is dead-lettered",
        );
        if g.dead_letter_exchange.is_some() && config.broker.is_none() {
            r.report(
                &[&at("dead_letter_exchange")],
                "needs a [broker] section to publish to".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::errors_of as errors;

    #[test]
    fn a_group_needs_exactly_one_secret_source() {
        let none = errors("[[group]]\nid = \"a\"\naccess_key_id = \"k\"\n");
        assert_eq!(none.len(), 1, "{none:?}");
        assert!(none[0].contains("group[0].access_key_id"), "{none:?}");
        assert!(none[0].contains("secret_env or secret_file"), "{none:?}");
        let both = errors(
            "[[group]]\nid = \"a\"\naccess_key_id = \"k\"\nsecret_env = \"X\"\nsecret_file = \"/x\"\n",
        );
        assert!(both[0].starts_with("config:5:"), "{both:?}");
        assert!(both[0].contains("not both"), "{both:?}");
    }

    #[test]
    fn every_bad_field_is_reported_at_its_line() {
        let text = r#"
[subscription]
listen = "localhost:5673"
attach_timeout_ms = 10

[[group]]
id = "ok"
access_key_id = "k"
secret_env = "S"

[[group]]
id = "ok"
access_key_id = "a|b"
secret_env = "S"
ack_timeout_ms = 5
retention_s = 0
dead_letter_exchange = "dlx"
max_redeliveries = 0
"#;
        let e = errors(text);
        let joined = e.join("\n");
        for needle in [
            "config:3:10: subscription.listen",
            "config:4:21: subscription.attach_timeout_ms",
            "config:12:6: group[1].id: group \"ok\" is declared twice",
            "config:13:17: group[1].access_key_id",
            "config:15:18: group[1].ack_timeout_ms",
            "config:16:15: group[1].retention_s",
            "config:17:24: group[1].dead_letter_exchange: needs a [broker]",
            "config:18:20: group[1].max_redeliveries: 0 is out of range (expected 1..=10000",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
        assert_eq!(e.len(), 8, "{joined}");
    }

    #[test]
    fn a_groups_ordering_is_spread_or_device_and_a_bad_one_is_placed() {
        let group = "[[group]]\nid = \"a\"\naccess_key_id = \"k\"\nsecret_env = \"S\"\n";
        let parsed = |extra: &str| {
            Config::from_toml_str(&format!("{group}{extra}"), None)
                .map(|c| c.group[0].ordering)
                .map_err(|e| e[0].to_string())
        };
        assert_eq!(parsed(""), Ok(GroupOrdering::Spread), "the default");
        assert_eq!(parsed("ordering = \"device\"\n"), Ok(GroupOrdering::Device));
        assert_eq!(parsed("ordering = \"spread\"\n"), Ok(GroupOrdering::Spread));
        let e = errors(&format!("{group}ordering = \"sticky\"\n")).join("\n");
        assert!(e.starts_with("config:5:12: group[0].ordering: "), "{e}");
        assert!(e.contains("spread") && e.contains("device"), "{e}");
    }

    #[test]
    fn the_handshake_budget_and_window_are_checked() {
        let e = errors(
            "[subscription]\nmax_pending_connections = 0\nmax_pending_per_ip = 0\n\
             handshake_timeout_ms = 10\nauth_window_ms = 99999999999\nmax_auth_failures_per_ip = 0\n",
        )
        .join("\n");
        for needle in [
            "config:2:27: subscription.max_pending_connections: must be at least 1",
            "config:3:22: subscription.max_pending_per_ip: must be at least 1",
            "config:4:24: subscription.handshake_timeout_ms: 10 is out of range",
            "config:5:18: subscription.auth_window_ms",
            "config:6:28: subscription.max_auth_failures_per_ip",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in\n{e}");
        }
        let d = SubscriptionConfig::default();
        assert_eq!(
            (
                d.max_pending_connections,
                d.max_pending_per_ip,
                d.handshake_timeout_ms,
                d.auth_window_ms
            ),
            (64, 8, 5_000, 300_000)
        );
    }

    #[test]
    fn secrets_come_from_env_or_file_and_errors_never_show_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = GroupConfig::demo(dir.path());
        let created = g.secret().unwrap();
        assert_eq!(created.len(), 32);
        assert_eq!(g.secret().unwrap(), created, "the created secret is reused");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(g.secret_file.as_ref().unwrap())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        g.create_secret = false;
        g.secret_file = Some(dir.path().join("missing"));
        let e = g.secret().unwrap_err();
        assert!(
            e.contains("group \"demo\": secret_file") && e.contains("missing"),
            "{e}"
        );
        g.secret_file = None;
        g.secret_env = Some("IOTFWD_TEST_SURELY_UNSET_VAR".into());
        let e = g.secret().unwrap_err();
        assert!(e.contains("IOTFWD_TEST_SURELY_UNSET_VAR is not set"), "{e}");
    }
}
