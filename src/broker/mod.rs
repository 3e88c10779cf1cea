//! The RabbitMQ connection (lapin): connecting and reconnecting, and publishing with
//! publisher confirms.
//!
//! One connection serves the source and every `to = "amqp"` action. Publishes use one channel
//! per destination exchange, in confirm mode, so a misconfigured exchange (whose 404 closes its
//! channel) never disturbs the others. Publishes are pipelined: each takes a slot of the
//! exchange's confirm window, sends, and awaits its own confirm while others are in flight.
//!
//! Nothing a publisher does waits on a connection attempt or longer than
//! `broker.confirm_timeout_ms`: without a connection a publish fails at once (9325, retried
//! by the action), every publish is `mandatory` (a returned message is 9332, never a 200), a
//! confirm that does not come in time is 9325 (and a connection that stopped answering is
//! dropped and made again), and while the broker blocks publishers (connection.blocked)
//! publishes wait for it within the same time-out.
//!
//! An `amqps://` url connects over TLS with the rustls config of `[broker.tls]` (see
//! [`crate::tls`]): lapin is handed a connector that opens the TCP connection and runs the
//! handshake, so a server certificate no trusted CA signed, or one for another host name, is a
//! failed connection attempt with the reason said plainly (9325, retried), never a panic.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Mutex, Semaphore, watch};

use crate::config::broker::{BrokerConfig, redact};
use crate::outcome::{Code, Failure};

mod classify;
pub use classify::classify;

/// The TLS side of an `amqps://` connection.
struct TlsLink {
    config: Arc<crate::tls::rustls::ClientConfig>,
    /// The host the certificate must be valid for.
    host: String,
    /// What the client trusts, for the words of a failed handshake.
    trusts: String,
    /// Whether it shows a client certificate (`broker.tls.cert`).
    identity: bool,
}

impl TlsLink {
    /// A broker that wants a client certificate it trusts checks it after the TLS 1.3
    /// handshake, and its refusal usually arrives as a reset connection rather than as its
    /// alert: say what that likely means.
    fn closed(&self, e: &lapin::Error) -> Option<String> {
        use std::io::ErrorKind as K;
        let lapin::ErrorKind::IOError(io) = e.kind() else {
            return None;
        };
        if !matches!(
            io.kind(),
            K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe
        ) {
            return None;
        }
        let hint = match self.identity {
            false => {
                "does it require a client certificate? Give broker.tls.cert and broker.tls.key"
            }
            true => "does it trust the CA that signed broker.tls.cert?",
        };
        Some(format!(
            "the broker closed the connection right after the TLS handshake ({io}): {hint}"
        ))
    }
}

struct PublishChannel {
    channel: Channel,
    window: Arc<Semaphore>,
}

/// The broker connection, shared by the source and the publisher.
pub struct Broker {
    url: String,
    /// For an `amqps://` url: the TLS client (`[broker.tls]`).
    tls: Option<TlsLink>,
    redacted: String,
    confirm_window: usize,
    confirm_timeout: Duration,
    reconnect_max_delay: Duration,
    /// The live connection, or `None` while there is none. Publishers read it and never wait
    /// for a connection attempt: without one they fail at once (9325, retried).
    current: watch::Sender<Option<Arc<Connection>>>,
    /// Held by whoever is connecting, so there is one attempt at a time; only tasks that need
    /// a connection to go on at all (the source, a group's backlog consumer, the keeper) wait
    /// on it.
    connecting: tokio::sync::Mutex<()>,
    channels: Mutex<HashMap<String, Arc<PublishChannel>>>,
    /// `Some(reason)` while the broker blocks publishers (connection.blocked: a memory or disk
    /// alarm).
    blocked: watch::Sender<Option<String>>,
    /// Why the last connection attempt failed (for health).
    last_error: std::sync::Mutex<Option<String>>,
}

impl Broker {
    pub fn new(config: &BrokerConfig) -> Result<Arc<Broker>, String> {
        let url = config.resolved_url()?;
        let tls = match config.is_tls() {
            true => Some(TlsLink {
                config: crate::tls::client_config("broker", config.tls.as_ref())?,
                host: url::Url::parse(&url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_owned))
                    .unwrap_or_default(),
                trusts: crate::tls::trusts("broker", config.tls.as_ref()),
                identity: config.tls.as_ref().is_some_and(|t| t.identity().is_some()),
            }),
            false => None,
        };
        Ok(Arc::new(Broker {
            tls,
            redacted: redact(&url),
            url,
            confirm_window: config.confirm_window,
            confirm_timeout: Duration::from_millis(config.confirm_timeout_ms),
            reconnect_max_delay: Duration::from_millis(config.reconnect_max_delay_ms),
            current: watch::channel(None).0,
            connecting: tokio::sync::Mutex::new(()),
            channels: Mutex::new(HashMap::new()),
            blocked: watch::channel(None).0,
            last_error: std::sync::Mutex::new(None),
        }))
    }

    /// The URL for logs, password hidden.
    pub fn redacted_url(&self) -> &str {
        &self.redacted
    }

    /// Whether a live connection is up now.
    pub fn is_connected(&self) -> bool {
        self.live().is_some()
    }

    /// Why the broker blocks publishers, while it does (connection.blocked).
    pub fn blocked(&self) -> Option<String> {
        self.blocked.borrow().clone()
    }

    /// Why the last connection attempt failed, if one did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The live connection, if there is one; never waits.
    fn live(&self) -> Option<Arc<Connection>> {
        self.current
            .borrow()
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    /// The live connection, or 9325 (retryable) at once when there is none.
    pub fn connection(&self) -> Result<Arc<Connection>, Failure> {
        self.live().ok_or_else(|| {
            Failure::unreachable(format!(
                "not connected to the broker {} (reconnecting)",
                self.redacted
            ))
        })
    }

    /// A live connection: the current one, or one new attempt to connect (no waiting loop).
    /// Attempts are made one at a time; publishers never wait on them.
    pub async fn connect(self: &Arc<Self>) -> Result<Arc<Connection>, Failure> {
        let _attempt = self.connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        if self.current.borrow().is_some() {
            self.current.send_replace(None);
            self.blocked.send_replace(None);
        }
        let attempt = tokio::time::timeout(Duration::from_secs(10), self.open()).await;
        let conn = match attempt {
            Ok(Ok(c)) => Arc::new(c),
            Ok(Err(e)) => {
                // A failed TLS handshake in words (the client's verdict or the server's alert).
                let tls = (self.tls.as_ref()).and_then(|t| {
                    crate::tls::describe(&e, &t.host, &t.trusts).or_else(|| t.closed(&e))
                });
                let failure = match tls {
                    Some(why) => {
                        Failure::unreachable(format!("cannot connect to {}: {why}", self.redacted))
                    }
                    None => classify::connect_failure(&e, &self.redacted),
                };
                return Err(self.failed(failure));
            }
            Err(_) => {
                return Err(self.failed(Failure::unreachable(format!(
                    "connecting to {} timed out after 10 s",
                    self.redacted
                ))));
            }
        };
        tracing::info!(broker = %self.redacted, "connected to the broker");
        self.follow_events(&conn);
        self.current.send_replace(Some(Arc::clone(&conn)));
        Ok(conn)
    }

    /// Keeps why a connection attempt failed, for health.
    fn failed(&self, failure: Failure) -> Failure {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(failure.reason().to_owned());
        failure
    }

    /// One connection attempt: plain, or over TLS with `[broker.tls]`.
    async fn open(&self) -> lapin::Result<Connection> {
        use lapin::tcp::AMQPUriTcpExt as _;
        use lapin::uri::{AMQPScheme, AMQPUri};
        let Some(tls) = &self.tls else {
            return Connection::connect(&self.url, ConnectionProperties::default()).await;
        };
        let uri: AMQPUri = self.url.parse().map_err(|e: String| {
            lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?;
        let connector = lapin::tcp::RustlsConnector::from(Arc::clone(&tls.config));
        Connection::connector(
            uri,
            lapin::runtime::default_runtime()?,
            async move |uri: AMQPUri, runtime| {
                let host = uri.authority.host.clone();
                let mut tcp = uri;
                tcp.scheme = AMQPScheme::AMQP;
                let stream = tcp.connect_async(&runtime).await?;
                Ok(stream.into_rustls(&connector, &host).await?)
            },
            ConnectionProperties::default(),
        )
        .await
    }

    /// Mirrors the connection's blocked / unblocked notices into [`Broker::blocked`].
    fn follow_events(self: &Arc<Self>, conn: &Connection) {
        use futures::StreamExt;
        let mut events = Box::pin(conn.events_listener());
        let broker = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let Some(broker) = broker.upgrade() else {
                    return;
                };
                match event {
                    lapin::Event::ConnectionBlocked(reason) => {
                        tracing::warn!(broker = %broker.redacted, %reason, "the broker blocks publishers (connection.blocked); publishes wait up to broker.confirm_timeout_ms");
                        broker.blocked.send_replace(Some(reason));
                    }
                    lapin::Event::ConnectionUnblocked => {
                        tracing::info!(broker = %broker.redacted, "the broker unblocked publishers");
                        broker.blocked.send_replace(None);
                    }
                    _ => {}
                }
            }
        });
    }

    /// Waits until connected, retrying every 100 ms doubling to `reconnect_max_delay`, and
    /// says so while it waits. Returns None if `stop` fires first.
    pub async fn connect_with_backoff(
        self: &Arc<Self>,
        stop: &watch::Receiver<bool>,
    ) -> Option<Arc<Connection>> {
        let mut delay = Duration::from_millis(100);
        let mut logged = false;
        loop {
            if *stop.borrow() {
                return None;
            }
            match self.connect().await {
                Ok(c) => return Some(c),
                Err(e) => {
                    if !logged {
                        tracing::warn!(broker = %self.redacted, "broker unavailable, waiting for it: {}", e.reason());
                        logged = true;
                    }
                }
            }
            let mut stop = stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return None,
            }
            delay = (delay * 2).min(self.reconnect_max_delay);
        }
    }

    /// Drops the connection after it stopped answering (a confirm that never came while the
    /// broker did not block us): the keeper connects again.
    fn abandon(&self, conn: &Arc<Connection>) {
        let is_current = self
            .current
            .borrow()
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, conn));
        if is_current {
            tracing::warn!(broker = %self.redacted, "the broker stopped answering; reconnecting");
            self.current.send_replace(None);
            let conn = Arc::clone(conn);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.close(320, "iotfwd: no confirm from the broker".into()),
                )
                .await;
            });
        }
    }

    /// The live connection, waiting for one (until `deadline`) while there is none: a
    /// publish during a reconnect goes out as soon as the broker is back. Waiting watches
    /// the connection's state; it takes no lock a connection attempt holds.
    async fn wait_connected(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Connection>, Failure> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let mut current = self.current.subscribe();
        let live = |c: &Option<Arc<Connection>>| c.as_ref().is_some_and(|c| c.status().connected());
        match tokio::time::timeout_at(deadline, current.wait_for(live)).await {
            Ok(Ok(c)) => Ok(Arc::clone(c.as_ref().expect("live"))),
            _ => Err(Failure::unreachable(format!(
                "not connected to the broker {} within {} ms (broker.confirm_timeout_ms); reconnecting",
                self.redacted,
                self.confirm_timeout.as_millis()
            ))),
        }
    }

    async fn channel_for(
        &self,
        exchange: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<PublishChannel>, Failure> {
        let conn = self.wait_connected(deadline).await?;
        let mut channels = self.channels.lock().await;
        if let Some(c) = channels.get(exchange)
            && c.channel.status().connected()
        {
            return Ok(Arc::clone(c));
        }
        let open = async {
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = match tokio::time::timeout_at(deadline, open).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(classify(&e)),
            Err(_) => {
                self.abandon(&conn);
                return Err(Failure::unreachable(format!(
                    "opening a channel on {} timed out after {} ms",
                    self.redacted,
                    self.confirm_timeout.as_millis()
                )));
            }
        };
        let pc = Arc::new(PublishChannel {
            channel,
            window: Arc::new(Semaphore::new(self.confirm_window)),
        });
        channels.insert(exchange.to_owned(), Arc::clone(&pc));
        Ok(pc)
    }

    /// Publishes one message as mandatory and waits for its confirm (other publishes stay in
    /// flight). A message the broker returns as unroutable (no queue bound for the routing
    /// key) is a 9332 failure, never a success: RabbitMQ confirms returned messages with an
    /// ack. While the broker blocks publishers, and for the confirm itself, it waits at most
    /// `broker.confirm_timeout_ms`; then it fails with 9325 (retryable), naming the alarm
    /// when there is one.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), Failure> {
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        self.wait_unblocked(deadline).await?;
        let pc = self.channel_for(exchange, deadline).await?;
        let _slot = tokio::time::timeout_at(deadline, pc.window.acquire())
            .await
            .map_err(|_| self.timed_out("a slot of the confirm window", exchange))?
            .expect("the window is never closed");
        let publish = async {
            let confirm = pc
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties,
                )
                .await?;
            confirm.await
        };
        let result = match tokio::time::timeout_at(deadline, publish).await {
            Ok(r) => r,
            Err(_) => {
                let failure = self.timed_out("its publisher confirm", exchange);
                if self.blocked().is_none()
                    && let Some(conn) = self.live()
                {
                    self.abandon(&conn);
                }
                return Err(failure);
            }
        };
        match result {
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => Err(
                Failure::unroutable(exchange, routing_key, returned.reply_text.as_str()),
            ),
            Ok(c) if c.is_nack() => Err(Failure::refused(format!(
                "the broker refused the message (publisher nack) on exchange {exchange:?}"
            ))),
            Ok(_) => Ok(()),
            Err(e) => Err(classify(&e)),
        }
    }

    /// Waits while the broker blocks publishers, until `deadline`.
    async fn wait_unblocked(&self, deadline: tokio::time::Instant) -> Result<(), Failure> {
        let mut blocked = self.blocked.subscribe();
        match tokio::time::timeout_at(deadline, blocked.wait_for(Option::is_none)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(self.timed_out("the broker to unblock publishers", "")),
        }
    }

    /// 9325 for a publish that waited `confirm_timeout` for `what`.
    fn timed_out(&self, what: &str, exchange: &str) -> Failure {
        let on = if exchange.is_empty() {
            String::new()
        } else {
            format!(" on exchange {exchange:?}")
        };
        let alarm = match self.blocked() {
            Some(reason) => format!(
                "; the broker blocks publishers (connection.blocked: {reason}), see `rabbitmq-diagnostics alarms`"
            ),
            None => String::new(),
        };
        Failure::unreachable(format!(
            "waited {} ms (broker.confirm_timeout_ms) for {what}{on}{alarm}",
            self.confirm_timeout.as_millis()
        ))
    }

    /// Closes the connection (on shutdown), after in-flight publishes were awaited.
    pub async fn close(&self) {
        let current = self.current.send_replace(None);
        if let Some(c) = current {
            let _ = c.close(200, "iotfwd shutting down".into()).await;
        }
    }
}

/// The `failed*` headers that tell the consumer of an error action or a dead-letter queue
/// what failed: `failedAction` (the destination), `failedCode`, `failedReason` and, when
/// known, `failedAttempts`. Added to `headers`.
pub fn failure_headers(
    mut headers: FieldTable,
    action: &str,
    code: Code,
    reason: &str,
    attempts: Option<u32>,
) -> FieldTable {
    headers.insert("failedAction".into(), header(action));
    headers.insert("failedCode".into(), header(&code.to_string()));
    headers.insert("failedReason".into(), header(reason));
    if let Some(n) = attempts {
        headers.insert("failedAttempts".into(), header(&n.to_string()));
    }
    headers
}

/// The identity of a message as headers: `topic`, `productKey`, `deviceName`, `messageId`,
/// `traceId` and `rule` (the rule that forwarded it), added to `headers`.
pub fn identity_headers(mut headers: FieldTable, identity: [(&str, &str); 6]) -> FieldTable {
    for (name, value) in identity {
        headers.insert(name.into(), header(value));
    }
    headers
}

/// Long-string header value.
pub fn header(value: &str) -> lapin::types::AMQPValue {
    lapin::types::AMQPValue::LongString(value.into())
}

/// A header as text, whatever string-ish type it was sent as.
pub fn header_text(value: &lapin::types::AMQPValue) -> Option<String> {
    use lapin::types::AMQPValue as V;
    match value {
        V::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        V::ShortString(s) => Some(s.as_str().to_owned()),
        V::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
        V::LongLongInt(i) => Some(i.to_string()),
        V::LongInt(i) => Some(i.to_string()),
        V::Timestamp(t) => Some(t.to_string()),
        _ => None,
    }
}

/// Keeps the connection up while the daemon runs: checks it every 500 ms and reconnects with
/// backoff when it dropped, so publishing resumes soon after the broker is back even when no
/// source is consuming. Mirrors the state into `iotfwd_broker_connected` and
/// `iotfwd_broker_blocked` (which the daemon exports when it has a `[broker]`, see
/// `Metrics::export_broker_gauges`).
pub async fn keep_connected(
    broker: Arc<Broker>,
    metrics: Arc<crate::telemetry::Metrics>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let up = broker.connect_with_backoff(&stop).await.is_some();
        metrics
            .broker_connected
            .set(i64::from(up && broker.is_connected()));
        metrics
            .broker_blocked
            .set(i64::from(broker.blocked().is_some()));
        if !up {
            return;
        }
        let mut stop = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
