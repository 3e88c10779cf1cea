//! The TLS sections: `[http.tls]` and `[subscription.tls]` (a server's certificate and key),
//! `[broker.tls]`, `[mqtt.tls]`, `[redis.tls]` and `[store.tls]` (what a client trusts, and its
//! own certificate when the server asks for one).
//!
//! One file for them all because they name the same kinds of PEM files and are checked the
//! same way. Loading checks only what the config itself says (paths not empty, a client's cert
//! and key given together, a client section only with a TLS url); whether the files exist and
//! parse is [`super::Config::check_tls_files`]'s, run by `iotfwd check` with
//! a reader that the TLS module (`src/tls.rs`) provides (the config does no I/O of its own).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::report::{Reporter, Seg};

/// `[http.tls]`, `[subscription.tls]`: the PEM files of a TLS server.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct ServerTls {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1), unencrypted.
    pub key: PathBuf,
}

/// `[broker.tls]`, `[mqtt.tls]`, `[redis.tls]`, `[store.tls]`: what a TLS client trusts and, optionally, the certificate it
/// shows the server. Every key is optional; an empty table means "the system's roots, no
/// client certificate".
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct ClientTls {
    /// The CA certificates (PEM) to trust instead of the system's roots, e.g. a private CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The client certificate chain (PEM), for a server that asks for one; needs `key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); needs `cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// The client certificate and key, when both are given.
    pub fn identity(&self) -> Option<(&Path, &Path)> {
        Some((self.cert.as_deref()?, self.key.as_deref()?))
    }
}

/// What a PEM file named by the config must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PemKind {
    /// One or more certificates (`cert`, `ca_file`).
    Certificates,
    /// One private key (`key`).
    PrivateKey,
}

/// One TLS section of a config, as the file checks see it.
#[derive(Clone, Copy, Debug)]
pub enum TlsSection<'a> {
    /// A server: its certificate and key must exist, parse and fit together.
    Server(&'a ServerTls),
    /// A client: its CA file (if any) and certificate and key (if any).
    Client(&'a ClientTls),
}

impl TlsSection<'_> {
    /// Each file the section names, with its key and what it must hold.
    pub fn files(&self) -> Vec<(&'static str, &Path, PemKind)> {
        let mut files = Vec::new();
        match self {
            TlsSection::Server(s) => {
                files.push(("cert", s.cert.as_path(), PemKind::Certificates));
                files.push(("key", s.key.as_path(), PemKind::PrivateKey));
            }
            TlsSection::Client(c) => {
                if let Some(ca) = &c.ca_file {
                    files.push(("ca_file", ca.as_path(), PemKind::Certificates));
                }
                if let Some(cert) = &c.cert {
                    files.push(("cert", cert.as_path(), PemKind::Certificates));
                }
                if let Some(key) = &c.key {
                    files.push(("key", key.as_path(), PemKind::PrivateKey));
                }
            }
        }
        files
    }
}

/// Reports what is wrong with the server section `[<section>.tls]` as written.
pub(super) fn validate_server(section: &'static str, tls: &ServerTls, r: &mut Reporter<'_>) {
    for (name, path) in [("cert", &tls.cert), ("key", &tls.key)] {
        r.if_empty(
            &[Seg::Key(section), Seg::Key("tls"), Seg::Key(name)],
            path.as_os_str().is_empty(),
        );
    }
}

/// Reports what is wrong with the client section `[<section>.tls]` as written; `tls_url` says
/// whether the section's url asks for TLS (`amqps://`, `mqtts://`), `scheme` names that scheme.
pub(super) fn validate_client(
    section: &'static str,
    scheme: &str,
    tls: &ClientTls,
    tls_url: bool,
    r: &mut Reporter<'_>,
) {
    validate_client_files(section, tls, r);
    if !tls_url {
        r.report(
            &[&[Seg::Key(section), Seg::Key("tls")]],
            format!(
                "is used only with a {scheme}:// url; {section}.url is not one, so the \
                 connection would not be encrypted"
            ),
        );
    }
}

/// Reports what is wrong with the files of the client section `[<section>.tls]` as written
/// (empty paths, a certificate without its key or a key without its certificate): for a
/// section whose url has no TLS scheme of its own (`[store.tls]`), and for
/// [`validate_client`].
pub(super) fn validate_client_files(section: &'static str, tls: &ClientTls, r: &mut Reporter<'_>) {
    let at = |key: &'static str| [Seg::Key(section), Seg::Key("tls"), Seg::Key(key)];
    for (name, path) in [
        ("ca_file", &tls.ca_file),
        ("cert", &tls.cert),
        ("key", &tls.key),
    ] {
        if let Some(p) = path {
            r.if_empty(&at(name), p.as_os_str().is_empty());
        }
    }
    match (&tls.cert, &tls.key) {
        (Some(_), None) => r.report(
            &[&at("cert")],
            "a client certificate needs its key: give key too".into(),
        ),
        (None, Some(_)) => r.report(
            &[&at("key")],
            "a client key needs its certificate: give cert too".into(),
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use crate::config::errors_of as errors;

    #[test]
    fn server_sections_need_both_files() {
        let e = errors("[http.tls]\ncert = \"/c.pem\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("http.tls") && e[0].contains("key"), "{e:?}");
        let e = errors("[http.tls]\ncert = \"\"\nkey = \"/k.pem\"\n");
        assert_eq!(
            e,
            ["config:2:8: http.tls.cert: must not be empty".to_owned()]
        );
        assert!(errors("[http.tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n").is_empty());
    }

    #[test]
    fn client_sections_are_checked_against_their_url() {
        let e = errors("[broker]\nurl = \"amqp://h\"\n[broker.tls]\nca_file = \"/ca.pem\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("config:3:1: broker.tls: is used only with a amqps:// url"),
            "{e:?}"
        );
        let e = errors(
            "[broker]\nurl = \"amqps://h\"\n[broker.tls]\ncert = \"/c.pem\"\n\
             [mqtt]\nurl = \"mqtts://h\"\n[mqtt.tls]\nkey = \"/k.pem\"\nca_file = \"\"\n",
        );
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(
            e[0].starts_with("config:4:8: broker.tls.cert: a client certificate needs its key")
        );
        assert!(e[1].starts_with("config:9:11: mqtt.tls.ca_file: must not be empty"));
        assert!(e[2].starts_with("config:8:7: mqtt.tls.key: a client key needs its certificate"));
        assert!(errors("[broker]\nurl = \"amqps://h\"\n[broker.tls]\n").is_empty());
        let e = errors("[redis]\nurl = \"redis://h:6379/0\"\n[redis.tls]\nca_file = \"/ca.pem\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("config:3:1: redis.tls: is used only with a rediss:// url"),
            "{e:?}"
        );
        assert!(
            errors("[redis]\nurl = \"rediss://h:6380/0\"\n[redis.tls]\nca_file = \"/ca.pem\"\n")
                .is_empty()
        );
    }
}
