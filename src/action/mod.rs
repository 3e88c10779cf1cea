//! Actions: what happens to a rule's output.
//!
//! Each action of a matched rule reaches exactly one terminal outcome, recorded once as a
//! `ruleengine` record: 200 when delivered, otherwise the failure's code. A failed action hands
//! the message to the rule's `[error_action]` when it has one.
//!
//! Destinations: this build resolves every action's templates (an invalid parameter is 9321)
//! and then needs a destination backend. The RabbitMQ publisher (`to = "amqp"`, needs
//! `[broker]`) and the AMQP 1.0 consumer groups (`to = "group"`, needs `[subscription]`) are
//! the next steps of the roadmap; until a backend is running, the action fails with 9325
//! (destination unavailable) and says which backend is missing. Nothing is dropped silently.

use serde::Serialize;

use crate::engine::Output;
use crate::message::Message;
use crate::outcome::{BizCode, Code, Outcomes, Record};
use crate::rules::{ActionSpec, Rule};

/// The terminal outcome of one action for one message, as the HTTP API reports it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActionReport {
    pub destination: String,
    pub code: Code,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// For a failed action with an `[error_action]`: that action's outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_action: Option<Box<ActionReport>>,
}

/// Executes actions and records their outcomes.
#[derive(Clone)]
pub struct Dispatcher {
    outcomes: Outcomes,
}

impl Dispatcher {
    pub fn new(outcomes: Outcomes) -> Dispatcher {
        Dispatcher { outcomes }
    }

    /// Runs every action of `rule` for one output; one record per action (and per error action).
    pub async fn dispatch(
        &self,
        message: &Message,
        rule: &Rule,
        output: &Output,
    ) -> Vec<ActionReport> {
        if rule.actions.is_empty() {
            let content = serde_json::to_string(output).unwrap_or_default();
            self.outcomes
                .record(Record::for_message(
                    message,
                    BizCode::RuleEngine,
                    rule.name.clone(),
                    Code::Ok,
                    "",
                    content,
                ))
                .await;
            return Vec::new();
        }
        let mut reports = Vec::with_capacity(rule.actions.len());
        for action in &rule.actions {
            let mut report = self.execute(message, rule, action, output, "").await;
            if !report.code.is_success()
                && let Some(error_action) = &rule.error_action
            {
                let why = format!(
                    "for {}, which failed with {}",
                    report.destination, report.code
                );
                let fallback = self
                    .execute(message, rule, error_action, output, &why)
                    .await;
                report.error_action = Some(Box::new(fallback));
            }
            reports.push(report);
        }
        reports
    }

    async fn execute(
        &self,
        message: &Message,
        rule: &Rule,
        action: &ActionSpec,
        output: &Output,
        context: &str,
    ) -> ActionReport {
        let destination = action.destination();
        let (code, reason) = match resolve(action, output) {
            Err(reason) => (Code::ParamInvalid, reason),
            Ok(()) => (Code::DestinationUnavailable, missing_backend(action)),
        };
        let reason = if context.is_empty() {
            reason
        } else {
            format!("{reason} (error action {context})")
        };
        let content = serde_json::to_string(output).unwrap_or_default();
        self.outcomes
            .record(Record::for_message(
                message,
                BizCode::RuleEngine,
                format!("{}/{}", rule.name, destination),
                code,
                reason.clone(),
                content,
            ))
            .await;
        ActionReport {
            destination,
            code,
            reason,
            error_action: None,
        }
    }
}

/// Resolves the action's templates against the output; an unresolvable one is 9321.
fn resolve(action: &ActionSpec, output: &Output) -> Result<(), String> {
    for (field, template) in action.templates() {
        template
            .render(output)
            .map_err(|e| format!("{field}: {e}"))?;
    }
    Ok(())
}

fn missing_backend(action: &ActionSpec) -> String {
    match action {
        ActionSpec::Amqp(_) => {
            "no RabbitMQ broker is connected, so amqp actions cannot be delivered".into()
        }
        ActionSpec::Group(g) => format!(
            "consumer group {:?} is not hosted: no AMQP 1.0 endpoint is running",
            g.group
        ),
    }
}
