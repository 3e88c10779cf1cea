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

/// The schema version this build writes (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = 1;

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

pub(super) const INSERT: &str = "INSERT INTO records (time_ms, trace_id, message_id, product_key, \
     device_name, biz_code, operation, code, reason, content, tenant_id, instance_id) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

/// Opens (creating if needed) the file for the one writer, creates the table and indexes, and
/// refuses a file written by a newer iotfwd.
pub(super) fn open_writer(path: &Path, checkpoint_pages: u32) -> Result<Connection, StoreError> {
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

/// Opens an existing file for a reader. A reader checks the schema version instead of creating
/// anything: a file of another version, or one without the table, is not a record store it can
/// read.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
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
}
