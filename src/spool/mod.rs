//! The spool: messages iotfwd itself keeps on disk while they wait, when no broker keeps them
//! — the dead-letter queue ([`dead_letters`]) and consumer-group backlogs ([`backlog`]).
//!
//! One SQLite file, `<data.dir>/spool.db`, in WAL mode with `synchronous = FULL`: a message
//! is in the spool once its insert has committed, and a commit survives a crash of the
//! process and of the machine; iotfwd acknowledges its source only after that. Writes go
//! through one thread that commits every write waiting in one transaction, so a burst of
//! messages shares one fsync (group commit).
//!
//! With a `[broker]`, RabbitMQ queues hold both instead (`iotfwd.dead`,
//! `iotfwd.group.<id>`), so several iotfwd processes share them.

pub mod backlog;
pub mod dead_letters;

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::Connection;
use tokio::sync::oneshot;

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dead_letters (
    id            INTEGER PRIMARY KEY,
    time_ms       INTEGER NOT NULL,
    origin        TEXT NOT NULL,
    rule          TEXT NOT NULL,
    destination   TEXT NOT NULL,
    code          INTEGER NOT NULL,
    reason        TEXT NOT NULL,
    attempts      INTEGER NOT NULL,
    replays       INTEGER NOT NULL,
    topic         TEXT NOT NULL,
    product_key   TEXT NOT NULL,
    device_name   TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    trace_id      TEXT NOT NULL,
    tenant_id     TEXT NOT NULL,
    instance_id   TEXT NOT NULL,
    message_time  INTEGER NOT NULL,
    payload       BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_rule ON dead_letters (rule, id);
CREATE INDEX IF NOT EXISTS dead_letters_time ON dead_letters (time_ms);
CREATE TABLE IF NOT EXISTS group_backlog (
    id            INTEGER PRIMARY KEY,
    group_id      TEXT NOT NULL,
    time_ms       INTEGER NOT NULL,
    delivery      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS group_backlog_group ON group_backlog (group_id, id);
";

/// Why the spool could not do something. The messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "spool {path} has schema version {found}; this iotfwd reads version {SCHEMA_VERSION} (upgrade iotfwd)"
    )]
    Schema { path: PathBuf, found: i64 },
    #[error("cannot create the directory of the spool {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool {path}: {what}")]
    Corrupt { path: PathBuf, what: String },
}

/// One write: a statement and its parameters; `reply` gets the new row's id (inserts) once
/// the transaction holding it has committed.
struct Write {
    sql: &'static str,
    params: Vec<rusqlite::types::Value>,
    reply: Option<oneshot::Sender<Result<i64, String>>>,
}

/// Writes committed per transaction at most (group commit: every write waiting when a
/// transaction starts shares its fsync).
const WRITES_PER_COMMIT: usize = 4096;

/// The spool file, shared by its tables. Cheap to clone. Writes go through one writer thread
/// that commits whatever is waiting in one transaction (group commit), so a burst of inserts
/// shares one fsync; reads use a connection of their own (WAL lets them run beside writes).
#[derive(Clone)]
pub struct Spool {
    path: Arc<PathBuf>,
    writes: std_mpsc::SyncSender<Write>,
    reader: Arc<Mutex<Connection>>,
}

impl Spool {
    /// The spool of a daemon whose data directory is `data_dir`.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join("spool.db")
    }

    /// Opens (creating if needed) the spool at `path`, and starts its writer thread (which
    /// ends when the last clone of the spool is dropped).
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir {
                path: path.to_owned(),
                source,
            })?;
        }
        let err = |source| SpoolError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let open = || -> Result<Connection, SpoolError> {
            crate::outcome::store::configure_sqlite();
            let conn = Connection::open(path).map_err(err)?;
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
                .map_err(err)?;
            conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000;")
                .map_err(err)?;
            Ok(conn)
        };
        let writer = open()?;
        let version: i64 = writer
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if version > SCHEMA_VERSION {
            return Err(SpoolError::Schema {
                path: path.to_owned(),
                found: version,
            });
        }
        writer.execute_batch(SCHEMA).map_err(err)?;
        writer
            .execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
            .map_err(err)?;
        let reader = open()?;
        let (writes, queue) = std_mpsc::sync_channel(WRITES_PER_COMMIT);
        let thread_path = path.to_owned();
        std::thread::Builder::new()
            .name("iotfwd-spool".into())
            .spawn(move || write_loop(writer, &thread_path, queue))
            .map_err(|e| SpoolError::Corrupt {
                path: path.to_owned(),
                what: format!("cannot start the spool's writer thread: {e}"),
            })?;
        Ok(Spool {
            path: Arc::new(path.to_owned()),
            writes,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sqlite(&self, source: rusqlite::Error) -> SpoolError {
        SpoolError::Sqlite {
            path: self.path().to_owned(),
            source,
        }
    }

    /// Writes `sql` and waits until it is committed; the new row's id.
    async fn write(
        &self,
        sql: &'static str,
        params: Vec<rusqlite::types::Value>,
    ) -> Result<i64, SpoolError> {
        let (reply, done) = oneshot::channel();
        let write = Write {
            sql,
            params,
            reply: Some(reply),
        };
        let writes = self.writes.clone();
        // The queue is bounded: a full one waits (in the blocking pool, not on a runtime
        // worker).
        let sent = tokio::task::spawn_blocking(move || writes.send(write).is_ok())
            .await
            .unwrap_or(false);
        let stopped = || SpoolError::Corrupt {
            path: self.path().to_owned(),
            what: "the spool's writer has stopped".into(),
        };
        if !sent {
            return Err(stopped());
        }
        match done.await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(what)) => Err(SpoolError::Corrupt {
                path: self.path().to_owned(),
                what,
            }),
            Err(_) => Err(stopped()),
        }
    }

    /// Queues `sql` without waiting for it (a delete whose loss a crash may undo: the row is
    /// then seen again, never lost). When the queue is full it waits for room in tokio's
    /// blocking pool (or on this thread outside a runtime) rather than dropping the write.
    fn write_later(&self, sql: &'static str, params: Vec<rusqlite::types::Value>) {
        let write = Write {
            sql,
            params,
            reply: None,
        };
        if let Err(std_mpsc::TrySendError::Full(write)) = self.writes.try_send(write) {
            let writes = self.writes.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || writes.send(write))),
                Err(_) => drop(writes.send(write)),
            }
        }
    }

    /// Runs `f` on the read connection in tokio's blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Spool, &Connection) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let spool = self.clone();
        match tokio::task::spawn_blocking(move || {
            let conn = spool.reader.lock().unwrap_or_else(PoisonError::into_inner);
            f(&spool, &conn)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => Err(SpoolError::Corrupt {
                path: self.path().to_owned(),
                what: format!("a spool read failed: {e}"),
            }),
        }
    }
}

/// The writer thread: takes every write waiting (up to [`WRITES_PER_COMMIT`]), runs them in
/// one transaction, commits, then answers each.
fn write_loop(conn: Connection, path: &Path, queue: std_mpsc::Receiver<Write>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < WRITES_PER_COMMIT {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let mut results: Vec<Result<i64, String>> = Vec::with_capacity(batch.len());
        let committed = (|| -> rusqlite::Result<()> {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            for w in &batch {
                let r = conn
                    .execute(w.sql, rusqlite::params_from_iter(w.params.iter()))
                    .map(|_| conn.last_insert_rowid())
                    .map_err(|e| e.to_string());
                results.push(r);
            }
            conn.execute_batch("COMMIT")
        })();
        if let Err(e) = committed {
            let _ = conn.execute_batch("ROLLBACK");
            tracing::error!(spool = %path.display(), writes = batch.len(), "spool commit failed: {e}");
            results = batch
                .iter()
                .map(|_| Err(format!("commit failed: {e}")))
                .collect();
            results.truncate(batch.len());
        }
        for (w, r) in batch.into_iter().zip(results) {
            if let Some(reply) = w.reply {
                let _ = reply.send(r);
            }
        }
    }
}
