//! The record store and the log queries: the store through the library, `GET /api/v1/logs`
//! against the real daemon, and `iotfwd logs` as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use iotfwd::config::Config;
use iotfwd::config::store::JsonlTarget;
use iotfwd::message::{Identity, Message};
use iotfwd::outcome::query::{LogParams, LogQuery, Status};
use iotfwd::outcome::store::{Reader, Store, StoreOptions};
use iotfwd::outcome::{Code, Failure, GroupOutcome, Record};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::harness::Daemon;

// ---------------------------------------------------------------------------------------------
// Helpers

fn now_ms() -> i64 {
    iotfwd::message::now_ms()
}

/// A message as a source takes it in, with the ids an envelope names; product and device come
/// from the topic. Records about it come from the daemon's own constructors, so the data here
/// has the shapes the daemon writes.
fn message(message_id: &str, trace_id: &str, topic: &str, payload: &str) -> Message {
    Message::new(
        topic.to_owned(),
        payload.as_bytes().to_vec().into(),
        Identity {
            message_id: Some(message_id.to_owned()),
            trace_id: Some(trace_id.to_owned()),
            ..Identity::default()
        },
    )
    .unwrap()
}

async fn write_all(store: &Store, records: &[Record]) {
    let tx = store.sender();
    for r in records {
        tx.send(r.clone()).await.unwrap();
    }
    store.flush().await.unwrap();
}

fn query(pairs: &[(&str, &str)]) -> LogQuery {
    LogParams::from_pairs(pairs.iter().map(|(k, v)| (*k, v.to_string())))
        .unwrap()
        .validate(now_ms())
        .unwrap_or_else(|e| panic!("{pairs:?}: {e}"))
}

/// Every page of a query, following the cursor.
fn all_pages(reader: &Reader, q: &LogQuery) -> Vec<Record> {
    let mut out = Vec::new();
    let mut q = q.clone();
    loop {
        let page = reader.query(&q).unwrap();
        assert!(page.records.len() <= q.limit);
        out.extend(page.records);
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return out,
        }
    }
}

/// What the store must return for `q` over `data` (in insertion order): the matching records,
/// newest first, ties broken by the later insertion first.
fn oracle(data: &[Record], q: &LogQuery) -> Vec<Record> {
    let mut hits: Vec<(usize, &Record)> = data
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            q.device.as_ref().is_none_or(|d| &r.device_name == d)
                && q.product.as_ref().is_none_or(|p| &r.product_key == p)
                && q.trace_id.as_ref().is_none_or(|t| &r.trace_id == t)
                && q.message_id.as_ref().is_none_or(|m| &r.message_id == m)
                && q.keyword.as_ref().is_none_or(|k| {
                    r.operation.contains(k.as_str())
                        || r.reason.contains(k.as_str())
                        || r.content.contains(k.as_str())
                })
                && q.status.is_none_or(|s| match s {
                    Status::Success => r.code == Code::Ok,
                    Status::Failed => r.code != Code::Ok,
                    Status::Code(c) => r.code == c,
                })
                && q.service_type.is_none_or(|b| r.biz_code == b)
                && q.from_ms.is_none_or(|f| r.time_ms >= f)
                && q.to_ms.is_none_or(|t| r.time_ms <= t)
        })
        .collect();
    hits.sort_by_key(|(i, r)| std::cmp::Reverse((r.time_ms, *i)));
    hits.into_iter().map(|(_, r)| r.clone()).collect()
}

fn iotfwd(args: &[&str]) -> Output {
    Command::new(super::harness::daemon_binary())
        .args(args)
        .output()
        .expect("run iotfwd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Collapses whitespace, so wrapped text can be compared with the catalog's.
fn flat(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `iotfwd logs --db PATH ARGS --json`: the records as JSON values.
fn cli_json(db: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["logs", "--db", db.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let out = iotfwd(&all);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn to_json(records: &[Record]) -> Vec<Value> {
    records
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect()
}

/// The daemon without a broker, on `dir/rules` (made here) and `dir/data`.
async fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Daemon {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    let data = dir.join("data");
    Daemon::start_without_broker(&rules, |c| {
        c.data.dir = data;
        tweak(c);
    })
    .await
}

impl Daemon {
    /// `GET /api/v1/logs` with these parameters: (status, body).
    async fn logs(&self, params: &[(&str, &str)]) -> (u16, Value) {
        // Percent-encoded as a browser or curl --data-urlencode would: `+`, `&`, `=`, `#`, `%`,
        // tabs and newlines all arrive as typed.
        let url =
            url::Url::parse_with_params(&format!("{}/api/v1/logs", self.base), params).unwrap();
        let (status, body) = self.get(&url[url::Position::BeforePath..]).await;
        (status, serde_json::from_str(&body).unwrap())
    }

    /// Polls until the query returns `n` records (records are committed within milliseconds).
    async fn wait_for(&self, params: &[(&str, &str)], n: usize) -> Vec<Value> {
        let mut last = Value::Null;
        for _ in 0..500 {
            let (status, body) = self.logs(params).await;
            assert_eq!(status, 200, "{body}");
            if body["records"].as_array().unwrap().len() == n {
                return body["records"].as_array().unwrap().clone();
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{params:?}: expected {n} records, got {last}");
    }
}

/// Two rules: `fine` has no action (records 200 with its output), `failing` forwards to an
/// amqp exchange, which ends in 9325 without a broker.
fn write_two_rules(dir: &Path) {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("fine.toml"),
        "sql = '''SELECT deviceName() AS device, t FROM \"/p1/+/post\"'''\n",
    )
    .unwrap();
    std::fs::write(
        rules.join("failing.toml"),
        "sql = '''SELECT deviceName() AS device, t FROM \"/p1/+/post\" WHERE t > 30'''\n\
         [[action]]\nto = \"amqp\"\nexchange = \"alerts\"\nrouting_key = \"temp.${device}\"\n",
    )
    .unwrap();
}

/// A fixed data set over the last ~4 minutes: 4 records per message (uplink, two ruleengine,
/// one ServerSubscribe), 5 devices over 3 products, failures of several codes, some equal
/// times, and contents the keyword filter can tell apart.
fn dataset(now: i64) -> Vec<Record> {
    let mut out = Vec::new();
    for m in 0..60 {
        let t = now - 240_000 + (m / 2) * 8_000;
        let (id, trace) = (format!("m{m}"), format!("t{m}"));
        let device = format!("d{}", m % 5);
        let product = format!("p{}", m % 3);
        let topic = format!("/{product}/{device}/post");
        let msg = message(&id, &trace, &topic, &format!("{{\"t\":{m}}}"));
        out.push(Record::uplink(&msg).with_time_ms(t));
        out.push(
            Record::rule_output(
                &msg,
                "archive",
                format!("{{\"device\":\"{device}\",\"seq\":{m}}}"),
            )
            .with_time_ms(t + 1),
        );
        let forwarded = match m % 4 {
            0 => Err(Failure::unreachable("connection refused")),
            1 => Err(Failure::throttled("device over 10 msg/s")),
            _ => Ok(()),
        };
        out.push(
            Record::action(&msg, "alert", "amqp:alerts", &forwarded, "{}".into())
                .with_time_ms(t + 1),
        );
        let delivered = if m % 6 == 0 {
            GroupOutcome::AckTimeout {
                ack_timeout_ms: 30_000,
                attempt: 1,
            }
        } else {
            GroupOutcome::Accepted
        };
        out.push(
            Record::group(&msg, "ops", "", delivered, "consumer-1", "alert", b"{}")
                .with_time_ms(t + 2),
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The store through the library

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_filter_alone_and_combined() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("o.db"), StoreOptions::default(), None).unwrap();
    let now = now_ms();
    let data = dataset(now);
    write_all(&store, &data).await;
    let reader = store.reader().unwrap();
    let from = iotfwd::outcome::query::format_time_ms(now - 200_000);
    let to = iotfwd::outcome::query::format_time_ms(now - 100_000);
    // Exactly the times of records: both bounds are inclusive.
    let exact_from = iotfwd::outcome::query::format_time_ms(data[40].time_ms);
    let exact_to = iotfwd::outcome::query::format_time_ms(data[80].time_ms);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        // Alone.
        vec![],
        vec![("device", "d1")],
        vec![("product", "p2")],
        vec![("traceId", "t7")],
        vec![("messageId", "m7")],
        vec![("keyword", "refused")],
        vec![("keyword", "amqp:alerts")],
        vec![("keyword", "\"seq\":1")],
        vec![("status", "success")],
        vec![("status", "failed")],
        vec![("status", "9325")],
        vec![("status", "9650")],
        vec![("serviceType", "uplink")],
        vec![("serviceType", "ruleengine")],
        vec![("serviceType", "serversubscribe")],
        vec![("since", "1m")],
        vec![("from", from.as_str())],
        vec![("to", to.as_str())],
        vec![("from", from.as_str()), ("to", to.as_str())],
        vec![("from", exact_from.as_str()), ("to", exact_to.as_str())],
        // Combined.
        vec![("device", "d1"), ("status", "failed")],
        vec![("device", "d2"), ("product", "p1")],
        vec![
            ("product", "p0"),
            ("serviceType", "ruleengine"),
            ("from", from.as_str()),
            ("to", to.as_str()),
        ],
        vec![("keyword", "attempt"), ("device", "d3"), ("since", "2m")],
        vec![("traceId", "t8"), ("serviceType", "ServerSubscribe")],
        vec![("messageId", "m12"), ("status", "failed")],
        vec![
            ("status", "9324"),
            ("keyword", "10 msg/s"),
            ("product", "p1"),
        ],
        vec![
            ("device", "d0"),
            ("product", "p0"),
            ("keyword", "alerts"),
            ("status", "failed"),
            ("serviceType", "ruleengine"),
            ("from", from.as_str()),
            ("to", to.as_str()),
        ],
        // Matches nothing, correctly.
        vec![("device", "d1"), ("product", "p0"), ("messageId", "m2")],
    ];
    // Queries narrowed only by keyword, status or service type are split into a newest part
    // (time index) and the rest (storage order) at the 65536th newest record; small split points
    // run both parts here, including splits inside runs of equal times.
    let split_readers = [
        ("default", reader.clone()),
        ("split at 1", reader.clone().with_split_at(1)),
        ("split at 13", reader.clone().with_split_at(13)),
        ("split at 100", reader.clone().with_split_at(100)),
    ];
    for case in &cases {
        for limit in ["7", "1000"] {
            let mut pairs = case.clone();
            pairs.push(("limit", limit));
            let q = query(&pairs);
            let expected = oracle(&data, &q);
            for (name, reader) in &split_readers {
                assert_eq!(all_pages(reader, &q), expected, "{pairs:?}, {name}");
            }
        }
    }
    // The filters really narrow: every single-filter case finds something, and less than all.
    for case in cases.iter().filter(|c| c.len() == 1) {
        let n = oracle(&data, &query(case)).len();
        assert!(n > 0 && n < data.len(), "{case:?} matched {n}");
    }
    store.shutdown().await;
}

/// The platform's console splits a keyword on these and fails; iotfwd finds them literally.
const SPECIAL: &[char] = &[
    ',', ' ', '\'', '"', ';', '=', '(', ')', '[', ']', '{', '}', '?', '@', '&', '<', '>', '/', ':',
    '\t', '\n', '\r', '%', '_', '\\', '*', '+', '#',
];

/// One record per special character, holding `x<c>y` in operation, reason or content in turn;
/// the rest of each record has no special character, so each one is in its own record only.
fn special_records(now: i64) -> Vec<Record> {
    SPECIAL
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let needle = format!("x{c}y");
            // The payload is the content of a rule that failed; no record shows the topic.
            let msg = message(&format!("m{i}"), &format!("t{i}"), "/pk/dev/post", "none");
            let record = match i % 3 {
                0 => Record::rule_output(&msg, &format!("rule{needle}"), "none".into()),
                1 => Record::rule_failed(&msg, "rule", &Failure::sql(format!("why{needle}"))),
                _ => Record::rule_output(&msg, "rule", format!("body{needle}end")),
            };
            record.with_time_ms(now - 1000 + i as i64)
        })
        .chain([Record::rule_output(
            &message("decoy", "decoy", "/pk/dev/post", ""),
            "xyxy",
            "xy".into(),
        )
        .with_time_ms(now)])
        .collect()
}

/// The keywords to try for character `i`: `x<c>y`, and `<c>` alone.
fn special_keywords(i: usize) -> [String; 2] {
    [format!("x{}y", SPECIAL[i]), SPECIAL[i].to_string()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywords_find_every_special_character_literally() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let store = Store::open(&db, StoreOptions::default(), None).unwrap();
    write_all(&store, &special_records(now_ms())).await;
    let reader = store.reader().unwrap();
    for (i, c) in SPECIAL.iter().enumerate() {
        for keyword in special_keywords(i) {
            let found = reader
                .query(&query(&[("keyword", &keyword)]))
                .unwrap()
                .records;
            let ids: Vec<&str> = found.iter().map(|r| r.message_id.as_str()).collect();
            assert_eq!(
                ids,
                [format!("m{i}")],
                "keyword {keyword:?} (character {c:?})"
            );
        }
    }
    // All of them in one keyword: found where present, and a clean empty result where not.
    let all: String = SPECIAL.iter().collect();
    assert!(
        reader
            .query(&query(&[("keyword", &all)]))
            .unwrap()
            .records
            .is_empty()
    );
    store.shutdown().await;

    // The same through the CLI (arguments reach it unsplit, as from a shell with quoting).
    for (i, c) in SPECIAL.iter().enumerate() {
        let [keyword, _] = special_keywords(i);
        let found = cli_json(&db, &["--keyword", &keyword]);
        assert_eq!(found.len(), 1, "CLI keyword {keyword:?} (character {c:?})");
        assert_eq!(found[0]["messageId"], format!("m{i}"), "CLI {c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_is_stable_under_concurrent_inserts() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        Store::open(&dir.path().join("o.db"), StoreOptions::default(), None).unwrap(),
    );
    let now = now_ms();
    // 500 records, times with ties (five per millisecond).
    let initial: Vec<Record> = (0..500)
        .map(|i| {
            let topic = format!("/pk/d{}/post", i % 2);
            let msg = message(
                &format!("m{i}"),
                &format!("t{i}"),
                &topic,
                &format!("{{\"i\":{i}}}"),
            );
            Record::uplink(&msg).with_time_ms(now - 10_000 + i / 5)
        })
        .collect();
    write_all(&store, &initial).await;
    let reader = store.reader().unwrap();

    // A writer inserts all the while, five records per step, committed before the step ends:
    // newer records, records older than everything, and records with exactly the times of
    // existing ones. Holding `quiet` keeps it between steps, so the test can take a snapshot.
    let quiet = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let writer = {
        let store = std::sync::Arc::clone(&store);
        let quiet = std::sync::Arc::clone(&quiet);
        tokio::spawn(async move {
            let tx = store.sender();
            let mut n = 0i64;
            loop {
                {
                    let _step = quiet.lock().await;
                    for _ in 0..5 {
                        let time = match n % 3 {
                            0 => now + n,
                            1 => now - 20_000 - n,
                            _ => now - 10_000 + (n % 100),
                        };
                        let msg = message(
                            &format!("new{n}"),
                            "tnew",
                            &format!("/pk/d{}/post", n % 2),
                            &format!("{{\"n\":{}}}", n * 10 + 1),
                        );
                        let r = Record::uplink(&msg).with_time_ms(time);
                        tx.send(r).await.unwrap();
                        n += 1;
                    }
                    store.flush().await.unwrap();
                }
                if stop_rx.try_recv().is_ok() {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let split_reader = reader.clone().with_split_at(40);
    // `1}` is in one initial record of ten, and in every record the writer adds.
    for filter in [vec![], vec![("device", "d1")], vec![("keyword", "1}")]] {
        // The keyword query is split: its pages run both parts.
        let reader = if filter.is_empty() || filter[0].0 != "keyword" {
            &reader
        } else {
            &split_reader
        };
        let mut pairs = filter.clone();
        pairs.push(("limit", "37"));
        let mut q = query(&pairs);
        // What exists when the first page is read: that is what the pages must show.
        let (snapshot, first, count_before) = {
            let _quiet = quiet.lock().await;
            let mut whole = q.clone();
            whole.limit = 1000;
            (
                all_pages(reader, &whole),
                reader.query(&q).unwrap(),
                reader.count().unwrap(),
            )
        };
        assert!(snapshot.len() >= 50, "{filter:?}");
        if filter.len() == 1 && filter[0].0 == "keyword" {
            assert!(reader.explain(&q).unwrap().starts_with("SCAN records"));
        }
        let mut seen = first.records;
        let mut cursor = first.next_cursor;
        while let Some(c) = cursor {
            // Let inserts land between pages.
            tokio::time::sleep(Duration::from_millis(5)).await;
            q.cursor = Some(c);
            let page = reader.query(&q).unwrap();
            seen.extend(page.records);
            cursor = page.next_cursor;
        }
        let count_after = reader.count().unwrap();
        assert!(
            count_after > count_before,
            "{filter:?}: records arrived while paging"
        );
        assert_eq!(
            seen.len(),
            snapshot.len(),
            "{filter:?}: no duplicates, nothing missing, nothing inserted meanwhile"
        );
        assert_eq!(seen, snapshot, "{filter:?}");
    }
    stop_tx.send(()).unwrap();
    let inserted = writer.await.unwrap();
    // A new first page sees the new records: the newest is the writer's.
    let fresh = reader.query(&query(&[("limit", "1")])).unwrap();
    assert!(fresh.records[0].message_id.starts_with("new"));
    assert_eq!(reader.count().unwrap(), 500 + inserted as u64);
    std::sync::Arc::into_inner(store).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_records_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        retention: Duration::from_secs(7 * 86_400),
        retention_interval: Duration::from_millis(50),
        ..StoreOptions::default()
    };
    let config = iotfwd::config::store::StoreConfig::default();
    assert_eq!(
        StoreOptions::from_config(&config).retention,
        options.retention,
        "7 days by default"
    );
    let store = Store::open(&dir.path().join("o.db"), options, None).unwrap();
    let now = now_ms();
    let day = 86_400_000;
    let r = |age: i64, id: &str| {
        Record::uplink(&message(id, id, "/pk/dev/x", "{}")).with_time_ms(now - age)
    };
    // 12000 expired records (more than one purge chunk), and three to keep.
    let mut records: Vec<Record> = (0..12_000).map(|i| r(8 * day + i, "old")).collect();
    records.extend([r(7 * day - 60_000, "keep1"), r(day, "keep2"), r(0, "keep3")]);
    write_all(&store, &records).await;
    let reader = store.reader().unwrap();
    let mut count = reader.count().unwrap();
    for _ in 0..500 {
        if count == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        count = reader.count().unwrap();
    }
    assert_eq!(count, 3, "expired records are deleted without being asked");
    let left: Vec<String> = all_pages(&reader, &LogQuery::default())
        .into_iter()
        .map(|r| r.message_id)
        .collect();
    assert_eq!(left, ["keep3", "keep2", "keep1"]);
    // On demand too: the cutoff is exclusive.
    assert_eq!(store.purge_older_than(now - day).await.unwrap(), 1);
    assert_eq!(reader.count().unwrap(), 2);
    let stats = store.shutdown().await;
    assert_eq!(stats.purged, 12_001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_restart_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sub/dir/o.db");
    let now = now_ms();
    let data = dataset(now);
    let (first, second) = data.split_at(100);
    let store = Store::open(&db, StoreOptions::default(), None).unwrap();
    write_all(&store, first).await;
    // Shutdown writes what is queued, without an explicit flush.
    let tx = store.sender();
    for r in &second[..20] {
        tx.send(r.clone()).await.unwrap();
    }
    drop(tx);
    assert_eq!(store.shutdown().await.written, 120);

    let store = Store::open(&db, StoreOptions::default(), None).unwrap();
    write_all(&store, &second[20..]).await;
    let reader = store.reader().unwrap();
    let q = query(&[("limit", "1000")]);
    assert_eq!(all_pages(&reader, &q), oracle(&data, &q));
    store.shutdown().await;
    // And readable with nothing running.
    assert_eq!(
        Reader::open(&db).unwrap().count().unwrap(),
        data.len() as u64
    );
}

// ---------------------------------------------------------------------------------------------
// The daemon, the HTTP API and the CLI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_trace_of_a_message_matching_two_rules_one_failing() {
    let dir = tempfile::tempdir().unwrap();
    write_two_rules(dir.path());
    let d = start(dir.path(), |_| {}).await;
    let db = dir.path().join("data/outcomes.db");
    let body = d
        .post(json!({
            "topic": "/p1/dev7/post",
            "payload": {"t": 40},
            "messageId": "m-trace-1",
            "traceId": "tr-trace-1"
        }))
        .await;
    assert_eq!(body["messages"][0]["code"], 200, "{body}");
    // Another message, so the trace must pick out the right one.
    d.post(json!({"topic": "/p1/dev8/post", "payload": {"t": 10}}))
        .await;

    let records = d.wait_for(&[("traceId", "tr-trace-1")], 4).await;
    // Newest first; the four steps of the one message (the failed forward is dead-lettered).
    let steps: Vec<(String, String, u64)> = records
        .iter()
        .rev()
        .map(|r| {
            (
                r["bizCode"].as_str().unwrap().to_owned(),
                r["operation"].as_str().unwrap().to_owned(),
                r["code"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(steps[0], ("uplink".into(), "/p1/dev7/post".into(), 200));
    let mut rule_steps = steps[1..].to_vec();
    rule_steps.sort();
    assert_eq!(
        rule_steps,
        [
            ("ruleengine".into(), "failing/amqp:alerts".into(), 9325),
            ("ruleengine".into(), "failing/dead-letter".into(), 200),
            ("ruleengine".into(), "fine".into(), 200),
        ]
    );
    for r in &records {
        assert_eq!(r["messageId"], "m-trace-1");
        assert_eq!(r["deviceName"], "dev7");
        assert_eq!(r["productKey"], "p1");
    }
    let fine = records.iter().find(|r| r["operation"] == "fine").unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(fine["content"].as_str().unwrap()).unwrap(),
        json!({"device": "dev7", "t": 40})
    );
    let failing = records.iter().find(|r| r["code"] == 9325).unwrap();
    assert!(
        !failing["reason"].as_str().unwrap().is_empty(),
        "the failure says why: {failing}"
    );
    // By messageId: the same records.
    assert_eq!(d.wait_for(&[("messageId", "m-trace-1")], 4).await, records);

    // `iotfwd logs trace`, while the daemon runs, by either id.
    for id in ["m-trace-1", "tr-trace-1"] {
        let out = iotfwd(&["logs", "trace", id, "--db", db.to_str().unwrap()]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            stdout.starts_with(
                "message m-trace-1  trace tr-trace-1  device p1/dev7\n4 step(s), 1 failed\n"
            ),
            "{stdout}"
        );
        let lines: Vec<&str> = stdout.lines().collect();
        let uplink = lines.iter().position(|l| l.contains("  uplink  ")).unwrap();
        let fine = lines.iter().position(|l| l.ends_with("  fine")).unwrap();
        let failing = lines
            .iter()
            .position(|l| l.ends_with("  failing/amqp:alerts"))
            .unwrap();
        assert!(uplink < fine.min(failing), "time order: {stdout}");
        let info = Code::DestinationUnavailable.info();
        let flat_out = flat(&stdout);
        assert!(flat_out.contains(&flat(info.meaning)), "{stdout}");
        assert!(flat_out.contains(&flat(info.troubleshooting)), "{stdout}");
        assert!(
            flat_out.contains(&flat(failing_reason(&records))),
            "{stdout}"
        );
        assert!(
            stdout.contains("verdict: 1 step(s) failed: failing/amqp:alerts 9325"),
            "{stdout}"
        );
        // JSON lines: the same records as the API, oldest first.
        let out = iotfwd(&["logs", "trace", id, "--db", db.to_str().unwrap(), "--json"]);
        let lines: Vec<Value> = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut newest_first = lines.clone();
        newest_first.reverse();
        assert_eq!(newest_first, records);
    }
    // A table listing shows the failure's meaning beside it.
    let out = iotfwd(&[
        "logs",
        "--db",
        db.to_str().unwrap(),
        "--message-id",
        "m-trace-1",
        "--status",
        "failed",
    ]);
    let table = text(&out.stdout);
    assert_eq!(table.lines().count(), 2, "{table}");
    let row = table.lines().nth(1).unwrap();
    for cell in [
        "ruleengine",
        "9325",
        "dev7",
        "failing/amqp:alerts",
        "m-trace-1",
        Code::DestinationUnavailable.info().meaning,
    ] {
        assert!(row.contains(cell), "{cell}: {table}");
    }
    d.stop().await;
    // Unknown ids: a clear message, not silence.
    let out = iotfwd(&["logs", "trace", "nope", "--db", db.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no records with messageId or traceId \"nope\""));
}

fn failing_reason(records: &[Value]) -> &str {
    records.iter().find(|r| r["code"] == 9325).unwrap()["reason"]
        .as_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_cli_and_library_give_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let now = now_ms();
    let mut data = dataset(now);
    data.extend(special_records(now));
    let store = Store::open(&db, StoreOptions::default(), None).unwrap();
    write_all(&store, &data).await;
    store.shutdown().await;
    // The daemon opens the same file (store.path) and serves it.
    let d = start(dir.path(), |c| c.store.path = Some(db.clone())).await;
    let reader = Reader::open(&db).unwrap();
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("device", "d1"), ("status", "failed")],
        vec![("product", "p2"), ("serviceType", "ServerSubscribe")],
        vec![("keyword", "x&y")],
        vec![("keyword", "x=y")],
        vec![("keyword", "x\ny")],
        vec![("keyword", "x+y")],
        vec![("keyword", "x%y")],
        vec![("keyword", "x#y")],
        vec![("traceId", "t9")],
        vec![("since", "10m"), ("status", "9324")],
    ];
    let cli_flag = |k: &str| match k {
        "traceId" => "--trace-id".to_owned(),
        "serviceType" => "--service-type".to_owned(),
        k => format!("--{k}"),
    };
    for case in &cases {
        let (status, body) = d.logs(case).await;
        assert_eq!(status, 200, "{case:?}: {body}");
        let api = body["records"].as_array().unwrap().clone();
        let lib = to_json(&reader.query(&query(case)).unwrap().records);
        let mut args: Vec<String> = Vec::new();
        for (k, v) in case {
            args.push(cli_flag(k));
            args.push((*v).to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cli = cli_json(&db, &args);
        assert!(!lib.is_empty(), "{case:?} finds something");
        assert_eq!(api, lib, "{case:?}: API vs library");
        assert_eq!(cli, lib, "{case:?}: CLI vs library");
        assert_eq!(body["count"], lib.len());
    }
    // Paging through the API: the cursor leads to the same records as one big page.
    let mut cursor: Option<String> = None;
    let mut paged = Vec::new();
    loop {
        let mut params = vec![("limit", "17".to_owned())];
        if let Some(c) = &cursor {
            params.push(("cursor", c.clone()));
        }
        let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (_, body) = d.logs(&params).await;
        paged.extend(body["records"].as_array().unwrap().clone());
        match body["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        paged,
        to_json(&all_pages(&reader, &query(&[("limit", "1000")])))
    );
    d.stop().await;
}

/// (HTTP parameters, CLI arguments, what the error says)
type BadQuery<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_get_a_clear_error_never_an_empty_result() {
    let dir = tempfile::tempdir().unwrap();
    write_two_rules(dir.path());
    let d = start(dir.path(), |_| {}).await;
    d.post(json!({"topic": "/p1/dev1/post", "payload": {"t": 1}}))
        .await;
    d.wait_for(&[], 2).await;
    let db = dir.path().join("data/outcomes.db");
    let db = db.to_str().unwrap();
    let cases: &[BadQuery] = &[
        (
            &[("serviceType", "rules")],
            &["--service-type", "rules"],
            "service type \"rules\" is not one iotfwd logs; use uplink, ruleengine or ServerSubscribe",
        ),
        (
            &[("from", "yesterday")],
            &["--from", "yesterday"],
            "from \"yesterday\" is not an RFC 3339 time",
        ),
        (
            &[("to", "2026-13-01T00:00:00Z")],
            &["--to", "2026-13-01T00:00:00Z"],
            "to \"2026-13-01T00:00:00Z\" is not an RFC 3339 time",
        ),
        (
            &[
                ("from", "2026-11-27T03:00:00Z"),
                ("to", "2026-11-27T02:00:00Z"),
            ],
            &[
                "--from",
                "2026-11-27T03:00:00Z",
                "--to",
                "2026-11-27T02:00:00Z",
            ],
            "from (2026-11-27T03:00:00.000Z) is later than to (2026-11-27T02:00:00.000Z)",
        ),
        (
            &[("since", "an hour")],
            &["--since", "an hour"],
            "is not a duration",
        ),
        (
            &[("status", "broken")],
            &["--status", "broken"],
            "status \"broken\" is not success, failed or a code",
        ),
        (
            &[("status", "9999")],
            &["--status", "9999"],
            "status 9999 is not a code iotfwd logs",
        ),
        (
            &[("limit", "0")],
            &["--limit", "0"],
            "limit 0 is out of range",
        ),
        (
            &[("cursor", "page2")],
            &["--cursor", "page2"],
            "cursor \"page2\" is not one iotfwd gave out",
        ),
        (&[("device", "")], &["--device", ""], "device is empty"),
    ];
    for (params, args, says) in cases {
        let (status, body) = d.logs(params).await;
        assert_eq!(status, 400, "{params:?}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{params:?}: {error}");
        assert!(body.get("records").is_none(), "no result at all: {body}");

        let mut all = vec!["logs", "--db", db];
        all.extend_from_slice(args);
        let out = iotfwd(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // HTTP only: misspelt and repeated parameters.
    let (status, body) = d.logs(&[("devcie", "dev1")]).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown parameter \"devcie\"")
    );
    let (status, body) = d.logs(&[("device", "a"), ("device", "b")]).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("more than once"));
    // Several problems at once, all named.
    let (status, body) = d
        .logs(&[("serviceType", "x"), ("from", "y"), ("limit", "z")])
        .await;
    assert_eq!(status, 400);
    let error = body["error"].as_str().unwrap();
    for part in ["service type \"x\"", "from \"y\"", "limit \"z\""] {
        assert!(error.contains(part), "{error}");
    }
    // A good query that matches nothing is an empty list, and says so on the CLI.
    let (status, body) = d.logs(&[("device", "nobody")]).await;
    assert_eq!((status, body["count"].as_u64()), (200, Some(0)));
    let out = iotfwd(&["logs", "--db", db, "--device", "nobody"]);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("no records match"));
    d.stop().await;

    // A store that does not exist is an error, not an empty result.
    let out = iotfwd(&["logs", "--db", dir.path().join("nope.db").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no record store at"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_daemon_restart_and_go_out_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    write_two_rules(dir.path());
    let jsonl = dir.path().join("outcomes.jsonl");
    let tweak = |c: &mut Config| c.store.jsonl = JsonlTarget::File(jsonl.clone());

    let d = start(dir.path(), tweak).await;
    d.post(json!({"topic": "/p1/dev1/post", "payload": {"t": 40}, "messageId": "before"}))
        .await;
    let before = d.wait_for(&[("messageId", "before")], 4).await;
    d.stop().await;

    let d = start(dir.path(), tweak).await;
    assert_eq!(
        d.wait_for(&[("messageId", "before")], 4).await,
        before,
        "the first run's records, after a restart"
    );
    d.post(json!({"topic": "/p1/dev1/post", "payload": {"t": 1}, "messageId": "after"}))
        .await;
    let after = d.wait_for(&[("messageId", "after")], 2).await;
    let all = d.wait_for(&[("device", "dev1")], 6).await;
    d.stop().await;

    // The JSON lines: one per record of both runs, the platform's field names in order, the
    // same records the store has (oldest first).
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "{text}");
    for line in &lines {
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "time",
                "traceId",
                "messageId",
                "productKey",
                "deviceName",
                "bizCode",
                "operation",
                "code",
                "reason",
                "content",
                "tenantId",
                "instanceId"
            ]
        );
    }
    let mut sorted_lines = lines.clone();
    let mut sorted_store = all.clone();
    let key = |v: &Value| v.to_string();
    sorted_lines.sort_by_key(key);
    sorted_store.sort_by_key(key);
    assert_eq!(sorted_lines, sorted_store);
    assert_eq!(before.len() + after.len(), lines.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_store_says_so() {
    let dir = tempfile::tempdir().unwrap();
    write_two_rules(dir.path());
    let d = start(dir.path(), |c| c.store.enabled = false).await;
    d.post(json!({"topic": "/p1/dev1/post", "payload": {"t": 40}}))
        .await;
    let (status, body) = d.logs(&[]).await;
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("store.enabled = false"),
        "{body}"
    );
    d.stop().await;
    assert!(!dir.path().join("data/outcomes.db").exists());
}

/// `--config` finds the store the daemon's config names.
#[test]
fn cli_reads_the_store_the_config_names() {
    let dir = tempfile::tempdir().unwrap();
    let db: PathBuf = dir.path().join("elsewhere/o.db");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::open(&db, StoreOptions::default(), None).unwrap();
        write_all(&store, &dataset(now_ms())).await;
        store.shutdown().await;
    });
    let config = dir.path().join("iotfwd.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = {:?}\nretention_days = 3\n",
            db.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = iotfwd(&[
        "logs",
        "--config",
        config.to_str().unwrap(),
        "--message-id",
        "m3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 4);
    // A bad [store] section is reported with its line, like every config problem.
    std::fs::write(&config, "[store]\nretention_days = 0\n").unwrap();
    let out = iotfwd(&["logs", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("iotfwd.toml:2:18: store.retention_days: 0 is out of range"),
        "{stderr}"
    );
}
