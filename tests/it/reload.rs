//! Hot reload of rules, against the real daemon bound on port 0: a steady stream of messages
//! while rule files are rewritten (once with broken SQL) and deleted; SIGHUP and the reload API.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use iotfwd::config::Config;
use serde_json::{Value, json};

use super::harness::{Daemon, eventually, metric};

/// The daemon without a broker and without the AMQP 1.0 endpoint.
async fn start(rules_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Daemon {
    Daemon::start_without_broker(rules_dir, |c| {
        c.subscription.enabled = false;
        tweak(c);
    })
    .await
}

impl Daemon {
    /// The running rules, by name, with their descriptions.
    async fn rules(&self) -> Vec<(String, String)> {
        self.get_json("/api/v1/rules").await["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_owned(),
                    r["description"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

/// Writes a rule file the way editors and Kubernetes do: a temporary file, then a rename.
fn write_rule(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.toml"))).unwrap();
}

fn versioned(version: u32) -> String {
    format!(
        "description = \"v{version}\"\n\
         sql = '''SELECT n, {version} AS version FROM \"/p1/+/post\"'''\n"
    )
}

/// One request of the stream: the step counter before it was sent and after it was answered,
/// and each message's rule results as (rule, version output if any).
struct Sent {
    before: usize,
    after: usize,
    ids: Vec<String>,
    reports: Vec<Value>,
}

/// Sends 4 messages per request, one request after the other, until `stop`.
async fn stream(
    base: String,
    name: &'static str,
    step: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Vec<Sent> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let ids: Vec<String> = (0..4).map(|k| format!("{name}-{}", i + k)).collect();
        let body = ids
            .iter()
            .enumerate()
            .map(|(k, id)| {
                json!({"topic": "/p1/dev/post", "payload": {"n": i + k}, "messageId": id})
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n");
        i += 4;
        let before = step.load(Ordering::SeqCst);
        let r = client
            .post(format!("{base}/api/v1/messages?verbose=true"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let after = step.load(Ordering::SeqCst);
        out.push(Sent {
            before,
            after,
            ids,
            reports: v["messages"].as_array().unwrap().clone(),
        });
        done.fetch_add(1, Ordering::SeqCst);
        // Pace the stream a little; the machine is shared.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    out
}

// Steps of the test, in order; the stream reads the counter before and after each request.
const W_V2: usize = 1;
const O_V2: usize = 2;
const W_V3: usize = 3;
const O_V3: usize = 4;
const W_BROKEN: usize = 5;
const O_BROKEN: usize = 6;
const W_V4: usize = 7;
const O_V4: usize = 8;
const W_DELETE: usize = 9;
const O_DELETE: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_a_steady_stream_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_rule(dir.path(), "a", &versioned(1));
    write_rule(
        dir.path(),
        "b",
        "sql = '''SELECT n FROM \"/p1/+/post\"'''\n",
    );
    write_rule(dir.path(), "c", "sql = '''SELECT n FROM \"/p1/#\"'''\n");
    let d = start(dir.path(), |_| {}).await;
    let health = d.get_json("/api/v1/health").await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["rules"]["loaded"], 3, "{health}");
    assert_eq!(health["lastReload"]["cause"], "startup", "{health}");

    let step = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let streams: Vec<_> = ["s1", "s2"]
        .into_iter()
        .map(|name| {
            tokio::spawn(stream(
                d.base.clone(),
                name,
                Arc::clone(&step),
                Arc::clone(&stop),
                Arc::clone(&done),
            ))
        })
        .collect();
    // Let some requests through before each change and after each observation, so every
    // phase carries traffic.
    let traffic = || {
        let done = Arc::clone(&done);
        async move {
            let until = done.load(Ordering::SeqCst) + 10;
            eventually("stream traffic", || async {
                (done.load(Ordering::SeqCst) >= until).then_some(())
            })
            .await
        }
    };
    let description_is = |want: &'static str| {
        let d = &d;
        async move {
            eventually(want, || async {
                d.rules()
                    .await
                    .iter()
                    .any(|(n, desc)| n == "a" && desc == want)
                    .then_some(())
            })
            .await
        }
    };

    traffic().await;
    for (version, w, o) in [(2, W_V2, O_V2), (3, W_V3, O_V3)] {
        step.store(w, Ordering::SeqCst);
        write_rule(dir.path(), "a", &versioned(version));
        description_is(if version == 2 { "v2" } else { "v3" }).await;
        step.store(o, Ordering::SeqCst);
        traffic().await;
    }

    // Broken SQL: 9307 in the log and the health API; v3 keeps running.
    let before_9307 = metric(
        &d.metrics().await,
        "iotfwd_outcomes_total",
        &[("biz_code", "ruleengine"), ("code", "9307")],
    );
    step.store(W_BROKEN, Ordering::SeqCst);
    write_rule(
        dir.path(),
        "a",
        "description = \"broken\"\nsql = '''SELECT n, FROM WHERE'''\n",
    );
    let health = eventually("a.toml failing in /api/v1/health", || async {
        let h = d.get_json("/api/v1/health").await;
        (h["rules"]["failed"].as_array().unwrap().len() == 1).then_some(h)
    })
    .await;
    step.store(O_BROKEN, Ordering::SeqCst);
    let failed = &health["rules"]["failed"][0];
    assert_eq!(failed["rule"], "a", "{health}");
    assert_eq!(failed["code"], 9307, "{health}");
    assert_eq!(failed["previousRunning"], true, "{health}");
    assert!(failed["file"].as_str().unwrap().ends_with("a.toml"));
    assert!(failed["time"].is_string(), "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["lastReload"]["result"], "failure", "{health}");
    assert_eq!(health["lastReload"]["failed"], json!(["a"]), "{health}");
    assert_eq!(health["rules"]["loaded"], 3, "{health}");
    assert!(
        d.rules().await.contains(&("a".into(), "v3".into())),
        "the previous version keeps running"
    );
    let record = eventually("the 9307 record in the log store", || async {
        let logs = d
            .get_json("/api/v1/logs?status=9307&serviceType=ruleengine")
            .await;
        logs["records"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["operation"] == "a")
            .cloned()
    })
    .await;
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("previous version of the rule keeps running"),
        "{record}"
    );
    traffic().await;

    step.store(W_V4, Ordering::SeqCst);
    write_rule(dir.path(), "a", &versioned(4));
    description_is("v4").await;
    step.store(O_V4, Ordering::SeqCst);
    let health = d.get_json("/api/v1/health").await;
    assert_eq!(health["rules"]["failed"], json!([]), "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    traffic().await;

    step.store(W_DELETE, Ordering::SeqCst);
    std::fs::remove_file(dir.path().join("b.toml")).unwrap();
    eventually("b removed", || async {
        (!d.rules().await.iter().any(|(n, _)| n == "b")).then_some(())
    })
    .await;
    step.store(O_DELETE, Ordering::SeqCst);
    traffic().await;
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for s in streams {
        sent.push(s.await.unwrap());
    }

    // Every message: exactly one result of a and of c, at most one of b, all passed, under a
    // version allowed by when it was sent and answered.
    let mut total = 0;
    let mut b_matched = 0;
    let mut checked_broken_phase = 0;
    for stream in &sent {
        let mut last_version = 0;
        for req in stream {
            assert_eq!(req.reports.len(), req.ids.len());
            for (id, m) in req.ids.iter().zip(&req.reports) {
                total += 1;
                assert_eq!(m["messageId"].as_str(), Some(id.as_str()), "{m}");
                assert_eq!(m["code"], 200, "{m}");
                let rules: Vec<&str> = m["rules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["rule"].as_str().unwrap())
                    .collect();
                let has_b = rules.contains(&"b");
                let expected: &[&str] = if has_b { &["a", "b", "c"] } else { &["a", "c"] };
                assert_eq!(rules, expected, "each rule once, in file order: {m}");
                assert!(
                    m["rules"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|r| r["result"] == "passed"),
                    "{m}"
                );
                b_matched += usize::from(has_b);
                if req.before >= O_DELETE {
                    assert!(!has_b, "sent after b was removed: {m}");
                }
                if req.after < W_DELETE {
                    assert!(has_b, "answered before b.toml was deleted: {m}");
                }
                let version = m["rules"][0]["output"]["version"].as_u64().unwrap();
                let lowest = match req.before {
                    s if s >= O_V4 => 4,
                    s if s >= O_V3 => 3,
                    s if s >= O_V2 => 2,
                    _ => 1,
                };
                let highest = match req.after {
                    s if s < W_V2 => 1,
                    s if s < W_V3 => 2,
                    s if s < W_V4 => 3,
                    _ => 4,
                };
                assert!(
                    (lowest..=highest).contains(&version),
                    "version {version} not in {lowest}..={highest} (steps {}..{}): {m}",
                    req.before,
                    req.after
                );
                if req.before >= O_BROKEN && req.after < W_V4 {
                    assert_eq!(version, 3, "the broken file left v3 running: {m}");
                    checked_broken_phase += 1;
                }
                assert!(version >= last_version, "versions never go back: {m}");
                last_version = version;
            }
        }
    }
    assert!(
        checked_broken_phase > 0,
        "messages flowed while the broken file was in place"
    );

    // The metrics: counted once per evaluation, never reset by a reload, and balanced.
    let scrape = d.metrics().await;
    for (rule, matched) in [("a", total), ("b", b_matched), ("c", total)] {
        let l = [("rule", rule)];
        assert_eq!(
            metric(&scrape, "iotfwd_rule_matched_total", &l),
            matched as f64,
            "{rule}"
        );
        assert_eq!(
            metric(&scrape, "iotfwd_rule_passed_total", &l),
            matched as f64,
            "{rule}"
        );
        assert_eq!(metric(&scrape, "iotfwd_rule_no_result_total", &l), 0.0);
        assert_eq!(metric(&scrape, "iotfwd_rule_failed_total", &l), 0.0);
    }
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_messages_received_total",
            &[("source", "http")]
        ),
        total as f64
    );
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_outcomes_total",
            &[("biz_code", "ruleengine"), ("code", "9307")]
        ) - before_9307,
        1.0,
        "one 9307 record for the one broken version"
    );
    assert_eq!(metric(&scrape, "iotfwd_rules_loaded", &[]), 2.0);
    assert_eq!(
        metric(&scrape, "iotfwd_rules_last_reload_success", &[]),
        1.0
    );
    // At least the broken version's reload (a watcher may deliver one change in two).
    assert!(
        metric(
            &scrape,
            "iotfwd_rules_reload_total",
            &[("result", "failure")]
        ) >= 1.0,
        "{scrape}"
    );
    assert!(
        metric(
            &scrape,
            "iotfwd_rules_reload_total",
            &[("result", "success")]
        ) >= 4.0,
        "{scrape}"
    );
    let reloaded_at = metric(&scrape, "iotfwd_rules_last_reload_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - 60.0..=now).contains(&reloaded_at), "{reloaded_at}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_the_reload_api_reload_without_a_watcher() {
    let dir = tempfile::tempdir().unwrap();
    write_rule(dir.path(), "a", &versioned(1));
    let d = start(dir.path(), |c| c.rules.watch = false).await;
    let version = |body: &Value| body["messages"][0]["rules"][0]["output"]["version"].clone();
    let msg = json!({"topic": "/p1/d/post", "payload": {"n": 1}}).to_string();
    let (_, body) = d
        .post_to("/api/v1/messages?verbose=true", msg.clone())
        .await;
    assert_eq!(version(&body), 1, "{body}");

    // SIGHUP (the daemon handles it; nextest runs each test in its own process).
    write_rule(dir.path(), "a", &versioned(2));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill(1) runs");
    assert!(status.success());
    let health = eventually("the SIGHUP reload", || async {
        let h = d.get_json("/api/v1/health").await;
        (h["lastReload"]["cause"] == "SIGHUP").then_some(h)
    })
    .await;
    assert_eq!(health["lastReload"]["changed"], json!(["a"]), "{health}");
    assert_eq!(health["lastReload"]["result"], "success", "{health}");
    let (_, body) = d
        .post_to("/api/v1/messages?verbose=true", msg.clone())
        .await;
    assert_eq!(version(&body), 2, "{body}");

    // The API: a new file that does not load is reported (422) and nothing else changes.
    write_rule(
        dir.path(),
        "b",
        "sql = '''SELECT n FROM \"/p1/+/post\" WHERE'''\n",
    );
    let (status, body) = d.post_to("/api/v1/rules/reload", "").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["reload"]["cause"], "api", "{body}");
    assert_eq!(body["reload"]["failed"], json!(["b"]), "{body}");
    assert_eq!(body["reload"]["unchanged"], 1, "{body}");
    assert_eq!(body["failed"][0]["code"], 9307, "{body}");
    assert_eq!(body["failed"][0]["previousRunning"], false, "{body}");
    let (_, msgs) = d
        .post_to("/api/v1/messages?verbose=true", msg.clone())
        .await;
    assert_eq!(msgs["messages"][0]["rules"].as_array().unwrap().len(), 1);
    let scrape = d.metrics().await;
    assert_eq!(
        metric(&scrape, "iotfwd_rules_last_reload_success", &[]),
        0.0
    );
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_rules_reload_total",
            &[("result", "failure")]
        ),
        1.0
    );

    // Fixed, and a reload of nothing new changes nothing.
    write_rule(
        dir.path(),
        "b",
        "sql = '''SELECT n FROM \"/p1/+/post\"'''\n",
    );
    let (status, body) = d.post_to("/api/v1/rules/reload", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reload"]["added"], json!(["b"]), "{body}");
    let (status, body) = d.post_to("/api/v1/rules/reload", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            &body["reload"]["added"],
            &body["reload"]["changed"],
            &body["reload"]["unchanged"]
        ),
        (&json!([]), &json!([]), &json!(2)),
        "{body}"
    );
    let (_, msgs) = d.post_to("/api/v1/messages?verbose=true", msg).await;
    assert_eq!(msgs["messages"][0]["rules"].as_array().unwrap().len(), 2);
    let scrape = d.metrics().await;
    assert_eq!(
        metric(&scrape, "iotfwd_rules_last_reload_success", &[]),
        1.0
    );
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_rules_reload_total",
            &[("result", "success")]
        ),
        3.0
    );
    assert_eq!(d.get_json("/api/v1/health").await["status"], "ok");
    d.stop().await;
}

/// With `--config`, the reload API (and SIGHUP) re-read the config file: new quotas apply at
/// once, other changed sections are named as waiting for a restart, and a file that does not
/// load changes nothing and says where it is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_reloads_its_quotas_and_names_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    // No broker: a forward the quota lets through ends in 9325, a throttled one in 9324.
    write_rule(
        &rules,
        "r",
        "sql = '''SELECT * FROM \"/p1/+/post\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"x\"\n",
    );
    let config = |burst: &str, batch_wait: u32| {
        format!(
            "[rules]\ndir = {rules:?}\nwatch = true\n[data]\ndir = {data:?}\n\
             [engine]\nbatch_max_wait_ms = {batch_wait}\n[subscription]\nenabled = false\n\
             [[tenant]]\nid = \"t1\"\nforward_tps = 1\nburst = {burst}\n\
             [[instance]]\nid = \"i1\"\ntenant = \"t1\"\nproducts = [\"p1\"]\nforward_tps = 1000\n",
            rules = rules.display().to_string(),
            data = dir.path().join("data").display().to_string(),
        )
    };
    let file = dir.path().join("iotfwd.toml");
    std::fs::write(&file, config("2", 1)).unwrap();
    let d = Daemon::start_from_file(&file).await;
    let codes = |body: Value| -> Vec<u64> {
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["rules"][0]["actions"][0]["code"].as_u64().unwrap())
            .collect()
    };
    let five = || {
        (0..5)
            .map(|i| json!({"topic": "/p1/d1/post", "payload": {"i": i}}).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut got = codes(d.post(five()).await);
    got.sort();
    assert_eq!(got, [9324, 9324, 9324, 9325, 9325], "burst 2");

    // A larger burst, and an engine setting that only a restart applies.
    std::fs::write(&file, config("100", 2)).unwrap();
    let (status, reply) = d.post_to("/api/v1/rules/reload", "").await;
    assert_eq!(status, 200, "{reply}");
    let c = &reply["reload"]["config"];
    assert_eq!(c["result"], "success", "{reply}");
    assert_eq!(c["quotasChanged"], true, "{reply}");
    assert_eq!(c["restartNeeded"], json!(["engine"]), "{reply}");
    assert_eq!(codes(d.post(five()).await), [9325; 5], "burst 100");

    // A file that does not load: nothing changes, and the reply says where.
    std::fs::write(&file, config("\"lots\"", 1)).unwrap();
    let (status, reply) = d.post_to("/api/v1/rules/reload", "").await;
    assert_eq!(status, 422, "{reply}");
    let c = &reply["reload"]["config"];
    assert_eq!(c["result"], "failure", "{reply}");
    let error = c["errors"][0].as_str().unwrap();
    assert!(
        error.contains("iotfwd.toml:13:9") && error.contains("\"lots\""),
        "{error}"
    );
    assert_eq!(reply["reload"]["result"], "failure", "{reply}");
    assert_eq!(
        codes(d.post(five()).await),
        [9325; 5],
        "the running quotas stay"
    );
    let scrape = d.metrics().await;
    assert_eq!(
        metric(&scrape, "iotfwd_rules_last_reload_success", &[]),
        0.0
    );
    let health = d.get_json("/api/v1/health").await;
    assert_eq!(health["config"]["result"], "failure", "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    // A rules-only reload (a new rule file) while the config file is broken still fails.
    write_rule(
        &rules,
        "other",
        "sql = '''SELECT * FROM \"/p9/+/post\"'''\n",
    );
    let last = eventually("the watcher's reload", || async {
        let h = d.get_json("/api/v1/health").await;
        (h["lastReload"]["cause"] == "watch").then(|| h["lastReload"].clone())
    })
    .await;
    assert_eq!(last["added"], json!(["other"]), "{last}");
    assert_eq!(last["result"], "failure", "{last}");
    assert!(last.get("config").is_none(), "{last}");

    // Back to a good file with the same quotas: success, nothing to apply, engine still pending.
    std::fs::write(&file, config("100", 2)).unwrap();
    let (status, reply) = d.post_to("/api/v1/rules/reload", "").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["reload"]["config"]["quotasChanged"], false, "{reply}");
    assert_eq!(
        reply["reload"]["config"]["restartNeeded"],
        json!(["engine"]),
        "{reply}"
    );
    // (`lastReload` may be a late second event of the watcher by now; `config` stays.)
    let health = d.get_json("/api/v1/health").await;
    assert_eq!(health["config"]["result"], "success", "{health}");
    let scrape = d.metrics().await;
    assert_eq!(
        metric(&scrape, "iotfwd_rules_last_reload_success", &[]),
        1.0
    );
    d.stop().await;
}
