//! Per-device order (`engine.ordering`, docs/ordering.md), against the machine's real
//! RabbitMQ: messages of many devices go in through a source that delivers in order, one rule
//! forwards them to an exchange bound to one queue, and the queue's content is checked for
//! per-device inversions (a message arriving after a later one of its device).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use iotfwd::config::Ordering;
use iotfwd::config::broker::{AmqpSourceConfig, TopicFrom};
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

use super::harness::eventually;
use super::rabbit::*;

/// How many deliveries came after a later message of the same device (`(device, n)` in
/// arrival order, `n` rising per device in input order). 0 when every device kept its order.
pub fn inversions(arrived: &[(String, i64)]) -> usize {
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut count = 0;
    for (device, n) in arrived {
        let seen = last.entry(device.as_str()).or_insert(i64::MIN);
        if *n < *seen {
            count += 1;
        } else {
            *seen = *n;
        }
    }
    count
}

/// The rule that forwards every message of `/p1/<device>/post` to `exchange`, with `extra`
/// lines added to its action (a retry policy).
fn forward_rule(dir: &Path, exchange: &str, extra: &str) {
    std::fs::write(
        dir.join("fwd.toml"),
        format!(
            "sql = '''SELECT deviceName() AS device, n FROM \"/p1/+/post\"'''\n\
             [[action]]\nto = \"amqp\"\nexchange = \"{exchange}\"\nrouting_key = \"o.${{device}}\"\n{extra}"
        ),
    )
    .unwrap();
}

/// `(device, n)` of each delivery, in the order the queue gave them.
fn arrivals(deliveries: &[lapin::message::Delivery]) -> Vec<(String, i64)> {
    deliveries
        .iter()
        .map(|d| {
            let v: Value = serde_json::from_slice(&d.data).expect("a JSON rule output");
            (
                v["device"].as_str().expect("device").to_owned(),
                v["n"].as_i64().expect("n"),
            )
        })
        .collect()
}

/// One NDJSON body of `count` messages `{"n": 1..=count}`, message `n` from device `n % devices`.
fn ndjson(count: usize, devices: usize) -> String {
    (1..=count)
        .map(|n| {
            json!({"topic": format!("/p1/dev{}/post", n % devices), "payload": {"n": n}})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Posts one NDJSON request through a daemon with `ordering`; returns (arrived, inversions).
async fn http_run(ordering: Ordering, count: usize, devices: usize) -> (usize, usize) {
    http_run_with(ordering, None, count, devices).await
}

/// [`http_run`] with the rule's own `ordering` when `rule` says one.
async fn http_run_with(
    ordering: Ordering,
    rule: Option<&str>,
    count: usize,
    devices: usize,
) -> (usize, usize) {
    let (_conn, ch) = channel(BROKER).await;
    let exchange = unique("order-http");
    let queue = exchange_with_queue(&ch, &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    forward_rule(dir.path(), &exchange, "");
    if let Some(rule) = rule {
        let path = dir.path().join("fwd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("ordering = \"{rule}\"\n{text}")).unwrap();
    }
    let d = Daemon::start(dir.path(), |c| c.engine.ordering = ordering).await;
    d.wait_ready().await;
    let (status, report) = d.post_to("/api/v1/messages", ndjson(count, devices)).await;
    assert_eq!(status, 200, "{report}");
    let got = drain(&ch, &queue, count, Duration::from_millis(300)).await;
    let arrived = arrivals(&got);
    d.stop().await;
    cleanup(&ch, &[&exchange], &[&queue]).await;
    (arrived.len(), inversions(&arrived))
}

#[test]
fn inversions_counts_late_messages_per_device() {
    let a = |d: &str, n| (d.to_owned(), n);
    assert_eq!(inversions(&[a("x", 1), a("y", 1), a("x", 2), a("y", 2)]), 0);
    assert_eq!(inversions(&[a("x", 2), a("x", 1), a("y", 1), a("x", 3)]), 1);
    assert_eq!(inversions(&[a("x", 3), a("x", 1), a("x", 2)]), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ndjson_of_3_devices_arrives_in_device_order() {
    let (arrived, inverted) = http_run(Ordering::Device, 5000, 3).await;
    assert_eq!(arrived, 5000, "every message arrives once");
    assert_eq!(inverted, 0, "per-device inversions with ordering = device");
    // The same run without order, for the figure (docs/ordering.md): only that all arrive.
    let (arrived, inverted) = http_run(Ordering::None, 5000, 3).await;
    assert_eq!(arrived, 5000);
    println!("ordering = none: {inverted} per-device inversions in 5000 messages of 3 devices");
}

/// A rule's own `ordering` wins over `engine.ordering`, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_own_ordering_overrides_the_engine_default() {
    let (arrived, inverted) = http_run_with(Ordering::None, Some("device"), 5000, 3).await;
    assert_eq!(arrived, 5000);
    assert_eq!(
        inverted, 0,
        "the rule keeps order though the engine default is none"
    );
    // Without order the queue sees thousands of inversions (4870 in one run); the rule that
    // opts out must not be held to order by the engine default.
    let (arrived, inverted) = http_run_with(Ordering::Device, Some("none"), 5000, 3).await;
    assert_eq!(arrived, 5000);
    assert!(
        inverted > 0,
        "a rule with ordering = none still ran in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ndjson_of_1000_devices_interleaved_arrives_in_device_order() {
    let (arrived, inverted) = http_run(Ordering::Device, 5000, 1000).await;
    assert_eq!(arrived, 5000, "every message arrives once");
    assert_eq!(inverted, 0, "per-device inversions with ordering = device");
}

/// Publishes `{"n": 1..=count}` to `queue` (device `n % devices` in the `topic` header), with
/// confirms, in order.
async fn load_source(queue: &str, count: usize, devices: usize) {
    let (_conn, ch) = channel(BROKER).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::with_capacity(count);
    for n in 1..=count {
        let mut headers = FieldTable::default();
        headers.insert(
            "topic".into(),
            AMQPValue::LongString(format!("/p1/dev{}/post", n % devices).into()),
        );
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                json!({"n": n}).to_string().as_bytes(),
                BasicProperties::default().with_headers(headers),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
}

/// Posts `body` to `d`'s ingest while the test goes on; the task ends with the answer's
/// status.
fn post_in_background(d: &Daemon, body: String) -> tokio::task::JoinHandle<u16> {
    let base = d.base.clone();
    tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(format!("{base}/api/v1/messages"))
            .body(body)
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    })
}

/// The RabbitMQ source over a pre-loaded queue (which delivers in order, `prefetch` at a
/// time): (arrived, inversions).
async fn source_run(count: usize, devices: usize, prefetch: u16) -> (usize, usize) {
    let (conn, ch) = channel(BROKER).await;
    let source = unique("order-src");
    super::rabbit::durable_queue(&ch, &source).await;
    load_source(&source, count, devices).await;
    assert_eq!(queue_depth(&conn, &source).await, Some(count as u32));
    let exchange = unique("order-dst");
    let queue = exchange_with_queue(&ch, &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    forward_rule(dir.path(), &exchange, "");
    let d = Daemon::start(dir.path(), |c| {
        c.source.amqp = Some(AmqpSourceConfig {
            queue: source.clone(),
            prefetch,
            declare: false,
            topic_from: TopicFrom::Header,
            trust_identity_headers: false,
            queue_type: Default::default(),
        });
    })
    .await;
    d.wait_ready().await;
    let got = drain(&ch, &queue, count, Duration::from_millis(300)).await;
    let arrived = arrivals(&got);
    d.stop().await;
    cleanup(&ch, &[&exchange], &[&queue, &source]).await;
    (arrived.len(), inversions(&arrived))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rabbitmq_source_of_3_devices_keeps_device_order() {
    let (arrived, inverted) = source_run(5000, 3, 500).await;
    assert_eq!(arrived, 5000, "every message arrives once");
    assert_eq!(
        inverted, 0,
        "per-device inversions through the RabbitMQ source"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rabbitmq_source_of_1000_devices_interleaved_keeps_device_order() {
    let (arrived, inverted) = source_run(10_000, 1000, 500).await;
    assert_eq!(arrived, 10_000, "every message arrives once");
    assert_eq!(
        inverted, 0,
        "per-device inversions through the RabbitMQ source"
    );
}

/// The destination queue holds at most 50 messages and refuses more (`x-overflow =
/// reject-publish`: a publisher nack, 9331, retried): while the test's consumer is away, the
/// destination fails mid-stream; it recovers as the consumer comes back and drains it. The
/// retried messages hold their device's later ones, so the queue still sees each device in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_fails_and_recovers_mid_stream_keeps_device_order() {
    const COUNT: usize = 1500;
    let (_conn, ch) = channel(BROKER).await;
    let exchange = unique("order-flaky");
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let queue = format!("{exchange}.q");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(50));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    forward_rule(
        dir.path(),
        &exchange,
        "retry = { max_retries = 1000, initial_delay_ms = 5, factor = 1.5, max_delay_ms = 50, deadline_ms = 120000 }\n",
    );
    let d = Daemon::start(dir.path(), |_| {}).await;
    d.wait_ready().await;
    let post = post_in_background(&d, ndjson(COUNT, 3));
    // Let the queue fill and the publishes be refused before the consumer comes.
    let (conn, _) = channel(BROKER).await;
    eventually("the destination queue to fill up", || async {
        (queue_depth(&conn, &queue).await == Some(50)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = drain(&ch, &queue, COUNT, Duration::from_millis(500)).await;
    assert_eq!(post.await.unwrap(), 200);
    let scrape = d.metrics().await;
    let retries = metric(
        &scrape,
        "iotfwd_action_retries_total",
        &[("rule", "fwd"), ("action", &format!("amqp:{exchange}"))],
    );
    let arrived = arrivals(&got);
    d.stop().await;
    cleanup(&ch, &[&exchange], &[&queue]).await;
    assert!(
        retries > 0.0,
        "the destination refused publishes mid-stream"
    );
    assert_eq!(arrived.len(), COUNT, "every message arrives once");
    assert_eq!(
        inversions(&arrived),
        0,
        "per-device inversions across retries"
    );
}

/// The MQTT source (a Mosquitto of the test's own, QoS 1 from one publisher, which the broker
/// delivers in order) into the shared RabbitMQ: 3000 messages of 3 devices, 0 inversions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_source_of_3_devices_keeps_device_order() {
    use super::source_mqtt::{Mosquitto, publish_all};
    use iotfwd::config::mqtt::{MqttConfig, MqttSourceConfig};
    const COUNT: usize = 3000;
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let (conn, ch) = channel(BROKER).await;
    let exchange = unique("order-mqtt");
    let queue = exchange_with_queue(&ch, &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    forward_rule(dir.path(), &exchange, "");
    let url = mosquitto.url();
    let d = Daemon::start(dir.path(), |c| {
        let mut mqtt = MqttConfig::new(url);
        mqtt.client_id = unique("src");
        c.mqtt = Some(mqtt);
        c.source.mqtt = Some(MqttSourceConfig::new(&["/p1/#"]));
    })
    .await;
    eventually("the MQTT source to subscribe", || async {
        let health = d.get_json("/api/v1/health").await;
        (health["mqtt"]["connected"] == true).then_some(())
    })
    .await;
    let messages = (1..=COUNT)
        .map(|n| {
            (
                format!("/p1/dev{}/post", n % 3),
                json!({"n": n}).to_string().into_bytes(),
            )
        })
        .collect();
    publish_all(mosquitto.port, messages).await;
    let got = drain(&ch, &queue, COUNT, Duration::from_millis(500)).await;
    let arrived = arrivals(&got);
    d.stop().await;
    cleanup(&ch, &[&exchange], &[&queue]).await;
    let _ = conn.close(200, "".into()).await;
    assert_eq!(arrived.len(), COUNT, "every message arrives once");
    assert_eq!(
        inversions(&arrived),
        0,
        "per-device inversions through the MQTT source"
    );
}

/// Random interleavings of devices, cut into requests of random sizes that one client sends
/// one after another, through small batches (so a device's messages span batches), into a
/// destination queue of random small length that refuses publishes while full (a failure
/// point that moves with the case): the queue sees 0 inversions in every case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proptest_random_interleavings_and_failure_points_keep_device_order() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as PropConfig, TestCaseError, TestRunner};

    let (_conn, ch) = channel(BROKER).await;
    let exchange = unique("order-prop");
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    forward_rule(
        dir.path(),
        &exchange,
        "retry = { max_retries = 1000, initial_delay_ms = 2, factor = 1.5, max_delay_ms = 20, deadline_ms = 120000 }\n",
    );
    let d = Daemon::start(dir.path(), |c| {
        c.engine.batch_max_messages = 16;
        c.engine.batch_max_wait_ms = 0;
    })
    .await;
    d.wait_ready().await;
    let base = d.base.clone();

    // (device of each message, sizes of the requests, the queue's max length, how long the
    // consumer stays away while the queue fills)
    let strategy = (1usize..12)
        .prop_flat_map(|devices| prop::collection::vec(0..devices, 20..300))
        .prop_flat_map(|interleaving| {
            let n = interleaving.len();
            (
                Just(interleaving),
                prop::collection::vec(1usize..=n, 1..6),
                5i32..60,
                0u64..300,
            )
        });
    let mut runner = TestRunner::new(PropConfig {
        cases: 12,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let rt = tokio::runtime::Handle::current();
    let case = std::sync::atomic::AtomicUsize::new(0);
    let result = tokio::task::block_in_place(|| {
        runner.run(&strategy, |(interleaving, cuts, max_length, away_ms)| {
            let id = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (ch, exchange, base, sent) = (&ch, &exchange, &base, &interleaving);
            let arrived = rt.block_on(async move {
                // This case's queue, the only one bound to the exchange.
                let queue = format!("{exchange}.{id}");
                let mut args = FieldTable::default();
                args.insert("x-max-length".into(), AMQPValue::LongInt(max_length));
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString("reject-publish".into()),
                );
                ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
                    .await
                    .unwrap();
                ch.queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
                // Requests cut at the sorted cut points, sent one after another.
                let mut bounds: Vec<usize> = cuts.clone();
                bounds.push(sent.len());
                bounds.sort_unstable();
                bounds.dedup();
                let lines: Vec<String> = sent
                    .iter()
                    .enumerate()
                    .map(|(n, dev)| {
                        json!({"topic": format!("/p1/c{id}d{dev}/post"), "payload": {"n": n}})
                            .to_string()
                    })
                    .collect();
                let base = base.clone();
                let sender = tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let mut from = 0;
                    for to in bounds {
                        let r = client
                            .post(format!("{base}/api/v1/messages"))
                            .body(lines[from..to].join("\n"))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status().as_u16(), 200);
                        from = to;
                    }
                });
                tokio::time::sleep(Duration::from_millis(away_ms)).await;
                let got = drain(ch, &queue, sent.len(), Duration::from_millis(300)).await;
                sender.await.unwrap();
                let _ = ch
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
                arrivals(&got)
            });
            prop_assert_eq!(
                arrived.len(),
                interleaving.len(),
                "every message arrives once"
            );
            let inverted = inversions(&arrived);
            if inverted != 0 {
                return Err(TestCaseError::fail(format!(
                    "{inverted} per-device inversions"
                )));
            }
            Ok(())
        })
    });
    d.stop().await;
    cleanup(&ch, &[&exchange], &[]).await;
    result.unwrap();
}

/// A device quota with `on_limit = "wait"` holds a device's later messages behind the one
/// waiting for a token: 600 messages of 3 devices at 200/s per device (burst 5) take about a
/// second and arrive in device order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_device_quota_keeps_device_order() {
    const QUOTAS: &str = r#"
[[tenant]]
id = "t"
[[instance]]
id = "i"
tenant = "t"
products = ["p1"]
[quota.device]
forward_tps = 200
burst = 5
on_limit = "wait"
max_wait_ms = 10000
"#;
    let quotas = iotfwd::config::Config::from_toml_str(QUOTAS, None).expect("quota config");
    let (_conn, ch) = channel(BROKER).await;
    let exchange = unique("order-quota");
    let queue = exchange_with_queue(&ch, &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    forward_rule(dir.path(), &exchange, "");
    let d = Daemon::start(dir.path(), |c| {
        c.tenant = quotas.tenant;
        c.instance = quotas.instance;
        c.quota = quotas.quota;
    })
    .await;
    d.wait_ready().await;
    let started = std::time::Instant::now();
    let (status, report) = d.post_to("/api/v1/messages", ndjson(600, 3)).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{report}");
    let got = drain(&ch, &queue, 600, Duration::from_millis(300)).await;
    let arrived = arrivals(&got);
    d.stop().await;
    cleanup(&ch, &[&exchange], &[&queue]).await;
    assert!(
        took >= Duration::from_millis(900),
        "the quota made the messages wait ({took:?})"
    );
    assert_eq!(arrived.len(), 600, "every message arrives once");
    assert_eq!(
        inversions(&arrived),
        0,
        "per-device inversions under a waiting quota"
    );
}

/// How one consumer of a group behaves in the group tests.
#[derive(Clone, Copy)]
struct Behaviour {
    /// Releases every `release_every`-th delivery it receives (0: none).
    release_every: usize,
    /// Once it has accepted this many, it closes its connection with the delivery in hand
    /// unsettled.
    leave_after: Option<usize>,
}

const ACCEPTS: Behaviour = Behaviour {
    release_every: 0,
    leave_after: None,
};

/// What one consumer did.
#[derive(Debug, Default)]
struct Tally {
    accepted: usize,
    released: usize,
    left: bool,
}

/// Every accepted delivery, in the order the consumers accepted them (each consumer logs a
/// delivery just before it sends its Accepted): `(device, n, consumer)`.
type SettleLog = std::sync::Arc<std::sync::Mutex<Vec<(String, i64, usize)>>>;

async fn consume(
    mut c: iotfwd::client::Consumer,
    me: usize,
    how: Behaviour,
    log: SettleLog,
    done: tokio::sync::watch::Receiver<bool>,
) -> Tally {
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::primitives::Value as AmqpValue;
    let mut tally = Tally::default();
    let mut received = 0;
    while !*done.borrow() {
        let next = tokio::time::timeout(
            Duration::from_millis(100),
            c.receiver.recv::<Body<AmqpValue>>(),
        )
        .await;
        let d = match next {
            Err(_) => continue,
            Ok(Ok(d)) => d,
            Ok(Err(e)) => panic!("consumer {me}: receive failed: {e}"),
        };
        received += 1;
        if how.leave_after.is_some_and(|n| tally.accepted >= n) {
            // Leaves with `d` unsettled: the group must redeliver it before the device's next.
            tally.left = true;
            break;
        }
        if how.release_every > 0 && received % how.release_every == 0 {
            c.receiver.release(&d).await.unwrap();
            tally.released += 1;
            continue;
        }
        let body = iotfwd::client::body_json(&d);
        let device = body["device"].as_str().expect("device").to_owned();
        let n = body["n"].as_i64().expect("n");
        log.lock().unwrap().push((device, n, me));
        c.receiver.accept(&d).await.unwrap();
        tally.accepted += 1;
    }
    c.close().await;
    tally
}

/// One run of a consumer group fed by one NDJSON request of `count` messages of `devices`
/// devices: the accepted order over all consumers, and what each consumer did.
struct GroupRun {
    log: Vec<(String, i64, usize)>,
    tallies: Vec<Tally>,
    count: usize,
}

impl GroupRun {
    /// Distinct messages accepted (a message whose Accepted was lost with its connection may
    /// be accepted twice).
    fn arrived(&self) -> usize {
        let distinct: std::collections::HashSet<(&str, i64)> =
            self.log.iter().map(|(d, n, _)| (d.as_str(), *n)).collect();
        distinct.len()
    }

    fn inversions(&self) -> usize {
        let order: Vec<(String, i64)> = self.log.iter().map(|(d, n, _)| (d.clone(), *n)).collect();
        inversions(&order)
    }
}

/// A daemon whose rule forwards `/p1/+/post` to a group with `ordering` (its backlog in
/// RabbitMQ with `broker`, else in the spool), one consumer per `consumers` entry connected
/// before the messages come, until every message was accepted (at most 60 s).
async fn group_run(
    ordering: iotfwd::config::subscription::GroupOrdering,
    broker: bool,
    count: usize,
    devices: usize,
    consumers: &[Behaviour],
) -> GroupRun {
    let dir = tempfile::tempdir().unwrap();
    // A group id of this run's own: with a broker, its backlog queue is on the shared RabbitMQ.
    let id = unique("ord").replace("iotfwd-test-", "");
    std::fs::write(
        dir.path().join("to_group.toml"),
        format!(
            "sql = '''SELECT deviceName() AS device, n FROM \"/p1/+/post\"'''\n\
             [[action]]\nto = \"group\"\ngroup = \"{id}\"\n"
        ),
    )
    .unwrap();
    let d = dir.path().to_owned();
    let tweak = |c: &mut iotfwd::config::Config| {
        c.subscription.listen = "127.0.0.1:0".into();
        let mut g = super::action_group::group(&d, &id);
        g.ordering = ordering;
        g.ack_timeout_ms = 5_000;
        c.group.push(g);
    };
    let daemon = if broker {
        Daemon::start(dir.path(), tweak).await
    } else {
        Daemon::start_without_broker(dir.path(), tweak).await
    };
    daemon.wait_ready().await;
    let url = format!("amqp://{}", daemon.amqp.expect("the endpoint listens"));
    let log = SettleLog::default();
    let (done_tx, done) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (me, how) in consumers.iter().enumerate() {
        let c = iotfwd::client::Consumer::connect(&super::action_group::options(&url, &id))
            .await
            .unwrap_or_else(|e| panic!("consumer {me} cannot connect: {e:#}"));
        tasks.push(tokio::spawn(consume(
            c,
            me,
            *how,
            log.clone(),
            done.clone(),
        )));
    }
    let (status, report) = daemon
        .post_to("/api/v1/messages", ndjson(count, devices))
        .await;
    assert_eq!(status, 200, "{report}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let arrived = GroupRun {
            log: log.lock().unwrap().clone(),
            tallies: Vec::new(),
            count,
        }
        .arrived();
        if arrived >= count || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done_tx.send_replace(true);
    let mut tallies = Vec::new();
    for t in tasks {
        tallies.push(t.await.unwrap());
    }
    daemon.stop().await;
    if broker {
        let (_conn, ch) = channel(BROKER).await;
        cleanup(&ch, &[], &[&format!("iotfwd.group.{id}")]).await;
    }
    let log = log.lock().unwrap().clone();
    GroupRun {
        log,
        tallies,
        count,
    }
}

/// Three consumers that release some deliveries (every 5th, 7th and 11th they receive), one
/// of which leaves mid-stream with a delivery unsettled.
const RELEASING_AND_LEAVING: [Behaviour; 3] = [
    Behaviour {
        release_every: 5,
        leave_after: None,
    },
    Behaviour {
        release_every: 7,
        leave_after: None,
    },
    Behaviour {
        release_every: 11,
        leave_after: Some(150),
    },
];

/// `[[group]] ordering = "device"`: 3 devices over 3 consumers that release and leave, with
/// the backlog in the spool; each device's messages are accepted in order (0 inversions by
/// accept order over all consumers). The same run with the default spreading prints its
/// inversions: the count is able to see reordering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_group_of_3_devices_keeps_order_over_consumers_that_release_and_leave() {
    use iotfwd::config::subscription::GroupOrdering;
    let run = group_run(
        GroupOrdering::Device,
        false,
        3000,
        3,
        &RELEASING_AND_LEAVING,
    )
    .await;
    println!("ordering = device: {:?}", run.tallies);
    assert_eq!(run.arrived(), run.count, "every message is accepted");
    assert!(
        run.tallies.iter().map(|t| t.released).sum::<usize>() > 0,
        "consumers released deliveries"
    );
    assert_eq!(run.inversions(), 0, "per-device inversions in accept order");

    let run = group_run(
        GroupOrdering::Spread,
        false,
        3000,
        3,
        &RELEASING_AND_LEAVING,
    )
    .await;
    assert_eq!(run.arrived(), run.count, "every message is accepted");
    println!(
        "ordering = spread: {} per-device inversions in 3000 messages of 3 devices over 3 consumers ({:?})",
        run.inversions(),
        run.tallies
    );
}

/// The same with 1000 devices interleaved and the backlog in a RabbitMQ queue: the leaving
/// consumer's devices move to the others and continue in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_group_of_1000_devices_keeps_order_with_a_rabbitmq_backlog() {
    use iotfwd::config::subscription::GroupOrdering;
    let run = group_run(
        GroupOrdering::Device,
        true,
        5000,
        1000,
        &RELEASING_AND_LEAVING,
    )
    .await;
    println!("ordering = device: {:?}", run.tallies);
    assert_eq!(run.arrived(), run.count, "every message is accepted");
    assert!(run.tallies[2].left, "the third consumer left mid-stream");
    assert!(
        run.tallies.iter().all(|t| t.released > 0),
        "{:?}",
        run.tallies
    );
    assert_eq!(run.inversions(), 0, "per-device inversions in accept order");
}

/// With consumers that accept everything, each device stays on one consumer connection, and
/// the devices are spread over all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_group_keeps_each_device_on_one_consumer() {
    use iotfwd::config::subscription::GroupOrdering;
    let run = group_run(GroupOrdering::Device, false, 2000, 200, &[ACCEPTS; 3]).await;
    assert_eq!(run.arrived(), run.count, "every message is accepted");
    assert_eq!(run.inversions(), 0);
    let mut consumer_of: HashMap<&str, std::collections::HashSet<usize>> = HashMap::new();
    for (device, _, consumer) in &run.log {
        consumer_of.entry(device).or_default().insert(*consumer);
    }
    let moved: Vec<_> = consumer_of.iter().filter(|(_, c)| c.len() > 1).collect();
    assert!(moved.is_empty(), "devices on several consumers: {moved:?}");
    for (me, t) in run.tallies.iter().enumerate() {
        assert!(
            t.accepted > 0,
            "consumer {me} got no device: {:?}",
            run.tallies
        );
    }
}

/// Head-of-line is per device and destination: a rule with two actions, one to an exchange
/// whose queue refuses publishes while full (its consumer away, so its messages are retried)
/// and one to a healthy exchange. The healthy destination receives every message while the
/// other one is still retrying; once its consumer comes, the full one receives them all too,
/// and both in device order. (With one lane per device, the healthy destination would stop
/// at the full queue's length.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_one_destination_does_not_hold_the_devices_messages_to_another() {
    const COUNT: usize = 600;
    let (conn, ch) = channel(BROKER).await;
    let stuck = unique("order-stuck");
    let healthy = unique("order-healthy");
    declare_topic_exchange(&ch, &stuck).await;
    let stuck_queue = format!("{stuck}.q");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(20));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        stuck_queue.as_str().into(),
        QueueDeclareOptions::default(),
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        stuck_queue.as_str().into(),
        stuck.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let healthy_queue = exchange_with_queue(&ch, &healthy).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fwd.toml"),
        format!(
            "sql = '''SELECT deviceName() AS device, n FROM \"/p1/+/post\"'''\n\
             [[action]]\nto = \"amqp\"\nexchange = \"{stuck}\"\nrouting_key = \"o\"\n\
             retry = {{ max_retries = 1000, initial_delay_ms = 5, factor = 1.5, max_delay_ms = 50, deadline_ms = 120000 }}\n\
             [[action]]\nto = \"amqp\"\nexchange = \"{healthy}\"\nrouting_key = \"o\"\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(dir.path(), |_| {}).await;
    d.wait_ready().await;
    let post = post_in_background(&d, ndjson(COUNT, 3));
    eventually("the stuck destination's queue to fill up", || async {
        (queue_depth(&conn, &stuck_queue).await == Some(20)).then_some(())
    })
    .await;
    let healthy_depth = eventually("every message at the healthy destination", || async {
        let n = queue_depth(&conn, &healthy_queue).await?;
        (n as usize == COUNT).then_some(n)
    })
    .await;
    // The other destination is still held: full, its publishes being retried.
    assert_eq!(queue_depth(&conn, &stuck_queue).await, Some(20));
    assert!(
        !post.is_finished(),
        "the request waits for the stuck destination"
    );
    let got_healthy = drain(&ch, &healthy_queue, COUNT, Duration::from_millis(300)).await;
    let got_stuck = drain(&ch, &stuck_queue, COUNT, Duration::from_millis(500)).await;
    assert_eq!(post.await.unwrap(), 200);
    d.stop().await;
    cleanup(&ch, &[&stuck, &healthy], &[&stuck_queue, &healthy_queue]).await;
    let (healthy, stuck) = (arrivals(&got_healthy), arrivals(&got_stuck));
    assert_eq!(healthy_depth as usize, COUNT);
    assert_eq!(
        (healthy.len(), stuck.len()),
        (COUNT, COUNT),
        "every message arrives once at each"
    );
    assert_eq!(
        inversions(&healthy),
        0,
        "inversions at the healthy destination"
    );
    assert_eq!(
        inversions(&stuck),
        0,
        "inversions at the retried destination"
    );
}

/// One NDJSON request of `count` messages of `devices` devices through a rule that publishes
/// each output at QoS 1 to `<prefix>/out/<device>` on `broker`, read by a real subscriber:
/// (arrived, inversions).
async fn mqtt_run(
    broker: &super::source_mqtt::Mosquitto,
    ordering: Ordering,
    count: usize,
    devices: usize,
) -> (usize, usize) {
    use iotfwd::config::mqtt::MqttConfig;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let prefix = unique("order-mqtt-out");
    let mut options = MqttOptions::new(format!("sub-{prefix}"), "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(30));
    let (subscriber, mut events) = AsyncClient::new(options, 1000);
    subscriber
        .subscribe(format!("{prefix}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match events
            .poll()
            .await
            .expect("the subscriber connects to the test's Mosquitto")
        {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    // Read while the daemon publishes: a subscriber that falls behind loses messages.
    let topics = prefix.clone();
    let reader = tokio::spawn(async move {
        let mut arrived = Vec::with_capacity(count);
        let _ = tokio::time::timeout(Duration::from_secs(60), async {
            while arrived.len() < count {
                match events.poll().await.expect("the subscriber stays connected") {
                    Event::Incoming(Packet::Publish(p)) => {
                        let v: Value = serde_json::from_slice(&p.payload).unwrap();
                        let device = v["device"].as_str().expect("device").to_owned();
                        assert_eq!(p.topic, format!("{topics}/out/{device}"));
                        arrived.push((device, v["n"].as_i64().expect("n")));
                    }
                    _ => continue,
                }
            }
        })
        .await;
        (arrived, subscriber)
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fwd.toml"),
        format!(
            "sql = '''SELECT deviceName() AS device, n FROM \"/p1/+/post\"'''\n\
             [[action]]\nto = \"mqtt\"\ntopic = \"{prefix}/out/${{device}}\"\nqos = 1\n"
        ),
    )
    .unwrap();
    let d = Daemon::start_without_broker(dir.path(), |c| {
        c.engine.ordering = ordering;
        c.subscription.enabled = false;
        let mut mqtt = MqttConfig::new(broker.url());
        mqtt.client_id = unique("out");
        c.mqtt = Some(mqtt);
    })
    .await;
    d.wait_ready().await;
    let (status, report) = d.post_to("/api/v1/messages", ndjson(count, devices)).await;
    assert_eq!(status, 200, "{report}");
    let (arrived, subscriber) = reader.await.unwrap();
    let _ = subscriber.disconnect().await;
    d.stop().await;
    (arrived.len(), inversions(&arrived))
}

/// Into an MQTT topic: 3000 messages of 3 devices reach a real subscriber on a real Mosquitto
/// in device order; without order the same run prints its inversions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn into_an_mqtt_topic_3_devices_arrive_in_device_order() {
    // A Mosquitto of the test's own, without the shared one's per-client queue bound (1000
    // messages), which drops what a subscriber on a loaded machine has not read yet.
    let Some(broker) = super::source_mqtt::Mosquitto::start() else {
        return;
    };
    let (arrived, inverted) = mqtt_run(&broker, Ordering::Device, 3000, 3).await;
    assert_eq!(arrived, 3000, "every message arrives once");
    assert_eq!(inverted, 0, "per-device inversions at the MQTT subscriber");
    let (arrived, inverted) = mqtt_run(&broker, Ordering::None, 3000, 3).await;
    assert_eq!(arrived, 3000);
    println!(
        "ordering = none: {inverted} per-device inversions in 3000 messages of 3 devices into MQTT"
    );
}
