//! The Dispatcher without a broker or hub: what it records, what it reports, and when it asks
//! the source to redeliver. Destinations against real brokers are tested in tests/it/.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;

use super::*;
use crate::limits::Limiter;
use crate::message::{Identity, Message};
use crate::outcome::{Outcomes, Record};
use crate::rules::{Compiler, Rule};
use crate::telemetry::Metrics;

fn rule(text: &str) -> Rule {
    Compiler::new(8)
        .compile_text("r", Path::new("r.toml"), text)
        .unwrap_or_else(|e| panic!("{e:?}"))
}

fn message() -> Message {
    Message::new(
        "/p1/d1/up".into(),
        Bytes::from_static(br#"{"t": 1}"#),
        Identity::default(),
    )
    .unwrap()
}

fn output() -> Output {
    json!({"t": 1}).as_object().unwrap().clone()
}

/// A dispatcher with no broker, no hub and no quotas, and the records it makes.
fn dispatcher() -> (Dispatcher, mpsc::Receiver<Record>) {
    let (tx, rx) = mpsc::channel(64);
    let outcomes = Outcomes::new(Arc::new(Metrics::new())).with_sink(tx);
    (Dispatcher::new(outcomes, Limiter::disabled()), rx)
}

fn drain(rx: &mut mpsc::Receiver<Record>) -> Vec<Record> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(r);
    }
    out
}

#[tokio::test]
async fn a_rule_without_actions_records_its_output_once() {
    let (d, mut rx) = dispatcher();
    let r = rule("sql = '''SELECT t FROM \"/p1/+/up\"'''\n");
    let report = d.dispatch(&message(), &r, &output()).await;
    assert!(report.actions.is_empty() && !report.requeue);
    let records = drain(&mut rx);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].code.as_u16(), 200);
    assert_eq!(records[0].operation, "r");
    assert_eq!(records[0].content, r#"{"t":1}"#);
}

#[tokio::test]
async fn an_unavailable_destination_is_9325_with_its_reason_and_one_record() {
    let (d, mut rx) = dispatcher();
    let r = rule(
        "sql = '''SELECT t FROM \"/p1/+/up\"'''\n[[action]]\nto = \"group\"\ngroup = \"ops\"\n",
    );
    let report = d.dispatch(&message(), &r, &output()).await;
    assert_eq!(report.actions.len(), 1);
    let a = &report.actions[0];
    assert_eq!(
        (a.destination.as_str(), a.code.as_u16()),
        ("group:ops", 9325)
    );
    assert!(a.reason.contains("\"ops\" is not hosted"), "{}", a.reason);
    assert_eq!(a.attempts, 0, "nothing was attempted");
    let records = drain(&mut rx);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].code.as_u16(), 9325);
    assert_eq!(records[0].reason, a.reason);
}

#[tokio::test]
async fn the_error_action_runs_for_a_failed_forward_and_says_what_it_stands_for() {
    let (d, mut rx) = dispatcher();
    let r = rule(
        "sql = '''SELECT t FROM \"/p1/+/up\"'''\n\
         [[action]]\nto = \"amqp\"\nexchange = \"alerts\"\n\
         [error_action]\nto = \"group\"\ngroup = \"parking\"\n",
    );
    let report = d.dispatch(&message(), &r, &output()).await;
    let a = &report.actions[0];
    assert_eq!(
        (a.destination.as_str(), a.code.as_u16()),
        ("amqp:alerts", 9325)
    );
    let fallback = a.error_action.as_ref().expect("the error action ran");
    assert_eq!(fallback.destination, "group:parking");
    assert_eq!(fallback.code.as_u16(), 9325);
    let records = drain(&mut rx);
    assert_eq!(records.len(), 2, "one record per action: {records:?}");
    assert!(
        records[1]
            .reason
            .starts_with("error action for amqp:alerts (which failed with 9325): "),
        "{}",
        records[1].reason
    );
    assert!(
        report.requeue,
        "the forward and its error action both failed"
    );
}

#[tokio::test]
async fn every_action_of_a_rule_runs_and_reports_in_rule_order() {
    let (d, mut rx) = dispatcher();
    let r = rule(
        "sql = '''SELECT t FROM \"/p1/+/up\"'''\n\
         [[action]]\nto = \"group\"\ngroup = \"a\"\n\
         [[action]]\nto = \"amqp\"\nexchange = \"b\"\n",
    );
    let report = d.dispatch(&message(), &r, &output()).await;
    let dests: Vec<&str> = report
        .actions
        .iter()
        .map(|a| a.destination.as_str())
        .collect();
    assert_eq!(dests, ["group:a", "amqp:b"]);
    assert_eq!(drain(&mut rx).len(), 2);
}
