//! The dead-letter queue: where a forward goes when it failed for good and the rule's
//! `[error_action]` did not take it (there is none, or it failed too), so no failure is acked
//! away (docs/dead-letters.md).
//!
//! Two homes, one interface ([`DeadLetters`]):
//!
//! - without a `[broker]`: the `dead_letters` table of the spool (`<data.dir>/spool.db`,
//!   [`crate::spool::dead_letters`]), committed with an fsync before the source is acked;
//! - with a `[broker]`: a durable fanout exchange (`broker.dead_letter_exchange`, default
//!   `iotfwd.dead`) bound to a durable queue of the same name, which iotfwd declares at first
//!   use and again whenever a publish to it is returned or refused (the queue or exchange was
//!   deleted). Each dead letter is one persistent message, published mandatory with confirms:
//!   its body is the original payload, its headers the envelope and the failure (see
//!   [`to_headers`]). Several iotfwd processes share the queue.
//!
//! Only when the write itself fails is the source message redelivered
//! ([`super::DispatchReport::requeue`]). Each write is a `ruleengine` record with operation
//! `{rule}/dead-letter` ([`Record::dead_letter`]).
//!
//! Working the broker queue: a listing takes the queue's messages with `basic.get` (no
//! auto-ack) on a channel of its own, up to the depth it had when the listing began, and
//! hands them all back (`basic.nack` with requeue, which RabbitMQ puts back in their places).
//! A replay does the same, but acks each message it replayed: a delivered one is gone, one
//! that failed again is first published anew with its new failure (at the queue's tail), then
//! acked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

use crate::broker::{Broker, classify, failure_headers, header, header_text, identity_headers};
use crate::message::identity_properties;
use crate::outcome::{Code, Failure, Outcomes, Record, Subject};
use crate::spool::Spool;
pub use crate::spool::dead_letters::{DeadLetter, Filter, Origin};

/// Whether a final failure with `code` is dead-lettered when the rule has no error action: a
/// destination that could not be reached or refused the message (9325, 9331, 9332, 9333),
/// parameters that did not resolve (9321), a consumer's reject (9652) and, after
/// `max_redeliveries`, a release or ACK time-out (9651, 9650). Quota refusals (9324, 9326) are
/// the platform's decision to drop, and 9399 (a bug) is not a property of the message: they
/// are dead-lettered only when the rule's error action, which wanted them, failed.
pub fn is_dead_lettered(code: Code) -> bool {
    matches!(
        code,
        Code::ParamInvalid
            | Code::DestinationUnavailable
            | Code::DestinationError
            | Code::DestinationMisconfigured
            | Code::DestinationAuth
            | Code::Rejected
            | Code::Released
            | Code::AckTimeout
    )
}

/// Spool dead letters replayed at once. The broker queue is replayed one message at a time
/// (each is taken off with its own `basic.get`).
const REPLAYS_AT_ONCE: usize = 32;

/// The dead-letter queue of this daemon. Cheap to clone.
#[derive(Clone)]
pub struct DeadLetters {
    queue: Arc<Queue>,
    outcomes: Outcomes,
}

enum Queue {
    Spool(Spool),
    Broker {
        broker: Arc<Broker>,
        exchange: String,
        declared: AtomicBool,
    },
}

/// What a replay made of one dead letter.
pub enum Replayed {
    /// Delivered (200, or taken by the rule's error action): it leaves the queue.
    Delivered,
    /// Failed again: it stays, with this failure (code, reason, attempts).
    Failed(Code, String, u32),
}

/// One dead letter's replay, as the API reports it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayResult {
    pub id: i64,
    pub message_id: String,
    pub trace_id: String,
    pub rule: String,
    pub destination: String,
    /// `delivered` (it left the queue) or `failed` (it stays, with `code` and `reason`).
    pub result: &'static str,
    pub code: Code,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl DeadLetters {
    /// The queue in the spool (no `[broker]`).
    pub fn in_spool(spool: Spool, outcomes: Outcomes) -> DeadLetters {
        DeadLetters {
            queue: Arc::new(Queue::Spool(spool)),
            outcomes,
        }
    }

    /// The queue on the broker: exchange and queue `exchange`.
    pub fn on_broker(broker: Arc<Broker>, exchange: &str, outcomes: Outcomes) -> DeadLetters {
        DeadLetters {
            queue: Arc::new(Queue::Broker {
                broker,
                exchange: exchange.to_owned(),
                declared: AtomicBool::new(false),
            }),
            outcomes,
        }
    }

    /// Where dead letters go, for records and the API: `spool:<file>` or `amqp:<exchange>`.
    pub fn name(&self) -> String {
        match &*self.queue {
            Queue::Spool(s) => format!("spool:{}", s.path().display()),
            Queue::Broker { exchange, .. } => format!("amqp:{exchange}"),
        }
    }

    /// Writes `d` to the queue and records the step (`{rule}/dead-letter`) about `subject`.
    /// True when it is in the queue (the source may be acked); false when the write failed
    /// (the source must redeliver the message).
    pub async fn put(&self, d: DeadLetter, subject: &impl Subject) -> bool {
        let written = self.write(&d).await;
        let metrics = self.outcomes.metrics();
        let result = if written.is_ok() { "written" } else { "failed" };
        metrics
            .dead_letters
            .with_label_values(&[d.rule.as_str(), result])
            .inc();
        if let Err(e) = &written {
            tracing::error!(rule = %d.rule, queue = %self.name(), "could not dead-letter message {}: {}", d.message_id, e.reason());
        }
        let record = Record::dead_letter(
            subject,
            &d.rule,
            &d.destination,
            d.code,
            &d.reason,
            &self.name(),
            &written,
        );
        self.outcomes.record(record).await;
        written.is_ok()
    }

    async fn write(&self, d: &DeadLetter) -> Result<(), Failure> {
        match &*self.queue {
            Queue::Spool(spool) => {
                spool
                    .put_dead_letter(d.clone())
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        Failure::not_available(format!(
                            "the dead-letter spool cannot be written: {e}"
                        ))
                    })
            }
            Queue::Broker {
                broker,
                exchange,
                declared,
            } => {
                // Declared at first use, and again when a publish finds the exchange or its
                // queue gone (an operator deleted them): then the publish is tried once more.
                for last in [false, true] {
                    if !declared.load(Ordering::Relaxed) {
                        declare(broker, exchange).await?;
                        declared.store(true, Ordering::Relaxed);
                    }
                    match publish(broker, exchange, d).await {
                        Err(e) if !last && e.code() == Code::DestinationMisconfigured => {
                            declared.store(false, Ordering::Relaxed);
                        }
                        r => return r,
                    }
                }
                unreachable!("the second attempt returns")
            }
        }
    }

    /// Dead letters matching `filter` (at most `filter.limit`), oldest first. On the broker,
    /// their ids are their places in the queue (1 = the head) at the time of the listing.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>, String> {
        match &*self.queue {
            Queue::Spool(spool) => spool
                .dead_letters(filter.clone())
                .await
                .map_err(|e| e.to_string()),
            Queue::Broker {
                broker, exchange, ..
            } => {
                let mut out = Vec::new();
                let Some(mut walk) = Walk::open(broker, exchange).await? else {
                    return Ok(out);
                };
                let read = async {
                    while out.len() < filter.limit
                        && let Some((d, delivery)) = walk.next().await?
                    {
                        walk.keep(&delivery);
                        if filter.matches(&d) {
                            out.push(d);
                        }
                    }
                    Ok::<_, String>(())
                }
                .await;
                walk.close().await;
                read.map(|()| out)
            }
        }
    }

    /// Replays the dead letters matching `filter` (at most `filter.limit`), oldest first, with
    /// `replay`: a delivered one leaves the queue; one that fails again stays with its new
    /// failure and one more replay counted.
    pub async fn replay<F, Fut>(
        &self,
        filter: &Filter,
        replay: F,
    ) -> Result<Vec<ReplayResult>, String>
    where
        F: Fn(DeadLetter) -> Fut,
        Fut: std::future::Future<Output = Replayed>,
    {
        let metrics = Arc::clone(self.outcomes.metrics());
        let count = |d: &DeadLetter, result: &str| {
            metrics
                .dead_letters
                .with_label_values(&[d.rule.as_str(), result])
                .inc();
        };
        let mut results = Vec::new();
        match &*self.queue {
            Queue::Spool(spool) => {
                let letters = spool
                    .dead_letters(filter.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                // Several at once (results in queue order), so their spool writes share
                // commits and their messages share batches.
                use futures::StreamExt;
                let (replay, count) = (&replay, &count);
                let mut done = futures::stream::iter(letters)
                    .map(|d| async move {
                        let outcome = replay(d.clone()).await;
                        let stored = match &outcome {
                            Replayed::Delivered => spool.remove_dead_letter(d.id).await,
                            Replayed::Failed(code, reason, attempts) => {
                                spool
                                    .dead_letter_failed_again(d.id, *code, reason, *attempts)
                                    .await
                            }
                        };
                        stored.map(|()| {
                            count(&d, outcome.metric());
                            outcome.result(&d)
                        })
                    })
                    .buffered(REPLAYS_AT_ONCE);
                while let Some(result) = done.next().await {
                    results.push(result.map_err(|e| e.to_string())?);
                }
            }
            Queue::Broker {
                broker, exchange, ..
            } => {
                let Some(mut walk) = Walk::open(broker, exchange).await? else {
                    return Ok(results);
                };
                let read = async {
                    while results.len() < filter.limit
                        && let Some((d, delivery)) = walk.next().await?
                    {
                        if !filter.matches(&d) {
                            walk.keep(&delivery);
                            continue;
                        }
                        let outcome = replay(d.clone()).await;
                        let remove = match &outcome {
                            Replayed::Delivered => true,
                            Replayed::Failed(code, reason, attempts) => {
                                let mut again = d.clone();
                                again.code = *code;
                                reason.clone_into(&mut again.reason);
                                again.attempts = *attempts;
                                again.replays += 1;
                                again.time_ms = crate::message::now_ms();
                                // The new copy is in the queue before the old one is acked;
                                // if it cannot be written, the old one stays as it was.
                                match publish(broker, exchange, &again).await {
                                    Ok(()) => true,
                                    Err(e) => {
                                        tracing::warn!(
                                            "could not write the replayed dead letter {} back: {}",
                                            d.message_id,
                                            e.reason()
                                        );
                                        false
                                    }
                                }
                            }
                        };
                        if remove {
                            walk.remove(&delivery).await?;
                        } else {
                            walk.keep(&delivery);
                        }
                        count(&d, outcome.metric());
                        results.push(outcome.result(&d));
                    }
                    Ok::<_, String>(())
                }
                .await;
                walk.close().await;
                read?;
            }
        }
        Ok(results)
    }
}

impl Replayed {
    fn metric(&self) -> &'static str {
        match self {
            Replayed::Delivered => "replayed",
            Replayed::Failed(..) => "replay_failed",
        }
    }

    fn result(&self, d: &DeadLetter) -> ReplayResult {
        let (result, code, reason) = match self {
            Replayed::Delivered => ("delivered", Code::Ok, String::new()),
            Replayed::Failed(code, reason, _) => ("failed", *code, reason.clone()),
        };
        ReplayResult {
            id: d.id,
            message_id: d.message_id.clone(),
            trace_id: d.trace_id.clone(),
            rule: d.rule.clone(),
            destination: d.destination.clone(),
            result,
            code,
            reason,
        }
    }
}

/// Declares the durable fanout exchange and the durable queue `name`, bound to it.
async fn declare(broker: &Broker, name: &str) -> Result<(), Failure> {
    let conn = broker.connection()?;
    let channel = conn.create_channel().await.map_err(|e| classify(&e))?;
    let context = |e: lapin::Error| {
        classify(&e).map_reason(|r| {
            format!("cannot declare the dead-letter exchange and queue {name:?} (broker.dead_letter_exchange): {r}")
        })
    };
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(context)?;
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(context)?;
    channel
        .queue_bind(
            name.into(),
            name.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(context)?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Publishes one dead letter (persistent, mandatory, confirmed) to `exchange`.
async fn publish(broker: &Broker, exchange: &str, d: &DeadLetter) -> Result<(), Failure> {
    let properties = BasicProperties::default()
        .with_message_id(d.message_id.as_str().into())
        .with_timestamp((d.message_time_ms.max(0) / 1000) as u64)
        .with_delivery_mode(2)
        .with_headers(to_headers(d));
    broker
        .publish(exchange, &d.rule, &d.payload, properties)
        .await
}

/// The headers of a dead letter on the broker: the envelope (`topic`, `productKey`,
/// `deviceName`, `messageId`, `traceId`, `rule`, `tenantId`, `instanceId`, `messageTime`), the
/// failure (`failedAction`, `failedCode`, `failedReason`, `failedAttempts`) and the queue's own
/// (`deadLetterTime`, `deadLetterOrigin`, `replays`). Times are ms since the epoch.
pub fn to_headers(d: &DeadLetter) -> FieldTable {
    let mut h = identity_headers(
        FieldTable::default(),
        identity_properties(
            &d.topic,
            &d.product_key,
            &d.device_name,
            &d.message_id,
            &d.trace_id,
            &d.rule,
        ),
    );
    h = failure_headers(h, &d.destination, d.code, &d.reason, Some(d.attempts));
    h.insert("tenantId".into(), header(&d.tenant_id));
    h.insert("instanceId".into(), header(&d.instance_id));
    h.insert(
        "messageTime".into(),
        AMQPValue::LongLongInt(d.message_time_ms),
    );
    h.insert("deadLetterTime".into(), AMQPValue::LongLongInt(d.time_ms));
    h.insert("deadLetterOrigin".into(), header(d.origin.as_str()));
    h.insert(
        "replays".into(),
        AMQPValue::LongLongInt(i64::from(d.replays)),
    );
    h
}

/// The dead letter a broker message holds ([`to_headers`]); `id` is its place in the queue.
/// An error names what is missing or wrong.
pub fn from_message(
    id: i64,
    body: &[u8],
    headers: Option<&FieldTable>,
) -> Result<DeadLetter, String> {
    let text = |name: &str| {
        headers
            .and_then(|h| h.inner().get(name))
            .and_then(header_text)
            .unwrap_or_default()
    };
    let number = |name: &str| text(name).parse::<i64>().unwrap_or(0);
    let code = text("failedCode");
    let code = code
        .parse::<u16>()
        .ok()
        .and_then(Code::from_u16)
        .ok_or_else(|| {
            format!("message {id} of the dead-letter queue has failedCode {code:?}, not a code")
        })?;
    // A group's own dead_letter_exchange may be this queue too; its rejects carry no
    // deadLetterOrigin, and their failedAction names the group.
    let origin = Origin::parse(&text("deadLetterOrigin")).unwrap_or_else(|| {
        if text("failedAction").starts_with("group:") {
            Origin::Group
        } else {
            Origin::Rule
        }
    });
    Ok(DeadLetter {
        id,
        time_ms: number("deadLetterTime"),
        origin,
        rule: text("rule"),
        destination: text("failedAction"),
        code,
        reason: text("failedReason"),
        attempts: number("failedAttempts").clamp(0, u32::MAX as i64) as u32,
        replays: number("replays").clamp(0, u32::MAX as i64) as u32,
        topic: text("topic"),
        product_key: text("productKey"),
        device_name: text("deviceName"),
        message_id: text("messageId"),
        trace_id: text("traceId"),
        tenant_id: text("tenantId"),
        instance_id: text("instanceId"),
        message_time_ms: number("messageTime"),
        payload: Bytes::copy_from_slice(body),
    })
}

/// A pass over the broker queue: each message (up to the depth the queue had when the pass
/// began) taken off with `basic.get`, without acking, on a channel of the pass's own. Those
/// kept go back in their places (requeued) when the pass closes, and so does every unsettled
/// one if iotfwd stops in between (the channel closes).
struct Walk {
    channel: lapin::Channel,
    queue: String,
    left: u32,
    place: i64,
    last_kept: Option<u64>,
}

impl Walk {
    /// `None` when the queue does not exist yet (nothing was dead-lettered through it).
    async fn open(broker: &Broker, queue: &str) -> Result<Option<Walk>, String> {
        let conn = broker.connection().map_err(|e| e.reason().to_owned())?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| classify(&e).reason().to_owned())?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => Ok(Some(Walk {
                channel,
                queue: queue.to_owned(),
                left: q.message_count(),
                place: 0,
                last_kept: None,
            })),
            Err(_) => Ok(None),
        }
    }

    /// The next dead letter and its delivery; a message that is not a dead letter iotfwd
    /// wrote is kept and skipped.
    async fn next(&mut self) -> Result<Option<(DeadLetter, lapin::message::Delivery)>, String> {
        while self.left > 0 {
            self.left -= 1;
            let got = self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(|e| {
                    format!(
                        "reading the dead-letter queue {:?}: {}",
                        self.queue,
                        classify(&e).reason()
                    )
                })?;
            let Some(got) = got else { return Ok(None) };
            self.place += 1;
            let delivery = got.delivery;
            match from_message(
                self.place,
                &delivery.data,
                delivery.properties.headers().as_ref(),
            ) {
                Ok(d) => return Ok(Some((d, delivery))),
                Err(e) => {
                    tracing::warn!("{e}; left in the queue");
                    self.keep(&delivery);
                }
            }
        }
        Ok(None)
    }

    fn keep(&mut self, delivery: &lapin::message::Delivery) {
        self.last_kept = Some(delivery.delivery_tag);
    }

    async fn remove(&mut self, delivery: &lapin::message::Delivery) -> Result<(), String> {
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| format!("acking a dead letter of {:?}: {e}", self.queue))
    }

    /// Hands back every message kept, in place, and closes the channel.
    async fn close(self) {
        if let Some(tag) = self.last_kept {
            let _ = self
                .channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await;
        }
        let _ = self
            .channel
            .close(200, "dead-letter queue read".into())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Identity, Message};

    #[test]
    fn a_dead_letter_round_trips_through_broker_headers() {
        let message = Message::new(
            "/pk/dev/post".into(),
            Bytes::from_static(b"\xff\x00 binary"),
            Identity {
                message_id: Some("m1".into()),
                trace_id: Some("t1".into()),
                tenant_id: Some("acme".into()),
                ..Identity::default()
            },
        )
        .unwrap();
        let mut d = DeadLetter::of_message(
            &message,
            Origin::Rule,
            "fwd",
            "amqp:out",
            Code::DestinationMisconfigured,
            "no queue is bound",
            1,
        );
        d.replays = 2;
        let back = from_message(7, &d.payload, Some(&to_headers(&d))).unwrap();
        assert_eq!(back, DeadLetter { id: 7, ..d });
        let full = to_headers(&DeadLetter {
            destination: "group:billing".into(),
            ..back.clone()
        });
        let mut group_dlx = FieldTable::default();
        for (k, v) in full.inner() {
            if k.as_str() != "deadLetterOrigin" {
                group_dlx.insert(k.clone(), v.clone());
            }
        }
        let rejected = from_message(1, b"{}", Some(&group_dlx)).unwrap();
        assert_eq!(
            rejected.origin,
            Origin::Group,
            "a group's own dead-letter exchange"
        );
        let missing = from_message(1, b"x", None).unwrap_err();
        assert!(missing.contains("failedCode"), "{missing}");
    }

    #[test]
    fn only_failures_of_the_destination_or_consumer_are_dead_lettered() {
        for code in [9321, 9325, 9331, 9332, 9333, 9650, 9651, 9652] {
            assert!(is_dead_lettered(Code::from_u16(code).unwrap()), "{code}");
        }
        for code in [200, 9324, 9326, 9399, 9203] {
            assert!(!is_dead_lettered(Code::from_u16(code).unwrap()), "{code}");
        }
    }
}
