//! AMQP 1.0 consumer groups: the real daemon's endpoint, driven by real AMQP 1.0 clients
//! (fe2o3-amqp's, and Qpid Proton's where installed).

use std::path::Path;
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use iotfwd::client::{Consumer, ConsumerOptions, body_json, describe};
use iotfwd::config::Config;
use iotfwd::config::subscription::GroupConfig;
use serde_json::{Value as Json, json};

use super::harness::eventually;
use super::rabbit::{Daemon, metric, unique};

pub(super) const SECRET: &str = "group-secret-for-tests";

pub(super) fn group(dir: &Path, id: &str) -> GroupConfig {
    let file = dir.join(format!("{id}.secret"));
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let mut g = GroupConfig::demo(dir);
    g.id = id.to_owned();
    g.access_key_id = format!("ak-{id}");
    g.secret_file = Some(file);
    g.create_secret = false;
    g
}

struct Setup {
    daemon: Daemon,
    url: String,
    _dir: tempfile::TempDir,
}

/// A daemon (no broker unless `tweak` sets one) whose rule `to_g1` forwards `/p1/+/post` to
/// group `g1` and `to_g2` forwards `/p2/+/post` to `g2`; a rejected g1 delivery goes to
/// group `dead` (the rule's error action).
async fn setup(tweak: impl FnOnce(&mut Config, &Path)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("to_g1.toml"),
        "sql = '''SELECT *, deviceName() AS device FROM \"/p1/+/post\"'''\n\
         [[action]]\nto = \"group\"\ngroup = \"g1\"\n\
         [error_action]\nto = \"group\"\ngroup = \"dead\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("to_g2.toml"),
        "sql = '''SELECT * FROM \"/p2/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"g2\"\n",
    )
    .unwrap();
    let d = dir.path().to_owned();
    let daemon = Daemon::start(dir.path(), |c| {
        c.broker = None;
        c.subscription.listen = "127.0.0.1:0".into();
        for id in ["g1", "g2", "dead"] {
            let mut g = group(&d, id);
            g.ack_timeout_ms = 1_000;
            c.group.push(g);
        }
        tweak(c, &d);
    })
    .await;
    daemon.wait_ready().await;
    Setup {
        url: format!("amqp://{}", daemon.amqp.expect("the endpoint listens")),
        daemon,
        _dir: dir,
    }
}

pub(super) fn options(url: &str, group: &str) -> ConsumerOptions {
    let mut o = ConsumerOptions::new(url, group, &format!("ak-{group}"), SECRET);
    o.client_id = unique("client");
    o
}

async fn connect(url: &str, group: &str) -> Consumer {
    Consumer::connect(&options(url, group))
        .await
        .unwrap_or_else(|e| panic!("consumer of {group} cannot connect: {e:#}"))
}

/// Whether a login is refused: the connect fails, or the link dies before a message comes.
async fn refused(o: &ConsumerOptions) -> bool {
    match tokio::time::timeout(Duration::from_secs(10), Consumer::connect(o)).await {
        Err(_) => panic!("connect neither succeeded nor failed within 10 s"),
        Ok(Err(_)) => true,
        Ok(Ok(mut c)) => matches!(
            tokio::time::timeout(Duration::from_secs(10), c.receiver.recv::<Body<Value>>()).await,
            Ok(Err(_))
        ),
    }
}

async fn send(daemon: &Daemon, topic: &str, payload: Json) -> String {
    let body = json!({ "topic": topic, "payload": payload }).to_string();
    let report = daemon.post(body).await;
    let m = &report["messages"][0];
    assert_eq!(m["code"], 200, "{report}");
    m["messageId"].as_str().unwrap().to_owned()
}

type Received = fe2o3_amqp::link::delivery::Delivery<Body<Value>>;

async fn recv(c: &mut Consumer, within: Duration) -> Option<Received> {
    match tokio::time::timeout(within, c.receiver.recv::<Body<Value>>()).await {
        Ok(Ok(d)) => Some(d),
        Ok(Err(e)) => panic!("receive failed: {e}"),
        Err(_) => None,
    }
}

fn message_id(d: &Received) -> String {
    describe(d)["properties"]["messageId"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The records of one message with `code`, polled until there are `n` (records are written
/// asynchronously).
async fn records(daemon: &Daemon, message_id: &str, code: u16, n: usize) -> Vec<Json> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let url = format!(
            "{}/api/v1/logs?messageId={message_id}&status={code}",
            daemon.base
        );
        let page: Json = reqwest::get(url).await.unwrap().json().await.unwrap();
        let found = page["records"].as_array().cloned().unwrap_or_default();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn records_of_group(daemon: &Daemon, group: &str, code: u16, n: usize) -> Vec<Json> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let url = format!(
            "{}/api/v1/logs?serviceType=ServerSubscribe&status={code}&keyword={group}",
            daemon.base
        );
        let page: Json = reqwest::get(url).await.unwrap().json().await.unwrap();
        let found: Vec<Json> = page["records"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["operation"] == group)
            .collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The group's entry in `GET /api/v1/health`.
async fn group_health(daemon: &Daemon, group: &str) -> Json {
    let health: Json = reqwest::get(format!("{}/api/v1/health", daemon.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    health["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["group"] == group).cloned())
        .unwrap_or_else(|| panic!("no group {group} in {health}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_loop_carries_the_output_and_the_platform_properties() {
    let s = setup(|_, _| {}).await;
    let mut c = connect(&s.url, "g1").await;
    let id = send(&s.daemon, "/p1/dev7/post", json!({"t": 40.5})).await;
    let d = recv(&mut c, Duration::from_secs(10))
        .await
        .expect("delivered");
    let got = describe(&d);
    assert_eq!(got["body"], json!({"t": 40.5, "device": "dev7"}), "{got}");
    let p = &got["properties"];
    assert_eq!(p["topic"], "/p1/dev7/post");
    assert_eq!(p["productKey"], "p1");
    assert_eq!(p["deviceName"], "dev7");
    assert_eq!(p["messageId"], id.as_str());
    assert_eq!(p["rule"], "to_g1");
    assert!(p["traceId"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
    assert!(
        p["generateTime"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "{p}"
    );
    c.receiver.accept(&d).await.unwrap();
    let ok = records(&s.daemon, &id, 200, 3).await;
    assert!(
        ok.iter()
            .any(|r| r["bizCode"] == "ServerSubscribe" && r["operation"] == "g1"),
        "{ok:#?}"
    );
    let scrape = s.daemon.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_group_outcomes_total",
            &[("group", "g1"), ("outcome", "accepted")]
        ),
        1.0
    );
    assert_eq!(
        metric(&scrape, "iotfwd_group_connections", &[("group", "g1")]),
        1.0
    );
    c.close().await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_checked_good_wrong_expired_unknown() {
    let s = setup(|_, _| {}).await;
    let good = options(&s.url, "g1");
    Consumer::connect(&good)
        .await
        .expect("good login")
        .close()
        .await;
    let mut sha256 = options(&s.url, "g1");
    sha256.sign_method = iotfwd::subscription::auth::SignMethod::HmacSha256;
    Consumer::connect(&sha256)
        .await
        .expect("hmacsha256 login")
        .close()
        .await;

    let mut wrong = options(&s.url, "g1");
    wrong.secret = "not-the-secret".into();
    assert!(refused(&wrong).await, "wrong secret accepted");
    let mut expired = options(&s.url, "g1");
    expired.timestamp_ms = Some(iotfwd::message::now_ms() - 16 * 60 * 1000);
    assert!(refused(&expired).await, "expired timestamp accepted");
    let mut unknown = options(&s.url, "g1");
    unknown.group = "nope".into();
    assert!(refused(&unknown).await, "unknown group accepted");

    // The client sees the SASL outcome before the endpoint counts the failure.
    let counts = eventually("three auth failures counted", || async {
        let scrape = s.daemon.metrics().await;
        let n = |g| metric(&scrape, "iotfwd_group_auth_failures_total", &[("group", g)]);
        let counts = (n("g1"), n("_unknown"));
        (counts.0 + counts.1 >= 3.0).then_some(counts)
    })
    .await;
    assert_eq!(counts, (2.0, 1.0));
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_is_9600_and_idle_timeouts_outside_30_to_300_s_are_9601() {
    let s = setup(|c, _| c.group[0].max_connections = 1).await;
    let first = connect(&s.url, "g1").await;
    assert!(
        refused(&options(&s.url, "g1")).await,
        "a second connection was taken"
    );
    for idle in [10_000, 400_000] {
        let mut o = options(&s.url, "g2");
        o.idle_timeout_ms = idle;
        assert!(refused(&o).await, "idle time-out {idle} ms accepted");
    }
    let refused_9600 = records_of_group(&s.daemon, "g1", 9600, 1).await;
    assert_eq!(refused_9600.len(), 1, "{refused_9600:#?}");
    assert!(
        refused_9600[0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_connections 1")
    );
    let refused_9601 = records_of_group(&s.daemon, "g2", 9601, 2).await;
    assert_eq!(refused_9601.len(), 2, "{refused_9601:#?}");
    let reasons: Vec<&str> = refused_9601
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("10000 ms")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("400000 ms")),
        "{reasons:?}"
    );
    let scrape = s.daemon.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_group_refused_total",
            &[("group", "g1"), ("code", "9600")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_group_refused_total",
            &[("group", "g2"), ("code", "9601")]
        ),
        2.0
    );
    first.close().await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_is_redelivered_and_rejected_goes_to_the_error_action_once() {
    let s = setup(|_, _| {}).await;
    let mut c = connect(&s.url, "g1").await;
    let mut dead = connect(&s.url, "dead").await;

    let released = send(&s.daemon, "/p1/dev1/post", json!({"n": 1})).await;
    let d = recv(&mut c, Duration::from_secs(10)).await.unwrap();
    assert_eq!(message_id(&d), released);
    c.receiver.release(&d).await.unwrap();
    let again = recv(&mut c, Duration::from_secs(10))
        .await
        .expect("redelivered");
    assert_eq!(message_id(&again), released);
    c.receiver.accept(&again).await.unwrap();
    assert_eq!(records(&s.daemon, &released, 9651, 1).await.len(), 1);

    let rejected = send(&s.daemon, "/p1/dev2/post", json!({"n": 2})).await;
    let d = recv(&mut c, Duration::from_secs(10)).await.unwrap();
    assert_eq!(message_id(&d), rejected);
    c.receiver.reject(&d, None).await.unwrap();
    let fallback = recv(&mut dead, Duration::from_secs(10))
        .await
        .expect("error action");
    assert_eq!(message_id(&fallback), rejected);
    assert_eq!(body_json(&fallback), json!({"n": 2, "device": "dev2"}));
    dead.receiver.accept(&fallback).await.unwrap();
    assert!(
        recv(&mut c, Duration::from_millis(1500)).await.is_none(),
        "a rejected message came back"
    );
    assert_eq!(records(&s.daemon, &rejected, 9652, 1).await.len(), 1);

    let scrape = s.daemon.metrics().await;
    let g1 = |o| {
        metric(
            &scrape,
            "iotfwd_group_outcomes_total",
            &[("group", "g1"), ("outcome", o)],
        )
    };
    assert_eq!(
        (g1("accepted"), g1("released"), g1("rejected")),
        (1.0, 1.0, 1.0)
    );
    c.close().await;
    dead.close().await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_outcome_within_the_ack_timeout_is_9650_and_goes_to_another_consumer() {
    let s = setup(|_, _| {}).await;
    let mut silent = connect(&s.url, "g1").await;
    let id = send(&s.daemon, "/p1/dev3/post", json!({"n": 3})).await;
    let d = recv(&mut silent, Duration::from_secs(10)).await.unwrap();
    assert_eq!(message_id(&d), id);
    let mut other = connect(&s.url, "g1").await;
    // ack_timeout_ms = 1000: the silent consumer's delivery times out and moves on.
    let again = recv(&mut other, Duration::from_secs(10))
        .await
        .expect("redelivered to the other consumer");
    assert_eq!(message_id(&again), id);
    other.receiver.accept(&again).await.unwrap();
    assert_eq!(records(&s.daemon, &id, 9650, 1).await.len(), 1);
    assert_eq!(
        records(&s.daemon, &id, 200, 3)
            .await
            .iter()
            .filter(|r| r["bizCode"] == "ServerSubscribe")
            .count(),
        1
    );
    silent.close().await;
    other.close().await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsettled_deliveries_of_a_consumer_that_disconnects_are_redelivered() {
    let s = setup(|c, _| c.group[0].ack_timeout_ms = 600_000).await;
    let mut first = connect(&s.url, "g1").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(send(&s.daemon, "/p1/dev4/post", json!({ "n": n })).await);
    }
    for _ in 0..5 {
        recv(&mut first, Duration::from_secs(10))
            .await
            .expect("delivered");
    }
    first.close().await;
    let mut second = connect(&s.url, "g1").await;
    let mut got = Vec::new();
    while let Some(d) = recv(&mut second, Duration::from_secs(5)).await {
        got.push(message_id(&d));
        second.receiver.accept(&d).await.unwrap();
        if got.len() == ids.len() {
            break;
        }
    }
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
    second.close().await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_with_no_consumer_online_are_9203_and_wait_for_one() {
    let s = setup(|_, _| {}).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(send(&s.daemon, "/p1/dev5/post", json!({ "n": n })).await);
    }
    for id in &ids {
        assert_eq!(
            records(&s.daemon, id, 9203, 1).await.len(),
            1,
            "9203 for {id}"
        );
    }
    let scrape = s.daemon.metrics().await;
    assert_eq!(
        metric(&scrape, "iotfwd_group_backlog_messages", &[("group", "g1")]),
        3.0
    );
    let health = group_health(&s.daemon, "g1").await;
    assert_eq!(health["state"], "unhealthy", "{health}");
    assert_eq!(health["waiting"], 3, "{health}");
    let mut c = connect(&s.url, "g1").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = recv(&mut c, Duration::from_secs(10))
            .await
            .expect("backlog delivered");
        got.push(message_id(&d));
        c.receiver.accept(&d).await.unwrap();
    }
    assert_eq!(got, ids, "the backlog arrives in order");
    let health = group_health(&s.daemon, "g1").await;
    assert_eq!(health["state"], "healthy", "{health}");
    assert_eq!(health["connections"], 1, "{health}");
    c.close().await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_of_one_group_never_receives_another_groups_messages() {
    // The consumers settle only after all 40 sends: no ack time-out meanwhile.
    let s = setup(|c, _| c.group.iter_mut().for_each(|g| g.ack_timeout_ms = 600_000)).await;
    let mut a = connect(&s.url, "g1").await;
    let mut b = connect(&s.url, "g2").await;
    let mut for_a = Vec::new();
    let mut for_b = Vec::new();
    for n in 0..20 {
        for_a.push(send(&s.daemon, "/p1/devA/post", json!({ "n": n })).await);
        for_b.push(send(&s.daemon, "/p2/devB/post", json!({ "n": n })).await);
    }
    for (consumer, expected) in [(&mut a, &for_a), (&mut b, &for_b)] {
        let mut got = Vec::new();
        while let Some(d) = recv(consumer, Duration::from_secs(2)).await {
            got.push(message_id(&d));
            consumer.receiver.accept(&d).await.unwrap();
        }
        assert_eq!(&got, expected);
    }
    a.close().await;
    b.close().await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_backed_backlog_survives_a_restart_of_iotfwd() {
    let dir = tempfile::tempdir().unwrap();
    let id = unique("grp");
    std::fs::write(
        dir.path().join("to_group.toml"),
        format!("sql = '''SELECT * FROM \"/p9/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"{id}\"\n"),
    )
    .unwrap();
    let config = |c: &mut Config| {
        c.subscription.listen = "127.0.0.1:0".into();
        c.group.push(group(dir.path(), &id));
    };
    let daemon = Daemon::start(dir.path(), config).await;
    daemon.wait_ready().await;
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(send(&daemon, "/p9/dev/post", json!({ "n": n })).await);
    }
    daemon.stop().await;

    let daemon = Daemon::start(dir.path(), config).await;
    daemon.wait_ready().await;
    let url = format!("amqp://{}", daemon.amqp.unwrap());
    let mut c = connect(&url, &id).await;
    let mut got = Vec::new();
    while let Some(d) = recv(&mut c, Duration::from_secs(5)).await {
        got.push(message_id(&d));
        c.receiver.accept(&d).await.unwrap();
        if got.len() == ids.len() {
            break;
        }
    }
    assert_eq!(
        got, ids,
        "every message of the backlog, in order, after the restart"
    );
    c.close().await;
    daemon.stop().await;
    let (_conn, ch) = super::rabbit::channel(super::rabbit::BROKER).await;
    super::rabbit::cleanup(&ch, &[], &[&format!("iotfwd.group.{id}")]).await;
}

/// Qpid Proton (Python), a client written for the platform, consumes by changing only the
/// host. Skipped with a loud message when Debian's python3-qpid-proton is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qpid_proton_consumer_receives_and_settles() {
    let python = "/usr/bin/python3";
    let has_proton = std::process::Command::new(python)
        .args(["-c", "import proton"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_proton {
        super::harness::tool_missing(&format!(
            "Qpid Proton interop: {python} cannot import proton (apt-get install python3-qpid-proton)"
        ));
        return;
    }
    let s = setup(|_, _| {}).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(send(&s.daemon, "/p1/proton/post", json!({ "n": n })).await);
    }
    let o = options(&s.url, "g1");
    let (username, password) = o.credentials();
    let script = r#"
import sys, json
from proton.handlers import MessagingHandler
from proton.reactor import Container
class Recv(MessagingHandler):
    def __init__(self, url, user, password, n):
        super().__init__(auto_accept=False)
        self.url, self.user, self.password, self.n, self.got = url, user, password, n, 0
    def on_start(self, event):
        conn = event.container.connect(self.url, user=self.user, password=self.password,
                                       allowed_mechs="PLAIN", heartbeat=60)
        event.container.create_receiver(conn, "g1")
    def on_message(self, event):
        print(json.dumps({"id": event.message.properties["messageId"], "body": event.message.body.decode() if isinstance(event.message.body, (bytes, memoryview)) else str(event.message.body)}), flush=True)
        self.accept(event.delivery)
        self.got += 1
        if self.got == self.n:
            event.connection.close()
Container(Recv(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))).run()
"#;
    let url = s.url.clone();
    let script = script.to_owned();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .args(["-c", &script, &url, &username, &password, "10"])
                .output()
        }),
    )
    .await
    .expect("proton consumer finished within 30 s")
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Json>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(got, ids);
    let accepted = records_of_group(&s.daemon, "g1", 200, 10).await;
    assert_eq!(accepted.len(), 10);
    s.daemon.stop().await;
}

/// `[subscription.tls]`: the endpoint speaks TLS only; a client trusting the certificate
/// consumes over amqps, a plain connection gets nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_speaks_tls_when_configured() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (c2, k2) = (cert.clone(), key.clone());
    let s = setup(move |c, _| {
        c.subscription.tls = Some(iotfwd::config::subscription::TlsConfig { cert: c2, key: k2 });
    })
    .await;
    let port = s.url.rsplit(':').next().unwrap().to_owned();
    let mut o = options(&format!("amqps://localhost:{port}"), "g1");
    o.ca = Some(cert);
    let mut c = Consumer::connect(&o).await.expect("TLS consumer connects");
    let id = send(&s.daemon, "/p1/tls/post", json!({"n": 1})).await;
    let d = recv(&mut c, Duration::from_secs(10))
        .await
        .expect("delivered over TLS");
    assert_eq!(message_id(&d), id);
    c.receiver.accept(&d).await.unwrap();
    c.close().await;
    let plain = options(&s.url, "g1");
    assert!(
        matches!(
            tokio::time::timeout(Duration::from_secs(20), Consumer::connect(&plain)).await,
            Ok(Err(_))
        ),
        "a plain connection to the TLS endpoint must fail"
    );
    s.daemon.stop().await;
}

/// SIGTERM-style shutdown closes consumer connections, each with a 9602 record, and the
/// client sees the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_consumers_with_9602() {
    let s = setup(|_, _| {}).await;
    let mut c = connect(&s.url, "g1").await;
    let dir = s._dir;
    s.daemon.stop().await;
    let closed =
        tokio::time::timeout(Duration::from_secs(10), c.receiver.recv::<Body<Value>>()).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "the client saw no close: {closed:?}"
    );
    // The record was written before the store closed: a daemon on the same data finds it.
    let again = Daemon::start(dir.path(), |c| {
        c.broker = None;
        c.subscription.enabled = false;
    })
    .await;
    again.wait_ready().await;
    let closed = records_of_group(&again, "g1", 9602, 1).await;
    assert_eq!(closed.len(), 1, "{closed:#?}");
    assert!(
        closed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("shutting down")
    );
    again.stop().await;
}

/// Broker-backed: a rejected delivery of a rule without an error action goes to the group's
/// dead-letter exchange, with the failure in its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_delivery_goes_to_the_dead_letter_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let id = unique("grp");
    let dlx = unique("dlx");
    std::fs::write(
        dir.path().join("to_group.toml"),
        format!("sql = '''SELECT * FROM \"/p8/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"{id}\"\n"),
    )
    .unwrap();
    let (_conn, ch) = super::rabbit::channel(super::rabbit::BROKER).await;
    let dead_queue = super::rabbit::exchange_with_queue(&ch, &dlx).await;
    let daemon = Daemon::start(dir.path(), |c| {
        c.subscription.listen = "127.0.0.1:0".into();
        let mut g = group(dir.path(), &id);
        g.dead_letter_exchange = Some(dlx.clone());
        c.group.push(g);
    })
    .await;
    daemon.wait_ready().await;
    let mut c = connect(&format!("amqp://{}", daemon.amqp.unwrap()), &id).await;
    let mid = send(&daemon, "/p8/dev/post", json!({"n": 8})).await;
    let d = recv(&mut c, Duration::from_secs(10))
        .await
        .expect("delivered");
    c.receiver.reject(&d, None).await.unwrap();
    let dead = super::rabbit::drain(&ch, &dead_queue, 1, Duration::from_millis(500)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        serde_json::from_slice::<Json>(&dead[0].data).unwrap(),
        json!({"n": 8})
    );
    assert_eq!(
        super::rabbit::header(&dead[0], "failedCode").as_deref(),
        Some("9652")
    );
    assert_eq!(
        super::rabbit::header(&dead[0], "messageId").as_deref(),
        Some(mid.as_str())
    );
    assert!(
        recv(&mut c, Duration::from_millis(1500)).await.is_none(),
        "a rejected message came back"
    );
    c.close().await;
    daemon.stop().await;
    super::rabbit::cleanup(&ch, &[&dlx], &[&dead_queue, &format!("iotfwd.group.{id}")]).await;
}

/// Broker-backed: two iotfwd processes serve one group; every message reaches exactly one of
/// the consumers connected to either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_broker_backed_group() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let id = unique("grp");
    let mut daemons = Vec::new();
    let mut consumers = Vec::new();
    for dir in &dirs {
        std::fs::write(
            dir.path().join("to_group.toml"),
            format!("sql = '''SELECT * FROM \"/p7/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"{id}\"\n"),
        )
        .unwrap();
        let daemon = Daemon::start(dir.path(), |c| {
            c.subscription.listen = "127.0.0.1:0".into();
            let mut g = group(dir.path(), &id);
            g.window = 8;
            c.group.push(g);
        })
        .await;
        daemon.wait_ready().await;
        consumers.push(connect(&format!("amqp://{}", daemon.amqp.unwrap()), &id).await);
        daemons.push(daemon);
    }
    let mut sent = Vec::new();
    for n in 0..200 {
        sent.push(send(&daemons[n % 2], "/p7/dev/post", json!({ "n": n })).await);
    }
    let mut got = Vec::new();
    let mut per_consumer = Vec::new();
    for c in &mut consumers {
        let mut mine = 0;
        while let Some(d) = recv(c, Duration::from_secs(2)).await {
            got.push(message_id(&d));
            c.receiver.accept(&d).await.unwrap();
            mine += 1;
        }
        per_consumer.push(mine);
    }
    got.sort();
    sent.sort();
    assert_eq!(got, sent, "each message exactly once across both processes");
    assert!(
        per_consumer.iter().all(|&n| n > 0),
        "both processes delivered: {per_consumer:?}"
    );
    for c in consumers {
        c.close().await;
    }
    for d in daemons {
        d.stop().await;
    }
    let (_conn, ch) = super::rabbit::channel(super::rabbit::BROKER).await;
    super::rabbit::cleanup(&ch, &[], &[&format!("iotfwd.group.{id}")]).await;
}

/// A connection that attaches no receiving link within `subscription.attach_timeout_ms` is
/// closed; one that attaches a sending link is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_must_be_a_receiver_attached_in_time() {
    use fe2o3_amqp::sasl_profile::SaslProfile;
    use fe2o3_amqp::{Connection, Sender, Session};
    let s = setup(|c, _| c.subscription.attach_timeout_ms = 1_000).await;
    let open = |o: ConsumerOptions| async move {
        let (username, password) = o.credentials();
        Connection::builder()
            .container_id(o.client_id.clone())
            .sasl_profile(SaslProfile::Plain { username, password })
            .idle_time_out(120_000u32)
            .open(o.url.as_str())
            .await
            .unwrap()
    };
    let mut idle = open(options(&s.url, "g1")).await;
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), idle.on_close()).await;
    assert!(
        ended.is_ok(),
        "the connection without a link was not closed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let mut conn = open(options(&s.url, "g1")).await;
    let mut session = Session::begin(&mut conn).await.unwrap();
    let refused = match Sender::attach(&mut session, "to-iotfwd", "g1").await {
        Err(_) => true,
        Ok(mut sender) => {
            let sent = tokio::time::timeout(Duration::from_secs(10), sender.send("hello")).await;
            matches!(sent, Ok(Err(_)))
        }
    };
    assert!(refused, "a sending link was accepted");
    // The refused connection is closed by the endpoint a moment after the client sees the
    // refusal; the gauge follows that close.
    eventually("the connections gauge to drop to 0", || async {
        let scrape = s.daemon.metrics().await;
        (metric(&scrape, "iotfwd_group_connections", &[("group", "g1")]) == 0.0).then_some(())
    })
    .await;
    s.daemon.stop().await;
}

/// `subscription.max_connections` bounds logged-in connections over all groups: one more
/// login is refused. (Sockets still in their handshake have their own budget: tests/it/endpoint.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_bounds_its_connections() {
    let s = setup(|c, _| c.subscription.max_connections = 1).await;
    let first = connect(&s.url, "g1").await;
    assert!(
        refused(&options(&s.url, "g2")).await,
        "a second login was served"
    );
    first.close().await;
    // The slot is free again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Consumer::connect(&options(&s.url, "g1")).await {
            Ok(c) => {
                c.close().await;
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "no slot after the first left: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.daemon.stop().await;
}

/// With `--config`, a reload re-reads each group's secret file: new logins need the new
/// secret, an open connection stays, and an unreadable file keeps the running secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_a_group_secret_read_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("g1.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("to_g1.toml"),
        "sql = '''SELECT * FROM \"/p1/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"g1\"\n",
    )
    .unwrap();
    let file = dir.path().join("iotfwd.toml");
    std::fs::write(
        &file,
        format!(
            "[rules]\ndir = {rules:?}\nwatch = false\n[data]\ndir = {data:?}\n\
             [subscription]\nlisten = \"127.0.0.1:0\"\n\
             [[group]]\nid = \"g1\"\naccess_key_id = \"ak-g1\"\nsecret_file = {secret:?}\n",
            rules = rules.display().to_string(),
            data = dir.path().join("data").display().to_string(),
            secret = secret_file.display().to_string(),
        ),
    )
    .unwrap();
    let daemon = Daemon::start_from_file(&file).await;
    let url = format!("amqp://{}", daemon.amqp.unwrap());
    let mut open = connect(&url, "g1").await;

    std::fs::write(&secret_file, "the-new-secret\n").unwrap();
    let (status, reply) = daemon.post_to("/api/v1/rules/reload", "").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["reload"]["config"]["secretsRotated"],
        json!(["g1"]),
        "{reply}"
    );
    assert!(
        !reply.to_string().contains("the-new-secret"),
        "the secret leaked: {reply}"
    );
    assert!(
        refused(&options(&url, "g1")).await,
        "the old secret still logs in"
    );
    let mut rotated = options(&url, "g1");
    rotated.secret = "the-new-secret".into();
    Consumer::connect(&rotated)
        .await
        .expect("the new secret logs in")
        .close()
        .await;
    // The connection made with the old secret still receives.
    let id = send(&daemon, "/p1/dev1/post", json!({"n": 1})).await;
    let d = recv(&mut open, Duration::from_secs(10))
        .await
        .expect("the open connection receives");
    assert_eq!(message_id(&d), id);
    open.receiver.accept(&d).await.unwrap();

    // A missing file: the reload fails and says so; the running secret stays.
    std::fs::remove_file(&secret_file).unwrap();
    let (status, reply) = daemon.post_to("/api/v1/rules/reload", "").await;
    assert_eq!(status, 422, "{reply}");
    let error = reply["reload"]["config"]["errors"][0].as_str().unwrap();
    assert!(error.contains("g1.secret"), "{error}");
    Consumer::connect(&rotated)
        .await
        .expect("the running secret stays")
        .close()
        .await;
    open.close().await;
    daemon.stop().await;
}
