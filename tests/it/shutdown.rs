//! SIGTERM to the real binary: intake stops, consumers are closed, exit 0 within the grace.

use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use iotfwd::client::{Consumer, ConsumerOptions};

use super::harness::listening;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_consumers_and_exits_0_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    let config = dir.path().join("iotfwd.toml");
    std::fs::write(
        &config,
        "[http]\nlisten = \"127.0.0.1:0\"\n[rules]\ndir = \"rules\"\n[data]\ndir = \"data\"\n\
             [shutdown]\ngrace_ms = 3000\n[subscription]\nlisten = \"127.0.0.1:0\"\n\
             [[group]]\nid = \"g\"\naccess_key_id = \"ak\"\nsecret_file = \"secret\"\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(super::harness::daemon_binary())
        .args(["run", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (_, amqp) = listening(child.stderr.take().unwrap(), true);
    let url = format!("amqp://{}", amqp.unwrap());
    let mut consumer = None;
    for _ in 0..100 {
        if let Ok(c) = Consumer::connect(&ConsumerOptions::new(&url, "g", "ak", "s3cret")).await {
            consumer = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut consumer = consumer.expect("the daemon came up and took a consumer within 10 s");
    let started = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        consumer.receiver.recv::<Body<Value>>(),
    )
    .await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "the consumer saw no close: {closed:?}"
    );
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM (grace 3 s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
