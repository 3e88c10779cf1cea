//! The pipeline: where sources hand messages in, and where they learn what became of them.
//!
//! ```text
//! source --submit--> [bounded queue: engine.queue_capacity messages]
//!        --> batcher (engine.batch_max_messages, or engine.batch_max_wait_ms after the first)
//!        --> engine.evaluate(batch) --> per message: records, actions --> MessageReport
//! ```
//!
//! [`Pipeline::submit`] records each message's `uplink`, queues it, and resolves when every
//! rule and action of every message has reached its outcome. The queue is bounded: capacity
//! is held until a submission's messages are all terminal, so a slow engine or a slow
//! destination slows the sources rather than growing memory.
//!
//! With `store.durability = "acked"`, `submit` then waits until the records of those steps
//! (each message's uplink, its rules' records, its actions' records) are committed, so the
//! source acknowledges only messages whose records survive a crash; a commit that fails is
//! [`SubmitError::NotRecorded`]. A source that records rejections itself brackets them with
//! [`Pipeline::mark`] and [`Pipeline::committed`].

mod batcher;
mod order;
mod report;

pub use order::{Turn, Turns};
pub use report::{MessageReport, ReplayOf, RuleReport};

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::action::Dispatcher;
use crate::config::Config;
use crate::engine::Engine;
use crate::message::{Identity, Message};
use crate::outcome::{Failure, Mark, NotCommitted, Outcomes, Record};

/// Messages of one submission on their way to the engine.
struct Submission {
    messages: Vec<Message>,
    reply: oneshot::Sender<Vec<MessageReport>>,
    /// Capacity this submission holds until every action of its messages is terminal, so the
    /// queue bounds what is in flight, not just what waits for the engine.
    permit: tokio::sync::OwnedSemaphorePermit,
    /// A replay from the dead-letter queue (one message): only that rule and destination run.
    replay: Option<ReplayOf>,
}

/// The entry point for sources. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    tx: mpsc::UnboundedSender<Submission>,
    capacity: Arc<Semaphore>,
    max_messages: usize,
    outcomes: Outcomes,
}

/// Why a submission was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("{0} messages exceed the engine queue ({1}); send fewer per request")]
    TooMany(usize, usize),
    /// Processed, but their records may not be committed: do not acknowledge them.
    #[error("{0}")]
    NotRecorded(#[from] NotCommitted),
}

impl Pipeline {
    /// Records the uplink of each message, then evaluates them; resolves when every rule and
    /// action of every message has reached its outcome and, with `store.durability = "acked"`,
    /// their records are committed. Waits while the engine queue is full.
    pub async fn submit(
        &self,
        messages: Vec<Message>,
        source: &str,
    ) -> Result<Vec<MessageReport>, SubmitError> {
        self.submit_in_turn(messages, source, Turn::free()).await
    }

    /// [`Pipeline::submit`] for a source that submits from many tasks at once: the messages
    /// enter the engine queue only after those of every earlier `turn` of its [`Turns`] did,
    /// so they are evaluated, and (with `engine.ordering = "device"`) finished per device, in
    /// the order the source received them.
    pub async fn submit_in_turn(
        &self,
        messages: Vec<Message>,
        source: &str,
        mut turn: Turn,
    ) -> Result<Vec<MessageReport>, SubmitError> {
        turn.wait().await;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        if messages.len() > self.max_messages {
            return Err(SubmitError::TooMany(messages.len(), self.max_messages));
        }
        let permit = Arc::clone(&self.capacity)
            .acquire_many_owned(messages.len() as u32)
            .await
            .map_err(|_| SubmitError::ShuttingDown)?;
        let mark = self.outcomes.mark();
        self.outcomes
            .metrics()
            .messages_received
            .with_label_values(&[source])
            .inc_by(messages.len() as u64);
        self.outcomes
            .record_all(messages.iter().map(Record::uplink).collect())
            .await;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Submission {
                messages,
                reply,
                permit,
                replay: None,
            })
            .map_err(|_| SubmitError::ShuttingDown)?;
        turn.entered();
        let reports = rx.await.map_err(|_| SubmitError::ShuttingDown)?;
        self.outcomes.committed(mark).await?;
        Ok(reports)
    }

    /// Where a source's wait for the records it is about to write starts (see
    /// [`Pipeline::committed`]).
    pub fn mark(&self) -> Mark {
        self.outcomes.mark()
    }

    /// Resolves once every record written since `mark` is committed (at once with
    /// `store.durability = "async"`); an error means the source must not acknowledge.
    pub async fn committed(&self, mark: Mark) -> Result<(), NotCommitted> {
        self.outcomes.committed(mark).await
    }

    /// Runs `message` (from the dead-letter queue, under its original ids) through the
    /// pipeline again for the rule and destination that failed (`of`): its `uplink` record
    /// says it is a replay (`note` says of what). Resolves with its report once terminal.
    pub async fn replay(
        &self,
        message: Message,
        of: ReplayOf,
        note: &str,
    ) -> Result<MessageReport, SubmitError> {
        let permit = Arc::clone(&self.capacity)
            .acquire_many_owned(1)
            .await
            .map_err(|_| SubmitError::ShuttingDown)?;
        self.outcomes
            .metrics()
            .messages_received
            .with_label_values(&["replay"])
            .inc();
        self.outcomes.record(Record::replay(&message, note)).await;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Submission {
                messages: vec![message],
                reply,
                permit,
                replay: Some(of),
            })
            .map_err(|_| SubmitError::ShuttingDown)?;
        let mut reports = rx.await.map_err(|_| SubmitError::ShuttingDown)?;
        reports.pop().ok_or(SubmitError::ShuttingDown)
    }

    /// Records the `uplink` of a replay that does not run through the pipeline (a consumer
    /// group's dead letter, handed to its group again).
    pub async fn record_replay(&self, message: &Message, note: &str) {
        self.outcomes.record(Record::replay(message, note)).await;
    }

    /// The daemon's metrics, for what a source counts itself (ignored identity overrides).
    pub fn metrics(&self) -> &crate::telemetry::Metrics {
        self.outcomes.metrics()
    }

    /// Records a message a source could not accept (1903 for a bad topic, 9321 for a bad
    /// envelope) under the ids it came with (`given`; fresh ones where it has none) and returns
    /// what to answer for it: its code and the ids its record is found by.
    pub async fn reject(
        &self,
        topic: &str,
        payload: &[u8],
        failure: &Failure,
        given: &Identity,
    ) -> MessageReport {
        let record = Record::rejected(topic, payload, failure, given);
        let report = MessageReport::rejected(&record);
        self.outcomes.record(record).await;
        report
    }
}

/// Starts the engine task. Returns the pipeline and the task's handle; the task ends when every
/// `Pipeline` clone is dropped and the queue is drained.
pub fn start(
    config: &Config,
    engine: Engine,
    dispatcher: Dispatcher,
    outcomes: Outcomes,
) -> (Pipeline, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let capacity = config.engine.queue_capacity;
    let pipeline = Pipeline {
        tx,
        capacity: Arc::new(Semaphore::new(capacity)),
        max_messages: capacity,
        outcomes: outcomes.clone(),
    };
    let batcher = batcher::Batcher {
        engine,
        dispatcher,
        outcomes,
        batch_max: config.engine.batch_max_messages,
        wait: config.batch_max_wait(),
        ordering: config.engine.ordering,
        lanes: order::Lanes::default(),
    };
    let task = tokio::spawn(batcher.run(rx));
    (pipeline, task)
}

#[cfg(test)]
mod tests;
