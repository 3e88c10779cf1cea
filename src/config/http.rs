//! `[http]`: the HTTP server's listen address, who may call it (`[[http.token]]`), and the
//! limits that bound what one client can make it do.
//!
//! Its own file because it is the section an operator changes first (the listen address, and
//! with it who can reach the daemon) and because its checks are the only ones about sockets.
//! A token's secret is never in the file: [`TokenConfig::secret`] reads it from the env
//! variable or file the entry names, only when asked (at `iotfwd run`), so `iotfwd check`
//! needs no secret.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::report::{Reporter, Seg};

/// One mebibyte, the unit of `max_body_bytes`' bound.
pub(super) const MIB: usize = 1024 * 1024;

/// Shortest token secret accepted, in bytes: shorter ones can be guessed.
pub const MIN_TOKEN_BYTES: usize = 16;

/// `[http]`: the HTTP server.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct HttpConfig {
    /// Socket address the HTTP server listens on, as `ip:port` (`[::]:8080` for IPv6).
    /// Host names are not accepted. An address beyond loopback needs a `[[http.token]]` (or
    /// `allow_anonymous = true`). Default `"127.0.0.1:8080"`.
    pub listen: String,
    /// Largest request body accepted by the ingest endpoint, in bytes; larger bodies are
    /// refused with 413. Range 1..=268435456 (256 MiB). Default `1048576` (1 MiB).
    pub max_body_bytes: usize,
    /// Most messages one ingest request may carry. At least 1. Default `10000`.
    pub max_messages_per_request: usize,
    /// Serve a non-loopback `listen` without any `[[http.token]]`: anyone who reaches the port
    /// may then post, read every record and reload. Default `false`.
    pub allow_anonymous: bool,
    /// Ask for a token with scope `read` on `/metrics` too. Default `false` (Prometheus
    /// scrapes without one).
    pub metrics_auth: bool,
    /// Ingest requests (`POST /api/v1/messages`) handled at once; more are answered 429 at
    /// once. Range 1..=65536. Default `64`.
    pub max_concurrent_ingest: usize,
    /// How long a client may take to send a request body, in milliseconds; a slower one gets
    /// 408 and the connection is closed. Range 100..=600000. Default `30000`.
    pub body_timeout_ms: u64,
    /// How long a client may take to send a request's headers, in milliseconds, counted from
    /// when the connection opens or its previous response was sent; a slower connection is
    /// closed (an idle keep-alive connection too). Range 100..=600000. Default `10000`.
    pub header_timeout_ms: u64,
    /// `[http.tls]`: serve HTTPS (only) with this certificate and key. Default: plain HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::ServerTls>,
    /// `[[http.token]]`: the bearer tokens the API accepts. With none (the default), every
    /// route is open, which `iotfwd check` and `iotfwd run` allow only on a loopback `listen`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub token: Vec<TokenConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".to_owned(),
            max_body_bytes: MIB,
            max_messages_per_request: 10_000,
            allow_anonymous: false,
            metrics_auth: false,
            max_concurrent_ingest: 64,
            body_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            tls: None,
            token: Vec::new(),
        }
    }
}

/// `[[http.token]]`: one bearer token and what it may do.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Names the token in metrics and logs (its value never shows). Unique.
    pub name: String,
    /// What the token may do: `ingest`, `ingest:any-identity`, `read`, `admin`.
    pub scopes: Vec<Scope>,
    /// Environment variable holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// File holding the token (trailing newline ignored), e.g. a mounted Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Scope {
    /// `POST /api/v1/messages`; the identity comes from each message's topic.
    #[serde(rename = "ingest")]
    Ingest,
    /// `ingest`, and the envelope's `productKey`, `deviceName`, `tenantId` and `instanceId`
    /// are taken as given (a gateway that speaks for many devices).
    #[serde(rename = "ingest:any-identity")]
    IngestAnyIdentity,
    /// The logs, traces, stats, codes, rules, the rule tester, health details, the
    /// dead-letter list (and `/metrics` with `metrics_auth`).
    #[serde(rename = "read")]
    Read,
    /// Reload and replay.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    /// The scope as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::IngestAnyIdentity => "ingest:any-identity",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    /// Whether holding `self` grants `wanted`: `ingest:any-identity` grants `ingest` too.
    pub fn grants(self, wanted: Scope) -> bool {
        self == wanted || (self == Scope::IngestAnyIdentity && wanted == Scope::Ingest)
    }
}

impl TokenConfig {
    /// The token, from `token_env` or `token_file`. The error names the entry (`index` is
    /// its place in `[[http.token]]`) and where it looked, never the value.
    pub fn secret(&self, index: usize) -> Result<String, String> {
        let at = |field: &str| format!("http.token[{index}] ({:?}): {field}", self.name);
        let value = match (&self.token_env, &self.token_file) {
            (Some(var), _) => std::env::var(var).map_err(|_| {
                format!("{}: environment variable {var} is not set", at("token_env"))
            })?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("{}: {}: {e}", at("token_file"), file.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            (None, None) => return Err(format!("{}: give token_env or token_file", at("token"))),
        };
        let field = if self.token_env.is_some() {
            "token_env"
        } else {
            "token_file"
        };
        if value.len() < MIN_TOKEN_BYTES {
            return Err(format!(
                "{}: the token is {} bytes; use at least {MIN_TOKEN_BYTES} (e.g. `openssl rand -hex 32`)",
                at(field),
                value.len()
            ));
        }
        Ok(value)
    }
}

impl HttpConfig {
    /// Whether `listen` is a loopback address (only this machine can connect).
    pub fn is_loopback(&self) -> bool {
        self.listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }

    /// Reports every problem of `[http]` into `r`.
    pub(super) fn validate(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("http"), Seg::Key(key)];
        match self.listen.parse::<SocketAddr>() {
            Err(_) => r.report(
                &[&at("listen")],
                format!(
                    "{:?} is not a socket address (expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080)",
                    self.listen
                ),
            ),
            Ok(addr) if !addr.ip().is_loopback() && self.token.is_empty() && !self.allow_anonymous => r.report(
                &[&at("listen")],
                format!(
                    "{addr} is reachable from other machines but no [[http.token]] is configured: \
                     anyone reaching it could post as any device, read every record and reload. \
                     Add a [[http.token]] (see docs/security.md), listen on 127.0.0.1, or set \
                     http.allow_anonymous = true to accept this"
                ),
            ),
            Ok(_) => {}
        }
        r.in_range(
            &at("max_body_bytes"),
            self.max_body_bytes,
            1..=256 * MIB,
            " bytes, i.e. up to 256 MiB",
        );
        r.at_least_one(
            &at("max_messages_per_request"),
            self.max_messages_per_request,
        );
        r.in_range(
            &at("max_concurrent_ingest"),
            self.max_concurrent_ingest,
            1..=65_536,
            "",
        );
        r.in_range(
            &at("body_timeout_ms"),
            self.body_timeout_ms,
            100..=600_000,
            " ms",
        );
        r.in_range(
            &at("header_timeout_ms"),
            self.header_timeout_ms,
            100..=600_000,
            " ms",
        );
        if let Some(tls) = &self.tls {
            super::tls::validate_server("http", tls, r);
        }
        self.validate_tokens(r);
    }

    fn validate_tokens(&self, r: &mut Reporter<'_>) {
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.token.iter().enumerate() {
            let at = |key: &'static str| {
                [
                    Seg::Key("http"),
                    Seg::Key("token"),
                    Seg::Index(i),
                    Seg::Key(key),
                ]
            };
            if t.name.trim().is_empty() {
                r.report(&[&at("name")], "must not be empty".into());
            } else if !names.insert(t.name.as_str()) {
                r.report(
                    &[&at("name")],
                    format!("{:?} names another [[http.token]] too", t.name),
                );
            }
            if t.scopes.is_empty() {
                r.report(
                    &[&at("scopes")],
                    "give at least one of \"ingest\", \"ingest:any-identity\", \"read\", \"admin\""
                        .into(),
                );
            }
            match (&t.token_env, &t.token_file) {
                (Some(_), Some(_)) => r.report(
                    &[&at("token_file"), &at("token_env")],
                    "give token_env or token_file, not both".into(),
                ),
                (None, None) => r.report(
                    &[&at("name")],
                    "the token's value must come from token_env or token_file (never from this file)"
                        .into(),
                ),
                (Some(var), None) if var.trim().is_empty() => {
                    r.report(&[&at("token_env")], "must not be empty".into())
                }
                (None, Some(file)) if file.as_os_str().is_empty() => {
                    r.report(&[&at("token_file")], "must not be empty".into())
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::errors_of as errors;

    #[test]
    fn a_public_listener_needs_a_token_or_an_explicit_anonymous() {
        let open = errors("[http]\nlisten = \"0.0.0.0:8080\"\n");
        assert_eq!(open.len(), 1, "{open:?}");
        assert!(open[0].starts_with("config:2:10: http.listen: 0.0.0.0:8080 is reachable"));
        assert!(open[0].contains("[[http.token]]") && open[0].contains("allow_anonymous"));
        assert!(errors("[http]\nlisten = \"0.0.0.0:8080\"\nallow_anonymous = true\n").is_empty());
        assert!(errors("[http]\nlisten = \"[::1]:8080\"\n").is_empty());
        assert!(
            errors(
                "[http]\nlisten = \"0.0.0.0:8080\"\n[[http.token]]\nname = \"a\"\n\
                 scopes = [\"read\"]\ntoken_env = \"X\"\n"
            )
            .is_empty()
        );
    }

    #[test]
    fn token_entries_are_checked_with_their_place() {
        let e = errors(
            "[[http.token]]\nname = \"a\"\nscopes = []\n\
             [[http.token]]\nname = \"a\"\nscopes = [\"admin\"]\ntoken_env = \"X\"\ntoken_file = \"/x\"\n",
        );
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(e[0].starts_with("config:3:10: http.token[0].scopes: give at least one"));
        assert!(e[1].starts_with("config:2:8: http.token[0].name: the token's value must come"));
        assert!(e[2].starts_with("config:5:8: http.token[1].name: \"a\" names another"));
        assert!(e[3].starts_with("config:8:14: http.token[1].token_file: give token_env or"));
        let bad_scope =
            errors("[[http.token]]\nname = \"a\"\nscopes = [\"write\"]\ntoken_env = \"X\"\n");
        assert_eq!(bad_scope.len(), 1);
        assert!(
            bad_scope[0].contains("unknown variant `write`"),
            "{bad_scope:?}"
        );
    }

    #[test]
    fn secrets_come_from_env_or_file_and_errors_never_show_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        let mut t = TokenConfig {
            name: "ci".into(),
            scopes: vec![Scope::Ingest],
            token_env: None,
            token_file: Some(file.clone()),
        };
        assert_eq!(t.secret(0).unwrap(), "0123456789abcdef0123");
        std::fs::write(&file, "short\n").unwrap();
        let e = t.secret(2).unwrap_err();
        assert!(
            e.starts_with("http.token[2] (\"ci\"): token_file: the token is 5 bytes"),
            "{e}"
        );
        assert!(!e.contains("short"), "{e}");
        t.token_file = Some(dir.path().join("missing"));
        let e = t.secret(0).unwrap_err();
        assert!(e.starts_with("http.token[0] (\"ci\"): token_file: "), "{e}");
        t.token_file = None;
        t.token_env = Some("IOTFWD_TEST_TOKEN_THAT_IS_NOT_SET".into());
        assert_eq!(
            t.secret(1).unwrap_err(),
            "http.token[1] (\"ci\"): token_env: environment variable \
             IOTFWD_TEST_TOKEN_THAT_IS_NOT_SET is not set"
        );
    }

    #[test]
    fn any_identity_grants_ingest() {
        assert!(Scope::IngestAnyIdentity.grants(Scope::Ingest));
        assert!(!Scope::Ingest.grants(Scope::IngestAnyIdentity));
        assert!(!Scope::Read.grants(Scope::Admin));
        assert!(!Scope::Admin.grants(Scope::Read));
    }
}
