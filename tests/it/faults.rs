//! Fault injection: the daemon binary as a child process (its own temp data directory), a
//! stream of messages over the HTTP ingest, a fault in the middle of it, and a count at the
//! end: messages whose forward was answered 200 (sent), of those the ones delivered, copies
//! delivered more than once (duplicated), and the ones never delivered (lost, which must be 0).
//! Each case prints one line starting with `faults |`:
//! `cargo nextest run -E 'test(/faults::/)' --no-capture` (the table in docs/delivery.md).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use iotfwd::client::{Consumer, ConsumerOptions, describe};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::harness::{BROKER, ChildDaemon, metric, unique};
use super::rabbit::{channel, cleanup, drain, exchange_with_queue, header, queue_depth};

/// Messages in each stream.
const N: usize = 300;
/// HTTP senders at once, so requests are in flight when the fault strikes.
const SENDERS: usize = 4;
const SECRET: &str = "faults-group-secret";

/// What the senders were answered.
#[derive(Default)]
struct Sent {
    /// Message ids whose forward was answered 200: what iotfwd promised to deliver.
    ok: Mutex<BTreeSet<String>>,
    /// Answers whose forward was not 200 (the message was sent again).
    refused: AtomicUsize,
    /// Requests that got no answer (the daemon was gone; the message was sent again).
    unanswered: AtomicUsize,
}

impl Sent {
    fn ok(&self) -> usize {
        self.ok.lock().unwrap().len()
    }
}

/// Where the daemon of a case is now: a restarted daemon listens on another port.
type Address = Arc<std::sync::RwLock<String>>;

fn address(a: String) -> Address {
    Arc::new(std::sync::RwLock::new(a))
}

fn now_at(a: &Address) -> String {
    a.read().unwrap().clone()
}

/// Sends m0..m{N-1} to `/p1/dev/post` from `SENDERS` concurrent senders; each message is sent
/// again (same message id) until its forward is answered 200, within `limit`. `base` is read
/// for every request, so the senders follow a restarted daemon.
async fn send_all(base: Address, sent: Arc<Sent>, limit: Duration) {
    send_range(base, sent, limit, 0..N).await
}

/// [`send_all`] for the messages m{range.start}..m{range.end - 1}.
async fn send_range(
    base: Address,
    sent: Arc<Sent>,
    limit: Duration,
    range: std::ops::Range<usize>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (client, base, sent) = (client.clone(), Arc::clone(&base), Arc::clone(&sent));
        senders.push(tokio::spawn(async move {
            for i in (range.start + s..range.end).step_by(SENDERS) {
                let id = format!("m{i}");
                let body =
                    json!({ "topic": "/p1/dev/post", "messageId": id, "payload": { "n": i } })
                        .to_string();
                loop {
                    assert!(
                        Instant::now() < deadline,
                        "{id} was not answered 200 within {limit:?}"
                    );
                    match client
                        .post(format!("{}/api/v1/messages", now_at(&base)))
                        .body(body.clone())
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let report: Json = r.json().await.unwrap_or(Json::Null);
                            let code =
                                report["messages"][0]["rules"][0]["actions"][0]["code"].as_u64();
                            if status == 200 && code == Some(200) {
                                sent.ok.lock().unwrap().insert(id);
                                break;
                            }
                            sent.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            sent.unanswered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
}

/// Waits until `n` forwards were answered 200 (within 30 s).
async fn until_sent(sent: &Sent, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.ok() < n {
        assert!(
            Instant::now() < deadline,
            "only {} forwards answered 200 within 30 s",
            sent.ok()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The counts of one case; prints its line and fails the test when anything was lost, or when
/// a message answered 200 has no terminal outcome of its forward, or one that was a failure
/// acked away, in the record store under `dir` (the store of every daemon the case ran there).
fn count(dir: &Path, case: &str, sent: &Sent, received: &[String], started: Instant) {
    let outcomes = outcomes(dir, &sent.ok.lock().unwrap());
    let ok = sent.ok.lock().unwrap().clone();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for id in received {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let delivered = ok
        .iter()
        .filter(|id| seen.contains_key(id.as_str()))
        .count();
    let duplicated = received.len() - seen.len();
    let lost: Vec<&String> = ok
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    println!(
        "faults | {case} | sent {} | delivered {delivered} | duplicated {duplicated} | lost {} | \
         re-sent after no answer {}, after a non-200 {} | forwarded again {} | {:.1} s",
        ok.len(),
        lost.len(),
        sent.unanswered.load(Ordering::Relaxed),
        sent.refused.load(Ordering::Relaxed),
        outcomes.repeated,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(ok.len(), N, "every message was answered 200 in the end");
    assert!(
        outcomes.missing.is_empty(),
        "{case}: {} messages answered 200 have no terminal outcome of their forward (a 200 or \
         a dead-letter step) in the record store, e.g. {:?}",
        outcomes.missing.len(),
        &outcomes.missing[..outcomes.missing.len().min(20)]
    );
    assert!(
        outcomes.misreported.is_empty(),
        "{case}: {} messages answered 200 ended on a failure record with neither a 200 nor a \
         dead-letter step, e.g. {:?}",
        outcomes.misreported.len(),
        &outcomes.misreported[..outcomes.misreported.len().min(20)]
    );
    assert!(
        lost.is_empty(),
        "{case}: {} messages answered 200 were never delivered, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
}

/// `[http]`, `[rules]` and `[data]` of a config under `dir`.
fn base_config(dir: &Path) -> String {
    let toml_path = |p: std::path::PathBuf| format!("{:?}", p.display().to_string());
    format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\
         [rules]\ndir = {}\n\
         [data]\ndir = {}\n",
        toml_path(dir.join("rules")),
        toml_path(dir.join("data")),
    )
}

fn write_rule(dir: &Path, action: &str) {
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(
        dir.join("rules").join("forward.toml"),
        format!("sql = '''SELECT * FROM \"/p1/+/post\"'''\n{action}"),
    )
    .unwrap();
}

/// An amqp action to `exchange`, retried quickly so each case stays short.
fn amqp_action(exchange: &str) -> String {
    format!(
        "[[action]]\nto = \"amqp\"\nexchange = \"{exchange}\"\n\
         retry = {{ max_retries = 8, initial_delay_ms = 100, factor = 2.0, max_delay_ms = 1000, deadline_ms = 10000 }}\n"
    )
}

/// What the record store under `dir` says of the forwards (operation `forward/<destination>`)
/// of the messages answered 200.
#[derive(Debug, Default)]
struct Outcomes {
    /// Messages with no terminal outcome: neither a 200 nor a dead-letter step.
    missing: Vec<String>,
    /// Messages with a failure record but neither a 200 nor a dead-letter step after it: a
    /// failure that was acked away.
    misreported: Vec<String>,
    /// Messages forwarded with a 200 more than once to the same destination (again after a
    /// redelivery or a client's re-send: the duplicates at-least-once allows).
    repeated: usize,
}

/// Reads `dir`'s record store: every message of `ok` must have exactly one kind of terminal
/// outcome per action, a 200 or a failure code followed by its dead-letter step, and no
/// message may end on a failure that went nowhere.
fn outcomes(dir: &Path, ok: &BTreeSet<String>) -> Outcomes {
    let db = dir.join("data").join("outcomes.db");
    let conn = rusqlite::Connection::open(&db)
        .unwrap_or_else(|e| panic!("open the record store {}: {e}", db.display()));
    let mut stmt = conn
        .prepare(
            "SELECT message_id, operation, code FROM records \
             WHERE biz_code = 'ruleengine' AND operation LIKE 'forward/%' ORDER BY id",
        )
        .unwrap();
    #[derive(Default)]
    struct Of {
        /// 200 records per destination.
        delivered: HashMap<String, usize>,
        failed: usize,
        dead_lettered: bool,
    }
    let mut of: HashMap<String, Of> = HashMap::new();
    for row in stmt
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .unwrap()
    {
        let (id, operation, code) = row.unwrap();
        let entry = of.entry(id).or_default();
        match (operation.as_str(), code) {
            ("forward/dead-letter", 200) => entry.dead_lettered = true,
            ("forward/dead-letter", _) => entry.failed += 1,
            (_, 200) => *entry.delivered.entry(operation).or_default() += 1,
            _ => entry.failed += 1,
        }
    }
    let mut out = Outcomes::default();
    for id in ok {
        match of.get(id) {
            None => out.missing.push(id.clone()),
            Some(o) if o.delivered.is_empty() && !o.dead_lettered => {
                if o.failed > 0 {
                    out.misreported.push(id.clone());
                } else {
                    out.missing.push(id.clone());
                }
            }
            Some(o) => out.repeated += usize::from(o.delivered.values().any(|&n| n > 1)),
        }
    }
    out
}

/// A consumer of `group` at `url` (read at each connect) that accepts everything, slowly (5 ms each, so a backlog
/// builds up), and connects again whenever its connection is gone, until `stop`. Adds the
/// message ids it accepted to `got`, in order.
async fn consume(url: Address, group: String, got: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let mut o = ConsumerOptions::new(&now_at(&url), &group, "ak-g", SECRET);
        o.client_id = unique("faults-consumer");
        let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(5), Consumer::connect(&o)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(200), c.receiver.recv::<Body<Value>>())
                .await
            {
                Ok(Ok(d)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if c.receiver.accept(&d).await.is_err() {
                        break; // not settled: redelivered
                    }
                    let id = describe(&d)["properties"]["messageId"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    got.lock().unwrap().push(id);
                }
                Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
        if stop.load(Ordering::Relaxed) {
            c.close().await;
        }
    }
}

/// (a) kill -9 of iotfwd mid-stream, no broker: the group's backlog is in the spool; a restart
/// redelivers it to a real AMQP 1.0 consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_kill_9_with_the_embedded_group_backlog() {
    kill_9_with_a_group(false).await;
}

/// kill -9 of iotfwd mid-stream with a broker-backed group: the backlog is the durable queue
/// `iotfwd.group.<id>` on the shared RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_kill_9_with_a_broker_backed_group() {
    kill_9_with_a_group(true).await;
}

async fn kill_9_with_a_group(broker: bool) {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Unique with a broker: the group's queue is on the shared RabbitMQ.
    let group = if broker {
        unique("faults-grp")
    } else {
        "g".to_owned()
    };
    write_rule(
        d,
        &format!("[[action]]\nto = \"group\"\ngroup = \"{group}\"\n"),
    );
    let secret = d.join("g.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let config = format!(
        "{}{}[subscription]\nlisten = \"127.0.0.1:0\"\n\
         [[group]]\nid = \"{group}\"\naccess_key_id = \"ak-g\"\nsecret_file = {:?}\n\
         create_secret = false\nack_timeout_ms = 2000\n",
        base_config(d),
        if broker {
            format!("[broker]\nurl = \"{BROKER}\"\n")
        } else {
            String::new()
        },
        secret.display().to_string()
    );
    let mut first = ChildDaemon::start(d, 1, &config).await;
    let base = address(first.base.clone());
    let endpoint = address(format!("amqp://{}", first.amqp.unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let consumer = tokio::spawn(consume(
        Arc::clone(&endpoint),
        group.clone(),
        Arc::clone(&received),
        Arc::clone(&stop),
    ));
    let sent = Arc::new(Sent::default());
    let senders = tokio::spawn(send_all(
        Arc::clone(&base),
        Arc::clone(&sent),
        Duration::from_secs(60),
    ));
    until_sent(&sent, N / 3).await;
    let scrape = reqwest::get(format!("{}/metrics", first.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    first.kill_9();
    let (conn, ch) = channel(BROKER).await;
    let queue = format!("iotfwd.group.{group}");
    let waiting = if broker {
        // Unacked deliveries went back to the queue with the connection.
        let depth = queue_depth(&conn, &queue).await.unwrap_or(0);
        format!("{depth} in its queue after the kill")
    } else {
        let n = metric(&scrape, "iotfwd_group_backlog_messages", &[("group", "g")])
            + metric(
                &scrape,
                "iotfwd_group_unsettled_messages",
                &[("group", "g")],
            );
        format!("{n} in the spool backlog or unsettled at the kill")
    };
    let second = ChildDaemon::start(d, 2, &config).await;
    *base.write().unwrap() = second.base.clone();
    *endpoint.write().unwrap() = format!("amqp://{}", second.amqp.unwrap());
    senders.await.unwrap();
    // Until every message answered 200 has reached the consumer (at most 20 s; the count
    // below names any that did not), and a second more for late copies.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = {
            let got: BTreeSet<String> = received.lock().unwrap().iter().cloned().collect();
            sent.ok.lock().unwrap().is_subset(&got)
        };
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    consumer.await.unwrap();
    let received = received.lock().unwrap().clone();
    if broker {
        cleanup(&ch, &[], &[&queue]).await;
    }
    let _ = conn.close(200, "".into()).await;
    let case = if broker {
        "kill -9 of iotfwd, broker-backed group"
    } else {
        "kill -9 of iotfwd, embedded default"
    };
    count(d, &format!("{case} ({waiting})"), &sent, &received, started);
}

/// (b) kill -9 of iotfwd mid-stream with amqp actions to the shared RabbitMQ: every message
/// answered 200 is in the bound queue after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_kill_9_with_amqp_actions() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let exchange = unique("faults-kill");
    let (_conn, ch) = channel(BROKER).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    write_rule(d, &amqp_action(&exchange));
    let config = format!("{}[broker]\nurl = \"{BROKER}\"\n", base_config(d));
    let mut first = ChildDaemon::start(d, 1, &config).await;
    let base = address(first.base.clone());
    let sent = Arc::new(Sent::default());
    let senders = tokio::spawn(send_all(
        Arc::clone(&base),
        Arc::clone(&sent),
        Duration::from_secs(60),
    ));
    until_sent(&sent, N / 3).await;
    first.kill_9();
    let second = ChildDaemon::start(d, 2, &config).await;
    *base.write().unwrap() = second.base.clone();
    senders.await.unwrap();
    let received = queue_ids(&ch, &queue, sent.ok()).await;
    cleanup(&ch, &[&exchange], &[&queue]).await;
    count(
        d,
        "kill -9 of iotfwd, amqp actions",
        &sent,
        &received,
        started,
    );
}

/// The message ids in `queue`, taken until it has been quiet for a second.
async fn queue_ids(ch: &lapin::Channel, queue: &str, expect: usize) -> Vec<String> {
    drain(ch, queue, expect, Duration::from_secs(1))
        .await
        .iter()
        .map(|m| header(m, "messageId").unwrap_or_default())
        .collect()
}

/// A TCP proxy in the test, between iotfwd and RabbitMQ, that can cut or stall the
/// connections passing through it. New connections always pass.
struct Proxy {
    port: u16,
    links: Arc<Mutex<Vec<Link>>>,
    accept: tokio::task::JoinHandle<()>,
}

struct Link {
    stalled: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl Proxy {
    async fn start(upstream: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let registry = Arc::clone(&links);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let stalled = Arc::new(AtomicBool::new(false));
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let s = Arc::clone(&stalled);
                let task = tokio::spawn(async move {
                    tokio::select! {
                        _ = pipe(ri, wo, Arc::clone(&s)) => {}
                        _ = pipe(ro, wi, s) => {}
                    }
                });
                registry.lock().unwrap().push(Link {
                    stalled,
                    task: task.abort_handle(),
                });
            }
        });
        Proxy {
            port,
            links,
            accept,
        }
    }

    /// Drops every connection open now (both sides closed at once); the number dropped.
    fn cut(&self) -> usize {
        let links = std::mem::take(&mut *self.links.lock().unwrap());
        for l in &links {
            l.task.abort();
        }
        links.len()
    }

    /// The connections open now stop passing bytes, without closing; the number stalled.
    fn stall(&self) -> usize {
        let links = self.links.lock().unwrap();
        for l in links.iter() {
            l.stalled.store(true, Ordering::Relaxed);
        }
        links.len()
    }

    /// Stalled connections pass bytes again.
    fn resume(&self) {
        for l in self.links.lock().unwrap().iter() {
            l.stalled.store(false, Ordering::Relaxed);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies `from` to `to`, holding what it read while `stalled`.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while stalled.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while stalled.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// iotfwd with amqp actions to the shared RabbitMQ through `proxy`, confirms timing out
/// after 1 s; and the test's own connection to RabbitMQ (not through the proxy).
struct ThroughProxy {
    daemon: ChildDaemon,
    _conn: lapin::Connection,
    ch: lapin::Channel,
    exchange: String,
    queue: String,
}

async fn through_proxy(d: &Path, proxy: &Proxy) -> ThroughProxy {
    let exchange = unique("faults-proxy");
    let (conn, ch) = channel(BROKER).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    write_rule(d, &amqp_action(&exchange));
    let config = format!(
        "{}[broker]\nurl = \"amqp://guest:guest@127.0.0.1:{}/%2f\"\n\
         reconnect_max_delay_ms = 500\nconfirm_timeout_ms = 1000\n",
        base_config(d),
        proxy.port
    );
    ThroughProxy {
        daemon: ChildDaemon::start(d, 1, &config).await,
        _conn: conn,
        ch,
        exchange,
        queue,
    }
}

/// (c) The TCP connection between iotfwd and RabbitMQ is cut mid-stream: iotfwd connects
/// again and every message answered 200 is in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_connection_to_rabbitmq_cut_mid_stream() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let ThroughProxy {
        daemon,
        _conn,
        ch,
        exchange,
        queue,
    } = through_proxy(dir.path(), &proxy).await;
    let sent = Arc::new(Sent::default());
    let senders = tokio::spawn(send_all(
        address(daemon.base.clone()),
        Arc::clone(&sent),
        Duration::from_secs(60),
    ));
    until_sent(&sent, N / 3).await;
    let cut = proxy.cut();
    assert!(cut >= 1, "iotfwd had no connection through the proxy");
    until_sent(&sent, 2 * N / 3).await;
    let cut_again = proxy.cut();
    senders.await.unwrap();
    let received = queue_ids(&ch, &queue, sent.ok()).await;
    cleanup(&ch, &[&exchange], &[&queue]).await;
    count(
        dir.path(),
        &format!("TCP connection to RabbitMQ cut, twice ({cut} + {cut_again} connections)"),
        &sent,
        &received,
        started,
    );
}

/// (d) The TCP connection between iotfwd and RabbitMQ stalls (no bytes, no close) for 3 s:
/// confirms time out (broker.confirm_timeout_ms = 1000), the publishes are retried on a new
/// connection, and every message answered 200 is in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_connection_to_rabbitmq_stalls_mid_stream() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let ThroughProxy {
        daemon,
        _conn,
        ch,
        exchange,
        queue,
    } = through_proxy(dir.path(), &proxy).await;
    let sent = Arc::new(Sent::default());
    let senders = tokio::spawn(send_all(
        address(daemon.base.clone()),
        Arc::clone(&sent),
        Duration::from_secs(60),
    ));
    until_sent(&sent, N / 3).await;
    let stalled = proxy.stall();
    assert!(stalled >= 1, "iotfwd had no connection through the proxy");
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.resume();
    senders.await.unwrap();
    let scrape = reqwest::get(format!("{}/metrics", daemon.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retries = metric(&scrape, "iotfwd_action_retries_total", &[]);
    let received = queue_ids(&ch, &queue, sent.ok()).await;
    cleanup(&ch, &[&exchange], &[&queue]).await;
    assert!(
        retries > 0.0,
        "the stall was not seen: no action was retried; iotfwd's log:\n{}",
        daemon.log_text()
    );
    assert!(
        daemon.log_text().contains("stopped answering"),
        "iotfwd did not drop the stalled connection; its log:\n{}",
        daemon.log_text()
    );
    count(
        dir.path(),
        &format!("TCP connection to RabbitMQ stalled 3 s ({retries} retries)"),
        &sent,
        &received,
        started,
    );
}

/// A memory alarm on the broker (`rabbitmqctl set_vm_memory_high_watermark 0` on a RabbitMQ
/// node of the test's own) mid-stream: a third of the stream goes through, the alarm is set,
/// and once the node reports it the rest is sent. The broker tells a connection it blocks
/// (connection.blocked) when that connection next publishes, so the daemon must show it
/// (iotfwd_broker_blocked) within 15 s; 2 s later the alarm is cleared. Publishes wait,
/// confirms time out and are retried within the action's deadline; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_memory_alarm_on_the_broker_mid_stream() {
    let started = Instant::now();
    let node = tokio::task::spawn_blocking(|| {
        let mut node = super::restarts::TestNode::new();
        node.start();
        node
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let exchange = unique("faults-alarm");
    let url = node.url();
    let (conn, ch) = channel(&url).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    write_rule(d, &amqp_action(&exchange));
    let config = format!(
        "{}[broker]\nurl = \"{url}\"\nreconnect_max_delay_ms = 500\nconfirm_timeout_ms = 1000\n",
        base_config(d)
    );
    let daemon = ChildDaemon::start(d, 1, &config).await;
    let sent = Arc::new(Sent::default());
    let limit = Duration::from_secs(60);
    send_range(
        address(daemon.base.clone()),
        Arc::clone(&sent),
        limit,
        0..N / 3,
    )
    .await;
    let ctl = |args: &[&str]| {
        let (ok, out) = tokio::task::block_in_place(|| node.ctl(args, Duration::from_secs(30)));
        assert!(ok, "rabbitmqctl {args:?}: {out}");
        out
    };
    ctl(&["set_vm_memory_high_watermark", "0"]);
    // The node raises the alarm on its next memory check.
    let raised = Instant::now();
    while !ctl(&["eval", "rabbit_alarm:get_alarms()."]).contains("memory") {
        assert!(
            raised.elapsed() < Duration::from_secs(30),
            "the node did not raise its memory alarm within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = sent.ok();
    let senders = tokio::spawn(send_range(
        address(daemon.base.clone()),
        Arc::clone(&sent),
        limit,
        N / 3..N,
    ));
    let alarm = Instant::now();
    let mut shown: Option<Duration> = None;
    while alarm.elapsed() < Duration::from_secs(15)
        && shown.is_none_or(|t| alarm.elapsed() < t + Duration::from_secs(2))
    {
        if shown.is_none()
            && let Ok(r) = reqwest::get(format!("{}/metrics", daemon.base)).await
            && let Ok(text) = r.text().await
            && metric(&text, "iotfwd_broker_blocked", &[]) == 1.0
        {
            shown = Some(alarm.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = alarm.elapsed();
    let during = sent.ok() - before;
    ctl(&["set_vm_memory_high_watermark", "0.4"]);
    senders.await.unwrap();
    let received = queue_ids(&ch, &queue, sent.ok()).await;
    let _ = conn.close(200, "".into()).await;
    let shown = shown.unwrap_or_else(|| {
        panic!(
            "iotfwd_broker_blocked did not show the broker's memory alarm within 15 s of \
             publishing into it; the daemon's log:\n{}",
            daemon.log_text()
        )
    });
    count(
        d,
        &format!(
            "memory alarm on the broker for {:.1} s ({during} answered 200 during it; \
             iotfwd_broker_blocked shown after {:.1} s)",
            held.as_secs_f64(),
            shown.as_secs_f64()
        ),
        &sent,
        &received,
        started,
    );
}

/// Consumer faults on one group, no broker: one consumer never settles (its deliveries time
/// out, 9650, and go to another), one takes a full window and disconnects without settling
/// (its deliveries go back), again and again; a third accepts. Every message answered 200
/// reaches the third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_consumers_that_never_settle_or_disconnect_with_a_full_window() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_rule(d, "[[action]]\nto = \"group\"\ngroup = \"g\"\n");
    let secret = d.join("g.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let config = format!(
        "{}[subscription]\nlisten = \"127.0.0.1:0\"\n\
         [[group]]\nid = \"g\"\naccess_key_id = \"ak-g\"\nsecret_file = {:?}\n\
         create_secret = false\nack_timeout_ms = 1000\nwindow = 8\nmax_redeliveries = 1000\n",
        base_config(d),
        secret.display().to_string()
    );
    let daemon = ChildDaemon::start(d, 1, &config).await;
    let url = format!("amqp://{}", daemon.amqp.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    // Never settles: receives and keeps every delivery until the end.
    let never = {
        let (url, stop, held) = (url.clone(), Arc::clone(&stop), Arc::clone(&held));
        tokio::spawn(async move {
            let mut o = ConsumerOptions::new(&url, "g", "ak-g", SECRET);
            o.client_id = unique("faults-never-settles");
            let mut c = Consumer::connect(&o).await.unwrap();
            let mut kept = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Ok(d)) = tokio::time::timeout(
                    Duration::from_millis(200),
                    c.receiver.recv::<Body<Value>>(),
                )
                .await
                {
                    kept.push(d);
                    held.fetch_add(1, Ordering::Relaxed);
                }
            }
            c.close().await;
        })
    };
    // Takes a full window (8), then goes away without settling any, and comes back.
    let flaky = {
        let (url, stop, dropped) = (url.clone(), Arc::clone(&stop), Arc::clone(&dropped));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut o = ConsumerOptions::new(&url, "g", "ak-g", SECRET);
                o.client_id = unique("faults-flaky");
                let Ok(mut c) = Consumer::connect(&o).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut got = 0;
                while got < 8 && !stop.load(Ordering::Relaxed) {
                    if let Ok(Ok(_)) = tokio::time::timeout(
                        Duration::from_millis(200),
                        c.receiver.recv::<Body<Value>>(),
                    )
                    .await
                    {
                        got += 1;
                    }
                }
                dropped.fetch_add(got, Ordering::Relaxed);
                drop(c);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let good = tokio::spawn(consume(
        address(url.clone()),
        "g".to_owned(),
        Arc::clone(&received),
        Arc::clone(&stop),
    ));
    let sent = Arc::new(Sent::default());
    send_all(
        address(daemon.base.clone()),
        Arc::clone(&sent),
        Duration::from_secs(60),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = {
            let got: BTreeSet<String> = received.lock().unwrap().iter().cloned().collect();
            sent.ok.lock().unwrap().is_subset(&got)
        };
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in [never, flaky, good] {
        task.await.unwrap();
    }
    let scrape = reqwest::get(format!("{}/metrics", daemon.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let timed_out = metric(
        &scrape,
        "iotfwd_group_outcomes_total",
        &[("group", "g"), ("outcome", "timeout")],
    );
    let (held, dropped) = (
        held.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed),
    );
    assert!(
        held > 0 && timed_out > 0.0,
        "the never-settling consumer held {held}, 9650 {timed_out}"
    );
    assert!(
        dropped > 0,
        "the flaky consumer took deliveries before going away"
    );
    let received = received.lock().unwrap().clone();
    count(
        d,
        &format!(
            "consumers that never settle ({held} held, {timed_out} timed out) or disconnect with a full window ({dropped} taken back)"
        ),
        &sent,
        &received,
        started,
    );
}

/// The exchange of an amqp action is deleted mid-stream and declared again a second later:
/// forwards in the gap fail for good (9332, the destination's configuration) and go to the
/// dead-letter queue, never answered 200; the senders send them again, and once the exchange
/// is back every message answered 200 is in its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_exchange_deleted_mid_stream() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let exchange = unique("faults-gone");
    let dead = unique("faults-dead");
    let (conn, ch) = channel(BROKER).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    write_rule(d, &amqp_action(&exchange));
    let config = format!(
        "{}[broker]\nurl = \"{BROKER}\"\ndead_letter_exchange = \"{dead}\"\n",
        base_config(d)
    );
    let daemon = ChildDaemon::start(d, 1, &config).await;
    let sent = Arc::new(Sent::default());
    let senders = tokio::spawn(send_all(
        address(daemon.base.clone()),
        Arc::clone(&sent),
        Duration::from_secs(60),
    ));
    until_sent(&sent, N / 3).await;
    ch.exchange_delete(
        exchange.as_str().into(),
        lapin::options::ExchangeDeleteOptions::default(),
    )
    .await
    .unwrap();
    let refused_before = sent.refused.load(Ordering::Relaxed);
    // Until some forwards have failed for it, at most 10 s; then the exchange comes back.
    let gap = Instant::now();
    while sent.refused.load(Ordering::Relaxed) == refused_before
        && gap.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exchange_with_queue(&ch, &exchange).await;
    senders.await.unwrap();
    let received = queue_ids(&ch, &queue, sent.ok()).await;
    let dead_letters = queue_depth(&conn, &dead).await.unwrap_or(0);
    cleanup(&ch, &[&exchange, &dead], &[&queue, &dead]).await;
    let _ = conn.close(200, "".into()).await;
    assert!(
        dead_letters > 0,
        "the forwards in the gap were dead-lettered"
    );
    count(
        d,
        &format!(
            "exchange deleted mid-stream, declared again once forwards failed ({dead_letters} dead-lettered in the gap, sent again)"
        ),
        &sent,
        &received,
        started,
    );
}

/// A consumer that rejects everything (9652) on a group whose rule's error action fails too
/// (an amqp action with no broker: 9325): every message answered 200 ends in the dead-letter
/// queue (the spool), none is acked away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_a_consumer_rejects_everything_and_the_error_action_fails() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_rule(
        d,
        "[[action]]\nto = \"group\"\ngroup = \"g\"\n\
         [error_action]\nto = \"amqp\"\nexchange = \"nowhere\"\n",
    );
    let secret = d.join("g.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let config = format!(
        "{}[subscription]\nlisten = \"127.0.0.1:0\"\n\
         [[group]]\nid = \"g\"\naccess_key_id = \"ak-g\"\nsecret_file = {:?}\n\
         create_secret = false\n",
        base_config(d),
        secret.display().to_string()
    );
    let daemon = ChildDaemon::start(d, 1, &config).await;
    let url = format!("amqp://{}", daemon.amqp.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let rejected = Arc::new(AtomicUsize::new(0));
    let consumer = {
        let (stop, rejected) = (Arc::clone(&stop), Arc::clone(&rejected));
        tokio::spawn(async move {
            let mut o = ConsumerOptions::new(&url, "g", "ak-g", SECRET);
            o.client_id = unique("faults-rejecter");
            let mut c = Consumer::connect(&o).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Ok(d)) = tokio::time::timeout(
                    Duration::from_millis(200),
                    c.receiver.recv::<Body<Value>>(),
                )
                .await
                {
                    c.receiver.reject(&d, None).await.unwrap();
                    rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
            c.close().await;
        })
    };
    let sent = Arc::new(Sent::default());
    send_all(
        address(daemon.base.clone()),
        Arc::clone(&sent),
        Duration::from_secs(60),
    )
    .await;
    // Every forward answered 200 is rejected, its error action fails, and it is dead-lettered.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead: Vec<String> = loop {
        let v: Json = client
            .get(format!("{}/api/v1/dlq?limit=10000", daemon.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<String> = v["deadLetters"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l["messageId"].as_str().map(str::to_owned))
            .collect();
        if ids.len() >= N || Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.store(true, Ordering::Relaxed);
    consumer.await.unwrap();
    let rejected = rejected.load(Ordering::Relaxed);
    assert!(rejected >= N, "the consumer rejected {rejected}");
    count(
        d,
        &format!(
            "a consumer rejects everything, the error action fails ({rejected} rejected, {} dead-lettered)",
            dead.len()
        ),
        &sent,
        &dead,
        started,
    );
}
