//! A cluster of three real iotfwd processes on this machine's RabbitMQ, Redis and PostgreSQL
//! (docs/cluster.md): one source queue consumed by all three, quotas shared in Redis, records
//! shared in one PostgreSQL database.
//!
//! - the forwards of one tenant, posted to all three processes at once, stay within its quota
//!   plus the lease margin (3 processes × the tenant's lease size, `lease` at this rate);
//! - a message handled by any process is traced completely from every process (API) and from
//!   the CLI with any process's config;
//! - a kill -9 of one process mid-stream loses nothing (every message id reaches the
//!   destination queue) and the other two take over its share;
//! - consumers connected to different processes share one consumer group's backlog (a
//!   RabbitMQ queue): each message reaches exactly one of them, and both get some;
//! - the console's chart (`GET /api/v1/stats`) gives the same counts from either process.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value as AmqpValue;
use iotfwd::client::{Consumer, ConsumerOptions, describe};
use serde_json::{Value, json};

use super::harness::{ChildDaemon, daemon_binary, metric, tool_missing, unique};
use super::rabbit::{BROKER, channel, cleanup, exchange_with_queue, queue_depth};
use super::restarts::{Progress, publish_stream, tally, wait_settled, write_forward_rule};

const SECRET: &str = "cluster-group-secret";
const REDIS: &str = "redis://127.0.0.1:6379/0";
const PG_ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3";

/// A database of the test's own, dropped at the end.
struct PgDb {
    name: String,
    url: String,
}

async fn pg_admin(sql: &str) -> Result<(), String> {
    let (client, conn) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    client.batch_execute(sql).await.map_err(|e| e.to_string())
}

impl PgDb {
    async fn create() -> Option<PgDb> {
        let name = unique("iotfwd_cluster").replace('-', "_");
        match pg_admin(&format!("CREATE DATABASE {name}")).await {
            Ok(()) => Some(PgDb {
                url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
                name,
            }),
            Err(e) => {
                tool_missing(&format!(
                    "PostgreSQL at 127.0.0.1:5432 (scripts/ensure-postgres): {e}"
                ));
                None
            }
        }
    }
}

/// Dropped at the end of the test, passed or failed (from a thread of its own: the test's
/// runtime may be unwinding).
impl Drop for PgDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(pg_admin(&sql))
        })
        .join();
    }
}

/// Process `run` of the cluster: its own HTTP port, rules and data directory; everything else
/// shared.
fn config(dir: &Path, source: &str, db: &str, key_prefix: &str, group: &str) -> String {
    let toml_str = |p: std::path::PathBuf| format!("{:?}", p.display().to_string());
    format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\
         [rules]\ndir = {}\n\
         [data]\ndir = {}\n\
         [broker]\nurl = \"{BROKER}\"\n\
         [source.amqp]\nqueue = \"{source}\"\nprefetch = 100\n\
         [store]\nbackend = \"postgres\"\nurl = \"{db}\"\n\
         [[tenant]]\nid = \"acme\"\nforward_tps = {TPS}\nburst = {BURST}\n\
         [[instance]]\nid = \"acme-1\"\ntenant = \"acme\"\nproducts = [\"pq\"]\n\
         [[tenant]]\nid = \"big\"\nforward_tps = 100000\nburst = 100000\n\
         [[instance]]\nid = \"big-1\"\ntenant = \"big\"\nproducts = [\"p1\", \"pg\"]\n\
         [quota]\nbackend = \"redis\"\nlease = {LEASE}\n\
         [redis]\nurl = \"{REDIS}\"\nkey_prefix = \"{key_prefix}\"\n\
         [subscription]\nlisten = \"127.0.0.1:0\"\n\
         [[group]]\nid = \"{group}\"\naccess_key_id = \"ak-{group}\"\nsecret_file = {}\nwindow = 8\n",
        toml_str(dir.join("rules")),
        toml_str(dir.join("data")),
        toml_str(dir.join("group.secret")),
    )
}

const TPS: u32 = 10;
const BURST: u32 = 10;
const LEASE: u32 = 2;
const N: usize = 3000;

async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_quotas_records_and_the_source_queue() {
    let started = Instant::now();
    let test_start_ms = iotfwd::message::now_ms();
    let Some(db) = PgDb::create().await else {
        return;
    };
    let source = unique("cl-src");
    let dest = unique("cl-dst");
    let quota_dest = unique("cl-quota");
    let (conn, ch) = channel(BROKER).await;
    let dest_q = exchange_with_queue(&ch, &dest).await;
    let quota_q = exchange_with_queue(&ch, &quota_dest).await;
    super::rabbit::durable_queue(&ch, &source).await;
    let prefix = unique("clq");
    let group = unique("clg");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut daemons = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        write_forward_rule(&rules, &dest);
        std::fs::write(
            rules.join("quota.toml"),
            format!(
                "sql = '''SELECT * FROM \"/pq/#\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"{quota_dest}\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            rules.join("to_group.toml"),
            format!(
                "sql = '''SELECT * FROM \"/pg/#\"'''\n[[action]]\nto = \"group\"\ngroup = \"{group}\"\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("group.secret"), format!("{SECRET}\n")).unwrap();
        let text = config(dir.path(), &source, &db.url, &prefix, &group);
        daemons.push(ChildDaemon::start(dir.path(), i, &text).await);
    }
    for d in &daemons {
        let h = get_json(&format!("{}/api/v1/health", d.base)).await;
        assert_eq!(h["store"]["backend"], "postgres", "{h}");
        assert_eq!(h["store"]["up"], true, "{h}");
        assert_eq!(h["quotas"]["backend"], "redis", "{h}");
    }

    // (a) One tenant's forwards, posted to all three at once, within quota + lease margin.
    let client = reqwest::Client::new();
    let run_for = Duration::from_millis(2000);
    let quota_started = Instant::now();
    let posts = daemons.iter().enumerate().map(|(p, d)| {
        let (client, base) = (client.clone(), d.base.clone());
        async move {
            let mut n = 0u64;
            while quota_started.elapsed() < run_for {
                n += 1;
                let body = json!({ "topic": format!("/pq/dev{p}/post"), "payload": { "n": n } });
                let _ = client
                    .post(format!("{base}/api/v1/messages"))
                    .body(body.to_string())
                    .send()
                    .await;
            }
            n
        }
    });
    let posted: Vec<u64> = futures::future::join_all(posts).await;
    let elapsed = quota_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let forwarded = f64::from(queue_depth(&conn, &quota_q).await.unwrap());
    let quota = f64::from(BURST) + f64::from(TPS) * elapsed;
    let margin = f64::from(3 * LEASE);
    println!(
        "cluster quota: {forwarded} forwarded of {posted:?} posted over {elapsed:.2} s; quota \
         {quota:.0} + lease margin {margin}"
    );
    assert!(
        posted.iter().sum::<u64>() as f64 > 2.0 * (quota + margin),
        "the load did not exceed the quota: {posted:?}"
    );
    assert!(
        forwarded <= quota + margin,
        "{forwarded} forwards, quota {quota:.0} + margin {margin}"
    );
    assert!(
        forwarded >= 0.7 * quota,
        "{forwarded} forwards: far under the quota {quota:.0}"
    );

    // (c) kill -9 of one process mid-stream: nothing lost, the others take over.
    let progress = Arc::new(Progress::default());
    let publisher = tokio::spawn(publish_stream(
        BROKER.into(),
        source.clone(),
        N,
        1_500,
        Arc::clone(&progress),
        Duration::from_secs(30),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while (queue_depth(&conn, &dest_q).await.unwrap_or(0) as usize) < N / 4 {
        assert!(
            Instant::now() < deadline,
            "a quarter not forwarded in 30 s; a log:\n{}",
            daemons[0].log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = |scrape: &str| {
        metric(
            scrape,
            "iotfwd_messages_received_total",
            &[("source", "amqp")],
        )
    };
    let killed_received = received(&daemons[0].metrics().await);
    let mut killed = daemons.remove(0);
    killed.kill_9();
    let before: Vec<f64> = {
        let mut v = Vec::new();
        for d in &daemons {
            v.push(received(&d.metrics().await));
        }
        v
    };
    tokio::time::timeout(Duration::from_secs(40), publisher)
        .await
        .expect("the publisher finishes")
        .unwrap()
        .unwrap();
    wait_settled(BROKER, &source, &dest_q, N, Duration::from_secs(30)).await;
    let mut after = Vec::new();
    for d in &daemons {
        after.push(received(&d.metrics().await));
    }
    let (missing, duplicates, total) = tally(BROKER, &dest_q, N).await;
    println!(
        "cluster kill -9: {total} forwarded for {N} published, {} missing, {duplicates} \
         duplicates; killed process had received {killed_received}; survivors {before:?} -> \
         {after:?}; publisher re-sent {}",
        missing.len(),
        progress.republished.load(Ordering::Relaxed)
    );
    assert!(
        missing.is_empty(),
        "missing ids, e.g. {:?}",
        &missing[..missing.len().min(20)]
    );
    assert!(
        killed_received > 0.0,
        "the killed process had taken a share"
    );
    for (b, a) in before.iter().zip(&after) {
        assert!(
            a > b,
            "a survivor took no more messages after the kill: {before:?} -> {after:?}"
        );
    }

    // (b) Every message is traced completely from any process, API and CLI alike.
    for id in ["m0", &format!("m{}", N / 2), &format!("m{}", N - 1)] {
        let mut traces = Vec::new();
        for d in &daemons {
            let t = get_json(&format!("{}/api/v1/trace/{id}", d.base)).await;
            traces.push(t["records"].clone());
        }
        assert_eq!(traces[0], traces[1], "{id}: the two processes disagree");
        let records = traces[0].as_array().unwrap();
        let codes: Vec<&str> = records
            .iter()
            .filter_map(|r| r["bizCode"].as_str())
            .collect();
        assert!(records.len() >= 2, "{id}: {records:?}");
        assert!(codes.contains(&"uplink"), "{id}: {codes:?}");
        // The CLI with the killed process's config reads the same store.
        let out = std::process::Command::new(daemon_binary())
            .args(["logs", "trace", id, "--json", "--config"])
            .arg(dirs[0].path().join("iotfwd-0.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = String::from_utf8_lossy(&out.stdout).lines().count();
        assert_eq!(lines, records.len(), "{id}: CLI and API disagree");
    }
    // The console's chart (`GET /api/v1/stats`) counts the shared records: the same answer
    // from either process over one window (once the records of the last messages are
    // committed), and every message of the stream has its uplink.
    let window = {
        let at = iotfwd::outcome::query::format_time_ms;
        let now = iotfwd::message::now_ms();
        format!(
            "from={}&to={}",
            at(test_start_ms - 60_000),
            at(now + 60_000)
        )
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let charts = loop {
        let mut charts = Vec::new();
        for d in &daemons {
            for by in ["code", "serviceType"] {
                let url = format!("{}/api/v1/stats?{window}&by={by}", d.base);
                let response = reqwest::get(&url).await.unwrap();
                assert_eq!(response.status(), 200, "{url}");
                charts.push(response.json::<Value>().await.unwrap());
            }
        }
        if charts[0] == charts[2] && charts[1] == charts[3] {
            break charts;
        }
        assert!(
            Instant::now() < deadline,
            "the two processes count differently: {} / {}",
            charts[0],
            charts[2]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let uplinks = charts[1]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "uplink")
        .map_or(0, |g| g["total"].as_u64().unwrap());
    assert!(
        uplinks >= N as u64,
        "{uplinks} uplink records: {}",
        charts[1]
    );
    println!(
        "cluster stats: {} records, {uplinks} uplinks, the same from both processes",
        charts[0]["total"]
    );
    // (d) Consumers on the two surviving processes share the group's backlog.
    let mut consumers = Vec::new();
    for d in &daemons {
        let mut o = ConsumerOptions::new(
            &format!("amqp://{}", d.amqp.expect("the endpoint listens")),
            &group,
            &format!("ak-{group}"),
            SECRET,
        );
        o.client_id = unique("client");
        consumers.push(Consumer::connect(&o).await.expect("a consumer connects"));
    }
    let mut sent = Vec::new();
    for n in 0..60 {
        let body = json!({ "topic": "/pg/dev/post", "payload": { "n": n } }).to_string();
        let report: Value = client
            .post(format!("{}/api/v1/messages", daemons[n % 2].base))
            .body(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(report["messages"][0]["code"], 200, "{report}");
        sent.push(
            report["messages"][0]["messageId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut got = Vec::new();
    let mut per_consumer = Vec::new();
    for c in &mut consumers {
        let mut mine = 0;
        while let Ok(Ok(d)) =
            tokio::time::timeout(Duration::from_secs(2), c.receiver.recv::<Body<AmqpValue>>()).await
        {
            got.push(
                describe(&d)["properties"]["messageId"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
            c.receiver.accept(&d).await.unwrap();
            mine += 1;
        }
        per_consumer.push(mine);
    }
    got.sort();
    sent.sort();
    println!(
        "cluster group: {} sent, consumers got {per_consumer:?}",
        sent.len()
    );
    if got != sent {
        let t = get_json(&format!("{}/api/v1/trace/{}", daemons[0].base, sent[0])).await;
        panic!(
            "each group message exactly once across the processes: got {} of {}; the trace \
             of one: {t}",
            got.len(),
            sent.len()
        );
    }
    assert!(
        per_consumer.iter().all(|&n| n > 0),
        "both consumers got some: {per_consumer:?}"
    );
    for c in consumers {
        c.close().await;
    }

    for d in daemons {
        drop(d);
    }
    drop(killed);
    cleanup(
        &ch,
        &[&dest, &quota_dest],
        &[&source, &dest_q, &quota_q, &format!("iotfwd.group.{group}")],
    )
    .await;
    let _ = conn.close(200, "".into()).await;
    drop(db);
    let took = started.elapsed();
    println!("cluster test took {took:?}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
}
