//! Delivery guarantees against the machine's real RabbitMQ: nothing the broker does not take
//! is recorded as delivered.

use iotfwd::config::subscription::GroupConfig;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

use super::harness::{BROKER, Daemon, metric, unique};
use super::rabbit::{channel, cleanup, queue_depth};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_publish_is_9332_never_200() {
    let (_conn, ch) = channel(BROKER).await;
    let exchange = unique("unbound");
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
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
