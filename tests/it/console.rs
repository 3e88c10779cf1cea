//! The console: the API it reads (trace with verdict, stats, codes, the rule tester, rules with
//! counts, the embedded page) against the real daemon, and the page itself in Debian's headless
//! Chromium, driven by tests/console/console.test.mjs (playwright-core).
//!
//! The browser test needs node, /usr/bin/chromium and `npm ci` in tests/console
//! (scripts/test installs them). Without them it fails under CI (`CI=true`) and prints SKIPPED
//! elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use iotfwd::config::subscription::GroupConfig;
use serde_json::{Value, json};

use super::harness::{Daemon, eventually};

/// A raw (not JSON) payload with every character the platform's console cannot search for.
const SPECIAL: &str = "special , '\";=()[]{}?@&<>/: and <b>bold</b> tab\there\nnext line\r\nend";
/// What the search form gets for the punctuation.
const PUNCTUATION: &str = ", '\";=()[]{}?@&<>/:";
/// A keyword with a tab and a line break.
const CONTROLS: &str = "tab\there\nnext";

const FINE: &str = r#"description = "Every update, as it came (no action: the output is the record)"
sql = '''
SELECT deviceName() AS device, *
FROM "/p1/+/user/update"
'''
"#;

const FAILING: &str = r#"description = "Hot readings to RabbitMQ (there is no broker here: 9325)"
sql = '''
SELECT deviceName() AS device, t AS temperature
FROM "/p1/+/user/update"
WHERE t > 30
'''

[[action]]
to = "amqp"
exchange = "alerts"
routing_key = "temp.${device}"
"#;

const TO_GROUP: &str = r#"description = "Gateway events to the ops consumer group (no consumer online: 9203)"
sql = '''
SELECT deviceName() AS device, state FROM "/p2/+/thing/event/#"
'''

[[action]]
to = "group"
group = "ops"
"#;

const BROKEN: &str = "sql = 'SELECT FROM WHERE \"/p1/+/user/update\"'\n";

/// A daemon without a broker, with three rules and a consumer group, filled with messages.
struct Fixture {
    daemon: Daemon,
    dir: tempfile::TempDir,
    /// What the browser script is told about the data.
    facts: Value,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir_all(&rules).unwrap();
        std::fs::write(rules.join("fine.toml"), FINE).unwrap();
        std::fs::write(rules.join("failing.toml"), FAILING).unwrap();
        std::fs::write(rules.join("to_group.toml"), TO_GROUP).unwrap();
        // A rule file that does not load (9307): the rules page shows it with its error.
        std::fs::write(rules.join("broken.toml"), BROKEN).unwrap();
        let data = dir.path().join("data");
        write_history(&data.join("outcomes.db")).await;
        let daemon = Daemon::start_without_broker(&rules, |c| {
            c.data.dir = data.clone();
            c.subscription.listen = "127.0.0.1:0".into();
            let mut group = GroupConfig::demo(&data);
            group.id = "ops".into();
            group.access_key_id = "ops".into();
            c.group = vec![group];
        })
        .await;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut lines = vec![
            json!({"topic": "/p1/dev1/user/update", "payload": {"t": 20}, "messageId": "c-ok"}),
            json!({"topic": "/p1/dev2/user/update", "payload": {"t": 40}, "messageId": "c-hot", "traceId": "trace-hot"}),
            json!({"topic": "/p1/dev3/user/update", "payload_base64": b64("not json"), "messageId": "c-bad"}),
            json!({"topic": "/p1/dev4/user/update", "payload_base64": b64(SPECIAL), "messageId": "c-special"}),
            json!({"topic": "/p1/dev5/user/update", "payload": {"msg": "say \"hi\""}, "messageId": "c-quote"}),
            json!({"topic": "/p2/gw1/thing/event/alarm", "payload": {"state": "open"}, "messageId": "c-group"}),
            json!({"topic": "not-a-platform-topic", "payload": {}}),
        ];
        for i in 0..8 {
            lines.push(json!({"topic": "/p1/dev6/user/update", "payload": {"t": i}, "messageId": format!("c-fill-{i}")}));
        }
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        daemon.post(body).await;
        // Every message's records are in the store: the group's 9203 comes last.
        eventually("the records in the store", || async {
            let (_, text) = daemon.get("/api/v1/logs?limit=1000").await;
            let v: Value = serde_json::from_str(&text).ok()?;
            let records = v["records"].as_array()?;
            let has = |id: &str, biz: &str| {
                records
                    .iter()
                    .any(|r| r["messageId"] == id && r["bizCode"] == biz)
            };
            (records.len() >= 30
                && has("c-group", "ServerSubscribe")
                && has("c-hot", "ruleengine")
                && has("c-special", "ruleengine"))
            .then_some(())
        })
        .await;
        let facts = json!({
            "special": SPECIAL,
            "punctuation": PUNCTUATION,
            "controls": CONTROLS,
            "quoteKeyword": "say \"hi\"",
            "hot": {"messageId": "c-hot", "traceId": "trace-hot", "device": "dev2"},
            "special_message": "c-special",
            "quote_message": "c-quote",
            "rules": ["failing", "fine", "to_group"],
        });
        Fixture { daemon, dir, facts }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("data").join("outcomes.db")
    }

    async fn json(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.daemon.get(path).await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn test_rule(&self, body: Value) -> (u16, Value) {
        self.daemon
            .post_to("/api/v1/rules/test", body.to_string())
            .await
    }
}

/// A day of another daemon's records in the store before the daemon starts, so the charts have
/// a past: a meter product forwarding to RabbitMQ and the `ops` group, some throttled (9324
/// per tenant, 9326 per instance), a few failed (9325, 9650). Their devices, rules and contents
/// are none of the ones the tests search for; in the last hour only 200, 9324 and 9650 occur.
async fn write_history(path: &Path) {
    use iotfwd::outcome::store::{Store, StoreOptions};
    use iotfwd::outcome::{BizCode, Code, Record};
    let store = Store::open(path, StoreOptions::default(), None).unwrap();
    let tx = store.sender();
    let now = iotfwd::message::now_ms();
    let record = |time_ms: i64, k: i64, biz: BizCode, operation: &str, code: Code| Record {
        time_ms,
        trace_id: format!("hist-trace-{k}"),
        message_id: format!("hist-{k}"),
        product_key: "meterPK".into(),
        device_name: format!("meter-{}", k % 4),
        biz_code: biz,
        operation: operation.into(),
        code,
        reason: if code.is_success() {
            String::new()
        } else {
            format!("{} (recorded history)", code.info().name)
        },
        content: format!("{{\"kwh\":{}}}", k % 97),
        tenant_id: ["tenant-a", "tenant-b"][(k % 2) as usize].into(),
        instance_id: "iot-instance-1".into(),
    };
    // Every 10 minutes over the day before the last hour, every minute in the last hour.
    let mut times: Vec<i64> = (7..144).map(|i| now - i * 600_000).collect();
    times.extend((1..58).map(|i| now - i * 60_000));
    for (k, t) in times.into_iter().enumerate() {
        let k = k as i64;
        let recent = t > now - 3_600_000;
        for j in 0..(2 + k % 3) {
            let id = k * 10 + j;
            tx.send(record(
                t,
                id,
                BizCode::Uplink,
                "/meterPK/meter/user/reading",
                Code::Ok,
            ))
            .await
            .unwrap();
            let forward = match id % 11 {
                0 => Code::Throttled,
                5 if !recent => Code::InstanceSpecExceeded,
                7 if !recent => Code::DestinationUnavailable,
                _ => Code::Ok,
            };
            tx.send(record(
                t + 3,
                id,
                BizCode::RuleEngine,
                "meter_readings/amqp:readings",
                forward,
            ))
            .await
            .unwrap();
            if forward.is_success() {
                let delivered = if id % 13 == 0 {
                    Code::AckTimeout
                } else {
                    Code::Ok
                };
                tx.send(record(
                    t + 9,
                    id,
                    BizCode::ServerSubscribe,
                    "ops",
                    delivered,
                ))
                .await
                .unwrap();
            }
        }
    }
    store.flush().await.unwrap();
    store.shutdown().await;
}

fn count_of(v: &Value, key: &str) -> u64 {
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == key)
        .map_or(0, |g| g["total"].as_u64().unwrap())
}

/// The verdict line of `iotfwd logs trace ID` on the store file.
fn cli_verdict(store: &Path, id: &str) -> String {
    let out = Command::new(super::harness::daemon_binary())
        .args(["logs", "trace", id, "--db"])
        .arg(store)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text.find("verdict: ").expect("a verdict line") + "verdict: ".len();
    // The verdict may be wrapped onto indented lines: join them back.
    text[start..]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_api_trace_stats_codes_and_rules() {
    let f = Fixture::start().await;

    // The code catalog, with troubleshooting.
    let (status, codes) = f.json("/api/v1/codes").await;
    assert_eq!(status, 200);
    let codes = codes["codes"].as_array().unwrap();
    assert_eq!(codes.len(), iotfwd::outcome::Code::ALL.len());
    let c9325 = codes.iter().find(|c| c["code"] == 9325).unwrap();
    assert_eq!(c9325["name"], "DestinationUnavailable");
    assert!(!c9325["troubleshooting"].as_str().unwrap().is_empty());

    // A trace by message id: oldest first, uplink first, and the verdict of `iotfwd logs
    // trace`.
    let (status, trace) = f.json("/api/v1/trace/c-hot").await;
    assert_eq!(status, 200, "{trace}");
    let records = trace["records"].as_array().unwrap();
    assert_eq!(records[0]["bizCode"], "uplink");
    let times: Vec<&str> = records
        .iter()
        .map(|r| r["time"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(trace["verdict"]["status"], "failed");
    assert_eq!(trace["verdict"]["failedSteps"], 1);
    let summary = trace["verdict"]["summary"].as_str().unwrap();
    assert!(summary.contains("failing/amqp:alerts 9325"), "{summary}");
    assert_eq!(cli_verdict(&f.store(), "c-hot"), summary);
    // By trace id: the same records.
    let (_, by_trace) = f.json("/api/v1/trace/trace-hot").await;
    assert_eq!(by_trace["records"], trace["records"]);
    // A message that only arrived, and one whose rule failed on its payload.
    let (_, quote) = f.json("/api/v1/trace/c-quote").await;
    assert_eq!(quote["verdict"]["status"], "delivered", "{quote}");
    let (_, bad) = f.json("/api/v1/trace/c-bad").await;
    assert_eq!(bad["verdict"]["failedSteps"], 2, "{bad}");
    assert_eq!(cli_verdict(&f.store(), "c-bad"), bad["verdict"]["summary"]);
    // Nothing under an id (any characters, percent-encoded in the path): 404, verdict unknown.
    let (status, none) = f.json("/api/v1/trace/no%2Fsuch%20id%3F").await;
    assert_eq!(status, 404, "{none}");
    assert_eq!(none["id"], "no/such id?");
    assert_eq!(none["verdict"]["status"], "unknown");

    // Stats: the counts per code are the records the log query finds.
    let (status, stats) = f.json("/api/v1/stats?since=1h&by=code").await;
    assert_eq!(status, 200, "{stats}");
    let (_, all) = f.json("/api/v1/logs?since=1h&limit=1000").await;
    assert_eq!(stats["total"], all["count"], "{stats}");
    for code in [200, 9325, 9320, 1903, 9203] {
        let (_, logs) = f
            .json(&format!("/api/v1/logs?since=1h&limit=1000&status={code}"))
            .await;
        assert_eq!(
            count_of(&stats, &code.to_string()),
            logs["count"].as_u64().unwrap(),
            "code {code}: {stats}"
        );
    }
    assert_eq!(stats["bucketSeconds"], 60.0);
    let buckets = stats["buckets"].as_array().unwrap();
    assert!((60..=61).contains(&buckets.len()), "{}", buckets.len());
    let in_buckets: u64 = buckets
        .iter()
        .flat_map(|b| b["counts"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(in_buckets, stats["total"].as_u64().unwrap());
    let (_, by_rule) = f.json("/api/v1/stats?since=24h&by=rule").await;
    // Two 9320s, its 9325 and the dead-letter step (200) that kept that message.
    assert_eq!(count_of(&by_rule, "failing"), 4, "{by_rule}");
    let (_, failed) = f
        .json("/api/v1/stats?since=1h&by=serviceType&status=failed")
        .await;
    assert_eq!(count_of(&failed, "uplink"), 1, "{failed}");
    let (status, bad_query) = f.json("/api/v1/stats?by=colour&since=2x&extra=1").await;
    assert_eq!(status, 400);
    let msg = bad_query["error"].as_str().unwrap();
    for part in ["colour", "since", "extra"] {
        assert!(msg.contains(part), "{msg}");
    }

    // The rules with their SQL and what each did.
    let (_, rules) = f.json("/api/v1/rules").await;
    let fine = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "fine")
        .unwrap();
    assert!(
        fine["sql"]
            .as_str()
            .unwrap()
            .contains("deviceName() AS device")
    );
    // 13 messages on /p1/+/user/update; two are not JSON.
    assert_eq!(fine["lastHour"]["matched"], 13, "{fine}");
    assert_eq!(fine["lastHour"]["passed"], 11, "{fine}");
    assert_eq!(fine["lastHour"]["failed"]["9320"], 2, "{fine}");
    let failing = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "failing")
        .unwrap();
    assert_eq!(
        failing["lastHour"]["actions"]["amqp:alerts"]["9325"], 1,
        "{failing}"
    );
    assert!(rules["countsSince"].is_string());

    f.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_rule_tester_uses_the_engine_and_writes_nothing() {
    let f = Fixture::start().await;
    let rules_dir = f.dir.path().join("rules");
    let listing = |dir: &Path| {
        let mut v: Vec<(String, u64, std::time::SystemTime)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.len(),
                    m.modified().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(&rules_dir);

    // A running rule, as it is.
    let (status, passed) = f
        .test_rule(
            json!({"rule": "failing", "topic": "/p1/d9/user/update", "payload": "{\"t\": 41}"}),
        )
        .await;
    assert_eq!(status, 200, "{passed}");
    assert_eq!(passed["result"], "passed");
    assert_eq!(passed["code"], 200);
    assert_eq!(passed["output"], json!({"device": "d9", "temperature": 41}));
    // The same message as `iotfwd rules test` sees it.
    let cli = Command::new(super::harness::daemon_binary())
        .args(["rules", "test"])
        .arg(rules_dir.join("failing.toml"))
        .args(["--topic", "/p1/d9/user/update", "--payload", "{\"t\": 41}"])
        .output()
        .unwrap();
    let cli_output: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(cli_output, passed["output"]);

    // WHERE false, a topic the filter does not match.
    let (_, none) = f
        .test_rule(json!({"rule": "failing", "topic": "/p1/d9/user/update", "payload": {"t": 1}}))
        .await;
    assert_eq!(none["result"], "no_result", "{none}");
    let (_, no_match) = f
        .test_rule(json!({"rule": "failing", "topic": "/other/d9/x", "payload": {"t": 99}}))
        .await;
    assert_eq!(no_match["result"], "no_match", "{no_match}");

    // A payload that is not JSON: 9320.
    let (_, payload) = f
        .test_rule(json!({"rule": "fine", "topic": "/p1/d9/user/update", "payload": "not json"}))
        .await;
    assert_eq!(
        (payload["result"].as_str(), payload["code"].as_u64()),
        (Some("failed"), Some(9320)),
        "{payload}"
    );
    assert_eq!(payload["name"], "PayloadInvalid");

    // Edited SQL that does not parse: 9307 with its line in the SQL.
    let (_, bad_sql) = f
        .test_rule(json!({
            "rule": "fine",
            "sql": "SELECT deviceName() AS device,\nFROM WHERE \"/p1/+/user/update\"",
            "topic": "/p1/d9/user/update",
            "payload": "{}",
        }))
        .await;
    assert_eq!(bad_sql["result"], "failed", "{bad_sql}");
    assert_eq!(bad_sql["code"], 9307, "{bad_sql}");
    assert_eq!(bad_sql["stage"], "compile");
    assert!(!bad_sql["meaning"].as_str().unwrap().is_empty());
    // Edited SQL that no longer produces what the rule's action uses: 9321.
    let (_, template) = f
        .test_rule(json!({
            "rule": "failing",
            "sql": "SELECT t FROM \"/p1/+/user/update\"",
            "topic": "/p1/d9/user/update",
            "payload": "{\"t\": 50}",
        }))
        .await;
    assert_eq!(template["code"], 9321, "{template}");
    // SQL alone, and a function given arguments it cannot use at run time (9307).
    let (_, alone) = f
        .test_rule(
            json!({"sql": "SELECT topic(2) AS d FROM \"/#\"", "topic": "/a/b/c", "payload": {}}),
        )
        .await;
    assert_eq!(alone["output"], json!({"d": "b"}), "{alone}");
    let (_, runtime) = f
        .test_rule(
            json!({"sql": "SELECT topic(0) AS d FROM \"/#\"", "topic": "/a/b/c", "payload": {}}),
        )
        .await;
    assert_eq!(
        (runtime["code"].as_u64(), runtime["stage"].as_str()),
        (Some(9307), Some("evaluate")),
        "{runtime}"
    );
    // A topic not of the platform's form: 1903.
    let (_, topic) = f
        .test_rule(json!({"rule": "fine", "topic": "nope", "payload": {}}))
        .await;
    assert_eq!(topic["code"], 1903, "{topic}");

    // Requests that are not tests.
    let (status, unknown) = f
        .test_rule(json!({"rule": "nope", "topic": "/a/b/c"}))
        .await;
    assert_eq!(status, 404, "{unknown}");
    let (status, _) = f.test_rule(json!({"topic": "/a/b/c"})).await;
    assert_eq!(status, 400);
    let (status, _) = f
        .test_rule(json!({"topic": "/a/b/c", "sql": "x", "bogus": 1}))
        .await;
    assert_eq!(status, 400);

    // Nothing was written: the rules directory is as it was, and the tests left no record.
    assert_eq!(listing(&rules_dir), before);
    let (_, logs) = f.json("/api/v1/logs?device=d9").await;
    assert_eq!(logs["count"], 0, "{logs}");
    f.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_page_and_assets_are_served_from_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_without_broker(dir.path(), |_| {}).await;
    let client = reqwest::Client::new();
    for path in [
        "/console",
        "/console/",
        "/console/logs",
        "/console/trace/a%2Fb",
    ] {
        let r = client
            .get(format!("{}{path}", d.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let headers = r.headers().clone();
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        let html = r.text().await.unwrap();
        assert!(html.contains("/console/assets/app.js"), "{html}");
    }
    for (asset, kind) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
        ("chart.js", "text/javascript; charset=utf-8"),
    ] {
        let r = client
            .get(format!("{}/console/assets/{asset}", d.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        assert_eq!(r.headers()["content-type"], kind);
        assert!(!r.text().await.unwrap().is_empty());
    }
    let (status, _) = d.get("/console/assets/nope.js").await;
    assert_eq!(status, 404);
    // Every asset the page and its modules name is served: nothing is fetched from elsewhere.
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api/console");
    for entry in std::fs::read_dir(&assets).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains("http://") && !text.contains("https://"));
        for name in text
            .split(['\'', '"'])
            .filter(|s| s.starts_with("./") && s.ends_with(".js"))
        {
            let (status, _) = d.get(&format!("/console/assets/{}", &name[2..])).await;
            assert_eq!(status, 200, "{name}");
        }
    }
    d.stop().await;
}

/// Where the node script and its packages are, when they are.
fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console");
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node is not installed (scripts/test installs Debian's nodejs)".into());
    }
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return Err(format!(
            "{} is missing (scripts/test runs apt-get install -y chromium)",
            chromium.display()
        ));
    }
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Err(
            "tests/console/node_modules is missing (scripts/test runs npm ci there)".into(),
        );
    }
    Ok((dir, chromium))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser() {
    let (dir, chromium) = match browser_tools() {
        Ok(t) => t,
        Err(missing) => {
            super::harness::tool_missing(&format!("the console browser test: {missing}"));
            return;
        }
    };
    let f = Fixture::start().await;
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("node");
    cmd.arg("console.test.mjs")
        .current_dir(&dir)
        .env("CONSOLE_URL", &f.daemon.base)
        .env("CONSOLE_FACTS", f.facts.to_string())
        .env("SCREENSHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .env("PROFILE_DIR", profile.path());
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || run_with_timeout(cmd, Duration::from_secs(240)))
        .await
        .unwrap();
    eprintln!(
        "console.test.mjs ({:.1} s; screenshots in {}):\n{}",
        started.elapsed().as_secs_f64(),
        shots.display(),
        out.1
    );
    assert!(out.0, "the browser test failed (output above)");
    f.daemon.stop().await;
}

/// Runs `cmd` to its end or until `limit` (then kills it): (success, stdout and stderr).
fn run_with_timeout(mut cmd: Command, limit: Duration) -> (bool, String) {
    use std::io::Read as _;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("node starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = format!(
        "{}{}{}",
        out_reader.join().unwrap_or_default(),
        err_reader.join().unwrap_or_default(),
        if status.is_none() {
            format!("\nkilled after {} s", limit.as_secs())
        } else {
            String::new()
        }
    );
    (status.is_some_and(|s| s.success()), text)
}
