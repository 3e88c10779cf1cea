//! `GET /api/v1/health` and the action metrics, against the machine's RabbitMQ: a destination
//! that delivers, one that does not exist, and per-message failures that are not the
//! destination's fault.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::harness::{Daemon, eventually, metric, unique};

/// The label sets (`rule`, `action`) of every `iotfwd_action_executions_total` series.
fn action_series(scrape: &str) -> BTreeSet<(String, String)> {
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        let len = line[start..].find('"').unwrap();
        line[start..start + len].to_owned()
    };
    scrape
        .lines()
        .filter(|l| l.starts_with("iotfwd_action_executions_total{"))
        .map(|l| (label(l, "rule"), label(l, "action")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_health_and_the_action_balance() {
    // Publishes are mandatory: amq.topic delivers only what a queue is bound for. This
    // test's connection holds an exclusive queue for iotfwd-test.# while it runs.
    let (_conn, ch) = super::rabbit::channel(super::harness::BROKER).await;
    let bound = unique("health-bound");
    ch.queue_declare(
        bound.as_str().into(),
        lapin::options::QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        bound.as_str().into(),
        "amq.topic".into(),
        "iotfwd-test.#".into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    let missing = unique("missing");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fwd.toml"),
        format!(
            "sql = '''SELECT deviceName() AS device, n FROM \"/p1/+/post\"'''\n\
             [[action]]\nto = \"amqp\"\nexchange = \"amq.topic\"\nrouting_key = \"iotfwd-test.${{device}}\"\n\
             [[action]]\nto = \"amqp\"\nexchange = \"{missing}\"\nrouting_key = \"x\"\n"
        ),
    )
    .unwrap();
    // `k` null: the routing key cannot be rendered (9321), which is about the message, not
    // about amq.topic.
    std::fs::write(
        dir.path().join("keyed.toml"),
        "sql = '''SELECT k, n FROM \"/p1/+/post\"'''\n\
         [[action]]\nto = \"amqp\"\nexchange = \"amq.topic\"\nrouting_key = \"${k}\"\n",
    )
    .unwrap();
    let d = Daemon::start(dir.path(), |c| c.subscription.enabled = false).await;
    d.wait_ready().await;
    let n = 20;
    let body = (0..n)
        .map(|i| {
            let k = if i % 2 == 0 {
                json!("iotfwd-test.k")
            } else {
                Value::Null
            };
            json!({"topic": format!("/p1/d{i}/post"), "payload": {"n": i, "k": k}}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    let reply = d.post(body).await;
    let codes: Vec<Vec<u64>> = reply["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["rules"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r["actions"].as_array().unwrap().iter())
                .map(|a| a["code"].as_u64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(codes[0], [200, 9332, 200], "{reply}");
    assert_eq!(codes[1], [200, 9332, 9321], "{reply}");

    // The balance: for each rule and action, executions = success + failed + in flight.
    let scrape = d.metrics().await;
    let series = action_series(&scrape);
    assert_eq!(series.len(), 3, "{series:?}");
    for (rule, action) in &series {
        let l = [("rule", rule.as_str()), ("action", action.as_str())];
        let executions = metric(&scrape, "iotfwd_action_executions_total", &l);
        let success = metric(&scrape, "iotfwd_action_success_total", &l);
        let failed = metric(&scrape, "iotfwd_action_failed_total", &l);
        let in_flight = metric(&scrape, "iotfwd_action_in_flight", &l);
        assert_eq!(executions, n as f64, "{rule} {action}");
        assert_eq!(in_flight, 0.0, "{rule} {action}: every action is terminal");
        assert_eq!(
            executions,
            success + failed + in_flight,
            "{rule} {action}: {scrape}"
        );
    }
    let count = |name: &str, labels: &[(&str, &str)]| metric(&scrape, name, labels);
    let fwd_ok = [("rule", "fwd"), ("action", "amqp:amq.topic")];
    assert_eq!(count("iotfwd_action_success_total", &fwd_ok), n as f64);
    let missing_dest = format!("amqp:{missing}");
    assert_eq!(
        count(
            "iotfwd_action_failed_total",
            &[("rule", "fwd"), ("action", &missing_dest), ("code", "9332")]
        ),
        n as f64
    );
    let keyed = [("rule", "keyed"), ("action", "amqp:amq.topic")];
    assert_eq!(count("iotfwd_action_success_total", &keyed), (n / 2) as f64);
    assert_eq!(
        count(
            "iotfwd_action_failed_total",
            &[("rule", "keyed"), ("code", "9321")]
        ),
        (n / 2) as f64
    );
    // One latency observation per delivered action.
    assert_eq!(
        count("iotfwd_forward_latency_seconds_count", &[]),
        (n + n / 2) as f64
    );
    assert!(count("iotfwd_forward_latency_seconds_sum", &[]) > 0.0);

    // Health: amq.topic delivers (the 9321s are not its fault); the missing exchange is dead.
    let health: Value = eventually("the health report", || async {
        let r = reqwest::get(format!("{}/api/v1/health", d.base))
            .await
            .ok()?;
        r.json().await.ok()
    })
    .await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(
        health["broker"],
        json!({"configured": true, "connected": true}),
        "{health}"
    );
    let dest = |name: &str| {
        health["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["destination"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in {health}"))
    };
    let ok = dest("amqp:amq.topic");
    assert_eq!(ok["state"], "healthy", "{health}");
    assert!(ok["lastSuccess"].is_string(), "{health}");
    assert_eq!(ok["lastError"], Value::Null, "{health}");
    let dead = dest(&missing_dest);
    assert_eq!(dead["state"], "dead", "{health}");
    assert_eq!(dead["lastError"]["code"], 9332, "{health}");
    assert!(dead["lastError"]["time"].is_string(), "{health}");
    assert_eq!(dead["lastSuccess"], Value::Null, "{health}");
    assert_eq!(health["destinations"].as_array().unwrap().len(), 2);
    assert_eq!(health["rules"]["loaded"], 2, "{health}");
    assert_eq!(health["groups"], json!([]), "{health}");
    d.stop().await;
}
