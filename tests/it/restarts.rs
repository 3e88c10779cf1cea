//! Resilience, in the middle of a 20 000-message stream: the broker restarting under the daemon
//! (on a RabbitMQ node this test starts itself on other ports, never the shared one), and the
//! daemon process killed with SIGKILL and started again (against the shared broker). Nothing may
//! be lost; duplicates are counted and printed (`cargo test -- --nocapture` shows them).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iotfwd::config::broker::{AmqpSourceConfig, TopicFrom};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use super::harness::ChildDaemon;
use super::rabbit::*;

/// Messages in each stream.
const N: usize = 20_000;

/// The two tests share the machine's cores; one at a time, so the time bounds measure the daemon
/// rather than the other test.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a command to completion, killing it after `limit`. Returns (success, stdout + stderr).
fn run_bounded(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(out.path()).unwrap_or_default();
    match status {
        Some(s) => (s.success(), text),
        None => (false, format!("{text}\n(killed after {limit:?})")),
    }
}

/// A RabbitMQ node of this test's own, on free ports, with its data in a temp dir and no plugins.
/// It is stopped when the guard drops, also when the test panics.
pub(super) struct TestNode {
    name: String,
    port: u16,
    dist_port: u16,
    dir: tempfile::TempDir,
    running: bool,
}

/// A port for the test node. RabbitMQ is another process and cannot be handed a bound
/// listener (the daemon's own listeners are, everywhere else in these tests), so the port is
/// one the kernel picked a moment ago; the node fails loudly if something took it since.
pub(super) fn port_for_node() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a port for the RabbitMQ test node")
}

impl TestNode {
    pub(super) fn new() -> TestNode {
        TestNode::with_config(|_| String::new())
    }

    /// A node whose rabbitmq.conf also holds the lines `extra` returns (a TLS listener, say).
    /// `extra` gets the node's directory, for the files the node must read (certificates): the
    /// node runs as another user, who can read there.
    pub(super) fn with_config(extra: impl FnOnce(&Path) -> String) -> TestNode {
        let dir = tempfile::Builder::new()
            .prefix("iotfwd-rmq-")
            .tempdir()
            .unwrap();
        // The server runs as the `rabbitmq` user (the packaged wrapper switches to it).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = port_for_node();
        let node = TestNode {
            name: format!("{}@localhost", unique("node")),
            port,
            dist_port: port_for_node(),
            dir,
            running: false,
        };
        std::fs::write(node.file("enabled_plugins"), "[].\n").unwrap();
        let extra = extra(node.dir.path());
        std::fs::write(
            node.file("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\n{extra}"),
        )
        .unwrap();
        // Our own env file, so the system one (which names the shared node) is not read.
        std::fs::write(
            node.file("rabbitmq-env.conf"),
            "export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
        )
        .unwrap();
        node
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(super) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub(super) fn ctl(&self, args: &[&str], limit: Duration) -> (bool, String) {
        run_bounded(
            Command::new("rabbitmqctl")
                .arg("-n")
                .arg(&self.name)
                .args(args),
            limit,
        )
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.file(&format!("log/{}.log", self.name)))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts the node (same data dir every time, so durable queues survive) and waits until it
    /// has started. Blocking.
    pub(super) fn start(&mut self) {
        let mut cmd = Command::new("rabbitmq-server");
        cmd.arg("-detached")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.file("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.file("log"))
            .env("RABBITMQ_PID_FILE", self.file("pid"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.file("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", self.file("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", self.file("rabbitmq-env.conf"));
        let (ok, out) = run_bounded(&mut cmd, Duration::from_secs(30));
        assert!(ok, "rabbitmq-server -detached failed: {out}");
        self.running = true;
        // `-detached` returns before the node registers with epmd, and `await_startup` fails at
        // once on a node it cannot reach yet, so try again until it answers.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (ok, out) = self.ctl(
                &["await_startup", "--timeout", "30"],
                Duration::from_secs(40),
            );
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "test node {} did not start within 60 s: {out}\n--- node log ---\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Kills the node (SIGKILL) and waits for it to be gone: for a node whose data no later
    /// step needs, faster than `stop`. Blocking.
    pub(super) fn kill(&mut self) {
        if !self.running {
            return;
        }
        let pid = std::fs::read_to_string(self.file("pid")).expect("the node's pid file");
        let (pid, started) = (pid.trim().to_owned(), Instant::now());
        let _ = Command::new("kill").args(["-9", &pid]).status();
        while Path::new(&format!("/proc/{pid}")).exists()
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.running = false;
    }

    /// Stops the node and waits for its process to exit. Blocking.
    pub(super) fn stop(&mut self) {
        if !self.running {
            return;
        }
        let pid_file = self.file("pid");
        let (ok, out) = self.ctl(
            &["stop", pid_file.to_str().unwrap()],
            Duration::from_secs(60),
        );
        if !ok {
            // Last resort, so no node outlives the test.
            if let Ok(pid) = std::fs::read_to_string(&pid_file) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
        self.running = false;
        assert!(ok, "rabbitmqctl stop {} failed: {out}", self.name);
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if self.running {
            // Not `stop()`: no second panic while unwinding.
            let pid_file = self.file("pid");
            let (ok, _) = self.ctl(
                &["stop", pid_file.to_str().unwrap()],
                Duration::from_secs(60),
            );
            if !ok && let Ok(pid) = std::fs::read_to_string(&pid_file) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
            self.running = false;
        }
    }
}

/// Deletes queues and exchanges of the shared broker when dropped, also when the test panics.
struct SharedCleanup {
    exchanges: Vec<String>,
    queues: Vec<String>,
}

impl Drop for SharedCleanup {
    fn drop(&mut self) {
        let exchanges = std::mem::take(&mut self.exchanges);
        let queues = std::mem::take(&mut self.queues);
        // Its own thread and runtime: this may run inside the test's runtime, or while unwinding.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    let (_conn, ch) = channel(BROKER).await;
                    let e: Vec<&str> = exchanges.iter().map(String::as_str).collect();
                    let q: Vec<&str> = queues.iter().map(String::as_str).collect();
                    cleanup(&ch, &e, &q).await;
                })
                .await;
            });
        })
        .join();
    }
}

/// What the publisher did.
#[derive(Default)]
pub(super) struct Progress {
    /// Messages the broker confirmed.
    pub(super) confirmed: AtomicUsize,
    /// Messages sent again because their confirm never came (the connection dropped). Each may
    /// be in the source queue twice, so each may be one duplicate downstream.
    pub(super) republished: AtomicUsize,
    /// Times the publisher had to connect again.
    pub(super) reconnects: AtomicUsize,
}

async fn confirm_channel(url: &str) -> Result<(Connection, Channel), lapin::Error> {
    let conn = match tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(c) => c?,
        Err(_) => return Err(std::io::Error::other("connect timed out").into()),
    };
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

/// Publishes `m0..m{n-1}` to `queue` (persistent, with publisher confirms) at about `per_sec`
/// messages a second, in batches of 100. Survives the broker going away: reconnects, and sends
/// again every message whose confirm did not come. Err if not done within `limit`.
pub(super) async fn publish_stream(
    url: String,
    queue: String,
    n: usize,
    per_sec: usize,
    progress: Arc<Progress>,
    limit: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    let mut todo: VecDeque<usize> = (0..n).collect();
    let mut link: Option<(Connection, Channel)> = None;
    let mut sent = 0usize;
    while !todo.is_empty() {
        if started.elapsed() > limit {
            return Err(format!(
                "publisher: {} of {n} messages still unconfirmed after {limit:?}",
                todo.len()
            ));
        }
        let ch = match &link {
            Some((conn, ch)) if conn.status().connected() && ch.status().connected() => ch.clone(),
            _ => {
                if link.take().is_some() {
                    progress.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                match confirm_channel(&url).await {
                    Ok(l) => link = Some(l),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
                continue;
            }
        };
        let batch: Vec<usize> = todo.drain(..todo.len().min(100)).collect();
        let mut pending = Vec::with_capacity(batch.len());
        let mut failed = Vec::new();
        for &i in &batch {
            let mut headers = FieldTable::default();
            headers.insert("topic".into(), AMQPValue::LongString("/p1/d1/post".into()));
            let result = ch
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("{{\"i\":{i}}}").as_bytes(),
                    BasicProperties::default()
                        .with_headers(headers)
                        .with_message_id(format!("m{i}").into())
                        .with_delivery_mode(2),
                )
                .await;
            match result {
                Ok(confirm) => pending.push((i, confirm)),
                Err(_) => failed.push(i),
            }
        }
        // A confirm that has not come within 10 s is treated as lost.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for (i, confirm) in pending {
            match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(c)) if c.is_ack() => {
                    progress.confirmed.fetch_add(1, Ordering::Relaxed);
                }
                _ => failed.push(i),
            }
        }
        if !failed.is_empty() {
            progress
                .republished
                .fetch_add(failed.len(), Ordering::Relaxed);
            failed.sort_unstable();
            for i in failed.into_iter().rev() {
                todo.push_front(i);
            }
            if let Some((conn, _)) = link.take() {
                progress.reconnects.fetch_add(1, Ordering::Relaxed);
                let _ = conn.close(200, "".into()).await;
            }
            continue;
        }
        sent += batch.len();
        let due = started + Duration::from_secs_f64(sent as f64 / per_sec as f64);
        tokio::time::sleep_until(due.into()).await;
    }
    if let Some((conn, _)) = link {
        let _ = conn.close(200, "".into()).await;
    }
    Ok(())
}

/// Waits until the source queue is empty and the destination holds at least `n` messages and
/// has stopped growing, or `limit` passes (the caller's count then shows what is missing).
pub(super) async fn wait_settled(url: &str, source: &str, dest: &str, n: usize, limit: Duration) {
    let (conn, _ch) = channel(url).await;
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        let src = queue_depth(&conn, source).await;
        let dst = queue_depth(&conn, dest).await;
        if src == Some(0) && dst.is_some_and(|d| d as usize >= n) && dst == last {
            break;
        }
        last = dst;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = conn.close(200, "".into()).await;
}

/// Takes every message of `dest` and counts them per message id: (missing ids, duplicates).
pub(super) async fn tally(url: &str, dest: &str, n: usize) -> (Vec<usize>, usize, usize) {
    let (conn, ch) = channel(url).await;
    let got = drain(&ch, dest, n, Duration::from_secs(1)).await;
    let _ = conn.close(200, "".into()).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for d in &got {
        let id = header(d, "messageId").expect("forwarded messages carry messageId");
        *seen.entry(id).or_default() += 1;
    }
    let missing: Vec<usize> = (0..n)
        .filter(|i| !seen.contains_key(&format!("m{i}")))
        .collect();
    let duplicates = got.len() - seen.len();
    (missing, duplicates, got.len())
}

pub(super) fn write_forward_rule(dir: &Path, exchange: &str) {
    std::fs::write(
        dir.join("forward.toml"),
        format!(
            "sql = '''SELECT * FROM \"/p1/#\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"{exchange}\"\n"
        ),
    )
    .unwrap();
}

async fn readyz(base: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    match client.get(format!("{base}/readyz")).send().await {
        Ok(r) => Some(r.status().as_u16()),
        Err(_) => None,
    }
}

/// Polls `check` every 20 ms until it holds; the time it took, or None after `limit`.
async fn time_until(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing_and_resumes_within_5_s() {
    let _serial = SERIAL.lock().await;
    let test_started = Instant::now();
    let mut node = tokio::task::block_in_place(|| {
        let mut node = TestNode::new();
        node.start();
        node
    });
    let url = node.url();
    println!(
        "broker restart: test node {} on port {} up after {:?}",
        node.name,
        node.port,
        test_started.elapsed()
    );
    let source = unique("restart-src");
    let dest = unique("restart-dst");
    let dest_q = format!("{dest}.q");
    {
        // Durable, so they survive the restart (the source queue is declared as the daemon does).
        let (conn, ch) = channel(&url).await;
        let durable = || QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(source.as_str().into(), durable(), FieldTable::default())
            .await
            .unwrap();
        ch.exchange_declare(
            dest.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(dest_q.as_str().into(), durable(), FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind(
            dest_q.as_str().into(),
            dest.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "".into()).await;
    }
    let rules = tempfile::tempdir().unwrap();
    write_forward_rule(rules.path(), &dest);
    let daemon = Daemon::start(rules.path(), |c| {
        c.broker.as_mut().unwrap().url = url.clone();
        c.source.amqp = Some(AmqpSourceConfig {
            queue: source.clone(),
            prefetch: 200,
            declare: true,
            topic_from: TopicFrom::Header,
            trust_identity_headers: false,
            queue_type: Default::default(),
        });
    })
    .await;
    daemon.wait_ready().await;

    let progress = Arc::new(Progress::default());
    let publisher = tokio::spawn(publish_stream(
        url.clone(),
        source.clone(),
        N,
        2_000,
        Arc::clone(&progress),
        Duration::from_secs(100),
    ));
    // Restart once a good part of the stream went through, with most of it still to come.
    let mid = time_until(Duration::from_secs(30), async || {
        progress.confirmed.load(Ordering::Relaxed) >= N / 4
    })
    .await;
    assert!(
        mid.is_some(),
        "the publisher did not get {} messages confirmed within 30 s",
        N / 4
    );
    let received = async || {
        metric(
            &daemon.metrics().await,
            "iotfwd_messages_received_total",
            &[("source", "amqp")],
        )
    };
    assert!(
        received().await > 0.0,
        "the daemon consumes before the restart"
    );
    let stopping = Instant::now();
    tokio::task::block_in_place(|| node.stop());
    println!(
        "broker restart: node stopped after {} confirmed publishes ({:?} to stop)",
        progress.confirmed.load(Ordering::Relaxed),
        stopping.elapsed()
    );
    let not_ready = time_until(Duration::from_secs(5), async || {
        readyz(&daemon.base).await == Some(503)
    })
    .await;
    assert!(
        not_ready.is_some(),
        "/readyz still said ready 5 s after the broker went down"
    );
    println!(
        "broker restart: /readyz 503 {:?} after the node finished stopping",
        not_ready.unwrap()
    );
    // Still not ready just before the broker comes back: it reports the outage, not a blip.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        readyz(&daemon.base).await,
        Some(503),
        "/readyz while the broker is down"
    );
    let received_before = received().await;
    tokio::task::block_in_place(|| node.start());
    let back = Instant::now();
    println!(
        "broker restart: node back after {:?} down",
        stopping.elapsed()
    );

    // Resumed: ready again, consuming again, and publishing again (new messages arrive in the
    // destination), each measured from the moment `await_startup` returned.
    let (conn, _ch) = channel(&url).await;
    let depth_at_start = queue_depth(&conn, &dest_q).await.unwrap_or(0);
    let (ready_at, consuming_at, forwarding_at) = tokio::join!(
        async {
            time_until(Duration::from_secs(10), async || {
                readyz(&daemon.base).await == Some(200)
            })
            .await
            .map(|_| back.elapsed())
        },
        async {
            time_until(Duration::from_secs(10), async || {
                received().await > received_before
            })
            .await
            .map(|_| back.elapsed())
        },
        async {
            time_until(Duration::from_secs(10), async || {
                queue_depth(&conn, &dest_q).await.unwrap_or(0) > depth_at_start
            })
            .await
            .map(|_| back.elapsed())
        },
    );
    let _ = conn.close(200, "".into()).await;
    println!(
        "broker restart: after await_startup returned: /readyz 200 in {ready_at:?}, consuming in \
         {consuming_at:?}, first new message in the destination in {forwarding_at:?}"
    );
    let bound = Duration::from_secs(5);
    for (what, t) in [
        ("/readyz 200", ready_at),
        ("consuming", consuming_at),
        ("the first new message in the destination", forwarding_at),
    ] {
        assert!(
            t.is_some_and(|t| t <= bound),
            "{what} not within 5 s of the broker coming back: {t:?}"
        );
    }

    let published = tokio::time::timeout(Duration::from_secs(100), publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();
    published.unwrap();
    wait_settled(&url, &source, &dest_q, N, Duration::from_secs(60)).await;
    let (missing, duplicates, total) = tally(&url, &dest_q, N).await;
    println!(
        "broker restart: {total} forwarded for {N} published: {} missing, {duplicates} \
         duplicates (publisher: {} re-sent after the outage, {} reconnects); test took {:?}",
        missing.len(),
        progress.republished.load(Ordering::Relaxed),
        progress.reconnects.load(Ordering::Relaxed),
        test_started.elapsed()
    );
    assert!(
        missing.is_empty(),
        "{} message ids never reached the destination, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    daemon.stop().await;
    tokio::task::block_in_place(|| node.stop());
}

/// The real binary on the shared broker, consuming `source` with `prefetch`: the `run`-th
/// start in `dir`.
async fn start_daemon(dir: &Path, source: &str, prefetch: u16, run: usize) -> ChildDaemon {
    let toml_str = |p: PathBuf| format!("{:?}", p.display().to_string());
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\
         [rules]\ndir = {}\n\
         [data]\ndir = {}\n\
         [broker]\nurl = \"{BROKER}\"\n\
         [source.amqp]\nqueue = \"{source}\"\nprefetch = {prefetch}\n",
        toml_str(dir.join("rules")),
        toml_str(dir.join("data")),
    );
    ChildDaemon::start(dir, run, &config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_kill_9_mid_stream_loses_nothing_and_duplicates_at_most_prefetch() {
    let _serial = SERIAL.lock().await;
    let test_started = Instant::now();
    const PREFETCH: u16 = 100;
    let source = unique("kill-src");
    let dest = unique("kill-dst");
    let (conn, ch) = channel(BROKER).await;
    let dest_q = exchange_with_queue(&ch, &dest).await;
    let _cleanup = SharedCleanup {
        exchanges: vec![dest.clone()],
        queues: vec![source.clone(), dest_q.clone()],
    };
    // As the daemon declares it, so publishing can start before it is up.
    super::rabbit::durable_queue(&ch, &source).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    write_forward_rule(&dir.path().join("rules"), &dest);
    let first = start_daemon(dir.path(), &source, PREFETCH, 1).await;

    let progress = Arc::new(Progress::default());
    let publisher = tokio::spawn(publish_stream(
        BROKER.into(),
        source.clone(),
        N,
        2_000,
        Arc::clone(&progress),
        Duration::from_secs(60),
    ));
    // Kill it once a quarter of the stream was forwarded.
    let mid = time_until(Duration::from_secs(60), async || {
        queue_depth(&conn, &dest_q).await.unwrap_or(0) as usize >= N / 4
    })
    .await;
    assert!(
        mid.is_some(),
        "the daemon did not forward {} messages within 60 s; its log:\n{}",
        N / 4,
        first.log_text()
    );
    let scrape = first.metrics().await;
    let mut first = first;
    first.child.kill().unwrap(); // SIGKILL
    let status = first.child.wait().unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    }
    let forwarded_at_kill = queue_depth(&conn, &dest_q).await.unwrap_or(0);
    println!(
        "daemon kill: SIGKILL after {forwarded_at_kill} forwarded ({} received by then, {} \
         confirmed publishes)",
        metric(
            &scrape,
            "iotfwd_messages_received_total",
            &[("source", "amqp")]
        ),
        progress.confirmed.load(Ordering::Relaxed)
    );
    drop(first);

    let second = start_daemon(dir.path(), &source, PREFETCH, 2).await;
    let published = tokio::time::timeout(Duration::from_secs(70), publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();
    published.unwrap();
    wait_settled(BROKER, &source, &dest_q, N, Duration::from_secs(60)).await;
    let (missing, duplicates, total) = tally(BROKER, &dest_q, N).await;
    println!(
        "daemon kill: {total} forwarded for {N} published: {} missing, {duplicates} duplicates \
         (prefetch {PREFETCH}; publisher re-sent {}); test took {:?}",
        missing.len(),
        progress.republished.load(Ordering::Relaxed),
        test_started.elapsed()
    );
    assert!(
        missing.is_empty(),
        "{} message ids never reached the destination, e.g. {:?}; second daemon's log:\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        second.log_text()
    );
    assert!(
        duplicates <= PREFETCH as usize,
        "{duplicates} duplicates, more than the prefetch window ({PREFETCH})"
    );
    drop(second);
    let _ = conn.close(200, "".into()).await;
}
