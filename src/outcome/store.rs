//! The embedded record store: every outcome record in one SQLite file (WAL mode), queryable
//! with [`LogQuery`] by `iotfwd logs` and `GET /api/v1/logs`.
//!
//! Why SQLite: it is one file beside the daemon that survives restarts, has the B-tree indexes
//! the console's queries need (messageId, traceId, (deviceName, time), (productKey, time),
//! time), lets any number of readers (the CLI, the HTTP API) query while the writer writes (WAL),
//! and needs no server. The bundled build pins the SQLite version.
//!
//! The write path stays off the hot path and never drops a record silently:
//!
//! ```text
//! Outcomes::record --(bounded channel, store.queue_capacity)--> drain task (tokio)
//!     --(Job channel, 2 batches)--> writer thread: one transaction per batch
//! ```
//!
//! The drain task takes whatever is queued, up to `store.batch_max_records`, and hands it to a
//! dedicated OS thread that owns the connection and commits the batch in one transaction. When
//! the writer falls behind, the channel fills and `Outcomes::record` waits: intake slows down
//! instead of records being lost. A batch SQLite refuses (disk full, I/O error) is retried
//! three times, then logged at ERROR with its size and counted in
//! `iotfwd_store_records_failed_total`; those records are still in the diagnostic log (and the
//! JSON lines, when configured).
//!
//! Retention deletes records older than `store.retention_days`, at start and every
//! `retention_interval`, in chunks of [`PURGE_CHUNK`] interleaved with the writes, so a large
//! purge never stalls intake. Durability: `synchronous = NORMAL` in WAL mode, so a process crash
//! loses nothing that was committed; a power loss may lose the last few commits.
//!
//! Disk writes are shaped for a store that shares its disk with a broker. A partial batch
//! commits at most once per `store.commit_interval_ms`, so each index page is rewritten once per
//! commit, not once per handful of records. The WAL is checkpointed every `store.checkpoint_mib`
//! (16 MiB): each checkpoint ends with an fsync of what it copied, and RabbitMQ's own fsyncs
//! (publisher confirms) wait behind it, so larger checkpoints mean fewer page copies but
//! longer stalls for the broker next door.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::query::{COLUMNS, Cursor, LogQuery, Order};
use super::{BizCode, Code, Record};
use crate::config::store::StoreConfig;
use crate::telemetry::StoreMetrics;

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id          INTEGER PRIMARY KEY,
    time_ms     INTEGER NOT NULL,
    trace_id    TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    biz_code    TEXT NOT NULL,
    operation   TEXT NOT NULL,
    code        INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    content     TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    instance_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_message_id ON records (message_id);
CREATE INDEX IF NOT EXISTS records_trace_id ON records (trace_id);
CREATE INDEX IF NOT EXISTS records_device_time ON records (device_name, time_ms);
CREATE INDEX IF NOT EXISTS records_product_time ON records (product_key, time_ms);
CREATE INDEX IF NOT EXISTS records_time ON records (time_ms);
";

const INSERT: &str = "INSERT INTO records (time_ms, trace_id, message_id, product_key, \
     device_name, biz_code, operation, code, reason, content, tenant_id, instance_id) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

/// Records deleted per retention transaction.
pub const PURGE_CHUNK: usize = 5000;

/// A query narrowed only by row-by-row filters reads this many newest records (in its range)
/// through the time index before it reads the rest in storage order.
pub const SPLIT_AT: usize = 65_536;

/// Most records `logs trace` returns for one message.
pub const TRACE_MAX_RECORDS: usize = 10_000;

/// Why the store could not do something. The messages name the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "no record store at {0} (store.path, default <data.dir>/outcomes.db); point --config at \
         the daemon's config or --db at the file"
    )]
    Missing(PathBuf),
    #[error("record store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "record store {path} has schema version {found}; this iotfwd reads version \
         {SCHEMA_VERSION} (upgrade iotfwd)"
    )]
    Schema { path: PathBuf, found: i64 },
    #[error(
        "record store {path}: row {id} has {what}; this iotfwd cannot read it (upgrade iotfwd)"
    )]
    Unreadable {
        path: PathBuf,
        id: i64,
        what: String,
    },
    #[error("cannot create the directory of the record store {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the writer thread of the record store {path}: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the record store writer has stopped")]
    Stopped,
}

/// Tuning of the writer; [`StoreOptions::from_config`] gives the daemon's.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most records per transaction.
    pub batch_max_records: usize,
    /// Fewest time between two commits of a partial batch (see `store.commit_interval_ms`).
    pub commit_interval: Duration,
    /// WAL pages (4 KiB) after which the WAL is checkpointed (see `store.checkpoint_mib`).
    pub checkpoint_pages: u32,
    /// Records that may wait for the writer (the backpressure bound).
    pub queue_capacity: usize,
    /// Records older than this are deleted.
    pub retention: Duration,
    /// How often retention runs (the first run is at open).
    pub retention_interval: Duration,
}

impl StoreOptions {
    pub fn from_config(config: &StoreConfig) -> StoreOptions {
        StoreOptions {
            batch_max_records: config.batch_max_records.max(1),
            commit_interval: Duration::from_millis(config.commit_interval_ms),
            checkpoint_pages: config.checkpoint_mib.max(1) * 256,
            queue_capacity: config.queue_capacity.max(1),
            retention: Duration::from_secs(u64::from(config.retention_days) * 86_400),
            retention_interval: Duration::from_secs(600),
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions::from_config(&StoreConfig::default())
    }
}

/// What the writer did, returned by [`Store::shutdown`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub written: u64,
    pub failed: u64,
    pub purged: u64,
    pub transactions: u64,
}

/// Requests to the drain task.
enum Control {
    /// Commit everything queued so far, then answer.
    Flush(oneshot::Sender<()>),
    /// Delete records older than the cutoff (ms), then answer with the count.
    Purge(i64, oneshot::Sender<u64>),
    /// Close the queue, write what is in it, and end.
    Stop,
}

/// Work for the writer thread, in order.
enum Job {
    Write(Vec<Record>),
    Flush(oneshot::Sender<()>),
    Purge(i64, Option<oneshot::Sender<u64>>),
}

/// The writer side of the store: attach [`Store::sender`] to [`super::Outcomes::with_sink`].
pub struct Store {
    path: PathBuf,
    sender: mpsc::Sender<Record>,
    control: mpsc::UnboundedSender<Control>,
    drain: tokio::task::JoinHandle<()>,
    done: oneshot::Receiver<WriterStats>,
}

impl Store {
    /// Opens (creating if needed) the store at `path` and starts its writer. Must be called
    /// inside a tokio runtime. The daemon passes its registered [`StoreMetrics`]; a command
    /// passes `None`.
    pub fn open(
        path: &Path,
        options: StoreOptions,
        metrics: Option<StoreMetrics>,
    ) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: path.to_owned(),
                source,
            })?;
        }
        let conn = open_writer(path, options.checkpoint_pages)?;
        let metrics = metrics.unwrap_or_else(|| StoreMetrics::new(None));
        let (sender, records) = mpsc::channel(options.queue_capacity);
        let (control, control_rx) = mpsc::unbounded_channel();
        let (jobs, jobs_rx) = mpsc::channel(2);
        let (done_tx, done) = oneshot::channel();
        let thread_path = path.to_owned();
        let thread_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("iotfwd-store".into())
            .spawn(move || {
                let stats = writer_thread(conn, &thread_path, jobs_rx, &thread_metrics);
                let _ = done_tx.send(stats);
            })
            .map_err(|source| StoreError::Thread {
                path: path.to_owned(),
                source,
            })?;
        let drain = tokio::spawn(drain_task(records, control_rx, jobs, options, metrics));
        Ok(Store {
            path: path.to_owned(),
            sender,
            control,
            drain,
            done,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sender for [`super::Outcomes::with_sink`].
    pub fn sender(&self) -> mpsc::Sender<Record> {
        self.sender.clone()
    }

    /// A reader of the same file.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Reader::open(&self.path)
    }

    /// Resolves once every record sent before the call is committed (visible to readers).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.control
            .send(Control::Flush(ack))
            .map_err(|_| StoreError::Stopped)?;
        done.await.map_err(|_| StoreError::Stopped)
    }

    /// Deletes every record older than `cutoff_ms` now (retention does this in the
    /// background); returns how many were deleted.
    pub async fn purge_older_than(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let (ack, done) = oneshot::channel();
        self.control
            .send(Control::Purge(cutoff_ms, ack))
            .map_err(|_| StoreError::Stopped)?;
        done.await.map_err(|_| StoreError::Stopped)
    }

    /// Stops taking records, writes every record already queued, and closes the file. Records
    /// sent after this are refused (their senders see a closed channel).
    pub async fn shutdown(self) -> WriterStats {
        let Store {
            sender,
            control,
            drain,
            done,
            ..
        } = self;
        drop(sender);
        let _ = control.send(Control::Stop);
        let _ = drain.await;
        done.await.unwrap_or_default()
    }
}

async fn drain_task(
    mut records: mpsc::Receiver<Record>,
    mut control: mpsc::UnboundedReceiver<Control>,
    jobs: mpsc::Sender<Job>,
    options: StoreOptions,
    metrics: StoreMetrics,
) {
    use tokio::time::Instant;
    let batch_max = options.batch_max_records;
    let interval = options.commit_interval;
    let retention_ms = i64::try_from(options.retention.as_millis()).unwrap_or(i64::MAX);
    let mut retention = tokio::time::interval(options.retention_interval);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut control_open = true;
    let mut records_open = true;
    let mut buf: Vec<Record> = Vec::with_capacity(batch_max);
    // When the last batch went to the writer: a partial batch waits until `interval` after it.
    let mut last_sent = Instant::now()
        .checked_sub(interval)
        .unwrap_or_else(Instant::now);
    loop {
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
/// them.
fn writer_thread(
    mut conn: Connection,
    path: &Path,
    mut jobs: mpsc::Receiver<Job>,
    metrics: &StoreMetrics,
) -> WriterStats {
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
                    }
                    Err(e) => {
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

fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

fn open_writer(path: &Path, checkpoint_pages: u32) -> Result<Connection, StoreError> {
    let err = sqlite_err(path);
    let conn = Connection::open(path).map_err(&err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(&err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(store = %path.display(), "record store: journal mode is {mode}, not WAL");
    }
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         PRAGMA busy_timeout = 10000;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -131072;
         PRAGMA mmap_size = 2147418112;",
    )
    .map_err(&err)?;
    conn.execute_batch(&format!("PRAGMA wal_autocheckpoint = {checkpoint_pages};"))
        .map_err(&err)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Schema {
            path: path.to_owned(),
            found: version,
        });
    }
    conn.execute_batch(SCHEMA).map_err(&err)?;
    conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
        .map_err(&err)?;
    Ok(conn)
}

/// The daemon's record sinks per `[store]`: the store and the JSON lines, each optional.
pub struct RecordSinks {
    store: Option<Store>,
    reader: Option<Reader>,
    jsonl: Option<super::jsonl::JsonlSink>,
}

impl RecordSinks {
    /// Opens what `[store]` asks for; errors name the file and the config key.
    pub async fn open(
        config: &crate::config::Config,
        metrics: &crate::telemetry::Metrics,
    ) -> anyhow::Result<RecordSinks> {
        let store_config = &config.store;
        let (store, reader) = if store_config.enabled {
            let path = store_config.resolved_path(&config.data.dir);
            let store = Store::open(
                &path,
                StoreOptions::from_config(store_config),
                Some(metrics.store.clone()),
            )?;
            let reader = store.reader()?;
            tracing::info!(
                store = %path.display(),
                retention_days = store_config.retention_days,
                "record store open: query with `iotfwd logs` or GET /api/v1/logs"
            );
            (Some(store), Some(reader))
        } else {
            tracing::info!("record store disabled (store.enabled = false)");
            (None, None)
        };
        let jsonl = super::jsonl::JsonlSink::open(
            &store_config.jsonl,
            store_config.queue_capacity,
            store_config.batch_max_records,
        )
        .await?;
        if jsonl.is_some() {
            tracing::info!(jsonl = %store_config.jsonl, "outcome records also as JSON lines");
        }
        Ok(RecordSinks {
            store,
            reader,
            jsonl,
        })
    }

    /// `outcomes` with every open sink attached.
    pub fn attach(&self, mut outcomes: super::Outcomes) -> super::Outcomes {
        if let Some(store) = &self.store {
            outcomes = outcomes.with_sink(store.sender());
        }
        if let Some(jsonl) = &self.jsonl {
            outcomes = outcomes.with_sink(jsonl.sender());
        }
        outcomes
    }

    /// A reader of the store, when it is enabled.
    pub fn reader(&self) -> Option<Reader> {
        self.reader.clone()
    }

    /// Writes everything queued and closes the sinks. Call after the engine drained.
    pub async fn shutdown(self) {
        if let Some(store) = self.store {
            let path = store.path().to_owned();
            let stats = store.shutdown().await;
            tracing::info!(
                store = %path.display(),
                written = stats.written,
                failed = stats.failed,
                "record store closed"
            );
        }
        if let Some(jsonl) = self.jsonl {
            jsonl.shutdown().await;
        }
    }
}

/// One page of a query: newest first, and where the next one starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub records: Vec<Record>,
    /// Pass it back (`--cursor`, `cursor=`) for the next page; `None` on the last page.
    pub next_cursor: Option<Cursor>,
}

/// Everything recorded about one message, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub records: Vec<Record>,
    /// More than [`TRACE_MAX_RECORDS`] records matched; the newest are left out.
    pub truncated: bool,
}

/// The read side: any number of readers, in any process, query while the daemon writes. Cheap to
/// clone; keeps a few connections open for reuse. Queries block: call them from
/// `spawn_blocking` in async code.
#[derive(Clone)]
pub struct Reader {
    path: PathBuf,
    pool: Arc<Mutex<Vec<Connection>>>,
    split_at: usize,
    /// Storage-order scans over fewer ids than this run in one thread.
    parallel_from: i64,
}

impl Reader {
    /// Opens an existing store; a missing file is [`StoreError::Missing`] (a reader never
    /// creates one).
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing(path.to_owned()));
        }
        let reader = Reader {
            path: path.to_owned(),
            pool: Arc::new(Mutex::new(Vec::new())),
            split_at: SPLIT_AT,
            parallel_from: 200_000,
        };
        let conn = reader.connect()?;
        reader.release(conn);
        Ok(reader)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The same reader, splitting queries at `records` instead of [`SPLIT_AT`], and reading the
    /// storage-order part in parallel whatever its size: lets tests run every path of a split
    /// query on a small store. Results do not depend on it.
    pub fn with_split_at(mut self, records: usize) -> Reader {
        self.split_at = records;
        self.parallel_from = 0;
        self
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.pool.lock().expect("reader pool").pop() {
            return Ok(conn);
        }
        let err = sqlite_err(&self.path);
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        // Read-write (without create) so WAL readers can set up the shared-memory index; a
        // user without write access to the files still reads, read-only.
        let conn = Connection::open_with_flags(&self.path, flags)
            .or_else(|_| {
                Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
            })
            .map_err(&err)?;
        register_functions(&conn).map_err(&err)?;
        conn.execute_batch(
            "PRAGMA query_only = 1;
             PRAGMA busy_timeout = 10000;
             PRAGMA cache_size = -65536;
             PRAGMA mmap_size = 2147418112;",
        )
        .map_err(&err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(&err)?;
        if version != SCHEMA_VERSION {
            let has_table: Option<i64> = conn
                .query_row(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&err)?;
            if version > SCHEMA_VERSION || has_table.is_none() {
                return Err(StoreError::Schema {
                    path: self.path.clone(),
                    found: version,
                });
            }
        }
        Ok(conn)
    }

    fn release(&self, conn: Connection) {
        let mut pool = self.pool.lock().expect("reader pool");
        if pool.len() < 4 {
            pool.push(conn);
        }
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.connect()?;
        let result = f(&conn);
        // A connection left inside a transaction by an error is not reused.
        if conn.is_autocommit() {
            self.release(conn);
        }
        result
    }

    /// Runs a query: one page, newest first.
    pub fn query(&self, query: &LogQuery) -> Result<Page, StoreError> {
        self.with_conn(|conn| {
            let err = sqlite_err(&self.path);
            // One read transaction: the high-water id and the page come from one snapshot.
            conn.execute_batch("BEGIN").map_err(&err)?;
            let result = (|| {
                let high_water = match &query.cursor {
                    Some(c) => c.high_water,
                    None => conn
                        .query_row("SELECT max(id) FROM records", [], |r| {
                            r.get::<_, Option<i64>>(0)
                        })
                        .map_err(&err)?
                        .unwrap_or(0),
                };
                let fetch = |(sql, values): (String, Vec<rusqlite::types::Value>)| {
                    let mut stmt = conn.prepare_cached(&sql).map_err(&err)?;
                    let rows = stmt
                        .query_map(rusqlite::params_from_iter(values), row_to_stored)
                        .map_err(&err)?;
                    rows.collect::<Result<Vec<_>, _>>().map_err(&err)
                };
                let want = query.limit + 1;
                let mut stored = match split_at(conn, query, self.split_at).map_err(&err)? {
                    // Newest part through the time index; the rest only if the page is not full
                    // yet. Every row of the first part is newer than every row of the rest.
                    Some(split) => {
                        let mut rows = fetch(query.to_sql_in(
                            Order::Index,
                            Some(split.boundary),
                            None,
                            None,
                            want,
                        ))?;
                        if rows.len() < want {
                            let rest = want - rows.len();
                            if split.rest == Order::Scan {
                                rows.extend(self.scan_in_parts(
                                    query,
                                    split.boundary,
                                    (split.min_id - 1, high_water),
                                    rest,
                                )?);
                            } else {
                                rows.extend(fetch(query.to_sql_in(
                                    split.rest,
                                    None,
                                    Some(split.boundary),
                                    None,
                                    rest,
                                ))?);
                            }
                        }
                        rows
                    }
                    None => fetch(query.to_sql())?,
                };
                let more = stored.len() > query.limit;
                stored.truncate(query.limit);
                let next_cursor = match (more, stored.last()) {
                    (true, Some(last)) => Some(Cursor {
                        time_ms: last.time_ms,
                        id: last.id,
                        high_water,
                    }),
                    _ => None,
                };
                let records = stored
                    .into_iter()
                    .map(|s| s.into_record(&self.path))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Page {
                    records,
                    next_cursor,
                })
            })();
            let _ = conn.execute_batch("COMMIT");
            result
        })
    }

    /// The storage-order part of a split query: records older than `boundary` with ids in
    /// `ids`, the newest `rows` of them. Ranges of ids are read in parallel, one thread and
    /// connection per core (up to 4): a sequential scan is CPU-bound in SQLite, so this divides
    /// the worst case (a keyword that matches nothing) by the number of cores. Each part is
    /// bounded by the page's high-water id, so it sees the same records as the page.
    fn scan_in_parts(
        &self,
        query: &LogQuery,
        boundary: i64,
        ids: (i64, i64),
        rows: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        let (lo, hi) = ids;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let parts = if hi - lo < self.parallel_from {
            1
        } else {
            cores.clamp(2, 4) as i64
        };
        let step = (hi - lo) / parts + 1;
        let run = |a: i64, b: i64| {
            self.with_conn(|conn| {
                let err = sqlite_err(&self.path);
                let (sql, values) =
                    query.to_sql_in(Order::Scan, None, Some(boundary), Some((a, b)), rows);
                let mut stmt = conn.prepare_cached(&sql).map_err(&err)?;
                let found = stmt
                    .query_map(rusqlite::params_from_iter(values), row_to_stored)
                    .map_err(&err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(&err)?;
                Ok(found)
            })
        };
        let results: Vec<Result<Vec<Stored>, StoreError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..parts)
                .map(|k| {
                    let a = lo + k * step;
                    let b = (lo + (k + 1) * step).min(hi);
                    scope.spawn(move || run(a, b))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a scan thread panicked"))
                .collect()
        });
        let mut merged = Vec::new();
        for r in results {
            merged.extend(r?);
        }
        merged.sort_by_key(|s| std::cmp::Reverse((s.time_ms, s.id)));
        merged.truncate(rows);
        Ok(merged)
    }

    /// Everything recorded about one message, oldest first: the records whose messageId or
    /// traceId is `id`, and every record sharing a traceId with those.
    pub fn trace(&self, id: &str) -> Result<Trace, StoreError> {
        self.with_conn(|conn| {
            let err = sqlite_err(&self.path);
            let cap = TRACE_MAX_RECORDS as i64 + 1;
            let mut stored: Vec<Stored> = {
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM records WHERE message_id = ?1 OR trace_id = ?1 \
                         ORDER BY time_ms, id LIMIT ?2"
                    ))
                    .map_err(&err)?;
                stmt.query_map(params![id, cap], row_to_stored)
                    .map_err(&err)?
                    .collect::<Result<_, _>>()
                    .map_err(&err)?
            };
            let mut traces: Vec<String> = stored
                .iter()
                .map(|s| s.trace_id.clone())
                .filter(|t| t != id)
                .collect();
            traces.sort();
            traces.dedup();
            for trace_id in traces.iter().take(100) {
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM records WHERE trace_id = ?1 \
                         ORDER BY time_ms, id LIMIT ?2"
                    ))
                    .map_err(&err)?;
                let more: Vec<Stored> = stmt
                    .query_map(params![trace_id, cap], row_to_stored)
                    .map_err(&err)?
                    .collect::<Result<_, _>>()
                    .map_err(&err)?;
                stored.extend(more);
            }
            stored.sort_by_key(|s| (s.time_ms, s.id));
            stored.dedup_by_key(|s| s.id);
            let truncated = stored.len() > TRACE_MAX_RECORDS;
            stored.truncate(TRACE_MAX_RECORDS);
            let records = stored
                .into_iter()
                .map(|s| s.into_record(&self.path))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Trace { records, truncated })
        })
    }

    /// How many records the store holds.
    pub fn count(&self) -> Result<u64, StoreError> {
        self.with_conn(|conn| {
            conn.query_row("SELECT count(*) FROM records", [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(sqlite_err(&self.path))
        })
    }

    /// SQLite's plan for a query (`EXPLAIN QUERY PLAN`), one step per line; for a split query
    /// ([`LogQuery::scans`]) the plan of its storage-order part. For tests and diagnosis.
    pub fn explain(&self, query: &LogQuery) -> Result<String, StoreError> {
        self.with_conn(|conn| {
            let err = sqlite_err(&self.path);
            let (sql, values) = if query.scans() {
                query.to_sql_in(Order::Scan, None, Some(0), None, query.limit + 1)
            } else {
                query.to_sql()
            };
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .map_err(&err)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(values), |r| {
                    r.get::<_, String>(3)
                })
                .map_err(&err)?;
            let mut plan = Vec::new();
            for row in rows {
                plan.push(row.map_err(&err)?);
            }
            Ok(plan.join("\n"))
        })
    }
}

/// How a split query ([`LogQuery::scans`]) runs: the newest part (time at or after `boundary`,
/// the [`SPLIT_AT`]th newest record in range) through the time index; the rest in `rest` order.
struct Split {
    boundary: i64,
    rest: Order,
    /// The smallest id in the store.
    min_id: i64,
}

/// `None` (not split: one index-ordered statement) when the query does not scan or its range
/// holds fewer than [`SPLIT_AT`] records. The rest is read in storage order, unless the time range
/// leaves less than a quarter of the table before the boundary: walking the index over a narrow
/// range beats reading everything. Record counts are estimated from ids, which follow time closely.
fn split_at(
    conn: &Connection,
    query: &LogQuery,
    records: usize,
) -> rusqlite::Result<Option<Split>> {
    if !query.scans() {
        return Ok(None);
    }
    let (sql, values) = query.boundary_sql(records);
    let Some((boundary, boundary_id)) = conn
        .prepare_cached(&sql)?
        .query_row(rusqlite::params_from_iter(values), |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?
    else {
        return Ok(None);
    };
    // Two statements: SQLite answers a lone min() or max() of the rowid from the B-tree's edge,
    // but both in one statement would scan the table.
    let edge = |sql: &str| -> rusqlite::Result<i64> {
        conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
            .map(|v| v.unwrap_or(0))
    };
    let min_id = edge("SELECT min(id) FROM records")?;
    let max_id = edge("SELECT max(id) FROM records")?;
    let from_id = match query.from_ms {
        Some(from) => conn
            .prepare_cached(LogQuery::first_id_from_sql())?
            .query_row([from], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(boundary_id),
        None => min_id,
    };
    let in_range = boundary_id.saturating_sub(from_id).max(0);
    let rest = if in_range.saturating_mul(4) < max_id - min_id + 1 {
        Order::Index
    } else {
        Order::Scan
    };
    Ok(Some(Split {
        boundary,
        rest,
        min_id,
    }))
}

/// Registers `iotfwd_contains(needle, haystack...)`: true when any haystack contains the needle
/// as a literal byte substring (UTF-8 text in, so the same as a character substring). NULL and
/// non-text haystacks never match. The needle's searcher is built once per statement.
pub fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    use rusqlite::types::ValueRef;
    conn.create_scalar_function(
        "iotfwd_contains",
        -1,
        FunctionFlags::SQLITE_UTF8
            | FunctionFlags::SQLITE_DETERMINISTIC
            | FunctionFlags::SQLITE_INNOCUOUS,
        |ctx| {
            if ctx.len() < 2 {
                return Err(rusqlite::Error::UserFunctionError(
                    "iotfwd_contains(needle, haystack, ...) needs a needle and a haystack".into(),
                ));
            }
            let finder = ctx.get_or_create_aux(0, |needle| match needle {
                ValueRef::Text(t) | ValueRef::Blob(t) => {
                    Ok::<_, rusqlite::Error>(memchr::memmem::Finder::new(t).into_owned())
                }
                _ => Err(rusqlite::Error::UserFunctionError(
                    "iotfwd_contains: the needle must be text".into(),
                )),
            })?;
            for i in 1..ctx.len() {
                if let ValueRef::Text(haystack) = ctx.get_raw(i)
                    && finder.find(haystack).is_some()
                {
                    return Ok(true);
                }
            }
            Ok(false)
        },
    )
}

/// A row as stored, before its codes are checked.
struct Stored {
    id: i64,
    time_ms: i64,
    trace_id: String,
    message_id: String,
    product_key: String,
    device_name: String,
    biz_code: String,
    operation: String,
    code: i64,
    reason: String,
    content: String,
    tenant_id: String,
    instance_id: String,
}

fn row_to_stored(r: &rusqlite::Row<'_>) -> rusqlite::Result<Stored> {
    Ok(Stored {
        id: r.get(0)?,
        time_ms: r.get(1)?,
        trace_id: r.get(2)?,
        message_id: r.get(3)?,
        product_key: r.get(4)?,
        device_name: r.get(5)?,
        biz_code: r.get(6)?,
        operation: r.get(7)?,
        code: r.get(8)?,
        reason: r.get(9)?,
        content: r.get(10)?,
        tenant_id: r.get(11)?,
        instance_id: r.get(12)?,
    })
}

impl Stored {
    fn into_record(self, path: &Path) -> Result<Record, StoreError> {
        let unreadable = |what: String| StoreError::Unreadable {
            path: path.to_owned(),
            id: self.id,
            what,
        };
        let biz_code = BizCode::parse(&self.biz_code)
            .ok_or_else(|| unreadable(format!("service type {:?}", self.biz_code)))?;
        let code = u16::try_from(self.code)
            .ok()
            .and_then(Code::from_u16)
            .ok_or_else(|| unreadable(format!("code {}", self.code)))?;
        Ok(Record {
            time_ms: self.time_ms,
            trace_id: self.trace_id,
            message_id: self.message_id,
            product_key: self.product_key,
            device_name: self.device_name,
            biz_code,
            operation: self.operation,
            code,
            reason: self.reason,
            content: self.content,
            tenant_id: self.tenant_id,
            instance_id: self.instance_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::query::{LogParams, Status};

    fn record(i: usize, time_ms: i64, code: Code) -> Record {
        Record {
            time_ms,
            trace_id: format!("t{i}"),
            message_id: format!("m{i}"),
            product_key: format!("p{}", i % 2),
            device_name: format!("d{}", i % 3),
            biz_code: if code.is_success() {
                BizCode::Uplink
            } else {
                BizCode::RuleEngine
            },
            operation: format!("/p{}/d{}/post", i % 2, i % 3),
            code,
            reason: String::new(),
            content: format!("{{\"i\":{i}}}"),
            tenant_id: String::new(),
            instance_id: String::new(),
        }
    }

    /// Record times are `base() + i`: recent, so the retention at open keeps them.
    fn base() -> i64 {
        static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
        *BASE.get_or_init(|| crate::message::now_ms() - 1_000_000)
    }

    async fn filled(dir: &Path, n: usize) -> (Store, Reader) {
        let store = Store::open(&dir.join("o.db"), StoreOptions::default(), None).unwrap();
        let tx = store.sender();
        for i in 0..n {
            let code = if i % 4 == 0 {
                Code::DestinationUnavailable
            } else {
                Code::Ok
            };
            tx.send(record(i, base() + i as i64, code)).await.unwrap();
        }
        store.flush().await.unwrap();
        let reader = store.reader().unwrap();
        (store, reader)
    }

    /// `store.checkpoint_mib` reaches the writer's connection as pages of 4 KiB.
    #[test]
    fn the_checkpoint_size_is_applied_to_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions::from_config(&StoreConfig {
            checkpoint_mib: 3,
            ..StoreConfig::default()
        });
        let conn = open_writer(&dir.path().join("o.db"), options.checkpoint_pages).unwrap();
        let pages: i64 = conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!((pages, page_size), (768, 4096));
    }

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

    #[tokio::test]
    async fn writes_queries_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (store, reader) = filled(dir.path(), 25).await;
        assert_eq!(reader.count().unwrap(), 25);
        let q = LogQuery {
            limit: 10,
            ..LogQuery::default()
        };
        let page = reader.query(&q).unwrap();
        let times: Vec<i64> = page.records.iter().map(|r| r.time_ms).collect();
        let expected: Vec<i64> = (15..25).rev().map(|i| base() + i).collect();
        assert_eq!(times, expected);
        let mut all = page.records.clone();
        let mut cursor = page.next_cursor;
        while let Some(c) = cursor {
            let p = reader
                .query(&LogQuery {
                    cursor: Some(c),
                    ..q.clone()
                })
                .unwrap();
            all.extend(p.records);
            cursor = p.next_cursor;
        }
        assert_eq!(all.len(), 25);
        let failed = reader
            .query(&LogQuery {
                status: Some(Status::Failed),
                device: Some("d0".into()),
                ..LogQuery::default()
            })
            .unwrap();
        // i % 4 == 0 and i % 3 == 0: 0, 12, 24.
        let ids: Vec<&str> = failed
            .records
            .iter()
            .map(|r| r.message_id.as_str())
            .collect();
        assert_eq!(ids, ["m24", "m12", "m0"]);
        let stats = store.shutdown().await;
        assert_eq!(stats.written, 25);
        assert_eq!(stats.failed, 0);
    }

    #[tokio::test]
    async fn indexes_serve_the_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let (store, reader) = filled(dir.path(), 10).await;
        // (filters, index, ordered by the index itself rather than sorted afterwards)
        for (params, index, ordered) in [
            (vec![("messageId", "m1")], "records_message_id", false),
            (vec![("traceId", "t1")], "records_trace_id", false),
            (
                vec![("device", "d1"), ("since", "1h")],
                "records_device_time",
                true,
            ),
            (vec![("product", "p1")], "records_product_time", true),
            (vec![], "records_time", true),
            (vec![("since", "1h")], "records_time", true),
        ] {
            let q = LogParams::from_pairs(params.iter().map(|(k, v)| (*k, v.to_string())))
                .unwrap()
                .validate(crate::message::now_ms())
                .unwrap();
            let plan = reader.explain(&q).unwrap();
            assert!(plan.contains(index), "{params:?}: {plan}");
            if ordered {
                assert!(!plan.contains("TEMP B-TREE"), "{params:?} sorts: {plan}");
            }
        }
        // Row-by-row filters alone: one sequential pass over the table, newest rows kept.
        for params in [
            vec![("keyword", "x")],
            vec![("status", "failed")],
            vec![("serviceType", "uplink"), ("keyword", "x")],
        ] {
            let q = LogParams::from_pairs(params.iter().map(|(k, v)| (*k, v.to_string())))
                .unwrap()
                .validate(crate::message::now_ms())
                .unwrap();
            let plan = reader.explain(&q).unwrap();
            assert!(plan.starts_with("SCAN records\n"), "{params:?}: {plan}");
        }
        store.shutdown().await;
    }

    #[test]
    fn contains_is_a_literal_substring_test() {
        let conn = Connection::open_in_memory().unwrap();
        register_functions(&conn).unwrap();
        let contains = |needle: &str, hay: &[Option<&str>]| -> bool {
            let sql = format!(
                "SELECT iotfwd_contains(?1{})",
                (0..hay.len())
                    .map(|i| format!(", ?{}", i + 2))
                    .collect::<String>()
            );
            let mut values: Vec<rusqlite::types::Value> = vec![needle.to_owned().into()];
            values.extend(hay.iter().map(|h| match h {
                Some(s) => rusqlite::types::Value::Text((*s).to_owned()),
                None => rusqlite::types::Value::Null,
            }));
            conn.query_row(&sql, rusqlite::params_from_iter(values), |r| r.get(0))
                .unwrap()
        };
        assert!(contains("b", &[Some("abc")]));
        assert!(contains("x%y", &[None, Some("ax%yb")]));
        assert!(!contains("x%y", &[Some("xzy"), None]));
        assert!(!contains("_", &[Some("abc")]));
        assert!(contains("\n\t", &[Some(""), Some("a\n\tb")]));
        assert!(!contains("ABC", &[Some("abc")]), "case-sensitive");
        assert!(contains("é", &[Some("café")]));
        assert!(contains("", &[Some("abc")]));
        assert!(!contains("a", &[None]));
    }

    #[tokio::test]
    async fn purge_deletes_only_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let (store, reader) = filled(dir.path(), 12_000).await;
        let deleted = store.purge_older_than(base() + 11_000).await.unwrap();
        assert_eq!(deleted, 11_000);
        assert_eq!(reader.count().unwrap(), 1000);
        store.shutdown().await;
    }

    #[tokio::test]
    async fn reader_refuses_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Reader::open(&dir.path().join("nope.db")).err().unwrap();
        assert!(e.to_string().starts_with("no record store at "), "{e}");
    }
}
