//! A consumer-group client: signs its login as platform consumers do. Used by
//! `iotfwd consume`, the tests and the benchmark. [`http`] is the CLI's client of the
//! daemon's HTTP API.

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Session};
use serde_json::json;

use crate::subscription::auth::{SignMethod, SignedUser};

pub mod http;

/// What a consumer needs to log in to a group.
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// `amqp://host:port`.
    pub url: String,
    pub group: String,
    pub access_key_id: String,
    pub secret: String,
    /// The group's instance (`iotInstanceId=`), usually empty.
    pub instance: String,
    pub client_id: String,
    pub sign_method: SignMethod,
    /// The idle time-out announced in Open, ms (the endpoint accepts 30000..=300000).
    pub idle_timeout_ms: u32,
    /// Link credit kept topped up.
    pub credit: u32,
    /// Signing time; `None` = now (made unique within this process, since the endpoint
    /// accepts each signature once).
    pub timestamp_ms: Option<i64>,
    /// For `amqps://`: the PEM file of the CA (or self-signed certificate) to trust; `None`:
    /// the system's root certificates.
    pub ca: Option<std::path::PathBuf>,
}

impl ConsumerOptions {
    pub fn new(url: &str, group: &str, access_key_id: &str, secret: &str) -> ConsumerOptions {
        ConsumerOptions {
            url: url.to_owned(),
            group: group.to_owned(),
            access_key_id: access_key_id.to_owned(),
            secret: secret.to_owned(),
            instance: String::new(),
            client_id: format!("iotfwd-consume-{}", std::process::id()),
            sign_method: SignMethod::HmacSha1,
            idle_timeout_ms: 60_000,
            credit: 200,
            timestamp_ms: None,
            ca: None,
        }
    }

    /// The signed SASL PLAIN username and password.
    pub fn credentials(&self) -> (String, String) {
        let user = SignedUser {
            client_id: self.client_id.clone(),
            sign_method: self.sign_method,
            timestamp_ms: self.timestamp_ms.unwrap_or_else(fresh_timestamp),
            access_key_id: self.access_key_id.clone(),
            instance_id: self.instance.clone(),
            group: self.group.clone(),
        };
        (user.username(), user.password(&self.secret))
    }
}

/// Now in ms, but later than any timestamp this process signed before: two logins signed in
/// the same millisecond with one AccessKey would carry the same signature, and the endpoint
/// accepts a signature once.
fn fresh_timestamp() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = crate::message::now_ms();
    let prev = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last.saturating_add(1)))
        })
        .expect("the update always succeeds");
    now.max(prev.saturating_add(1))
}

/// An open consumer: connection, session and receiving link.
pub struct Consumer {
    pub connection: ConnectionHandle<()>,
    pub session: SessionHandle<()>,
    pub receiver: Receiver,
}

impl Consumer {
    /// Connects, logs in and attaches the receiving link.
    pub async fn connect(o: &ConsumerOptions) -> anyhow::Result<Consumer> {
        let (username, password) = o.credentials();
        let builder = Connection::builder()
            .container_id(o.client_id.clone())
            .sasl_profile(SaslProfile::Plain { username, password })
            // fe2o3 announces half of its setting (as Proton does), so double it.
            .idle_time_out(o.idle_timeout_ms.saturating_mul(2));
        let url = url::Url::parse(&o.url)?;
        let mut connection = match url.scheme() {
            "amqps" => {
                let host = url.host_str().unwrap_or("localhost").to_owned();
                let port = url.port().unwrap_or(5671);
                let stream = tls_connect(&host, port, o.ca.as_deref()).await?;
                builder
                    .hostname(host.as_str())
                    .open_with_stream(stream)
                    .await?
            }
            _ => builder.open(o.url.as_str()).await?,
        };
        let mut session = Session::begin(&mut connection).await?;
        let receiver = Receiver::builder()
            .name(format!("{}-receiver", o.client_id))
            .source(o.group.clone())
            .credit_mode(CreditMode::Auto(o.credit))
            .attach(&mut session)
            .await?;
        Ok(Consumer {
            connection,
            session,
            receiver,
        })
    }

    /// Detaches and closes, ignoring errors.
    pub async fn close(mut self) {
        let _ = self.receiver.close().await;
        let _ = self.session.end().await;
        let _ = self.connection.close().await;
    }
}

/// A TLS stream to `host:port` trusting the certificates in `ca` (`None`: the system's roots).
async fn tls_connect(
    host: &str,
    port: u16,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = crate::tls::client_config_trusting(ca).map_err(anyhow::Error::msg)?;
    let trusts = match ca {
        Some(_) => "--ca-file",
        None => "the system's root certificates; pass --ca-file for a private CA",
    };
    Ok(crate::tls::connect(config, host, port, trusts).await?)
}

/// A received message as JSON: `{"properties": {...}, "body": <JSON or text>}`.
pub fn describe(delivery: &fe2o3_amqp::link::delivery::Delivery<Body<Value>>) -> serde_json::Value {
    let message = delivery.message();
    let mut props = serde_json::Map::new();
    if let Some(ap) = &message.application_properties {
        for (k, v) in ap.0.iter() {
            let v = match v {
                SimpleValue::String(s) => json!(s),
                SimpleValue::Long(n) => json!(n),
                SimpleValue::Int(n) => json!(n),
                SimpleValue::Bool(b) => json!(b),
                other => json!(format!("{other:?}")),
            };
            props.insert(k.clone(), v);
        }
    }
    let bytes: Vec<u8> = match &message.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(v) => format!("{:?}", v.0).into_bytes(),
        _ => Vec::new(),
    };
    let body =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)));
    json!({ "properties": props, "body": body })
}

/// The body of a delivery (the rule output), parsed as JSON.
pub fn body_json(
    delivery: &fe2o3_amqp::link::delivery::Delivery<Body<Value>>,
) -> serde_json::Value {
    describe(delivery)["body"].clone()
}
