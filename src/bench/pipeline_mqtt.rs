//! `iotfwd bench pipeline --source mqtt`: Mosquitto -> iotfwd (10 rules) -> RabbitMQ, against
//! a bare MQTT relay (subscribe -> publish with confirm -> PUBACK, no rules) with the same QoS
//! (1), the same window (`--prefetch` is the receive maximum of both subscribers,
//! `--confirm-window` the confirm window of both publishers) and the same MQTT 5 sessions
//! (clean start, so a run leaves no session on the broker), measured in the same run; then
//! p50 and p99 of each at half its rate.
//!
//! An MQTT broker keeps only so many messages for a subscriber (Mosquitto's
//! `max_queued_messages`, 1000 by default, on the shared broker too), so a queue cannot be
//! pre-loaded as the RabbitMQ variant does. The device publisher instead runs alongside and
//! keeps at most [`BACKLOG`] messages published but not yet at the destination: the broker never
//! holds more than that, and both sides are measured under the same bound. Topics carry a tag
//! unique to the run, so runs on one broker do not see each other's messages.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::options::*;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use super::pipeline::{
    Names, PipelineBench, collect_counting, payload, percentile, rule_files, setup, teardown,
    tempfile_dir,
};
use crate::config::broker::BrokerConfig;
use crate::config::mqtt::{MqttConfig, MqttSourceConfig};

/// Messages published and not yet at the destination, at most.
const BACKLOG: usize = 1000;

/// Devices the messages come from.
const DEVICES: usize = 1000;

/// What one run publishes to and subscribes: the broker and the run's tag.
struct Topics {
    host: String,
    port: u16,
    tag: String,
}

impl Topics {
    /// Message `i`'s topic: device `i % 1000` of product `pk0<device % 10><tag>`.
    fn topic(&self, i: usize) -> String {
        let device = i % DEVICES;
        format!(
            "/pk{:02}{}/dev{device:04}/thing/event/property/post",
            device % 10,
            self.tag
        )
    }

    /// One filter per product of the run.
    fn filters(&self) -> Vec<String> {
        (0..10)
            .map(|p| format!("/pk{p:02}{}/#", self.tag))
            .collect()
    }

    fn options(&self, name: &str) -> MqttOptions {
        let mut o = MqttOptions::new(
            format!("iotfwd-bench-{name}-{}", self.tag),
            &self.host,
            self.port,
        );
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_start(true)
            .set_max_packet_size(Some(1 << 20));
        o
    }
}

/// The devices: publishes `count` QoS 1 messages, keeping at most [`BACKLOG`] ahead of
/// `arrived`; `pace` spaces them.
async fn publish(
    topics: &Topics,
    count: usize,
    pace: Option<Duration>,
    arrived: &AtomicUsize,
) -> anyhow::Result<()> {
    let mut options = topics.options(&format!("devices-{}", uuid::Uuid::new_v4().simple()));
    options.set_outgoing_inflight_upper_limit(256);
    let (client, mut events) = AsyncClient::new(options, 512);
    let acked = Arc::new(AtomicUsize::new(0));
    let poller = tokio::spawn({
        let acked = Arc::clone(&acked);
        async move {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => return Err(anyhow::anyhow!("the bench's device publisher: {e}")),
                }
            }
        }
    });
    let started = Instant::now();
    for i in 0..count {
        if let Some(p) = pace {
            tokio::time::sleep_until((started + p * i as u32).into()).await;
        }
        while i >= arrived.load(Relaxed) + BACKLOG {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        client
            .publish(
                topics.topic(i),
                QoS::AtLeastOnce,
                false,
                payload(i, super::pipeline::now_ns()),
            )
            .await?;
    }
    // A DISCONNECT is sent at once, ahead of publishes still waiting for the broker's window:
    // wait until the broker took every one.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Relaxed) < count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the broker acknowledged {} of {count} publishes in 60 s",
            acked.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.disconnect().await?;
    poller.await??;
    Ok(())
}

/// Runs the devices and collects at `queue` at once: the rate at which `count` messages
/// arrived (from the first publish), and each one's latency.
async fn measure(
    topics: &Topics,
    ch: &Channel,
    queue: &str,
    count: usize,
    pace: Option<Duration>,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let arrived = AtomicUsize::new(0);
    let started = Instant::now();
    let collect = async {
        collect_counting(ch, queue, count, &arrived)
            .await
            .with_context(|| {
                format!(
                    "{} of {count} arrived; an MQTT broker that drops QoS 1 messages \
                     (Mosquitto's max_queued_messages) loses the rest",
                    arrived.load(Relaxed)
                )
            })
    };
    let ((), mut latencies) = tokio::try_join!(publish(topics, count, pace, &arrived), collect)?;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    Ok((rate, latencies))
}

/// The baseline: subscribe -> publish to `exchange` with confirm -> PUBACK, nothing else;
/// `ready` once subscribed.
async fn relay(
    topics: &Topics,
    amqp: &Connection,
    exchange: &str,
    window: u16,
    confirm_window: usize,
    stop: Arc<AtomicBool>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let publish = amqp.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut options = topics.options("relay");
    options
        .set_manual_acks(true)
        .set_receive_maximum(Some(window));
    let (client, mut events) = AsyncClient::new(options, usize::from(window) * 2);
    client
        .subscribe_many(
            topics
                .filters()
                .into_iter()
                .map(|f| Filter::new(f, QoS::AtLeastOnce)),
        )
        .await?;
    // The event loop is polled on its own, never cancelled mid-packet, so pings and acks
    // flow whatever the relay waits for.
    let (received, mut publishes) = tokio::sync::mpsc::unbounded_channel();
    let mut ready = Some(ready);
    let poller = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = received.send(p);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("the bench's relay lost its MQTT connection: {e}");
                    return;
                }
            }
        }
    });
    let confirms = Arc::new(tokio::sync::Semaphore::new(confirm_window));
    while !stop.load(Relaxed) {
        let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(200), publishes.recv()).await
        else {
            continue;
        };
        let permit = Arc::clone(&confirms).acquire_owned().await?;
        let confirm = publish
            .basic_publish(
                exchange.into(),
                "relay".into(),
                BasicPublishOptions::default(),
                &p.payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        let client = client.clone();
        tokio::spawn(async move {
            if confirm.await.is_ok() {
                let _ = client.ack(&p).await;
            }
            drop(permit);
        });
    }
    let _ = client.disconnect().await;
    let _ = poller.await;
    Ok(())
}

/// Runs the benchmark and prints its figures.
pub async fn run(b: PipelineBench) -> anyhow::Result<()> {
    let mqtt = MqttConfig::new(b.mqtt_url.clone());
    let (host, port) = mqtt
        .host_port()
        .map_err(|e| anyhow::anyhow!("--mqtt-url {e}"))?;
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
        "bench pipeline --source mqtt: {} messages, QoS 1, receive maximum {}, confirm window {}, \
         {} rules, at most {BACKLOG} in flight end to end; MQTT {}:{port}, RabbitMQ {}",
        b.messages,
        b.prefetch,
        b.confirm_window,
        b.rules,
        host,
        crate::config::broker::redact(&b.url)
    );
    let topics = |tag: &str| Topics {
        host: host.clone(),
        port,
        tag: tag.to_owned(),
    };

    // The bare relay: its rate, then its latency at half that rate.
    let n = Names::new("mqtt-relay");
    setup(&ch, &n).await?;
    let t = topics(&uuid::Uuid::new_v4().simple().to_string()[..8]);
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, subscribed) = tokio::sync::oneshot::channel();
    let relay_task = {
        let (amqp, exchange, stop) = (b.url.clone(), n.exchange.clone(), Arc::clone(&stop));
        let (window, confirm_window, t) = (b.prefetch, b.confirm_window, topics(&t.tag));
        tokio::spawn(async move {
            let conn = Connection::connect(&amqp, ConnectionProperties::default()).await?;
            relay(&t, &conn, &exchange, window, confirm_window, stop, ready).await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .context("the relay did not subscribe within 10 s")?
        .context("the relay stopped")?;
    let (relay_rate, _) = measure(&t, &ch, &n.dest, b.messages, None).await?;
    println!("relay baseline:   {relay_rate:>10.0} msg/s");
    let relay_latency = half_rate(&t, &ch, &n.dest, relay_rate, b.messages).await?;
    stop.store(true, Relaxed);
    relay_task.await??;
    teardown(&ch, &n).await;
    print_latency("relay", relay_rate / 2.0, &relay_latency);

    // iotfwd: its rate, then its latency at half that rate.
    let n = Names::new("mqtt-iotfwd");
    setup(&ch, &n).await?;
    let t = topics(&uuid::Uuid::new_v4().simple().to_string()[..8]);
    let dir = tempfile_dir()?;
    rule_files(&dir, &n.exchange, b.rules, &t.tag)?;
    let mut config = b.base.clone();
    config.rules.dir = dir.clone();
    config.data.dir = dir.join("data");
    config.broker = Some(BrokerConfig {
        confirm_window: b.confirm_window,
        ..BrokerConfig::new(b.url.clone())
    });
    config.mqtt = Some(MqttConfig {
        client_id: format!("iotfwd-bench-iotfwd-{}", t.tag),
        ..mqtt.clone()
    });
    config.source.amqp = None;
    config.source.mqtt = Some(MqttSourceConfig {
        clean_start: true,
        max_inflight: b.prefetch,
        ..MqttSourceConfig::new(&t.filters().iter().map(String::as_str).collect::<Vec<_>>())
    });
    let listeners = crate::daemon::Listeners::loopback(&config).await?;
    let health = format!("http://{}/api/v1/health", listeners.http.local_addr()?);
    let (stop_daemon, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(crate::daemon::run(config, listeners, async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state: serde_json::Value = match reqwest::get(&health).await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        if state["mqtt"]["connected"] == true {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "iotfwd did not subscribe within 10 s: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (iotfwd_rate, _) = measure(&t, &ch, &n.dest, b.messages, None).await?;
    println!("iotfwd (acked):   {iotfwd_rate:>10.0} msg/s");
    let iotfwd_latency = half_rate(&t, &ch, &n.dest, iotfwd_rate, b.messages).await?;
    print_latency("iotfwd", iotfwd_rate / 2.0, &iotfwd_latency);
    let _ = stop_daemon.send(());
    let _ = daemon.await;
    teardown(&ch, &n).await;
    let _ = std::fs::remove_dir_all(&dir);
    println!("ratio iotfwd / relay: {:.3}", iotfwd_rate / relay_rate);
    Ok(())
}

/// Latencies at half `rate`: 10 s of messages (1000 to `max`), sorted.
async fn half_rate(
    topics: &Topics,
    ch: &Channel,
    queue: &str,
    rate: f64,
    max: usize,
) -> anyhow::Result<Vec<Duration>> {
    let half = rate / 2.0;
    let count = (half * 10.0).clamp(1000.0, max as f64) as usize;
    let pace = Duration::from_secs_f64(1.0 / half);
    Ok(measure(topics, ch, queue, count, Some(pace)).await?.1)
}

fn print_latency(who: &str, at: f64, sorted: &[Duration]) {
    println!(
        "latency ({who}) at {at:.0} msg/s ({} messages): p50 {:.2} ms, p99 {:.2} ms",
        sorted.len(),
        percentile(sorted, 0.50).as_secs_f64() * 1e3,
        percentile(sorted, 0.99).as_secs_f64() * 1e3
    );
}
