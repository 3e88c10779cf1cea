//! What happened to each message: its rules' outcomes counted and recorded, the actions of
//! the rules it passed run, and the [`MessageReport`] the source answers with.

use serde::Serialize;
use serde_json::Value;

use super::order::Turn;
use crate::action::{ActionReport, Dispatcher};
use crate::engine::{RuleOutcome, RuleResult};
use crate::message::Message;
use crate::outcome::{Code, Failure, Outcomes, Record};

/// What happened to one message, as the ingest API reports it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageReport {
    pub message_id: String,
    pub trace_id: String,
    pub code: Code,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Every rule whose topic filter matched, with what it did.
    pub rules: Vec<RuleReport>,
    /// An action and its error action both failed: the source must not ack the message.
    #[serde(skip)]
    pub requeue: bool,
}

/// What evaluation gave for one message.
pub(super) enum Evaluated {
    /// Each candidate rule's result.
    Rules(Vec<RuleResult>),
    /// The engine panicked on this message (the reason says how).
    Panicked(String),
}

impl MessageReport {
    /// The report of a message whose processing panicked: 9399, and its source redelivers it.
    pub(super) fn panicked(message: &Message, reason: &str) -> MessageReport {
        MessageReport {
            message_id: message.message_id.clone(),
            trace_id: message.trace_id.clone(),
            code: Code::Internal,
            reason: reason.to_owned(),
            rules: Vec::new(),
            requeue: true,
        }
    }

    /// The report of a message a source could not accept (1903, 9321), from its record: the
    /// ids to look the record up by, its code and reason; no rules.
    pub fn rejected(record: &Record) -> MessageReport {
        MessageReport {
            message_id: record.message_id.clone(),
            trace_id: record.trace_id.clone(),
            code: record.code,
            reason: record.reason.clone(),
            rules: Vec::new(),
            requeue: false,
        }
    }
}

/// One candidate rule's result for one message.
#[derive(Clone, Debug, Serialize)]
pub struct RuleReport {
    pub rule: String,
    /// `passed` (WHERE held), `no_result` (WHERE false or NULL) or `failed`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Map<String, Value>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionReport>,
}

/// What a replay from the dead-letter queue runs: the rule and the destination that failed.
#[derive(Clone, Debug)]
pub struct ReplayOf {
    pub rule: String,
    pub destination: String,
}

/// The operation of the record of a message the engine could not evaluate.
pub const ENGINE_OPERATION: &str = "engine";

/// Each candidate rule's turns for its actions (see [`super::order::Lanes`]), in the order of
/// the rules' results; a rule without turns (it does not keep order, or did not pass) has none.
pub(super) type RuleTurns = Vec<Vec<Turn>>;

/// Counts and records one message's rule outcomes and runs the actions of the rules it passed
/// (the rules concurrently), each action in its turn when `turns` holds one for it.
pub(super) async fn finish_message(
    dispatcher: &Dispatcher,
    outcomes: &Outcomes,
    message: &Message,
    evaluated: Evaluated,
    turns: RuleTurns,
    replay: Option<&ReplayOf>,
) -> MessageReport {
    let results = match evaluated {
        Evaluated::Rules(results) => results,
        Evaluated::Panicked(reason) => {
            // The engine could not evaluate it at all: one 9399 record. It is not redelivered
            // (it would panic again); it is acknowledged with its record.
            let failure = Failure::internal(reason);
            outcomes
                .record(Record::rule_failed(message, ENGINE_OPERATION, &failure))
                .await;
            let mut report = MessageReport::panicked(message, failure.reason());
            report.requeue = false;
            return report;
        }
    };
    let mut turns = turns.into_iter();
    let runs = results.into_iter().map(|result| {
        let turns = turns.next().unwrap_or_default();
        finish_rule(dispatcher, outcomes, message, result, turns, replay)
    });
    let mut rules = Vec::new();
    let mut requeue = false;
    for (report, again) in futures::future::join_all(runs).await.into_iter().flatten() {
        rules.push(report);
        requeue |= again;
    }
    MessageReport {
        message_id: message.message_id.clone(),
        trace_id: message.trace_id.clone(),
        code: Code::Ok,
        reason: String::new(),
        rules,
        requeue,
    }
}

/// One rule's result for one message: counted, recorded, its actions run (each in its turn
/// when `turns` has one for it). `None` for a rule a replay does not run; else the rule's
/// report and whether the source must redeliver the message.
async fn finish_rule(
    dispatcher: &Dispatcher,
    outcomes: &Outcomes,
    message: &Message,
    result: RuleResult,
    turns: Vec<Turn>,
    replay: Option<&ReplayOf>,
) -> Option<(RuleReport, bool)> {
    let metrics = outcomes.metrics();
    let mut requeue = false;
    let rule = &result.rule;
    if replay.is_some_and(|r| r.rule != rule.name) {
        // A replay runs the rule that failed, not the others that took it already.
        return None;
    }
    metrics.rule_matched.with_label_values(&[&rule.name]).inc();
    let mut report = RuleReport {
        rule: rule.name.clone(),
        result: "passed",
        code: None,
        reason: String::new(),
        output: None,
        actions: Vec::new(),
    };
    match result.outcome {
        RuleOutcome::Passed(output) => {
            metrics.rule_passed.with_label_values(&[&rule.name]).inc();
            let turns = turns
                .into_iter()
                .map(|mut turn| {
                    Some(async move {
                        turn.wait().await;
                        turn
                    })
                })
                .collect();
            let only = replay.map(|r| r.destination.as_str());
            let dispatched = dispatcher
                .dispatch_in_turn(message, rule, &output, only, turns)
                .await;
            requeue |= dispatched.requeue;
            report.actions = dispatched.actions;
            report.output = Some(output);
        }
        RuleOutcome::NoResult => {
            metrics
                .rule_no_result
                .with_label_values(&[&rule.name])
                .inc();
            report.result = "no_result";
        }
        RuleOutcome::Failed(failure) => {
            metrics
                .rule_failed
                .with_label_values(&[&rule.name, &failure.code().to_string()])
                .inc();
            outcomes
                .record(Record::rule_failed(message, &rule.name, &failure))
                .await;
            report.result = "failed";
            report.code = Some(failure.code());
            report.reason = failure.reason().to_owned();
        }
    }
    Some((report, requeue))
}
