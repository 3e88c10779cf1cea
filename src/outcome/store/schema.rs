//! The record store's file: the table and its indexes, the schema version, and how each side
//! opens a connection to it.
//!
//! One place holds what the file looks like on disk, so the writer that creates it and the
//! readers that open it cannot disagree on the schema or its version. The pragmas differ by side:
//! the writer tunes for batched commits beside a broker (WAL, `synchronous = NORMAL`, checkpoint
//! size), a reader for read-only queries that may run while the daemon writes.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::functions::register_functions;
use super::{StoreError, sqlite_err};
use crate::outcome::query::{COLUMNS, KEY_TABLES};

/// The schema version this build writes (`PRAGMA user_version`). Version 1 had B-tree indexes
/// on (device_name, time_ms) and (product_key, time_ms); version 2 keeps those lookups in
/// [`KEY_TABLES`], filled in sorted runs (see [`super::writer`]). The writer upgrades a
/// version 1 file when it opens it; a reader reads either.
pub(super) const SCHEMA_VERSION: i64 = 2;

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
CREATE INDEX IF NOT EXISTS records_time ON records (time_ms);
CREATE TABLE IF NOT EXISTS by_device (
    device TEXT NOT NULL,
    t      INTEGER NOT NULL,
    rid    INTEGER NOT NULL,
    PRIMARY KEY (device, t, rid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS by_product (
    product TEXT NOT NULL,
    t       INTEGER NOT NULL,
    rid     INTEGER NOT NULL,
    PRIMARY KEY (product, t, rid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS indexed (through INTEGER NOT NULL);
";

/// The columns a record fills, in the order [`insert_rows`] binds them.
pub(super) const INSERT_COLUMNS: usize = 13;

/// An `INSERT` of `rows` records in one statement: SQLite prepares, steps and resets a
/// statement once for all of them instead of once per record (with `rows` of 64, 13 × 64
/// parameters, far below SQLite's limit of 32 766).
/// The columns are [`COLUMNS`], the order every query reads a row in.
pub(super) fn insert_rows(rows: usize) -> String {
    let one = format!("({})", vec!["?"; INSERT_COLUMNS].join(", "));
    format!(
        "INSERT INTO records ({COLUMNS}) VALUES {}",
        vec![one; rows].join(", ")
    )
}

/// Process-wide SQLite settings, applied once before the first connection of the process
/// (SQLite takes them only before it initializes; every place that opens a SQLite file calls
/// this first: the record store's writer and readers, and the spool).
///
/// `SQLITE_CONFIG_MEMSTATUS` off: SQLite's default counts every allocation under a global
/// mutex. In a profile of a fill through the record store's writer (`perf record` during
/// `iotfwd bench logs --records 2000000`) that mutex's lock and unlock were 8% of the writer
/// thread's samples, for statistics iotfwd never reads (`sqlite3_memory_used`).
pub(crate) fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config is called before any connection in this process is opened
        // (the Once runs first wherever one is opened), with the argument
        // SQLITE_CONFIG_MEMSTATUS takes: one int. Should SQLite already be initialized (a
        // connection opened elsewhere first), it refuses with SQLITE_MISUSE and changes
        // nothing, which is only slower.
        let off: std::os::raw::c_int = 0;
        let rc =
            unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, off) };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!("SQLite was initialized before its settings: memstatus stays on");
        }
    });
}

/// The page size of a new store file, in bytes. SQLite's default is 4096; with 16 KiB pages a
/// record's row and its index entries share a page with four times as many others, so a batch
/// touches and writes fewer pages and the B-trees are a level shallower: in a fill through the
/// real write path (`iotfwd bench logs`) inserts cost less for it, and a scan reads a quarter
/// as many pages (the keyword scan over 10M records 1.9× faster; figures in
/// docs/benchmarks.md). A file keeps the page size it was created with: an
/// existing 4 KiB file stays as it is (WAL mode cannot change it; `VACUUM` with the daemon
/// stopped would).
pub(super) const PAGE_SIZE: u32 = 16_384;

/// Opens (creating if needed) the file for the one writer, creates the table and indexes, and
/// refuses a file written by a newer iotfwd. `checkpoint_mib` becomes pages of the file's own
/// page size.
pub(super) fn open_writer(path: &Path, checkpoint_mib: u32) -> Result<Connection, StoreError> {
    configure_sqlite();
    let err = sqlite_err(path);
    let conn = Connection::open(path).map_err(&err)?;
    // Only takes effect on a new, empty file: it must come before WAL mode and the first table.
    conn.execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE};"))
        .map_err(&err)?;
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
    let page_size: u32 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(&err)?;
    let checkpoint_pages = (u64::from(checkpoint_mib) << 20) / u64::from(page_size.max(512));
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
    let upgrade = version == 1;
    let started = std::time::Instant::now();
    if upgrade {
        tracing::info!(
            store = %path.display(),
            "record store: upgrading from schema version 1 to {SCHEMA_VERSION} (the device \
             and product lookups move into sorted tables; this reads every record once)"
        );
    }
    // One transaction: a crash during the upgrade leaves version 1 as it was.
    conn.execute_batch("BEGIN IMMEDIATE").map_err(&err)?;
    let created = (|| {
        conn.execute_batch(SCHEMA)?;
        let rows: i64 = conn.query_row("SELECT count(*) FROM indexed", [], |r| r.get(0))?;
        if rows == 0 {
            // A new file indexes nothing yet; a version 1 file indexes all it has.
            for (table, key, column) in KEY_TABLES {
                conn.execute_batch(&format!(
                    "INSERT INTO {table} ({key}, t, rid) \
                     SELECT {column}, time_ms, id FROM records ORDER BY 1, 2, 3"
                ))?;
            }
            conn.execute_batch(
                "INSERT INTO indexed (through) SELECT coalesce(max(id), 0) FROM records",
            )?;
        }
        conn.execute_batch(
            "DROP INDEX IF EXISTS records_device_time;
             DROP INDEX IF EXISTS records_product_time;",
        )?;
        conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
    })();
    match created {
        Ok(()) => conn.execute_batch("COMMIT").map_err(&err)?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(err(e));
        }
    }
    if upgrade {
        tracing::info!(
            store = %path.display(),
            "record store: upgraded to schema version {SCHEMA_VERSION} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(conn)
}

/// Which layout a store file has: version 2's lookup tables, or version 1's indexes (a file the
/// writer of this version has not opened yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// (device_name, time_ms) and (product_key, time_ms) B-tree indexes on `records`.
    Indexes,
    /// [`KEY_TABLES`] and `indexed.through`.
    KeyTables,
}

/// The file's layout, from its schema.
pub(super) fn layout(conn: &Connection) -> rusqlite::Result<Layout> {
    let tables: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'indexed'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(if tables.is_some() {
        Layout::KeyTables
    } else {
        Layout::Indexes
    })
}

/// Opens an existing file for a reader. A reader checks the schema version instead of creating
/// anything: a file of another version, or one without the table, is not a record store it can
/// read.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    configure_sqlite();
    let err = sqlite_err(path);
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    // Read-write (without create) so WAL readers can set up the shared-memory index; a
    // user without write access to the files still reads, read-only.
    let conn = Connection::open_with_flags(path, flags)
        .or_else(|_| {
            Connection::open_with_flags(
                path,
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
                path: path.to_owned(),
                found: version,
            });
        }
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::store::StoreConfig;
    use crate::outcome::store::StoreOptions;

    /// A file as iotfwd wrote it before schema version 2: its device and product indexes.
    const VERSION_1: &str = "
        CREATE TABLE records (
            id INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, trace_id TEXT NOT NULL,
            message_id TEXT NOT NULL, product_key TEXT NOT NULL, device_name TEXT NOT NULL,
            biz_code TEXT NOT NULL, operation TEXT NOT NULL, code INTEGER NOT NULL,
            reason TEXT NOT NULL, content TEXT NOT NULL, tenant_id TEXT NOT NULL,
            instance_id TEXT NOT NULL);
        CREATE INDEX records_message_id ON records (message_id);
        CREATE INDEX records_trace_id ON records (trace_id);
        CREATE INDEX records_device_time ON records (device_name, time_ms);
        CREATE INDEX records_product_time ON records (product_key, time_ms);
        CREATE INDEX records_time ON records (time_ms);
        PRAGMA user_version = 1;";

    /// The writer upgrades a version 1 file: its records move into the lookup tables, its
    /// device and product indexes go, and every query answers as before, also from a reader
    /// opened before the upgrade; new records follow the old ids.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_1_file_is_upgraded_and_answers_the_same() {
        use crate::outcome::Code;
        use crate::outcome::query::LogQuery;
        use crate::outcome::store::testing::{base, record};
        use crate::outcome::store::{Reader, Store};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(VERSION_1).unwrap();
            for i in 0..50 {
                let r = record(i, base() + (i as i64 * 13) % 50, Code::Ok);
                conn.execute(
                    "INSERT INTO records (time_ms, trace_id, message_id, product_key, \
                     device_name, biz_code, operation, code, reason, content, tenant_id, \
                     instance_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    rusqlite::params![
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
                        r.instance_id
                    ],
                )
                .unwrap();
            }
        }
        let queries: Vec<LogQuery> = [
            (Some("d1"), None),
            (None, Some("p0")),
            (Some("d2"), Some("p1")),
            (None, None),
        ]
        .into_iter()
        .map(|(device, product)| LogQuery {
            device: device.map(str::to_owned),
            product: product.map(str::to_owned),
            limit: 100,
            ..LogQuery::default()
        })
        .collect();
        let before = Reader::open(&path).unwrap();
        let answers = |reader: &Reader| -> Vec<Vec<String>> {
            queries
                .iter()
                .map(|q| {
                    let page = reader.query(q).unwrap();
                    page.records.into_iter().map(|r| r.message_id).collect()
                })
                .collect()
        };
        let expected = answers(&before);
        assert_eq!(expected[0].len(), 17);
        let store = Store::open(&path, Default::default(), None).unwrap();
        let conn = Connection::open(&path).unwrap();
        let (version, through, by_device, old_indexes): (i64, i64, i64, i64) = conn
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version), \
                 (SELECT through FROM indexed), (SELECT count(*) FROM by_device), \
                 (SELECT count(*) FROM sqlite_master WHERE name IN \
                  ('records_device_time', 'records_product_time'))",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!((version, through, by_device, old_indexes), (2, 50, 50, 0));
        assert_eq!(answers(&Reader::open(&path).unwrap()), expected);
        assert_eq!(answers(&before), expected);
        let tx = store.sender();
        tx.send(record(50, base() + 60, Code::Ok)).await.unwrap();
        store.flush().await.unwrap();
        let newest = Reader::open(&path).unwrap().query(&queries[3]).unwrap();
        assert_eq!(newest.records[0].message_id, "m50");
        let id: i64 = conn
            .query_row("SELECT id FROM records WHERE message_id = 'm50'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(id, 51);
        store.shutdown().await;
    }

    /// A new file gets 16 KiB pages, and `store.checkpoint_mib` reaches the writer's
    /// connection as pages of that size; a file created with 4 KiB pages keeps them, and its
    /// checkpoint is counted in its own pages.
    #[test]
    fn the_page_size_and_checkpoint_size_are_applied_to_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions::from_config(&StoreConfig {
            checkpoint_mib: 3,
            ..StoreConfig::default()
        });
        let settings = |conn: &Connection| -> (i64, i64) {
            let pages = conn
                .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
                .unwrap();
            let page_size = conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap();
            (pages, page_size)
        };
        let conn = open_writer(&dir.path().join("o.db"), options.checkpoint_mib).unwrap();
        assert_eq!(settings(&conn), (192, 16_384));
        let old = dir.path().join("old.db");
        Connection::open(&old)
            .unwrap()
            .execute_batch(&format!("{VERSION_1} PRAGMA journal_mode = WAL;"))
            .unwrap();
        let conn = open_writer(&old, options.checkpoint_mib).unwrap();
        assert_eq!(settings(&conn), (768, 4096));
    }
}
