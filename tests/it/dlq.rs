//! The dead-letter queue: a forward that fails for good, with no error action to take it, is
//! kept (on the machine's real RabbitMQ, or in the spool without a broker), listed, and
//! replayed after a fix; only when the dead-letter write itself fails is the source message
//! redelivered. Each test counts messages sent, delivered, dead-lettered and lost (0).

use std::path::Path;
use std::time::Duration;

use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value as AmqpValue;
use iotfwd::client::{Consumer, ConsumerOptions, describe};
use iotfwd::config::broker::{AmqpSourceConfig, TopicFrom};
use iotfwd::config::subscription::GroupConfig;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{Value, json};

use super::harness::{BROKER, Daemon, eventually, metric, unique};
use super::rabbit::{bind_new_queue, channel, cleanup, declare_topic_exchange, drain, queue_depth};

/// What a test saw become of its messages. `lost` is what is neither delivered nor waiting in
/// the dead-letter queue.
#[derive(Debug)]
struct Count {
    sent: usize,
    delivered: usize,
    dead_lettered: usize,
}

impl Count {
    fn lost(&self) -> usize {
        self.sent - self.delivered - self.dead_lettered
    }

    fn assert_none_lost(&self) {
        eprintln!(
            "sent {} delivered {} dead-lettered {} lost {}",
            self.sent,
            self.delivered,
            self.dead_lettered,
            self.lost()
        );
        assert_eq!(self.lost(), 0, "{self:?}");
    }
}

fn envelope(topic: &str, n: usize) -> String {
    json!({ "topic": topic, "payload": { "n": n }, "messageId": format!("m{n}-{}", uuid::Uuid::new_v4().simple()) })
        .to_string()
}

/// `GET /api/v1/dlq` with `query`: the dead letters.
async fn dlq(daemon: &Daemon, query: &str) -> Vec<Value> {
    let v = daemon.get_json(&format!("/api/v1/dlq?{query}")).await;
    v["deadLetters"].as_array().cloned().unwrap_or_default()
}

async fn replay(daemon: &Daemon, query: &str) -> Value {
    let (status, v) = daemon
        .post_to(&format!("/api/v1/dlq/replay?{query}"), "")
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

/// The records of message `id` once one of them satisfies `want` (records reach the store a
/// moment after the step).
async fn trace(daemon: &Daemon, id: &str, want: impl Fn(&Value) -> bool) -> Vec<Value> {
    eventually(
        &format!("the record wanted in the trace of {id}"),
        || async {
            let (_, body) = daemon.get(&format!("/api/v1/trace/{id}")).await;
            let v: Value = serde_json::from_str(&body).ok()?;
            let records = v["records"].as_array().cloned().unwrap_or_default();
            records.iter().any(&want).then_some(records)
        },
    )
    .await
}

fn write_rule(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_forward_is_dead_lettered_on_the_broker_and_replayed_after_the_fix() {
    let (conn, ch) = channel(BROKER).await;
    let exchange = unique("out");
    let dead = unique("dead");
    declare_topic_exchange(&ch, &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    write_rule(
        dir.path(),
        "fwd",
        &format!(
            "sql = '''SELECT n FROM \"/p/+/post\"'''\n[[action]]\nto = \"amqp\"\n\
             exchange = \"{exchange}\"\nrouting_key = \"r.k\"\n"
        ),
    );
    let dlx = dead.clone();
    let daemon = Daemon::start(dir.path(), move |c| {
        c.broker.as_mut().unwrap().dead_letter_exchange = dlx;
    })
    .await;
    daemon.wait_ready().await;

    const N: usize = 5;
    let mut ids = Vec::new();
    for n in 0..N {
        let report = daemon.post(envelope("/p/d1/post", n)).await;
        let action = &report["messages"][0]["rules"][0]["actions"][0];
        assert_eq!(action["code"], 9332, "{report}");
        assert_eq!(action["deadLettered"], format!("amqp:{dead}"), "{report}");
        ids.push(
            report["messages"][0]["messageId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let listed = dlq(&daemon, "rule=fwd").await;
    assert_eq!(listed.len(), N, "{listed:?}");
    for (d, id) in listed.iter().zip(&ids) {
        assert_eq!(d["messageId"], id.as_str());
        assert_eq!(d["code"], 9332);
        assert_eq!(d["destination"], format!("amqp:{exchange}"));
        assert_eq!(d["topic"], "/p/d1/post");
        assert!(d["payload"].as_str().unwrap().contains("\"n\""), "{d}");
        assert!(d["reason"].as_str().unwrap().contains("r.k"), "{d}");
    }
    assert_eq!(
        queue_depth(&conn, &dead).await,
        Some(N as u32),
        "a listing hands every message back"
    );
    assert!(dlq(&daemon, "code=9325").await.is_empty());
    let steps = trace(&daemon, &ids[0], |r| r["operation"] == "fwd/dead-letter").await;
    let ops: Vec<(String, i64)> = steps
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap().to_owned(),
                r["code"].as_i64().unwrap(),
            )
        })
        .collect();
    let forward = format!("fwd/amqp:{exchange}");
    assert!(ops.contains(&(forward.clone(), 9332)), "{ops:?}");
    assert!(
        ops.contains(&("fwd/dead-letter".to_owned(), 200)),
        "{ops:?}"
    );
    assert!(
        !ops.contains(&(forward, 200)),
        "no 200 for the forward before the fix: {ops:?}"
    );

    // The fix: a queue bound for the routing key. Then the replay delivers every one.
    let out = bind_new_queue(&ch, &exchange, "r.k").await;
    let replayed = replay(&daemon, "rule=fwd").await;
    assert_eq!(
        (
            replayed["replayed"].as_u64(),
            replayed["delivered"].as_u64()
        ),
        (Some(N as u64), Some(N as u64)),
        "{replayed}"
    );
    let got = drain(&ch, &out, N, Duration::from_millis(500)).await;
    let mut got_ids: Vec<String> = got
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    got_ids.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got_ids, want, "delivered under their original message ids");
    assert!(dlq(&daemon, "").await.is_empty(), "gone from the queue");
    assert_eq!(queue_depth(&conn, &dead).await, Some(0));
    let steps = trace(&daemon, &ids[0], |r| {
        r["operation"] == format!("fwd/amqp:{exchange}") && r["code"] == 200
    })
    .await;
    assert!(
        steps.iter().any(|r| r["bizCode"] == "uplink"
            && r["reason"]
                .as_str()
                .unwrap()
                .contains("replay from the dead-letter queue")),
        "the trace shows the replay: {steps:?}"
    );
    assert!(
        steps
            .iter()
            .any(|r| r["operation"] == format!("fwd/amqp:{exchange}") && r["code"] == 200),
        "{steps:?}"
    );
    let scrape = daemon.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_dead_letters_total",
            &[("result", "written")]
        ),
        N as f64
    );
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_dead_letters_total",
            &[("result", "replayed")]
        ),
        N as f64
    );
    Count {
        sent: N,
        delivered: got.len(),
        dead_lettered: dlq(&daemon, "").await.len(),
    }
    .assert_none_lost();
    daemon.stop().await;
    cleanup(&ch, &[&exchange, &dead], &[&out, &dead]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_dead_letters_wait_in_the_spool_until_a_replay_delivers_them() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("g.secret");
    std::fs::write(&secret, "spool-secret\n").unwrap();
    let rule = |group: &str| {
        format!(
            "sql = '''SELECT n FROM \"/p/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"{group}\"\n"
        )
    };
    write_rule(dir.path(), "fwd", &rule("nope"));
    let data = dir.path().to_owned();
    let daemon = Daemon::start_without_broker(dir.path(), |c| {
        c.subscription.listen = "127.0.0.1:0".into();
        let mut g = GroupConfig::demo(&data);
        g.id = "g".into();
        g.access_key_id = "ak".into();
        g.secret_file = Some(secret.clone());
        g.create_secret = false;
        c.group.push(g);
    })
    .await;
    const N: usize = 3;
    let mut ids = Vec::new();
    for n in 0..N {
        let report = daemon.post(envelope("/p/d/post", n)).await;
        let action = &report["messages"][0]["rules"][0]["actions"][0];
        assert_eq!(action["code"], 9325, "{report}");
        assert!(
            action["deadLettered"]
                .as_str()
                .unwrap()
                .starts_with("spool:"),
            "{report}"
        );
        ids.push(
            report["messages"][0]["messageId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // The CLI lists them through the API.
    let out = std::process::Command::new(super::harness::daemon_binary())
        .args([
            "dlq", "list", "--json", "--rule", "fwd", "--since", "1h", "--url",
        ])
        .arg(&daemon.base)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), N, "{lines:?}");
    assert_eq!(lines[0]["messageId"], ids[0].as_str());
    assert_eq!(lines[0]["code"], 9325);

    // A bad filter is refused with every problem named, and nothing is replayed.
    let (status, body) = daemon
        .post_to("/api/v1/dlq/replay?code=42&since=soon&limit=0", "")
        .await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    for part in ["code \"42\"", "since \"soon\"", "limit \"0\""] {
        assert!(error.contains(part), "{part}: {error}");
    }
    assert!(dlq(&daemon, "").await.iter().all(|d| d["replays"] == 0));

    // Replayed before the fix: each fails again and stays, one replay counted.
    let again = replay(&daemon, "").await;
    assert_eq!(again["failed"], N as u64, "{again}");
    let kept = dlq(&daemon, "").await;
    assert_eq!(kept.len(), N);
    assert!(kept.iter().all(|d| d["replays"] == 1), "{kept:?}");

    // The fix: the rule forwards to a group that exists; the replay (from the CLI) hands each
    // to it under its original ids.
    write_rule(dir.path(), "fwd", &rule("g"));
    let (status, reload) = daemon.post_to("/api/v1/rules/reload", "").await;
    assert_eq!(status, 200, "{reload}");
    let out = std::process::Command::new(super::harness::daemon_binary())
        .args(["dlq", "replay", "--url"])
        .arg(&daemon.base)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(dlq(&daemon, "").await.is_empty());
    let mut options = ConsumerOptions::new(
        &format!("amqp://{}", daemon.amqp.unwrap()),
        "g",
        "ak",
        "spool-secret",
    );
    options.client_id = unique("client");
    let mut consumer = Consumer::connect(&options).await.unwrap();
    let mut got = Vec::new();
    while got.len() < N {
        let d = tokio::time::timeout(
            Duration::from_secs(10),
            consumer.receiver.recv::<Body<AmqpValue>>(),
        )
        .await
        .expect("a delivery within 10 s")
        .unwrap();
        got.push(
            describe(&d)["properties"]["messageId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        consumer.receiver.accept(&d).await.unwrap();
    }
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
    // `iotfwd logs trace` tells the whole story: the failure, the dead-letter step, the
    // replays and the delivery to the group.
    trace(&daemon, &ids[0], |r| {
        r["bizCode"] == "ServerSubscribe" && r["code"] == 200
    })
    .await;
    let out = std::process::Command::new(super::harness::daemon_binary())
        .args(["logs", "trace", &ids[0], "--db"])
        .arg(dir.path().join("data").join("outcomes.db"))
        .output()
        .unwrap();
    let story = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for step in [
        "fwd/group:nope",
        "fwd/dead-letter",
        "replay from the dead-letter queue (rule fwd, group:nope failed with 9325, replay 2)",
        "fwd/group:g",
        "as of its replay 2 from the dead-letter queue",
    ] {
        assert!(story.contains(step), "{step:?} missing in\n{story}");
    }
    Count {
        sent: N,
        delivered: got.len(),
        dead_lettered: dlq(&daemon, "").await.len(),
    }
    .assert_none_lost();
    consumer.close().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_error_action_does_not_lose_the_message_it_is_dead_lettered() {
    let (_conn, ch) = channel(BROKER).await;
    let exchange = unique("out");
    let dead = unique("dead");
    declare_topic_exchange(&ch, &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = unique("missing");
    write_rule(
        dir.path(),
        "fwd",
        &format!(
            "sql = '''SELECT n FROM \"/p/+/post\"'''\n[[action]]\nto = \"amqp\"\n\
             exchange = \"{exchange}\"\nrouting_key = \"r.k\"\n\
             [error_action]\nto = \"amqp\"\nexchange = \"{missing}\"\n"
        ),
    );
    let dlx = dead.clone();
    let daemon = Daemon::start(dir.path(), move |c| {
        c.broker.as_mut().unwrap().dead_letter_exchange = dlx;
    })
    .await;
    daemon.wait_ready().await;
    let report = daemon.post(envelope("/p/d/post", 1)).await;
    let action = &report["messages"][0]["rules"][0]["actions"][0];
    assert_eq!(action["code"], 9332, "{report}");
    assert_eq!(action["error_action"]["code"], 9332, "{report}");
    assert_eq!(action["deadLettered"], format!("amqp:{dead}"), "{report}");
    let listed = dlq(&daemon, "").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let reason = listed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("the error action") && reason.contains(&missing),
        "{reason}"
    );
    Count {
        sent: 1,
        delivered: 0,
        dead_lettered: listed.len(),
    }
    .assert_none_lost();
    daemon.stop().await;
    cleanup(&ch, &[&exchange, &dead], &[&dead]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_releases_everything_gets_each_message_max_redeliveries_times() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("g.secret");
    std::fs::write(&secret, "release-secret\n").unwrap();
    write_rule(
        dir.path(),
        "fwd",
        "sql = '''SELECT n FROM \"/p/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"g\"\n",
    );
    let data = dir.path().to_owned();
    const MAX: u32 = 3;
    let daemon = Daemon::start_without_broker(dir.path(), |c| {
        c.subscription.listen = "127.0.0.1:0".into();
        let mut g = GroupConfig::demo(&data);
        g.id = "g".into();
        g.access_key_id = "ak".into();
        g.secret_file = Some(secret.clone());
        g.create_secret = false;
        g.max_redeliveries = MAX;
        c.group.push(g);
    })
    .await;
    let mut options = ConsumerOptions::new(
        &format!("amqp://{}", daemon.amqp.unwrap()),
        "g",
        "ak",
        "release-secret",
    );
    options.client_id = unique("client");
    let mut releaser = Consumer::connect(&options).await.unwrap();
    const N: usize = 2;
    let mut ids = Vec::new();
    for n in 0..N {
        let report = daemon.post(envelope("/p/d/post", n)).await;
        assert_eq!(report["messages"][0]["rules"][0]["actions"][0]["code"], 200);
        ids.push(
            report["messages"][0]["messageId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut deliveries = 0;
    while let Ok(Ok(d)) = tokio::time::timeout(
        Duration::from_secs(2),
        releaser.receiver.recv::<Body<AmqpValue>>(),
    )
    .await
    {
        deliveries += 1;
        releaser.receiver.release(&d).await.unwrap();
        assert!(
            deliveries <= N * MAX as usize,
            "redelivered past max_redeliveries"
        );
    }
    assert_eq!(
        deliveries,
        N * MAX as usize,
        "each delivered max_redeliveries times"
    );
    let listed = eventually("both dead-lettered", || async {
        let l = dlq(&daemon, "code=9651").await;
        (l.len() == N).then_some(l)
    })
    .await;
    assert!(
        listed.iter().all(|d| d["origin"] == "group"
            && d["destination"] == "group:g"
            && d["attempts"] == MAX),
        "{listed:?}"
    );
    let steps = trace(&daemon, &ids[0], |r| r["operation"] == "fwd/dead-letter").await;
    assert!(
        steps.iter().any(
            |r| r["code"] == 9651 && r["reason"].as_str().unwrap().contains("max_redeliveries")
        ),
        "{steps:?}"
    );
    assert!(
        steps.iter().any(|r| r["operation"] == "fwd/dead-letter"),
        "{steps:?}"
    );
    releaser.close().await;

    // A consumer that takes them: the replay hands each to the group again.
    options.client_id = unique("client");
    let mut taker = Consumer::connect(&options).await.unwrap();
    let replayed = replay(&daemon, "").await;
    assert_eq!(replayed["delivered"], N as u64, "{replayed}");
    let mut got = Vec::new();
    while got.len() < N {
        let d = tokio::time::timeout(
            Duration::from_secs(10),
            taker.receiver.recv::<Body<AmqpValue>>(),
        )
        .await
        .expect("a delivery within 10 s")
        .unwrap();
        got.push(
            describe(&d)["properties"]["messageId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        taker.receiver.accept(&d).await.unwrap();
    }
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
    Count {
        sent: N,
        delivered: got.len(),
        dead_lettered: dlq(&daemon, "").await.len(),
    }
    .assert_none_lost();
    taker.close().await;
    daemon.stop().await;
}

/// The dead-letter queue cannot be written (an exchange of its name exists with another
/// type): the HTTP ingest answers 503 and the RabbitMQ source nacks and requeues its message;
/// once the obstacle is gone, the redelivered message is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_write_that_fails_redelivers_the_source_message() {
    let (conn, ch) = channel(BROKER).await;
    let exchange = unique("out");
    let dead = unique("dead");
    let source = unique("src");
    declare_topic_exchange(&ch, &exchange).await;
    // In the way: iotfwd declares its dead-letter exchange as a fanout.
    ch.exchange_declare(
        dead.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_rule(
        dir.path(),
        "fwd",
        &format!(
            "sql = '''SELECT n FROM \"/p/+/post\"'''\n[[action]]\nto = \"amqp\"\n\
             exchange = \"{exchange}\"\nrouting_key = \"r.k\"\n"
        ),
    );
    let (dlx, src) = (dead.clone(), source.clone());
    let daemon = Daemon::start(dir.path(), move |c| {
        c.broker.as_mut().unwrap().dead_letter_exchange = dlx;
        c.source.amqp = Some(AmqpSourceConfig {
            queue: src,
            prefetch: 10,
            declare: true,
            topic_from: TopicFrom::Header,
            trust_identity_headers: false,
            queue_type: Default::default(),
        });
    })
    .await;
    daemon.wait_ready().await;

    let (status, report) = daemon
        .post_to("/api/v1/messages", envelope("/p/d/post", 0))
        .await;
    assert_eq!(status, 503, "{report}");
    let action = &report["messages"][0]["rules"][0]["actions"][0];
    assert_eq!(action["code"], 9332, "{report}");
    assert!(action.get("deadLettered").is_none(), "{report}");
    let http_id = report["messages"][0]["messageId"]
        .as_str()
        .unwrap()
        .to_owned();
    let steps = trace(&daemon, &http_id, |r| r["operation"] == "fwd/dead-letter").await;
    assert!(
        steps.iter().any(|r| r["operation"] == "fwd/dead-letter"
            && r["reason"]
                .as_str()
                .unwrap()
                .contains("could not dead-letter")),
        "{steps:?}"
    );

    eventually("the source queue", || async {
        queue_depth(&conn, &source).await
    })
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("topic".into(), AMQPValue::LongString("/p/d/post".into()));
    ch.basic_publish(
        "".into(),
        source.as_str().into(),
        BasicPublishOptions::default(),
        br#"{"n": 1}"#,
        BasicProperties::default()
            .with_headers(headers)
            .with_message_id("from-the-source".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Nacked and redelivered (1 s apart) while the write fails: it stays on the source.
    let failures = eventually("two failed dead-letter writes from the source", || async {
        let scrape = daemon.metrics().await;
        let n = metric(
            &scrape,
            "iotfwd_dead_letters_total",
            &[("result", "failed")],
        );
        (n >= 3.0).then_some(n)
    })
    .await;
    assert!(failures >= 3.0);
    assert!(dlq(&daemon, "").await.is_empty());

    // The obstacle goes; the next redelivery is dead-lettered and the source acked.
    ch.exchange_delete(dead.as_str().into(), Default::default())
        .await
        .unwrap();
    let listed = eventually("the source message dead-lettered", || async {
        let l = dlq(&daemon, "").await;
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["messageId"], "from-the-source");
    eventually("the source queue empty", || async {
        (queue_depth(&conn, &source).await == Some(0)).then_some(())
    })
    .await;
    // The HTTP client sends its message again, as the 503 told it to.
    let report = daemon.post(envelope("/p/d/post", 0)).await;
    assert_eq!(
        report["messages"][0]["rules"][0]["actions"][0]["deadLettered"],
        format!("amqp:{dead}")
    );
    Count {
        sent: 2,
        delivered: 0,
        dead_lettered: dlq(&daemon, "").await.len(),
    }
    .assert_none_lost();
    daemon.stop().await;
    cleanup(&ch, &[&exchange, &dead], &[&dead, &source]).await;
}
