//! `[source.mqtt]`: subscribe to device topics on an MQTT broker, at least once (MQTT 5 or
//! 3.1.1, through [`crate::action::mqtt::link`]).
//!
//! Each PUBLISH becomes a [`Message`]: the MQTT topic is the message's topic, so productKey and
//! deviceName come from `/productKey/deviceName/…`; a topic not of that form is recorded as
//! 1903 and acknowledged. A QoS 1 message is acknowledged (PUBACK) only once every action of
//! every rule it matched is terminal, as the RabbitMQ source acks. Under MQTT 5 a publish's
//! user properties `messageId` and `traceId`, when present, are the message's identity; and
//! the receive maximum (`max_inflight`) bounds what the broker sends before iotfwd acks.
//!
//! MQTT has no negative acknowledgement (a failure PUBACK ends the message for good): a message whose action and error action both
//! failed (`requeue`) is left unacknowledged, and the broker redelivers it on the next
//! connection of the persistent session. So after such a message the source stops taking new
//! messages, lets what is in flight finish, and reconnects about a second later.
//!
//! Every connection gets its own client: an acknowledgement of a message received on an earlier
//! connection is never sent on a later one, where the broker may have given its packet id to
//! another message. What was in flight when a connection broke is redelivered (a duplicate,
//! never a loss).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::action::mqtt::link::{Client, Happened, Options, Received, Role};
use crate::config::mqtt::{MqttConfig, MqttSourceConfig};
use crate::message::Message;
use crate::outcome::Failure;
use crate::pipeline::{Pipeline, Turn, Turns};

/// How long after a message that must be redelivered the source reconnects, so a destination
/// that is down for good does not become a hot redelivery loop.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// The MQTT connection as health and metrics show it. Cheap to share.
#[derive(Default)]
pub struct MqttLink {
    connected: AtomicBool,
    gauge: Option<prometheus::IntGauge>,
    last_error: std::sync::Mutex<Option<String>>,
}

impl MqttLink {
    /// A link that mirrors its state into `gauge` (`iotfwd_mqtt_connected`).
    pub fn new(gauge: prometheus::IntGauge) -> MqttLink {
        MqttLink {
            gauge: Some(gauge),
            ..MqttLink::default()
        }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Why the last connection ended or failed, if one did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, connected: bool, error: Option<String>) {
        self.connected.store(connected, Ordering::Relaxed);
        if let Some(g) = &self.gauge {
            g.set(i64::from(connected));
        }
        if error.is_some() {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        }
    }
}

/// What everything the source needs to connect: built (and the password read) at start-up.
pub struct MqttSource {
    options: Options,
    /// What the TLS client trusts (`mqtts://`), for the words of a failed handshake.
    trusts: String,
    config: MqttSourceConfig,
    max_delay: Duration,
    link: Arc<MqttLink>,
}

impl MqttSource {
    /// Reads the password and builds the connection options; errors name the config key.
    pub fn new(
        mqtt: &MqttConfig,
        config: &MqttSourceConfig,
        link: Arc<MqttLink>,
    ) -> Result<MqttSource, String> {
        let options = Options::new(
            mqtt,
            Role {
                client_id: mqtt.client_id.clone(),
                clean_start: config.clean_start,
                manual_acks: true,
                inflight: config.max_inflight,
            },
        )?;
        Ok(MqttSource {
            options,
            trusts: crate::tls::trusts("mqtt", mqtt.tls.as_ref()),
            config: config.clone(),
            max_delay: Duration::from_millis(mqtt.reconnect_max_delay_ms),
            link,
        })
    }

    /// `host:port` of the broker, for logs.
    pub fn broker(&self) -> String {
        let (host, port) = self.options.broker_address();
        format!("{host}:{port}")
    }
}

/// How a connection ended.
enum Ended {
    /// `stop` turned true: drained and disconnected.
    Stopped,
    /// A message must be redelivered: drained and disconnected, reconnect soon.
    Redeliver,
    /// The connection failed.
    Failed(String),
}

/// Subscribes until `stop` turns true, reconnecting with backoff; then stops taking messages,
/// lets in-flight ones finish within `grace` (acknowledging them), and disconnects cleanly so
/// the broker's session keeps whatever was not acknowledged.
pub async fn run(
    source: MqttSource,
    pipeline: Pipeline,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        match connection(&source, &pipeline, stop.clone(), grace).await {
            (Ended::Stopped, _) => return,
            (Ended::Redeliver, _) => {
                tracing::info!(
                    "reconnecting to the MQTT broker so it redelivers the messages left unacknowledged"
                );
                delay = Duration::from_millis(100);
                continue;
            }
            (Ended::Failed(e), was_connected) => {
                if was_connected {
                    delay = Duration::from_millis(100);
                }
                tracing::warn!(broker = %source.broker(), "MQTT: {e}; reconnecting in {} ms", delay.as_millis());
                source.link.set(false, Some(e));
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(source.max_delay);
    }
}

/// One connection: connect, subscribe, take messages. Returns how it ended and whether it had
/// connected.
async fn connection(
    source: &MqttSource,
    pipeline: &Pipeline,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> (Ended, bool) {
    let cap = usize::from(source.config.max_inflight) + 16;
    let (client, mut events) = source.options.connect(cap);
    let host = source.options.broker_address().0;
    let trusts = source.trusts.as_str();
    // The CONNACK first.
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => return (Ended::Stopped, false),
            e = events.poll(&host, trusts) => e,
        };
        match event {
            Ok(Happened::Connected { session_present }) => {
                tracing::info!(broker = %source.broker(), session_present, "MQTT connected");
                break;
            }
            Ok(_) => {}
            Err(e) => return (Ended::Failed(e.text), false),
        }
    }
    let filters = source.config.subscriptions();
    if let Err(e) = client.subscribe(&filters, source.config.qos != 0).await {
        return (Ended::Failed(e), true);
    }
    let permits = Arc::new(Semaphore::new(usize::from(source.config.max_inflight)));
    // False once this connection stops taking messages: a message still waiting for a permit
    // then stays with the broker (redelivered later) instead of being processed and never
    // acknowledged, which would only forward it twice.
    let live = Arc::new(AtomicBool::new(true));
    let (requeue_tx, mut requeue_rx) = mpsc::unbounded_channel::<()>();
    let mut in_flight = JoinSet::new();
    // Publishes enter the pipeline in the order they were received (per-device order).
    let mut turns = Turns::default();
    let mut redeliver_at: Option<tokio::time::Instant> = None;
    let ended = loop {
        let redeliver = async {
            match redeliver_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break Ended::Stopped,
            _ = redeliver => break Ended::Redeliver,
            Some(()) = requeue_rx.recv() => {
                redeliver_at.get_or_insert_with(|| tokio::time::Instant::now() + REQUEUE_DELAY);
            }
            event = events.poll(&host, trusts) => match event {
                Ok(Happened::Publish(publish)) => {
                    let task = Handle {
                        client: client.clone(),
                        pipeline: pipeline.clone(),
                        permits: Arc::clone(&permits),
                        live: Arc::clone(&live),
                        requeue: requeue_tx.clone(),
                    };
                    in_flight.spawn(task.run(publish, turns.take()));
                }
                Ok(Happened::Subscribed(granted)) => {
                    // Connected, in health's sense, once the broker took the subscriptions.
                    source.link.set(true, None);
                    for (filter, granted) in filters.iter().zip(granted) {
                        if !granted {
                            tracing::error!(%filter, "the MQTT broker refused the subscription (not authorized, or an invalid filter)");
                            source.link.set(true, Some(format!("subscription to {filter} refused by the broker")));
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // The acks of what is in flight cannot reach the broker any more: it
                    // redelivers those messages to the next connection. What is being
                    // processed finishes (its records are written); what waits does not start.
                    live.store(false, Ordering::Relaxed);
                    in_flight.detach_all();
                    return (Ended::Failed(e.text), true);
                }
            },
        }
        while in_flight.try_join_next().is_some() {}
    };
    // Stop taking: messages that arrive from now on, or wait for a permit, are not processed nor
    // acknowledged, so the session keeps them. Keep polling, so the acknowledgements of what
    // finishes reach the broker.
    live.store(false, Ordering::Relaxed);
    let pending = in_flight.len();
    if pending > 0 {
        tracing::info!(pending, "MQTT source: finishing in-flight messages");
    }
    let drained = tokio::time::timeout(grace, async {
        loop {
            tokio::select! {
                next = in_flight.join_next() => if next.is_none() { break },
                event = events.poll(&host, trusts) => if event.is_err() { return false },
            }
        }
        true
    })
    .await;
    if !matches!(drained, Ok(true)) {
        tracing::warn!(
            pending = in_flight.len(),
            "MQTT: in-flight messages did not finish; the broker redelivers them"
        );
        in_flight.abort_all();
    }
    // Send the DISCONNECT (after the queued acknowledgements) and wait for the broker to close.
    client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll(&host, trusts).await.is_ok() {}
    })
    .await;
    source.link.set(false, None);
    (ended, true)
}

/// One message's way through the pipeline, and its acknowledgement.
struct Handle {
    client: Client,
    pipeline: Pipeline,
    permits: Arc<Semaphore>,
    live: Arc<AtomicBool>,
    requeue: mpsc::UnboundedSender<()>,
}

impl Handle {
    /// Handles one publish; it enters the pipeline in its `turn`, after the publishes received
    /// before it (per-device order), and takes a permit only then, so publishes waiting for
    /// their turn hold none.
    async fn run(self, publish: Received, mut turn: Turn) {
        turn.wait().await;
        let Ok(_permit) = self.permits.acquire().await else {
            return;
        };
        if !self.live.load(Ordering::Relaxed) {
            return;
        }
        let (topic, payload, identity) = (publish.topic(), publish.payload(), publish.identity());
        let ack = match Message::new(topic.clone(), payload.clone(), identity.clone()) {
            Err(rejection) => {
                // Not processable, ever: record why and acknowledge it.
                self.pipeline
                    .reject(&topic, &payload, &Failure::rejected(&rejection), &identity)
                    .await;
                true
            }
            Ok(message) => match self
                .pipeline
                .submit_in_turn(vec![message], "mqtt", turn)
                .await
            {
                Ok(reports) => !reports.iter().any(|r| r.requeue),
                Err(_) => false,
            },
        };
        if !publish.needs_ack() {
            return;
        }
        if ack {
            if let Err(e) = self.client.ack(&publish).await {
                tracing::debug!("MQTT: could not acknowledge ({e}); the broker will redeliver");
            }
        } else {
            let _ = self.requeue.send(());
        }
    }
}
