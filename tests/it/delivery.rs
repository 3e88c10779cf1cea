//! Delivery guarantees against the machine's real RabbitMQ: nothing the broker does not take
//! is recorded as delivered.

use iotfwd::config::subscription::GroupConfig;
use lapin::options::QueueDeleteOptions;

use super::harness::{BROKER, Daemon, metric, unique};
use super::rabbit::{channel, cleanup, declare_topic_exchange, queue_depth};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_publish_is_9332_never_200() {
    let (_conn, ch) = channel(BROKER).await;
    let exchange = unique("unbound");
    declare_topic_exchange(&ch, &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fwd.toml"),
        format!(
            "sql = '''SELECT n FROM \"/p/+/post\"'''\n[[action]]\nto = \"amqp\"\n\
             exchange = \"{exchange}\"\nrouting_key = \"nobody.listens\"\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(dir.path(), |_| {}).await;
    daemon.wait_ready().await;
    let report = daemon
        .post(r#"{"topic":"/p/d1/post","payload":{"n":1}}"#)
        .await;
    let action = &report["messages"][0]["rules"][0]["actions"][0];
    assert_eq!(action["code"], 9332, "{report}");
    let reason = action["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("no queue is bound to exchange \"{exchange}\""))
            && reason.contains("\"nobody.listens\""),
        "{reason}"
    );
    assert_eq!(
        action["attempts"], 1,
        "a returned message is not retried: {report}"
    );
    let scrape = daemon.metrics().await;
    assert_eq!(
        metric(&scrape, "iotfwd_action_failed_total", &[("code", "9332")]),
        1.0
    );
    assert_eq!(metric(&scrape, "iotfwd_action_success_total", &[]), 0.0);
    daemon.stop().await;
    cleanup(&ch, &[&exchange], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_group_queue_is_declared_again_and_the_forward_lands_in_it() {
    let (conn, ch) = channel(BROKER).await;
    let dir = tempfile::tempdir().unwrap();
    let id = unique("gq");
    let queue = format!("iotfwd.group.{id}");
    std::fs::write(
        dir.path().join("to_group.toml"),
        format!("sql = '''SELECT n FROM \"/p/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"{id}\"\n"),
    )
    .unwrap();
    let secret = dir.path().join("g.secret");
    std::fs::write(&secret, "s\n").unwrap();
    let data = dir.path().to_owned();
    let daemon = Daemon::start(dir.path(), |c| {
        c.subscription.listen = "127.0.0.1:0".into();
        let mut g = GroupConfig::demo(&data);
        g.id = id.clone();
        g.access_key_id = id.clone();
        g.secret_file = Some(secret.clone());
        g.create_secret = false;
        c.group.push(g);
    })
    .await;
    daemon.wait_ready().await;
    let send = |n: u32| {
        let daemon = &daemon;
        async move {
            let report = daemon
                .post(format!(r#"{{"topic":"/p/d1/post","payload":{{"n":{n}}}}}"#))
                .await;
            report["messages"][0]["rules"][0]["actions"][0]["code"].clone()
        }
    };
    assert_eq!(send(1).await, 200);
    assert_eq!(queue_depth(&conn, &queue).await, Some(1));
    // An operator deletes the queue (to change its retention, say).
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(send(2).await, 200, "declared again, not lost with a 200");
    assert_eq!(queue_depth(&conn, &queue).await, Some(1));
    daemon.stop().await;
    cleanup(&ch, &[], &[&queue]).await;
}

/// A consumer that grants no credit holds nothing up: what the group handed it times out
/// (9650) within the ACK time-out and goes to the consumer that does take messages, and
/// shutdown is not held up by the stuck link either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_credit_consumer_times_out_and_its_messages_go_to_another() {
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::primitives::Value;
    use iotfwd::client::{Consumer, ConsumerOptions, describe};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("to_group.toml"),
        "sql = '''SELECT n FROM \"/p/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"g\"\n",
    )
    .unwrap();
    let secret = dir.path().join("g.secret");
    std::fs::write(&secret, "zero-credit-secret\n").unwrap();
    let data = dir.path().to_owned();
    let daemon = Daemon::start_without_broker(dir.path(), |c| {
        c.subscription.listen = "127.0.0.1:0".into();
        let mut g = GroupConfig::demo(&data);
        g.id = "g".into();
        g.access_key_id = "ak".into();
        g.secret_file = Some(secret.clone());
        g.create_secret = false;
        g.ack_timeout_ms = 1_000;
        g.window = 4;
        c.group.push(g);
    })
    .await;
    let url = format!("amqp://{}", daemon.amqp.unwrap());
    let options = |credit: u32| {
        let mut o = ConsumerOptions::new(&url, "g", "ak", "zero-credit-secret");
        o.client_id = unique("client");
        o.credit = credit;
        o
    };
    let _stuck = Consumer::connect(&options(0)).await.unwrap();
    let mut taker = Consumer::connect(&options(100)).await.unwrap();
    let n = 6;
    for i in 0..n {
        let report = daemon
            .post(format!(r#"{{"topic":"/p/d/post","payload":{{"n":{i}}}}}"#))
            .await;
        assert_eq!(report["messages"][0]["code"], 200, "{report}");
    }
    let started = Instant::now();
    let mut got = std::collections::BTreeSet::new();
    while got.len() < n && started.elapsed() < Duration::from_secs(20) {
        if let Ok(Ok(d)) =
            tokio::time::timeout(Duration::from_secs(5), taker.receiver.recv::<Body<Value>>()).await
        {
            got.insert(describe(&d)["body"]["n"].as_u64().unwrap());
            taker.receiver.accept(&d).await.unwrap();
        }
    }
    assert_eq!(
        got.len(),
        n,
        "every message reached the consumer that takes them: {got:?}"
    );
    let logs = daemon.get_json("/api/v1/logs?status=9650").await;
    assert!(
        logs["count"].as_u64().unwrap() >= 1,
        "the stuck consumer's deliveries timed out: {logs}"
    );
    let stopping = Instant::now();
    daemon.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "shutdown took {:?} with a zero-credit consumer connected",
        stopping.elapsed()
    );
}
