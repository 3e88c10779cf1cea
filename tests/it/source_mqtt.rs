//! The MQTT source against a real Mosquitto of the test's own (persistence in a temp dir,
//! `max_queued_messages 0`, so the broker itself drops nothing) and a real MQTT publisher
//! (rumqttc): every QoS 1 message reaches a rule with no action and one forwarding to the
//! shared RabbitMQ, a topic not of the platform's form is a 1903 record, and a kill -9 of the
//! daemon mid-stream loses nothing (the persistent session redelivers what was not acked), and
//! neither does a restart of the broker mid-stream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iotfwd::config::mqtt::{MqttConfig, MqttSourceConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::harness::{ChildDaemon, Daemon, eventually, metric, tool_missing, unique};
use super::rabbit::{BROKER, channel, cleanup, drain, exchange_with_queue, queue_depth};

/// A Mosquitto of this test's own, stopped (SIGKILL) when dropped.
pub struct Mosquitto {
    child: std::process::Child,
    pub port: u16,
    binary: &'static str,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts one on a port the kernel picked a moment ago; None (after `tool_missing`) when
    /// mosquitto is not installed.
    pub fn start() -> Option<Mosquitto> {
        Mosquitto::start_with(|_| "allow_anonymous true\n".into())
    }

    /// [`Mosquitto::start`] with the access settings `access` returns, given the broker's own
    /// directory (where it may write a password or ACL file); they come last, so they may
    /// override the settings above.
    pub fn start_with(access: impl FnOnce(&Path) -> String) -> Option<Mosquitto> {
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(binary) = binary else {
            tool_missing("mosquitto is not installed (scripts/test installs it)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("iotfwd-mosquitto-")
            .tempdir()
            .unwrap();
        // Mosquitto started as root drops to the `mosquitto` user: it must write here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a port for the test's Mosquitto");
        let conf = dir.path().join("mosquitto.conf");
        let access = access(dir.path());
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 100\n\
                 log_dest file {}\n{access}",
                dir.path().display(),
                dir.path().join("mosquitto.log").display()
            ),
        )
        .unwrap();
        let child = Mosquitto::spawn(binary, &conf, port);
        Some(Mosquitto {
            child,
            port,
            binary,
            conf,
            _dir: dir,
        })
    }

    /// Runs mosquitto with `conf`; returns once it listens on `port`.
    fn spawn(binary: &str, conf: &Path, port: u16) -> std::process::Child {
        let child = Command::new(binary)
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the test's Mosquitto did not listen on {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Stops the broker as its service manager would (SIGTERM: it writes its persistence
    /// file, with the sessions and their queued messages) and starts it again on its port.
    fn restart(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
        self.child = Mosquitto::spawn(self.binary, &self.conf, self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes every `(topic, payload)` at QoS 1 and returns once the broker acknowledged all.
pub async fn publish_all(port: u16, messages: Vec<(String, Vec<u8>)>) {
    publish_all_as(port, None, messages).await
}

/// [`publish_all`] logged in with `credentials` (user name, password).
pub async fn publish_all_as(
    port: u16,
    credentials: Option<(&str, &str)>,
    messages: Vec<(String, Vec<u8>)>,
) {
    let mut options = MqttOptions::new(
        format!("pub-{}", uuid::Uuid::new_v4().simple()),
        "127.0.0.1",
        port,
    );
    options.set_inflight(100);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (client, mut events) = AsyncClient::new(options, 100);
    let total = messages.len();
    let sender = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(120), async {
        while acked < total {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("the test publisher lost its connection: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {acked} of {total} publishes were acknowledged"));
    let client = sender.await.unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

/// `n` messages `{"seq": i}` on `/p1/d<i % 7>/user/update`.
pub fn stream(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("/p1/d{}/user/update", i % 7),
                format!("{{\"seq\":{i}}}").into_bytes(),
            )
        })
        .collect()
}

fn write_rules(dir: &Path, exchange: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("count.toml"),
        "sql = '''SELECT seq FROM \"/p1/#\"'''\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("forward.toml"),
        format!(
            "sql = '''SELECT seq FROM \"/p1/#\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"{exchange}\"\n"
        ),
    )
    .unwrap();
}

/// Takes every message of `queue` and counts them by `seq`: (missing seqs, duplicates, total).
async fn tally(queue: &str, n: usize) -> (Vec<usize>, usize, usize) {
    let (conn, ch) = channel(BROKER).await;
    let got = drain(&ch, queue, n, Duration::from_secs(1)).await;
    let _ = conn.close(200, "".into()).await;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for d in &got {
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        *seen.entry(body["seq"].as_u64().unwrap()).or_default() += 1;
    }
    let missing = (0..n)
        .filter(|i| !seen.contains_key(&(*i as u64)))
        .collect();
    (missing, got.len() - seen.len(), got.len())
}

struct Cleanup {
    exchange: String,
    queue: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (exchange, queue) = (self.exchange.clone(), self.queue.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let (conn, ch) = channel(BROKER).await;
                cleanup(&ch, &[&exchange], &[&queue]).await;
                let _ = conn.close(200, "".into()).await;
            })
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_reach_every_rule_and_a_bad_topic_is_1903() {
    const N: usize = 2_000;
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let exchange = unique("mqtt-fwd");
    let (conn, ch) = channel(BROKER).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    let _cleanup = Cleanup {
        exchange: exchange.clone(),
        queue: queue.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(&dir.path().join("rules"), &exchange);
    let url = mosquitto.url();
    let daemon = Daemon::start(&dir.path().join("rules"), |c| {
        let mut mqtt = MqttConfig::new(url);
        mqtt.client_id = unique("src");
        c.mqtt = Some(mqtt);
        c.source.mqtt = Some(MqttSourceConfig::new(&["/p1/#", "bad/#"]));
    })
    .await;
    eventually("the MQTT source to subscribe", || async {
        let health = daemon.get_json("/api/v1/health").await;
        (health["mqtt"]["connected"] == true).then_some(())
    })
    .await;

    let mut messages = stream(N);
    messages.push(("bad/topic".into(), b"{\"seq\":-1}".to_vec()));
    publish_all(mosquitto.port, messages).await;

    eventually("every message forwarded", || async {
        (queue_depth(&conn, &queue).await.unwrap_or(0) as usize >= N).then_some(())
    })
    .await;
    let (missing, duplicates, total) = tally(&queue, N).await;
    assert!(
        missing.is_empty(),
        "{} of {N} never reached RabbitMQ, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!((duplicates, total), (0, N), "no redelivery happened here");

    let scrape = daemon.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_messages_received_total",
            &[("source", "mqtt")]
        ),
        N as f64
    );
    assert_eq!(
        metric(&scrape, "iotfwd_rule_passed_total", &[("rule", "count")]),
        N as f64
    );
    assert_eq!(metric(&scrape, "iotfwd_mqtt_connected", &[]), 1.0);
    let rejected = daemon.get_json("/api/v1/logs?status=1903").await;
    assert_eq!(rejected["count"], 1, "{rejected}");
    assert!(
        rejected.to_string().contains("bad/topic"),
        "the 1903 record names the topic: {rejected}"
    );
    let device = daemon.get_json("/api/v1/logs?device=d3&limit=10").await;
    assert!(
        device["count"].as_u64().unwrap_or(0) >= 1,
        "records of device d3: {device}"
    );
    daemon.stop().await;
    let _ = conn.close(200, "".into()).await;
}

/// The real binary on `dir`'s rules, subscribed to `mqtt_url` as `client_id` and forwarding
/// to the shared RabbitMQ: the `run`-th start in `dir`; returns once its MQTT source is
/// connected (at most 30 s). MQTT 5, with `more` added to its `[source.mqtt]`.
async fn start_daemon_with(
    dir: &Path,
    mqtt_url: &str,
    client_id: &str,
    run: usize,
    more: &str,
) -> ChildDaemon {
    start_daemon_speaking(dir, mqtt_url, client_id, run, "5", more).await
}

/// [`start_daemon_with`], speaking MQTT `protocol` ("5" or "3.1.1").
async fn start_daemon_speaking(
    dir: &Path,
    mqtt_url: &str,
    client_id: &str,
    run: usize,
    protocol: &str,
    more: &str,
) -> ChildDaemon {
    let quoted = |p: PathBuf| format!("{:?}", p.display().to_string());
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[rules]\ndir = {}\n[data]\ndir = {}\n\
         [subscription]\nenabled = false\n\
         [broker]\nurl = \"{BROKER}\"\n\
         [mqtt]\nurl = \"{mqtt_url}\"\nclient_id = \"{client_id}\"\nprotocol = \"{protocol}\"\n\
         [source.mqtt]\nsubscribe = [\"/p1/#\"]\nmax_inflight = 100\n{more}",
        quoted(dir.join("rules")),
        quoted(dir.join("data")),
    );
    let c = ChildDaemon::start(dir, run, &config).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health: serde_json::Value =
            match reqwest::get(format!("{}/api/v1/health", c.base)).await {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => serde_json::Value::Null,
            };
        if health["mqtt"]["connected"] == true {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "iotfwd (run {run}) did not subscribe within 30 s; its log:\n{}",
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two iotfwd processes in one shared subscription (`share_group`: `$share/<group>/<filter>`)
/// split the stream: every message reaches RabbitMQ exactly once (no fault, so no
/// redelivery), and both processes take part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_in_one_share_group_split_the_stream() {
    const N: usize = 4_000;
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let exchange = unique("mqtt-share");
    let (conn, ch) = channel(BROKER).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    let _cleanup = Cleanup {
        exchange: exchange.clone(),
        queue: queue.clone(),
    };
    let url = mosquitto.url();
    let group = format!("share_group = \"{}\"\n", unique("iotfwd"));
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut daemons = Vec::new();
    for (i, dir) in [&a, &b].into_iter().enumerate() {
        write_rules(&dir.path().join("rules"), &exchange);
        let client_id = format!("iotfwd-share-{i}-{}", uuid::Uuid::new_v4().simple());
        daemons.push(start_daemon_with(dir.path(), &url, &client_id, 1, &group).await);
    }
    publish_all(mosquitto.port, stream(N)).await;
    // Each process's share, once both are done.
    let matched =
        |scrape: &str| metric(scrape, "iotfwd_rule_matched_total", &[("rule", "forward")]);
    let delivered = |scrape: &str| {
        metric(
            scrape,
            "iotfwd_action_success_total",
            &[("rule", "forward")],
        )
    };
    let shares = eventually(
        "both processes to have forwarded all N between them",
        || async {
            let mut shares = Vec::new();
            let mut done = 0.0;
            for d in &daemons {
                let scrape = d.metrics().await;
                shares.push(matched(&scrape));
                done += delivered(&scrape);
            }
            (done >= N as f64).then_some(shares)
        },
    )
    .await;
    let (missing, duplicates, total) = tally(&queue, N).await;
    println!(
        "mqtt share group: {N} published, {total} forwarded ({} + {} per process), {} missing, \
         {duplicates} duplicates",
        shares[0],
        shares[1],
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} never reached RabbitMQ",
        missing.len()
    );
    assert_eq!(duplicates, 0, "nothing doubled without a fault");
    assert_eq!(
        shares[0] + shares[1],
        N as f64,
        "each message taken by one process"
    );
    assert!(
        shares.iter().all(|&s| s > 0.0),
        "both processes take part: {shares:?}"
    );
    let _ = conn.close(200, "".into()).await;
}

/// Under MQTT 5 the session outlives the killed connection only because iotfwd asks for a
/// session expiry interval: without one the broker would drop the session, and with it what
/// was not acknowledged, when the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing() {
    kill_9_mid_stream("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_under_mqtt_3_1_1() {
    kill_9_mid_stream("3.1.1").await;
}

/// A kill -9 of the daemon while a publisher sends 5 000 QoS 1 messages: the second daemon,
/// same client id, gets from the broker's session every message the first did not
/// acknowledge, and those published while no daemon ran.
async fn kill_9_mid_stream(protocol: &str) {
    const N: usize = 5_000;
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let exchange = unique("mqtt-kill");
    let (conn, ch) = channel(BROKER).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    let _cleanup = Cleanup {
        exchange: exchange.clone(),
        queue: queue.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(&dir.path().join("rules"), &exchange);
    let client_id = format!("iotfwd-kill-{}", uuid::Uuid::new_v4().simple());
    let url = mosquitto.url();
    let mut first = start_daemon_speaking(dir.path(), &url, &client_id, 1, protocol, "").await;

    let publisher = tokio::spawn(publish_all(mosquitto.port, stream(N)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while (queue_depth(&conn, &queue).await.unwrap_or(0) as usize) < N / 4 {
        assert!(
            Instant::now() < deadline,
            "not a quarter forwarded within 60 s; the daemon's log:\n{}",
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.child.kill().unwrap(); // SIGKILL
    let status = first.child.wait().unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    }
    let at_kill = queue_depth(&conn, &queue).await.unwrap_or(0);
    drop(first);

    let second = start_daemon_speaking(dir.path(), &url, &client_id, 2, protocol, "").await;
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();
    // Settled: at least N forwarded and no longer growing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        let depth = queue_depth(&conn, &queue).await;
        if depth.is_some_and(|d| d as usize >= N) && depth == last {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        last = depth;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (missing, duplicates, total) = tally(&queue, N).await;
    println!(
        "mqtt {protocol} kill -9: SIGKILL after {at_kill} forwarded; {total} forwarded for {N} published: \
         {} missing, {duplicates} duplicates",
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} of {N} never reached RabbitMQ, e.g. {:?}; the second daemon's log:\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        second.log_text()
    );
    // Records survive too (store.durability = "acked"): every message was PUBACKed only after
    // its records were committed, so each seq has the output record of the rule `count`.
    let db = dir.path().join("data").join("outcomes.db");
    let store = rusqlite::Connection::open(&db).unwrap();
    let mut stmt = store
        .prepare(
            "SELECT content FROM records WHERE biz_code = 'ruleengine' AND operation = 'count'",
        )
        .unwrap();
    let recorded: std::collections::BTreeSet<u64> = stmt
        .query_map([], |row| row.get::<_, String>(0))
        .unwrap()
        .filter_map(|c| serde_json::from_str::<serde_json::Value>(&c.unwrap()).ok())
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    let unrecorded: Vec<u64> = (0..N as u64).filter(|n| !recorded.contains(n)).collect();
    assert!(
        unrecorded.is_empty(),
        "{} of {N} have no record of the rule count, e.g. {:?}",
        unrecorded.len(),
        &unrecorded[..unrecorded.len().min(20)]
    );
    drop(second);
    let _ = conn.close(200, "".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    const N: usize = 5_000;
    let Some(mut mosquitto) = Mosquitto::start() else {
        return;
    };
    let exchange = unique("mqtt-restart");
    let (conn, ch) = channel(BROKER).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    let _cleanup = Cleanup {
        exchange: exchange.clone(),
        queue: queue.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(&dir.path().join("rules"), &exchange);
    let url = mosquitto.url();
    let daemon = Daemon::start(&dir.path().join("rules"), |c| {
        let mut mqtt = MqttConfig::new(url);
        mqtt.client_id = unique("restart");
        mqtt.reconnect_max_delay_ms = 200;
        c.mqtt = Some(mqtt);
        let mut source = MqttSourceConfig::new(&["/p1/#"]);
        // A small window, so the stream is still flowing when the broker restarts.
        source.max_inflight = 10;
        c.source.mqtt = Some(source);
    })
    .await;
    eventually("the MQTT source to subscribe", || async {
        let health = daemon.get_json("/api/v1/health").await;
        (health["mqtt"]["connected"] == true).then_some(())
    })
    .await;
    // Every message is with the broker (acknowledged to the publisher) before it restarts.
    publish_all(mosquitto.port, stream(N)).await;
    eventually("a tenth forwarded", || async {
        (queue_depth(&conn, &queue).await.unwrap_or(0) as usize >= N / 10).then_some(())
    })
    .await;
    let at_restart = queue_depth(&conn, &queue).await.unwrap_or(0);
    tokio::task::block_in_place(|| mosquitto.restart());
    eventually("the source to reconnect", || async {
        let health = daemon.get_json("/api/v1/health").await;
        (health["mqtt"]["connected"] == true).then_some(())
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        let depth = queue_depth(&conn, &queue).await;
        if depth.is_some_and(|d| d as usize >= N) && depth == last || Instant::now() > deadline {
            break;
        }
        last = depth;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (missing, duplicates, total) = tally(&queue, N).await;
    println!(
        "mqtt broker restart: restarted after {at_restart} forwarded; {total} forwarded for {N} \
         published: {} missing, {duplicates} duplicates",
        missing.len()
    );
    assert!(
        (at_restart as usize) < N,
        "the stream had ended before the restart; the test proves nothing"
    );
    assert!(
        missing.is_empty(),
        "{} of {N} never reached RabbitMQ, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    let health = daemon.get_json("/api/v1/health").await;
    assert!(
        health["mqtt"]["lastError"].is_string(),
        "health names the lost connection: {health}"
    );
    daemon.stop().await;
    let _ = conn.close(200, "".into()).await;
}

/// 10 000 QoS 1 messages from a real MQTT publisher through the daemon binary to three
/// destinations at once: a RabbitMQ exchange (its queue counted), a consumer group (a real
/// AMQP 1.0 consumer accepting each) and an MQTT topic (a real subscriber reading it). Every
/// message reaches each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_reach_rabbitmq_a_consumer_group_and_an_mqtt_topic() {
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::primitives::Value;
    use iotfwd::client::{Consumer, ConsumerOptions, body_json};
    use std::collections::HashSet;

    const N: usize = 10_000;
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let exchange = unique("mqtt-10k");
    let (conn, ch) = channel(BROKER).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    let group = unique("mqtt-10k-grp");
    let _cleanup = Cleanup {
        exchange: exchange.clone(),
        queue: queue.clone(),
    };
    let _group_queue = Cleanup {
        exchange: String::new(),
        queue: format!("iotfwd.group.{group}"),
    };

    // The MQTT subscriber, subscribed before anything is published.
    let mut options = MqttOptions::new(unique("sub"), "127.0.0.1", mosquitto.port);
    options.set_keep_alive(Duration::from_secs(30));
    let (subscriber, mut events) = AsyncClient::new(options, 1000);
    subscriber
        .subscribe("/out/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.expect("subscriber") {
            break;
        }
    }
    let read_mqtt = tokio::spawn(async move {
        let mut seen = HashSet::new();
        let _ = tokio::time::timeout(Duration::from_secs(120), async {
            while seen.len() < N {
                if let Ok(Event::Incoming(Packet::Publish(p))) = events.poll().await {
                    let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    seen.insert(body["seq"].as_u64().unwrap());
                }
            }
        })
        .await;
        seen.len()
    });

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rules = d.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    for (name, action) in [
        (
            "to-rabbitmq",
            format!("to = \"amqp\"\nexchange = \"{exchange}\""),
        ),
        ("to-group", format!("to = \"group\"\ngroup = \"{group}\"")),
        (
            "to-mqtt",
            "to = \"mqtt\"\ntopic = \"/out/${device}\"\nqos = 1".to_owned(),
        ),
    ] {
        std::fs::write(
            rules.join(format!("{name}.toml")),
            format!(
                "sql = '''SELECT seq, deviceName() AS device FROM \"/p1/#\"'''\n[[action]]\n{action}\n"
            ),
        )
        .unwrap();
    }
    let secret = d.join("g.secret");
    std::fs::write(&secret, "mqtt-10k-secret\n").unwrap();
    let quoted = |p: PathBuf| format!("{:?}", p.display().to_string());
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[rules]\ndir = {}\n[data]\ndir = {}\n\
         [broker]\nurl = \"{BROKER}\"\n\
         [mqtt]\nurl = \"{}\"\nclient_id = \"{}\"\n\
         [source.mqtt]\nsubscribe = [\"/p1/#\"]\nmax_inflight = 256\n\
         [subscription]\nlisten = \"127.0.0.1:0\"\n\
         [[group]]\nid = \"{group}\"\naccess_key_id = \"ak-10k\"\nsecret_file = {}\n",
        quoted(rules.clone()),
        quoted(d.join("data")),
        mosquitto.url(),
        unique("iotfwd-10k"),
        quoted(secret.clone()),
    );
    let daemon = ChildDaemon::start(d, 1, &config).await;
    let endpoint = format!("amqp://{}", daemon.amqp.expect("the endpoint's address"));

    // The consumer group's consumer.
    let consume = tokio::spawn(async move {
        let mut o = ConsumerOptions::new(&endpoint, &group, "ak-10k", "mqtt-10k-secret");
        o.client_id = unique("consumer");
        let mut c = Consumer::connect(&o)
            .await
            .expect("the group consumer connects");
        let mut seen = HashSet::new();
        let _ = tokio::time::timeout(Duration::from_secs(120), async {
            while seen.len() < N {
                let d = c.receiver.recv::<Body<Value>>().await.expect("a delivery");
                c.receiver.accept(&d).await.expect("accepted");
                seen.insert(body_json(&d)["seq"].as_u64().unwrap());
            }
        })
        .await;
        c.close().await;
        seen.len()
    });

    let started = Instant::now();
    publish_all(mosquitto.port, stream(N)).await;
    let (grouped, republished) = (consume.await.unwrap(), read_mqtt.await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while (queue_depth(&conn, &queue).await.unwrap_or(0) as usize) < N && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let (missing, duplicates, total) = tally(&queue, N).await;
    println!(
        "mqtt 10k: {N} published; RabbitMQ {total} ({} missing, {duplicates} duplicates), \
         consumer group {grouped}, MQTT topic {republished} distinct, in {:.1} s",
        missing.len(),
        elapsed.as_secs_f64()
    );
    assert!(
        missing.is_empty(),
        "{} never reached RabbitMQ",
        missing.len()
    );
    assert_eq!(
        grouped, N,
        "every message reached the consumer group's consumer"
    );
    assert_eq!(republished, N, "every message reached the MQTT subscriber");
    let _ = conn.close(200, "".into()).await;
}
