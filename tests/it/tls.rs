//! TLS on every link, against real peers, with certificates made at run time (rcgen): a CA, a
//! server and a client certificate signed by it, and a second CA that signed nothing here.
//!
//! - HTTPS ingest: `iotfwd send --ca-file` (the real CLI) posts over HTTPS and the rule's output
//!   reaches RabbitMQ; plain HTTP to the TLS port, and a client that does not trust the CA,
//!   get nowhere; the header time-out also closes a socket that never finishes its handshake.
//! - `iotfwd check` reports an unreadable certificate and a key that does not fit at their lines.
//! - amqps: a RabbitMQ node of the test's own with a TLS listener that wants client
//!   certificates; a rule forwards over amqps and the message arrives. A CA that did not sign
//!   the node's certificate, and a missing client certificate, are clear connection errors in
//!   health, and the message is 9325, not taken (503).
//! - mqtts: a Mosquitto of the test's own with a TLS listener; the MQTT source and an `mqtt`
//!   action both over mqtts.
//! - rediss: a Redis of the test's own with only a TLS listener that wants client certificates;
//!   shared quotas take tokens over it, and a wrong CA or a missing client certificate leave the
//!   backend down with a reason that names the certificate problem.
//! - PostgreSQL (`[store.tls]`): a PostgreSQL of the test's own that takes only TLS
//!   connections (`hostssl`, a SCRAM password bound to the session, a client certificate);
//!   records are written and read back over TLS, a plain client is refused, and a wrong CA, no
//!   client certificate or no TLS leave the store down with the reason in health.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use iotfwd::client::http::{Call, call};
use iotfwd::config::Config;
use iotfwd::config::broker::BrokerConfig;
use iotfwd::config::mqtt::{MqttConfig, MqttSourceConfig};
use iotfwd::config::tls::{ClientTls, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;

use super::harness::{Daemon, daemon_binary, eventually, tool_missing, unique};
use super::rabbit::{BROKER, channel, cleanup, drain, exchange_with_queue};
use super::restarts::{TestNode, port_for_node};

/// The PEM files of a test: `ca.pem`; `server.pem`/`server.key` and `client.pem`/`client.key`
/// signed by it (both valid for localhost and 127.0.0.1); `other-ca.pem`, a CA that signed
/// nothing here.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes the files in `dir` (created, readable by every user: a broker that drops to its
    /// own user reads them).
    fn new(dir: &Path) -> Pki {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pki = Pki {
            dir: dir.to_owned(),
        };
        let ca = pki.ca("iotfwd test CA", "ca.pem");
        pki.leaf(&ca, "server", ExtendedKeyUsagePurpose::ServerAuth);
        pki.leaf(&ca, "client", ExtendedKeyUsagePurpose::ClientAuth);
        pki.ca("a CA that signed nothing here", "other-ca.pem");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        pki
    }

    fn ca(&self, name: &str, file: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(self.path(file), ca.pem()).unwrap();
        ca
    }

    fn leaf(
        &self,
        ca: &CertifiedIssuer<'static, KeyPair>,
        name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("iotfwd test {name}"));
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn server(&self) -> ServerTls {
        ServerTls {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
        }
    }

    /// A client trusting `ca` (a file of this set), with the client certificate when `identity`.
    fn client(&self, ca: &str, identity: bool) -> ClientTls {
        ClientTls {
            ca_file: Some(self.path(ca)),
            cert: identity.then(|| self.path("client.pem")),
            key: identity.then(|| self.path("client.key")),
        }
    }
}

/// One rule forwarding every `/p1/...` message to `exchange`.
fn forward_rule(rules: &Path, exchange: &str) {
    std::fs::create_dir_all(rules).unwrap();
    std::fs::write(
        rules.join("forward.toml"),
        format!(
            "sql = '''SELECT n FROM \"/p1/#\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"{exchange}\"\n\
             retry = {{ max_retries = 1, initial_delay_ms = 10, max_delay_ms = 10 }}\n"
        ),
    )
    .unwrap();
}

/// Runs `iotfwd <args>` (the real binary) to its end: (success, stdout, stderr).
async fn iotfwd(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(daemon_binary())
            .args(&args)
            .env_remove("IOTFWD_CA_FILE")
            .env_remove("IOTFWD_TOKEN")
            .output()
            .expect("run iotfwd");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// `GET base + path` over HTTPS trusting `ca`: (status, body).
async fn https_get(base: &str, path: &str, ca: &Path) -> anyhow::Result<(u16, String)> {
    let url = url::Url::parse(&format!("{base}{path}"))?;
    let (status, body) = call(Call {
        method: hyper::Method::GET,
        url: &url,
        json: None,
        token: None,
        ca_file: Some(ca),
    })
    .await?;
    Ok((status.as_u16(), body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_ingest_trusts_the_ca_and_refuses_plain_http_and_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let exchange = unique("tls-http");
    let (conn, ch) = channel(BROKER).await;
    let queue = exchange_with_queue(&ch, &exchange).await;
    let rules = dir.path().join("rules");
    forward_rule(&rules, &exchange);

    let mut config = Config::default();
    config.rules.dir = rules.clone();
    config.data.dir = dir.path().join("data");
    config.engine.batch_max_wait_ms = 1;
    config.subscription.enabled = false;
    config.broker = Some(BrokerConfig::new(BROKER));
    config.http.tls = Some(pki.server());
    config.http.header_timeout_ms = 500;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = http.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(iotfwd::daemon::run(
        config,
        iotfwd::daemon::Listeners { http, amqp: None },
        async move {
            let _ = stopped.await;
        },
    ));
    let base = format!("https://localhost:{port}");
    let ca = pki.path("ca.pem");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match https_get(&base, "/readyz", &ca).await {
            Ok((200, _)) => break,
            other => assert!(
                Instant::now() < deadline && !task.is_finished(),
                "the HTTPS daemon is not ready: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The CLI, as an operator runs it, trusting the CA.
    let send = |extra: &[&str]| {
        let mut args: Vec<String> = ["send", "--url", &base, "--topic", "/p1/d1/user/update"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(["--payload".to_owned(), json!({"n": 7}).to_string()]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        iotfwd(args)
    };
    let (ok, out, err) = send(&["--ca-file", ca.to_str().unwrap()]).await;
    assert!(ok, "iotfwd send over HTTPS failed: {err}\n{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["messages"][0]["rules"][0]["actions"][0]["code"], 200,
        "{report}"
    );
    let got = drain(&ch, &queue, 1, Duration::from_millis(200)).await;
    assert_eq!(got.len(), 1);
    let body: Value = serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(body, json!({"n": 7}));

    // A client that trusts only the system's roots: the test CA is not one of them.
    let (ok, _, err) = send(&[]).await;
    assert!(!ok, "a client that does not trust the CA got through");
    assert!(
        err.contains("not signed by a CA this client trusts"),
        "the error should say why: {err}"
    );
    // Nor does a client trusting another CA.
    let (ok, _, err) = send(&["--ca-file", pki.path("other-ca.pem").to_str().unwrap()]).await;
    assert!(!ok && err.contains("(--ca-file)"), "{err}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // A socket that never starts its handshake is closed within the header time-out, and so
    // is one that finishes it but sends no request.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut [0u8; 64])).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a socket without a handshake stayed open: {closed:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    let config = iotfwd::tls::client_config_trusting(Some(&ca)).unwrap();
    let mut quiet = iotfwd::tls::connect(config, "localhost", port, "--ca-file")
        .await
        .expect("the handshake succeeds");
    let closed = tokio::time::timeout(Duration::from_secs(5), quiet.read(&mut [0u8; 64])).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a TLS connection without a request stayed open: {closed:?}"
    );

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    cleanup(&ch, &[&exchange], &[&queue]).await;
    let _ = conn.close(200, "".into()).await;
}

/// Writes `text` to the config file `file` and runs `iotfwd check` on it: (ok, stderr).
async fn check(file: &Path, text: String) -> (bool, String) {
    std::fs::write(file, text).unwrap();
    let (ok, _, err) = iotfwd(vec![
        "check".into(),
        "--config".into(),
        file.to_str().unwrap().into(),
    ])
    .await;
    (ok, err)
}

#[tokio::test]
async fn check_reports_bad_pem_files_at_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    let file = dir.path().join("iotfwd.toml");
    let (ok, err) = check(
        &file,
        format!(
            "[rules]\ndir = {:?}\n[http.tls]\ncert = {:?}\nkey = {:?}\n\
             [subscription.tls]\ncert = {:?}\nkey = {:?}\n",
            dir.path().join("rules"),
            junk,
            pki.path("server.key"),
            pki.path("server.pem"),
            pki.path("client.key"),
        ),
    )
    .await;
    assert!(!ok, "{err}");
    let at = file.display();
    assert!(
        err.contains(&format!(
            "{at}:4:8: http.tls.cert: {}: no certificate in the file",
            junk.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{at}:8:7: subscription.tls.key: "))
            && err.contains("does not fit the certificate"),
        "{err}"
    );
    assert!(err.contains("2 problem(s)"), "{err}");

    // A file that is not here is a warning: it may be a secret mounted where the daemon runs.
    let missing = dir.path().join("mounted-elsewhere.pem");
    let (ok, err) = check(&file, format!(
        "[rules]\ndir = {:?}\n[broker]\nurl = \"amqps://h/%2f\"\n[broker.tls]\nca_file = {:?}\n",
        dir.path().join("rules"),
        missing,
    )).await;
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!(
            "warning: {at}:6:11: broker.tls.ca_file: {}: no such file; `iotfwd run` here would not start",
            missing.display()
        )),
        "{err}"
    );

    // [store.tls] (TLS to PostgreSQL) is read like the other client tables.
    let (ok, err) = check(
        &file,
        format!(
            "[rules]\ndir = {:?}\n[store]\nbackend = \"postgres\"\n\
         url = \"postgres://iotfwd@db:5432/iotfwd\"\n[store.tls]\nca_file = {:?}\n",
            dir.path().join("rules"),
            junk,
        ),
    )
    .await;
    assert!(!ok, "{err}");
    assert!(
        err.contains(&format!(
            "{at}:7:11: store.tls.ca_file: {}: no certificate in the file",
            junk.display()
        )),
        "{err}"
    );
}

/// A RabbitMQ node of the test's own with a TLS listener that asks for client certificates
/// signed by the test CA (and refuses a client without one), and a plain listener to set up
/// and read through. Returns the node, the TLS port and the PEM files (in the node's directory).
async fn tls_node() -> (TestNode, u16, Pki) {
    let tls_port = port_for_node();
    let mut pki = None;
    let node = TestNode::with_config(|dir| {
        let p = Pki::new(&dir.join("pki"));
        let conf = format!(
            "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
             ssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n",
            p.path("ca.pem").display(),
            p.path("server.pem").display(),
            p.path("server.key").display(),
        );
        pki = Some(p);
        conf
    });
    let node = tokio::task::spawn_blocking(move || {
        let mut node = node;
        node.start();
        node
    })
    .await
    .unwrap();
    (node, tls_port, pki.unwrap())
}

/// The broker at the node's TLS port with `tls`, reconnecting quickly and waiting for a
/// connection at most a second per publish.
fn amqps(tls_port: u16, tls: ClientTls) -> BrokerConfig {
    BrokerConfig {
        reconnect_max_delay_ms: 200,
        confirm_timeout_ms: 1_000,
        tls: Some(tls),
        ..BrokerConfig::new(format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_client_certificates_and_clear_errors_for_a_wrong_ca_or_none() {
    let (node, tls_port, pki) = tls_node().await;
    let (conn, ch) = channel(&node.url()).await;
    let exchange = unique("tls-amqps");
    let queue = exchange_with_queue(&ch, &exchange).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    forward_rule(&rules, &exchange);
    let start = |tls: ClientTls, data: &str| {
        let broker = amqps(tls_port, tls);
        let data = dir.path().join(data);
        Daemon::start_without_broker(&rules, move |c| {
            c.subscription.enabled = false;
            c.data.dir = data;
            c.broker = Some(broker);
        })
    };

    // The CA that signed the node's certificate, and a client certificate it signed too.
    let d = start(pki.client("ca.pem", true), "ok").await;
    d.wait_ready().await;
    let report = d
        .post(json!({"topic": "/p1/d1/user/update", "payload": {"n": 1}}))
        .await;
    let action = &report["messages"][0]["rules"][0]["actions"][0];
    assert_eq!(action["code"], 200, "{report}");
    let got = drain(&ch, &queue, 1, Duration::from_millis(200)).await;
    assert_eq!(got.len(), 1, "the message did not arrive over amqps");
    assert_eq!(
        serde_json::from_slice::<Value>(&got[0].data).unwrap(),
        json!({"n": 1})
    );
    d.stop().await;

    // Each failing case: the health says why, and a message is 9325 and not taken (503: the
    // dead-letter queue is on the same broker, so the client is told to send it again).
    for (tls, data, why) in [
        (
            pki.client("other-ca.pem", true),
            "other-ca",
            "the server's certificate is not signed by a CA this client trusts (broker.tls.ca_file)",
        ),
        (
            pki.client("ca.pem", false),
            "no-client-cert",
            "does it require a client certificate",
        ),
    ] {
        let d = start(tls, data).await;
        let health = eventually("the broker's connection error in health", || async {
            let h = d.get_json("/api/v1/health").await;
            h["broker"]["lastError"].as_str().map(str::to_owned)
        })
        .await;
        assert!(
            health.contains(why) && health.contains(&format!("127.0.0.1:{tls_port}")),
            "{data}: {health}"
        );
        assert!(!health.contains("guest:guest"), "no password: {health}");
        let (status, body) = d
            .post_to(
                "/api/v1/messages?verbose=true",
                json!({"topic": "/p1/d1/user/update", "payload": {"n": 2}}).to_string(),
            )
            .await;
        assert_eq!(status, 503, "{data}: {body}");
        assert_eq!(
            body["messages"][0]["rules"][0]["actions"][0]["code"], 9325,
            "{data}: {body}"
        );
        d.stop().await;
    }
    assert!(
        drain(&ch, &queue, 0, Duration::from_millis(500))
            .await
            .is_empty()
    );
    let _ = conn.close(200, "".into()).await;
    // Its data is not needed again: SIGKILL is faster than a clean stop.
    let mut node = node;
    tokio::task::spawn_blocking(move || node.kill())
        .await
        .unwrap();
}

/// A server of the test's own (Mosquitto, Redis, PostgreSQL) with only a TLS listener on
/// `port`, stopped when dropped.
struct TlsServer {
    child: std::process::Child,
    port: u16,
    /// Stop with SIGINT (and wait) rather than SIGKILL: PostgreSQL's fast shutdown, which
    /// removes its shared memory and lets its backends end.
    interrupt: bool,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    /// Runs `cmd` and waits until it listens on `port`; `what` and `log` (in `dir`) name it in
    /// the failure.
    fn run(
        what: &str,
        mut cmd: Command,
        port: u16,
        dir: tempfile::TempDir,
        log: &str,
    ) -> TlsServer {
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("run {what}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the TLS {what} did not listen on {port} within 10 s: {}",
                std::fs::read_to_string(dir.path().join(log)).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsServer {
            child,
            port,
            interrupt: false,
            _dir: dir,
        }
    }

    /// A Mosquitto with the server certificate of `pki`; None (after `tool_missing`) without
    /// mosquitto.
    fn mosquitto(pki: &Pki) -> Option<TlsServer> {
        let Some(binary) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            tool_missing("mosquitto is not installed (scripts/test installs it)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("iotfwd-mosquitto-tls-")
            .tempdir()
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = port_for_node();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\n\
                 keyfile {}\nlog_dest file {}\n",
                pki.path("ca.pem").display(),
                pki.path("server.pem").display(),
                pki.path("server.key").display(),
                dir.path().join("mosquitto.log").display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(binary);
        cmd.arg("-c").arg(&conf);
        Some(TlsServer::run("Mosquitto", cmd, port, dir, "mosquitto.log"))
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if self.interrupt {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MQTT client over TLS to 127.0.0.1:`port` trusting `ca`.
fn mqtts_client(port: u16, ca: &Path) -> (AsyncClient, rumqttc::EventLoop) {
    let mut options = MqttOptions::new(
        format!("test-{}", uuid::Uuid::new_v4().simple()),
        "127.0.0.1",
        port,
    );
    options.set_keep_alive(Duration::from_secs(30));
    let tls = iotfwd::tls::client_config_trusting(Some(ca)).unwrap();
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    AsyncClient::new(options, 100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_source_and_destination() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let Some(mosquitto) = TlsServer::mosquitto(&pki) else {
        return;
    };
    let ca = pki.path("ca.pem");
    let (subscriber, mut events) = mqtts_client(mosquitto.port, &ca);
    subscriber
        .subscribe("/out/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match events
            .poll()
            .await
            .expect("the subscriber connects over TLS")
        {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("command.toml"),
        "sql = '''SELECT n, deviceName() AS device FROM \"/p1/#\"'''\n\
         [[action]]\nto = \"mqtt\"\ntopic = \"/out/${device}\"\nqos = 1\n",
    )
    .unwrap();
    let url = format!("mqtts://localhost:{}", mosquitto.port);
    let tls = pki.client("ca.pem", false);
    let daemon = Daemon::start_without_broker(&rules, |c| {
        c.subscription.enabled = false;
        let mut mqtt = MqttConfig::new(url);
        mqtt.client_id = unique("tls");
        mqtt.tls = Some(tls);
        c.mqtt = Some(mqtt);
        c.source.mqtt = Some(MqttSourceConfig::new(&["/p1/#"]));
    })
    .await;
    eventually("the MQTT source to connect over TLS", || async {
        let health = daemon.get_json("/api/v1/health").await;
        (health["mqtt"]["connected"] == true).then_some(())
    })
    .await;

    let (publisher, mut pub_events) = mqtts_client(mosquitto.port, &ca);
    publisher
        .publish(
            "/p1/dev7/user/update",
            QoS::AtLeastOnce,
            false,
            br#"{"n":3}"#.to_vec(),
        )
        .await
        .unwrap();
    let published = tokio::spawn(async move {
        loop {
            match pub_events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("the publisher failed: {e}"),
            }
        }
    });
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) =
                events.poll().await.expect("the subscriber stays connected")
            {
                return p;
            }
        }
    })
    .await
    .expect("the output arrives over mqtts");
    assert_eq!(got.topic, "/out/dev7");
    assert_eq!(
        serde_json::from_slice::<Value>(&got.payload).unwrap(),
        json!({"n": 3, "device": "dev7"})
    );
    published.await.unwrap();
    daemon.stop().await;
}

impl TlsServer {
    /// A Redis with the server certificate of `pki` whose clients must show a certificate
    /// signed by its CA; None (after `tool_missing`) without redis-server.
    fn redis(pki: &Pki) -> Option<TlsServer> {
        let Some(binary) = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            tool_missing("redis-server is not installed (scripts/ensure-redis installs it)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("iotfwd-redis-tls-")
            .tempdir()
            .unwrap();
        let port = port_for_node();
        let mut cmd = Command::new(binary);
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--tls-port")
        .arg(port.to_string())
        .arg("--tls-cert-file")
        .arg(pki.path("server.pem"))
        .arg("--tls-key-file")
        .arg(pki.path("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(pki.path("ca.pem"))
        .args(["--tls-auth-clients", "yes", "--dir"])
        .arg(dir.path())
        .arg("--logfile")
        .arg(dir.path().join("redis.log"));
        Some(TlsServer::run("Redis", cmd, port, dir, "redis.log"))
    }
}

/// Shared quotas over `rediss://` with `[redis.tls]`: the right CA and a client certificate
/// take tokens from the TLS Redis; a CA that did not sign its certificate, or no client
/// certificate where Redis wants one, leave the backend down with a reason that says so, and
/// forwards are refused as `on_backend_down = "refuse"` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_quotas_with_a_ca_and_a_client_certificate() {
    use iotfwd::config::quota::QuotaSet;
    use iotfwd::limits::Limiter;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let Some(redis) = TlsServer::redis(&pki) else {
        return;
    };
    let prefix = unique("itqtls");
    let limiter = |tls: String| {
        let text = format!(
            "[[tenant]]\nid = \"acme\"\nforward_tps = 100\nburst = 100\n\
             [[instance]]\nid = \"acme-1\"\ntenant = \"acme\"\nproducts = [\"pk1\"]\n\
             [quota]\nbackend = \"redis\"\non_backend_down = \"refuse\"\n\
             [redis]\nurl = \"rediss://localhost:{}/0\"\nkey_prefix = \"{prefix}\"\n\
             timeout_ms = 2000\n{tls}",
            redis.port
        );
        let config = Config::from_toml_str(&text, None).unwrap_or_else(|errs| {
            panic!(
                "{}",
                errs.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        Limiter::shared(
            &QuotaSet::from(&config),
            config.redis.as_ref().unwrap(),
            None,
        )
        .unwrap()
    };
    let section = |ca: &str, identity: bool| {
        let mut s = format!("[redis.tls]\nca_file = \"{}\"\n", pki.path(ca).display());
        if identity {
            s += &format!(
                "cert = \"{}\"\nkey = \"{}\"\n",
                pki.path("client.pem").display(),
                pki.path("client.key").display()
            );
        }
        s
    };

    let good = limiter(section("ca.pem", true));
    for _ in 0..20 {
        good.acquire("pk1", "dev1", None, None)
            .await
            .unwrap_or_else(|t| panic!("refused over rediss: {}", t.reason()));
    }
    assert_eq!(good.backend().map(|(_, up)| up), Some(true));

    for (what, tls) in [
        (
            "a CA that did not sign the server's certificate",
            section("other-ca.pem", true),
        ),
        ("no client certificate", section("ca.pem", false)),
    ] {
        let l = limiter(tls);
        let t = l.acquire("pk1", "dev1", None, None).await.expect_err(what);
        println!("{what}: {}", t.reason());
        assert!(
            t.reason().contains("cannot be reached")
                && t.reason().to_lowercase().contains("certificate"),
            "{what}: {}",
            t.reason()
        );
        assert_eq!(l.backend().map(|(_, up)| up), Some(false), "{what}");
    }
}

/// The newest PostgreSQL server binaries of the machine (`/usr/lib/postgresql/<version>/bin`).
fn postgres_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

impl TlsServer {
    /// A PostgreSQL of the test's own, superuser `iotfwd` with `password`, whose pg_hba.conf
    /// takes only TLS connections (`hostssl`) from 127.0.0.1 with a SCRAM password and a client
    /// certificate signed by the CA of `pki` (`clientcert=verify-ca`); it serves the server
    /// certificate of `pki`. None (after `tool_missing`) without PostgreSQL's server binaries.
    /// As root, initdb and the server run as the `postgres` user (initdb refuses root).
    fn postgres(pki: &Pki, password: &str) -> Option<TlsServer> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let Some(bin) = postgres_bin_dir() else {
            tool_missing(
                "PostgreSQL's server binaries (initdb, postgres in /usr/lib/postgresql/<version>/bin) \
                 are not installed (scripts/ensure-postgres installs them)",
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("iotfwd-pg-tls-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let root = std::fs::metadata(dir.path()).unwrap().uid() == 0;
        let command = |program: &str| {
            let program = bin.join(program);
            if root {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--init-groups",
                    "--",
                ])
                .arg(program);
                c
            } else {
                Command::new(program)
            }
        };
        let pwfile = dir.path().join("password");
        std::fs::write(&pwfile, password).unwrap();
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
        let data = dir.path().join("data");
        let initdb = command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "iotfwd",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap_or_else(|e| panic!("run initdb (as root through setpriv: {root}): {e}"));
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        std::fs::remove_file(&pwfile).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n",
        )
        .unwrap();
        // The server reads its files as its own user; the key must be readable by it only.
        let owner = std::fs::metadata(&data).unwrap();
        for (file, mode) in [
            ("server.pem", 0o644),
            ("ca.pem", 0o644),
            ("server.key", 0o600),
        ] {
            let path = data.join(file);
            std::fs::copy(pki.path(file), &path).unwrap();
            std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let port = port_for_node();
        let mut cmd = command("postgres");
        cmd.arg("-D").arg(&data).arg("-p").arg(port.to_string());
        for setting in [
            "listen_addresses=127.0.0.1".to_owned(),
            format!("unix_socket_directories={}", dir.path().display()),
            "ssl=on".to_owned(),
            "ssl_cert_file=server.pem".to_owned(),
            "ssl_key_file=server.key".to_owned(),
            "ssl_ca_file=ca.pem".to_owned(),
            "fsync=off".to_owned(),
            "max_connections=20".to_owned(),
            "shared_buffers=16MB".to_owned(),
            "logging_collector=on".to_owned(),
            format!("log_directory={}", dir.path().display()),
            "log_filename=postgres.log".to_owned(),
        ] {
            cmd.arg("-c").arg(setting);
        }
        let mut server = TlsServer::run("PostgreSQL", cmd, port, dir, "postgres.log");
        server.interrupt = true;
        // It listens before it takes connections ("the database system is starting up"); its
        // status line in postmaster.pid says when it does.
        let deadline = Instant::now() + Duration::from_secs(15);
        while !std::fs::read_to_string(data.join("postmaster.pid"))
            .is_ok_and(|pid| pid.lines().any(|l| l.trim() == "ready"))
        {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL on {port} not ready within 15 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }
}

/// The record store on PostgreSQL over TLS (`[store.tls]`), against a PostgreSQL of the test's
/// own that takes only TLS connections with a SCRAM password and a client certificate: records
/// are written and read back over TLS (the API, and `iotfwd logs trace` with the config), with
/// `channel_binding=require` so the password exchange is bound to the TLS session
/// (SCRAM-SHA-256-PLUS); a client without TLS is refused by the server; a CA that did not sign
/// the server's certificate, no client certificate, or no `[store.tls]` at all leave the store
/// down with a reason in health that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_over_tls_and_clear_errors_for_a_wrong_ca_or_none() {
    use iotfwd::config::store::{StoreBackend, StoreConfig};
    const PASSWORD_ENV: &str = "IOTFWD_TEST_PG_TLS_PASSWORD";
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let Some(pg) = TlsServer::postgres(&pki, &password) else {
        return;
    };
    // SAFETY: nextest runs each test in a process of its own, and no other thread of it reads
    // or writes the environment while this runs (the daemons below read it after).
    unsafe { std::env::set_var(PASSWORD_ENV, &password) };

    // The server refuses a client without TLS, whatever its password.
    let plain = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=iotfwd password={password} dbname=postgres \
             sslmode=disable connect_timeout=5",
            pg.port
        ),
        tokio_postgres::NoTls,
    )
    .await;
    let refused = plain.err().expect("a client without TLS got in");
    let why = refused
        .as_db_error()
        .map_or_else(|| refused.to_string(), |e| e.message().to_owned());
    assert!(why.contains("no encryption"), "{why}");

    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    let url = format!(
        "postgres://iotfwd@127.0.0.1:{}/postgres?channel_binding=require",
        pg.port
    );
    let store = |tls: Option<ClientTls>| StoreConfig {
        backend: StoreBackend::Postgres,
        url: Some(url.clone()),
        password_env: Some(PASSWORD_ENV.to_owned()),
        tls,
        ..StoreConfig::default()
    };
    let start = |tls: Option<ClientTls>, data: &str| {
        let store = store(tls);
        let data = dir.path().join(data);
        Daemon::start_without_broker(&rules, move |c| {
            c.subscription.enabled = false;
            c.data.dir = data;
            c.store = store;
        })
    };

    // The CA that signed the server's certificate, and a client certificate it signed too.
    let d = start(Some(pki.client("ca.pem", true)), "ok").await;
    d.wait_ready().await;
    let report = d
        .post(json!({"topic": "/p1/d1/user/update", "payload": {"n": 1}}))
        .await;
    let id = report["messages"][0]["messageId"]
        .as_str()
        .unwrap_or_else(|| panic!("no messageId: {report}"))
        .to_owned();
    let page = eventually("the message's record, read back over TLS", || async {
        let page = d.get_json(&format!("/api/v1/logs?messageId={id}")).await;
        (page["count"].as_u64() > Some(0)).then_some(page)
    })
    .await;
    assert_eq!(page["records"][0]["messageId"], id.as_str(), "{page}");
    let health = d.get_json("/api/v1/health").await;
    assert_eq!(health["store"]["up"], true, "{health}");
    d.stop().await;

    // The CLI reads the same records over TLS with a config naming the same [store.tls].
    let file = dir.path().join("store.toml");
    std::fs::write(
        &file,
        format!(
            "[store]\nbackend = \"postgres\"\nurl = \"{url}\"\npassword_env = \"{PASSWORD_ENV}\"\n\
             [store.tls]\nca_file = {:?}\ncert = {:?}\nkey = {:?}\n",
            pki.path("ca.pem"),
            pki.path("client.pem"),
            pki.path("client.key"),
        ),
    )
    .unwrap();
    let (ok, out, err) = iotfwd(vec![
        "logs".into(),
        "trace".into(),
        id.clone(),
        "--json".into(),
        "--config".into(),
        file.to_str().unwrap().into(),
    ])
    .await;
    assert!(ok, "iotfwd logs trace over TLS failed: {err}");
    assert!(out.contains(&id), "{out}");

    // Each failing case: the store is down, and health says why (and never the password).
    let at = format!("127.0.0.1:{}", pg.port);
    for (tls, data, why) in [
        (
            Some(pki.client("other-ca.pem", true)),
            "other-ca",
            "TLS handshake with 127.0.0.1 failed: the server's certificate is not signed by a \
             CA this client trusts (store.tls.ca_file)",
        ),
        (
            Some(pki.client("ca.pem", false)),
            "no-client-cert",
            "connection requires a valid client certificate",
        ),
        (None, "plain", "no encryption"),
    ] {
        let d = start(tls, data).await;
        let store = eventually("the store's connection error in health", || async {
            let h = d.get_json("/api/v1/health").await;
            (h["store"]["up"] == false).then(|| h["store"].clone())
        })
        .await;
        let error = store["lastError"].as_str().unwrap_or_default();
        println!("{data}: {error}");
        assert!(
            error.contains(why) && error.contains(&at),
            "{data}: {store}"
        );
        assert!(!error.contains(&password), "no password: {error}");
        d.stop().await;
    }
}
