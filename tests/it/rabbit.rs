//! RabbitMQ helpers the tests share: a channel to the machine's real broker (127.0.0.1:5672),
//! uniquely named exchanges and queues, draining, queue depths and headers.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

// Tests that use the broker take these from here or from harness.rs.
pub use super::harness::{BROKER, Daemon, metric, unique};

pub async fn channel(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("test broker connection");
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Declares a fanout-free topic exchange bound to a fresh queue with routing key `#`.
/// Declares the durable queue `name` with no arguments, as the daemon's `[source.amqp]`
/// declares it, so a test can publish before the daemon is up.
pub async fn durable_queue(ch: &Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
}

pub async fn exchange_with_queue(ch: &Channel, name: &str) -> String {
    declare_topic_exchange(ch, name).await;
    let queue = format!("{name}.q");
    declare_bound_queue(ch, &queue, name, "#").await;
    queue
}

/// A (non-durable) topic exchange `name`.
pub async fn declare_topic_exchange(ch: &Channel, name: &str) {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// A new uniquely named queue bound to `exchange` with `key`; its name.
pub async fn bind_new_queue(ch: &Channel, exchange: &str, key: &str) -> String {
    let queue = super::harness::unique("q");
    declare_bound_queue(ch, &queue, exchange, key).await;
    queue
}

async fn declare_bound_queue(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

pub async fn cleanup(ch: &Channel, exchanges: &[&str], queues: &[&str]) {
    for q in queues {
        let _ = ch
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await;
    }
    for e in exchanges {
        let _ = ch
            .exchange_delete((*e).into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// Takes every message of `queue` until it has been quiet for `quiet`.
pub async fn drain(
    ch: &Channel,
    queue: &str,
    expect: usize,
    quiet: Duration,
) -> Vec<lapin::message::Delivery> {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(
        if out.len() >= expect {
            quiet
        } else {
            Duration::from_secs(30)
        },
        consumer.next(),
    )
    .await
    {
        out.push(d);
    }
    out
}

/// Messages ready in `queue`, or None if it does not exist. Uses its own channel: a passive
/// declare of a missing queue closes the channel it runs on.
pub async fn queue_depth(conn: &Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.ok()?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = ch.close(200, "".into()).await;
    Some(q.message_count())
}

pub fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    d.properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)
        .and_then(iotfwd::broker::header_text)
}
