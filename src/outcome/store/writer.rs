//! The write path of the record store (drawn in [`super`]): the drain task that gathers records
//! into batches, and the writer thread that commits them and runs retention.
//!
//! Two halves, because SQLite blocks: the drain task lives on the runtime, where senders wait on
//! its bounded channel (backpressure instead of lost records), and hands whole batches to one OS
//! thread that owns the connection, so no commit ever blocks a runtime worker. The drain task
//! shapes the commits (at most one partial batch per `store.commit_interval_ms`, or per
//! `store.ack_commit_interval_ms` while a source waits for a commit); the thread
//! retries a refused batch and purges old records in chunks between batches, so a large purge
//! never stalls intake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};

use super::StoreOptions;
use super::schema::INSERT;
use crate::outcome::Record;
use crate::outcome::commit::{CommitLog, StopOnDrop};
use crate::telemetry::StoreMetrics;

/// Records deleted per retention transaction.
pub const PURGE_CHUNK: usize = 5000;

/// What the writer did, returned by [`super::Store::shutdown`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub written: u64,
    pub failed: u64,
    pub purged: u64,
    pub transactions: u64,
}

/// Requests to the drain task.
pub(super) enum Control {
    /// Commit everything queued so far, then answer.
    Flush(oneshot::Sender<()>),
    /// Delete records older than the cutoff (ms), then answer with the count.
    Purge(i64, oneshot::Sender<u64>),
    /// Close the queue, write what is in it, and end.
    Stop,
}

/// Work for the writer thread, in order.
pub(super) enum Job {
    Write(Vec<Record>),
    Flush(oneshot::Sender<()>),
    Purge(i64, Option<oneshot::Sender<u64>>),
}

/// Gathers records into batches for the writer thread and forwards flush, purge and stop
/// requests in order with them; runs retention every `retention_interval`.
pub(super) async fn drain_task(
    mut records: mpsc::Receiver<Record>,
    mut control: mpsc::UnboundedReceiver<Control>,
    jobs: mpsc::Sender<Job>,
    options: StoreOptions,
    metrics: StoreMetrics,
    log: Arc<CommitLog>,
) {
    use tokio::time::Instant;
    let batch_max = options.batch_max_records;
    let (slow, fast) = (options.commit_interval, options.ack_commit_interval);
    let retention_ms = i64::try_from(options.retention.as_millis()).unwrap_or(i64::MAX);
    let mut retention = tokio::time::interval(options.retention_interval);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut control_open = true;
    let mut records_open = true;
    let mut buf: Vec<Record> = Vec::with_capacity(batch_max);
    // When the last batch went to the writer: a partial batch waits until `interval` after it.
    let mut last_sent = Instant::now()
        .checked_sub(slow)
        .unwrap_or_else(Instant::now);
    loop {
        // While a source waits for a commit (store.durability = "acked"), the shorter interval.
        let interval = if log.has_waiters() { fast } else { slow };
        let due = last_sent + interval;
        if !buf.is_empty() && (buf.len() >= batch_max || !records_open || Instant::now() >= due) {
            metrics.queued.set((records.len() + buf.len()) as i64);
            let batch = std::mem::replace(&mut buf, Vec::with_capacity(batch_max));
            if jobs.send(Job::Write(batch)).await.is_err() {
                return;
            }
            last_sent = Instant::now();
            continue;
        }
        if !records_open {
            break;
        }
        let room = batch_max - buf.len();
        tokio::select! {
            // Control first: it is rare, and records must not starve it under load.
            biased;
            c = control.recv(), if control_open => match c {
                None | Some(Control::Stop) => {
                    records.close();
                    control_open = false;
                }
                Some(Control::Flush(ack)) => {
                    loop {
                        while buf.len() < batch_max {
                            match records.try_recv() {
                                Ok(r) => buf.push(r),
                                Err(_) => break,
                            }
                        }
                        if buf.is_empty() {
                            break;
                        }
                        let batch = std::mem::replace(&mut buf, Vec::with_capacity(batch_max));
                        if jobs.send(Job::Write(batch)).await.is_err() {
                            return;
                        }
                        last_sent = Instant::now();
                    }
                    let _ = jobs.send(Job::Flush(ack)).await;
                }
                Some(Control::Purge(cutoff, ack)) => {
                    let _ = jobs.send(Job::Purge(cutoff, Some(ack))).await;
                }
            },
            _ = retention.tick(), if control_open => {
                let cutoff = crate::message::now_ms().saturating_sub(retention_ms);
                let _ = jobs.send(Job::Purge(cutoff, None)).await;
            }
            // A partial batch's commit is due.
            _ = tokio::time::sleep_until(due), if !buf.is_empty() => {}
            // A source started waiting: the shorter interval may apply now.
            _ = log.waiter_arrived(), if !buf.is_empty() && interval > fast => {}
            n = records.recv_many(&mut buf, room) => {
                if n == 0 {
                    records_open = false;
                }
                metrics.queued.set((records.len() + buf.len()) as i64);
            }
        }
    }
    metrics.queued.set(0);
}

/// The writer thread: owns the connection, runs the jobs in order, and purges in chunks between
/// them. Each batch, committed or given up on, advances `log` (the sources' acknowledgements
/// wait on it); its end, by return or panic, stops it.
pub(super) fn writer_thread(
    mut conn: Connection,
    path: &Path,
    mut jobs: mpsc::Receiver<Job>,
    metrics: &StoreMetrics,
    log: Arc<CommitLog>,
) -> WriterStats {
    let _stopped = StopOnDrop(Arc::clone(&log));
    let mut stats = WriterStats::default();
    // A purge in progress: cutoff, waiters, deleted so far.
    let mut purge: Option<(i64, Vec<oneshot::Sender<u64>>, u64)> = None;
    loop {
        let job = if purge.is_some() {
            match jobs.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        } else {
            match jobs.blocking_recv() {
                Some(job) => Some(job),
                None => break,
            }
        };
        match job {
            Some(Job::Write(batch)) => {
                let n = batch.len() as u64;
                match write_batch(&mut conn, &batch) {
                    Ok(()) => {
                        stats.written += n;
                        stats.transactions += 1;
                        metrics.written.inc_by(n);
                        log.advance(n, true);
                    }
                    Err(e) => {
                        log.advance(n, false);
                        stats.failed += n;
                        metrics.failed.inc_by(n);
                        tracing::error!(
                            store = %path.display(),
                            records = n,
                            first_message_id = %batch.first().map(|r| r.message_id.as_str()).unwrap_or(""),
                            "record store: cannot write {n} outcome records after retries: {e}; \
                             they are in the diagnostic log (target iotfwd::outcome) only"
                        );
                    }
                }
            }
            Some(Job::Flush(ack)) => {
                let _ = ack.send(());
            }
            Some(Job::Purge(cutoff, ack)) => match &mut purge {
                Some((c, waiters, _)) => {
                    *c = (*c).max(cutoff);
                    waiters.extend(ack);
                }
                None => purge = Some((cutoff, ack.into_iter().collect(), 0)),
            },
            None => {
                let (cutoff, _, deleted) = purge.as_mut().expect("purging");
                match purge_chunk(&conn, *cutoff) {
                    Ok(n) => {
                        *deleted += n as u64;
                        stats.purged += n as u64;
                        metrics.purged.inc_by(n as u64);
                        if n < PURGE_CHUNK {
                            let (_, waiters, deleted) = purge.take().expect("purging");
                            if deleted > 0 {
                                tracing::info!(
                                    store = %path.display(),
                                    deleted,
                                    "record store: retention deleted {deleted} records"
                                );
                                let _ = conn.execute_batch("PRAGMA optimize");
                            }
                            for w in waiters {
                                let _ = w.send(deleted);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(store = %path.display(), "record store: retention failed: {e}");
                        purge = None;
                    }
                }
            }
        }
    }
    let _ = conn.execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);");
    if let Err((_, e)) = conn.close() {
        tracing::warn!(store = %path.display(), "record store: close: {e}");
    }
    stats
}

/// One transaction; retried three times (100 ms, 500 ms, 2 s apart) on an error.
fn write_batch(conn: &mut Connection, batch: &[Record]) -> rusqlite::Result<()> {
    let mut delays = [100, 500, 2000].into_iter();
    loop {
        match try_write_batch(conn, batch) {
            Ok(()) => return Ok(()),
            Err(e) => match delays.next() {
                Some(ms) => {
                    tracing::warn!("record store: write failed, retrying in {ms} ms: {e}");
                    std::thread::sleep(Duration::from_millis(ms));
                }
                None => return Err(e),
            },
        }
    }
}

fn try_write_batch(conn: &mut Connection, batch: &[Record]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(INSERT)?;
        for r in batch {
            insert.execute(params![
                r.time_ms,
                r.trace_id,
                r.message_id,
                r.product_key,
                r.device_name,
                r.biz_code.as_str(),
                r.operation,
                r.code.as_u16(),
                r.reason,
                r.content,
                r.tenant_id,
                r.instance_id,
            ])?;
        }
    }
    tx.commit()
}

fn purge_chunk(conn: &Connection, cutoff_ms: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM records WHERE id IN \
         (SELECT id FROM records WHERE time_ms < ?1 ORDER BY time_ms LIMIT ?2)",
    )?
    .execute(params![cutoff_ms, PURGE_CHUNK as i64])
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::super::testing::{Backend, base, filled_on, record};
    use super::*;
    use crate::outcome::Code;

    /// A quiet store commits a record at once; a burst waits for the commit interval and goes
    /// in one transaction; a flush does not wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_is_gathered_into_one_commit_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            commit_interval: Duration::from_secs(10),
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("o.db"), options, None).unwrap();
        let reader = store.reader().unwrap();
        let tx = store.sender();
        tx.send(record(0, base(), Code::Ok)).await.unwrap();
        let started = std::time::Instant::now();
        while reader.count().unwrap() < 1 {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "a quiet store's first record waited for the commit interval"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for i in 1..=1000 {
            tx.send(record(i, base() + i as i64, Code::Ok))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if started.elapsed() < Duration::from_secs(10) {
            assert_eq!(reader.count().unwrap(), 1, "the burst did not wait");
        }
        store.flush().await.unwrap();
        assert_eq!(reader.count().unwrap(), 1001);
        let stats = store.shutdown().await;
        assert_eq!((stats.written, stats.transactions), (1001, 2));
    }

    /// A source waiting for a commit (store.durability = "acked") does not wait out a long
    /// commit interval: the shorter ack interval applies while it waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_source_hurries_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            commit_interval: Duration::from_secs(10),
            ack_commit_interval: Duration::from_millis(5),
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("o.db"), options, None).unwrap();
        let reader = store.reader().unwrap();
        let (tx, log) = (store.sender(), store.commit_log());
        // The first record commits at once; the next ones would wait for the 10 s interval.
        tx.send(record(0, base(), Code::Ok)).await.unwrap();
        while reader.count().unwrap() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mark = log.mark();
        for i in 1..=100 {
            tx.send(record(i, base() + i as i64, Code::Ok))
                .await
                .unwrap();
        }
        let started = std::time::Instant::now();
        log.wait(mark, Duration::from_secs(5)).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the waiter waited {:?}",
            started.elapsed()
        );
        assert_eq!(reader.count().unwrap(), 101);
        assert_eq!(log.committed().through, 101);
        store.shutdown().await;
    }

    #[tokio::test]
    async fn purge_deletes_only_old_records() {
        purge_deletes_only_old_records_on(Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn purge_deletes_only_old_records_on_postgres() {
        purge_deletes_only_old_records_on(Backend::Postgres).await;
    }

    async fn purge_deletes_only_old_records_on(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let Some((store, reader, _db)) = filled_on(backend, dir.path(), 12_000).await else {
            return;
        };
        let deleted = store.purge_older_than(base() + 11_000).await.unwrap();
        assert_eq!(deleted, 11_000);
        assert_eq!(reader.count().unwrap(), 1000);
        store.shutdown().await;
    }
}
