//! Actions: what happens to a rule's output.
//!
//! The [`Dispatcher`] runs every action of a matched rule for one output, and each action
//! reaches exactly one terminal outcome, recorded once as a `ruleengine` record carrying its
//! code and attempt count: 200 when delivered, otherwise the failure's code. Per action:
//!
//! 1. **quota**: the forward counts once against its device, instance and tenant
//!    ([`Limiter::acquire`]); a refusal is 9324 / 9326 (or 9321 for an unmapped product);
//! 2. **send**, through the destination of its kind (one folder each: [`amqp`], [`group`], [`mqtt`]);
//!    a failure that may pass (broker down: 9325; nack or channel error: 9331) is retried with
//!    exponential backoff and jitter under the action's `retry` policy; one that cannot (9321
//!    invalid parameter, 9332 exchange missing, 9333 access refused, 9399) is final at once;
//! 3. **error action**: a failed action hands the original payload to the rule's
//!    `[error_action]`;
//! 4. **dead letter**: a final failure the error action did not take (there is none, or it
//!    failed too) goes to the [`dead_letter`] queue with the original payload, envelope and
//!    failure; only if that write fails is the source message not acked
//!    ([`DispatchReport::requeue`]);
//! 5. **one record** and the destination's state in [`destinations`] (for `/api/v1/health`).
//!
//! Adding a kind of destination: its spec in `rules/action.rs` (the rule file's schema), a
//! folder here with a type implementing [`Destination`], and one line in
//! [`Dispatcher::send`].

pub mod amqp;
pub mod dead_letter;
pub mod destinations;
pub mod group;
pub mod mqtt;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

use crate::engine::Output;
use crate::limits::Limiter;
use crate::message::Message;
use crate::outcome::{Code, Failure, Outcomes, Record};
use crate::rules::{ActionSpec, Rule};
use dead_letter::{DeadLetter, DeadLetters, Origin};
use destinations::Destinations;

/// No turns to wait for: every action starts at once.
const NO_TURNS: Vec<Option<std::future::Ready<()>>> = Vec::new();

/// The terminal outcome of one action for one message, as the HTTP API reports it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActionReport {
    pub destination: String,
    pub code: Code,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub attempts: u32,
    /// For a failed action with an `[error_action]`: that action's outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_action: Option<Box<ActionReport>>,
    /// For a failure the error action did not take: the dead-letter queue it was written to
    /// (`spool:<file>`, `amqp:<exchange>`).
    #[serde(rename = "deadLettered", skip_serializing_if = "Option::is_none")]
    pub dead_lettered: Option<String>,
}

/// Every action outcome of one rule for one message.
#[derive(Clone, Debug, Default)]
pub struct DispatchReport {
    pub actions: Vec<ActionReport>,
    /// An action failed for good and neither its error action nor the dead-letter queue took
    /// it: the source should redeliver the message.
    pub requeue: bool,
}

/// What an action sends: the rule's output, or (for the error action) the original payload
/// with the failure described in `failed*` headers.
#[derive(Clone, Copy)]
pub enum Body<'a> {
    Output,
    Failure(&'a ActionReport),
}

/// One send of one action: everything a destination needs to know.
pub struct Job<'a> {
    pub message: &'a Message,
    pub rule: &'a Rule,
    pub output: &'a Output,
    pub body: Body<'a>,
    /// Attempts so far; a destination counts each try.
    pub attempts: &'a AtomicU32,
    /// Counts retries (attempts after the first) of this action.
    pub retries: prometheus::IntCounter,
}

impl Job<'_> {
    /// Counts one more attempt.
    pub fn attempt(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }
}

/// A kind of destination. Its `Spec` is the action's table in the rule file.
pub trait Destination {
    type Spec;

    /// Sends the job's body and waits until the destination took it (or failed for good,
    /// after the retries the spec allows).
    fn send(
        &self,
        spec: &Self::Spec,
        job: &Job<'_>,
    ) -> impl std::future::Future<Output = Result<(), Failure>> + Send;
}

/// Executes actions and records their outcomes.
#[derive(Clone)]
pub struct Dispatcher {
    outcomes: Outcomes,
    limiter: Limiter,
    /// Each destination's state for `GET /api/v1/health`, fed with every terminal outcome.
    destinations: Arc<Destinations>,
    amqp: amqp::Amqp,
    group: group::Groups,
    /// Where final failures go; without one (benchmarks, unit tests) a failed error action
    /// makes the source redeliver the message.
    dead_letters: Option<DeadLetters>,
    mqtt: mqtt::Mqtt,
}

impl Dispatcher {
    pub fn new(outcomes: Outcomes, limiter: Limiter) -> Dispatcher {
        Dispatcher {
            outcomes,
            limiter,
            destinations: Arc::default(),
            amqp: amqp::Amqp::default(),
            group: group::Groups::default(),
            dead_letters: None,
            mqtt: mqtt::Mqtt::default(),
        }
    }

    /// Writes final failures to this dead-letter queue.
    pub fn with_dead_letters(mut self, dead_letters: DeadLetters) -> Dispatcher {
        self.dead_letters = Some(dead_letters);
        self
    }

    /// The dead-letter queue, when there is one.
    pub fn dead_letters(&self) -> Option<&DeadLetters> {
        self.dead_letters.as_ref()
    }

    /// Dead-letters a failed forward of `message` (`origin` says whether the payload is the
    /// device's or a rule output for a group). `None` without a dead-letter queue; else whether
    /// the write went through.
    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
        &self,
        message: &Message,
        origin: Origin,
        rule: &str,
        destination: &str,
        code: Code,
        reason: &str,
        attempts: u32,
    ) -> Option<bool> {
        let queue = self.dead_letters.as_ref()?;
        let d = DeadLetter::of_message(message, origin, rule, destination, code, reason, attempts);
        Some(queue.put(d, message).await)
    }

    /// Reports each destination's outcomes to `destinations`.
    pub fn with_destinations(mut self, destinations: Arc<Destinations>) -> Dispatcher {
        self.destinations = destinations;
        self
    }

    /// Publishes `to = "amqp"` actions through this broker.
    pub fn with_broker(mut self, broker: Arc<crate::broker::Broker>) -> Dispatcher {
        self.amqp = amqp::Amqp::new(broker);
        self
    }

    /// Forwards `to = "group"` actions to these consumer groups.
    pub fn with_groups(mut self, groups: Arc<crate::subscription::Hub>) -> Dispatcher {
        self.group = group::Groups::new(groups);
        self
    }

    /// Publishes `to = "mqtt"` actions through this MQTT destination.
    pub fn with_mqtt(mut self, mqtt: mqtt::Mqtt) -> Dispatcher {
        self.mqtt = mqtt;
        self
    }

    /// The registry: which destination runs which kind of action.
    async fn send(&self, spec: &ActionSpec, job: &Job<'_>) -> Result<(), Failure> {
        match spec {
            ActionSpec::Amqp(s) => self.amqp.send(s, job).await,
            ActionSpec::Group(s) => self.group.send(s, job).await,
            ActionSpec::Mqtt(s) => self.mqtt.send(s, job).await,
        }
    }

    /// Runs every action of `rule` for one output, concurrently; one record per action (and
    /// per error action and dead letter).
    pub async fn dispatch(
        &self,
        message: &Message,
        rule: &Rule,
        output: &Output,
    ) -> DispatchReport {
        self.dispatch_to(message, rule, output, None, NO_TURNS)
            .await
    }

    /// [`Dispatcher::dispatch`], or with `only` [`Dispatcher::replay`], in turn: action `i`
    /// of `rule.actions` starts once `turns[i]` (when given) resolves, and holds what it
    /// resolved to until the action is terminal (delivered, or taken by the error action or
    /// the dead-letter queue). Whoever hands out the turns keeps an order per destination
    /// with them (the pipeline's per-device order).
    pub async fn dispatch_in_turn<F: Future>(
        &self,
        message: &Message,
        rule: &Rule,
        output: &Output,
        only: Option<&str>,
        turns: Vec<Option<F>>,
    ) -> DispatchReport {
        self.dispatch_to(message, rule, output, only, turns).await
    }

    /// A replay from the dead-letter queue: runs only the actions of `rule` whose destination
    /// is `destination` (the one that failed), or every action when the rule has none to it any
    /// more (the fix changed it), with the error action as usual, and writes no dead letter:
    /// the replay keeps the one it came from when it fails again.
    pub async fn replay(
        &self,
        message: &Message,
        rule: &Rule,
        output: &Output,
        destination: &str,
    ) -> DispatchReport {
        self.dispatch_to(message, rule, output, Some(destination), NO_TURNS)
            .await
    }

    async fn dispatch_to<F: Future>(
        &self,
        message: &Message,
        rule: &Rule,
        output: &Output,
        only: Option<&str>,
        turns: Vec<Option<F>>,
    ) -> DispatchReport {
        if rule.actions.is_empty() {
            let content = serde_json::to_string(output).unwrap_or_default();
            self.outcomes
                .record(Record::rule_output(message, &rule.name, content))
                .await;
            return DispatchReport::default();
        }
        // A replay runs the action that failed; if the rule has none to that destination any
        // more (the fix was to change it), it runs the rule's actions as they are now.
        let replaying = only.is_some();
        let only = only.filter(|d| rule.actions.iter().any(|a| a.destination() == *d));
        let mut turns = turns.into_iter();
        let actions = rule
            .actions
            .iter()
            .map(|a| (a, turns.next().flatten()))
            .filter(|(a, _)| only.is_none_or(|d| a.destination() == d));
        let runs = actions.map(|(action, turn)| async move {
            // Held until this action is terminal, however it ends.
            let _turn = match turn {
                Some(turn) => Some(turn.await),
                None => None,
            };
            let mut report = self
                .execute(message, rule, action, output, Body::Output)
                .await;
            if report.code.is_success() {
                return (report, false);
            }
            let mut why = report.reason.clone();
            if let Some(error_action) = &rule.error_action {
                let fallback = self
                    .execute(message, rule, error_action, output, Body::Failure(&report))
                    .await;
                let taken = fallback.code.is_success();
                why = format!(
                    "{why}; the error action {} failed too with {}: {}",
                    fallback.destination, fallback.code, fallback.reason
                );
                report.error_action = Some(Box::new(fallback));
                if taken {
                    return (report, false);
                }
            }
            if replaying {
                // A replay: the dead letter it came from stays.
                return (report, false);
            }
            // A refusal by a quota (or a 9399) with no error action is recorded and dropped,
            // as the platform does; one the rule wanted kept (it has an error action, which
            // failed) is dead-lettered like any other failure.
            if !dead_letter::is_dead_lettered(report.code) && report.error_action.is_none() {
                return (report, false);
            }
            let written = self
                .dead_letter(
                    message,
                    Origin::Rule,
                    &rule.name,
                    &report.destination,
                    report.code,
                    &why,
                    report.attempts,
                )
                .await;
            let requeue = match written {
                Some(true) => {
                    report.dead_lettered = self.dead_letters.as_ref().map(DeadLetters::name);
                    false
                }
                Some(false) => true,
                // No dead-letter queue (benchmarks, unit tests): a failed error action makes
                // the source redeliver.
                None => report.error_action.is_some(),
            };
            (report, requeue)
        });
        let results = futures::future::join_all(runs).await;
        let requeue = results.iter().any(|(_, r)| *r);
        DispatchReport {
            actions: results.into_iter().map(|(a, _)| a).collect(),
            requeue,
        }
    }

    /// Runs the rule's `[error_action]` for a message whose forward failed elsewhere (a group
    /// delivery its consumer rejected): `failed` describes that failure. `None` when the rule
    /// has no error action; else whether it delivered.
    pub async fn run_error_action(
        &self,
        message: &Message,
        rule: &Rule,
        output: &Output,
        failed: &ActionReport,
    ) -> Option<bool> {
        let error_action = rule.error_action.as_ref()?;
        let report = self
            .execute(message, rule, error_action, output, Body::Failure(failed))
            .await;
        Some(report.code.is_success())
    }

    async fn execute(
        &self,
        message: &Message,
        rule: &Rule,
        action: &ActionSpec,
        output: &Output,
        body: Body<'_>,
    ) -> ActionReport {
        let destination = action.destination();
        let metrics = self.outcomes.metrics();
        let labels = [rule.name.as_str(), destination.as_str()];
        metrics.action_executions.with_label_values(&labels).inc();
        metrics.action_in_flight.with_label_values(&labels).inc();
        let attempts = AtomicU32::new(0);
        // Each forward counts once against its device, tenant and instance, before it runs.
        // The error action is where a refused or failed forward goes, so it is not counted.
        let quota = match body {
            Body::Output => {
                self.limiter
                    .acquire(
                        &message.product_key,
                        &message.device_name,
                        message.tenant_id.as_deref(),
                        message.instance_id.as_deref(),
                    )
                    .await
            }
            Body::Failure(_) => Ok(Default::default()),
        };
        let (tenant, instance) = match &quota {
            Ok(r) => (r.tenant.clone(), r.instance.clone()),
            Err(t) => (t.tenant.clone(), t.instance.clone()),
        };
        let result = match quota {
            Err(throttle) => Err(throttle.failure),
            Ok(_) => {
                let job = Job {
                    message,
                    rule,
                    output,
                    body,
                    attempts: &attempts,
                    retries: metrics.action_retries.with_label_values(&labels),
                };
                self.send(action, &job).await
            }
        };
        let attempts = attempts.load(Ordering::Relaxed);
        self.destinations.observe(&destination, &result);
        metrics.action_in_flight.with_label_values(&labels).dec();
        match &result {
            Ok(()) => {
                metrics.action_success.with_label_values(&labels).inc();
                if matches!(body, Body::Output) {
                    metrics
                        .forward_latency
                        .observe(message.received_at.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                metrics
                    .action_failed
                    .with_label_values(&[labels[0], labels[1], &e.code().to_string()])
                    .inc();
            }
        }
        let content = serde_json::json!({ "attempts": attempts, "output": output }).to_string();
        let mut record = Record::action(message, &rule.name, &destination, &result, content);
        if let Body::Failure(failed) = body {
            let reason = format!(
                "error action for {} (which failed with {}){}{}",
                failed.destination,
                failed.code,
                if record.reason.is_empty() { "" } else { ": " },
                record.reason
            );
            record = record.with_reason(reason);
        }
        if let Some(t) = tenant {
            record.tenant_id = t.to_string();
        }
        if let Some(i) = instance {
            record.instance_id = i.to_string();
        }
        let report = ActionReport {
            destination,
            code: record.code,
            reason: record.reason.clone(),
            attempts,
            error_action: None,
            dead_lettered: None,
        };
        self.outcomes.record(record).await;
        report
    }
}

#[cfg(test)]
mod tests;
