//! The daemon in-process for the integration tests: `iotfwd::daemon::run` bound on
//! 127.0.0.1:0 with a test's config tweak, the HTTP calls the tests make, and the helpers they
//! share (`metric`, `unique`, `eventually`).

use std::path::Path;
use std::time::{Duration, Instant};

use iotfwd::config::Config;
use iotfwd::config::broker::BrokerConfig;
use serde_json::Value;
use tokio::sync::oneshot;

/// The machine's shared RabbitMQ.
pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The daemon running in this process; `stop` ends it and fails the test if it failed.
pub struct Daemon {
    pub base: String,
    /// Where the AMQP 1.0 consumer-group endpoint listens, when it runs.
    pub amqp: Option<std::net::SocketAddr>,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// With [broker] at `BROKER`, rules from `rules_dir`, data under `rules_dir/data` and 2 ms
    /// batches; `tweak` comes last. Returns once the HTTP server answers: the broker may still
    /// be connecting (see `wait_ready`).
    pub async fn start(rules_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Daemon {
        Daemon::start_without_broker(rules_dir, |c| {
            c.engine.batch_max_wait_ms = 2;
            c.broker = Some(BrokerConfig {
                reconnect_max_delay_ms: 500,
                ..BrokerConfig::new(BROKER)
            });
            tweak(c);
        })
        .await
    }

    /// With no broker, rules from `rules_dir`, data under `rules_dir/data` and 1 ms batches;
    /// `tweak` comes last. Returns once the HTTP server answers.
    pub async fn start_without_broker(rules_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Daemon {
        let mut config = Config::default();
        config.rules.dir = rules_dir.to_owned();
        config.data.dir = rules_dir.join("data");
        config.engine.batch_max_wait_ms = 1;
        tweak(&mut config);
        Daemon::launch(config, None).await
    }

    /// With the config loaded from `file`, as `iotfwd run --config file` does (so SIGHUP and
    /// the reload API re-read it). Returns once the HTTP server answers.
    pub async fn start_from_file(file: &Path) -> Daemon {
        let config = Config::load(file).unwrap_or_else(|errors| {
            panic!(
                "{}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        Daemon::launch(config, Some(file.to_owned())).await
    }

    /// Runs the daemon on 127.0.0.1:0 (from `file` when given) until `stop`; returns once the
    /// HTTP server answers.
    async fn launch(config: Config, file: Option<std::path::PathBuf>) -> Daemon {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let amqp = if iotfwd::subscription::wants_listener(&config) {
            let listener = tokio::net::TcpListener::bind(&config.subscription.listen)
                .await
                .unwrap();
            Some(listener)
        } else {
            None
        };
        let base = format!("http://{}", http.local_addr().unwrap());
        let amqp_addr = amqp.as_ref().map(|l| l.local_addr().unwrap());
        let listeners = iotfwd::daemon::Listeners { http, amqp };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            iotfwd::daemon::run_from_file(config, file.as_deref(), listeners, async move {
                let _ = stopped.await;
            })
            .await
        });
        let mut d = Daemon {
            base,
            amqp: amqp_addr,
            client: reqwest::Client::new(),
            stop: Some(stop),
            task,
        };
        d.wait_answering().await;
        d
    }

    /// Polls `/healthz` until it answers 200, for at most 15 s; a daemon that stopped while
    /// starting fails the test with its error.
    async fn wait_answering(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = self.client.get(self.url("/healthz")).send().await
                && r.status().is_success()
            {
                return;
            }
            if self.task.is_finished() {
                let result = (&mut self.task).await;
                panic!("the daemon stopped while starting: {result:?}");
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls `/readyz` until it answers 2xx (rules loaded, broker connected), for at most 10 s.
    pub async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("daemon not ready within 10 s");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /api/v1/messages?verbose=true` with one envelope or NDJSON, which must answer
    /// 200: the report.
    pub async fn post(&self, body: impl ToString) -> Value {
        let (status, report) = self
            .post_to("/api/v1/messages?verbose=true", body.to_string())
            .await;
        assert_eq!(status, 200, "POST /api/v1/messages: {report}");
        report
    }

    /// `POST path` with this body: (status, the reply as JSON, or as a JSON string if it is
    /// not JSON).
    pub async fn post_to(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `GET path`: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// `GET path`, which must answer 2xx: the reply as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// A `/metrics` scrape, for `metric`.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.1
    }

    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Sums a metric's samples whose label set contains every `labels` pair.
pub fn metric(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// A unique name per test run.
pub fn unique(prefix: &str) -> String {
    format!(
        "iotfwd-test-{prefix}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Polls `f` until it gives `Some`, for at most 15 s.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where a daemon started as a child process (`iotfwd run`, listening on port 0) listens:
/// its HTTP address and, when `amqp`, its AMQP 1.0 endpoint, read from the log it writes to
/// `stderr`. A thread keeps draining the log afterwards so the child never blocks on it.
pub fn listening(
    stderr: std::process::ChildStderr,
    amqp: bool,
) -> (std::net::SocketAddr, Option<std::net::SocketAddr>) {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut http, mut endpoint) = (None, None);
    let mut seen = Vec::new();
    while http.is_none() || (amqp && endpoint.is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "the daemon did not log where it listens within 15 s:\n{}",
                seen.join("\n")
            )
        });
        let line = strip_ansi(&line);
        match listening_line(&line) {
            Some(Listening::Http(a)) => http = Some(a),
            Some(Listening::Amqp(a)) => endpoint = Some(a),
            None => {}
        }
        seen.push(line);
    }
    (http.expect("an HTTP address"), endpoint)
}

enum Listening {
    Http(std::net::SocketAddr),
    Amqp(std::net::SocketAddr),
}

/// What the daemon's start-up log line `line` says about where it listens.
fn listening_line(line: &str) -> Option<Listening> {
    if let Some((_, rest)) = line.split_once("listening: POST http://") {
        return rest.split('/').next()?.parse().ok().map(Listening::Http);
    }
    if line.contains("consumer-group endpoint listening") {
        let (_, rest) = line.split_once("addr=")?;
        return rest.split(' ').next()?.parse().ok().map(Listening::Amqp);
    }
    None
}

/// `line` without terminal colour escapes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A test's external tool is missing: under CI (`CI=true`) that fails the test, since
/// `scripts/test` installs every tool; elsewhere it says SKIPPED loudly and the caller
/// returns, so the rest still runs on a bare machine.
pub fn tool_missing(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("a tool this test needs is missing under CI: {why}");
    }
    eprintln!("\n**********\nSKIPPED: {why}\n**********\n");
}

/// The iotfwd binary the child-process tests run: this build's (`CARGO_BIN_EXE_iotfwd`), or
/// `IOTFWD_BIN` when set (a target directory shared by several checkouts may hold another
/// checkout's binary at that path by the time the test runs).
pub fn daemon_binary() -> std::path::PathBuf {
    std::env::var_os("IOTFWD_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_iotfwd").into())
}

/// The real binary (`iotfwd run --config FILE`) as a child process with its own config file
/// and log under a test's directory; SIGKILLed on drop.
pub struct ChildDaemon {
    pub child: std::process::Child,
    /// `http://<address>` of its HTTP server.
    pub base: String,
    /// Where its AMQP 1.0 endpoint listens, when it runs one.
    pub amqp: Option<std::net::SocketAddr>,
    log: std::path::PathBuf,
}

impl ChildDaemon {
    /// Writes `config` (TOML) to `dir/iotfwd-<run>.toml` and runs the binary on it, its output
    /// in `dir/iotfwd-<run>.log`; returns once `/readyz` answers 200, within 30 s. The config
    /// listens on port 0: the addresses come from the daemon's start-up log lines.
    pub async fn start(dir: &Path, run: usize, config: &str) -> ChildDaemon {
        let file = dir.join(format!("iotfwd-{run}.toml"));
        std::fs::write(&file, config).unwrap();
        let log = dir.join(format!("iotfwd-{run}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(daemon_binary())
            .arg("run")
            .arg("--config")
            .arg(&file)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("run iotfwd");
        let mut d = ChildDaemon {
            child,
            base: String::new(),
            amqp: None,
            log,
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if d.base.is_empty()
                && let Some(Listening::Http(a)) = d.listening(|l| matches!(l, Listening::Http(_)))
            {
                d.base = format!("http://{a}");
            }
            if !d.base.is_empty()
                && let Ok(r) = client.get(format!("{}/readyz", d.base)).send().await
                && r.status().as_u16() == 200
            {
                // Ready means every listener is up, so its line is in the log by now.
                if let Some(Listening::Amqp(a)) = d.listening(|l| matches!(l, Listening::Amqp(_))) {
                    d.amqp = Some(a);
                }
                return d;
            }
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!(
                    "iotfwd (run {run}) exited while starting ({status}); its log:\n{}",
                    d.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "iotfwd (run {run}) not ready within 30 s; its log:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first start-up line of the log that `want` picks.
    fn listening(&self, want: impl Fn(&Listening) -> bool) -> Option<Listening> {
        self.log_text()
            .lines()
            .filter_map(|l| listening_line(&strip_ansi(l)))
            .find(|l| want(l))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the log holds from byte `offset` on (lossily as text), and where it ends now: a
    /// test that watches the log as it grows reads each part once.
    pub fn log_from(&self, offset: u64) -> (String, u64) {
        use std::io::{Read as _, Seek as _};
        let Ok(mut file) = std::fs::File::open(&self.log) else {
            return (String::new(), offset);
        };
        let mut bytes = Vec::new();
        if file.seek(std::io::SeekFrom::Start(offset)).is_err()
            || file.read_to_end(&mut bytes).is_err()
        {
            return (String::new(), offset);
        }
        let end = offset + bytes.len() as u64;
        (String::from_utf8_lossy(&bytes).into_owned(), end)
    }

    /// Its `/metrics` scrape.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill_9(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
