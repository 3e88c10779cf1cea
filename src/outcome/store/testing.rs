//! Test fixtures shared by the store's unit tests: records of a known shape, written through
//! the real write path.
//!
//! Records are struct literals here rather than built by the typed constructors: the tests
//! need exact times and ids, and code inside `outcome` is where a record may be built field by
//! field.

use std::path::Path;

use super::{Reader, Store, StoreOptions};
use crate::outcome::{BizCode, Code, Record};

/// Record `i` at `time_ms`: two products, three devices, and a service type that follows the
/// code.
pub(crate) fn record(i: usize, time_ms: i64, code: Code) -> Record {
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
pub(crate) fn base() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| crate::message::now_ms() - 1_000_000)
}

/// The writer's options for tests: lookup tables that lag by at most 7 records, so that even a
/// small store is read through both the lookup tables and the tail.
pub(crate) fn test_options() -> StoreOptions {
    StoreOptions {
        index_run: 7,
        ..StoreOptions::default()
    }
}

/// A store at `dir/o.db` holding records `0..n` (every fourth a 9325), committed.
pub(super) async fn filled(dir: &Path, n: usize) -> (Store, Reader) {
    let store = Store::open(&dir.join("o.db"), test_options(), None).unwrap();
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

/// The backends the store's tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A database of its own on the machine's PostgreSQL (127.0.0.1:5432, user postgres), dropped
/// when the test ends. `None` when PostgreSQL is not there: the test then skips, except under
/// `CI=true`, where a missing PostgreSQL fails it.
pub(crate) struct PgDb {
    pub(crate) url: String,
    name: String,
}

const PG_ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3";

/// Runs `sql` on the server's `postgres` database, from a thread of its own (any caller).
fn pg_admin(sql: String) -> Result<(), String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        })
    })
    .join()
    .expect("admin thread")
}

impl PgDb {
    pub(crate) fn create() -> Option<PgDb> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "iotfwd_t{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            crate::message::now_ms() % 1_000_000
        );
        match pg_admin(format!("CREATE DATABASE {name}")) {
            Ok(()) => Some(PgDb {
                url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
                name,
            }),
            Err(e) => {
                let why = format!("PostgreSQL at 127.0.0.1:5432 (scripts/ensure-postgres): {e}");
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("a tool this test needs is missing under CI: {why}");
                }
                eprintln!("\n**********\nSKIPPED: {why}\n**********\n");
                None
            }
        }
    }

    pub(crate) fn target(&self) -> super::PgTarget {
        super::PgTarget::new(&self.url, None).unwrap()
    }
}

/// An `ACCESS EXCLUSIVE` lock on the `records` table of a [`PgDb`], held by a session of its
/// own until dropped: every statement that reads the table waits for it on the server, so a
/// test gets a query that runs for as long as it wants (and that only a cancel request stops).
pub(crate) struct RecordsLock {
    _session: tokio_postgres::Client,
}

impl PgDb {
    pub(crate) fn lock_records(&self) -> RecordsLock {
        let url = self.url.clone();
        let session = super::postgres::block(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .batch_execute("BEGIN; LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
                .await
                .unwrap();
            client
        });
        RecordsLock { _session: session }
    }

    /// The statements of iotfwd's sessions on this database running now (waiting for a lock
    /// included).
    pub(crate) fn running_statements(&self) -> i64 {
        let url = self.url.clone();
        super::postgres::block(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND application_name = 'iotfwd' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0)
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = pg_admin(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// An empty store on `backend` (`dir` for SQLite's file), with `options`; the database guard
/// for PostgreSQL (keep it alive). `None` when PostgreSQL is missing outside CI.
pub(crate) async fn open_on(
    backend: Backend,
    dir: &Path,
    options: StoreOptions,
) -> Option<(Store, Option<PgDb>)> {
    match backend {
        Backend::Sqlite => Some((Store::open(&dir.join("o.db"), options, None).unwrap(), None)),
        Backend::Postgres => {
            let db = PgDb::create()?;
            let store = Store::open_postgres(db.target(), options, None)
                .await
                .unwrap();
            Some((store, Some(db)))
        }
    }
}

/// [`filled`] on `backend`.
pub(crate) async fn filled_on(
    backend: Backend,
    dir: &Path,
    n: usize,
) -> Option<(Store, Reader, Option<PgDb>)> {
    let (store, db) = open_on(backend, dir, test_options()).await?;
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
    Some((store, reader, db))
}
