//! `[source.amqp]`: consume device messages from a RabbitMQ queue, at least once.
//!
//! A delivery is acked only after every action of every rule it matched reached a terminal
//! outcome and, with `store.durability = "acked"`, the records of those steps are committed.
//! If an action and its error action both failed, or the records could not be committed, it
//! is nacked with requeue, so it comes back later. Prefetch bounds what is in flight. When the
//! broker goes away the source reconnects by itself and resumes; unacked deliveries are
//! redelivered by the broker.
//!
//! The envelope: the body is the device payload; the AMQP `message_id` and `timestamp`
//! properties are used when present; the headers `topic`, `messageId` and `traceId` override
//! them. The identity (`productKey`, `deviceName`) comes from the topic; the headers
//! `productKey`, `deviceName`, `tenantId` and `instanceId` override it only with
//! `source.amqp.trust_identity_headers = true`. Otherwise they are ignored and counted in
//! `iotfwd_identity_override_ignored_total{source="amqp"}`: whoever can publish to the queue
//! (RabbitMQ's MQTT plugin passes device-chosen properties on as headers) must not be able to
//! speak for another device or spend another product's quota.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::broker::{Broker, header_text};
use crate::config::broker::{AmqpSourceConfig, TopicFrom};
use crate::message::{Identity, Message, Rejection, RejectionKind};
use crate::outcome::Failure;
use crate::pipeline::{Pipeline, Turn, Turns};

/// How long a message whose error action failed waits before it is nacked back to the queue,
/// so a destination that is down for good does not become a hot redelivery loop.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// Consumes until `stop` turns true; then cancels the consumer, lets in-flight messages finish
/// within `grace`, and closes the channel (the broker requeues whatever is still unacked).
pub async fn run(
    broker: Arc<Broker>,
    config: AmqpSourceConfig,
    pipeline: Pipeline,
    stop: watch::Receiver<bool>,
    grace: Duration,
) {
    loop {
        let Some(conn) = broker.connect_with_backoff(&stop).await else {
            return;
        };
        match consume(&conn, &config, &pipeline, stop.clone(), grace).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(queue = %config.queue, "consuming stopped: {e}; reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn consume(
    conn: &lapin::Connection,
    config: &AmqpSourceConfig,
    pipeline: &Pipeline,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> Result<(), lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    if config.declare {
        channel
            .queue_declare(
                config.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                queue_arguments(config),
            )
            .await?;
    }
    let tag = format!("iotfwd-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %config.queue, prefetch = config.prefetch, "consuming");
    let mut in_flight = JoinSet::new();
    // Deliveries enter the pipeline in the order the queue delivered them (per-device order).
    let mut turns = Turns::default();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let pipeline = pipeline.clone();
                    let (topic_from, trust) = (config.topic_from, config.trust_identity_headers);
                    let turn = turns.take();
                    in_flight.spawn(async move { handle(delivery, topic_from, trust, &pipeline, turn).await });
                }
                Some(Err(e)) => return Err(e),
                None => return Err(lapin::Error::from(std::io::Error::other("the consumer was cancelled by the broker"))),
            },
        }
        while in_flight.try_join_next().is_some() {}
    }
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    let pending = in_flight.len();
    if pending > 0 {
        tracing::info!(pending, "source stopped; finishing in-flight messages");
    }
    let finished = tokio::time::timeout(grace, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            pending = in_flight.len(),
            "in-flight messages did not finish within the grace period; the broker redelivers them"
        );
        in_flight.abort_all();
    }
    let _ = channel.close(200, "iotfwd shutting down".into()).await;
    Ok(())
}

async fn handle(
    delivery: Delivery,
    topic_from: TopicFrom,
    trust: bool,
    pipeline: &Pipeline,
    turn: Turn,
) {
    let ack = match to_message(&delivery, topic_from, trust) {
        Err((topic, rejection)) => {
            // Its turn passes only once the deliveries before it entered the pipeline.
            let mut turn = turn;
            turn.wait().await;
            drop(turn);
            // Not processable, ever: record why and take it off the queue once that record is
            // committed.
            let mark = pipeline.mark();
            pipeline
                .reject(
                    &topic,
                    &delivery.data,
                    &Failure::rejected(&rejection),
                    &ids(&delivery),
                )
                .await;
            pipeline.committed(mark).await.is_ok()
        }
        Ok((message, ignored)) => {
            if ignored {
                pipeline
                    .metrics()
                    .identity_override_ignored
                    .with_label_values(&["amqp"])
                    .inc();
            }
            match pipeline.submit_in_turn(vec![message], "amqp", turn).await {
                Ok(reports) => !reports.iter().any(|r| r.requeue),
                Err(_) => false,
            }
        }
    };
    let result = if ack {
        delivery.ack(BasicAckOptions::default()).await
    } else {
        tokio::time::sleep(REQUEUE_DELAY).await;
        delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
    };
    if let Err(e) = result {
        // The channel is gone: the broker redelivers the message, so it is a duplicate, not a loss.
        tracing::warn!("could not settle a delivery ({e}); the broker will redeliver it");
    }
}

/// The topic a routing key stands for, as RabbitMQ's MQTT plugin maps them: `.` separates
/// levels and a `/` in the key was a `.` in the topic; a missing leading `/` is added, so
/// `a.b.c` and `.a.b.c` are both `/a/b/c`.
pub fn topic_from_routing_key(key: &str) -> String {
    let mapped: String = key
        .chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            c => c,
        })
        .collect();
    if mapped.starts_with('/') {
        mapped
    } else {
        format!("/{mapped}")
    }
}

/// A header's text, when it has one that is not empty.
fn header(delivery: &Delivery, name: &str) -> Option<String> {
    (delivery.properties.headers().as_ref())
        .and_then(|h| h.inner().get(name))
        .and_then(header_text)
        .filter(|s| !s.is_empty())
}

/// The ids a delivery came with: the `messageId` header (else the message id property) and
/// the `traceId` header. A message that cannot be taken is recorded under them too.
fn ids(delivery: &Delivery) -> Identity {
    Identity {
        message_id: header(delivery, "messageId").or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
        }),
        trace_id: header(delivery, "traceId"),
        ..Identity::default()
    }
}

/// The message of a delivery, and whether it carried identity headers that were ignored
/// (`trust` is `source.amqp.trust_identity_headers`).
fn to_message(
    delivery: &Delivery,
    topic_from: TopicFrom,
    trust: bool,
) -> Result<(Message, bool), (String, Rejection)> {
    let get = |name: &str| header(delivery, name);
    let topic = match (get("topic"), topic_from) {
        (Some(t), _) => t,
        (None, TopicFrom::RoutingKey) => topic_from_routing_key(delivery.routing_key.as_str()),
        (None, TopicFrom::Header) => {
            return Err((
                String::new(),
                Rejection {
                    kind: RejectionKind::Topic,
                    reason: "the message has no topic header (source.amqp.topic_from = \"header\")"
                        .into(),
                },
            ));
        }
    };
    let mut identity = Identity {
        timestamp_ms: delivery
            .properties
            .timestamp()
            .map(|s| (s as i64).saturating_mul(1000)),
        product_key: get("productKey"),
        device_name: get("deviceName"),
        tenant_id: get("tenantId"),
        instance_id: get("instanceId"),
        ..ids(delivery)
    };
    let ignored = !trust && identity.drop_overrides();
    Message::new(topic.clone(), delivery.data.clone().into(), identity)
        .map(|m| (m, ignored))
        .map_err(|r| (topic, r))
}

/// The arguments the source queue is declared with: its type, when not classic.
fn queue_arguments(config: &AmqpSourceConfig) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(kind) = config.queue_type.argument() {
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString(kind.into()),
        );
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_map_to_topics() {
        assert_eq!(topic_from_routing_key("a.b.c"), "/a/b/c");
        assert_eq!(topic_from_routing_key(".a.b.c"), "/a/b/c");
        assert_eq!(
            topic_from_routing_key("pk.dev/1.user.update"),
            "/pk/dev.1/user/update"
        );
    }
}
