//! The record store on PostgreSQL (`[store] backend = "postgres"`): one database shared by every
//! process of a cluster, so `iotfwd logs`, the API and `logs trace` see the steps every process
//! handled (see docs/cluster.md).
//!
//! The same record schema as the SQLite file ([`super::schema`]), in a table partitioned by day
//! on `time_ms`: retention drops whole partitions (a day's records go in one `DROP TABLE`, no
//! row-by-row delete), and partitions for today and the next two days are created ahead, at open
//! and at every retention run. A default partition takes records outside them (a clock far off),
//! so an insert never fails for want of a partition. Indexes are the console's: messageId,
//! traceId, (deviceName, time), (productKey, time), time.
//!
//! The write path is the SQLite one up to the writer: `Outcomes::record` → bounded channel →
//! drain task (batching, commit shaping) → [`pg_writer`], which inserts each batch with one
//! multi-row `INSERT .. SELECT FROM unnest(..)` and advances the same [`CommitLog`]. What differs
//! is an outage: the writer keeps taking batches from the drain task while PostgreSQL is
//! unreachable, so the record channel never fills and forwarding goes on; it holds up to
//! `store.queue_capacity` records and writes them, in order, when the server is back. Past that
//! bound the oldest held batch is dropped, counted in `iotfwd_store_records_dropped_total` and
//! logged at ERROR (the records are still in the diagnostic log). `iotfwd_store_backend_up` and
//! `GET /api/v1/health` show whether the server answers.
//!
//! With `[store.tls]` every connection, the writer's and the readers', is TLS (`sslmode=require`,
//! never a plain fallback) through [`MakeRustls`] (`pg_tls.rs`); without it none is.
//!
//! Readers ([`PgReader`]) are synchronous like the SQLite ones (the CLI calls them directly, the
//! API from `spawn_blocking`): their queries run on a small runtime of their own, so they work
//! from any thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use super::pg_tls::MakeRustls;

use super::reader::{Page, Running, TRACE_MAX_RECORDS, Trace, cancelled};
use super::rows::{Stored, pg_row_to_stored};
use super::writer::{Job, WriterStats};
use super::{Cancel, StoreError};
use crate::config::store::StoreConfig;
use crate::config::tls::ClientTls;
use crate::outcome::Record;
use crate::outcome::commit::{CommitLog, StopOnDrop};
use crate::outcome::query::{COLUMNS, CountRow, Dialect, LogQuery, StatsQuery, count_row};
use crate::telemetry::StoreMetrics;

const DAY_MS: i64 = 86_400_000;

/// Serialises schema and partition changes of every process sharing the database.
const SCHEMA_LOCK: i64 = 0x696f_7466_7764; // "iotfwd"

const SCHEMA: &str = "
CREATE SEQUENCE IF NOT EXISTS records_id_seq;
CREATE TABLE IF NOT EXISTS records (
    id          BIGINT NOT NULL DEFAULT nextval('records_id_seq'),
    time_ms     BIGINT NOT NULL,
    trace_id    TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    biz_code    TEXT NOT NULL,
    operation   TEXT NOT NULL,
    code        BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    content     TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    instance_id TEXT NOT NULL
) PARTITION BY RANGE (time_ms);
CREATE TABLE IF NOT EXISTS records_default PARTITION OF records DEFAULT;
CREATE INDEX IF NOT EXISTS records_message_id ON records (message_id);
CREATE INDEX IF NOT EXISTS records_trace_id ON records (trace_id);
CREATE INDEX IF NOT EXISTS records_device_time ON records (device_name, time_ms, id);
CREATE INDEX IF NOT EXISTS records_product_time ON records (product_key, time_ms, id);
CREATE INDEX IF NOT EXISTS records_time ON records (time_ms, id);
";

const INSERT: &str = "INSERT INTO records (time_ms, trace_id, message_id, product_key, \
     device_name, biz_code, operation, code, reason, content, tenant_id, instance_id) \
     SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[], $11::text[], $12::text[])";

/// Where the database is: the parsed `store.url` with the password from `store.password_env`,
/// and how to speak TLS to it (`[store.tls]`).
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    /// `store.url` as written (it holds no password), for logs, errors and health.
    pub url: String,
    /// `[store.tls]`: every connection is TLS; `None`: none is.
    tls: Option<MakeRustls>,
}

impl PgTarget {
    /// From `store.url` and `store.password_env` (validated by `iotfwd check`).
    pub fn new(url: &str, password_env: Option<&str>) -> Result<PgTarget, StoreError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|error| StoreError::Postgres {
                url: url.to_owned(),
                error,
            })?;
        if let Some(var) = password_env {
            let password = std::env::var(var).map_err(|_| {
                StoreError::Config(format!(
                    "store.password_env names {var:?}, which is not set in the environment"
                ))
            })?;
            config.password(password);
        }
        config.connect_timeout(Duration::from_secs(5));
        config.application_name("iotfwd");
        Ok(PgTarget {
            config,
            url: url.to_owned(),
            tls: None,
        })
    }

    /// The database of `[store]`: `url`, `password_env` and, with `[store.tls]`, TLS.
    pub fn from_config(store: &StoreConfig) -> Result<PgTarget, StoreError> {
        let url = store.url.as_deref().ok_or_else(|| {
            StoreError::Config("store.backend = \"postgres\" needs store.url".into())
        })?;
        let target = PgTarget::new(url, store.password_env.as_deref())?;
        match &store.tls {
            Some(tls) => target.with_tls(tls),
            None => Ok(target),
        }
    }

    /// Connects over TLS only (`sslmode=require`; the certificate and host name are always
    /// checked, see [`MakeRustls`]). An unreadable file is an error naming its key.
    pub fn with_tls(mut self, tls: &ClientTls) -> Result<PgTarget, StoreError> {
        self.tls = Some(MakeRustls::new(tls).map_err(StoreError::Config)?);
        self.config.ssl_mode(SslMode::Require);
        Ok(self)
    }

    /// A driver's error as the store's; a statement the server cancelled (a [`Cancel`]'s
    /// request) is [`StoreError::Cancelled`], as a cancelled SQLite query is.
    fn err(&self) -> impl Fn(tokio_postgres::Error) -> StoreError + '_ {
        move |source| {
            if source.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) {
                return StoreError::Cancelled(std::path::PathBuf::from(&self.url));
            }
            StoreError::Postgres {
                url: self.url.clone(),
                error: source,
            }
        }
    }

    /// A connection whose driver runs on the current runtime.
    async fn connect(&self) -> Result<Client, StoreError> {
        let client = match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(self.err())?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                client
            }
            Some(tls) => {
                let (client, connection) =
                    self.config.connect(tls.clone()).await.map_err(self.err())?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                client
            }
        };
        Ok(client)
    }
}

/// A PostgreSQL error as an operator reads it: tokio-postgres' words for its kind ("error
/// performing TLS handshake", "db error") followed by each cause, e.g. the failed handshake
/// explained by [`crate::tls::explain`] or the server's message.
pub(super) fn explain(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Whether the writer's last contact with PostgreSQL worked; health and the
/// `iotfwd_store_backend_up` gauge show it.
#[derive(Debug)]
pub struct BackendState {
    /// `"sqlite"` or `"postgres"`.
    pub backend: &'static str,
    /// The file or `store.url`.
    pub target: String,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl BackendState {
    pub fn new(backend: &'static str, target: String) -> BackendState {
        BackendState {
            backend,
            target,
            up: AtomicBool::new(true),
            last_error: Mutex::new(None),
        }
    }

    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, up: bool, error: Option<String>, metrics: &StoreMetrics) {
        self.up.store(up, Ordering::Relaxed);
        metrics.backend_up.set(i64::from(up));
        if error.is_some() || up {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        }
    }
}

/// Creates the table, its indexes and the partitions ahead (idempotent; several processes may
/// run it at once).
async fn ensure_schema(client: &Client, target: &PgTarget) -> Result<(), StoreError> {
    let err = target.err();
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {SCHEMA} COMMIT;"
        ))
        .await
        .map_err(&err)?;
    ensure_partitions(client, target, crate::message::now_ms()).await
}

/// Daily partitions for yesterday, today and the next two days.
async fn ensure_partitions(
    client: &Client,
    target: &PgTarget,
    now_ms: i64,
) -> Result<(), StoreError> {
    let today = now_ms.div_euclid(DAY_MS);
    let mut sql = format!("BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK});");
    for day in today - 1..=today + 2 {
        let name = partition_name(day);
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {name} PARTITION OF records FOR VALUES FROM ({}) TO ({});",
            day * DAY_MS,
            (day + 1) * DAY_MS
        ));
    }
    sql.push_str("COMMIT;");
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(target.err()(e));
    }
    Ok(())
}

/// `records_p20261130` for the day `day` (days since the epoch, UTC).
fn partition_name(day: i64) -> String {
    let date = chrono::DateTime::from_timestamp(day * 86_400, 0)
        .map(|t| t.format("%Y%m%d").to_string())
        .unwrap_or_else(|| format!("d{day}"));
    format!("records_p{date}")
}

/// The day a partition name stands for.
fn partition_day(name: &str) -> Option<i64> {
    let date = name.strip_prefix("records_p")?;
    let d = chrono::NaiveDate::parse_from_str(date, "%Y%m%d").ok()?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    Some((d - epoch).num_days())
}

/// Retention: drops every partition wholly older than `cutoff_ms`, and (when `exact`) deletes
/// the older records of the partitions that straddle it. Background retention is not exact: it
/// rounds down to whole days, so it never deletes row by row. Returns the records removed.
async fn purge(
    client: &Client,
    target: &PgTarget,
    cutoff_ms: i64,
    exact: bool,
) -> Result<u64, StoreError> {
    let err = target.err();
    let rows = client
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'records'",
            &[],
        )
        .await
        .map_err(&err)?;
    let mut removed = 0u64;
    for row in rows {
        let name: String = row.get(0);
        let Some(day) = partition_day(&name) else {
            continue;
        };
        if (day + 1) * DAY_MS <= cutoff_ms {
            let n: i64 = client
                .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                .await
                .map_err(&err)?
                .get(0);
            client
                .batch_execute(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); DROP TABLE IF EXISTS {name}; COMMIT;"
                ))
                .await
                .map_err(&err)?;
            removed += n as u64;
        }
    }
    let cutoff = if exact {
        cutoff_ms
    } else {
        cutoff_ms.div_euclid(DAY_MS) * DAY_MS
    };
    // The default partition always; the partitions that straddle the cutoff only when exact.
    let table = if exact { "records" } else { "records_default" };
    removed += client
        .execute(
            &format!("DELETE FROM {table} WHERE time_ms < $1"),
            &[&cutoff],
        )
        .await
        .map_err(&err)?;
    Ok(removed)
}

/// One batch as one multi-row insert.
async fn insert_batch(client: &Client, batch: &[Record]) -> Result<(), tokio_postgres::Error> {
    // PostgreSQL text cannot hold NUL; such a character is stored as U+FFFD.
    fn text(s: &str) -> String {
        if s.contains('\0') {
            s.replace('\0', "\u{fffd}")
        } else {
            s.to_owned()
        }
    }
    let col = |f: fn(&Record) -> &str| batch.iter().map(|r| text(f(r))).collect::<Vec<_>>();
    let time: Vec<i64> = batch.iter().map(|r| r.time_ms).collect();
    let code: Vec<i64> = batch.iter().map(|r| i64::from(r.code.as_u16())).collect();
    let trace = col(|r| &r.trace_id);
    let message = col(|r| &r.message_id);
    let product = col(|r| &r.product_key);
    let device = col(|r| &r.device_name);
    let biz = col(|r| r.biz_code.as_str());
    let operation = col(|r| &r.operation);
    let reason = col(|r| &r.reason);
    let content = col(|r| &r.content);
    let tenant = col(|r| &r.tenant_id);
    let instance = col(|r| &r.instance_id);
    client
        .execute(
            INSERT,
            &[
                &time, &trace, &message, &product, &device, &biz, &operation, &code, &reason,
                &content, &tenant, &instance,
            ],
        )
        .await
        .map(|_| ())
}

/// What the writer still has to do, in channel order.
enum Pending {
    Write(Vec<Record>),
    Flush(oneshot::Sender<()>),
}

/// The writer's state between jobs.
struct PgWriter {
    target: PgTarget,
    client: Option<Client>,
    metrics: StoreMetrics,
    log: Arc<CommitLog>,
    state: Arc<BackendState>,
    bound: usize,
    pending: VecDeque<Pending>,
    /// Records in `pending`.
    held: usize,
    stats: WriterStats,
}

impl PgWriter {
    /// Takes a job from the drain task: writes and flushes wait in line; past `bound` held
    /// records, the oldest batch is dropped; a purge runs now (or not at all while the server
    /// is away: the next run catches up).
    async fn take(&mut self, job: Job) {
        match job {
            Job::Write(batch) => {
                self.held += batch.len();
                self.pending.push_back(Pending::Write(batch));
                // Only while the server is away: when it answers, the writer takes no more
                // than the bound (below), so the drain task waits as it does for SQLite.
                while self.held > self.bound && self.client.is_none() {
                    let Some(pos) = self
                        .pending
                        .iter()
                        .position(|p| matches!(p, Pending::Write(_)))
                    else {
                        break;
                    };
                    if let Some(Pending::Write(old)) = self.pending.remove(pos) {
                        let n = old.len() as u64;
                        self.held -= old.len();
                        self.log.advance(n, false);
                        self.stats.failed += n;
                        self.metrics.dropped.inc_by(n);
                        tracing::error!(
                            store = %self.target.url,
                            records = n,
                            "record store: PostgreSQL unreachable and {} records \
                             (store.queue_capacity) already held; dropped the oldest {n} \
                             (they are in the diagnostic log only)",
                            self.bound
                        );
                    }
                }
            }
            Job::Flush(ack) => self.pending.push_back(Pending::Flush(ack)),
            Job::Purge(cutoff, ack) => {
                let mut done = 0;
                if let Some(c) = &self.client {
                    let now = crate::message::now_ms();
                    let _ = ensure_partitions(c, &self.target, now).await;
                    match purge(c, &self.target, cutoff, ack.is_some()).await {
                        Ok(n) => done = n,
                        Err(e) => tracing::error!(
                            store = %self.target.url,
                            "record store: retention failed: {e}"
                        ),
                    }
                    // Fresh statistics for the partitions being written. Autovacuum analyzes a
                    // partition only once a tenth of it changed, so a day's partition spends
                    // hours with none or stale ones, and the planner then answers a messageId
                    // lookup by walking the time index (measured: 390 ms instead of 0.1 ms
                    // over 2 million records).
                    let today = now.div_euclid(DAY_MS);
                    let analyze = format!(
                        "ANALYZE {}, {}",
                        partition_name(today - 1),
                        partition_name(today)
                    );
                    if let Err(e) = c.batch_execute(&analyze).await {
                        tracing::warn!(
                            store = %self.target.url,
                            "record store: ANALYZE of the current partitions failed: {e}"
                        );
                    }
                }
                if done > 0 {
                    tracing::info!(store = %self.target.url, deleted = done, "record store: retention removed {done} records");
                }
                self.stats.purged += done;
                self.metrics.purged.inc_by(done);
                if let Some(ack) = ack {
                    let _ = ack.send(done);
                }
            }
        }
    }

    /// (Re)connects; false while the server does not answer.
    async fn connect(&mut self) -> bool {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return true;
        }
        self.client = open_writer(&self.target, &self.state, &self.metrics).await;
        if self.client.is_some() && self.held > 0 {
            tracing::info!(
                store = %self.target.url,
                "record store: PostgreSQL answers again; writing {} held records",
                self.held
            );
        }
        self.client.is_some()
    }

    /// Runs the oldest pending job against the server.
    async fn step(&mut self, refusals: &mut u32) {
        let Some(c) = self.client.as_ref() else {
            return;
        };
        match self.pending.front() {
            None => {}
            Some(Pending::Flush(_)) => {
                if let Some(Pending::Flush(ack)) = self.pending.pop_front() {
                    let _ = ack.send(());
                }
            }
            Some(Pending::Write(batch)) => match insert_batch(c, batch).await {
                Ok(()) => {
                    let n = batch.len() as u64;
                    self.held -= batch.len();
                    self.pending.pop_front();
                    *refusals = 0;
                    self.stats.written += n;
                    self.stats.transactions += 1;
                    self.metrics.written.inc_by(n);
                    self.log.advance(n, true);
                }
                Err(e) if c.is_closed() || e.as_db_error().is_none() => {
                    tracing::warn!(store = %self.target.url, "record store: PostgreSQL connection lost: {e}");
                    self.state.set(false, Some(e.to_string()), &self.metrics);
                    self.client = None;
                }
                Err(e) => {
                    *refusals += 1;
                    if *refusals <= 3 {
                        tracing::warn!(store = %self.target.url, "record store: write refused, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(*refusals))).await;
                        return;
                    }
                    *refusals = 0;
                    let n = batch.len() as u64;
                    self.held -= batch.len();
                    tracing::error!(
                        store = %self.target.url,
                        records = n,
                        first_message_id = %batch.first().map(|r| r.message_id.as_str()).unwrap_or(""),
                        "record store: cannot write {n} outcome records after retries: {e}; \
                         they are in the diagnostic log (target iotfwd::outcome) only"
                    );
                    self.pending.pop_front();
                    self.stats.failed += n;
                    self.metrics.failed.inc_by(n);
                    self.log.advance(n, false);
                }
            },
        }
    }
}

/// How long a writer whose server is away keeps trying at shutdown before it gives up on the
/// records it holds.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The PostgreSQL writer: runs the drain task's jobs in order, holds up to `bound` records
/// while the server is unreachable (dropping the oldest batch past it), and advances `log` for
/// every batch written, refused or dropped.
pub(super) async fn pg_writer(
    target: PgTarget,
    client: Option<Client>,
    mut jobs: mpsc::Receiver<Job>,
    metrics: StoreMetrics,
    log: Arc<CommitLog>,
    state: Arc<BackendState>,
    bound: usize,
) -> WriterStats {
    let _stopped = StopOnDrop(Arc::clone(&log));
    let mut w = PgWriter {
        target,
        client,
        metrics,
        log,
        state,
        bound,
        pending: VecDeque::new(),
        held: 0,
        stats: WriterStats::default(),
    };
    let mut jobs_open = true;
    let mut backoff = Duration::from_millis(100);
    let mut refusals = 0u32;
    let mut closing_since: Option<tokio::time::Instant> = None;
    loop {
        // Every job that is ready, so the drain task never waits on us while the server is
        // away; while it answers, up to the bound (then the drain task waits: backpressure).
        while jobs_open && !(w.client.is_some() && w.held >= w.bound) {
            let job = if w.pending.is_empty() {
                jobs.recv().await
            } else {
                match jobs.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            match job {
                Some(job) => w.take(job).await,
                None => jobs_open = false,
            }
        }
        if w.pending.is_empty() {
            break;
        }
        if w.connect().await {
            backoff = Duration::from_millis(100);
            w.step(&mut refusals).await;
            continue;
        }
        if !jobs_open {
            let since = *closing_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= SHUTDOWN_GRACE {
                break;
            }
        }
        // The server is away: wait, but keep taking jobs.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            job = jobs.recv(), if jobs_open => match job {
                Some(job) => w.take(job).await,
                None => jobs_open = false,
            },
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    // Records still held (the server never came back before shutdown) are lost.
    let mut lost = 0u64;
    for p in std::mem::take(&mut w.pending) {
        match p {
            Pending::Write(batch) => {
                let n = batch.len() as u64;
                lost += n;
                w.log.advance(n, false);
                w.stats.failed += n;
                w.metrics.dropped.inc_by(n);
            }
            Pending::Flush(ack) => {
                let _ = ack.send(());
            }
        }
    }
    if lost > 0 {
        tracing::error!(store = %w.target.url, "record store: PostgreSQL unreachable at shutdown; {lost} records not written (they are in the diagnostic log only)");
    }
    w.stats
}

/// The process-wide runtime that runs the readers' queries (one worker), so a synchronous
/// caller on any thread can wait for them.
fn reader_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("iotfwd-pg-reader")
            .enable_all()
            .build()
            .expect("a runtime for the PostgreSQL readers")
    })
}

/// Runs `fut` on [`reader_runtime`] and waits for it from this (synchronous) thread.
pub(super) fn block<T: Send + 'static>(
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    reader_runtime().spawn(async move {
        // `fut` (and what it holds, such as a pooled connection) is gone before the answer.
        let out = fut.await;
        let _ = tx.send(out);
    });
    rx.recv().expect("the PostgreSQL reader runtime ended")
}

/// Asks the server to cancel what runs on `token`'s connection (from any thread; the request
/// goes out on [`reader_runtime`], on a connection of its own).
pub(super) fn send_cancel(token: tokio_postgres::CancelToken) {
    reader_runtime().spawn(async move {
        if let Err(e) = token.cancel_query(NoTls).await {
            tracing::warn!("record store: could not cancel a PostgreSQL query: {e}");
        }
    });
}

/// Connections a reader keeps for reuse (as many as `store.max_concurrent_queries` by default).
const POOL: usize = 4;

/// A reader of a PostgreSQL store. Cheap to clone; keeps a few connections open for reuse, and
/// gives each query one of its own for as long as it runs, so cancelling it (a cancel request
/// names a connection, not a statement) stops that query and no other.
#[derive(Clone)]
pub struct PgReader {
    target: Arc<PgTarget>,
    pool: Arc<Mutex<Vec<Client>>>,
    cancel: Option<Cancel>,
}

impl PgReader {
    /// Connects and checks that the store's table exists.
    pub fn open(target: PgTarget) -> Result<PgReader, StoreError> {
        let reader = PgReader::lazy(target);
        reader.run(|client, target| async move {
            client
                .query_one("SELECT to_regclass('records') IS NOT NULL", &[])
                .await
                .map_err(target.err())
                .and_then(|row| {
                    if row.get::<_, bool>(0) {
                        Ok(())
                    } else {
                        Err(StoreError::Config(format!(
                            "no record store in {} (no table records); has a daemon with this \
                             [store] run yet?",
                            target.url
                        )))
                    }
                })
        })?;
        Ok(reader)
    }

    /// A reader that connects at its first query (the daemon's: a server down at start must
    /// not keep it from starting).
    pub fn lazy(target: PgTarget) -> PgReader {
        PgReader {
            target: Arc::new(target),
            pool: Arc::new(Mutex::new(Vec::new())),
            cancel: None,
        }
    }

    pub fn url(&self) -> &str {
        &self.target.url
    }

    pub fn cancellable(&self, cancel: Cancel) -> PgReader {
        PgReader {
            cancel: Some(cancel),
            ..self.clone()
        }
    }

    /// Runs `f` on a connection of its own (from the pool, or a new one), registered with the
    /// reader's [`Cancel`] while it runs. A connection a cancel reached is closed rather than
    /// pooled: its cancel request may still be on the way to the server.
    fn run<T, F>(&self, f: impl FnOnce(Arc<Client>, PgTarget) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let path = std::path::PathBuf::from(&self.target.url);
        if self.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            return Err(cancelled(&path));
        }
        let pooled = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.retain(|c| !c.is_closed());
            pool.pop()
        };
        let client = match pooled {
            Some(c) => c,
            None => {
                let target = PgTarget::clone(&self.target);
                block(async move { target.connect().await })?
            }
        };
        let entered = match &self.cancel {
            None => None,
            Some(cancel) => match cancel.enter(Running::Postgres(client.cancel_token())) {
                Some(id) => Some(id),
                None => {
                    self.release(client);
                    return Err(cancelled(&path));
                }
            },
        };
        let client = Arc::new(client);
        let result = block(f(Arc::clone(&client), PgTarget::clone(&self.target)));
        let reached = match (&self.cancel, entered) {
            (Some(cancel), Some(id)) => cancel.leave(id),
            _ => false,
        };
        if !reached && let Ok(client) = Arc::try_unwrap(client) {
            self.release(client);
        }
        result
    }

    fn release(&self, client: Client) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL && !client.is_closed() {
            pool.push(client);
        }
    }

    /// One page, newest first (the same [`LogQuery`] SQL as SQLite, in PostgreSQL's dialect).
    pub fn query(&self, query: &LogQuery) -> Result<Page, StoreError> {
        let query = query.clone();
        self.run(|client, target| async move {
            let err = target.err();
            let high_water = match &query.cursor {
                Some(c) => c.high_water,
                None => client
                    .query_one(
                        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM records_id_seq",
                        &[],
                    )
                    .await
                    .map_err(&err)?
                    .get::<_, i64>(0),
            };
            let (sql, values) = query.to_sql_for(Dialect::Postgres);
            let params = pg_params(&values);
            let rows = client
                .query(&sql, &param_refs(&params))
                .await
                .map_err(&err)?;
            let stored = rows
                .iter()
                .map(pg_row_to_stored)
                .collect::<Result<Vec<Stored>, _>>()
                .map_err(&err)?;
            let path = std::path::PathBuf::from(&target.url);
            Page::from_rows(stored, query.limit, high_water, &path)
        })
    }

    /// Everything recorded about one message, oldest first (as [`super::SqliteReader::trace`]).
    pub fn trace(&self, id: &str) -> Result<Trace, StoreError> {
        let id = id.to_owned();
        self.run(|client, target| async move {
            let err = target.err();
            let cap = TRACE_MAX_RECORDS as i64 + 1;
            let by_id = format!(
                "SELECT {COLUMNS} FROM records WHERE message_id = $1 OR trace_id = $1 \
                 ORDER BY time_ms, id LIMIT $2"
            );
            let mut stored: Vec<Stored> = client
                .query(&by_id, &[&id, &cap])
                .await
                .map_err(&err)?
                .iter()
                .map(pg_row_to_stored)
                .collect::<Result<_, _>>()
                .map_err(&err)?;
            let mut traces: Vec<String> = stored
                .iter()
                .map(|s| s.trace_id.clone())
                .filter(|t| *t != id)
                .collect();
            traces.sort();
            traces.dedup();
            let by_trace = format!(
                "SELECT {COLUMNS} FROM records WHERE trace_id = $1 ORDER BY time_ms, id LIMIT $2"
            );
            for trace_id in traces.iter().take(100) {
                let more: Vec<Stored> = client
                    .query(&by_trace, &[trace_id, &cap])
                    .await
                    .map_err(&err)?
                    .iter()
                    .map(pg_row_to_stored)
                    .collect::<Result<_, _>>()
                    .map_err(&err)?;
                stored.extend(more);
            }
            stored.sort_by_key(|s| (s.time_ms, s.id));
            stored.dedup_by_key(|s| s.id);
            let truncated = stored.len() > TRACE_MAX_RECORDS;
            stored.truncate(TRACE_MAX_RECORDS);
            let path = std::path::PathBuf::from(&target.url);
            let records = stored
                .into_iter()
                .map(|s| s.into_record(&path))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Trace { records, truncated })
        })
    }

    /// How many records the store holds.
    pub fn count(&self) -> Result<u64, StoreError> {
        self.run(|client, target| async move {
            let n: i64 = client
                .query_one("SELECT count(*) FROM records", &[])
                .await
                .map_err(target.err())?
                .get(0);
            Ok(n as u64)
        })
    }

    /// The rows of a stats query (the same statement as SQLite's, in PostgreSQL's dialect).
    pub fn counts(&self, query: &StatsQuery) -> Result<Vec<CountRow>, StoreError> {
        let (sql, values) = query.to_sql_for(Dialect::Postgres);
        self.run(|client, target| async move {
            let params = pg_params(&values);
            let rows = client
                .query(&sql, &param_refs(&params))
                .await
                .map_err(target.err())?;
            rows.iter()
                .map(|r| {
                    Ok(count_row(
                        r.try_get(0)?,
                        r.try_get(1)?,
                        r.try_get(2)?,
                        r.try_get(3)?,
                    ))
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(target.err())
        })
    }

    /// PostgreSQL's plan for a query, one line per step.
    pub fn explain(&self, query: &LogQuery) -> Result<String, StoreError> {
        self.explain_sql(query.to_sql_for(Dialect::Postgres))
    }

    /// PostgreSQL's plan for a stats query.
    pub fn explain_counts(&self, query: &StatsQuery) -> Result<String, StoreError> {
        self.explain_sql(query.to_sql_for(Dialect::Postgres))
    }

    fn explain_sql(
        &self,
        (sql, values): (String, Vec<rusqlite::types::Value>),
    ) -> Result<String, StoreError> {
        self.run(|client, target| async move {
            let params = pg_params(&values);
            let rows = client
                .query(&format!("EXPLAIN {sql}"), &param_refs(&params))
                .await
                .map_err(target.err())?;
            Ok(rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n"))
        })
    }
}

/// [`pg_params`] as the driver takes them.
fn param_refs(params: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// A query's bound values as PostgreSQL parameters.
fn pg_params(values: &[rusqlite::types::Value]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    use rusqlite::types::Value;
    values
        .iter()
        .map(|v| -> Box<dyn ToSql + Sync + Send> {
            match v {
                Value::Integer(i) => Box::new(*i),
                Value::Text(t) => Box::new(t.clone()),
                Value::Real(f) => Box::new(*f),
                Value::Null => Box::new(None::<String>),
                Value::Blob(b) => Box::new(b.clone()),
            }
        })
        .collect()
}

/// Opens the writer side: connects (a server down at start is an outage like any other: the
/// writer holds records until it answers) and creates the schema.
pub(super) async fn open_writer(
    target: &PgTarget,
    state: &BackendState,
    metrics: &StoreMetrics,
) -> Option<Client> {
    match target.connect().await {
        Ok(client) => match ensure_schema(&client, target).await {
            Ok(()) => {
                state.set(true, None, metrics);
                Some(client)
            }
            Err(e) => {
                if state.up() {
                    tracing::error!(store = %target.url, "record store: {e}");
                }
                state.set(false, Some(e.to_string()), metrics);
                None
            }
        },
        Err(e) => {
            if state.up() {
                tracing::error!(store = %target.url, "record store: PostgreSQL unreachable: {e}; holding records (up to store.queue_capacity) until it answers");
            }
            state.set(false, Some(e.to_string()), metrics);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Backend, PgDb, base, filled_on, open_on, record};
    use super::super::{Store, StoreOptions};
    use super::*;
    use crate::outcome::query::LogParams;
    use crate::outcome::{BizCode, Code};

    /// Records with the characters a keyword search must take literally.
    fn records() -> Vec<Record> {
        let mut out: Vec<Record> = (0..300)
            .map(|i| {
                let code = match i % 5 {
                    0 => Code::DestinationUnavailable,
                    1 => Code::AckTimeout,
                    _ => Code::Ok,
                };
                let mut r = record(i, base() + (i as i64 / 2), code);
                // Shared traces: every 7 records one trace.
                r.trace_id = format!("t{}", i / 7);
                r
            })
            .collect();
        let odd = [
            ("100%", r#"{"m":"100% done_x"}"#),
            ("say", r#"{"msg":"say \"hi\""}"#),
            ("nl", r#"{"m":"a\nb"}"#),
            ("bs", r#"{"p":"C:\\x"}"#),
            ("case", r#"{"m":"ABC"}"#),
            ("nul", "{\"m\":\"caf\u{e9}\"}"),
        ];
        for (k, (reason, content)) in odd.into_iter().enumerate() {
            let mut r = record(1000 + k, base() + 500 + k as i64, Code::Ok);
            r.reason = reason.to_owned();
            r.content = content.to_owned();
            out.push(r);
        }
        out
    }

    async fn fill(store: &Store, records: &[Record]) {
        let tx = store.sender();
        for r in records {
            tx.send(r.clone()).await.unwrap();
        }
        store.flush().await.unwrap();
    }

    /// A PostgreSQL store and a SQLite one (in `dir`) holding `records`; `None` when
    /// PostgreSQL is missing outside CI.
    async fn both_holding(
        dir: &std::path::Path,
        records: &[Record],
    ) -> Option<(Store, Store, Option<PgDb>)> {
        let (pg, db) = open_on(Backend::Postgres, dir, StoreOptions::default()).await?;
        let (lite, _) = open_on(Backend::Sqlite, dir, StoreOptions::default()).await?;
        fill(&pg, records).await;
        fill(&lite, records).await;
        Some((pg, lite, db))
    }

    /// Every page of a query, in order.
    fn all_pages(reader: &super::super::Reader, q: &LogQuery) -> Vec<Record> {
        let mut out = Vec::new();
        let mut q = q.clone();
        loop {
            let page = reader.query(&q).unwrap();
            out.extend(page.records);
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => return out,
            }
        }
    }

    /// The same records give the same answers on SQLite and PostgreSQL: every filter, keyword
    /// forms (literal `%` and `_`, case, JSON-escaped quotes, newlines and backslashes), pages
    /// and traces.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_backends_give_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        let records = records();
        let Some((pg, lite, _db)) = both_holding(dir.path(), &records).await else {
            return;
        };
        let (pg_r, lite_r) = (pg.reader().unwrap(), lite.reader().unwrap());
        let lite_r = lite_r.with_split_at(50);
        assert_eq!(pg_r.count().unwrap(), records.len() as u64);
        let queries: Vec<Vec<(&str, &str)>> = vec![
            vec![],
            vec![("limit", "7")],
            vec![("device", "d1"), ("limit", "9")],
            vec![("product", "p0"), ("status", "failed")],
            vec![("messageId", "m17")],
            vec![("traceId", "t3")],
            vec![("status", "9325"), ("limit", "11")],
            vec![
                ("status", "success"),
                ("serviceType", "uplink"),
                ("limit", "13"),
            ],
            vec![("serviceType", "ruleengine")],
            vec![("keyword", "%")],
            vec![("keyword", "_")],
            vec![("keyword", "100% done")],
            vec![("keyword", "abc")],
            vec![("keyword", "ABC")],
            vec![("keyword", "say \"hi\"")],
            vec![("keyword", "a\nb")],
            vec![("keyword", "C:\\x")],
            vec![("keyword", "é")],
            vec![("keyword", "\"i\":1"), ("limit", "5")],
            vec![("keyword", "post"), ("device", "d2"), ("limit", "17")],
        ];
        let now = crate::message::now_ms();
        let from = crate::outcome::query::format_time_ms(base() + 20);
        let to = crate::outcome::query::format_time_ms(base() + 90);
        let mut ranged = vec![("from", from.as_str()), ("to", to.as_str())];
        let mut all = queries.clone();
        all.push(ranged.clone());
        ranged.push(("keyword", "d1"));
        all.push(ranged);
        let (total, mut found) = (all.len(), 0);
        for params in all {
            let q = LogParams::from_pairs(params.iter().map(|(k, v)| (*k, v.to_string())))
                .unwrap()
                .validate(now)
                .unwrap();
            let (a, b) = (all_pages(&lite_r, &q), all_pages(&pg_r, &q));
            assert_eq!(a, b, "{params:?}");
            found += usize::from(!a.is_empty());
        }
        // Not vacuous: all but the case-sensitive miss find something.
        assert!(
            found >= total - 1,
            "{found} of {total} queries found records"
        );
        for id in ["m0", "m17", "t3", "t40", "nope"] {
            assert_eq!(lite_r.trace(id).unwrap(), pg_r.trace(id).unwrap(), "{id}");
        }
        assert_eq!(pg_r.trace("m17").unwrap().records.len(), 7);
        pg.shutdown().await;
        lite.shutdown().await;
    }

    /// The same stats on both backends: every grouping, with and without a status and a
    /// service type, in buckets of several widths.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_backends_give_the_same_stats() {
        use crate::outcome::query::Status;
        use crate::outcome::stats::{GroupBy, StatsQuery, stats};
        let dir = tempfile::tempdir().unwrap();
        let mut records = records();
        for (i, r) in records.iter_mut().enumerate() {
            r.tenant_id = format!("tenant{}", i % 4);
            r.instance_id = format!("inst{}", i % 5);
            if i % 3 == 0 {
                r.operation = format!("rule{}/amqp:dest{}", i % 4, i % 2);
            }
        }
        let Some((pg, lite, _db)) = both_holding(dir.path(), &records).await else {
            return;
        };
        let (pg_r, lite_r) = (pg.reader().unwrap(), lite.reader().unwrap());
        let now = crate::message::now_ms();
        let mut compared = 0;
        for (by, _) in GroupBy::ALL {
            for (status, service_type) in [
                (None, None),
                (Some(Status::Failed), None),
                (Some(Status::Code(Code::Ok)), Some(BizCode::Uplink)),
                (None, Some(BizCode::RuleEngine)),
            ] {
                for (from, to, bucket_ms) in [
                    (base() - 50, base() + 600, 7),
                    (base() + 20, base() + 90, 1_000),
                    (now - 3_600_000, now, 60_000),
                ] {
                    let q = StatsQuery {
                        from_ms: from,
                        to_ms: to,
                        bucket_ms,
                        by,
                        status,
                        service_type,
                    };
                    let a = stats(&lite_r, &q, None, now).unwrap();
                    let b = stats(&pg_r, &q, None, now).unwrap();
                    assert_eq!(a, b, "{q:?}");
                    compared += usize::from(a.total > 0);
                }
            }
        }
        // Not vacuous: every grouping counts records in most of its queries.
        assert!(compared >= 8 * 9, "{compared} queries counted records");
        let rules = stats(
            &pg_r,
            &StatsQuery {
                from_ms: base() - 50,
                to_ms: now,
                bucket_ms: 60_000,
                by: GroupBy::Rule,
                status: None,
                service_type: None,
            },
            None,
            now,
        )
        .unwrap();
        let keys: Vec<&str> = rules.groups.iter().map(|g| g.key.as_str()).collect();
        assert!(
            keys.contains(&"rule0") && keys.contains(&"rule3"),
            "{keys:?}"
        );
        pg.shutdown().await;
        lite.shutdown().await;
    }

    /// A cancel stops a statement that is running on the server, not only the ones a reader
    /// would start: here the statement waits for a lock another session holds, for as long as
    /// the test wants, and only the cancel request (the connection's, sent when [`Cancel`]
    /// fires) ends it. A log query and a stats query alike; the other connections of the
    /// reader are not touched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_stops_a_statement_running_on_the_server() {
        use crate::outcome::stats::{GroupBy, StatsQuery};
        let dir = tempfile::tempdir().unwrap();
        let Some((store, reader, Some(db))) = filled_on(Backend::Postgres, dir.path(), 1).await
        else {
            return;
        };
        let lock = db.lock_records();
        for stats in [false, true] {
            let cancel = Cancel::default();
            let cancellable = reader.cancellable(cancel.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let result = if stats {
                    cancellable
                        .counts(&StatsQuery {
                            from_ms: 0,
                            to_ms: i64::MAX,
                            bucket_ms: 60_000,
                            by: GroupBy::Code,
                            status: None,
                            service_type: None,
                        })
                        .map(|_| ())
                } else {
                    cancellable.query(&LogQuery::default()).map(|_| ())
                };
                let _ = tx.send(result);
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while db.running_statements() == 0 {
                assert!(std::time::Instant::now() < deadline, "the query never ran");
                std::thread::sleep(Duration::from_millis(20));
            }
            // It runs, and goes on running.
            assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
            cancel.cancel();
            let answer = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the statement still runs on the server after the cancel");
            let e = answer.unwrap_err();
            assert!(matches!(e, StoreError::Cancelled(_)), "stats {stats}: {e}");
            assert!(e.to_string().contains("cancelled"), "{e}");
            assert_eq!(db.running_statements(), 0);
        }
        drop(lock);
        assert_eq!(reader.count().unwrap(), 1);
        store.shutdown().await;
    }

    /// Tables are partitioned by day; background retention drops whole days, an explicit purge
    /// is exact.
    /// A retention run analyzes the partitions being written (yesterday's and today's), so
    /// the planner's statistics follow them long before autovacuum would (it waits for a tenth
    /// of a partition to change): `reltuples` of today's partition follows the rows written
    /// only through retention runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retention_run_analyzes_the_partitions_being_written() {
        let Some(db) = PgDb::create() else {
            return;
        };
        let store = Store::open_postgres(db.target(), StoreOptions::default(), None)
            .await
            .unwrap();
        // The run the store makes at start is over once this one is.
        assert_eq!(store.purge_older_than(0).await.unwrap(), 0);
        let now = crate::message::now_ms();
        let tx = store.sender();
        for i in 0..10 {
            tx.send(record(i, now, Code::Ok)).await.unwrap();
        }
        store.flush().await.unwrap();
        let today = partition_name(now.div_euclid(DAY_MS));
        let reltuples = || {
            let target = db.target();
            let today = today.clone();
            block(async move {
                let c = target.connect().await.unwrap();
                c.query_one(
                    "SELECT reltuples::float8 FROM pg_class WHERE relname = $1",
                    &[&today],
                )
                .await
                .unwrap()
                .get::<_, f64>(0)
            })
        };
        assert_ne!(
            reltuples(),
            10.0,
            "{today}'s statistics already count the new rows"
        );
        assert_eq!(store.purge_older_than(0).await.unwrap(), 0);
        assert_eq!(
            reltuples(),
            10.0,
            "{today} not analyzed by the retention run"
        );
        store.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_drops_whole_day_partitions() {
        let Some(db) = PgDb::create() else {
            return;
        };
        let store = Store::open_postgres(db.target(), StoreOptions::default(), None)
            .await
            .unwrap();
        let now = crate::message::now_ms();
        let today = now.div_euclid(DAY_MS);
        // Three days ago (the default partition), yesterday, and now.
        let times = [now - 3 * DAY_MS, (today - 1) * DAY_MS + 5, now];
        let tx = store.sender();
        for (i, t) in times.iter().enumerate() {
            tx.send(record(i, *t, Code::Ok)).await.unwrap();
        }
        store.flush().await.unwrap();
        let reader = store.reader().unwrap();
        let parts = block({
            let target = db.target();
            async move {
                let c = target.connect().await.unwrap();
                c.query(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                     JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'records' \
                     ORDER BY 1",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
            }
        });
        for day in today - 1..=today + 2 {
            assert!(parts.contains(&partition_name(day)), "{parts:?}");
        }
        assert!(parts.contains(&"records_default".to_owned()));
        // Background retention with a cutoff inside today: whole days before today go.
        let c = block({
            let target = db.target();
            async move {
                let c = target.connect().await.unwrap();
                purge(&c, &target, now - 1000, false).await.unwrap()
            }
        });
        assert_eq!(c, 2);
        assert_eq!(reader.count().unwrap(), 1);
        // An explicit purge is exact.
        assert_eq!(store.purge_older_than(now + 1).await.unwrap(), 1);
        assert_eq!(reader.count().unwrap(), 0);
        store.shutdown().await;
    }

    /// A server that answers never loses a record to the bound: a writer slower than intake
    /// makes the senders wait (backpressure), as on SQLite.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_healthy_server_drops_nothing_however_fast_the_intake() {
        let Some(db) = PgDb::create() else {
            return;
        };
        let options = StoreOptions {
            batch_max_records: 100,
            queue_capacity: 200,
            commit_interval: Duration::from_millis(0),
            ..StoreOptions::default()
        };
        let metrics = StoreMetrics::new(None);
        let store = Store::open_postgres(db.target(), options, Some(metrics.clone()))
            .await
            .unwrap();
        let tx = store.sender();
        for i in 0..5000 {
            tx.send(record(i, base() + i as i64, Code::Ok))
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        assert_eq!((metrics.written.get(), metrics.dropped.get()), (5000, 0));
        store.shutdown().await;
    }

    /// A TCP relay to the machine's PostgreSQL that the test can cut (close every connection
    /// and refuse new ones) and restore: an outage without touching the shared server.
    struct Relay {
        port: u16,
        open: Arc<AtomicBool>,
        cut: Arc<tokio::sync::Notify>,
    }

    impl Relay {
        async fn start() -> Relay {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let open = Arc::new(AtomicBool::new(true));
            let cut = Arc::new(tokio::sync::Notify::new());
            let (o, k) = (Arc::clone(&open), Arc::clone(&cut));
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !o.load(Ordering::SeqCst) {
                        continue;
                    }
                    let k = Arc::clone(&k);
                    tokio::spawn(async move {
                        let Ok(mut out) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                            _ = k.notified() => {}
                        }
                    });
                }
            });
            Relay { port, open, cut }
        }

        fn cut(&self) {
            self.open.store(false, Ordering::SeqCst);
            self.cut.notify_waiters();
        }

        fn restore(&self) {
            self.open.store(true, Ordering::SeqCst);
        }
    }

    /// An outage: records keep being accepted (nothing waits), the state says down, and when
    /// the server is back the held records are written; past the bound the oldest are dropped
    /// and counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_holds_records_up_to_the_bound_and_writes_them_when_back() {
        let Some(db) = PgDb::create() else {
            return;
        };
        let relay = Relay::start().await;
        let via = db.url.replace(":5432/", &format!(":{}/", relay.port));
        let target = PgTarget::new(&via, None).unwrap();
        let options = StoreOptions {
            batch_max_records: 100,
            queue_capacity: 1000,
            commit_interval: Duration::from_millis(10),
            ..StoreOptions::default()
        };
        let metrics = StoreMetrics::new(None);
        let store = Store::open_postgres(target, options, Some(metrics.clone()))
            .await
            .unwrap();
        let state = store.state();
        let tx = store.sender();
        for i in 0..100 {
            tx.send(record(i, base() + i as i64, Code::Ok))
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        assert_eq!(metrics.written.get(), 100);
        relay.cut();
        // 1500 records while the server is away: none of the sends waits long.
        let started = std::time::Instant::now();
        for i in 100..1600 {
            tokio::time::timeout(
                Duration::from_secs(2),
                tx.send(record(i, base() + i as i64, Code::Ok)),
            )
            .await
            .expect("a record send waited on the outage")
            .unwrap();
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while state.up() || metrics.dropped.get() == 0 {
            assert!(std::time::Instant::now() < deadline, "no outage seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(metrics.backend_up.get(), 0);
        relay.restore();
        store.flush().await.unwrap();
        assert!(state.up());
        let written = metrics.written.get();
        let dropped = metrics.dropped.get();
        assert_eq!(
            written + dropped,
            1600,
            "written {written}, dropped {dropped}"
        );
        // The writer holds at most the bound (1000): of the 1500 sent during the outage, at
        // most 500 (and a batch of slack) are dropped. How many fewer depends on how many were
        // still in the queue in front of the writer when the outage was seen (402 in one run,
        // 500 in others); those are written too.
        assert!((1..=600).contains(&dropped), "dropped {dropped}");
        // The oldest are the ones dropped, the newest are kept.
        let reader = PgReader::open(db.target()).unwrap();
        assert_eq!(reader.count().unwrap(), written);
        assert_eq!(reader.trace("m1599").unwrap().records.len(), 1);
        let last_dropped = format!("m{}", 100 + dropped - 1);
        assert!(reader.trace(&last_dropped).unwrap().records.is_empty());
        assert_eq!(reader.trace("m99").unwrap().records.len(), 1);
        store.shutdown().await;
    }
}
