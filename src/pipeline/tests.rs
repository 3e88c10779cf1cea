//! The pipeline in process: submit, batch, evaluate, finish, with a rule set and no
//! destinations. What the sources see (reports, errors) and what is recorded, in order.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::*;
use crate::limits::Limiter;
use crate::message::Identity;
use crate::rules::{Compiler, RuleSet};
use crate::telemetry::Metrics;

struct Fixture {
    pipeline: Pipeline,
    records: mpsc::Receiver<Record>,
    _task: tokio::task::JoinHandle<()>,
}

fn start_with(rules: &[(&str, &str)], capacity: usize) -> Fixture {
    let compiler = Arc::new(Compiler::new(8));
    let rules = rules
        .iter()
        .map(|(name, text)| {
            compiler
                .compile_text(name, Path::new("r.toml"), text)
                .unwrap()
        })
        .collect();
    let engine = Engine::new(Arc::clone(&compiler), Arc::new(RuleSet::new(rules)));
    let (tx, records) = mpsc::channel(1024);
    let outcomes = Outcomes::new(Arc::new(Metrics::new())).with_sink(tx);
    let dispatcher = Dispatcher::new(outcomes.clone(), Limiter::disabled());
    let mut config = Config::default();
    config.engine.queue_capacity = capacity;
    config.engine.batch_max_wait_ms = 1;
    let (pipeline, task) = start(&config, engine, dispatcher, outcomes);
    Fixture {
        pipeline,
        records,
        _task: task,
    }
}

fn message(topic: &str, payload: &str) -> Message {
    Message::new(
        topic.into(),
        Bytes::copy_from_slice(payload.as_bytes()),
        Identity::default(),
    )
    .unwrap()
}

const HOT: &str = "sql = '''SELECT t FROM \"/p1/+/up\" WHERE t > 30'''\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_answers_each_message_with_what_each_rule_did() {
    let mut f = start_with(&[("hot", HOT)], 64);
    let batch = vec![
        message("/p1/a/up", r#"{"t": 40}"#),
        message("/p1/b/up", r#"{"t": 10}"#),
        message("/p1/c/up", "[]"),
        message("/p2/d/up", r#"{"t": 40}"#),
    ];
    let ids: Vec<String> = batch.iter().map(|m| m.message_id.clone()).collect();
    let reports = f.pipeline.submit(batch, "test").await.unwrap();
    let got: Vec<(&str, Vec<&str>)> = reports
        .iter()
        .map(|r| {
            (
                r.message_id.as_str(),
                r.rules.iter().map(|x| x.result).collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (ids[0].as_str(), vec!["passed"]),
            (ids[1].as_str(), vec!["no_result"]),
            (ids[2].as_str(), vec!["failed"]),
            (ids[3].as_str(), vec![]),
        ]
    );
    assert!(reports.iter().all(|r| r.code.as_u16() == 200 && !r.requeue));
    assert_eq!(reports[2].rules[0].code.map(|c| c.as_u16()), Some(9320));

    // Every uplink is recorded before any rule record; then the output and the failure.
    let mut records = Vec::new();
    while let Ok(r) = f.records.try_recv() {
        records.push((r.message_id, r.operation, r.code.as_u16()));
    }
    assert_eq!(records.len(), 6, "{records:?}");
    assert!(
        records[..4]
            .iter()
            .all(|(_, op, code)| op.starts_with("/p") && *code == 200)
    );
    assert!(records.contains(&(ids[0].clone(), "hot".into(), 200)));
    assert!(records.contains(&(ids[2].clone(), "hot".into(), 9320)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_larger_than_the_queue_is_refused_whole() {
    let f = start_with(&[("hot", HOT)], 2);
    let batch = (0..3).map(|_| message("/p1/a/up", "{}")).collect();
    match f.pipeline.submit(batch, "test").await {
        Err(SubmitError::TooMany(3, 2)) => {}
        other => panic!("{:?}", other.map(|r| r.len())),
    }
    assert!(
        f.pipeline
            .submit(Vec::new(), "test")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_is_recorded_with_its_code_under_the_ids_it_came_with() {
    let mut f = start_with(&[], 4);
    let failure = Failure::payload_invalid("bad envelope");
    let given = Identity {
        message_id: Some("m-7".into()),
        ..Identity::default()
    };
    let report = f.pipeline.reject("/bad", b"x", &failure, &given).await;
    assert_eq!(report.code.as_u16(), 9320);
    let r = f.records.try_recv().unwrap();
    assert_eq!((r.operation.as_str(), r.code.as_u16()), ("/bad", 9320));
    assert_eq!(r.message_id, "m-7");
    assert_eq!(r.trace_id.len(), 32, "a fresh trace id");
    assert_eq!(
        (report.message_id.as_str(), report.trace_id.as_str()),
        ("m-7", r.trace_id.as_str()),
        "the answer names the record's ids"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_queue_behind_a_full_engine_instead_of_failing() {
    let f = start_with(&[("hot", HOT)], 2);
    let runs = (0..8).map(|n| {
        let p = f.pipeline.clone();
        async move {
            let m = message("/p1/a/up", &format!(r#"{{"t": {}}}"#, 30 + n));
            p.submit(vec![m], "test").await.unwrap()
        }
    });
    let reports = futures::future::join_all(runs).await;
    assert_eq!(reports.len(), 8);
    let passed = reports
        .iter()
        .filter(|r| r[0].rules[0].result == "passed")
        .count();
    assert_eq!(passed, 7, "t = 31..37 pass, t = 30 does not");
}
