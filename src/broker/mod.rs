//! The RabbitMQ connection (lapin): connecting and reconnecting, and publishing with
//! publisher confirms.
//!
//! One connection serves the source and every `to = "amqp"` action. Publishes use one channel
//! per destination exchange, in confirm mode, so a misconfigured exchange (whose 404 closes its
//! channel) never disturbs the others. Publishes are pipelined: each takes a slot of the
//! exchange's confirm window, sends, and awaits its own confirm while others are in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Mutex, Semaphore};

use crate::config::broker::{BrokerConfig, redact};
use crate::outcome::{Code, Failure};

mod classify;
pub use classify::classify;

struct PublishChannel {
    channel: Channel,
    window: Arc<Semaphore>,
}

/// The broker connection, shared by the source and the publisher.
pub struct Broker {
    url: String,
    redacted: String,
    confirm_window: usize,
    reconnect_max_delay: Duration,
    connection: Mutex<Option<Arc<Connection>>>,
    channels: Mutex<HashMap<String, Arc<PublishChannel>>>,
    connected: AtomicBool,
}

impl Broker {
    pub fn new(config: &BrokerConfig) -> Result<Arc<Broker>, String> {
        let url = config.resolved_url()?;
        Ok(Arc::new(Broker {
            redacted: redact(&url),
            url,
            confirm_window: config.confirm_window,
            reconnect_max_delay: Duration::from_millis(config.reconnect_max_delay_ms),
            connection: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
        }))
    }

    /// The URL for logs, password hidden.
    pub fn redacted_url(&self) -> &str {
        &self.redacted
    }

    /// Whether the last connection attempt or use found the broker connected.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// A live connection: the current one, or one new attempt to connect (no waiting loop).
    pub async fn connection(&self) -> Result<Arc<Connection>, Failure> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.status().connected() {
                return Ok(Arc::clone(c));
            }
            self.connected.store(false, Ordering::Relaxed);
        }
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&self.url, ConnectionProperties::default()),
        )
        .await;
        let conn = match attempt {
            Ok(Ok(c)) => Arc::new(c),
            Ok(Err(e)) => return Err(classify::connect_failure(&e, &self.redacted)),
            Err(_) => {
                return Err(Failure::unreachable(format!(
                    "connecting to {} timed out after 10 s",
                    self.redacted
                )));
            }
        };
        tracing::info!(broker = %self.redacted, "connected to the broker");
        *slot = Some(Arc::clone(&conn));
        self.connected.store(true, Ordering::Relaxed);
        Ok(conn)
    }

    /// Waits until connected, retrying every 100 ms doubling to `reconnect_max_delay`, and
    /// says so while it waits. Returns None if `stop` fires first.
    pub async fn connect_with_backoff(
        &self,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Option<Arc<Connection>> {
        let mut delay = Duration::from_millis(100);
        let mut logged = false;
        loop {
            if *stop.borrow() {
                return None;
            }
            match self.connection().await {
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

    async fn channel_for(&self, exchange: &str) -> Result<Arc<PublishChannel>, Failure> {
        {
            let channels = self.channels.lock().await;
            if let Some(c) = channels.get(exchange)
                && c.channel.status().connected()
            {
                return Ok(Arc::clone(c));
            }
        }
        let conn = self.connection().await?;
        let channel = conn.create_channel().await.map_err(|e| classify(&e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| classify(&e))?;
        let pc = Arc::new(PublishChannel {
            channel,
            window: Arc::new(Semaphore::new(self.confirm_window)),
        });
        self.channels
            .lock()
            .await
            .insert(exchange.to_owned(), Arc::clone(&pc));
        Ok(pc)
    }

    /// Publishes one message and waits for its confirm (other publishes stay in flight).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), Failure> {
        let pc = self.channel_for(exchange).await?;
        let _slot = pc
            .window
            .acquire()
            .await
            .expect("the window is never closed");
        let result = async {
            let confirm = pc
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    payload,
                    properties,
                )
                .await?;
            confirm.await
        }
        .await;
        match result {
            Ok(c) if c.is_nack() => Err(Failure::refused(format!(
                "the broker refused the message (publisher nack) on exchange {exchange:?}"
            ))),
            Ok(_) => Ok(()),
            Err(e) => {
                let err = classify(&e);
                if err.code() == Code::DestinationUnavailable {
                    self.connected.store(false, Ordering::Relaxed);
                }
                Err(err)
            }
        }
    }

    /// Closes the connection (on shutdown), after in-flight publishes were awaited.
    pub async fn close(&self) {
        if let Some(c) = self.connection.lock().await.take() {
            let _ = c.close(200, "iotfwd shutting down".into()).await;
        }
        self.connected.store(false, Ordering::Relaxed);
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
/// source is consuming. Mirrors the state into `iotfwd_broker_connected` (which the daemon
/// exports when it has a `[broker]`, see `Metrics::export_broker_connected`).
pub async fn keep_connected(
    broker: Arc<Broker>,
    metrics: Arc<crate::telemetry::Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let up = broker.connect_with_backoff(&stop).await.is_some();
        metrics
            .broker_connected
            .set(i64::from(up && broker.is_connected()));
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
