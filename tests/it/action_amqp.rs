//! RabbitMQ in and out, against the machine's real broker (127.0.0.1:5672): the AMQP source
//! and the amqp actions, with the failure codes a destination gives (9332, 9325, 9333, 9324).
//! Each test uses its own uniquely named queues and exchanges and deletes them at the end.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use iotfwd::config::Config;
use iotfwd::config::broker::{AmqpSourceConfig, TopicFrom};
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

use super::rabbit::*;

fn write_rule(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_10000_messages_through_the_amqp_source() {
    let (_conn, ch) = channel(BROKER).await;
    let source = unique("src");
    let hot = unique("hot");
    let all = unique("all");
    let hot_q = exchange_with_queue(&ch, &hot).await;
    let all_q = exchange_with_queue(&ch, &all).await;
    let dir = tempfile::tempdir().unwrap();
    write_rule(
        dir.path(),
        "hot",
        &format!(
            "sql = '''SELECT deviceName() AS device, t FROM \"/p1/+/post\" WHERE t >= 50'''\n\
             [[action]]\nto = \"amqp\"\nexchange = \"{hot}\"\nrouting_key = \"hot.${{device}}\"\n"
        ),
    );
    write_rule(
        dir.path(),
        "all",
        &format!(
            "sql = '''SELECT * FROM \"/p1/#\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"{all}\"\n"
        ),
    );
    write_rule(
        dir.path(),
        "other",
        "sql = '''SELECT * FROM \"/p2/#\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"nowhere\"\n",
    );
    let d = Daemon::start(dir.path(), |c| {
        c.source.amqp = Some(AmqpSourceConfig {
            queue: source.clone(),
            prefetch: 500,
            declare: true,
            topic_from: TopicFrom::Header,
            trust_identity_headers: false,
            queue_type: Default::default(),
        });
    })
    .await;
    d.wait_ready().await;
    // Wait for the daemon to declare the source queue.
    for _ in 0..100 {
        if queue_depth(&_conn, &source).await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_pconn, pch) = channel(BROKER).await;
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    const N: usize = 10_000;
    for i in 0..N {
        let mut headers = FieldTable::default();
        headers.insert(
            "topic".into(),
            AMQPValue::LongString(format!("/p1/dev{}/post", i % 7).into()),
        );
        pch.basic_publish(
            "".into(),
            source.as_str().into(),
            BasicPublishOptions::default(),
            json!({"t": i % 100, "i": i}).to_string().as_bytes(),
            BasicProperties::default()
                .with_headers(headers)
                .with_message_id(format!("m{i}").into()),
        )
        .await
        .unwrap();
    }
    pch.wait_for_confirms().await.unwrap();
    let all_msgs = drain(&ch, &all_q, N, Duration::from_secs(2)).await;
    let hot_msgs = drain(&ch, &hot_q, N / 2, Duration::from_secs(2)).await;
    assert_eq!(
        all_msgs.len(),
        N,
        "every message forwarded once by the catch-all rule"
    );
    assert_eq!(hot_msgs.len(), N / 2, "t >= 50 is half of them");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &all_msgs {
        let body: Value = serde_json::from_slice(&m.data).unwrap();
        let mid = header(m, "messageId").unwrap();
        assert_eq!(
            mid,
            format!("m{}", body["i"]),
            "message id travels with the message"
        );
        assert_eq!(header(m, "rule").as_deref(), Some("all"));
        assert_eq!(header(m, "productKey").as_deref(), Some("p1"));
        assert!(header(m, "traceId").is_some_and(|t| t.len() == 32));
        *seen.entry(mid).or_default() += 1;
    }
    assert_eq!(seen.len(), N, "no duplicates in the happy path");
    for m in &hot_msgs {
        let body: Value = serde_json::from_slice(&m.data).unwrap();
        assert!(body["t"].as_i64().unwrap() >= 50);
        assert_eq!(
            m.routing_key.as_str(),
            format!("hot.{}", body["device"].as_str().unwrap())
        );
        assert_eq!(
            m.properties.delivery_mode(),
            &Some(2),
            "persistent by default"
        );
    }
    // The source queue is empty: everything was acked.
    assert_eq!(queue_depth(&_conn, &source).await, Some(0));
    let scrape = d.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_messages_received_total",
            &[("source", "amqp")]
        ),
        N as f64
    );
    assert_eq!(
        metric(&scrape, "iotfwd_action_success_total", &[("rule", "all")]),
        N as f64
    );
    d.stop().await;
    cleanup(&ch, &[&hot, &all], &[&hot_q, &all_q, &source]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_exchange_is_9332_and_the_error_action_gets_the_original() {
    let (_conn, ch) = channel(BROKER).await;
    let failed = unique("failed");
    let failed_q = exchange_with_queue(&ch, &failed).await;
    let missing = unique("missing");
    let dir = tempfile::tempdir().unwrap();
    write_rule(
        dir.path(),
        "r",
        &format!(
            "sql = '''SELECT deviceName() AS device FROM \"/p1/+/post\"'''\n\
             [[action]]\nto = \"amqp\"\nexchange = \"{missing}\"\n\
             [error_action]\nto = \"amqp\"\nexchange = \"{failed}\"\nrouting_key = \"failed.${{device}}\"\n"
        ),
    );
    let d = Daemon::start(dir.path(), |_| {}).await;
    d.wait_ready().await;
    let body = d
        .post(
            json!({"topic": "/p1/d1/post", "payload": {"x": 1}, "traceId": "trace-404"})
                .to_string(),
        )
        .await;
    let action = &body["messages"][0]["rules"][0]["actions"][0];
    assert_eq!(action["code"], 9332, "{body}");
    assert_eq!(
        action["attempts"], 1,
        "a missing exchange is not retried: {body}"
    );
    assert_eq!(action["error_action"]["code"], 200, "{body}");
    let got = drain(&ch, &failed_q, 1, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.data, br#"{"x":1}"#, "the original payload");
    assert_eq!(header(m, "failedCode").as_deref(), Some("9332"));
    assert_eq!(
        header(m, "failedAction").as_deref(),
        Some(format!("amqp:{missing}").as_str())
    );
    assert_eq!(header(m, "failedAttempts").as_deref(), Some("1"));
    assert!(
        header(m, "failedReason").unwrap().contains("NOT_FOUND"),
        "{:?}",
        header(m, "failedReason")
    );
    assert_eq!(header(m, "traceId").as_deref(), Some("trace-404"));
    assert_eq!(m.routing_key.as_str(), "failed.d1");
    // A good exchange on the same daemon keeps working after the 404 closed that channel.
    let body = d
        .post(json!({"topic": "/p1/d2/post", "payload": {}}).to_string())
        .await;
    assert_eq!(
        body["messages"][0]["rules"][0]["actions"][0]["error_action"]["code"],
        200
    );
    d.stop().await;
    cleanup(&ch, &[&failed], &[&failed_q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_9325_after_counted_retries() {
    let dir = tempfile::tempdir().unwrap();
    write_rule(
        dir.path(),
        "r",
        "sql = '''SELECT * FROM \"/p1/+/post\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"x\"\n\
         retry = { max_retries = 3, initial_delay_ms = 10, max_delay_ms = 40 }\n",
    );
    let d = Daemon::start(dir.path(), |c| {
        // Nothing listens on port 1.
        c.broker.as_mut().unwrap().url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    })
    .await;
    // The dead-letter queue is on the same unreachable broker: the message is not kept
    // anywhere, so the client is told to send it again (503).
    let (status, body) = d
        .post_to(
            "/api/v1/messages",
            json!({"topic": "/p1/d1/post", "payload": {}}).to_string(),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    let action = &body["messages"][0]["rules"][0]["actions"][0];
    assert_eq!(action["code"], 9325, "{body}");
    assert_eq!(action["attempts"], 4, "{body}");
    assert!(
        action["reason"]
            .as_str()
            .unwrap()
            .contains("after 4 attempts"),
        "{body}"
    );
    assert!(
        !action["reason"].as_str().unwrap().contains("guest:guest"),
        "no password in reasons: {body}"
    );
    let scrape = d.metrics().await;
    assert_eq!(
        metric(&scrape, "iotfwd_action_retries_total", &[("rule", "r")]),
        3.0
    );
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_action_failed_total",
            &[("rule", "r"), ("code", "9325")]
        ),
        1.0
    );
    assert_eq!(metric(&scrape, "iotfwd_broker_connected", &[]), 0.0);
    let ready = reqwest::get(format!("{}/readyz", d.base)).await.unwrap();
    assert_eq!(
        ready.status().as_u16(),
        503,
        "not ready while the broker is down"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_refused_is_9333() {
    // A user with no permissions at all, made for this test.
    let user = unique("noperm");
    let ctl = |args: &[&str]| {
        std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl")
    };
    let out = ctl(&["add_user", &user, "pw"]);
    assert!(
        out.status.success(),
        "rabbitmqctl add_user: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["set_permissions", "-p", "/", &user, "", "", ""]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    write_rule(
        dir.path(),
        "r",
        "sql = '''SELECT * FROM \"/p1/+/post\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"amq.topic\"\n",
    );
    let url = format!("amqp://{user}:pw@127.0.0.1:5672/%2f");
    let d = Daemon::start(dir.path(), |c| c.broker.as_mut().unwrap().url = url).await;
    // The dead-letter queue is on the same broker, which refuses this user there too: the
    // message is not kept anywhere, so the client is told to send it again (503).
    let (status, body) = d
        .post_to(
            "/api/v1/messages",
            json!({"topic": "/p1/d1/post", "payload": {}}).to_string(),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    let action = &body["messages"][0]["rules"][0]["actions"][0];
    assert_eq!(action["code"], 9333, "{body}");
    assert_eq!(action["attempts"], 1, "not retried: {body}");
    d.stop().await;
    let _ = ctl(&["delete_user", &user]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_forwards_go_to_the_error_action_with_9324() {
    let (_conn, ch) = channel(BROKER).await;
    let out = unique("out");
    let failed = unique("thr-failed");
    let out_q = exchange_with_queue(&ch, &out).await;
    let failed_q = exchange_with_queue(&ch, &failed).await;
    let dir = tempfile::tempdir().unwrap();
    write_rule(
        dir.path(),
        "r",
        &format!(
            "sql = '''SELECT * FROM \"/p1/+/post\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"{out}\"\n\
             [error_action]\nto = \"amqp\"\nexchange = \"{failed}\"\n"
        ),
    );
    // Tenant t1 may forward 2 at once, then 1 per second.
    let quotas = Config::from_toml_str(
        "[[tenant]]\nid = \"t1\"\nforward_tps = 1\nburst = 2\n\
         [[instance]]\nid = \"i1\"\ntenant = \"t1\"\nproducts = [\"p1\"]\nforward_tps = 1000\n",
        None,
    )
    .unwrap();
    let d = Daemon::start(dir.path(), |c| {
        c.tenant = quotas.tenant.clone();
        c.instance = quotas.instance.clone();
    })
    .await;
    d.wait_ready().await;
    let ndjson = (0..5)
        .map(|i| json!({"topic": "/p1/d1/post", "payload": {"i": i}}).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let body = d.post(ndjson).await;
    let codes: Vec<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["rules"][0]["actions"][0]["code"].as_u64().unwrap())
        .collect();
    assert_eq!(
        codes.iter().filter(|c| **c == 200).count(),
        2,
        "the burst: {body}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == 9324).count(),
        3,
        "over the tenant quota: {body}"
    );
    let throttled = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["rules"][0]["actions"][0]["code"] == 9324)
        .unwrap();
    let reason = throttled["rules"][0]["actions"][0]["reason"]
        .as_str()
        .unwrap();
    assert!(
        reason.contains("tenant") && reason.contains("t1"),
        "the reason names the quota: {reason}"
    );
    let got = drain(&ch, &failed_q, 3, Duration::from_millis(500)).await;
    assert_eq!(
        got.len(),
        3,
        "every throttled message reached the error action"
    );
    assert!(
        got.iter()
            .all(|m| header(m, "failedCode").as_deref() == Some("9324"))
    );
    assert_eq!(
        drain(&ch, &out_q, 2, Duration::from_millis(500))
            .await
            .len(),
        2
    );
    let scrape = d.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_throttled_total",
            &[("tenant", "t1"), ("scope", "tenant")]
        ),
        3.0,
        "{scrape}"
    );
    d.stop().await;
    cleanup(&ch, &[&out, &failed], &[&out_q, &failed_q]).await;
}

/// The queue types `rabbitmqctl list_queues` shows, by queue name.
fn queue_types() -> HashMap<String, String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "--quiet",
            "--no-table-headers",
            "name",
            "type",
        ])
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// `queue_type = "quorum"`: the source queue and a group's backlog queue are declared as
/// replicated quorum queues (for a RabbitMQ cluster), and messages go through both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_for_the_source_and_a_group_backlog() {
    let (_conn, ch) = channel(BROKER).await;
    let source = unique("src-quorum");
    let group = unique("grp-quorum");
    let dir = tempfile::tempdir().unwrap();
    write_rule(
        dir.path(),
        "fwd",
        &format!(
            "sql = '''SELECT * FROM \"/p1/#\"'''\n[[action]]\nto = \"group\"\ngroup = \"{group}\"\n"
        ),
    );
    let secret = dir.path().join("g.secret");
    std::fs::write(&secret, "s3cret-s3cret\n").unwrap();
    let (src, grp) = (source.clone(), group.clone());
    let d = Daemon::start(dir.path(), move |c| {
        c.source.amqp = Some(AmqpSourceConfig {
            queue: src,
            prefetch: 10,
            declare: true,
            topic_from: TopicFrom::Header,
            trust_identity_headers: false,
            queue_type: iotfwd::config::broker::QueueType::Quorum,
        });
        c.subscription.listen = "127.0.0.1:0".into();
        let mut g = iotfwd::config::subscription::GroupConfig::demo(&c.data.dir);
        g.id = grp;
        g.access_key_id = "ak-q".into();
        g.secret_file = Some(secret);
        g.create_secret = false;
        g.queue_type = iotfwd::config::broker::QueueType::Quorum;
        c.group.push(g);
    })
    .await;
    d.wait_ready().await;
    // Until the daemon has declared the source queue: a publish to a queue that does not exist
    // yet would be dropped by the default exchange.
    let conn = lapin::Connection::connect(BROKER, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    super::harness::eventually("the source queue declared", || async {
        queue_depth(&conn, &source).await.map(|_| ())
    })
    .await;
    let mut headers = FieldTable::default();
    headers.insert("topic".into(), AMQPValue::LongString("/p1/d1/post".into()));
    for n in 0..5 {
        ch.basic_publish(
            "".into(),
            source.as_str().into(),
            BasicPublishOptions::default(),
            json!({ "n": n }).to_string().as_bytes(),
            BasicProperties::default().with_headers(headers.clone()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let backlog = format!("iotfwd.group.{group}");
    super::harness::eventually("the 5 forwards in the group's backlog queue", || async {
        (queue_depth(&conn, &backlog).await == Some(5)).then_some(())
    })
    .await;
    let types = queue_types();
    assert_eq!(
        types.get(&source).map(String::as_str),
        Some("quorum"),
        "{types:?}"
    );
    assert_eq!(
        types.get(&backlog).map(String::as_str),
        Some("quorum"),
        "{types:?}"
    );
    d.stop().await;
    cleanup(&ch, &[], &[&source, &backlog]).await;
}
