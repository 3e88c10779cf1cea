//! Robustness of the live surfaces (issue 13; docs/security.md, "Robustness"): generated and
//! mutated input against the real daemon (the binary, as a child process, its log in a file),
//! one case after another:
//! - the HTTP server: raw requests gone wrong (request lines, headers, chunked bodies, sizes),
//!   ingest bodies of every shape, rule tests and record queries with any parameters. Every
//!   message an ingest answer lists must have its records, with its code, in the record store.
//! - the AMQP 1.0 endpoint: raw bytes from the first byte (protocol headers, SASL frames, sizes,
//!   truncation), and after a valid signed login (Open, Begin and other frames, mutated).
//!
//! After each case the daemon must still run and its log must hold no new panic (a panic seen
//! there is counted as the case's); after all of them it must answer `/healthz` and deliver a
//! message to a signed consumer. The case count is `IOTFWD_ROBUST_CASES` (the runner in
//! src/robustness.rs, shared with the unit suites), by default small for `scripts/test`.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fe2o3_amqp::types::definitions::{Handle, Role};
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::messaging::{Source, Target, TargetArchetype};
use fe2o3_amqp::types::performatives::{Attach, Begin, Open, Performative};
use fe2o3_amqp::types::primitives::Symbol;
use fe2o3_amqp::types::primitives::Value as AmqpValue;
use fe2o3_amqp::types::sasl::SaslInit;
use iotfwd::client::{Consumer, ConsumerOptions, describe};
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{ChildDaemon, unique};

#[allow(dead_code)]
#[path = "../../src/robustness.rs"]
mod runner;

use runner::Raw;

const SECRET: &str = "robustness-test-secret";
/// How long a case's socket waits for more of the peer's answer before closing its side.
const LINGER: Duration = Duration::from_millis(20);
/// The sentinel rule's product: no generated topic has a level this long.
const SENTINEL: &str = "sentinelproduct";

/// The daemon under test: a group `g1` hosted on its endpoint, a rule forwarding the sentinel's
/// messages to it, and two rules without actions that read every other message's payload.
async fn start(dir: &Path) -> ChildDaemon {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    for (name, text) in [
        (
            "sentinel",
            format!(
                "sql = '''SELECT * FROM \"/{SENTINEL}/+/post\"'''\n\
                 [[action]]\nto = \"group\"\ngroup = \"g1\"\n"
            ),
        ),
        (
            "read_all",
            "sql = '''SELECT a, items.t.value AS t, payload() AS raw, topic(3) AS l3, \
             upper(s) AS us FROM \"/+/+/#\" WHERE a > 1 OR a IS NULL OR s = 'x' '''\n"
                .to_owned(),
        ),
        ("star", "sql = '''SELECT * FROM \"/p1/+/#\"'''\n".to_owned()),
    ] {
        std::fs::write(rules.join(format!("{name}.toml")), text).unwrap();
    }
    let secret = dir.join("g1.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let path = |p: &Path| format!("{:?}", p.display().to_string());
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 65536\nmax_messages_per_request = 64\n\
         body_timeout_ms = 1000\nheader_timeout_ms = 1000\n\
         [rules]\ndir = {}\n[data]\ndir = {}\n[engine]\nbatch_max_wait_ms = 1\n\
         [subscription]\nlisten = \"127.0.0.1:0\"\nhandshake_timeout_ms = 1000\n\
         attach_timeout_ms = 1000\nmax_pending_connections = 256\nmax_pending_per_ip = 256\n\
         max_auth_failures_per_ip = 1000000\n\
         [[group]]\nid = \"g1\"\naccess_key_id = \"ak-g1\"\nsecret_file = {}\n",
        path(&rules),
        path(&dir.join("data")),
        path(&secret),
    );
    ChildDaemon::start(dir, 1, &config).await
}

/// The index of the first line of `log` that reports a panic (`thread '…' panicked at …`, as
/// the standard panic hook writes it; a payload quoted in a log line cannot start one).
fn panic_line(log: &str) -> Option<usize> {
    log.lines()
        .position(|l| l.starts_with("thread '") && l.contains(" panicked at "))
}

#[test]
fn panic_lines_are_told_from_log_lines_that_quote_one() {
    let log = "2026-11-30T16:20:25Z  WARN iotfwd::outcome: 9320 payload \"thread 'x' panicked at y\"\n\
               thread 'tokio-rt-worker' (1444) panicked at /src/lib.rs:207:5:\n\
               advance out of bounds\n";
    assert_eq!(panic_line(log), Some(1));
    assert_eq!(panic_line("thread 'main' ran\n"), None);
}

/// Watches the daemon between cases: still running, and no new panic in its log.
struct Watch {
    daemon: Mutex<ChildDaemon>,
    offset: Cell<u64>,
}

impl Watch {
    fn new(daemon: ChildDaemon) -> Watch {
        let (_, offset) = daemon.log_from(0);
        Watch {
            daemon: Mutex::new(daemon),
            offset: Cell::new(offset),
        }
    }

    /// What the daemon logged since the last look. Panics (so the runner counts it) when the
    /// daemon panicked since then; `Err` when it is gone.
    fn look(&self) -> Result<String, String> {
        let new = {
            let mut daemon = self.daemon.lock().unwrap();
            if let Some(status) = daemon.child.try_wait().unwrap() {
                return Err(format!("the daemon exited: {status}"));
            }
            let (new, end) = daemon.log_from(self.offset.get());
            self.offset.set(end);
            new
        };
        if let Some(at) = panic_line(&new) {
            // The panic's line, its message and the start of a backtrace, if there is one.
            let what: Vec<&str> = new.lines().skip(at).take(30).collect();
            panic!("the daemon panicked:\n{}", what.join("\n"));
        }
        Ok(new)
    }

    fn into_daemon(self) -> ChildDaemon {
        self.daemon.into_inner().unwrap()
    }
}

/// How a case's socket ended.
enum Ended {
    /// The peer closed it, having answered this.
    Closed(Vec<u8>),
    /// The peer still held it open: the caller decides whether it may.
    Held(TcpStream),
}

/// How much longer a socket held past its case's limit may take to close: the machine may be
/// busy (other builds), and a socket that closes late is not one that never closes.
const GRACE: Duration = Duration::from_secs(11);

/// Writes `bytes` to a new connection to `addr`, reads what the peer answers until it falls
/// silent for [`LINGER`] (so it handles what it was sent before it sees the end), closes the
/// writing half and reads until the peer closes or `limit` passes.
async fn exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Result<Ended, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    // The peer may close (and reset) before it has read everything: not an error here.
    let _ = s.write_all(bytes).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(LINGER, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Ok(Ended::Closed(answer)),
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let _ = s.shutdown().await;
    let read = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(()) => Ok(Ended::Closed(answer)),
        Err(_) => Ok(Ended::Held(s)),
    }
}

/// Whether the peer closes `s` within `limit`.
async fn closes_within(mut s: TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let closed = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, closed).await.is_ok()
}

/// The end of a socket the client closed: closed by the peer, at the latest [`GRACE`] after
/// `limit`; `Err` when it was still open then.
async fn closed(ended: Ended, limit: Duration) -> Result<Vec<u8>, String> {
    match ended {
        Ended::Closed(answer) => Ok(answer),
        Ended::Held(s) => {
            if closes_within(s, GRACE).await {
                Ok(Vec::new())
            } else {
                Err(format!(
                    "the socket was still open {:?} after the client closed its side",
                    limit + GRACE
                ))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP server

/// One HTTP case.
#[derive(Clone, Debug)]
enum HttpCase {
    /// Bytes written to a socket as they are: a request gone wrong.
    Raw(Raw),
    /// `POST /api/v1/messages?verbose=true` with this body.
    Ingest(Raw),
    /// `POST /api/v1/rules/test` with this body.
    RuleTest(Raw),
    /// `GET` of this path and query.
    Get(String),
}

fn ingest_body() -> impl Strategy<Value = Raw> {
    let seeds = vec![
        br#"{"topic":"/p1/d1/user/update","payload":{"a":2,"s":"x","items":{"t":{"value":39}}},"messageId":"m1"}"#.to_vec(),
        b"{\"topic\":\"/p1/d1/up\",\"payload_base64\":\"AAEC\"}\n{\"topic\":\"/p1/d2/up\",\"payload\":[1]}\n".to_vec(),
        b"{\"topic\":\"p1/d1\",\"payload\":{},\"traceId\":\"t1\"}\r\n\r\n{\"topic\":\"/p1/d1/x\",\"payload\":{},\"payload_base64\":\"\"}".to_vec(),
    ];
    prop_oneof![
        3 => runner::envelope().prop_map(|e| Raw(e.to_string().into_bytes())),
        3 => prop::collection::vec(runner::envelope(), 1..5).prop_map(|es| {
            Raw(es.iter().map(|e| format!("{e}\n")).collect::<String>().into_bytes())
        }),
        3 => runner::mutated_bytes(seeds, &[b"\"topic\":", b"\"payload\":", b"\"messageId\":", b"\n"]),
        1 => prop::collection::vec(any::<u8>(), 0..100).prop_map(Raw),
    ]
}

fn rule_test_body() -> impl Strategy<Value = Raw> {
    let sql = runner::mutated_text(
        vec![
            "SELECT a, deviceName() AS d FROM \"/p1/+/#\" WHERE a > 1".to_owned(),
            "SELECT *, topic(2) AS t, timestamp('yyyy-MM-dd') AS day FROM \"/#\"".to_owned(),
        ],
        &[
            "topic(0)", "(", ")", ",", "'", "\"", "WHERE", "FROM", "1e308", "NULL", "*",
        ],
    );
    let test = (
        prop::option::of(sql),
        prop::option::of(prop::sample::select(vec!["read_all", "star", "sentinel", "nope"])),
        runner::topic(),
        prop_oneof![runner::json(), runner::text().prop_map(Value::String)],
        prop::option::of(any::<i64>()),
    )
        .prop_map(|(sql, rule, topic, payload, timestamp)| {
            Raw(json!({"sql": sql, "rule": rule, "topic": topic, "payload": payload, "timestamp": timestamp})
                .to_string()
                .into_bytes())
        });
    let seeds = vec![br#"{"rule":"read_all","topic":"/p1/d/x","payload":"{\"a\":2}"}"#.to_vec()];
    prop_oneof![
        3 => test,
        1 => runner::mutated_bytes(seeds, &[b"\"payloadBase64\":", b"\"sql\":"]),
    ]
}

/// A record query: a route and parameters with generated values.
fn query() -> impl Strategy<Value = String> {
    let route = prop::sample::select(vec![
        "/api/v1/logs?",
        "/api/v1/stats?",
        "/api/v1/dlq?",
        "/api/v1/trace/",
        "/api/v1/rules?",
        "/api/v1/health?",
        "/api/v1/codes?",
        "/console?",
        "/readyz?",
    ]);
    let key = prop::sample::select(vec![
        "status",
        "since",
        "from",
        "to",
        "limit",
        "cursor",
        "device",
        "product",
        "traceId",
        "messageId",
        "keyword",
        "serviceType",
        "by",
        "bucket",
        "rule",
        "code",
        "x",
    ]);
    let value = prop_oneof![
        3 => prop::sample::select(vec![
            "failed", "success", "9325", "1903", "200", "0", "-1", "1h", "15m", "0s", "99999d",
            "2026-01-01T00:00:00Z", "9999-99-99", "100000", "ruleengine", "uplink", "code",
        ])
        .prop_map(str::to_owned),
        2 => runner::text(),
    ];
    (route, prop::collection::vec((key, value), 0..4)).prop_map(|(route, params)| {
        let encode =
            |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        if route.ends_with('/') {
            let id = params
                .first()
                .map_or("x".to_owned(), |(_, v)| encode(v).replace('+', "%20"));
            format!("{route}{id}")
        } else {
            format!("{route}{}", query.join("&"))
        }
    })
}

/// Requests as clients send them, and the bytes worth inserting into them.
fn raw_request() -> impl Strategy<Value = Raw> {
    let body = br#"{"topic":"/p1/d1/up","payload":{"a":2}}"#;
    let seeds = vec![
        [
            format!(
                "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            body,
        ]
        .concat(),
        [
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(),
            format!("{:x}\r\n", body.len()).as_bytes(),
            body,
            b"\r\n0\r\n\r\n",
        ]
        .concat(),
        b"GET /api/v1/logs?status=1903&limit=5 HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"POST /api/v1/rules/test HTTP/1.1\r\nHost: x\r\nContent-Length: 45\r\n\r\n{\"rule\":\"star\",\"topic\":\"/p1/d/x\",\"payload\":1}".to_vec(),
        b"GET /api/v1/trace/%ff%00 HTTP/1.0\r\n\r\n".to_vec(),
    ];
    prop_oneof![
        8 => runner::mutated_bytes(
            seeds,
            &[
                b"\r\n",
                b"\r\n\r\n",
                b"Content-Length: 18446744073709551616\r\n",
                b"Content-Length: 5\r\nContent-Length: 6\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"ffffffffffffffff\r\n",
                b"0\r\n\r\n",
                b"Expect: 100-continue\r\n",
                b"Connection: keep-alive\r\n",
                b"Authorization: Bearer \xff\r\n",
                b" HTTP/1.1",
                b"HTTP/2.0",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                b"%00",
                b"?verbose=true",
                b"/../../",
            ],
        ),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Raw),
    ]
}

fn http_case() -> impl Strategy<Value = HttpCase> {
    prop_oneof![
        3 => raw_request().prop_map(HttpCase::Raw),
        4 => ingest_body().prop_map(HttpCase::Ingest),
        1 => rule_test_body().prop_map(HttpCase::RuleTest),
        1 => query().prop_map(HttpCase::Get),
    ]
}

/// The records of one message: those with its message id and trace id.
async fn records_of(
    client: &reqwest::Client,
    base: &str,
    message_id: &str,
    trace_id: &str,
) -> Result<Vec<Value>, String> {
    let url = url::Url::parse_with_params(
        &format!("{base}/api/v1/logs"),
        [
            ("messageId", message_id),
            ("traceId", trace_id),
            ("limit", "1000"),
        ],
    )
    .unwrap();
    let r = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET /api/v1/logs: {e}"))?;
    let status = r.status();
    let body: Value = r
        .json()
        .await
        .map_err(|e| format!("GET /api/v1/logs: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "GET /api/v1/logs for {message_id:?}: {status} {body}"
        ));
    }
    Ok(body["records"].as_array().cloned().unwrap_or_default())
}

/// Whether `records` hold one of service type `biz` with `code` whose operation is `operation`
/// (when given).
fn holds(records: &[Value], biz: &str, code: u64, operation: Option<&str>) -> bool {
    records.iter().any(|r| {
        r["bizCode"] == biz
            && r["code"].as_u64() == Some(code)
            && operation.is_none_or(|op| r["operation"] == op)
    })
}

/// An ingest answer: 200 with a report whose every message is recorded with its code and
/// whose every rule result is recorded with its code; or a 400/413 saying why.
async fn check_ingest(
    client: &reqwest::Client,
    base: &str,
    status: u16,
    answer: &Value,
    seen: &runner::Seen,
) -> Result<(), String> {
    match status {
        400 | 413
            if answer["error"]
                .as_str()
                .is_some_and(|e| !e.trim().is_empty()) =>
        {
            seen.count(format!("refused-{status}"));
            return Ok(());
        }
        200 => {}
        _ => return Err(format!("answered {status}: {answer}")),
    }
    let messages = answer["messages"]
        .as_array()
        .ok_or("no messages in the report")?;
    for m in messages {
        let code = m["code"].as_u64().ok_or("a message without a code")?;
        let (id, trace) = (
            m["messageId"].as_str().unwrap_or_default(),
            m["traceId"].as_str().unwrap_or_default(),
        );
        if id.is_empty() || trace.is_empty() {
            return Err(format!(
                "a message without ids to look its records up by: {m}"
            ));
        }
        let records = records_of(client, base, id, trace).await?;
        if !matches!(code, 200 | 1903 | 9321) || !holds(&records, "uplink", code, None) {
            return Err(format!(
                "message {m}: its uplink {code} is not among its records {records:?}"
            ));
        }
        seen.count(format!("message-{code}"));
        for rule in m["rules"].as_array().into_iter().flatten() {
            let name = rule["rule"].as_str().unwrap_or_default();
            let want = match (rule["result"].as_str(), rule["code"].as_u64()) {
                (Some("failed"), Some(code @ (9307 | 9320))) => {
                    seen.count(format!("rule-{code}"));
                    code
                }
                (Some("passed"), _) => 200,
                (Some("no_result"), _) => continue,
                _ => return Err(format!("rule result {rule} of {m}")),
            };
            if !holds(&records, "ruleengine", want, Some(name)) {
                return Err(format!(
                    "rule {name} gave {want} for {m}, which is not among its records {records:?}"
                ));
            }
        }
    }
    Ok(())
}

async fn http_case_check(
    client: &reqwest::Client,
    base: &str,
    case: HttpCase,
    seen: &runner::Seen,
) -> Result<(), String> {
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let (path, body) = match case {
        HttpCase::Raw(Raw(bytes)) => {
            let limit = Duration::from_secs(5);
            let answer = closed(exchange(addr, &bytes, limit).await?, limit).await?;
            if !answer.is_empty() && !answer.starts_with(b"HTTP/1.") {
                return Err(format!("answered {:?}", Raw(answer)));
            }
            if answer.starts_with(b"HTTP/1.1 5") || answer.starts_with(b"HTTP/1.0 5") {
                return Err(format!("answered {:?}", Raw(answer)));
            }
            let status = answer.get(9..12).map(String::from_utf8_lossy);
            seen.count(format!("raw-{}", status.as_deref().unwrap_or("closed")));
            return Ok(());
        }
        HttpCase::Get(path) => {
            let r = client
                .get(format!("{base}{path}"))
                .send()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let status = r.status();
            if status.is_server_error() {
                return Err(format!("GET {path}: {status} {:?}", r.text().await));
            }
            seen.count(format!("get-{}", status.as_u16()));
            return Ok(());
        }
        HttpCase::Ingest(Raw(body)) => ("/api/v1/messages?verbose=true", body),
        HttpCase::RuleTest(Raw(body)) => ("/api/v1/rules/test", body),
    };
    let r = client
        .post(format!("{base}{path}"))
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {path}: {e}"))?;
    let status = r.status().as_u16();
    let text = r.text().await.map_err(|e| format!("POST {path}: {e}"))?;
    let answer: Value = serde_json::from_str(&text)
        .map_err(|e| format!("POST {path}: {status} answered {text:?}, not JSON: {e}"))?;
    if path == "/api/v1/rules/test" {
        return match status {
            200 if answer["result"].is_string() => {
                seen.count(format!("ruletest-{}", answer["result"].as_str().unwrap()));
                Ok(())
            }
            400 | 404 if answer["error"].is_string() => {
                seen.count(format!("ruletest-{status}"));
                Ok(())
            }
            _ => Err(format!("POST {path}: {status} {answer}")),
        };
    }
    check_ingest(client, base, status, &answer, seen).await
}

/// Posts one message to the sentinel rule and checks a signed consumer of `g1` receives it.
async fn delivers_to_a_signed_consumer(daemon: &ChildDaemon) {
    let endpoint = daemon.amqp.expect("the endpoint listens");
    let mut o = ConsumerOptions::new(&format!("amqp://{endpoint}"), "g1", "ak-g1", SECRET);
    o.client_id = unique("robust");
    let mut consumer = tokio::time::timeout(Duration::from_secs(10), Consumer::connect(&o))
        .await
        .expect("the consumer connects within 10 s")
        .expect("the signed consumer logs in");
    let device = unique("dev").replace('-', "");
    let body = json!({"topic": format!("/{SENTINEL}/{device}/post"), "payload": {"n": 1}});
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/messages", daemon.base))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let d = tokio::time::timeout(
        Duration::from_secs(10),
        consumer.receiver.recv::<Body<AmqpValue>>(),
    )
    .await
    .expect("a delivery within 10 s")
    .expect("the link is up");
    consumer.receiver.accept(&d).await.unwrap();
    assert_eq!(describe(&d)["properties"]["deviceName"], device.as_str());
    consumer.close().await;
}

/// After a suite: the daemon runs, answers `/healthz`, delivers to a signed consumer, has no
/// 9399 (a panic caught while evaluating) on record and no panic in its log.
async fn still_serves(mut daemon: ChildDaemon, suite: &str) {
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited"
    );
    let health = reqwest::get(format!("{}/healthz", daemon.base))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    delivers_to_a_signed_consumer(&daemon).await;
    let internal: Value = reqwest::get(format!("{}/api/v1/logs?status=9399", daemon.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(internal["count"], 0, "9399 records: {internal}");
    let log = daemon.log_text();
    assert!(
        panic_line(&log).is_none(),
        "the daemon's log shows a panic:\n{log}"
    );
    println!(
        "robustness: {suite} the daemon still serves: /healthz 200, a signed consumer received"
    );
    daemon.kill_9();
}

/// Robustness of the HTTP server and the ingest: every case handled without a panic, every
/// message of every answer recorded with its code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robustness_http_server() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path()).await;
    let base = daemon.base.clone();
    let watch = Watch::new(daemon);
    let handle = tokio::runtime::Handle::current();
    let started = Instant::now();
    let watch = tokio::task::spawn_blocking(move || {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        let seen = runner::Seen::default();
        runner::run("http-server", 1000, http_case(), |case| {
            let result = handle.block_on(http_case_check(&client, &base, case, &seen));
            watch.look()?;
            result
        });
        seen.print("http-server");
        watch
    })
    .await
    .unwrap();
    println!(
        "robustness: http-server in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    still_serves(watch.into_daemon(), "http-server").await;
}

// ---------------------------------------------------------------------------------------------
// The AMQP 1.0 endpoint

/// One AMQP case: bytes from the socket's first byte, after a valid signed login, or after a
/// valid login and Open.
#[derive(Clone, Debug)]
enum AmqpCase {
    Raw(Raw),
    LoggedIn(Raw),
    Opened(Raw),
}

/// A frame: size, data offset 2, `kind` (0 AMQP, 1 SASL), channel, body.
fn frame(kind: u8, channel: u16, body: &[u8]) -> Vec<u8> {
    let mut f = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[2, kind]);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(body);
    f
}

const SASL_HEADER: &[u8] = b"AMQP\x03\x01\x00\x00";
const AMQP_HEADER: &[u8] = b"AMQP\x00\x01\x00\x00";

/// The SASL header and a PLAIN init frame for this login.
fn sasl_login(username: &str, password: &str) -> Vec<u8> {
    let init = SaslInit {
        mechanism: Symbol::from("PLAIN"),
        initial_response: Some(serde_amqp::primitives::Binary::from(
            format!("\0{username}\0{password}").into_bytes(),
        )),
        hostname: None,
    };
    [
        SASL_HEADER,
        &frame(1, 0, &serde_amqp::to_vec(&init).unwrap()),
    ]
    .concat()
}

/// The AMQP header and an Open announcing a 60 s idle time-out.
fn open() -> Vec<u8> {
    let open = Open {
        container_id: "fuzz".into(),
        hostname: Some("127.0.0.1".into()),
        max_frame_size: Default::default(),
        channel_max: Default::default(),
        idle_time_out: Some(60_000),
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    [
        AMQP_HEADER,
        &frame(
            0,
            0,
            &serde_amqp::to_vec(&Performative::Open(open)).unwrap(),
        ),
    ]
    .concat()
}

/// A Begin and the Attach of a receiving link from group g1, as a consumer sends them.
fn begin_and_attach() -> Vec<u8> {
    let begin = Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 100,
        outgoing_window: 100,
        handle_max: Default::default(),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    let attach = Attach {
        name: "fuzz-link".into(),
        handle: Handle(0),
        role: Role::Receiver,
        snd_settle_mode: Default::default(),
        rcv_settle_mode: Default::default(),
        source: Some(Box::new(Source::builder().address("g1").build())),
        target: Some(Box::new(TargetArchetype::Target(Target::builder().build()))),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: None,
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    [
        frame(
            0,
            0,
            &serde_amqp::to_vec(&Performative::Begin(begin)).unwrap(),
        ),
        frame(
            0,
            0,
            &serde_amqp::to_vec(&Performative::Attach(attach)).unwrap(),
        ),
    ]
    .concat()
}

/// A frame that declares fewer bytes than its own 8-byte header, in the SASL exchange and
/// after a login: the endpoint closes the socket and nothing panics. (The AMQP library's frame
/// decoders panicked on one; the suite below found it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_shorter_than_its_header_closes_the_socket_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path()).await;
    let endpoint = daemon.amqp.expect("the endpoint listens");
    let url = format!("amqp://{endpoint}");
    for size in 0..8u32 {
        let short = [
            &size.to_be_bytes()[..],
            &vec![2; size.saturating_sub(4) as usize],
        ]
        .concat();
        let mut o = ConsumerOptions::new(&url, "g1", "ak-g1", SECRET);
        o.client_id = unique("short");
        let (user, pass) = o.credentials();
        for bytes in [
            [SASL_HEADER, &short].concat(),
            [
                sasl_login(&user, &pass),
                AMQP_HEADER.to_vec(),
                short.clone(),
            ]
            .concat(),
        ] {
            let limit = Duration::from_secs(4);
            let ended = exchange(endpoint, &bytes, limit).await.unwrap();
            closed(ended, limit)
                .await
                .unwrap_or_else(|e| panic!("size {size}: {e}"));
        }
    }
    still_serves(daemon, "short-frames").await;
}

/// What the endpoint logs about a socket, and the label it is counted under.
const ENDPOINT_LOG: &[(&str, &str)] = &[
    ("AMQP 1.0 login refused", "login-refused"),
    ("connection failed before open", "failed-before-open"),
    ("handshake timed out", "handshake-timeout"),
    ("without SASL refused", "no-sasl"),
    ("consumer connected", "connected"),
    ("consumer refused", "refused-after-login"),
    ("consumer left before attaching", "left-before-attach"),
    ("no receiving link attached", "attach-timeout"),
    ("consumer disconnected", "disconnected"),
];

fn amqp_case(stale_login: Vec<u8>) -> impl Strategy<Value = AmqpCase> {
    let fragments: &'static [&'static [u8]] = &[
        b"AMQP\x00\x01\x00\x00",
        b"AMQP\x02\x01\x00\x00",
        b"AMQP\x03\x01\x00\x00",
        b"\xff\xff\xff\xff",
        b"\x00\x00\x00\x08\x02\x00\x00\x00",
        b"\x00\x00\x00\x00",
        b"\x00\x53\x10",
        b"\x00\x53\x11",
        b"\x00\x53\x12",
        b"\x00\x53\x13",
        b"\x00\x53\x41",
        b"\xb0\xff\xff\xff\xff",
        b"\xd0\xff\xff\xff\xff\x7f\xff\xff\xff",
        b"\xa3\xff",
    ];
    let session = [open(), begin_and_attach()].concat();
    let whole = [stale_login.clone(), session.clone()].concat();
    let any_bytes = || prop::collection::vec(any::<u8>(), 0..128).prop_map(Raw);
    let header = prop::sample::select(vec![SASL_HEADER, AMQP_HEADER, b"AMQP\x02\x01\x00\x00"]);
    let before = prop_oneof![
        6 => runner::mutated_bytes(vec![whole, stale_login, session.clone()], fragments),
        1 => any_bytes(),
        1 => (header, prop::collection::vec(any::<u8>(), 0..128))
            .prop_map(|(h, rest)| Raw([h, &rest].concat())),
    ];
    let after = prop_oneof![
        6 => runner::mutated_bytes(vec![session], fragments),
        1 => any_bytes(),
    ];
    let opened = prop_oneof![
        6 => runner::mutated_bytes(vec![begin_and_attach()], fragments),
        1 => any_bytes(),
    ];
    prop_oneof![
        2 => before.prop_map(AmqpCase::Raw),
        1 => after.prop_map(AmqpCase::LoggedIn),
        1 => opened.prop_map(AmqpCase::Opened),
    ]
}

/// Robustness of the AMQP 1.0 endpoint: raw bytes before and after a signed login, each
/// socket closed by the endpoint within its time-outs, the daemon running on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robustness_amqp_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path()).await;
    let endpoint = daemon.amqp.expect("the endpoint listens");
    let url = format!("amqp://{endpoint}");
    // A login signed long ago: refused, but every byte of it well-formed.
    let mut stale = ConsumerOptions::new(&url, "g1", "ak-g1", SECRET);
    stale.timestamp_ms = Some(1_700_000_000_000);
    let (user, pass) = stale.credentials();
    let stale_login = sasl_login(&user, &pass);
    let watch = Watch::new(daemon);
    let handle = tokio::runtime::Handle::current();
    let started = Instant::now();
    let watch = tokio::task::spawn_blocking(move || {
        let seen = runner::Seen::default();
        runner::run("amqp-endpoint", 1000, amqp_case(stale_login), |case| {
            let login = || {
                let mut o = ConsumerOptions::new(&url, "g1", "ak-g1", SECRET);
                o.client_id = "fuzz".into();
                let (user, pass) = o.credentials();
                sasl_login(&user, &pass)
            };
            let bytes = match case {
                AmqpCase::Raw(Raw(bytes)) => bytes,
                AmqpCase::LoggedIn(Raw(bytes)) => [login(), bytes].concat(),
                AmqpCase::Opened(Raw(bytes)) => [login(), open(), bytes].concat(),
            };
            // The handshake and the attach time-outs are 1 s each.
            let limit = Duration::from_secs(4);
            let ended = handle.block_on(exchange(endpoint, &bytes, limit))?;
            let logged = watch.look()?;
            for line in logged.lines() {
                if let Some((_, what)) = ENDPOINT_LOG.iter().find(|(text, _)| line.contains(text)) {
                    seen.count(*what);
                }
            }
            match ended {
                Ended::Closed(_) => Ok(()),
                // A consumer whose link attached may stay as long as it likes (the endpoint has
                // no idle time-out of its own, see endpoint.rs), even with its side closed.
                Ended::Held(_)
                    if logged.contains("consumer connected")
                        && !logged.contains("left before attaching") =>
                {
                    seen.count("attached-and-held");
                    Ok(())
                }
                held => {
                    seen.count("closed-late");
                    handle
                        .block_on(closed(held, limit))
                        .map(|_| ())
                        .map_err(|e| {
                            format!(
                                "{e}; the daemon logged meanwhile:\n{logged}{}",
                                watch.look().unwrap_or_default()
                            )
                        })
                }
            }
        });
        seen.print("amqp-endpoint");
        (watch, seen.get("refused-after-login"))
    })
    .await
    .unwrap();
    let (watch, refused_after_login) = watch;
    let daemon = watch.into_daemon();
    // Each connection refused after its login (idle time-out out of range: 9601; the group
    // full: 9600) is on record with its code; the records are committed in batches, so the
    // count may take a moment to catch up with the log.
    let stats_url = format!(
        "{}/api/v1/stats?since=24h&by=code&serviceType=ServerSubscribe",
        daemon.base
    );
    let mut last = (0, 0);
    let agreed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let logged = daemon.log_text().matches("consumer refused").count() as u64;
            let stats: Value = reqwest::get(&stats_url)
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let recorded: u64 = (stats["groups"].as_array().unwrap().iter())
                .filter(|g| g["key"] == "9600" || g["key"] == "9601")
                .map(|g| g["total"].as_u64().unwrap())
                .sum();
            last = (logged, recorded);
            if logged == recorded {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        agreed.is_ok(),
        "connections refused after their login: {} in the log, {} on record",
        last.0,
        last.1
    );
    assert!(refused_after_login <= last.0);
    let metrics = daemon.metrics().await;
    let refused: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("iotfwd_endpoint_refused_total")
                || l.starts_with("iotfwd_group_auth_failures_total")
        })
        .collect();
    println!(
        "robustness: amqp-endpoint in {:.1} s; {}",
        started.elapsed().as_secs_f64(),
        refused.join("; ")
    );
    still_serves(daemon, "amqp-endpoint").await;
}
