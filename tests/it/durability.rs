//! Records survive a crash (`store.durability`): the real binary takes traffic, is killed with
//! SIGKILL right after it acknowledged some of it, and the store file is then read as it was
//! left. With `"acked"` (the default) every acknowledged message must have its `uplink` record
//! and its rule's record; with `"async"` the test prints what was lost without asserting it.
//!
//! Acknowledged means: answered 200 (HTTP), or taken off the source queue (RabbitMQ: after the
//! kill the broker puts every unacknowledged delivery back, so what is not in the queue was
//! acked).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use super::harness::{BROKER, ChildDaemon, unique};
use super::rabbit::channel;

/// The one rule: no WHERE, no action, so each message gets exactly one `ruleengine` record.
const RULE: &str = "sql = '''SELECT deviceName() AS device, items.temperature.value AS t \
                    FROM \"/+/+/thing/event/property/post\"'''\n";

/// The real binary as a child process in `dir` (rules and data under it) with `extra` appended
/// to a minimal config; returns once it answers `/readyz`.
async fn start(dir: &Path, extra: &str) -> ChildDaemon {
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(dir.join("rules/all.toml"), RULE).unwrap();
    let quoted = |p: PathBuf| format!("{:?}", p.display().to_string());
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[rules]\ndir = {}\n[data]\ndir = {}\n{extra}",
        quoted(dir.join("rules")),
        quoted(dir.join("data")),
    );
    ChildDaemon::start(dir, 1, &config).await
}

/// Records per message id and service type in the store file as the killed daemon left it
/// (opening it read-write replays its write-ahead log, as the next start would).
fn records_by_message(db: &Path) -> HashMap<(String, String), u64> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT message_id, biz_code, COUNT(*) FROM records GROUP BY 1, 2")
        .unwrap();
    stmt.query_map([], |row| {
        Ok(((row.get(0)?, row.get(1)?), row.get::<_, i64>(2)? as u64))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// How many of `acked` lack their `uplink` record, and how many their `ruleengine` record.
fn missing(db: &Path, acked: &[String]) -> (usize, usize, Vec<String>) {
    let records = records_by_message(db);
    let has = |id: &String, biz: &str| records.contains_key(&(id.clone(), biz.to_owned()));
    let no_uplink: Vec<&String> = acked.iter().filter(|id| !has(id, "uplink")).collect();
    let no_rule = acked.iter().filter(|id| !has(id, "ruleengine")).count();
    let examples = no_uplink.iter().take(5).map(|s| s.to_string()).collect();
    (no_uplink.len(), no_rule, examples)
}

const REQUESTS: usize = 30;
const PER_REQUEST: usize = 1000;
/// The daemon is killed as soon as this many requests were answered 200.
const KILL_AFTER: usize = 20;

fn ndjson(request: usize) -> String {
    (0..PER_REQUEST)
        .map(|i| {
            format!(
                "{{\"topic\":\"/pk{:02}/dev{:03}/thing/event/property/post\",\
                 \"messageId\":\"h{request}-{i}\",\
                 \"payload\":{{\"items\":{{\"temperature\":{{\"value\":{}}}}}}}}}\n",
                i % 10,
                i % 200,
                20 + i % 15
            )
        })
        .collect()
}

/// Sends `REQUESTS` NDJSON requests, four at a time, and SIGKILLs the daemon right after the
/// `KILL_AFTER`th 200; returns the ids of every message of every request answered 200.
async fn http_traffic_then_kill_9(d: &mut ChildDaemon) -> Vec<String> {
    let client = reqwest::Client::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    for request in 0..REQUESTS {
        let (client, tx, gate) = (client.clone(), tx.clone(), std::sync::Arc::clone(&gate));
        let url = format!("{}/api/v1/messages", d.base);
        tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let answer = client.post(url).body(ndjson(request)).send().await;
            let ok = match answer {
                Ok(r) if r.status() == 200 => {
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    body["accepted"] == PER_REQUEST
                }
                _ => false,
            };
            let _ = tx.send((request, ok));
        });
    }
    drop(tx);
    let mut acked = Vec::new();
    let mut killed = false;
    while let Some((request, ok)) = rx.recv().await {
        if ok {
            acked.push(request);
        }
        if !killed && acked.len() >= KILL_AFTER {
            d.kill_9();
            killed = true;
        }
    }
    assert!(
        killed,
        "only {} of {REQUESTS} requests were answered 200:\n{}",
        acked.len(),
        d.log_text()
    );
    acked
        .into_iter()
        .flat_map(|r| (0..PER_REQUEST).map(move |i| format!("h{r}-{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_acked_messages_keep_their_records_through_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    // No [store] section: "acked" is the default.
    let mut d = start(dir.path(), "").await;
    let acked = http_traffic_then_kill_9(&mut d).await;
    let (no_uplink, no_rule, examples) = missing(&dir.path().join("data/outcomes.db"), &acked);
    println!(
        "acked: {} messages answered 200 before kill -9; missing uplink {no_uplink}, missing \
         rule record {no_rule}",
        acked.len()
    );
    assert_eq!(
        (no_uplink, no_rule),
        (0, 0),
        "acknowledged messages without records (e.g. {examples:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_async_mode_documents_what_kill_9_loses() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path(), "[store]\ndurability = \"async\"\n").await;
    let acked = http_traffic_then_kill_9(&mut d).await;
    let (no_uplink, no_rule, _) = missing(&dir.path().join("data/outcomes.db"), &acked);
    // Not asserted: how much is lost depends on timing. This is what "async" may cost.
    println!(
        "async: {} messages answered 200 before kill -9; lost: {no_uplink} uplink records, \
         {no_rule} rule records",
        acked.len()
    );
}

/// Publishes `n` messages with ids `{prefix}{i}` to `queue`, with confirms.
async fn publish(ch: &Channel, queue: &str, prefix: &str, n: usize) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..n {
        let mut headers = FieldTable::default();
        headers.insert(
            "topic".into(),
            iotfwd::broker::header(&format!(
                "/pk{:02}/dev{:03}/thing/event/property/post",
                i % 10,
                i % 200
            )),
        );
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            format!(
                "{{\"items\":{{\"temperature\":{{\"value\":{}}}}}}}",
                20 + i % 15
            )
            .as_bytes(),
            BasicProperties::default()
                .with_headers(headers)
                .with_message_id(format!("{prefix}{i}").as_str().into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap();
        if i % 500 == 499 {
            ch.wait_for_confirms().await.unwrap();
        }
    }
    ch.wait_for_confirms().await.unwrap();
}

/// Ready messages in `queue`, and its consumers.
async fn depth(ch: &Channel, queue: &str) -> (u32, u32) {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (q.message_count(), q.consumer_count())
}

/// The ids of every message left in `queue` (taken off it).
async fn take_all(ch: &Channel, queue: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let id = m.delivery.properties.message_id().clone().unwrap();
        ids.insert(id.as_str().to_owned());
    }
    ids
}

/// Publishes `n` messages to a fresh source queue, starts the daemon on it, kills it with
/// SIGKILL once about half were taken, and returns the ids of those it acked.
async fn amqp_traffic_then_kill_9(dir: &Path, durability: &str, n: usize) -> Vec<String> {
    let queue = unique("durability-src");
    let (conn, ch) = channel(BROKER).await;
    super::rabbit::durable_queue(&ch, &queue).await;
    let prefix = format!("a{}-", &queue[queue.len() - 8..]);
    publish(&conn.create_channel().await.unwrap(), &queue, &prefix, n).await;
    let mut d = start(
        dir,
        &format!(
            "[store]\ndurability = \"{durability}\"\n[broker]\nurl = \"{BROKER}\"\n\
             [source.amqp]\nqueue = \"{queue}\"\nprefetch = 200\n"
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ready, _) = depth(&ch, &queue).await;
        if (ready as usize) < n / 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon took fewer than half of {n} messages in 60 s:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.kill_9();
    // The broker requeues the killed consumer's unacked deliveries when it sees the
    // connection close.
    let deadline = Instant::now() + Duration::from_secs(30);
    while depth(&ch, &queue).await.1 > 0 {
        assert!(
            Instant::now() < deadline,
            "the broker still lists the killed consumer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = take_all(&ch, &queue).await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let acked: Vec<String> = (0..n)
        .map(|i| format!("{prefix}{i}"))
        .filter(|id| !left.contains(id))
        .collect();
    println!(
        "{durability}: {} of {n} messages acked before kill -9, {} back in the queue",
        acked.len(),
        left.len()
    );
    assert!(!acked.is_empty(), "nothing was acked");
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqp_acked_messages_keep_their_records_through_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let acked = amqp_traffic_then_kill_9(dir.path(), "acked", 10_000).await;
    let (no_uplink, no_rule, examples) = missing(&dir.path().join("data/outcomes.db"), &acked);
    assert_eq!(
        (no_uplink, no_rule),
        (0, 0),
        "acked deliveries without records (e.g. {examples:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqp_async_mode_documents_what_kill_9_loses() {
    let dir = tempfile::tempdir().unwrap();
    let acked = amqp_traffic_then_kill_9(dir.path(), "async", 10_000).await;
    let (no_uplink, no_rule, _) = missing(&dir.path().join("data/outcomes.db"), &acked);
    println!(
        "async: of {} acked deliveries, lost: {no_uplink} uplink records, {no_rule} rule records",
        acked.len()
    );
}

/// A commit that cannot happen is an error the client sees: another process holds the store's
/// write lock, so the writer cannot commit, and the request is answered 503 (counted) instead
/// of 200 without its records. Once the lock is gone, requests are answered 200 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_503_when_the_records_cannot_be_committed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.toml"), RULE).unwrap();
    let d = super::harness::Daemon::start_without_broker(dir.path(), |_| {}).await;
    let one = |id: &str| {
        format!(
            "{{\"topic\":\"/pk01/dev001/thing/event/property/post\",\"messageId\":\"{id}\",\
             \"payload\":{{\"items\":{{\"temperature\":{{\"value\":30}}}}}}}}"
        )
    };
    let (status, _) = d.post_to("/api/v1/messages", one("before")).await;
    assert_eq!(status, 200);

    let lock = rusqlite::Connection::open(dir.path().join("data/outcomes.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let (status, body) = d.post_to("/api/v1/messages", one("locked")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("send it again"),
        "{body}"
    );
    println!("answered 503 after {:?}", started.elapsed());
    let refused =
        super::harness::metric(&d.metrics().await, "iotfwd_store_acks_refused_total", &[]);
    assert!(refused >= 1.0, "acks refused: {refused}");

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let (status, body) = d.post_to("/api/v1/messages", one("after")).await;
    assert_eq!(status, 200, "{body}");
    d.stop().await;
}

/// The same on the RabbitMQ source: while the records cannot be committed the delivery is not
/// acked but nacked back to the queue (counted); once the lock is gone it is acked, with its
/// records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_nacks_with_requeue_when_the_records_cannot_be_committed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.toml"), RULE).unwrap();
    let queue = unique("durability-nack");
    let d = super::harness::Daemon::start(dir.path(), |c| {
        c.source.amqp = Some(iotfwd::config::broker::AmqpSourceConfig {
            queue: queue.clone(),
            prefetch: 10,
            declare: true,
            topic_from: iotfwd::config::broker::TopicFrom::Header,
            trust_identity_headers: false,
            queue_type: Default::default(),
        });
    })
    .await;
    d.wait_ready().await;
    let (conn, ch) = channel(BROKER).await;
    // queue_depth asks on a channel of its own each time: a passive declare of a queue the
    // daemon has not declared yet closes the channel it runs on.
    let deadline = Instant::now() + Duration::from_secs(15);
    while super::rabbit::queue_depth(&conn, &queue).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the source queue was not declared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db = dir.path().join("data/outcomes.db");
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let prefix = format!("n{}-", &queue[queue.len() - 8..]);
    publish(&conn.create_channel().await.unwrap(), &queue, &prefix, 1).await;
    let refused = super::harness::eventually("an ack refused", || async {
        let n = super::harness::metric(&d.metrics().await, "iotfwd_store_acks_refused_total", &[]);
        (n >= 1.0).then_some(n)
    });
    // The commit wait gives up after 30 s; `eventually` polls for 15 s, so wait first.
    tokio::time::sleep(Duration::from_secs(30)).await;
    refused.await;
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    // Redelivered, processed again, committed and acked: its records are in the store and,
    // once the daemon stopped (which would requeue an unacked delivery), the queue is empty.
    let id = format!("{prefix}0");
    super::harness::eventually("the redelivered message's records", || async {
        let records = records_by_message(&db);
        (records.contains_key(&(id.clone(), "uplink".to_owned()))
            && records.contains_key(&(id.clone(), "ruleengine".to_owned())))
        .then_some(())
    })
    .await;
    // The nacked delivery came back and was taken again.
    super::harness::eventually("the redelivery", || async {
        let received = super::harness::metric(
            &d.metrics().await,
            "iotfwd_messages_received_total",
            &[("source", "amqp")],
        );
        (received >= 2.0).then_some(())
    })
    .await;
    d.stop().await;
    let (ready, _) = depth(&ch, &queue).await;
    assert_eq!(
        ready, 0,
        "the delivery was not acked after the lock was gone"
    );
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}
