//! The batcher: collects submissions into micro-batches, evaluates each, and runs the
//! actions of its messages while the next batch is evaluated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Submission;
use super::report::finish_message;
use crate::action::Dispatcher;
use crate::engine::{Engine, RuleResult};
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
                owners.push((s.reply, s.permit, s.messages.len()));
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
                results.extend(tokio::task::block_in_place(|| self.engine.evaluate(chunk)));
                metrics
                    .batch_eval_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.batch_size.observe(chunk.len() as f64);
            }
            // Actions run concurrently with the next batch's evaluation; each submission is
            // answered (and its capacity released) when all of its messages are terminal.
            let mut messages = messages.into_iter();
            let mut results = results.into_iter();
            for (reply, permit, n) in owners {
                let msgs: Vec<Message> = messages.by_ref().take(n).collect();
                let res: Vec<Vec<RuleResult>> = results.by_ref().take(n).collect();
                let dispatcher = self.dispatcher.clone();
                let outcomes = self.outcomes.clone();
                in_flight.spawn(async move {
                    let reports = futures::future::join_all(
                        msgs.iter()
                            .zip(res)
                            .map(|(m, r)| finish_message(&dispatcher, &outcomes, m, r)),
                    )
                    .await;
                    let _ = reply.send(reports);
                    drop(permit);
                });
            }
            while in_flight.try_join_next().is_some() {}
        }
        while in_flight.join_next().await.is_some() {}
    }
}
