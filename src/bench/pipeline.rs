//! `iotfwd bench pipeline`: RabbitMQ -> iotfwd (10 rules) -> RabbitMQ, against a bare relay
//! (lapin consume -> publish with the same prefetch and confirm window, no rules) measured in
//! the same run on the same broker, and iotfwd again with `engine.ordering` "device" and
//! "none" (1000 devices, then one) for the cost of per-device order.
//!
//! Each run pre-loads the source queue, then times until the destination queue has received
//! every message. The latency runs publish at half the relay's measured rate, through the
//! relay and through each iotfwd, with the send time in the payload, and read it back at the
//! destination, so iotfwd's added p50 and p99 are differences within one run.
//!
//! iotfwd runs three times: with `store.durability = "acked"`, `"async"`, and with the record
//! store off (`store.enabled = false`) for what the store costs; and the HTTP ingest
//! path ([`super::ingest`]) is measured the same way, so the cost of acknowledging only after
//! the records' commit is a ratio from one run.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::broker::{AmqpSourceConfig, BrokerConfig, TopicFrom};
use crate::config::store::Durability;
use crate::config::{Config, Ordering};

/// Settings of one benchmark run.
pub struct PipelineBench {
    /// The RabbitMQ broker (`--url`).
    pub url: String,
    /// Where the messages come from: RabbitMQ (false) or an MQTT broker (`--source mqtt`).
    pub mqtt_source: bool,
    /// The MQTT broker of `--source mqtt` (`--mqtt-url`).
    pub mqtt_url: String,
    pub messages: usize,
    pub prefetch: u16,
    pub confirm_window: usize,
    pub rules: usize,
    /// The daemon's config before the benchmark sets its broker, source and directories.
    pub base: Config,
}

/// Devices the messages come from, unless a run says otherwise.
const DEVICES: usize = 1000;

pub(super) fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

pub(super) struct Names {
    pub(super) source: String,
    pub(super) exchange: String,
    pub(super) dest: String,
}

impl Names {
    pub(super) fn new(tag: &str) -> Names {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Names {
            source: format!("iotfwd-bench-{tag}-src-{id}"),
            exchange: format!("iotfwd-bench-{tag}-x-{id}"),
            dest: format!("iotfwd-bench-{tag}-dst-{id}"),
        }
    }
}

pub(super) async fn setup(ch: &Channel, n: &Names) -> anyhow::Result<()> {
    for q in [&n.source, &n.dest] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    }
    ch.exchange_declare(
        n.exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        n.dest.as_str().into(),
        n.exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

pub(super) async fn teardown(ch: &Channel, n: &Names) {
    for q in [&n.source, &n.dest] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(n.exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
}

pub(super) fn payload(i: usize, sent_ns: u128) -> Vec<u8> {
    format!(
        r#"{{"id":"{i}","version":"1.0","sent_ns":{sent_ns},"items":{{"temperature":{{"value":{}.5,"time":1764201600000}},"humidity":{{"value":{},"time":1764201600000}}}},"method":"thing.event.property.post"}}"#,
        20 + i % 20,
        40 + i % 30
    )
    .into_bytes()
}

/// Message `i` comes from device `i % devices` (of product `pk0<device % 10>`).
fn properties(i: usize, devices: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    let device = i % devices.max(1);
    let topic = format!(
        "/pk{:02}/dev{:04}/thing/event/property/post",
        device % 10,
        device
    );
    headers.insert("topic".into(), crate::broker::header(&topic));
    BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2)
}

/// Publishes `count` messages to `queue`, pipelined with confirms; `pace` spaces them.
async fn load(
    ch: &Channel,
    queue: &str,
    count: usize,
    pace: Option<Duration>,
    devices: usize,
) -> anyhow::Result<()> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    for i in 0..count {
        if let Some(p) = pace {
            let due = started + p * i as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &payload(i, now_ns()),
            properties(i, devices),
        )
        .await?;
        if i % 1000 == 999 {
            ch.wait_for_confirms().await?;
        }
    }
    ch.wait_for_confirms().await?;
    Ok(())
}

/// Counts `count` messages arriving at `queue`; returns when all arrived, with each one's
/// latency from its `sent_ns`.
async fn collect(ch: &Channel, queue: &str, count: usize) -> anyhow::Result<Vec<Duration>> {
    collect_counting(ch, queue, count, &std::sync::atomic::AtomicUsize::new(0)).await
}

/// [`collect`], counting arrivals in `arrived` as they come; the consumer is cancelled when
/// all arrived, so the next collection on the queue gets every message.
pub(super) async fn collect_counting(
    ch: &Channel,
    queue: &str,
    count: usize,
    arrived: &std::sync::atomic::AtomicUsize,
) -> anyhow::Result<Vec<Duration>> {
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench-collector".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut latencies = Vec::with_capacity(count);
    while latencies.len() < count {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("no message at the destination for 60 s")?
            .context("consumer ended")??;
        let sent = serde_json::from_slice::<serde_json::Value>(&d.data)
            .ok()
            .and_then(|v| v["sent_ns"].as_u64())
            .unwrap_or(0) as u128;
        latencies.push(Duration::from_nanos(now_ns().saturating_sub(sent) as u64));
        arrived.fetch_add(1, Relaxed);
    }
    let _ = ch
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    Ok(latencies)
}

/// The baseline: consume -> publish with confirm -> ack, nothing else.
async fn relay(
    conn: &Connection,
    n: &Names,
    prefetch: u16,
    window: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let window = Arc::new(tokio::sync::Semaphore::new(window));
    let mut consumer = consume
        .basic_consume(
            n.source.as_str().into(),
            "bench-relay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while !stop.load(Relaxed) {
        let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        else {
            continue;
        };
        let permit = Arc::clone(&window).acquire_owned().await?;
        let confirm = publish
            .basic_publish(
                n.exchange.as_str().into(),
                "relay".into(),
                BasicPublishOptions::default(),
                &d.data,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        tokio::spawn(async move {
            if confirm.await.is_ok() {
                let _ = d.ack(BasicAckOptions::default()).await;
            }
            drop(permit);
        });
    }
    Ok(())
}

/// Rule `i` forwards product `pk0<i><tag>`'s property posts to `exchange`.
pub(super) fn rule_files(
    dir: &std::path::Path,
    exchange: &str,
    rules: usize,
    tag: &str,
) -> anyhow::Result<()> {
    for i in 0..rules {
        let text = format!(
            "sql = '''SELECT *, deviceName() AS device FROM \"/pk{i:02}{tag}/+/thing/event/property/post\" WHERE items.temperature.value > 0'''\n\
             [[action]]\nto = \"amqp\"\nexchange = \"{exchange}\"\nrouting_key = \"t.${{device}}\"\n"
        );
        std::fs::write(dir.join(format!("bench{i:02}.toml")), text)?;
    }
    Ok(())
}

async fn start_daemon(
    b: &PipelineBench,
    n: &Names,
    dir: &std::path::Path,
    durability: Durability,
    ordering: Option<Ordering>,
    store: bool,
) -> anyhow::Result<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let mut config = b.base.clone();
    config.rules.dir = dir.to_owned();
    config.data.dir = dir.join("data");
    config.store.durability = durability;
    config.store.enabled = config.store.enabled && store;
    if let Some(ordering) = ordering {
        config.engine.ordering = ordering;
    }
    config.broker = Some(BrokerConfig {
        confirm_window: b.confirm_window,
        ..BrokerConfig::new(b.url.clone())
    });
    config.source.amqp = Some(AmqpSourceConfig {
        queue: n.source.clone(),
        prefetch: b.prefetch,
        declare: false,
        topic_from: TopicFrom::Header,
        trust_identity_headers: false,
        queue_type: Default::default(),
    });
    let listeners = crate::daemon::Listeners::loopback(&config).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(crate::daemon::run(config, listeners, async move {
        let _ = stopped.await;
    }));
    Ok((stop, task))
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark and prints its figures.
pub async fn run(b: PipelineBench) -> anyhow::Result<()> {
    if b.mqtt_source {
        return super::pipeline_mqtt::run(b).await;
    }
    let conn = Connection::connect(&b.url, ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "cannot connect to {}",
                crate::config::broker::redact(&b.url)
            )
        })?;
    let ch = conn.create_channel().await?;
    println!(
        "bench pipeline: {} messages, prefetch {}, confirm window {}, {} rules, broker {}",
        b.messages,
        b.prefetch,
        b.confirm_window,
        b.rules,
        crate::config::broker::redact(&b.url)
    );

    // Baseline relay.
    let n = Names::new("relay");
    setup(&ch, &n).await?;
    load(
        &conn.create_channel().await?,
        &n.source,
        b.messages,
        None,
        DEVICES,
    )
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let relay_task = tokio::spawn(relay_owned(
        b.url.clone(),
        n.source.clone(),
        n.exchange.clone(),
        b.prefetch,
        b.confirm_window,
        Arc::clone(&stop),
    ));
    collect(&conn.create_channel().await?, &n.dest, b.messages).await?;
    let relay_rate = b.messages as f64 / started.elapsed().as_secs_f64();
    println!("relay baseline:   {relay_rate:>10.0} msg/s");
    // Every latency is measured at half the relay's rate, so iotfwd's are comparable with it.
    let half = relay_rate / 2.0;
    let relay_latency = latency(&conn, &n, "relay", half, b.messages).await?;
    stop.store(true, Relaxed);
    let _ = relay_task.await;
    teardown(&ch, &n).await;

    // iotfwd, acknowledging after the records' commit and without waiting for it, then with
    // the record store off.
    let acked = iotfwd(&b, &conn, &ch, Durability::Acked, true, half).await?;
    let asynchronous = iotfwd(&b, &conn, &ch, Durability::Async, true, half).await?;
    let no_store = iotfwd(&b, &conn, &ch, Durability::Async, false, half).await?;
    println!(
        "ratio iotfwd (acked) / relay: {:.3}; iotfwd (async) / relay: {:.3}; iotfwd (store off) / relay: {:.3}",
        acked.rate / relay_rate,
        asynchronous.rate / relay_rate,
        no_store.rate / relay_rate
    );
    println!(
        "ratio acked / async: throughput {:.3}, p99 {:+.2} ms",
        acked.rate / asynchronous.rate,
        ms(acked.p99) - ms(asynchronous.p99)
    );
    println!(
        "ratio store on (acked) / off: throughput {:.3}; store on (async) / off: {:.3}",
        acked.rate / no_store.rate,
        asynchronous.rate / no_store.rate
    );
    for (mode, f) in [
        ("acked", &acked),
        ("async", &asynchronous),
        ("store off", &no_store),
    ] {
        println!(
            "added latency ({mode}) over the relay at {half:.0} msg/s: p50 {:+.2} ms, p99 {:+.2} ms",
            ms(f.p50) - ms(relay_latency.p50),
            ms(f.p99) - ms(relay_latency.p99)
        );
    }

    // Per-device order on and off (acked), with many devices and with one.
    for devices in [DEVICES, 1] {
        let on = ordered_rate(&b, &conn, &ch, Ordering::Device, devices).await?;
        let off = ordered_rate(&b, &conn, &ch, Ordering::None, devices).await?;
        println!(
            "ordering with {devices} device(s): device {on:>10.0} msg/s, none {off:>10.0} msg/s, ratio device / none {:.3}",
            on / off
        );
    }

    // The HTTP ingest path, both modes.
    super::ingest::run(&super::ingest::IngestBench {
        messages: b.messages,
        per_request: 1000,
        concurrency: 4,
        rules: b.rules,
        base: b.base.clone(),
    })
    .await
}

/// A rate and the end-to-end latency measured at a given pace.
struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// End-to-end latency through whatever consumes `n.source` (the relay or iotfwd, warm): a
/// paced load of `rate` msg/s for about 10 s (at least 1000 messages, at most `max`), each
/// message timed from its publish to its arrival at `n.dest`.
async fn latency(
    conn: &Connection,
    n: &Names,
    mode: &str,
    rate: f64,
    max: usize,
) -> anyhow::Result<Figures> {
    let count = (rate * 10.0).clamp(1000.0, max.max(1000) as f64) as usize;
    let pace = Duration::from_secs_f64(1.0 / rate);
    let loader = conn.create_channel().await?;
    let source = n.source.clone();
    let publisher =
        tokio::spawn(async move { load(&loader, &source, count, Some(pace), DEVICES).await });
    let mut latencies = collect(&conn.create_channel().await?, &n.dest, count).await?;
    publisher.await??;
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
    println!(
        "latency ({mode}) at {rate:.0} msg/s ({count} messages): p50 {:.2} ms, p99 {:.2} ms",
        ms(p50),
        ms(p99)
    );
    Ok(Figures { rate, p50, p99 })
}

/// iotfwd with `durability` (and the record store on or off): its rate at full speed, then
/// p50 and p99 at `latency_rate` msg/s.
async fn iotfwd(
    b: &PipelineBench,
    conn: &Connection,
    ch: &Channel,
    durability: Durability,
    store: bool,
    latency_rate: f64,
) -> anyhow::Result<Figures> {
    let mode = match (store, durability) {
        (false, _) => "store off",
        (true, Durability::Acked) => "acked",
        (true, Durability::Async) => "async",
    };
    let n = Names::new("iotfwd");
    setup(ch, &n).await?;
    let dir = tempfile_dir()?;
    rule_files(&dir, &n.exchange, b.rules, "")?;
    load(
        &conn.create_channel().await?,
        &n.source,
        b.messages,
        None,
        DEVICES,
    )
    .await?;
    let started = Instant::now();
    let (stop_daemon, daemon) = start_daemon(b, &n, &dir, durability, None, store).await?;
    collect(&conn.create_channel().await?, &n.dest, b.messages).await?;
    let iotfwd_rate = b.messages as f64 / started.elapsed().as_secs_f64();
    println!("iotfwd ({mode}):   {iotfwd_rate:>10.0} msg/s");

    // Latency at the relay's half rate, with the daemon warm.
    let paced = latency(conn, &n, mode, latency_rate, b.messages).await?;
    let _ = stop_daemon.send(());
    let _ = daemon.await;
    teardown(ch, &n).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Figures {
        rate: iotfwd_rate,
        ..paced
    })
}

/// iotfwd's rate (acked) with `engine.ordering = ordering`, its messages from `devices`
/// devices.
async fn ordered_rate(
    b: &PipelineBench,
    conn: &Connection,
    ch: &Channel,
    ordering: Ordering,
    devices: usize,
) -> anyhow::Result<f64> {
    let n = Names::new("order");
    setup(ch, &n).await?;
    let dir = tempfile_dir()?;
    rule_files(&dir, &n.exchange, b.rules, "")?;
    let loader = conn.create_channel().await?;
    load(&loader, &n.source, b.messages, None, devices).await?;
    let started = Instant::now();
    let (stop_daemon, daemon) =
        start_daemon(b, &n, &dir, Durability::Acked, Some(ordering), true).await?;
    collect(&conn.create_channel().await?, &n.dest, b.messages).await?;
    let rate = b.messages as f64 / started.elapsed().as_secs_f64();
    let _ = stop_daemon.send(());
    let _ = daemon.await;
    teardown(ch, &n).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rate)
}

async fn relay_owned(
    url: String,
    source: String,
    exchange: String,
    prefetch: u16,
    window: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let n = Names {
        source,
        exchange,
        dest: String::new(),
    };
    relay(&conn, &n, prefetch, window, stop).await
}

pub(super) fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("iotfwd-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
