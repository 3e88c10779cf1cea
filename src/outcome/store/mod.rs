//! The embedded record store: every outcome record in one SQLite file (WAL mode), queryable
//! with [`LogQuery`](super::query::LogQuery) by `iotfwd logs` and `GET /api/v1/logs`.
//!
//! Why SQLite: it is one file beside the daemon that survives restarts, has the B-tree indexes
//! the console's queries need (messageId, traceId, time; (deviceName, time) and (productKey,
//! time) as lookup tables filled in sorted runs, [`INDEX_RUN`]), lets any number of readers (the CLI, the HTTP API) query while the writer writes (WAL),
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
//! Each batch the writer commits (or gives up on) advances the store's
//! [`CommitLog`]: with `store.durability = "acked"` the sources wait
//! on it before they acknowledge a message, so an acknowledged message's records are committed.
//!
//! Disk writes are shaped for a store that shares its disk with a broker. A partial batch
//! commits at most once per `store.commit_interval_ms`, so each index page is rewritten once per
//! commit, not once per handful of records; while a source waits for a commit, at most once per
//! the shorter `store.ack_commit_interval_ms`, so an acknowledgement waits little. The WAL is checkpointed every `store.checkpoint_mib`
//! (16 MiB): each checkpoint ends with an fsync of what it copied, and RabbitMQ's own fsyncs
//! (publisher confirms) wait behind it, so larger checkpoints mean fewer page copies but
//! longer stalls for the broker next door.
//!
//! One job per file: `schema` (the table, its version, opening connections), `writer` (the drain
//! task and the writer thread: batching, commit shaping, retention), `reader` (pages and traces),
//! `rows` (a row back to a record), `functions` (`iotfwd_contains`), `sinks` (the daemon's set of
//! record sinks), `postgres` (the same store on PostgreSQL, `[store] backend = "postgres"`) and
//! `pg_tls` (its TLS, `[store.tls]`). This file is the API: [`Store`], its options and its
//! errors.

mod functions;
mod pg_tls;
mod postgres;
mod reader;
mod rows;
mod schema;
mod sinks;
#[cfg(test)]
pub(crate) mod testing;
mod writer;

pub use functions::register_functions;
pub use postgres::{BackendState, PgReader, PgTarget};
pub use reader::{Cancel, Page, Reader, SPLIT_AT, SqliteReader, TRACE_MAX_RECORDS, Trace};
pub(crate) use schema::configure_sqlite;
pub use sinks::RecordSinks;
pub use writer::{INDEX_RUN, PURGE_CHUNK, WriterStats};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::commit::{CommitLog, RecordSender};
use crate::config::store::StoreConfig;
use crate::telemetry::StoreMetrics;
use schema::SCHEMA_VERSION;
use writer::{Control, drain_task, writer_thread};

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
    #[error("record store {}: the query was cancelled", .0.display())]
    Cancelled(PathBuf),
    /// A PostgreSQL error, with its causes in the message (tokio-postgres shows only its kind,
    /// "error performing TLS handshake", and keeps why in its source).
    #[error("record store {url}: {}", postgres::explain(.error))]
    Postgres {
        url: String,
        error: tokio_postgres::Error,
    },
    #[error("record store: {0}")]
    Config(String),
}

/// Tuning of the writer; [`StoreOptions::from_config`] gives the daemon's.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most records per transaction.
    pub batch_max_records: usize,
    /// Fewest time between two commits of a partial batch (see `store.commit_interval_ms`).
    pub commit_interval: Duration,
    /// The same while a source waits for a commit (see `store.ack_commit_interval_ms`).
    pub ack_commit_interval: Duration,
    /// MiB of WAL after which the WAL is checkpointed (see `store.checkpoint_mib`); the
    /// writer turns it into pages of the file's own page size.
    pub checkpoint_mib: u32,
    /// Records that may wait for the writer (the backpressure bound).
    pub queue_capacity: usize,
    /// Records older than this are deleted.
    pub retention: Duration,
    /// How often retention runs (the first run is at open).
    pub retention_interval: Duration,
    /// How far the device and product lookup tables may lag ([`INDEX_RUN`]; tests make it
    /// small so that a small store has both parts).
    pub index_run: i64,
}

impl StoreOptions {
    pub fn from_config(config: &StoreConfig) -> StoreOptions {
        StoreOptions {
            batch_max_records: config.batch_max_records.max(1),
            commit_interval: Duration::from_millis(config.commit_interval_ms),
            ack_commit_interval: Duration::from_millis(
                config.ack_commit_interval_ms.min(config.commit_interval_ms),
            ),
            checkpoint_mib: config.checkpoint_mib.max(1),
            queue_capacity: config.queue_capacity.max(1),
            retention: Duration::from_secs(u64::from(config.retention_days) * 86_400),
            retention_interval: Duration::from_secs(600),
            index_run: INDEX_RUN,
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions::from_config(&StoreConfig::default())
    }
}

/// The writer side of the store: attach [`Store::sender`] to [`super::Outcomes::with_sink`].
pub struct Store {
    path: PathBuf,
    /// Set for a PostgreSQL store.
    pub(super) postgres: Option<PgTarget>,
    state: Arc<BackendState>,
    sender: RecordSender,
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
        let conn = schema::open_writer(path, options.checkpoint_mib)?;
        let metrics = metrics.unwrap_or_else(|| StoreMetrics::new(None));
        let (sender, records) = mpsc::channel(options.queue_capacity);
        let log = Arc::new(CommitLog::default());
        let sender = RecordSender::new(sender, Arc::clone(&log));
        let (control, control_rx) = mpsc::unbounded_channel();
        let (jobs, jobs_rx) = mpsc::channel(2);
        let (done_tx, done) = oneshot::channel();
        let (spent, spent_rx) = mpsc::unbounded_channel();
        let thread_path = path.to_owned();
        let thread_metrics = metrics.clone();
        let index_run = options.index_run.max(1);
        std::thread::Builder::new()
            .name("iotfwd-store".into())
            .spawn(move || {
                let stats = writer_thread(
                    conn,
                    &thread_path,
                    jobs_rx,
                    spent,
                    index_run,
                    &thread_metrics,
                    log,
                );
                let _ = done_tx.send(stats);
            })
            .map_err(|source| StoreError::Thread {
                path: path.to_owned(),
                source,
            })?;
        let drain = tokio::spawn(drain_task(
            records,
            control_rx,
            jobs,
            Some(spent_rx),
            options,
            metrics,
            Arc::clone(sender.log()),
        ));
        Ok(Store {
            path: path.to_owned(),
            postgres: None,
            state: Arc::new(BackendState::new("sqlite", path.display().to_string())),
            sender,
            control,
            drain,
            done,
        })
    }

    /// Opens (creating the table and partitions if needed) the PostgreSQL store at `target` and
    /// starts its writer on the current runtime. A server that does not answer is not an
    /// error: the writer holds records (up to `queue_capacity`) until it does, and
    /// [`Store::state`] says so.
    pub async fn open_postgres(
        target: PgTarget,
        options: StoreOptions,
        metrics: Option<StoreMetrics>,
    ) -> Result<Store, StoreError> {
        let metrics = metrics.unwrap_or_else(|| StoreMetrics::new(None));
        let state = Arc::new(BackendState::new("postgres", target.url.clone()));
        let client = postgres::open_writer(&target, &state, &metrics).await;
        let (sender, records) = mpsc::channel(options.queue_capacity);
        let log = Arc::new(CommitLog::default());
        let sender = RecordSender::new(sender, Arc::clone(&log));
        let (control, control_rx) = mpsc::unbounded_channel();
        let (jobs, jobs_rx) = mpsc::channel(2);
        let (done_tx, done) = oneshot::channel();
        let writer = postgres::pg_writer(
            target.clone(),
            client,
            jobs_rx,
            metrics.clone(),
            log,
            Arc::clone(&state),
            options.queue_capacity,
        );
        tokio::spawn(async move {
            let _ = done_tx.send(writer.await);
        });
        let drain = tokio::spawn(drain_task(
            records,
            control_rx,
            jobs,
            None,
            options,
            metrics,
            Arc::clone(sender.log()),
        ));
        Ok(Store {
            path: PathBuf::from(&target.url),
            postgres: Some(target),
            state,
            sender,
            control,
            drain,
            done,
        })
    }

    /// The file (for a PostgreSQL store, its URL as a path, for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which backend, where, and whether its database answered the writer's last call.
    pub fn state(&self) -> Arc<BackendState> {
        Arc::clone(&self.state)
    }

    /// A sender for [`super::Outcomes::with_sink`].
    pub fn sender(&self) -> RecordSender {
        self.sender.clone()
    }

    /// What the writer has committed, for [`super::Outcomes::acked_by`].
    pub fn commit_log(&self) -> Arc<CommitLog> {
        Arc::clone(self.sender.log())
    }

    /// A reader of the same store.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        match &self.postgres {
            Some(target) => PgReader::open(target.clone()).map(Reader::Postgres),
            None => Reader::open(&self.path),
        }
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

/// Maps a SQLite error to [`StoreError::Sqlite`] naming the file.
fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}
