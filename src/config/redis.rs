//! `[redis]`: the Redis server that holds the shared quota buckets of a cluster
//! (`[quota] backend = "redis"`; see docs/cluster.md).

use serde::{Deserialize, Serialize};

use super::report::{Reporter, Seg};

/// `[redis]`: where the shared quota buckets live.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RedisConfig {
    /// `redis://host:6379/0`. Required. A password goes in `password_env`, not here.
    pub url: String,
    /// The environment variable holding the password, if the server wants one. Never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Prefix of every key iotfwd writes (`<prefix>:quota:...`), so several clusters can share
    /// one server. Default `"iotfwd"`.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// How long one Redis call may take before the backend counts as down for that forward
    /// (`[quota] on_backend_down` applies). Range 10..=10000. Default `200`.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// `[redis.tls]`: for a `rediss://` url, the CA to trust (default: the system's roots) and a
    /// client certificate for a server that asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::ClientTls>,
}

fn default_prefix() -> String {
    "iotfwd".to_owned()
}

const fn default_timeout_ms() -> u64 {
    200
}

impl RedisConfig {
    /// A config for `url` with every other field at its default.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            password_env: None,
            key_prefix: default_prefix(),
            timeout_ms: default_timeout_ms(),
            tls: None,
        }
    }

    /// Whether the url asks for TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.url.starts_with("rediss://")
    }

    /// Reports every problem of `[redis]` into `r`.
    pub(super) fn validate(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("redis"), Seg::Key(key)];
        match url::Url::parse(&self.url) {
            Ok(u) if u.scheme() == "redis" || u.scheme() == "rediss" => {
                if u.password().is_some() {
                    r.report(
                        &[&at("url")],
                        "holds a password: put it in the environment variable named by \
                         redis.password_env instead"
                            .to_owned(),
                    );
                }
            }
            Ok(u) => r.report(
                &[&at("url")],
                format!(
                    "scheme {:?} is not redis:// or rediss:// (e.g. \"redis://127.0.0.1:6379/0\")",
                    u.scheme()
                ),
            ),
            Err(e) => r.report(
                &[&at("url")],
                format!(
                    "{:?} is not a URL ({e}); e.g. \"redis://127.0.0.1:6379/0\"",
                    self.url
                ),
            ),
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            r.report(
                &[&at("key_prefix")],
                "must be a non-empty word without spaces".to_owned(),
            );
        }
        r.in_range(&at("timeout_ms"), self.timeout_ms, 10..=10_000, " ms");
        if let Some(tls) = &self.tls {
            super::tls::validate_client("redis", "rediss", tls, self.is_tls(), r);
        }
    }
}
