//! TLS on every link, built in one place: reading PEM certificates and keys, the rustls server
//! configs (the HTTP server, the AMQP 1.0 endpoint) and client configs (RabbitMQ over
//! `amqps://`, MQTT over `mqtts://`, the CLI's HTTPS and amqps clients), and the words for a
//! handshake that failed.
//!
//! rustls with the ring provider only, for every link, so no other crypto library is linked.
//! A client given a CA file trusts only the certificates in it; without one it trusts the
//! system's roots (the certificates of the OS trust store, e.g. /etc/ssl/certs). A client always
//! checks that the server's certificate is valid for the host name (or IP) it connected to.
//!
//! Every error names what the config calls the file (`http.tls.cert /etc/iotfwd/tls.crt: no
//! certificate in the file`); `iotfwd check` runs [`check_section`] to report the same
//! problems at the key's line before anything starts.

use std::io;
use std::path::Path;
use std::sync::Arc;

pub use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::tls::{ClientTls, PemKind, ServerTls, TlsSection};

/// The crypto provider of every TLS link: ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (at least one), or what is wrong with it.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("{}: {}", path.display(), pem_error(e, "certificate")))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in the file (expected PEM \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1, unencrypted), or what is wrong.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: {}", path.display(), pem_error(e, "private key")))
}

fn pem_error(e: rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(e) => e.to_string(),
        E::NoItemsFound => format!(
            "no {what} in the file (expected PEM \"-----BEGIN ...{}-----\"; an encrypted key is not supported)",
            if what == "certificate" {
                "CERTIFICATE"
            } else {
                "PRIVATE KEY"
            }
        ),
        other => format!("not a valid PEM file: {other}"),
    }
}

/// A problem with one file of a TLS section: its key (`cert`, `key`, `ca_file`) and what.
type Problem = (&'static str, String);

/// The rustls server config of `[<section>.tls]`, offering `alpn` (e.g. `http/1.1`).
/// The error names the section's key and the file.
pub fn server_config(
    section: &str,
    tls: &ServerTls,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, String> {
    build_server(tls, alpn).map_err(|(key, e)| format!("{section}.tls.{key} {e}"))
}

fn build_server(tls: &ServerTls, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, Problem> {
    let certs = certificates(&tls.cert).map_err(|e| ("cert", e))?;
    let key = private_key(&tls.key).map_err(|e| ("key", e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            (
                "key",
                format!(
                    "{}: does not fit the certificate {} ({e})",
                    tls.key.display(),
                    tls.cert.display()
                ),
            )
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The rustls client config of `[<section>.tls]` (`None`: the system's roots, no client
/// certificate). The error names the section's key and the file.
pub fn client_config(
    section: &str,
    tls: Option<&ClientTls>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let default = ClientTls::default();
    build_client(tls.unwrap_or(&default)).map_err(|(key, e)| {
        if key.is_empty() {
            format!("{section}.tls: {e}")
        } else {
            format!("{section}.tls.{key} {e}")
        }
    })
}

/// A client config trusting the CA certificates of `ca_file` (`None`: the system's roots),
/// without a client certificate: for the CLI's clients (`--ca-file`).
pub fn client_config_trusting(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let tls = ClientTls {
        ca_file: ca_file.map(Path::to_path_buf),
        ..ClientTls::default()
    };
    build_client(&tls).map_err(|(key, e)| match key {
        "" => e,
        _ => format!("--ca-file {e}"),
    })
}

fn build_client(tls: &ClientTls) -> Result<Arc<rustls::ClientConfig>, Problem> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(ca) => {
            for cert in certificates(ca).map_err(|e| ("ca_file", e))? {
                roots.add(cert).map_err(|e| {
                    (
                        "ca_file",
                        format!(
                            "{}: a certificate cannot be used as a CA: {e}",
                            ca.display()
                        ),
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err((
                    "",
                    format!(
                        "no CA file given and no system root certificates found{why}; give ca_file"
                    ),
                ));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("", e.to_string()))?
        .with_root_certificates(roots);
    let config = match tls.identity() {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = certificates(cert).map_err(|e| ("cert", e))?;
            let private = private_key(key).map_err(|e| ("key", e))?;
            builder.with_client_auth_cert(certs, private).map_err(|e| {
                (
                    "key",
                    format!(
                        "{}: does not fit the certificate {} ({e})",
                        key.display(),
                        cert.display()
                    ),
                )
            })?
        }
    };
    Ok(Arc::new(config))
}

/// A problem with a file of a TLS section, for `iotfwd check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem {
    /// The section's key it is about: `cert`, `key` or `ca_file`.
    pub key: &'static str,
    pub message: String,
    /// The file does not exist here (it may exist only where the daemon runs, as a mounted
    /// secret): a warning, where a file that exists but does not do is a problem.
    pub missing: bool,
}

/// Every problem of the files of one TLS section: for `iotfwd check` (see
/// [`crate::config::Config::check_tls_files`]). Reads the files; builds the config only when
/// each file reads, so a key that does not fit its certificate is found too.
pub fn check_section(section: &TlsSection<'_>) -> Vec<FileProblem> {
    let mut problems: Vec<FileProblem> = section
        .files()
        .into_iter()
        .filter_map(|(key, path, kind)| {
            if !path.exists() {
                return Some(FileProblem {
                    key,
                    message: format!("{}: no such file", path.display()),
                    missing: true,
                });
            }
            let read = match kind {
                PemKind::Certificates => certificates(path).map(|_| ()),
                PemKind::PrivateKey => private_key(path).map(|_| ()),
            };
            read.err().map(|message| FileProblem {
                key,
                message,
                missing: false,
            })
        })
        .collect();
    if problems.is_empty() {
        let built = match section {
            TlsSection::Server(s) => build_server(s, &[]).map(|_| ()),
            TlsSection::Client(c) => build_client(c).map(|_| ()),
        };
        if let Err((key, message)) = built {
            // A problem of the section as a whole (no system roots) is placed at its first file.
            let key = if key.is_empty() {
                section.files().first().map_or("ca_file", |f| f.0)
            } else {
                key
            };
            problems.push(FileProblem {
                key,
                message,
                missing: false,
            });
        }
    }
    problems
}

/// The server name a client checks the certificate against: an IP address or a DNS name.
pub fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a host name: {e}"),
        )
    })
}

/// A TLS connection to `host:port` with `config`; a failed handshake is explained (see
/// [`explain`]), `trusts` saying what the client trusts (e.g. `broker.tls.ca_file`).
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    trusts: &str,
) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let name = server_name(host)?;
    let tcp =
        tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| explain(e, host, trusts))
}

/// What a TLS client of `[<section>.tls]` trusts, for the words of a failed handshake.
pub fn trusts(section: &str, tls: Option<&ClientTls>) -> String {
    match tls.and_then(|t| t.ca_file.as_ref()) {
        Some(_) => format!("{section}.tls.ca_file"),
        None => {
            format!("the system's root certificates; set {section}.tls.ca_file for a private CA")
        }
    }
}

/// A failed TLS handshake as an operator reads it, when `e` (or an error it wraps) is one:
/// what the client made of the server's certificate (not signed by a CA it trusts, `trusts`;
/// not valid for `host`; expired), or what the server said (it may want a client
/// certificate). `None` for any other error.
pub fn describe(e: &(dyn std::error::Error + 'static), host: &str, trusts: &str) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    let mut cause = Some(e);
    let tls = loop {
        let c = cause?;
        if let Some(tls) = c.downcast_ref::<R>() {
            break tls;
        }
        cause = match c.downcast_ref::<io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    };
    let why = match tls {
        R::InvalidCertificate(C::UnknownIssuer) => {
            format!("the server's certificate is not signed by a CA this client trusts ({trusts})")
        }
        R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            format!("the server's certificate is not valid for the host name {host:?}")
        }
        R::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the server's certificate has expired".to_owned()
        }
        R::AlertReceived(A::CertificateRequired | A::HandshakeFailure | A::BadCertificate) => {
            format!(
                "the server refused the handshake ({tls}); does it require a client certificate \
                 (cert and key) that it trusts?"
            )
        }
        other => other.to_string(),
    };
    Some(format!("TLS handshake with {host} failed: {why}"))
}

/// [`describe`] for an I/O error, keeping its kind; any other error as it is.
pub fn explain(e: io::Error, host: &str, trusts: &str) -> io::Error {
    match describe(&e, host, trusts) {
        Some(why) => io::Error::new(e.kind(), why),
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_and_wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = certificates(&junk).unwrap_err();
        assert!(e.contains("junk.pem: no certificate in the file"), "{e}");
        let e = private_key(&junk).unwrap_err();
        assert!(e.contains("junk.pem: no private key in the file"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = server_config(
            "http",
            &ServerTls {
                cert: missing.clone(),
                key: junk.clone(),
            },
            &[],
        )
        .err()
        .unwrap();
        assert!(
            e.starts_with("http.tls.cert ") && e.contains("missing.pem"),
            "{e}"
        );
        let e = client_config(
            "broker",
            Some(&ClientTls {
                ca_file: Some(junk),
                ..ClientTls::default()
            }),
        )
        .err()
        .unwrap();
        assert!(
            e.starts_with("broker.tls.ca_file ") && e.contains("no certificate"),
            "{e}"
        );
    }
}
