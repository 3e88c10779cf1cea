//! The CLI's HTTP client for the daemon's API (`iotfwd send`, `iotfwd dlq`): one request per
//! connection, HTTP/1.1, over TLS for an `https://` URL (trusting `--ca-file`, else the
//! system's root certificates; see [`crate::tls`]).

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// One request to the daemon.
pub struct Call<'a> {
    pub method: Method,
    /// `http://…` or `https://…`, with path and query.
    pub url: &'a url::Url,
    /// A JSON body, if any.
    pub json: Option<Vec<u8>>,
    /// A bearer token, if any.
    pub token: Option<&'a str>,
    /// For `https://`: the PEM file of the CA to trust instead of the system's roots.
    pub ca_file: Option<&'a Path>,
}

/// Sends the call; the answer's status and body (as text).
pub async fn call(c: Call<'_>) -> anyhow::Result<(StatusCode, String)> {
    let host = c
        .url
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("{} has no host", c.url))?;
    let port = c
        .url
        .port_or_known_default()
        .ok_or_else(|| anyhow::anyhow!("{} has no port", c.url))?;
    let authority = match c.url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let target = match c.url.query() {
        Some(q) => format!("{}?{q}", c.url.path()),
        None => c.url.path().to_owned(),
    };
    let mut request = Request::builder()
        .method(c.method)
        .uri(target)
        .header(HOST, authority)
        .header(USER_AGENT, concat!("iotfwd/", env!("CARGO_PKG_VERSION")));
    if let Some(token) = c.token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if c.json.is_some() {
        request = request.header(CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(Bytes::from(c.json.unwrap_or_default())))?;
    match c.url.scheme() {
        "http" => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            send(tokio::net::TcpStream::connect((bare, port)).await?, request).await
        }
        "https" => {
            let config =
                crate::tls::client_config_trusting(c.ca_file).map_err(anyhow::Error::msg)?;
            let trusts = match c.ca_file {
                Some(_) => "--ca-file",
                None => "the system's root certificates; pass --ca-file for a private CA",
            };
            send(
                crate::tls::connect(config, host, port, trusts).await?,
                request,
            )
            .await
        }
        other => anyhow::bail!("{}: scheme {other:?} is not http:// or https://", c.url),
    }
}

async fn send<IO>(io: IO, request: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, String)>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
