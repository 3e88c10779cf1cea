//! The HTTP ingest and endpoints, against the real daemon bound on port 0.

use serde_json::json;

use super::harness::{Daemon, metric};

fn rules_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hot.toml"),
        "sql = '''SELECT deviceName() AS device, t FROM \"/p1/+/post\" WHERE t > 38'''\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("all.toml"),
        "sql = '''SELECT *, topic(3) AS leaf FROM \"/p1/#\"'''\n",
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_one_envelope_and_ndjson() {
    let rules = rules_dir();
    let d = Daemon::start_without_broker(rules.path(), |_| {}).await;

    let (status, body) = d
        .post_to(
            "/api/v1/messages?verbose=true",
            json!({"topic": "/p1/dev1/post", "payload": {"t": 40}, "messageId": "m-1", "traceId": "tr-1"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let m = &body["messages"][0];
    assert_eq!(
        (
            m["messageId"].as_str(),
            m["traceId"].as_str(),
            m["code"].as_u64()
        ),
        (Some("m-1"), Some("tr-1"), Some(200))
    );
    let rules: Vec<&str> = m["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules, ["all", "hot"], "both rules matched, in rule order");
    assert_eq!(m["rules"][1]["output"], json!({"device": "dev1", "t": 40}));
    assert_eq!(m["rules"][0]["output"], json!({"t": 40, "leaf": "post"}));

    // NDJSON: three messages, one with a bad topic (1903), one not passing WHERE; without
    // verbose the outputs are left out; ids are generated when absent.
    let ndjson = [
        json!({"topic": "/p1/dev2/post", "payload": {"t": 39}}),
        json!({"topic": "nonsense", "payload": {"t": 39}}),
        json!({"topic": "/p1/dev3/post", "payload_base64": "eyJ0IjogMX0="}),
    ]
    .map(|v| v.to_string())
    .join("\n");
    let (status, body) = d.post_to("/api/v1/messages", ndjson).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["messageId"].as_str().unwrap().len(), 19);
    assert!(
        msgs[0]["rules"][1].get("output").is_none(),
        "no outputs without verbose"
    );
    assert_eq!(msgs[0]["rules"][1]["result"], "passed");
    assert_eq!(msgs[1]["code"], 1903);
    assert_eq!(
        msgs[2]["rules"][1]["result"], "no_result",
        "base64 payload {{\"t\": 1}}"
    );

    // Counters balance: matched = passed + no_result + failed, per rule.
    let (_, scrape) = d.get("/metrics").await;
    for rule in ["hot", "all"] {
        let l = [("rule", rule)];
        let matched = metric(&scrape, "iotfwd_rule_matched_total", &l);
        let sum = metric(&scrape, "iotfwd_rule_passed_total", &l)
            + metric(&scrape, "iotfwd_rule_no_result_total", &l)
            + metric(&scrape, "iotfwd_rule_failed_total", &l);
        assert_eq!(matched, 3.0, "{rule}");
        assert_eq!(matched, sum, "{rule}: {scrape}");
    }
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_outcomes_total",
            &[("biz_code", "uplink"), ("code", "1903")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_outcomes_total",
            &[("biz_code", "uplink"), ("code", "200")]
        ),
        3.0
    );
    d.stop().await;
}

/// A message the ingest cannot take (1903, 9321) is answered and recorded under the ids its
/// envelope gave, fresh ones where it gave none, so it can be looked up like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_is_answered_and_recorded_under_its_ids() {
    let rules = rules_dir();
    let d = Daemon::start_without_broker(rules.path(), |_| {}).await;
    let ndjson = [
        json!({"topic": "nonsense", "payload": {}, "messageId": "bad-topic-1", "traceId": "trace-bad-1"}),
        json!({"topic": "/p1/dev1/post", "payload": {}, "payload_base64": "AA==", "messageId": "both-1"}),
        json!({"topic": "/p1//post", "payload": {}}),
    ]
    .map(|v| v.to_string())
    .join("\n");
    let (status, body) = d.post_to("/api/v1/messages", ndjson).await;
    assert_eq!(status, 200, "{body}");
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(
        (&msgs[0]["code"], &msgs[0]["messageId"], &msgs[0]["traceId"]),
        (&json!(1903), &json!("bad-topic-1"), &json!("trace-bad-1"))
    );
    assert_eq!(
        (&msgs[1]["code"], &msgs[1]["messageId"]),
        (&json!(9321), &json!("both-1"))
    );
    assert_eq!(
        msgs[1]["traceId"].as_str().unwrap().len(),
        32,
        "a fresh trace id"
    );
    assert_eq!(msgs[2]["code"], 1903);
    assert_eq!(
        msgs[2]["messageId"].as_str().unwrap().len(),
        19,
        "a fresh message id"
    );
    for m in msgs {
        let (id, trace) = (
            m["messageId"].as_str().unwrap(),
            m["traceId"].as_str().unwrap(),
        );
        let found = d
            .get_json(&format!("/api/v1/logs?messageId={id}&traceId={trace}"))
            .await;
        let records = found["records"].as_array().unwrap();
        assert_eq!(records.len(), 1, "{id}: {found}");
        assert_eq!(
            (&records[0]["bizCode"], &records[0]["code"]),
            (&json!("uplink"), &m["code"])
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_a_clear_4xx_and_the_daemon_keeps_running() {
    let rules = rules_dir();
    let d = Daemon::start_without_broker(rules.path(), |c| {
        c.http.max_body_bytes = 1024;
        c.http.max_messages_per_request = 2;
    })
    .await;
    let (status, body) = d.post_to("/api/v1/messages", "{not json").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("line 1"), "{body}");
    let (status, body) = d
        .post_to(
            "/api/v1/messages",
            format!(
                "{}\n{{\"topic\": 1}}",
                json!({"topic":"/p1/d/post","payload":{}})
            ),
        )
        .await;
    assert_eq!(status, 400, "a bad line refuses the whole request");
    assert!(body["error"].as_str().unwrap().contains("line 2"), "{body}");
    let (status, _) = d.post_to("/api/v1/messages", "x".repeat(4096)).await;
    assert_eq!(status, 413, "oversized body");
    let three = (0..3)
        .map(|i| json!({"topic": format!("/p1/d{i}/post"), "payload": {}}).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let (status, body) = d.post_to("/api/v1/messages", three).await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = d
        .post_to(
            "/api/v1/messages",
            json!({"topic":"/p1/d/post"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"][0]["code"], 9321, "missing payload: {body}");
    // Still serving.
    assert_eq!(d.get("/healthz").await.0, 200);
    assert_eq!(d.get("/readyz").await.0, 200);
    let (status, body) = d
        .post_to(
            "/api/v1/messages",
            json!({"topic":"/p1/d/post","payload":{"t":50}}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"][0]["rules"][1]["result"], "passed");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_failing_at_run_time_fails_only_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("lvl.toml"),
        "sql = '''SELECT topic(n) AS l FROM \"/p1/+/post\"'''\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.toml"),
        "sql = '''SELECT FROM WHERE'''\n",
    )
    .unwrap();
    let d = Daemon::start_without_broker(dir.path(), |c| c.engine.batch_max_wait_ms = 50).await;
    let ndjson = [
        json!({"n": 2}),
        json!({"n": 0}),
        json!({"n": 9}),
        json!("text"),
    ]
    .iter()
    .map(|p| json!({"topic": "/p1/d/post", "payload": p}).to_string())
    .collect::<Vec<_>>()
    .join("\n");
    let (status, body) = d.post_to("/api/v1/messages?verbose=true", ndjson).await;
    assert_eq!(status, 200, "{body}");
    let r = |i: usize| body["messages"][i]["rules"][0].clone();
    assert_eq!(r(0)["output"], json!({"l": "d"}));
    assert_eq!(
        (r(1)["result"].as_str(), r(1)["code"].as_u64()),
        (Some("failed"), Some(9307))
    );
    assert_eq!(
        r(2)["output"],
        json!({"l": null}),
        "past the last level is NULL"
    );
    assert_eq!(r(3)["code"], 9320);
    let (_, rules) = d.get("/api/v1/rules").await;
    assert!(
        rules.contains("lvl") && !rules.contains("broken"),
        "the broken rule is not loaded: {rules}"
    );
    d.stop().await;
}

/// The real binary with its stderr in a file, at the default log level: a failed step is a
/// line there, a successful one is not (it is in the store and the metrics instead), and the
/// file holds no terminal colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_to_a_file_has_failures_only_and_no_colour_codes() {
    use super::harness::{ChildDaemon, eventually, unique};
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_dir();
    let quoted = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[rules]\ndir = {}\n[data]\ndir = {}\n",
        quoted(rules.path()),
        quoted(&dir.path().join("data")),
    );
    let d = ChildDaemon::start(dir.path(), 1, &config).await;
    let (ok, bad) = (unique("ok"), unique("bad"));
    let ndjson = [
        json!({"topic": "/p1/dev1/post", "payload": {"t": 40}, "messageId": ok}),
        json!({"topic": "nonsense", "payload": {}, "messageId": bad}),
    ]
    .map(|v| v.to_string())
    .join("\n");
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/api/v1/messages", d.base))
        .body(ndjson)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let log = eventually("the failure's line on stderr", || async {
        let log = d.log_text();
        log.contains(&bad).then_some(log)
    })
    .await;
    let scrape = d.metrics().await;
    // Both rules passed the good message: its uplink and two rule steps were successes.
    assert!(
        metric(
            &scrape,
            "iotfwd_outcomes_total",
            &[("biz_code", "ruleengine"), ("code", "200")]
        ) >= 2.0,
        "{scrape}"
    );
    let failure = log.lines().find(|l| l.contains(&bad)).unwrap();
    assert!(
        failure.contains("WARN") && failure.contains("1903"),
        "{failure}"
    );
    assert!(
        !log.contains(&ok),
        "a success was logged at the default level:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log:?}"
    );
    let records = client
        .get(format!("{}/api/v1/logs?messageId={ok}", d.base))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(
        records["records"].as_array().map(Vec::len),
        Some(3),
        "the successes are in the store: {records}"
    );
}
