//! The hardened AMQP 1.0 endpoint: the pending budget for sockets that have not logged in
//! (overall and per source IP), the handshake time-out, replayed logins and the per-IP limit
//! on failed logins. Real sockets and the real fe2o3 consumer against the in-process daemon.
//!
//! Source addresses: Linux routes all of 127.0.0.0/8 to the loopback interface, so the tests
//! open their "attacker" sockets from 127.0.0.2 and up while consumers connect from 127.0.0.1.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use iotfwd::client::{Consumer, ConsumerOptions, describe};
use iotfwd::config::Config;
use iotfwd::config::subscription::GroupConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::harness::{Daemon, eventually, metric, unique};

const SECRET: &str = "endpoint-test-secret";

struct Setup {
    daemon: Daemon,
    url: String,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// A daemon without a broker whose rule forwards `/p1/+/post` to group `g1`.
async fn setup(tweak: impl FnOnce(&mut Config)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("to_g1.toml"),
        "sql = '''SELECT * FROM \"/p1/+/post\"'''\n[[action]]\nto = \"group\"\ngroup = \"g1\"\n",
    )
    .unwrap();
    let secret = dir.path().join("g1.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let d: &Path = dir.path();
    let daemon = Daemon::start_without_broker(d, |c| {
        c.subscription.listen = "127.0.0.1:0".into();
        let mut g = GroupConfig::demo(d);
        g.id = "g1".into();
        g.access_key_id = "ak-g1".into();
        g.secret_file = Some(secret);
        g.create_secret = false;
        c.group.push(g);
        tweak(c);
    })
    .await;
    let addr = daemon.amqp.expect("the endpoint listens");
    Setup {
        daemon,
        url: format!("amqp://{addr}"),
        addr,
        _dir: dir,
    }
}

fn options(url: &str) -> ConsumerOptions {
    let mut o = ConsumerOptions::new(url, "g1", "ak-g1", SECRET);
    o.client_id = unique("client");
    o
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

/// A TCP connection to `to` from the source address `from` (port chosen by the kernel).
async fn socket_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0))
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    s.connect(to)
        .await
        .unwrap_or_else(|e| panic!("connect from {from}: {e}"))
}

/// Reads until the peer closes (or resets); how long that took, or `None` if it was still
/// open after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Posts one message for `/p1/<device>/post`.
async fn post(s: &Setup, device: &str) {
    let body = json!({"topic": format!("/p1/{device}/post"), "payload": {"n": 1}}).to_string();
    let report = s.daemon.post(body).await;
    assert_eq!(report["messages"][0]["code"], 200, "{report}");
}

/// Receives and accepts one delivery; its device.
async fn receive(c: &mut Consumer) -> String {
    let d = tokio::time::timeout(Duration::from_secs(10), c.receiver.recv::<Body<Value>>())
        .await
        .expect("a delivery within 10 s")
        .expect("the link is up");
    c.receiver.accept(&d).await.unwrap();
    describe(&d)["properties"]["deviceName"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Posts one message for `/p1/<device>/post` and checks the only consumer receives it.
async fn delivers(s: &Setup, c: &mut Consumer, device: &str) {
    post(s, device).await;
    assert_eq!(receive(c).await, device);
}

async fn refusals(s: &Setup, reason: &str) -> f64 {
    metric(
        &s.daemon.metrics().await,
        "iotfwd_endpoint_refused_total",
        &[("reason", reason)],
    )
}

/// 1100 idle TCP sockets (no protocol header) from one address: they fill only that address's
/// share of the pending budget, never the logged-in slots. `max_connections` is scaled down
/// to 2 so that a single idle socket taking a login slot would fail the test; with the
/// default budget (64 pending, 8 per IP) two signed consumers still connect and receive while
/// all 1100 sockets are open. The handshake time-out is raised to 60 s so that the 8 held
/// sockets stay for the whole test on a slow machine (and the counts are exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_idle_sockets_do_not_lock_out_a_signed_consumer() {
    const IDLE: usize = 1100;
    let s = setup(|c| {
        c.subscription.max_connections = 2;
        c.subscription.handshake_timeout_ms = 60_000;
    })
    .await;
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(socket_from(attacker, s.addr).await);
    }
    let mut first = Consumer::connect(&options(&s.url))
        .await
        .expect("a signed consumer connects during the flood");
    let mut second = Consumer::connect(&options(&s.url))
        .await
        .expect("a second signed consumer connects during the flood");
    // Round robin: each consumer gets one of the two.
    post(&s, "dev1").await;
    post(&s, "dev2").await;
    let mut got = [receive(&mut first).await, receive(&mut second).await];
    got.sort();
    assert_eq!(got, ["dev1", "dev2"]);
    // Beyond max_connections a login is refused, flood or not.
    assert!(refused(&options(&s.url)).await, "a third login was taken");
    // All but 8 idle sockets were closed at once.
    let per_ip = eventually("the refused sockets counted", || async {
        let n = refusals(&s, "pending_per_ip").await;
        (n >= (IDLE - 8) as f64).then_some(n)
    })
    .await;
    assert_eq!(per_ip, (IDLE - 8) as f64);
    assert_eq!(refusals(&s, "max_connections").await, 1.0);
    drop(idle);
    first.close().await;
    second.close().await;
    s.daemon.stop().await;
}

/// `max_pending_per_ip` closes one more socket from the same address at once, other
/// addresses still get in; `max_pending_connections` bounds them all together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_budget_is_bounded_per_ip_and_overall() {
    let s = setup(|c| {
        c.subscription.max_pending_per_ip = 3;
        c.subscription.max_pending_connections = 5;
        c.subscription.handshake_timeout_ms = 30_000;
    })
    .await;
    let a: IpAddr = "127.0.0.2".parse().unwrap();
    let b: IpAddr = "127.0.0.3".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(socket_from(a, s.addr).await);
    }
    let mut fourth = socket_from(a, s.addr).await;
    let closed = closed_within(&mut fourth, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a 4th socket from {a} was kept");
    // Another address still gets in, and a consumer from a third logs in and receives.
    let mut c = Consumer::connect(&options(&s.url))
        .await
        .expect("a consumer from 127.0.0.1 connects");
    delivers(&s, &mut c, "dev3").await;
    held.push(socket_from(b, s.addr).await);
    held.push(socket_from(b, s.addr).await);
    // Five pending now (3 from a, 2 from b): the budget is full for every address.
    let mut sixth = socket_from("127.0.0.4".parse().unwrap(), s.addr).await;
    assert!(
        closed_within(&mut sixth, Duration::from_secs(5))
            .await
            .is_some(),
        "a 6th pending socket was kept"
    );
    for mut h in held.drain(..) {
        assert!(
            closed_within(&mut h, Duration::from_millis(200))
                .await
                .is_none(),
            "a socket within the budget was closed"
        );
    }
    assert_eq!(refusals(&s, "pending_per_ip").await, 1.0);
    assert_eq!(refusals(&s, "pending_full").await, 1.0);
    c.close().await;
    s.daemon.stop().await;
}

/// A socket that sends the SASL protocol header and then nothing is closed once
/// `handshake_timeout_ms` has passed, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handshake_is_closed_after_the_timeout() {
    let s = setup(|c| c.subscription.handshake_timeout_ms = 1_000).await;
    let start = Instant::now();
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"AMQP\x03\x01\x00\x00").await.unwrap();
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    for (what, sock) in [("after the header", &mut slow), ("silent", &mut silent)] {
        closed_within(sock, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("the {what} socket was still open after 10 s"));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_secs(5),
            "the {what} socket was closed after {took:?}"
        );
    }
    let n = eventually("two handshake time-outs counted", || async {
        let n = refusals(&s, "handshake_timeout").await;
        (n >= 2.0).then_some(n)
    })
    .await;
    assert_eq!(n, 2.0);
    // A real client is well within it.
    Consumer::connect(&options(&s.url))
        .await
        .expect("a consumer connects")
        .close()
        .await;
    s.daemon.stop().await;
}

/// A captured username and password opens one connection: the same pair again, or the same
/// password under another client id, is refused inside the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_login_is_refused() {
    let s = setup(|_| {}).await;
    let mut captured = options(&s.url);
    captured.timestamp_ms = Some(iotfwd::message::now_ms());
    Consumer::connect(&captured)
        .await
        .expect("the first use logs in")
        .close()
        .await;
    assert!(
        refused(&captured).await,
        "the same login was accepted twice"
    );
    let mut renamed = captured.clone();
    renamed.client_id = unique("other-client");
    assert!(
        refused(&renamed).await,
        "the same signature under another client id was accepted"
    );
    let n = eventually("two replays counted", || async {
        let n = refusals(&s, "replayed").await;
        (n >= 2.0).then_some(n)
    })
    .await;
    assert_eq!(n, 2.0);
    // A freshly signed login still works.
    Consumer::connect(&options(&s.url))
        .await
        .expect("a fresh login")
        .close()
        .await;
    s.daemon.stop().await;
}

/// After `max_auth_failures_per_ip` failed logins within a minute, further sockets from that
/// address are closed at once, even with the right secret; other addresses are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_rate_limited_per_ip() {
    let s = setup(|c| c.subscription.max_auth_failures_per_ip = 3).await;
    for _ in 0..3 {
        let mut wrong = options(&s.url);
        wrong.secret = "not-the-secret".into();
        assert!(refused(&wrong).await, "a wrong secret was accepted");
    }
    eventually("three auth failures counted", || async {
        let scrape = s.daemon.metrics().await;
        (metric(
            &scrape,
            "iotfwd_group_auth_failures_total",
            &[("group", "g1")],
        ) >= 3.0)
            .then_some(())
    })
    .await;
    assert!(
        refused(&options(&s.url)).await,
        "a 4th login from the same address was served"
    );
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let took = closed_within(&mut raw, Duration::from_secs(2))
        .await
        .expect("a socket from the limited address was kept");
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    assert_eq!(refusals(&s, "auth_rate_limited").await, 2.0);
    // Another address is not limited.
    let mut other = socket_from("127.0.0.5".parse().unwrap(), s.addr).await;
    assert!(
        closed_within(&mut other, Duration::from_millis(300))
            .await
            .is_none(),
        "another address was limited too"
    );
    s.daemon.stop().await;
}
