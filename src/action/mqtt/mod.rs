//! `to = "mqtt"`: publish each output to a topic of the `[mqtt]` broker (MQTT 5 or 3.1.1).
//!
//! The body is the rule output as JSON; for an error action it is the original payload. Under
//! MQTT 5 each publish carries user properties: the identity (`topic`, `productKey`,
//! `deviceName`, `messageId`, `traceId`, `rule`), then the action's `properties` templates
//! (MQTT 3.1.1 has nowhere to put them). A QoS 1 publish waits for the broker's PUBACK;
//! publishes are pipelined under the client's window (`source.mqtt`-independent: the publisher
//! has its own connection, client id `<mqtt.client_id>-out`, clean session), opened at the first
//! publish and kept. Failures: a topic or property that resolves to something a publish cannot
//! carry is 9321; a login the broker refuses (bad user name or password, not authorized) is
//! 9333, not retried; an MQTT 5 PUBACK "not authorized" (0x87) is 9333 and any other failure
//! reason code 9331 (retried); the broker unreachable, or the connection lost before the
//! PUBACK, is 9325 and retried under the action's `retry` (so a message may arrive twice, never
//! lost).

pub mod link;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::Retryable;
use tokio::sync::{mpsc, oneshot};

use link::{Happened, LinkError, Options, Role};

use super::{Body, Destination, Job};
use crate::outcome::Failure;
use crate::rules::{MqttAction, MqttQos};

/// Publishes that may wait for their PUBACK at once.
const WINDOW: u16 = 256;

/// The MQTT destination; without an `[mqtt]` every publish fails with 9325.
#[derive(Clone, Default)]
pub struct Mqtt {
    publisher: Option<mpsc::Sender<Publish>>,
    /// The connection speaks MQTT 5, so publishes carry user properties.
    v5: bool,
}

/// One publish handed to the connection task.
struct Publish {
    topic: String,
    qos_1: bool,
    retain: bool,
    payload: Vec<u8>,
    properties: Vec<(String, String)>,
    done: oneshot::Sender<Result<(), Failure>>,
}

impl Mqtt {
    /// A destination publishing through the broker of `config`; its connection task runs until
    /// every clone of the destination is dropped.
    pub fn start(config: &crate::config::mqtt::MqttConfig) -> Result<Mqtt, String> {
        let options = Options::new(
            config,
            Role {
                client_id: format!("{}-out", config.client_id),
                clean_start: true,
                manual_acks: false,
                inflight: WINDOW,
            },
        )?;
        let (tx, rx) = mpsc::channel(usize::from(WINDOW));
        tokio::spawn(connection_task(
            options,
            crate::tls::trusts("mqtt", config.tls.as_ref()),
            rx,
            Duration::from_millis(config.reconnect_max_delay_ms),
        ));
        Ok(Mqtt {
            publisher: Some(tx),
            v5: config.is_v5(),
        })
    }
}

/// The failure of the publishes a connection ending with `e` leaves unanswered: a login the
/// broker refused is 9333 and final (a retry cannot fix the credentials), anything else 9325.
fn connection_failure(e: LinkError) -> Failure {
    let reason = format!("MQTT publisher: {}", e.text);
    if e.login_refused {
        Failure::access_refused(reason)
    } else {
        Failure::unreachable(reason)
    }
}

/// The failure of a publish the broker answered with a failure reason code (MQTT 5): "not
/// authorized" is 9333 and final, any other 9331 (the broker may take it later: retried).
fn refusal(code: u8, name: &str, topic: &str) -> Failure {
    let reason =
        format!("the broker refused the publish to {topic:?}: {name} (reason code 0x{code:02x})");
    if code == link::NOT_AUTHORIZED {
        Failure::access_refused(reason)
    } else {
        Failure::refused(reason)
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
        let properties = if self.v5 {
            user_properties(action, job)?
        } else {
            Vec::new()
        };
        let publish = || async {
            job.attempt();
            let (done, result) = oneshot::channel();
            let request = Publish {
                topic: topic.clone(),
                qos_1: action.qos == MqttQos::AtLeastOnce,
                retain: action.retain,
                payload: payload.clone(),
                properties: properties.clone(),
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

/// The MQTT 5 user properties of a publish: the identity, then the action's `properties`
/// templates rendered over the output (9321 for one that cannot be carried).
fn user_properties(action: &MqttAction, job: &Job<'_>) -> Result<Vec<(String, String)>, Failure> {
    let mut properties: Vec<(String, String)> = job
        .message
        .identity_properties(&job.rule.name)
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for (key, template) in &action.properties {
        let value = template
            .render(job.output)
            .map_err(|e| Failure::invalid_parameter(format!("properties.{key}: {e}")))?;
        if value.contains('\0') || value.len() > 65_535 {
            return Err(Failure::invalid_parameter(format!(
                "properties.{key}: the value is over 65535 bytes or contains a NUL character"
            )));
        }
        properties.push((key.clone(), value));
    }
    Ok(properties)
}

/// A publish handed to the client and not yet answered: whether it is QoS 1, its topic (for
/// the words of a refusal) and who waits for it.
type Waiter = (bool, String, oneshot::Sender<Result<(), Failure>>);

/// Publishes waiting for their turn: in the order they were handed to the client (which is the
/// order the event loop sends them), then by packet id until their PUBACK.
#[derive(Default)]
struct Waiting {
    queued: VecDeque<Waiter>,
    by_pkid: HashMap<u16, VecDeque<Waiter>>,
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
            .chain(self.by_pkid.drain().flat_map(|(_, q)| q));
        for (_, _, w) in waiters {
            let _ = w.send(Err(failure.clone()));
        }
    }
}

/// Owns the connection: connects at the first publish, reconnects with backoff, and answers
/// each publish once the broker acknowledged it (QoS 1) or it was written (QoS 0). A client
/// per connection, so nothing of a broken connection is resent behind the caller's back (the
/// caller's retry decides).
async fn connection_task(
    options: Options,
    trusts: String,
    mut rx: mpsc::Receiver<Publish>,
    max_delay: Duration,
) {
    let host = options.broker_address().0;
    let mut delay = Duration::from_millis(100);
    let mut next = rx.recv().await;
    while let Some(first) = next.take() {
        let (client, mut events) = options.connect(usize::from(WINDOW) * 4);
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let mut pending = Some(first);
        let mut connected = false;
        let failure = loop {
            if connected && let Some(p) = pending.take() {
                waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .queued
                    .push_back((p.qos_1, p.topic.clone(), p.done));
                if let Err(e) =
                    client.try_publish(p.topic, p.qos_1, p.retain, p.payload, p.properties)
                {
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
                        client.disconnect().await;
                        return;
                    }
                },
                event = events.poll(&host, &trusts) => match event {
                    Ok(Happened::Connected { .. }) => {
                        connected = true;
                        delay = Duration::from_millis(100);
                    }
                    Ok(Happened::Sent(pkid)) => {
                        let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some((qos_1, topic, done)) = w.queued.pop_front() {
                            if qos_1 {
                                w.by_pkid.entry(pkid).or_default().push_back((qos_1, topic, done));
                            } else {
                                let _ = done.send(Ok(()));
                            }
                        }
                    }
                    Ok(Happened::PubAck { pkid, refused }) => {
                        let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some((_, topic, done)) = w.by_pkid.get_mut(&pkid).and_then(VecDeque::pop_front) {
                            let _ = done.send(match refused {
                                None => Ok(()),
                                Some((code, name)) => Err(refusal(code, name, &topic)),
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break connection_failure(e),
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
