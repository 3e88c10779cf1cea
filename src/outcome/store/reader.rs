//! The read side of the record store: one page of a log query, and the trace of one message.
//!
//! A reader is separate from the writer on purpose: the CLI and the HTTP API read while the
//! daemon writes (WAL), from any process, and never create a file. A query narrowed only by
//! row-by-row filters is split (see [`crate::outcome::query`]): its newest part through the time
//! index, the rest in storage order, read in parallel by id ranges.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, InterruptHandle, OptionalExtension, params};

use super::postgres::{PgReader, PgTarget, send_cancel};
use super::rows::{Stored, row_to_stored};
use super::schema::{Layout, layout, open_reader};
use super::{StoreError, sqlite_err};
use crate::outcome::Record;
use crate::outcome::query::{
    COLUMNS, CountRow, Cursor, Dialect, LogQuery, Order, StatsQuery, count_row,
};

/// A query narrowed only by row-by-row filters reads this many newest records (in its range)
/// through the time index before it reads the rest in storage order.
pub const SPLIT_AT: usize = 65_536;

/// Most records `logs trace` returns for one message.
pub const TRACE_MAX_RECORDS: usize = 10_000;

/// One page of a query: newest first, and where the next one starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub records: Vec<Record>,
    /// Pass it back (`--cursor`, `cursor=`) for the next page; `None` on the last page.
    pub next_cursor: Option<Cursor>,
}

impl Page {
    /// The page of a query fetched with one row more than `limit`: that row, if there, says
    /// a next page exists, whose cursor starts after the page's last record and keeps
    /// `high_water` (the newest id the first page saw). `path` names the store in errors.
    pub(super) fn from_rows(
        mut rows: Vec<Stored>,
        limit: usize,
        high_water: i64,
        path: &Path,
    ) -> Result<Page, StoreError> {
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = match (more, rows.last()) {
            (true, Some(last)) => Some(Cursor {
                time_ms: last.time_ms,
                id: last.id,
                high_water,
            }),
            _ => None,
        };
        let records = rows
            .into_iter()
            .map(|s| s.into_record(path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page {
            records,
            next_cursor,
        })
    }
}

/// Everything recorded about one message, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub records: Vec<Record>,
    /// More than [`TRACE_MAX_RECORDS`] records matched; the newest are left out.
    pub truncated: bool,
}

/// Stops the queries of a reader made with [`Reader::cancellable`], from any thread (the API's
/// query time-out): the statements running on its connections are interrupted (SQLite) or
/// cancelled on the server (PostgreSQL: a cancel request for the connection's backend), and the
/// ones it would start fail at once. Cheap to clone.
#[derive(Clone, Default)]
pub struct Cancel(Arc<Mutex<CancelState>>);

#[derive(Default)]
struct CancelState {
    cancelled: bool,
    next_id: u64,
    /// The connections in use by the reader's queries now.
    running: Vec<(u64, Running)>,
}

/// How to stop what runs on one connection.
pub(super) enum Running {
    Sqlite(InterruptHandle),
    Postgres(tokio_postgres::CancelToken),
}

impl Cancel {
    pub fn cancel(&self) {
        let mut state = self.0.lock().expect("cancel state");
        state.cancelled = true;
        for (_, running) in &state.running {
            match running {
                Running::Sqlite(handle) => handle.interrupt(),
                Running::Postgres(token) => send_cancel(token.clone()),
            }
        }
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.lock().expect("cancel state").cancelled
    }

    /// Registers a connection about to run; `None` once cancelled.
    pub(super) fn enter(&self, running: Running) -> Option<u64> {
        let mut state = self.0.lock().expect("cancel state");
        if state.cancelled {
            return None;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.running.push((id, running));
        Some(id)
    }

    /// The connection `id` is done: a later cancel must not interrupt it (it goes back to the
    /// pool and may serve another query). True when a cancel reached it while it ran.
    pub(super) fn leave(&self, id: u64) -> bool {
        let mut state = self.0.lock().expect("cancel state");
        state.running.retain(|(i, _)| *i != id);
        state.cancelled
    }
}

/// The error of a query its [`Cancel`] stopped before it started (`path`: the file, or the URL
/// of a PostgreSQL store).
pub(super) fn cancelled(path: &Path) -> StoreError {
    StoreError::Cancelled(path.to_owned())
}

/// The read side of a SQLite store: any number of readers, in any process, query while the
/// daemon writes. Cheap to clone; keeps a few connections open for reuse. Queries block: call
/// them from `spawn_blocking` in async code.
#[derive(Clone)]
pub struct SqliteReader {
    path: PathBuf,
    pool: Arc<Mutex<Vec<Connection>>>,
    split_at: usize,
    /// Storage-order scans over fewer ids than this run in one thread.
    parallel_from: i64,
    /// Set by [`Reader::cancellable`].
    cancel: Option<Cancel>,
    /// The file's layout when it was opened (a version 1 file keeps its indexes until the
    /// daemon of this version opens it).
    layout: Layout,
}

impl SqliteReader {
    /// Opens an existing store; a missing file is [`StoreError::Missing`] (a reader never
    /// creates one).
    pub fn open(path: &Path) -> Result<SqliteReader, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing(path.to_owned()));
        }
        let mut reader = SqliteReader {
            path: path.to_owned(),
            pool: Arc::new(Mutex::new(Vec::new())),
            split_at: SPLIT_AT,
            parallel_from: 200_000,
            cancel: None,
            layout: Layout::Indexes,
        };
        let conn = reader.connect()?;
        reader.layout = layout(&conn).map_err(sqlite_err(path))?;
        reader.release(conn);
        Ok(reader)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The same reader, splitting queries at `records` instead of [`SPLIT_AT`], and reading the
    /// storage-order part in parallel whatever its size: lets tests run every path of a split
    /// query on a small store. Results do not depend on it.
    pub fn with_split_at(mut self, records: usize) -> SqliteReader {
        self.split_at = records;
        self.parallel_from = 0;
        self
    }

    /// The same reader, reading the file as if it had `layout` (a version 2 file still has
    /// every column a version 1 plan filters on): lets tests compare the two plans' answers.
    #[cfg(test)]
    pub(crate) fn with_layout(mut self, layout: Layout) -> SqliteReader {
        self.layout = layout;
        self
    }

    /// The same reader, whose queries `cancel` can stop.
    pub fn cancellable(&self, cancel: Cancel) -> SqliteReader {
        SqliteReader {
            cancel: Some(cancel),
            ..self.clone()
        }
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.pool.lock().expect("reader pool").pop() {
            return Ok(conn);
        }
        open_reader(&self.path)
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
        let entered = match &self.cancel {
            None => None,
            Some(cancel) => match cancel.enter(Running::Sqlite(conn.get_interrupt_handle())) {
                Some(id) => Some(id),
                None => {
                    self.release(conn);
                    return Err(cancelled(&self.path));
                }
            },
        };
        let result = f(&conn);
        if let (Some(cancel), Some(id)) = (&self.cancel, entered) {
            cancel.leave(id);
        }
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
                let stored = match split_at(conn, query, self.split_at).map_err(&err)? {
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
                    None => fetch(self.index_sql(conn, query).map_err(&err)?)?,
                };
                Page::from_rows(stored, query.limit, high_water, &self.path)
            })();
            let _ = conn.execute_batch("COMMIT");
            result
        })
    }

    /// The statement of a query that is not split: through the lookup tables when it names a
    /// device or a product and the file has them, else [`LogQuery::to_sql`]. Reads
    /// `indexed.through` in the caller's transaction, the page's snapshot.
    fn index_sql(
        &self,
        conn: &Connection,
        query: &LogQuery,
    ) -> rusqlite::Result<(String, Vec<rusqlite::types::Value>)> {
        if self.layout == Layout::KeyTables && (query.device.is_some() || query.product.is_some()) {
            let through: i64 = conn
                .prepare_cached("SELECT through FROM indexed")?
                .query_row([], |r| r.get(0))?;
            if let Some(sql) = query.to_sql_by_key(through) {
                return Ok(sql);
            }
        }
        Ok(query.to_sql())
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

    /// The rows of a stats query (see [`StatsQuery::to_sql_for`]).
    pub fn counts(&self, query: &StatsQuery) -> Result<Vec<CountRow>, StoreError> {
        self.with_conn(|conn| {
            let err = sqlite_err(&self.path);
            let (sql, values) = query.to_sql_for(Dialect::Sqlite);
            let mut stmt = conn.prepare_cached(&sql).map_err(&err)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(values), |r| {
                    Ok(count_row(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(&err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(&err)
        })
    }

    /// SQLite's plan for a query (`EXPLAIN QUERY PLAN`), one step per line; for a split query
    /// ([`LogQuery::scans`]) the plan of its storage-order part. For tests and diagnosis.
    pub fn explain(&self, query: &LogQuery) -> Result<String, StoreError> {
        if query.scans() {
            self.explain_sql(query.to_sql_in(Order::Scan, None, Some(0), None, query.limit + 1))
        } else {
            let sql =
                self.with_conn(|conn| self.index_sql(conn, query).map_err(sqlite_err(&self.path)))?;
            self.explain_sql(sql)
        }
    }

    /// SQLite's plan for a stats query.
    pub fn explain_counts(&self, query: &StatsQuery) -> Result<String, StoreError> {
        self.explain_sql(query.to_sql_for(Dialect::Sqlite))
    }

    fn explain_sql(
        &self,
        (sql, values): (String, Vec<rusqlite::types::Value>),
    ) -> Result<String, StoreError> {
        self.with_conn(|conn| {
            let err = sqlite_err(&self.path);
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

/// The read side of either backend: the same queries and answers on a SQLite file or a
/// PostgreSQL database. Cheap to clone; queries block (call them from `spawn_blocking` in async
/// code).
#[derive(Clone)]
pub enum Reader {
    Sqlite(SqliteReader),
    Postgres(PgReader),
}

impl Reader {
    /// Opens an existing SQLite store.
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        SqliteReader::open(path).map(Reader::Sqlite)
    }

    /// Opens the store `[store]` names: the SQLite file (`path`, default
    /// `<data_dir>/outcomes.db`) or the PostgreSQL database (`url`).
    pub fn open_config(
        config: &crate::config::store::StoreConfig,
        data_dir: &Path,
    ) -> Result<Reader, StoreError> {
        use crate::config::store::StoreBackend;
        match config.backend {
            StoreBackend::Postgres => {
                PgReader::open(PgTarget::from_config(config)?).map(Reader::Postgres)
            }
            StoreBackend::Sqlite => Reader::open(&config.resolved_path(data_dir)),
        }
    }

    /// The SQLite file, when the store is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Reader::Sqlite(r) => Some(r.path()),
            Reader::Postgres(_) => None,
        }
    }

    /// The file or the database URL, for messages.
    pub fn location(&self) -> String {
        match self {
            Reader::Sqlite(r) => r.path().display().to_string(),
            Reader::Postgres(r) => r.url().to_owned(),
        }
    }

    /// See [`SqliteReader::with_split_at`]; a PostgreSQL reader does not split queries.
    pub fn with_split_at(self, records: usize) -> Reader {
        match self {
            Reader::Sqlite(r) => Reader::Sqlite(r.with_split_at(records)),
            other => other,
        }
    }

    /// The same reader, whose queries `cancel` can stop.
    pub fn cancellable(&self, cancel: Cancel) -> Reader {
        match self {
            Reader::Sqlite(r) => Reader::Sqlite(r.cancellable(cancel)),
            Reader::Postgres(r) => Reader::Postgres(r.cancellable(cancel)),
        }
    }

    /// One page, newest first.
    pub fn query(&self, query: &LogQuery) -> Result<Page, StoreError> {
        match self {
            Reader::Sqlite(r) => r.query(query),
            Reader::Postgres(r) => r.query(query),
        }
    }

    /// Everything recorded about one message, oldest first.
    pub fn trace(&self, id: &str) -> Result<Trace, StoreError> {
        match self {
            Reader::Sqlite(r) => r.trace(id),
            Reader::Postgres(r) => r.trace(id),
        }
    }

    /// How many records the store holds.
    pub fn count(&self) -> Result<u64, StoreError> {
        match self {
            Reader::Sqlite(r) => r.count(),
            Reader::Postgres(r) => r.count(),
        }
    }

    /// The database's plan for a query.
    pub fn explain(&self, query: &LogQuery) -> Result<String, StoreError> {
        match self {
            Reader::Sqlite(r) => r.explain(query),
            Reader::Postgres(r) => r.explain(query),
        }
    }

    /// The rows of a stats query: records counted by bucket, key and code (see
    /// [`crate::outcome::stats`], which assembles and caches them).
    pub fn counts(&self, query: &StatsQuery) -> Result<Vec<CountRow>, StoreError> {
        match self {
            Reader::Sqlite(r) => r.counts(query),
            Reader::Postgres(r) => r.counts(query),
        }
    }

    /// The database's plan for a stats query.
    pub fn explain_counts(&self, query: &StatsQuery) -> Result<String, StoreError> {
        match self {
            Reader::Sqlite(r) => r.explain_counts(query),
            Reader::Postgres(r) => r.explain_counts(query),
        }
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

#[cfg(test)]
mod tests {
    use super::super::testing::{Backend, base, filled, filled_on};
    use super::*;
    use crate::outcome::query::{LogParams, Status};

    #[tokio::test]
    async fn a_cancelled_reader_stops_and_the_pool_is_unharmed() {
        a_cancelled_reader_stops_on(Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn a_cancelled_reader_stops_on_postgres() {
        a_cancelled_reader_stops_on(Backend::Postgres).await;
    }

    async fn a_cancelled_reader_stops_on(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let Some((_store, reader, _db)) = filled_on(backend, dir.path(), 25).await else {
            return;
        };
        let cancel = Cancel::default();
        let cancellable = reader.cancellable(cancel.clone());
        assert_eq!(
            cancellable
                .query(&LogQuery::default())
                .unwrap()
                .records
                .len(),
            25
        );
        cancel.cancel();
        let e = cancellable.query(&LogQuery::default()).unwrap_err();
        assert!(e.to_string().contains("cancelled"), "{e}");
        assert!(cancellable.trace("nope").is_err());
        let counts = StatsQuery {
            from_ms: 0,
            to_ms: i64::MAX,
            bucket_ms: 60_000,
            by: crate::outcome::query::GroupBy::Code,
            status: None,
            service_type: None,
        };
        let e = cancellable.counts(&counts).unwrap_err();
        assert!(matches!(e, StoreError::Cancelled(_)), "{e}");
        let counted: u64 = reader.counts(&counts).unwrap().iter().map(|r| r.3).sum();
        assert_eq!(counted, 25);
        // The connections went back to the pool uninterrupted; the plain reader still reads.
        assert_eq!(
            reader.query(&LogQuery::default()).unwrap().records.len(),
            25
        );
        assert_eq!(reader.count().unwrap(), 25);
    }

    #[tokio::test]
    async fn writes_queries_and_pages() {
        writes_queries_and_pages_on(Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn writes_queries_and_pages_on_postgres() {
        writes_queries_and_pages_on(Backend::Postgres).await;
    }

    async fn writes_queries_and_pages_on(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let Some((store, reader, _db)) = filled_on(backend, dir.path(), 25).await else {
            return;
        };
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
        // A device or a product: its lookup rows walked in order (no sort), merged with the
        // tail read by id (sorted, at most INDEX_RUN records).
        for (params, table) in [
            (vec![("device", "d1"), ("since", "1h")], "by_device"),
            (vec![("product", "p1")], "by_product"),
            (vec![("device", "d1"), ("product", "p1")], "by_device"),
        ] {
            let q = LogParams::from_pairs(params.iter().map(|(k, v)| (*k, v.to_string())))
                .unwrap()
                .validate(crate::message::now_ms())
                .unwrap();
            let plan = reader.explain(&q).unwrap();
            let (left, right) = plan.split_once("RIGHT").expect("two parts");
            assert!(left.contains("MERGE (UNION ALL)"), "{params:?}: {plan}");
            assert!(
                left.contains(&format!("SEARCH {table} USING PRIMARY KEY")),
                "{params:?}: {plan}"
            );
            assert!(!left.contains("TEMP B-TREE"), "{params:?} sorts: {plan}");
            assert!(
                right.contains("SEARCH records USING INTEGER PRIMARY KEY (rowid>?)"),
                "{params:?}: {plan}"
            );
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

    /// A device's or a product's pages through the lookup rows and the tail are the pages a
    /// plain filter on `records` gives, for every split between the two (the store's lookup
    /// rows lag by up to 7 records here), with times out of order, every page size, and the
    /// other filters on top.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookup_rows_and_tail_give_the_pages_a_plain_filter_gives() {
        use super::super::testing::{record, test_options};
        use crate::outcome::Code;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let store = super::super::Store::open(&path, test_options(), None).unwrap();
        let tx = store.sender();
        let mut i = 0;
        for round in [40, 23, 4] {
            for _ in 0..round {
                let code = if i % 5 == 0 {
                    Code::DestinationUnavailable
                } else {
                    Code::Ok
                };
                let mut r = record(i, base() + (i as i64 * 7919) % 67, code);
                r.device_name = format!("d{}", i % 5);
                r.product_key = format!("p{}", i % 3);
                tx.send(r).await.unwrap();
                i += 1;
            }
            store.flush().await.unwrap();
        }
        let raw = Connection::open(&path).unwrap();
        let (through, max): (i64, i64) = raw
            .query_row(
                "SELECT (SELECT through FROM indexed), max(id) FROM records",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert!(0 < through && through < max, "through {through} of {max}");
        let Reader::Sqlite(tables) = store.reader().unwrap() else {
            unreachable!()
        };
        assert_eq!(tables.layout, Layout::KeyTables);
        let plain = tables.clone().with_layout(Layout::Indexes);
        let pages = |reader: &SqliteReader, q: &LogQuery| {
            let mut all = Vec::new();
            let mut q = q.clone();
            loop {
                let page = reader.query(&q).unwrap();
                all.push(
                    page.records
                        .iter()
                        .map(|r| r.message_id.clone())
                        .collect::<Vec<_>>(),
                );
                match page.next_cursor {
                    Some(c) => q.cursor = Some(c),
                    None => return all,
                }
            }
        };
        let mut compared = 0;
        let devices = [
            None,
            Some("d0"),
            Some("d1"),
            Some("d2"),
            Some("d3"),
            Some("d4"),
            Some("x"),
        ];
        for device in devices {
            for product in [None, Some("p0"), Some("p1"), Some("p2"), Some("p9")] {
                if device.is_none() && product.is_none() {
                    continue;
                }
                for (status, from) in [(None, None), (Some(Status::Failed), Some(base() + 30))] {
                    for limit in [1, 3, 50] {
                        let q = LogQuery {
                            device: device.map(str::to_owned),
                            product: product.map(str::to_owned),
                            status,
                            from_ms: from,
                            limit,
                            ..LogQuery::default()
                        };
                        let expected = pages(&plain, &q);
                        assert_eq!(pages(&tables, &q), expected, "{q:?}");
                        compared += expected.iter().map(Vec::len).sum::<usize>();
                    }
                }
            }
        }
        assert!(compared > 500, "only {compared} records compared");
        store.shutdown().await;
    }

    #[tokio::test]
    async fn reader_refuses_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Reader::open(&dir.path().join("nope.db")).err().unwrap();
        assert!(e.to_string().starts_with("no record store at "), "{e}");
    }
}
