//! `[mqtt]` and `[source.mqtt]`: an MQTT broker (Mosquitto, EMQX, RabbitMQ's MQTT plugin) as a
//! source of device messages and the destination of `to = "mqtt"` actions.
//!
//! `[mqtt]` is the connection, like `[broker]` for RabbitMQ; `[source.mqtt]` says what to
//! subscribe to. MQTT 5 by default (`protocol = "5"`), or `protocol = "3.1.1"` for a broker
//! that speaks only that; `mqtts://` for TLS, with `[mqtt.tls]`. The password is read ([`MqttConfig::password`]) only when connecting, and never
//! logged.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Config;
use super::report::{Reporter, Seg};

/// The MQTT protocol versions iotfwd speaks.
pub const PROTOCOLS: &[&str] = &["5", "3.1.1"];

/// `[mqtt]`: the MQTT broker `[source.mqtt]` subscribes to and `to = "mqtt"` actions publish to.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct MqttConfig {
    /// `mqtt://host:port` (port 1883 when omitted), or `mqtts://host:port` for TLS (port 8883
    /// when omitted; see `[mqtt.tls]`).
    pub url: String,
    /// The MQTT client id. With `clean_start = false` the broker keeps the session (the
    /// subscriptions and the QoS 1 messages not yet acknowledged) under this id, so it must be
    /// stable across restarts and unique per iotfwd process. Default `iotfwd`.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// The user name to log in with, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file holding the password, e.g. a mounted secret (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The keep-alive interval in seconds: a ping when the link is idle, and a dead link is
    /// noticed within 1.5 times this. Default 30.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u16,
    /// The MQTT protocol version: `"5"` (the default) or `"3.1.1"`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Longest pause between reconnection attempts while the broker is down, in ms. The first
    /// retry is after 100 ms, doubling up to this. Default 1000.
    #[serde(default = "default_reconnect_max_delay_ms")]
    pub reconnect_max_delay_ms: u64,
    /// `[mqtt.tls]`: for an `mqtts://` url, the CA to trust (default: the system's roots) and a
    /// client certificate when the broker asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::ClientTls>,
}

fn default_client_id() -> String {
    "iotfwd".to_owned()
}

fn default_keep_alive_s() -> u16 {
    30
}

fn default_protocol() -> String {
    "5".to_owned()
}

fn default_reconnect_max_delay_ms() -> u64 {
    1000
}

/// `[source.mqtt]`: the topic filters iotfwd subscribes to.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct MqttSourceConfig {
    /// Topic filters, e.g. `["/+/+/user/#", "/+/+/thing/event/#"]`.
    pub subscribe: Vec<String>,
    /// The subscription QoS: 1 (at least once, the default) or 0 (at most once: nothing is
    /// acknowledged, a crash loses what was in flight).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Subscribe as `$share/<group>/<filter>`: the processes of one share group split the
    /// stream (each needs its own `client_id`).
    #[serde(default)]
    pub share_group: Option<String>,
    /// Start a new session on every connect. Default false: the broker keeps the session
    /// while iotfwd is down and redelivers what was not acknowledged (under MQTT 5 iotfwd asks
    /// for a session that never expires, else the session would end with the connection).
    #[serde(default)]
    pub clean_start: bool,
    /// Messages iotfwd works on at once (received, not yet acknowledged); under MQTT 5 the
    /// receive maximum sent in CONNECT, so the broker sends no more. Default 256.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
}

fn default_qos() -> u8 {
    1
}

fn default_max_inflight() -> u16 {
    256
}

/// Reports every problem of `[mqtt]` and `[source.mqtt]` into `r`.
pub(super) fn validate(config: &Config, r: &mut Reporter<'_>) {
    if let Some(mqtt) = &config.mqtt {
        mqtt.validate(r);
    }
    if let Some(source) = &config.source.mqtt {
        source.validate(r);
        if config.mqtt.is_none() {
            r.report(
                &[&[Seg::Key("source"), Seg::Key("mqtt")]],
                "needs an [mqtt] section with the broker's url".to_owned(),
            );
        }
    }
}

impl MqttConfig {
    /// A broker at `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> MqttConfig {
        MqttConfig {
            url: url.into(),
            client_id: default_client_id(),
            username: None,
            password_env: None,
            password_file: None,
            keep_alive_s: default_keep_alive_s(),
            protocol: default_protocol(),
            reconnect_max_delay_ms: default_reconnect_max_delay_ms(),
            tls: None,
        }
    }

    /// Whether the connection speaks MQTT 5 (else 3.1.1).
    pub fn is_v5(&self) -> bool {
        matches!(self.protocol.as_str(), "5" | "5.0")
    }

    /// Whether the url asks for TLS (`mqtts://`).
    pub fn is_tls(&self) -> bool {
        url::Url::parse(&self.url).is_ok_and(|u| matches!(u.scheme(), "mqtts" | "ssl"))
    }

    fn validate(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("mqtt"), Seg::Key(key)];
        if let Err(e) = self.host_port() {
            r.report(&[&at("url")], e);
        }
        if let Some(tls) = &self.tls {
            super::tls::validate_client("mqtt", "mqtts", tls, self.is_tls(), r);
        }
        if self.client_id.is_empty() {
            r.report(&[&at("client_id")], "must not be empty".into());
        } else if self.client_id.len() > 65_535 {
            r.report(&[&at("client_id")], "is longer than 65535 bytes".into());
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            r.report(
                &[&at("password_file")],
                "give password_env or password_file, not both".into(),
            );
        }
        if self.username.is_none() && (self.password_env.is_some() || self.password_file.is_some())
        {
            r.report(
                &[&at("username")],
                "a password is given but no username (iotfwd sends a password only with a user name)"
                    .into(),
            );
        }
        r.in_range(
            &at("keep_alive_s"),
            self.keep_alive_s,
            1..=65_535,
            " seconds",
        );
        if !PROTOCOLS.contains(&self.protocol.as_str()) && !self.is_v5() {
            r.report(
                &[&at("protocol")],
                format!(
                    "{:?} is not a supported MQTT version; use \"5\" or \"3.1.1\"",
                    self.protocol
                ),
            );
        }
        r.in_range(
            &at("reconnect_max_delay_ms"),
            self.reconnect_max_delay_ms,
            10..=60_000,
            " milliseconds",
        );
    }

    /// The broker's host and port from `url`, or what is wrong with it.
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let u = url::Url::parse(&self.url).map_err(|e| format!("is not a URL: {e}"))?;
        let default_port = match u.scheme() {
            "mqtt" | "tcp" => 1883,
            "mqtts" | "ssl" => 8883,
            other => return Err(format!("scheme {other:?} is not mqtt:// or mqtts://")),
        };
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| "has no host".to_owned())?;
        if !matches!(u.path(), "" | "/") || u.query().is_some() {
            return Err("must be mqtt://host:port (or mqtts://), with no path or query".into());
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(
                "must not carry credentials; use username and password_env or password_file".into(),
            );
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok((host, u.port().unwrap_or(default_port)))
    }

    /// The password from `password_env` / `password_file`, if one is configured.
    pub fn password(&self) -> Result<Option<String>, String> {
        match (&self.password_env, &self.password_file) {
            (Some(var), _) => std::env::var(var)
                .map(Some)
                .map_err(|_| format!("mqtt.password_env: environment variable {var} is not set")),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|p| Some(p.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("mqtt.password_file {}: {e}", file.display())),
            (None, None) => Ok(None),
        }
    }
}

impl MqttSourceConfig {
    /// Subscribing to `filters` with every other setting at its default.
    pub fn new(filters: &[&str]) -> MqttSourceConfig {
        MqttSourceConfig {
            subscribe: filters.iter().map(|f| (*f).to_owned()).collect(),
            qos: default_qos(),
            share_group: None,
            clean_start: false,
            max_inflight: default_max_inflight(),
        }
    }

    /// The filters as subscribed: `$share/<group>/<filter>` with a share group.
    pub fn subscriptions(&self) -> Vec<String> {
        self.subscribe
            .iter()
            .map(|f| match &self.share_group {
                Some(g) => format!("$share/{g}/{f}"),
                None => f.clone(),
            })
            .collect()
    }

    fn validate(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("source"), Seg::Key("mqtt"), Seg::Key(key)];
        if self.subscribe.is_empty() {
            r.report(
                &[&at("subscribe")],
                "must list at least one topic filter, e.g. [\"/+/+/user/#\"]".into(),
            );
        }
        for (i, filter) in self.subscribe.iter().enumerate() {
            if let Err(e) = check_filter(filter) {
                r.report(
                    &[&[
                        Seg::Key("source"),
                        Seg::Key("mqtt"),
                        Seg::Key("subscribe"),
                        Seg::Index(i),
                    ]],
                    format!("{filter:?} {e}"),
                );
            }
        }
        if self.qos > 1 {
            r.report(
                &[&at("qos")],
                format!("{} is not supported; use 1 (at least once) or 0", self.qos),
            );
        }
        if let Some(group) = &self.share_group
            && (group.is_empty() || group.contains(['/', '+', '#']))
        {
            r.report(
                &[&at("share_group")],
                format!("{group:?} must be non-empty without '/', '+' or '#'"),
            );
        }
        r.at_least_one(&at("max_inflight"), usize::from(self.max_inflight));
    }
}

/// Whether `filter` is a valid MQTT topic filter (and not a `$share/…` one: that is what
/// `share_group` is for).
fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("is empty".into());
    }
    if filter.len() > 65_535 {
        return Err("is longer than 65535 bytes".into());
    }
    if filter.contains('\0') {
        return Err("contains a NUL character".into());
    }
    if filter.starts_with("$share/") {
        return Err("is a shared subscription; write the filter alone and set share_group".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("has '#' somewhere other than alone in the last level".into());
        }
        if level.contains('+') && *level != "+" {
            return Err("has '+' not alone in its level".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::report::messages;

    #[test]
    fn urls_are_checked() {
        let problems = |url: &str| messages(|r| MqttConfig::new(url).validate(r));
        assert!(problems("mqtt://127.0.0.1:1883").is_empty());
        assert_eq!(
            MqttConfig::new("mqtt://broker").host_port().unwrap(),
            ("broker".into(), 1883)
        );
        assert!(problems("mqtts://h:8883").is_empty());
        assert_eq!(
            MqttConfig::new("mqtts://broker").host_port().unwrap(),
            ("broker".into(), 8883)
        );
        assert!(problems("http://h")[0].contains("not mqtt://"));
        assert!(problems("nope")[0].contains("not a URL"));
        assert!(problems("mqtt://u:p@h")[0].contains("credentials"));
    }

    #[test]
    fn filters_and_settings_are_checked() {
        assert!(check_filter("/+/+/user/#").is_ok());
        assert!(check_filter("#").is_ok());
        assert!(check_filter("/a/#/b").is_err());
        assert!(check_filter("/a+/b").is_err());
        assert!(check_filter("$share/g/a").is_err());
        let mut s = MqttSourceConfig::new(&["/+/+/user/#", "/x#"]);
        s.qos = 2;
        s.share_group = Some("a/b".into());
        s.max_inflight = 0;
        let p = messages(|r| s.validate(r));
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].starts_with("source.mqtt.subscribe[1]"), "{p:?}");
        s = MqttSourceConfig::new(&["/a/#"]);
        s.share_group = Some("g".into());
        assert_eq!(s.subscriptions(), vec!["$share/g//a/#".to_owned()]);
        let mut m = MqttConfig::new("mqtt://h");
        m.protocol = "3".into();
        m.password_env = Some("X".into());
        let p = messages(|r| m.validate(r));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[1].contains("use \"5\" or \"3.1.1\""), "{p:?}");
        for ok in ["5", "5.0", "3.1.1"] {
            m = MqttConfig::new("mqtt://h");
            m.protocol = ok.into();
            assert!(messages(|r| m.validate(r)).is_empty(), "{ok}");
        }
    }
}
