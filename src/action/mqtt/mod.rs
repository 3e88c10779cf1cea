//! `to = "mqtt"`: publish each output to a topic of the `[mqtt]` broker (MQTT 3.1.1).
//!
//! The body is the rule output as JSON; for an error action it is the original payload (MQTT
//! 3.1.1 has no headers to describe the failure in). A QoS 1 publish waits for the broker's
//! PUBACK; publishes are pipelined under the client's window (`source.mqtt`-independent: the
//! publisher has its own connection, client id `<mqtt.client_id>-out`, clean session), opened
//! at the first publish and kept. Failures: a topic that resolves to something a publish
//! cannot carry is 9321; a login the broker refuses (bad user name or password, not
//! authorized) is 9333, not retried; the broker unreachable, or the connection lost before the
//! PUBACK, is 9325 and retried under the action's `retry` (so a message may arrive twice, never
//! lost).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::Retryable;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

use super::{Body, Destination, Job};
use crate::outcome::Failure;
use crate::rules::{MqttAction, MqttQos};

/// Publishes that may wait for their PUBACK at once.
const WINDOW: u16 = 256;

/// The MQTT destination; without an `[mqtt]` every publish fails with 9325.
#[derive(Clone, Default)]
pub struct Mqtt {
    publisher: Option<mpsc::Sender<Publish>>,
}

/// One publish handed to the connection task.
struct Publish {
    topic: String,
    qos: QoS,
    retain: bool,
    payload: Vec<u8>,
    done: oneshot::Sender<Result<(), Failure>>,
}

impl Mqtt {
    /// A destination publishing through the broker of `config`; its connection task runs until
    /// every clone of the destination is dropped.
    pub fn start(config: &crate::config::mqtt::MqttConfig) -> Result<Mqtt, String> {
        let (host, port) = config.host_port().map_err(|e| format!("mqtt.url: {e}"))?;
        let mut options = MqttOptions::new(format!("{}-out", config.client_id), host, port);
        options
            .set_keep_alive(Duration::from_secs(u64::from(config.keep_alive_s.max(1))))
            .set_clean_session(true)
            .set_inflight(WINDOW)
            .set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        if let Some(user) = &config.username {
            options.set_credentials(user.clone(), config.password()?.unwrap_or_default());
        }
        if config.is_tls() {
            let tls = crate::tls::client_config("mqtt", config.tls.as_ref())?;
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        let (tx, rx) = mpsc::channel(usize::from(WINDOW));
        tokio::spawn(connection_task(
            options,
            crate::tls::trusts("mqtt", config.tls.as_ref()),
            rx,
            Duration::from_millis(config.reconnect_max_delay_ms),
        ));
        Ok(Mqtt {
            publisher: Some(tx),
        })
    }
}

/// A connection error as an operator reads it (the source's and the publisher's); `host` and
/// `trusts` word a failed TLS handshake (`mqtts://`).
pub fn describe(e: &ConnectionError, host: &str, trusts: &str) -> String {
    use rumqttc::ConnectReturnCode as C;
    match e {
        ConnectionError::ConnectionRefused(C::BadUserNamePassword) => {
            "the broker refused the login: bad user name or password (mqtt.username, mqtt.password_env / password_file)".into()
        }
        // Mosquitto answers a wrong password so too.
        ConnectionError::ConnectionRefused(C::NotAuthorized) => {
            "the broker refused the login: not authorized (check mqtt.username, the password in mqtt.password_env / password_file, and the broker's access rules)".into()
        }
        ConnectionError::ConnectionRefused(C::BadClientId) => {
            "the broker refused the client id (mqtt.client_id)".into()
        }
        ConnectionError::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
        other => crate::tls::describe(other, host, trusts)
            .unwrap_or_else(|| format!("connection lost or refused: {other}")),
    }
}

/// The failure of the publishes a connection ending with `e` leaves unanswered: a login the
/// broker refused is 9333 and final (a retry cannot fix the credentials), anything else 9325.
fn connection_failure(e: &ConnectionError, host: &str, trusts: &str) -> Failure {
    use rumqttc::ConnectReturnCode as C;
    let reason = format!("MQTT publisher: {}", describe(e, host, trusts));
    match e {
        ConnectionError::ConnectionRefused(C::BadUserNamePassword | C::NotAuthorized) => {
            Failure::access_refused(reason)
        }
        _ => Failure::unreachable(reason),
    }
}

/// Why a resolved topic cannot be published to, if it cannot.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the topic is empty".into());
    }
    if topic.len() > 65_535 {
        return Err(format!(
            "the topic is {} bytes; MQTT allows 65535",
            topic.len()
        ));
    }
    if topic.contains(['+', '#']) {
        return Err(format!("the topic {topic:?} contains a wildcard (+ or #)"));
    }
    if topic.contains('\0') {
        return Err(format!("the topic {topic:?} contains a NUL character"));
    }
    if topic.starts_with('$') {
        return Err(format!(
            "the topic {topic:?} starts with $, which is the broker's own"
        ));
    }
    Ok(())
}

impl Destination for Mqtt {
    type Spec = MqttAction;

    async fn send(&self, action: &MqttAction, job: &Job<'_>) -> Result<(), Failure> {
        let invalid = Failure::invalid_parameter;
        let topic = action
            .topic
            .render(job.output)
            .map_err(|e| invalid(format!("topic: {e}")))?;
        check_topic(&topic).map_err(|e| invalid(format!("topic: {e}")))?;
        let payload: Vec<u8> = match job.body {
            Body::Output => serde_json::to_vec(job.output).expect("a JSON map serializes"),
            Body::Failure(_) => job.message.payload.to_vec(),
        };
        let Some(publisher) = &self.publisher else {
            return Err(Failure::not_available(
                "no [mqtt] is configured, so mqtt actions cannot be delivered",
            ));
        };
        let qos = match action.qos {
            MqttQos::AtMostOnce => QoS::AtMostOnce,
            MqttQos::AtLeastOnce => QoS::AtLeastOnce,
        };
        let publish = || async {
            job.attempt();
            let (done, result) = oneshot::channel();
            let request = Publish {
                topic: topic.clone(),
                qos,
                retain: action.retain,
                payload: payload.clone(),
                done,
            };
            publisher
                .send(request)
                .await
                .map_err(|_| Failure::unreachable("the MQTT publisher stopped"))?;
            result.await.map_err(|_| {
                Failure::unreachable("the MQTT connection ended before the broker acknowledged")
            })?
        };
        publish
            .retry(action.retry.backoff())
            .when(|e: &Failure| e.retryable())
            .notify(|e: &Failure, after| {
                job.retries.inc();
                tracing::debug!(%topic, "MQTT publish failed, retrying in {after:?}: {e}");
            })
            .await
            .map_err(|e| {
                let n = job.attempts.load(std::sync::atomic::Ordering::Relaxed);
                if n > 1 {
                    e.map_reason(|r| format!("{r} (after {n} attempts)"))
                } else {
                    e
                }
            })
    }
}

/// Publishes waiting for their turn: in the order they were handed to the client (which is the
/// order the event loop sends them), then by packet id until their PUBACK.
#[derive(Default)]
struct Waiting {
    queued: VecDeque<(QoS, oneshot::Sender<Result<(), Failure>>)>,
    by_pkid: HashMap<u16, VecDeque<oneshot::Sender<Result<(), Failure>>>>,
}

impl Waiting {
    /// Publishes handed to the client and not yet answered.
    fn len(&self) -> usize {
        self.queued.len() + self.by_pkid.values().map(VecDeque::len).sum::<usize>()
    }

    fn fail_all(&mut self, failure: &Failure) {
        let waiters = self
            .queued
            .drain(..)
            .map(|(_, w)| w)
            .chain(self.by_pkid.drain().flat_map(|(_, q)| q));
        for w in waiters {
            let _ = w.send(Err(failure.clone()));
        }
    }
}

/// Owns the connection: connects at the first publish, reconnects with backoff, and answers
/// each publish once the broker acknowledged it (QoS 1) or it was written (QoS 0). A client
/// per connection, so nothing of a broken connection is resent behind the caller's back (the
/// caller's retry decides).
async fn connection_task(
    options: MqttOptions,
    trusts: String,
    mut rx: mpsc::Receiver<Publish>,
    max_delay: Duration,
) {
    let mut delay = Duration::from_millis(100);
    let mut next = rx.recv().await;
    while let Some(first) = next.take() {
        let (client, mut events) = AsyncClient::new(options.clone(), usize::from(WINDOW) * 4);
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let mut pending = Some(first);
        let mut connected = false;
        let failure = loop {
            if connected && let Some(p) = pending.take() {
                waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .queued
                    .push_back((p.qos, p.done));
                if let Err(e) = client.try_publish(p.topic, p.qos, p.retain, p.payload) {
                    break Failure::unreachable(format!(
                        "cannot hand the publish to the MQTT client: {e}"
                    ));
                }
            }
            // Take the next publish only while the client's request channel has room.
            let room =
                waiting.lock().unwrap_or_else(|e| e.into_inner()).len() < usize::from(WINDOW) * 3;
            tokio::select! {
                request = rx.recv(), if connected && pending.is_none() && room => match request {
                    Some(p) => pending = Some(p),
                    None => {
                        let _ = client.disconnect().await;
                        return;
                    }
                },
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        delay = Duration::from_millis(100);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid) | Outgoing::AwaitAck(pkid))) => {
                        let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some((qos, done)) = w.queued.pop_front() {
                            if qos == QoS::AtMostOnce {
                                let _ = done.send(Ok(()));
                            } else {
                                w.by_pkid.entry(pkid).or_default().push_back(done);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(done) = w.by_pkid.get_mut(&ack.pkid).and_then(VecDeque::pop_front) {
                            let _ = done.send(Ok(()));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break connection_failure(&e, &options.broker_address().0, &trusts),
                },
            }
        };
        tracing::warn!("{}; reconnecting at the next publish", failure.reason());
        waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail_all(&failure);
        if let Some(p) = pending.take() {
            let _ = p.done.send(Err(failure.clone()));
        }
        // Fail what queued up meanwhile (the callers retry), after a pause.
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(max_delay);
        while let Ok(p) = rx.try_recv() {
            let _ = p.done.send(Err(failure.clone()));
        }
        next = rx.recv().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_topics_are_named() {
        assert!(check_topic("/pk/dev/user/command").is_ok());
        for bad in ["", "/a/+/b", "/a/#", "$SYS/x", "a\0b"] {
            assert!(check_topic(bad).is_err(), "{bad:?}");
        }
    }
}
