//! `[store]`: the embedded record store of outcome records and their JSON-lines copy.
//!
//! Every step of every message writes one outcome record (see docs/logs.md). The store
//! keeps them in an SQLite file (WAL mode) so `iotfwd logs` and `GET /api/v1/logs` can answer
//! "what happened to this message, and why?"; `jsonl` additionally writes each record as one
//! JSON line for shipping to Loki, Elasticsearch or ClickHouse.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::report::{Reporter, Seg};

/// `[store]`: the embedded record store.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct StoreConfig {
    /// Keep outcome records in the embedded store, queryable with `iotfwd logs` and
    /// `GET /api/v1/logs`. When false, records still go to the diagnostic log, the metrics and
    /// `jsonl`, and the query endpoint answers that the store is disabled. Default `true`.
    pub enabled: bool,
    /// Where the records live: `"sqlite"` (one file beside the daemon, `path`) or
    /// `"postgres"` (a PostgreSQL database at `url`, shared by every process of a cluster; see
    /// docs/cluster.md). Default `"sqlite"`.
    pub backend: StoreBackend,
    /// With `backend = "postgres"`: `postgres://user@host:5432/db`. Required then. A password
    /// goes in `password_env`, not here. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// With `backend = "postgres"`: the environment variable holding the password, if the
    /// server wants one. Never logged. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// `[store.tls]`, with `backend = "postgres"`: connect over TLS (required, never a plain
    /// fallback), trusting `ca_file` (default: the system's roots) and checking the server's
    /// certificate against the url's host; `cert` and `key` for a server that asks for a client
    /// certificate. The same keys as `[broker.tls]`. Absent: no TLS. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::ClientTls>,
    /// The SQLite file. Relative paths are relative to the daemon's working directory, like
    /// `data.dir`. Unset means `<data.dir>/outcomes.db`. Its `-wal` and `-shm` companions sit
    /// beside it. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Records older than this many days are deleted in the background (checked at start and
    /// then every 10 minutes, in small chunks so writing never stalls). Range 1..=3650.
    /// Default `7`.
    pub retention_days: u32,
    /// Most records the writer commits in one transaction. The writer takes whatever is queued,
    /// up to this many, so a quiet daemon commits each record at once and a busy one amortizes
    /// the commit over a large batch (fewer index pages rewritten per record). Range
    /// 1..=100000. Default `16384`.
    pub batch_max_records: usize,
    /// Fewest milliseconds between two commits of a partial batch. A record that arrives when
    /// the last commit is older than this is committed at once (a quiet daemon's records are
    /// visible immediately); under load the writer gathers records for up to this long, so it
    /// commits a few large transactions per second instead of many small ones that each
    /// rewrite the same index pages. A full batch (`batch_max_records`) commits at once. `0`
    /// commits whatever is queued as soon as the writer is free. Range 0..=5000. Default
    /// `100`.
    pub commit_interval_ms: u64,
    /// `commit_interval_ms` while a source waits for a commit to acknowledge a message
    /// (`durability = "acked"`): the added answer time is at most about this plus one commit.
    /// Shorter answers sooner but commits more often (more disk writes). Values above
    /// `commit_interval_ms` act as `commit_interval_ms`. Range 0..=5000. Default `10`.
    pub ack_commit_interval_ms: u64,
    /// The write-ahead log is copied into the store file once it holds this many MiB. Each
    /// copy ends with an fsync, and a broker on the same disk waits behind it (its publisher
    /// confirms slow down): smaller spreads the writes, larger copies each index page fewer
    /// times (faster bulk inserts). Range 1..=1024. Default `16`.
    pub checkpoint_mib: u32,
    /// Records that may wait for the writer. When the queue is full, the steps that record
    /// outcomes wait (backpressure that slows intake) instead of records being dropped.
    /// At least `batch_max_records`, at most 10000000. Default `65536`.
    pub queue_capacity: usize,
    /// Where the JSON-lines copy of every record goes (one object per line, the platform's
    /// field names): `"none"`, `"stdout"`, or a file path (appended to; created if missing,
    /// its directory must exist). Independent of `enabled`. Default `"none"`.
    pub jsonl: JsonlTarget,
    /// Record-store reads (`GET /api/v1/logs`, `/trace/{id}`, `/stats`) run at once; one more
    /// is answered 429 at once. Each keyword query may use several scan threads, so this
    /// bounds the cores that readers can hold. Range 1..=256. Default `4`.
    pub max_concurrent_queries: usize,
    /// How long a record-store read may take, in milliseconds; a slower one is answered 503
    /// (and a log query or trace is interrupted). Range 100..=600000. Default `10000`.
    pub query_timeout_ms: u64,
    /// When a source message is acknowledged (the HTTP response, the AMQP ack) relative to its
    /// records. `"acked"`: only after the records of its steps so far are committed to the
    /// store (or, when the store is disabled, written and flushed to the `jsonl` file), so a
    /// crash never loses the records of an acknowledged message; commits are shared by every
    /// message waiting, so this adds about `ack_commit_interval_ms` plus one commit to the
    /// answer. A commit that fails is answered 503 (HTTP) or nacked with requeue (RabbitMQ).
    /// `"async"`: at once; the newest records (up to `queue_capacity` plus one batch) are lost
    /// if the process crashes. Default `"acked"`.
    pub durability: Durability,
}

/// `store.backend`: which database holds the records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One SQLite file per process (the embedded default).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by a cluster.
    Postgres,
}

/// `store.durability`: whether acknowledgements wait for the records' commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// A source message is acknowledged after its records are committed.
    #[default]
    Acked,
    /// A source message is acknowledged without waiting for its records.
    Async,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            enabled: true,
            backend: StoreBackend::Sqlite,
            url: None,
            password_env: None,
            tls: None,
            path: None,
            retention_days: 7,
            batch_max_records: 16_384,
            commit_interval_ms: 100,
            ack_commit_interval_ms: 10,
            checkpoint_mib: 16,
            queue_capacity: 65_536,
            jsonl: JsonlTarget::None,
            max_concurrent_queries: 4,
            query_timeout_ms: 10_000,
            durability: Durability::Acked,
        }
    }
}

impl StoreConfig {
    /// The SQLite file: `path`, or `<data_dir>/outcomes.db` when unset.
    pub fn resolved_path(&self, data_dir: &Path) -> PathBuf {
        match &self.path {
            Some(path) => path.clone(),
            None => data_dir.join("outcomes.db"),
        }
    }

    /// Reports every problem of `[store]` into `r`.
    pub(super) fn validate(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("store"), Seg::Key(key)];
        if let Some(path) = &self.path
            && path.as_os_str().is_empty()
        {
            r.report(
                &[&at("path")],
                "must not be empty (leave it out for <data.dir>/outcomes.db)".to_owned(),
            );
        }
        self.validate_backend(r);
        r.in_range(
            &at("retention_days"),
            self.retention_days,
            1..=3650,
            " days",
        );
        r.in_range(
            &at("batch_max_records"),
            self.batch_max_records,
            1..=100_000,
            "",
        );
        r.in_range(
            &at("commit_interval_ms"),
            self.commit_interval_ms,
            0..=5000,
            " ms",
        );
        r.in_range(
            &at("ack_commit_interval_ms"),
            self.ack_commit_interval_ms,
            0..=5000,
            " ms",
        );
        r.in_range(&at("checkpoint_mib"), self.checkpoint_mib, 1..=1024, " MiB");
        r.in_range(
            &at("max_concurrent_queries"),
            self.max_concurrent_queries,
            1..=256,
            "",
        );
        r.in_range(
            &at("query_timeout_ms"),
            self.query_timeout_ms,
            100..=600_000,
            " ms",
        );
        if self.queue_capacity > 10_000_000 {
            r.report(
                &[&at("queue_capacity")],
                format!(
                    "{} is out of range (expected at most 10000000)",
                    self.queue_capacity
                ),
            );
        } else if self.queue_capacity < self.batch_max_records.max(1) {
            r.report(
                &[&at("queue_capacity"), &at("batch_max_records")],
                format!(
                    "{} is smaller than store.batch_max_records ({}); the queue must hold at \
                     least one full batch",
                    self.queue_capacity, self.batch_max_records
                ),
            );
        }
        if let JsonlTarget::File(path) = &self.jsonl
            && path.as_os_str().is_empty()
        {
            r.report(
                &[&at("jsonl")],
                "must be \"none\", \"stdout\" or a file path, not empty".to_owned(),
            );
        }
    }
}

impl StoreConfig {
    /// `backend`, `url`, `password_env` and `tls` agree.
    fn validate_backend(&self, r: &mut Reporter<'_>) {
        let at = |key: &'static str| [Seg::Key("store"), Seg::Key(key)];
        match (&self.tls, self.backend) {
            (Some(_), StoreBackend::Sqlite) => r.report(
                &[&at("tls")],
                "is only for backend = \"postgres\" (TLS to the PostgreSQL server; the SQLite \
                 file is local)"
                    .to_owned(),
            ),
            (Some(tls), StoreBackend::Postgres) => {
                super::tls::validate_client_files("store", tls, r);
            }
            (None, _) => {}
        }
        match (self.backend, &self.url) {
            (StoreBackend::Sqlite, Some(_)) => r.report(
                &[&at("url")],
                "is only for backend = \"postgres\" (the SQLite file is store.path)".to_owned(),
            ),
            (StoreBackend::Sqlite, None) if self.password_env.is_some() => r.report(
                &[&at("password_env")],
                "is only for backend = \"postgres\"".to_owned(),
            ),
            (StoreBackend::Postgres, None) => r.report(
                &[&at("backend")],
                "\"postgres\" needs store.url (e.g. \"postgres://iotfwd@127.0.0.1:5432/iotfwd\")"
                    .to_owned(),
            ),
            (StoreBackend::Postgres, Some(url)) => {
                if self.path.is_some() {
                    r.report(
                        &[&at("path")],
                        "is only for backend = \"sqlite\" (the records are in store.url)"
                            .to_owned(),
                    );
                }
                match url::Url::parse(url) {
                    Ok(u) if u.scheme() == "postgres" || u.scheme() == "postgresql" => {
                        if u.password().is_some() {
                            r.report(
                                &[&at("url")],
                                "holds a password: put it in the environment variable named by \
                                 store.password_env instead"
                                    .to_owned(),
                            );
                        }
                        if u.host_str().unwrap_or("").is_empty() {
                            r.report(&[&at("url")], "has no host".to_owned());
                        }
                        if u.path().trim_start_matches('/').is_empty() {
                            r.report(
                                &[&at("url")],
                                "names no database (e.g. \"postgres://iotfwd@127.0.0.1:5432/iotfwd\")"
                                    .to_owned(),
                            );
                        }
                        for (key, value) in u.query_pairs() {
                            if let Some(problem) = tls_parameter(&key, &value, self.tls.is_some())
                            {
                                r.report(&[&at("url")], problem);
                            }
                        }
                    }
                    Ok(u) => r.report(
                        &[&at("url")],
                        format!(
                            "scheme {:?} is not postgres:// (e.g. \"postgres://iotfwd@127.0.0.1:5432/iotfwd\")",
                            u.scheme()
                        ),
                    ),
                    Err(e) => r.report(
                        &[&at("url")],
                        format!(
                            "{url:?} is not a URL ({e}); e.g. \"postgres://iotfwd@127.0.0.1:5432/iotfwd\""
                        ),
                    ),
                }
            }
            (StoreBackend::Sqlite, None) => {}
        }
    }
}

/// What is wrong with the TLS parameter `key=value` of `store.url`, given whether `[store.tls]`
/// is there: TLS is on exactly when `[store.tls]` is, so `sslmode` may only repeat that
/// (`require` with it, `disable` without), and the file parameters of libpq are keys of
/// `[store.tls]`. `None` for any other parameter.
fn tls_parameter(key: &str, value: &str, tls: bool) -> Option<String> {
    let file_key = match key {
        "sslmode" => {
            return match (value, tls) {
                ("require", true) | ("disable", false) => None,
                (_, true) => Some(format!(
                    "sslmode={value}: with [store.tls] the connection always uses TLS and checks \
                     the server's certificate and host name (as libpq's verify-full); leave \
                     sslmode out"
                )),
                ("require" | "verify-ca" | "verify-full", false) => Some(format!(
                    "sslmode={value} asks for TLS: add a [store.tls] table (empty: trust the \
                     system's root certificates; ca_file for a private CA) and leave sslmode out"
                )),
                (_, false) => Some(format!(
                    "sslmode={value}: the connection uses TLS exactly when [store.tls] is given \
                     (and then always); leave sslmode out"
                )),
            };
        }
        "sslrootcert" => "ca_file",
        "sslcert" => "cert",
        "sslkey" => "key",
        _ => return None,
    };
    Some(format!(
        "{key} is not read from the url: give the file as store.tls.{file_key}"
    ))
}

/// Where the JSON-lines copy of the records goes. Written in the config as a string:
/// `"none"`, `"stdout"`, or a file path (write `"./none"` for a file really named `none`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JsonlTarget {
    /// No JSON lines.
    #[default]
    None,
    /// The daemon's standard output (its diagnostic log goes to standard error).
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

impl JsonlTarget {
    /// Parses the config's string form.
    pub fn parse(s: &str) -> JsonlTarget {
        match s {
            "none" => JsonlTarget::None,
            "stdout" => JsonlTarget::Stdout,
            path => JsonlTarget::File(PathBuf::from(path)),
        }
    }
}

impl fmt::Display for JsonlTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonlTarget::None => f.write_str("none"),
            JsonlTarget::Stdout => f.write_str("stdout"),
            JsonlTarget::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Serialize for JsonlTarget {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for JsonlTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = JsonlTarget;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"none\", \"stdout\" or a file path")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<JsonlTarget, E> {
                Ok(JsonlTarget::parse(v))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::report::messages;

    #[test]
    fn defaults() {
        let c = StoreConfig::default();
        assert!(c.enabled);
        assert_eq!(c.retention_days, 7);
        assert_eq!(c.jsonl, JsonlTarget::None);
        assert_eq!(c.durability, Durability::Acked);
        assert_eq!(
            c.resolved_path(Path::new("data")),
            PathBuf::from("data/outcomes.db")
        );
        assert!(messages(|r| c.validate(r)).is_empty());
    }

    #[test]
    fn a_postgres_backend_needs_a_url_without_a_password() {
        let parse = |text: &str| {
            crate::config::Config::from_toml_str(text, None).map_err(|e| {
                e.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        };
        let c =
            parse("[store]\nbackend = \"postgres\"\nurl = \"postgres://u@h:5432/db\"\n").unwrap();
        assert_eq!(c.store.backend, StoreBackend::Postgres);
        assert_eq!(StoreConfig::default().backend, StoreBackend::Sqlite);
        let e = parse("[store]\nbackend = \"postgres\"\n").unwrap_err();
        assert!(e.contains("store.url"), "{e}");
        let e =
            parse("[store]\nbackend = \"postgres\"\nurl = \"postgres://u:pw@h/db\"\n").unwrap_err();
        assert!(e.contains("password_env") && e.contains(":3"), "{e}");
        let e = parse("[store]\nbackend = \"postgres\"\nurl = \"mysql://u@h/db\"\n").unwrap_err();
        assert!(e.contains("not postgres://"), "{e}");
        let e = parse("[store]\nurl = \"postgres://u@h/db\"\n").unwrap_err();
        assert!(e.contains("only for backend"), "{e}");
        let e = parse("[store]\nbackend = \"mongo\"\n").unwrap_err();
        assert!(e.contains("sqlite") && e.contains("postgres"), "{e}");
    }

    /// `[store.tls]` turns TLS on; it is for PostgreSQL only, checked like the other client
    /// tables, and the url's `sslmode` and libpq file parameters may not say otherwise.
    #[test]
    fn store_tls_is_for_postgres_and_the_url_agrees_with_it() {
        let errors = |text: &str| crate::config::errors_of(text);
        let pg = |url: &str, tls: &str| {
            errors(&format!(
                "[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n{tls}"
            ))
        };
        let tls = "[store.tls]\nca_file = \"/ca.pem\"\n";
        assert!(pg("postgres://u@h/db", tls).is_empty());
        assert!(pg("postgres://u@h/db", "[store.tls]\n").is_empty());
        assert!(pg("postgres://u@h/db?sslmode=require", tls).is_empty());
        assert!(pg("postgres://u@h/db?sslmode=disable", "").is_empty());
        assert!(pg("postgres://u@h/db?channel_binding=require", tls).is_empty());

        let e = errors("[store]\n[store.tls]\nca_file = \"/ca.pem\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("config:2:1: store.tls: is only for backend = \"postgres\""),
            "{e:?}"
        );
        let e = pg(
            "postgres://u@h/db",
            "[store.tls]\ncert = \"/c.pem\"\nca_file = \"\"\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("config:6:11: store.tls.ca_file: must not be empty"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("config:5:8: store.tls.cert: a client certificate needs its key"),
            "{e:?}"
        );

        let e = pg("postgres://u@h/db?sslmode=require", "");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "config:3:7: store.url: sslmode=require asks for TLS: add a [store.tls]"
            ),
            "{e:?}"
        );
        for mode in ["disable", "prefer", "verify-full"] {
            let e = pg(&format!("postgres://u@h/db?sslmode={mode}"), tls);
            assert_eq!(e.len(), 1, "{mode}: {e:?}");
            assert!(
                e[0].contains(&format!("store.url: sslmode={mode}: with [store.tls]"))
                    && e[0].contains("leave sslmode out"),
                "{e:?}"
            );
        }
        let e = pg("postgres://u@h/db?sslmode=prefer", "");
        assert!(e[0].contains("exactly when [store.tls] is given"), "{e:?}");
        let e = pg("postgres://u@h/db?sslrootcert=/ca.pem&sslkey=/k.pem", tls);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].contains(
                "sslrootcert is not read from the url: give the file as store.tls.ca_file"
            ),
            "{e:?}"
        );
        assert!(e[1].contains("store.tls.key"), "{e:?}");
    }

    #[test]
    fn jsonl_target_forms() {
        #[derive(Deserialize, Serialize)]
        struct T {
            jsonl: JsonlTarget,
        }
        for (text, target) in [
            ("none", JsonlTarget::None),
            ("stdout", JsonlTarget::Stdout),
            (
                "/var/log/iotfwd/outcomes.jsonl",
                JsonlTarget::File("/var/log/iotfwd/outcomes.jsonl".into()),
            ),
        ] {
            let toml_text = format!("jsonl = {text:?}\n");
            let t: T = toml::from_str(&toml_text).unwrap();
            assert_eq!(t.jsonl, target);
            assert_eq!(toml::to_string(&t).unwrap(), toml_text);
        }
        assert!(toml::from_str::<T>("jsonl = 1\n").is_err());
    }

    #[test]
    fn durability_is_acked_or_async_and_a_typo_names_both() {
        let parse = |text: &str| crate::config::Config::from_toml_str(text, None);
        assert_eq!(
            parse("[store]\ndurability = \"async\"\n")
                .unwrap()
                .store
                .durability,
            Durability::Async
        );
        assert_eq!(
            parse("[store]\ndurability = \"acked\"\n")
                .unwrap()
                .store
                .durability,
            Durability::Acked
        );
        let errors = parse("[store]\ndurability = \"sync\"\n").unwrap_err();
        let text = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            text.contains("durability") && text.contains("acked") && text.contains("async"),
            "{text}"
        );
        assert!(text.starts_with("config:2:"), "{text}");
    }

    #[test]
    fn every_problem_is_reported() {
        let c = StoreConfig {
            enabled: true,
            backend: StoreBackend::Sqlite,
            url: None,
            password_env: None,
            tls: None,
            path: Some(PathBuf::new()),
            retention_days: 0,
            batch_max_records: 0,
            commit_interval_ms: 5001,
            ack_commit_interval_ms: 5001,
            checkpoint_mib: 0,
            queue_capacity: 0,
            jsonl: JsonlTarget::File(PathBuf::new()),
            max_concurrent_queries: 0,
            query_timeout_ms: 0,
            durability: Durability::Async,
        };
        let problems = messages(|r| c.validate(r));
        let keys: Vec<&str> = problems
            .iter()
            .map(|m| m.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "store.path",
                "store.retention_days",
                "store.batch_max_records",
                "store.commit_interval_ms",
                "store.ack_commit_interval_ms",
                "store.checkpoint_mib",
                "store.max_concurrent_queries",
                "store.query_timeout_ms",
                "store.queue_capacity",
                "store.jsonl"
            ]
        );
        let c = StoreConfig {
            batch_max_records: 4096,
            queue_capacity: 1000,
            ..StoreConfig::default()
        };
        let problems = messages(|r| c.validate(r));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("smaller than store.batch_max_records"));
    }
}
