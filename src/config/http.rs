//! `[http]`: the HTTP server's listen address and the ingest endpoint's request limits.
//!
//! Its own file because it is the section an operator changes first (the listen address, and
//! with it who can reach the daemon) and because its checks are the only ones about sockets.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::report::{Reporter, Seg};

/// One mebibyte, the unit of `max_body_bytes`' bound.
pub(super) const MIB: usize = 1024 * 1024;

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

impl HttpConfig {
    /// Reports every problem of `[http]` into `r`.
    pub(super) fn validate(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("http"), Seg::Key(key)];
        if self.listen.parse::<SocketAddr>().is_err() {
            r.report(
                &[&at("listen")],
                format!(
                    "{:?} is not a socket address (expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080)",
                    self.listen
                ),
            );
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
    }
}
