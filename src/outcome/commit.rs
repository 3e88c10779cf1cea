//! Commit tickets: how a source learns that the records of a message are committed, so it
//! acknowledges the message only then (`store.durability = "acked"`).
//!
//! Every record sink (the record store, the JSON lines) is fed through a [`RecordSender`], which
//! counts the records it puts into the sink's channel, and the sink's writer reports in a
//! [`CommitLog`] how many of them, in channel order, it has committed (or failed to commit).
//! Commits are grouped: a waiter does not get a commit of its own, it waits for the writer's
//! next transaction, which holds everything queued before it.
//!
//! ```text
//! mark = outcomes.mark()            before the message's first record (its uplink)
//! outcomes.record(..) ...           each send counts: pushed += 1, then the record is queued
//! outcomes.committed(mark).await    ticket = pushed now; wait until through >= ticket
//! ```
//!
//! Why `pushed` read after the last send is a valid ticket: a sender counts before it queues,
//! so when a sender's own record is in the channel, `pushed` already counts it and every
//! record ahead of it. Records that others counted but have not queued yet only make the wait
//! a little longer (they are queued right after, without an await in between). A waiter whose
//! records may be in a batch that failed, or whose record the sink refused (closed at
//! shutdown), learns it: any failure or refusal after its mark is reported to it as
//! [`NotCommitted`], conservatively (the source then answers 503 or requeues, so the message
//! comes back instead of being acknowledged without its records).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use super::Record;

/// How long a source waits for a commit before it answers with an error: longer than the
/// writer's retries of a refused batch (about 2.6 s) plus a large commit, short enough that a
/// stuck disk does not hold sources forever.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a sink's writer has done with the records queued to it, in channel order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Records handled (committed or failed), counted from the first one queued.
    pub through: u64,
    /// Batches the writer could not commit.
    pub failed_batches: u64,
    /// The writer has ended: nothing queued from now on will be committed.
    pub stopped: bool,
}

/// The shared count of one sink: records queued by senders, and what its writer did with them.
#[derive(Debug)]
pub struct CommitLog {
    pushed: AtomicU64,
    refused: AtomicU64,
    state: watch::Sender<Committed>,
    /// Sources waiting for a commit right now, and a wake-up for the writer when one starts:
    /// the store commits sooner while someone waits (`store.ack_commit_interval_ms`).
    waiting: AtomicU64,
    arrived: Notify,
}

impl Default for CommitLog {
    fn default() -> Self {
        CommitLog {
            pushed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            state: watch::Sender::new(Committed::default()),
            waiting: AtomicU64::new(0),
            arrived: Notify::new(),
        }
    }
}

/// Counts one waiter for as long as it lives.
struct Waiting<'a>(&'a CommitLog);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CommitLog {
    /// The writer committed (`ok`) or gave up on (`!ok`) the next `n` records of its channel.
    pub fn advance(&self, n: u64, ok: bool) {
        self.state.send_modify(|c| {
            c.through += n;
            if !ok {
                c.failed_batches += 1;
            }
        });
    }

    /// The writer has ended. Called from a drop guard, so a panicking writer also reports it.
    pub fn stop(&self) {
        self.state.send_modify(|c| c.stopped = true);
    }

    /// Whether a source is waiting for a commit now.
    pub fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Resolves when a source starts waiting (or has since the last call).
    pub async fn waiter_arrived(&self) {
        self.arrived.notified().await
    }

    /// What the writer has done so far.
    pub fn committed(&self) -> Committed {
        *self.state.borrow()
    }

    /// A mark to wait from: taken before a message's first record.
    pub fn mark(&self) -> Mark {
        Mark {
            failed_batches: self.state.borrow().failed_batches,
            refused: self.refused.load(Ordering::SeqCst),
        }
    }

    /// Resolves once every record queued so far is committed; an error when a batch failed
    /// or a record was refused since `mark`, when the writer ended first, or after `timeout`.
    pub async fn wait(&self, mark: Mark, timeout: Duration) -> Result<(), NotCommitted> {
        let ticket = self.pushed.load(Ordering::SeqCst);
        let mut rx = self.state.subscribe();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self);
        if rx.borrow().through < ticket {
            // The writer may be holding a partial batch for the longer interval: hurry it.
            self.arrived.notify_one();
        }
        let state =
            match tokio::time::timeout(timeout, rx.wait_for(|c| c.through >= ticket || c.stopped))
                .await
            {
                Ok(Ok(state)) => *state,
                // The sender lives in `self`, so the channel cannot close while we wait.
                Ok(Err(_)) => return Err(NotCommitted::Stopped),
                Err(_) => return Err(NotCommitted::TimedOut(timeout)),
            };
        if state.failed_batches > mark.failed_batches {
            return Err(NotCommitted::Failed);
        }
        if self.refused.load(Ordering::SeqCst) > mark.refused {
            return Err(NotCommitted::Stopped);
        }
        if state.through < ticket {
            return Err(NotCommitted::Stopped);
        }
        Ok(())
    }
}

/// Where a message's wait for its records' commit starts ([`CommitLog::mark`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    failed_batches: u64,
    refused: u64,
}

/// Why a message's records may not be committed; the source answers with an error so the
/// message is sent again (HTTP 503) or redelivered (AMQP nack with requeue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotCommitted {
    #[error(
        "the record store could not commit this message's records (see the ERROR log of the \
         record store); send it again"
    )]
    Failed,
    #[error("the record store is closed (the daemon is shutting down); send the message again")]
    Stopped,
    #[error("the record store did not commit this message's records within {0:?}; send it again")]
    TimedOut(Duration),
}

/// The sending side of a sink's channel: counts each record it queues in the sink's
/// [`CommitLog`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RecordSender {
    tx: mpsc::Sender<Record>,
    log: Arc<CommitLog>,
}

impl RecordSender {
    pub fn new(tx: mpsc::Sender<Record>, log: Arc<CommitLog>) -> RecordSender {
        RecordSender { tx, log }
    }

    /// Queues `record`, waiting while the channel is full. An error when the sink is closed.
    pub async fn send(&self, record: Record) -> Result<(), mpsc::error::SendError<Record>> {
        match self.tx.reserve().await {
            Ok(permit) => {
                // Counted before it is queued, with no await in between (see the module doc).
                self.log.pushed.fetch_add(1, Ordering::SeqCst);
                permit.send(record);
                Ok(())
            }
            Err(_) => {
                self.log.refused.fetch_add(1, Ordering::SeqCst);
                Err(mpsc::error::SendError(record))
            }
        }
    }

    /// Queues `records` in order, waiting for room a channel's capacity at a time rather than
    /// for each record. An error when the sink is closed: the records not queued are refused.
    pub async fn send_all(&self, records: Vec<Record>) -> Result<(), mpsc::error::SendError<()>> {
        let chunk = self.tx.max_capacity().max(1);
        let mut records = records.into_iter();
        let mut left = records.len();
        while left > 0 {
            let n = left.min(chunk);
            match self.tx.reserve_many(n).await {
                Ok(permits) => {
                    // Counted before they are queued, with no await in between (module doc).
                    self.log.pushed.fetch_add(n as u64, Ordering::SeqCst);
                    for (permit, record) in permits.zip(records.by_ref()) {
                        permit.send(record);
                    }
                    left -= n;
                }
                Err(e) => {
                    self.log.refused.fetch_add(left as u64, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The sink's commit log.
    pub fn log(&self) -> &Arc<CommitLog> {
        &self.log
    }
}

/// A sink without a writer that reports commits (a test's plain channel): its log never
/// advances, so do not wait on it.
impl From<mpsc::Sender<Record>> for RecordSender {
    fn from(tx: mpsc::Sender<Record>) -> RecordSender {
        RecordSender::new(tx, Arc::new(CommitLog::default()))
    }
}

/// Reports [`CommitLog::stop`] when dropped: the writer's end, by return or by panic.
pub struct StopOnDrop(pub Arc<CommitLog>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> Record {
        crate::outcome::store::testing::record(i as usize, 0, crate::outcome::Code::Ok)
    }

    /// A waiter resolves only when the writer reached its ticket, and learns of a failed
    /// batch or a writer that ended first.
    #[tokio::test]
    async fn a_ticket_waits_for_its_commit_and_learns_of_failures() {
        let (tx, mut rx) = mpsc::channel(16);
        let log = Arc::new(CommitLog::default());
        let sender = RecordSender::new(tx, Arc::clone(&log));
        let mark = log.mark();
        for i in 0..3 {
            sender.send(record(i)).await.unwrap();
        }
        let waiter = {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.wait(mark, Duration::from_secs(5)).await })
        };
        assert_eq!(rx.recv().await.unwrap().message_id, "m0");
        log.advance(2, true);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "resolved before its last record was committed"
        );
        log.advance(1, true);
        assert_eq!(waiter.await.unwrap(), Ok(()));

        // A failed batch after the mark fails the waiter.
        let mark = log.mark();
        sender.send(record(3)).await.unwrap();
        log.advance(1, false);
        assert_eq!(
            log.wait(mark, Duration::from_secs(5)).await,
            Err(NotCommitted::Failed)
        );
        // ... but not a waiter marked after it whose records are committed.
        let mark = log.mark();
        sender.send(record(4)).await.unwrap();
        log.advance(1, true);
        assert_eq!(log.wait(mark, Duration::from_secs(5)).await, Ok(()));

        // A writer that ends before the ticket, and a closed sink, are errors, not hangs.
        let mark = log.mark();
        sender.send(record(5)).await.unwrap();
        log.stop();
        assert_eq!(
            log.wait(mark, Duration::from_secs(5)).await,
            Err(NotCommitted::Stopped)
        );
        drop(rx);
        let mark = log.mark();
        assert!(sender.send(record(6)).await.is_err());
        assert_eq!(
            log.wait(mark, Duration::from_secs(5)).await,
            Err(NotCommitted::Stopped)
        );
    }

    #[tokio::test]
    async fn a_writer_that_never_commits_times_out() {
        let (tx, _rx) = mpsc::channel(4);
        let log = Arc::new(CommitLog::default());
        let sender = RecordSender::new(tx, Arc::clone(&log));
        let mark = log.mark();
        sender.send(record(0)).await.unwrap();
        assert!(matches!(
            log.wait(mark, Duration::from_millis(50)).await,
            Err(NotCommitted::TimedOut(_))
        ));
    }
}
