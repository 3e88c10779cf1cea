//! Supervision: a panic inside evaluation is a 9399 record for the message that caused it,
//! not a dead pipeline; the daemon goes on forwarding and stays ready.

use super::harness::{Daemon, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_evaluation_is_a_9399_for_its_message_and_the_daemon_goes_on() {
    // Each test runs in its own process under nextest; the topic is this test's own.
    // SAFETY: set before the daemon (and any other thread of this test) starts.
    unsafe { std::env::set_var(iotfwd::engine::PANIC_TOPIC_ENV, "/pk/poison/post") };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(
        dir.path().join("rules/all.toml"),
        "sql = '''SELECT n FROM \"/pk/+/post\"'''\n",
    )
    .unwrap();
    let daemon = Daemon::start_without_broker(&dir.path().join("rules"), |c| {
        c.engine.batch_max_wait_ms = 50;
    })
    .await;
    let batch = [
        r#"{"topic":"/pk/good1/post","payload":{"n":1},"messageId":"m1"}"#,
        r#"{"topic":"/pk/poison/post","payload":{"n":2},"messageId":"m2"}"#,
        r#"{"topic":"/pk/good2/post","payload":{"n":3},"messageId":"m3"}"#,
    ]
    .join("\n");
    let report = daemon.post(batch).await;
    let messages = report["messages"].as_array().unwrap();
    let codes: Vec<u64> = messages
        .iter()
        .map(|m| m["code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [200, 9399, 200], "{report}");
    assert!(
        messages[1]["reason"]
            .as_str()
            .unwrap()
            .contains("fault injection"),
        "{report}"
    );
    assert_eq!(messages[0]["rules"][0]["result"], "passed", "{report}");
    assert_eq!(messages[2]["rules"][0]["result"], "passed", "{report}");

    // The panic is on record, under the message it happened to.
    let logs = eventually("the 9399 record", || async {
        let logs = daemon.get_json("/api/v1/logs?messageId=m2").await;
        let found = logs["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["code"] == 9399 && r["operation"] == "engine");
        found.then_some(logs)
    })
    .await;
    assert!(logs["count"].as_u64().unwrap() >= 2, "{logs}");

    // And the daemon still forwards, and is ready.
    let after = daemon
        .post(r#"{"topic":"/pk/good3/post","payload":{"n":4}}"#)
        .await;
    assert_eq!(after["messages"][0]["code"], 200, "{after}");
    assert_eq!(after["messages"][0]["rules"][0]["result"], "passed");
    assert_eq!(daemon.get("/readyz").await.0, 200);
    daemon.stop().await;
}
