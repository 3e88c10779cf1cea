//! Security (issue 13): bearer tokens and their scopes against the real daemon over real HTTP,
//! the refusal of an anonymous listener beyond loopback by `iotfwd check` and `iotfwd run`
//! (the real binary), identity overrides on the AMQP source (the shared RabbitMQ) and on the
//! HTTP ingest, and the bounds on work per client (concurrent queries, slow clients).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use iotfwd::config::{Config, Scope, TokenConfig};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{BROKER, Daemon, eventually, metric, unique};

const INGEST: &str = "ingest-0123456789abcdef0123456789";
const GATEWAY: &str = "gateway-0123456789abcdef01234567";
const READ: &str = "read-0123456789abcdef0123456789ab";
const ADMIN: &str = "admin-0123456789abcdef0123456789a";

/// Each token in a file of `dir` (as a mounted Secret would be), added to `config`.
fn tokens(config: &mut Config, dir: &Path) {
    for (name, value, scopes) in [
        ("ingest", INGEST, vec![Scope::Ingest]),
        ("gateway", GATEWAY, vec![Scope::IngestAnyIdentity]),
        ("reader", READ, vec![Scope::Read]),
        ("ops", ADMIN, vec![Scope::Admin]),
    ] {
        let file = dir.join(format!("{name}.token"));
        std::fs::write(&file, format!("{value}\n")).unwrap();
        config.http.token.push(TokenConfig {
            name: name.into(),
            scopes,
            token_env: None,
            token_file: Some(file),
        });
    }
}

/// `method path` with `token` (if any) and `body`: (status, body as JSON or string, the
/// WWW-Authenticate header).
async fn call(
    d: &Daemon,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value, Option<String>) {
    let client = reqwest::Client::new();
    let url = format!("{}{path}", d.base);
    let mut req = match method {
        "GET" => client.get(url),
        _ => client.post(url).body(body.to_owned()),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        challenge,
    )
}

fn write_rule(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

const PK_RULE: &str = "sql = '''SELECT productKey() AS pk, deviceName() AS dn, tenantId() AS tenant \
    FROM \"/p1/+/post\"'''\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_answers_401_403_or_200_by_scope() {
    let dir = tempfile::tempdir().unwrap();
    write_rule(dir.path(), "pk", PK_RULE);
    let secrets = tempfile::tempdir().unwrap();
    let d = Daemon::start_without_broker(dir.path(), |c| tokens(c, secrets.path())).await;
    let msg = r#"{"topic":"/p1/d1/post","payload":{"t":1},"messageId":"sec-m1"}"#;

    // Ingest: no token, a wrong one, one without the scope, then the right ones.
    let (s, body, challenge) = call(&d, "POST", "/api/v1/messages", None, msg).await;
    assert_eq!((s, challenge.as_deref()), (401, Some("Bearer")), "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"),
        "{body}"
    );
    let wrong = format!("{INGEST}x");
    let (s, body, _) = call(&d, "POST", "/api/v1/messages", Some(&wrong), msg).await;
    assert_eq!(s, 401, "{body}");
    let (s, body, _) = call(&d, "POST", "/api/v1/messages", Some(READ), msg).await;
    assert_eq!(s, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("\"reader\" lacks the scope \"ingest\""),
        "{body}"
    );
    let (s, body, _) = call(&d, "POST", "/api/v1/messages", Some(INGEST), msg).await;
    assert_eq!((s, body["accepted"].as_u64()), (200, Some(1)), "{body}");
    let (s, body, _) = call(&d, "POST", "/api/v1/messages", Some(GATEWAY), msg).await;
    assert_eq!(s, 200, "ingest:any-identity grants ingest: {body}");

    // The token is checked before the body is read: no buffering for a caller without one.
    let addr = d.base.trim_start_matches("http://").to_owned();
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(2), raw.read_exact(&mut head))
        .await
        .expect("answered before the body arrived")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
    drop(raw);

    // Reading: logs, trace, stats, rules, health, codes need `read`.
    for path in [
        "/api/v1/logs?messageId=sec-m1",
        "/api/v1/trace/sec-m1",
        "/api/v1/stats",
        "/api/v1/rules",
        "/api/v1/health",
        "/api/v1/codes",
    ] {
        assert_eq!(call(&d, "GET", path, None, "").await.0, 401, "{path}");
        assert_eq!(
            call(&d, "GET", path, Some(INGEST), "").await.0,
            403,
            "{path}"
        );
        assert_eq!(
            call(&d, "GET", path, Some(ADMIN), "").await.0,
            403,
            "{path}"
        );
        let (s, body, _) = call(&d, "GET", path, Some(READ), "").await;
        assert_eq!(s, 200, "{path}: {body}");
    }

    // Reload needs `admin`.
    let reload = "/api/v1/rules/reload";
    assert_eq!(call(&d, "POST", reload, None, "").await.0, 401);
    assert_eq!(call(&d, "POST", reload, Some(READ), "").await.0, 403);
    let (s, body, _) = call(&d, "POST", reload, Some(ADMIN), "").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["reload"]["result"], "success", "{body}");

    // Open: the probes, /metrics (metrics_auth is off) and the console's page.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/console",
        "/console/assets/api.js",
    ] {
        assert_eq!(d.get(path).await.0, 200, "{path}");
    }

    // Counted by token name and reason, never by value.
    let scrape = d.metrics().await;
    let refused = |token: &str, reason: &str| {
        metric(
            &scrape,
            "iotfwd_http_auth_refused_total",
            &[("token", token), ("reason", reason)],
        )
    };
    assert_eq!(refused("-", "missing"), 1.0 + 1.0 + 6.0 + 1.0);
    assert_eq!(refused("-", "invalid"), 1.0);
    assert_eq!(refused("reader", "scope"), 2.0);
    assert_eq!(refused("ingest", "scope"), 6.0);
    assert_eq!(refused("ops", "scope"), 6.0);
    for secret in [INGEST, GATEWAY, READ, ADMIN] {
        assert!(!scrape.contains(secret));
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_auth_puts_metrics_behind_read() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let d = Daemon::start_without_broker(dir.path(), |c| {
        tokens(c, secrets.path());
        c.http.metrics_auth = true;
    })
    .await;
    assert_eq!(call(&d, "GET", "/metrics", None, "").await.0, 401);
    assert_eq!(call(&d, "GET", "/metrics", Some(INGEST), "").await.0, 403);
    let (s, body, _) = call(&d, "GET", "/metrics", Some(READ), "").await;
    assert_eq!(s, 200);
    assert!(
        body.as_str()
            .unwrap()
            .contains("iotfwd_http_auth_refused_total")
    );
    assert_eq!(d.get("/healthz").await.0, 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_identity_is_taken_only_from_a_token_that_may_speak_for_any_device() {
    let dir = tempfile::tempdir().unwrap();
    write_rule(dir.path(), "pk", PK_RULE);
    let secrets = tempfile::tempdir().unwrap();
    let d = Daemon::start_without_broker(dir.path(), |c| tokens(c, secrets.path())).await;
    let spoof = r#"{"topic":"/p1/d1/post","payload":{"t":1},"productKey":"victim","deviceName":"d9","tenantId":"t9"}"#;
    let path = "/api/v1/messages?verbose=true";
    let output = |body: &Value| body["messages"][0]["rules"][0]["output"].clone();

    let (s, body, _) = call(&d, "POST", path, Some(INGEST), spoof).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        output(&body),
        json!({"pk": "p1", "dn": "d1", "tenant": null}),
        "{body}"
    );
    let ignored = |scrape: &str| {
        metric(
            scrape,
            "iotfwd_identity_override_ignored_total",
            &[("source", "http")],
        )
    };
    assert_eq!(ignored(&d.metrics().await), 1.0);

    let (s, body, _) = call(&d, "POST", path, Some(GATEWAY), spoof).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        output(&body),
        json!({"pk": "victim", "dn": "d9", "tenant": "t9"}),
        "{body}"
    );
    // An envelope without overrides is not counted.
    let plain = r#"{"topic":"/p1/d1/post","payload":{"t":1}}"#;
    assert_eq!(call(&d, "POST", path, Some(INGEST), plain).await.0, 200);
    assert_eq!(ignored(&d.metrics().await), 1.0);
    d.stop().await;
}

fn iotfwd(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(crate::harness::daemon_binary());
    cmd.args(args).current_dir(cwd).env_remove("IOTFWD_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_and_run_refuse_an_anonymous_listener_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    // Nothing binds it: both commands refuse the config before they listen.
    let port = 0;
    let file = dir.path().join("iotfwd.toml");
    let base = format!(
        "[rules]\ndir = \"rules\"\n[data]\ndir = \"data\"\n[subscription]\nenabled = false\n[http]\nlisten = \"0.0.0.0:{port}\"\n"
    );
    std::fs::write(&file, &base).unwrap();
    let config = file.to_str().unwrap();

    let check = iotfwd(&["check", "--config", config], dir.path(), &[]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check.stderr));
    let err = text(&check.stderr);
    assert!(
        err.contains(&format!(
            "iotfwd.toml:8:10: http.listen: 0.0.0.0:{port} is reachable from other machines"
        )),
        "{err}"
    );
    assert!(
        err.contains("[[http.token]]") && err.contains("http.allow_anonymous = true"),
        "{err}"
    );

    let run = iotfwd(&["run", "--config", config], dir.path(), &[]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains("http.listen: 0.0.0.0"),
        "{}",
        text(&run.stderr)
    );
    assert!(text(&run.stderr).contains("nothing started"));

    // Said explicitly, it is allowed.
    std::fs::write(&file, format!("{base}allow_anonymous = true\n")).unwrap();
    let check = iotfwd(&["check", "--config", config], dir.path(), &[]);
    assert!(check.status.success(), "{}", text(&check.stderr));

    // A token whose env variable is missing: check warns, run does not start and names it.
    std::fs::write(
        &file,
        format!(
            "{base}[[http.token]]\nname = \"ops\"\nscopes = [\"admin\"]\ntoken_env = \"IOTFWD_SECURITY_TEST_UNSET\"\n"
        )
        .replace(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let check = iotfwd(&["check", "--config", config], dir.path(), &[]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(
        text(&check.stderr).contains("warning: http.token[0] (\"ops\"): token_env: environment variable IOTFWD_SECURITY_TEST_UNSET is not set"),
        "{}",
        text(&check.stderr)
    );
    let run = iotfwd(&["run", "--config", config], dir.path(), &[]);
    assert_eq!(run.status.code(), Some(1), "{}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains("http.token[0] (\"ops\"): token_env: environment variable IOTFWD_SECURITY_TEST_UNSET is not set"),
        "{}",
        text(&run.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_takes_a_token_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let d = Daemon::start_without_broker(dir.path(), |c| tokens(c, secrets.path())).await;
    let base = d.base.clone();
    let cwd = dir.path().to_owned();
    let (without, with) = tokio::task::spawn_blocking(move || {
        let args = [
            "send",
            "--topic",
            "/p1/d1/post",
            "--payload",
            "{\"t\":1}",
            "--url",
            &base,
        ];
        (
            iotfwd(&args, &cwd, &[]),
            iotfwd(&args, &cwd, &[("IOTFWD_TOKEN", INGEST)]),
        )
    })
    .await
    .unwrap();
    assert_eq!(without.status.code(), Some(1));
    assert!(
        text(&without.stderr).contains("--token or set IOTFWD_TOKEN"),
        "{}",
        text(&without.stderr)
    );
    assert!(with.status.success(), "{}", text(&with.stderr));
    assert!(
        text(&with.stdout).contains("\"accepted\": 1"),
        "{}",
        text(&with.stdout)
    );
    d.stop().await;
}

/// Publishes one message with a spoofed identity to `queue` and returns the uplink record of it.
async fn spoofed_uplink(d: &Daemon, queue: &str, message_id: &str) -> Value {
    let headers = [
        ("topic", "/p1/honest/post"),
        ("productKey", "victim"),
        ("deviceName", "someone-else"),
        ("tenantId", "t-victim"),
    ];
    uplink_of(d, queue, &headers, message_id).await
}

/// Publishes one message with these headers and message id to `queue` and returns the uplink
/// record of it.
async fn uplink_of(d: &Daemon, queue: &str, given: &[(&str, &str)], message_id: &str) -> Value {
    let conn = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    for (k, v) in given {
        headers.insert((*k).into(), AMQPValue::LongString((*v).into()));
    }
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        b"{\"t\":1}",
        BasicProperties::default()
            .with_headers(headers)
            .with_message_id(message_id.into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let path = format!("/api/v1/logs?messageId={message_id}&serviceType=uplink");
    eventually("the uplink record", || async {
        let body = d.get_json(&path).await;
        body["records"].as_array().and_then(|r| r.first().cloned())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_identity_headers_are_ignored_and_counted_unless_trusted() {
    for trust in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let queue = unique("identity");
        let q = queue.clone();
        let d = Daemon::start(dir.path(), |c| {
            c.source.amqp = Some(iotfwd::config::broker::AmqpSourceConfig {
                queue: q,
                prefetch: 10,
                declare: true,
                topic_from: iotfwd::config::broker::TopicFrom::Header,
                trust_identity_headers: trust,
                queue_type: Default::default(),
            });
        })
        .await;
        d.wait_ready().await;
        // The source declares its queue once it is consuming.
        let conn = Connection::connect(BROKER, ConnectionProperties::default())
            .await
            .unwrap();
        // A passive declare of a missing queue closes its channel: one channel per look.
        eventually("the source queue's consumer", || {
            let (conn, queue) = (&conn, queue.clone());
            async move {
                let ch = conn.create_channel().await.ok()?;
                let q = ch
                    .queue_declare(
                        queue.as_str().into(),
                        lapin::options::QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .ok()?;
                let _ = ch.close(200, "".into()).await;
                (q.consumer_count() > 0).then_some(())
            }
        })
        .await;
        let record = spoofed_uplink(&d, &queue, &unique("m")).await;
        let ignored = metric(
            &d.metrics().await,
            "iotfwd_identity_override_ignored_total",
            &[("source", "amqp")],
        );
        if trust {
            assert_eq!(record["productKey"], "victim", "{record}");
            assert_eq!(record["deviceName"], "someone-else", "{record}");
            assert_eq!(record["tenantId"], "t-victim", "{record}");
            assert_eq!(ignored, 0.0);
        } else {
            assert_eq!(record["productKey"], "p1", "{record}");
            assert_eq!(record["deviceName"], "honest", "{record}");
            assert!(
                record["tenantId"].is_null() || record["tenantId"] == "",
                "{record}"
            );
            assert_eq!(ignored, 1.0);
            // No topic header: 1903, on record under the ids the message came with.
            let id = unique("no-topic");
            let record = uplink_of(&d, &queue, &[("traceId", "trace-no-topic")], &id).await;
            assert_eq!(
                (&record["code"], &record["messageId"], &record["traceId"]),
                (&json!(1903), &json!(id), &json!("trace-no-topic")),
                "{record}"
            );
        }
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_beyond_the_limit_are_429() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_without_broker(dir.path(), |c| {
        c.store.max_concurrent_queries = 1;
    })
    .await;
    // Enough records that a keyword query scans for a while.
    let ndjson: String = (0..5000)
        .map(|i| {
            format!(
                "{{\"topic\":\"/p1/d{}/post\",\"payload\":{{\"i\":{i},\"note\":\"row {i}\"}}}}\n",
                i % 50
            )
        })
        .collect();
    d.post(ndjson).await;
    let client = reqwest::Client::new();
    let url = format!(
        "{}/api/v1/logs?keyword=nowhere-to-be-found&limit=200",
        d.base
    );
    let mut statuses = Vec::new();
    let mut refusal = Value::Null;
    for _ in 0..20 {
        let answers = futures::future::join_all((0..12).map(|_| async {
            let r = client.get(&url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }))
        .await;
        for (s, body) in answers {
            if s == 429 {
                refusal = body;
            }
            statuses.push(s);
        }
        if statuses.contains(&429) {
            break;
        }
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.contains(&429),
        "no query was refused: {statuses:?}"
    );
    assert!(
        refusal["error"]
            .as_str()
            .unwrap()
            .contains("store.max_concurrent_queries"),
        "{refusal}"
    );
    let limited = metric(
        &d.metrics().await,
        "iotfwd_http_limited_total",
        &[("limit", "max_concurrent_queries")],
    );
    assert_eq!(
        limited,
        statuses.iter().filter(|s| **s == 429).count() as f64
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_without_broker(dir.path(), |c| {
        c.http.header_timeout_ms = 300;
        c.http.body_timeout_ms = 300;
    })
    .await;
    let addr = d.base.trim_start_matches("http://").to_owned();

    // Headers that never end: the connection is closed.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection stayed open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A connection that never sends anything is closed too.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let read =
        tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut Vec::new())).await;
    assert!(read.is_ok(), "the idle connection stayed open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A body that never arrives: 408.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(
        b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"topic\":",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("http.body_timeout_ms"), "{answer}");
    let limited = metric(
        &d.metrics().await,
        "iotfwd_http_limited_total",
        &[("limit", "body_timeout_ms")],
    );
    assert_eq!(limited, 1.0);
    // A prompt client is served as before.
    assert_eq!(d.get("/healthz").await.0, 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_requests_beyond_the_limit_are_429() {
    let dir = tempfile::tempdir().unwrap();
    // A destination that cannot be reached holds each matching ingest request open while its
    // action waits for the broker (up to the confirm time-out, then retries).
    write_rule(
        dir.path(),
        "held",
        "sql = '''SELECT * FROM \"/p1/+/post\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"x\"\n",
    );
    // Port 1 (tcpmux): nothing listens there.
    let nowhere = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    let d = Daemon::start_without_broker(dir.path(), |c| {
        c.http.max_concurrent_ingest = 1;
        c.shutdown.grace_ms = 1000;
        c.broker = Some(iotfwd::config::broker::BrokerConfig {
            confirm_timeout_ms: 5000,
            ..iotfwd::config::broker::BrokerConfig::new(&nowhere)
        });
    })
    .await;
    let url = format!("{}/api/v1/messages", d.base);
    let held = tokio::spawn({
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .body(r#"{"topic":"/p1/d1/post","payload":{}}"#)
                .send()
                .await
        }
    });
    // The held request has its slot once its message is recorded as received.
    eventually("the held message", || async {
        let scrape = d.metrics().await;
        (metric(
            &scrape,
            "iotfwd_messages_received_total",
            &[("source", "http")],
        ) >= 1.0)
            .then_some(())
    })
    .await;
    let (s, body, _) = call(
        &d,
        "POST",
        "/api/v1/messages",
        None,
        r#"{"topic":"/p2/d1/post","payload":{}}"#,
    )
    .await;
    assert_eq!(s, 429, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("http.max_concurrent_ingest"),
        "{body}"
    );
    assert_eq!(
        metric(
            &d.metrics().await,
            "iotfwd_http_limited_total",
            &[("limit", "max_concurrent_ingest")]
        ),
        1.0
    );
    // Other routes are not held up.
    assert_eq!(d.get("/api/v1/health").await.0, 200);
    held.abort();
    let _ = held.await;
    // Once the held request is gone, its slot is free again.
    eventually("a free ingest slot", || async {
        let (s, _, _) = call(
            &d,
            "POST",
            "/api/v1/messages",
            None,
            r#"{"topic":"/p2/d1/post","payload":{}}"#,
        )
        .await;
        (s == 200).then_some(())
    })
    .await;
    d.stop().await;
}
