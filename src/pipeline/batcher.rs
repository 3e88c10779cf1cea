//! The batcher: collects submissions into micro-batches, evaluates each, and runs the
//! actions of its messages while the next batch is evaluated.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::mpsc;

use super::Submission;
use super::order::Lanes;
use super::report::{Evaluated, MessageReport, RuleTurns, finish_message};
use crate::action::Dispatcher;
use crate::config::Ordering;
use crate::engine::{Engine, RuleOutcome};
use crate::message::Message;
use crate::outcome::Outcomes;

pub(super) struct Batcher {
    pub engine: Engine,
    pub dispatcher: Dispatcher,
    pub outcomes: Outcomes,
    /// Most messages evaluated in one batch (`engine.batch_max_messages`).
    pub batch_max: usize,
    /// How long a batch waits for more after its first message (`engine.batch_max_wait_ms`).
    pub wait: Duration,
    /// `engine.ordering`: whether one device's actions to each destination run in order.
    pub ordering: Ordering,
    /// Each device's actions in flight per destination, for the rules that keep order.
    pub lanes: Lanes,
}

impl Batcher {
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Submission>) {
        let metrics = Arc::clone(self.outcomes.metrics());
        metrics.rules_loaded.set(self.engine.rules().len() as i64);
        let mut in_flight = tokio::task::JoinSet::new();
        while let Some(first) = rx.recv().await {
            let deadline = tokio::time::Instant::now() + self.wait;
            let mut submissions = vec![first];
            let mut size = submissions[0].messages.len();
            while size < self.batch_max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => {
                        size += s.messages.len();
                        submissions.push(s);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let mut messages = Vec::with_capacity(size);
            let mut owners = Vec::with_capacity(submissions.len());
            for s in submissions {
                owners.push((s.reply, s.permit, s.messages.len(), s.replay));
                messages.extend(s.messages);
            }
            // A reloaded rule set is swapped in here, between batches; results hold their
            // Arc<Rule>.
            if self.engine.refresh() {
                metrics.rules_loaded.set(self.engine.rules().len() as i64);
            }
            let mut results = Vec::with_capacity(messages.len());
            for chunk in messages.chunks(self.batch_max) {
                let started = Instant::now();
                // Evaluation is CPU work; let the runtime move other tasks off this worker.
                results.extend(tokio::task::block_in_place(|| {
                    evaluate(&self.engine, chunk)
                }));
                metrics
                    .batch_eval_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.batch_size.observe(chunk.len() as f64);
            }
            // Actions run concurrently with the next batch's evaluation; each submission is
            // answered (and its capacity released) when all of its messages are terminal.
            let mut messages = messages.into_iter();
            let mut results = results.into_iter();
            for (reply, permit, n, replay) in owners {
                let msgs: Vec<Message> = messages.by_ref().take(n).collect();
                let res: Vec<Evaluated> = results.by_ref().take(n).collect();
                let dispatcher = self.dispatcher.clone();
                let outcomes = self.outcomes.clone();
                let turns: Vec<RuleTurns> = msgs
                    .iter()
                    .zip(&res)
                    .map(|(m, r)| turns_of(&mut self.lanes, self.ordering, m, r))
                    .collect();
                in_flight.spawn(async move {
                    // The messages run concurrently; each action of a rule that keeps order
                    // waits for the device's earlier action to the same destination.
                    let runs = msgs.iter().zip(res).zip(turns).map(|((m, r), turns)| {
                        finish_message(&dispatcher, &outcomes, m, r, turns, replay.as_ref())
                    });
                    let finish = futures::future::join_all(runs);
                    // A panic while running actions must not lose the submission's answer:
                    // its messages are reported as 9399 and redelivered by their source.
                    let reports = match AssertUnwindSafe(finish).catch_unwind().await {
                        Ok(reports) => reports,
                        Err(panic) => {
                            let reason = panic_reason(panic.as_ref());
                            tracing::error!("panic while finishing messages: {reason}");
                            msgs.iter()
                                .map(|m| MessageReport::panicked(m, &reason))
                                .collect()
                        }
                    };
                    let _ = reply.send(reports);
                    drop(permit);
                });
            }
            while in_flight.try_join_next().is_some() {}
            self.lanes.prune();
        }
        while in_flight.join_next().await.is_some() {}
    }
}

/// The turns of one message's actions, taken now (in queue order) in the lanes of its device
/// and each action's destination: for each rule it passed that keeps order (the rule's
/// `ordering`, else `engine.ordering`), one turn per action. The actions of the other rules
/// (`ordering = "none"`) run at once.
fn turns_of(lanes: &mut Lanes, default: Ordering, m: &Message, evaluated: &Evaluated) -> RuleTurns {
    let Evaluated::Rules(results) = evaluated else {
        return Vec::new();
    };
    results
        .iter()
        .map(|r| {
            let keeps = matches!(r.outcome, RuleOutcome::Passed(_))
                && r.rule.ordering.unwrap_or(default) == Ordering::Device;
            if !keeps {
                return Vec::new();
            }
            r.rule
                .actions
                .iter()
                .map(|a| lanes.take(&m.product_key, &m.device_name, &a.destination()))
                .collect()
        })
        .collect()
}

/// Evaluates `chunk`; a panic inside the engine does not end the batcher. The batch is then
/// evaluated again one message at a time, so only the messages that make it panic are
/// reported as [`Evaluated::Panicked`] (9399) and the others go on.
fn evaluate(engine: &Engine, chunk: &[Message]) -> Vec<Evaluated> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| engine.evaluate(chunk))) {
        Ok(results) => results.into_iter().map(Evaluated::Rules).collect(),
        Err(panic) if chunk.len() == 1 => vec![Evaluated::Panicked(panic_reason(panic.as_ref()))],
        Err(panic) => {
            tracing::error!(
                messages = chunk.len(),
                "the engine panicked evaluating a batch ({}); evaluating its messages one by one",
                panic_reason(panic.as_ref())
            );
            chunk
                .iter()
                .flat_map(|m| evaluate(engine, std::slice::from_ref(m)))
                .collect()
        }
    }
}

/// The text of a panic's payload.
fn panic_reason(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("panic: {text}")
}
