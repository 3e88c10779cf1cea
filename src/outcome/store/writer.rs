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
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use rusqlite::{Connection, Statement, params};
use tokio::sync::{mpsc, oneshot};

use super::StoreOptions;
use super::schema::{INSERT_COLUMNS, insert_rows};
use crate::outcome::Record;
use crate::outcome::commit::{CommitLog, StopOnDrop};
use crate::outcome::query::KEY_TABLES;
use crate::telemetry::StoreMetrics;

/// Records deleted per retention transaction.
pub const PURGE_CHUNK: usize = 5000;

/// How many records the device and product lookup tables may lag behind (schema version 2):
/// once the records not yet in them reach this many, the batch that got there adds them all,
/// sorted by key, in its own transaction.
///
/// Why: a B-tree index on (device_name, time_ms) takes each record at its device's place, so a
/// commit rewrites one index page per device it touches: with 1000 devices, about 1000 pages
/// for a commit of 1000 – 16 000 records, and every page is written twice (WAL, then
/// checkpoint). Added in runs of this size, sorted, each page takes all its device's records of
/// the run at once. A query for a device or a product reads the lookup table for the records up
/// to `indexed.through` and the newer ones (fewer than this) from the table itself.
pub const INDEX_RUN: i64 = 32_768;

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
///
/// `spent` brings back the batches the SQLite writer thread has committed: their records are
/// dropped here, on the runtime threads that allocated them, and the emptied vector is the next
/// batch. Freed on the writer thread they took a sixth of its time (mimalloc's frees from a
/// thread that does not own the memory), and the writer thread is the store's bottleneck.
pub(super) async fn drain_task(
    mut records: mpsc::Receiver<Record>,
    mut control: mpsc::UnboundedReceiver<Control>,
    jobs: mpsc::Sender<Job>,
    mut spent: Option<mpsc::UnboundedReceiver<Vec<Record>>>,
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
    // An emptied batch vector from `spent`, for the next batch.
    let mut spare: Option<Vec<Record>> = None;
    let next_buf = |spare: &mut Option<Vec<Record>>| {
        spare
            .take()
            .unwrap_or_else(|| Vec::with_capacity(batch_max))
    };
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
            let batch = std::mem::replace(&mut buf, next_buf(&mut spare));
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
                        let batch = std::mem::replace(&mut buf, next_buf(&mut spare));
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
            Some(mut batch) = recv_spent(&mut spent) => {
                batch.clear();
                if batch.capacity() >= batch_max {
                    spare = Some(batch);
                }
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

/// The next committed batch from the writer thread; pending forever when there is none to
/// come (no `spent` channel, or the writer has ended).
async fn recv_spent(
    spent: &mut Option<mpsc::UnboundedReceiver<Vec<Record>>>,
) -> Option<Vec<Record>> {
    match spent {
        Some(rx) => match rx.recv().await {
            Some(batch) => Some(batch),
            None => {
                *spent = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// The writer thread: owns the connection, runs the jobs in order, and purges in chunks between
/// them. Each batch, committed or given up on, advances `log` (the sources' acknowledgements
/// wait on it); its end, by return or panic, stops it.
pub(super) fn writer_thread(
    mut conn: Connection,
    path: &Path,
    mut jobs: mpsc::Receiver<Job>,
    spent: mpsc::UnboundedSender<Vec<Record>>,
    index_run: i64,
    metrics: &StoreMetrics,
    log: Arc<CommitLog>,
) -> WriterStats {
    let _stopped = StopOnDrop(Arc::clone(&log));
    let mut stats = WriterStats::default();
    let mut ids = match Ids::read(&conn) {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!(store = %path.display(), "record store: cannot read its ids: {e}");
            return stats;
        }
    };
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
                match write_batch(&mut conn, &batch, &mut ids, index_run) {
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
                // Dropped by the drain task; here only once it has ended.
                let _ = spent.send(batch);
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
                match purge_chunk(&mut conn, *cutoff) {
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

/// The writer's ids: the next record's, and the newest one in the lookup tables.
///
/// The writer numbers records itself, one above the highest id it has ever given, so an id is
/// never reused (SQLite's own numbering reuses ids once the newest rows are deleted) and every
/// record above `through` is one the lookup tables still have to take.
#[derive(Clone, Copy, Debug)]
struct Ids {
    next: i64,
    through: i64,
}

impl Ids {
    fn read(conn: &Connection) -> rusqlite::Result<Ids> {
        let through: i64 = conn.query_row("SELECT through FROM indexed", [], |r| r.get(0))?;
        let max: Option<i64> = conn.query_row("SELECT max(id) FROM records", [], |r| r.get(0))?;
        Ok(Ids {
            next: max.unwrap_or(0).max(through) + 1,
            through,
        })
    }
}

/// One transaction; retried three times (100 ms, 500 ms, 2 s apart) on an error. `ids`
/// advances only when it commits.
fn write_batch(
    conn: &mut Connection,
    batch: &[Record],
    ids: &mut Ids,
    index_run: i64,
) -> rusqlite::Result<()> {
    let mut delays = [100, 500, 2000].into_iter();
    loop {
        match try_write_batch(conn, batch, *ids, index_run) {
            Ok(advanced) => {
                *ids = advanced;
                return Ok(());
            }
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

fn try_write_batch(
    conn: &mut Connection,
    batch: &[Record],
    ids: Ids,
    index_run: i64,
) -> rusqlite::Result<Ids> {
    let tx = conn.transaction()?;
    let mut next = ids.next;
    {
        let mut many = tx.prepare_cached(&INSERT_MANY)?;
        let mut chunks = batch.chunks_exact(INSERT_ROWS);
        for chunk in &mut chunks {
            for (i, r) in chunk.iter().enumerate() {
                bind_record(&mut many, i * INSERT_COLUMNS, next, r)?;
                next += 1;
            }
            many.raw_execute()?;
        }
        let mut one = tx.prepare_cached(&INSERT_ONE)?;
        for r in chunks.remainder() {
            bind_record(&mut one, 0, next, r)?;
            one.raw_execute()?;
            next += 1;
        }
    }
    let mut through = ids.through;
    if next - 1 - through >= index_run {
        for (table, key, column) in KEY_TABLES {
            tx.prepare_cached(&format!(
                "INSERT INTO {table} ({key}, t, rid) SELECT {column}, time_ms, id FROM records \
                 WHERE id > ?1 ORDER BY 1, 2, 3"
            ))?
            .execute([through])?;
        }
        through = next - 1;
        tx.prepare_cached("UPDATE indexed SET through = ?1")?
            .execute([through])?;
    }
    tx.commit()?;
    Ok(Ids { next, through })
}

/// Records per `INSERT` statement (the rest of a batch goes one by one). In a fill through the
/// real write path, 64 rows per statement against one: see docs/benchmarks.md.
const INSERT_ROWS: usize = 64;

/// The statements' text, built once: the statement cache is looked up by it on every batch.
static INSERT_MANY: LazyLock<String> = LazyLock::new(|| insert_rows(INSERT_ROWS));
static INSERT_ONE: LazyLock<String> = LazyLock::new(|| insert_rows(1));

/// Binds record `r`, numbered `id`, to the parameters after `offset` of an [`insert_rows`]
/// statement.
fn bind_record(
    insert: &mut Statement<'_>,
    offset: usize,
    id: i64,
    r: &Record,
) -> rusqlite::Result<()> {
    insert.raw_bind_parameter(offset + 1, id)?;
    insert.raw_bind_parameter(offset + 2, r.time_ms)?;
    insert.raw_bind_parameter(offset + 3, r.trace_id.as_str())?;
    insert.raw_bind_parameter(offset + 4, r.message_id.as_str())?;
    insert.raw_bind_parameter(offset + 5, r.product_key.as_str())?;
    insert.raw_bind_parameter(offset + 6, r.device_name.as_str())?;
    insert.raw_bind_parameter(offset + 7, r.biz_code.as_str())?;
    insert.raw_bind_parameter(offset + 8, r.operation.as_str())?;
    insert.raw_bind_parameter(offset + 9, r.code.as_u16())?;
    insert.raw_bind_parameter(offset + 10, r.reason.as_str())?;
    insert.raw_bind_parameter(offset + 11, r.content.as_str())?;
    insert.raw_bind_parameter(offset + 12, r.tenant_id.as_str())?;
    insert.raw_bind_parameter(offset + 13, r.instance_id.as_str())?;
    Ok(())
}

/// Deletes the oldest records before `cutoff_ms`, at most [`PURGE_CHUNK`], with their rows in
/// the lookup tables, in one transaction.
fn purge_chunk(conn: &mut Connection, cutoff_ms: i64) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let old: Vec<(i64, i64, String, String)> = tx
        .prepare_cached(
            "SELECT id, time_ms, device_name, product_key FROM records WHERE time_ms < ?1 \
             ORDER BY time_ms LIMIT ?2",
        )?
        .query_map(params![cutoff_ms, PURGE_CHUNK as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    {
        let [
            (device_table, device_key, _),
            (product_table, product_key, _),
        ] = KEY_TABLES;
        let mut device = tx.prepare_cached(&format!(
            "DELETE FROM {device_table} WHERE {device_key} = ?1 AND t = ?2 AND rid = ?3"
        ))?;
        let mut product = tx.prepare_cached(&format!(
            "DELETE FROM {product_table} WHERE {product_key} = ?1 AND t = ?2 AND rid = ?3"
        ))?;
        let mut record = tx.prepare_cached("DELETE FROM records WHERE id = ?1")?;
        for (id, time_ms, device_name, product_key) in &old {
            device.execute(params![device_name, time_ms, id])?;
            product.execute(params![product_key, time_ms, id])?;
            record.execute([id])?;
        }
    }
    tx.commit()?;
    Ok(old.len())
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

    /// A batch longer than one multi-row statement, with a remainder, is stored whole: every
    /// record under the next id, each field in its column, in order.
    #[test]
    fn a_batch_of_several_statements_and_a_remainder_is_stored_field_for_field() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::schema::open_writer(&dir.path().join("o.db"), 16).unwrap();
        let n = 2 * INSERT_ROWS + 5;
        let batch: Vec<Record> = (0..n)
            .map(|i| {
                let mut r = record(i, base() + i as i64, Code::Ok);
                r.reason = format!("why {i}");
                r.tenant_id = format!("ten{i}");
                r.instance_id = format!("inst{i}");
                r
            })
            .collect();
        let ids = Ids {
            next: 10,
            through: 9,
        };
        let after = try_write_batch(&mut conn, &batch, ids, i64::MAX).unwrap();
        assert_eq!((after.next, after.through), (10 + n as i64, 9));
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {} FROM records ORDER BY id",
                crate::outcome::query::COLUMNS
            ))
            .unwrap();
        let rows: Vec<(i64, Record)> = stmt
            .query_map([], super::super::rows::row_to_stored)
            .unwrap()
            .map(|row| {
                let row = row.unwrap();
                (row.id, row.into_record(dir.path()).unwrap())
            })
            .collect();
        assert_eq!(rows.len(), n);
        for (i, (id, r)) in rows.iter().enumerate() {
            assert_eq!(*id, 10 + i as i64);
            assert_eq!(r, &batch[i], "record {i}");
        }
    }

    /// Retention deletes the records' lookup rows with them, and a store emptied by retention
    /// numbers new records after the old ones: an id below the lookup tables' high mark would
    /// never be added to them, and its device's queries would not find it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_takes_lookup_rows_and_ids_are_never_reused() {
        use crate::outcome::query::LogQuery;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let options = StoreOptions {
            index_run: 1,
            ..StoreOptions::default()
        };
        let store = Store::open(&path, options, None).unwrap();
        let tx = store.sender();
        for i in 0..20 {
            tx.send(record(i, base() + i as i64, Code::Ok))
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        assert_eq!(store.purge_older_than(base() + 100).await.unwrap(), 20);
        let conn = Connection::open(&path).unwrap();
        let count = |table: &str| -> i64 {
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(
            (count("records"), count("by_device"), count("by_product")),
            (0, 0, 0)
        );
        for i in 20..23 {
            tx.send(record(i, base() + 200 + i as i64, Code::Ok))
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        let ids: Vec<i64> = conn
            .prepare("SELECT id FROM records ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, [21, 22, 23]);
        let reader = store.reader().unwrap();
        let page = reader
            .query(&LogQuery {
                device: Some("d2".into()),
                ..LogQuery::default()
            })
            .unwrap();
        let found: Vec<&str> = page.records.iter().map(|r| r.message_id.as_str()).collect();
        assert_eq!(found, ["m20"]);
        assert_eq!(count("by_device"), 3);
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
