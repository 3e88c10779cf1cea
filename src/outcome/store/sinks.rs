//! The daemon's record sinks, as `[store]` configures them: the record store and the JSON lines,
//! each optional.
//!
//! One type for the pair, so the daemon wires its sinks with one call each (open, attach,
//! shut down) and `daemon.rs` stays wiring only.
//!
//! With `store.durability = "acked"` acknowledgements wait for one sink: the store when it is
//! enabled, else the JSON lines when they go somewhere, else none (then only the diagnostic
//! log has the records, and nothing is waited for).

use std::sync::Arc;

use super::{BackendState, PgReader, PgTarget, Reader, Store, StoreOptions};
use crate::config::store::{Durability, StoreBackend};
use crate::outcome::Outcomes;
use crate::outcome::jsonl::JsonlSink;

/// The daemon's record sinks per `[store]`: the store and the JSON lines, each optional.
pub struct RecordSinks {
    store: Option<Store>,
    reader: Option<Reader>,
    jsonl: Option<JsonlSink>,
    durability: Durability,
}

impl RecordSinks {
    /// Opens what `[store]` asks for; errors name the file and the config key.
    pub async fn open(
        config: &crate::config::Config,
        metrics: &crate::telemetry::Metrics,
    ) -> anyhow::Result<RecordSinks> {
        let store_config = &config.store;
        let (store, reader) = if store_config.enabled {
            let options = StoreOptions::from_config(store_config);
            let store = match store_config.backend {
                StoreBackend::Postgres => {
                    let target = PgTarget::from_config(store_config)?;
                    Store::open_postgres(target, options, Some(metrics.store.clone())).await?
                }
                StoreBackend::Sqlite => Store::open(
                    &store_config.resolved_path(&config.data.dir),
                    options,
                    Some(metrics.store.clone()),
                )?,
            };
            // A PostgreSQL reader connects when it first queries, so a server that is down at
            // start does not keep the daemon from starting.
            let reader = match &store.postgres {
                Some(target) => Reader::Postgres(PgReader::lazy(target.clone())),
                None => store.reader()?,
            };
            tracing::info!(
                store = %store.path().display(),
                backend = store.state().backend,
                retention_days = store_config.retention_days,
                "record store open: query with `iotfwd logs` or GET /api/v1/logs"
            );
            (Some(store), Some(reader))
        } else {
            tracing::info!("record store disabled (store.enabled = false)");
            (None, None)
        };
        let jsonl = JsonlSink::open(
            &store_config.jsonl,
            store_config.queue_capacity,
            store_config.batch_max_records,
        )
        .await?;
        if jsonl.is_some() {
            tracing::info!(jsonl = %store_config.jsonl, "outcome records also as JSON lines");
        }
        let durability = store_config.durability;
        match (durability, &store, &jsonl) {
            (Durability::Async, ..) => tracing::info!(
                "store.durability = \"async\": sources acknowledge without waiting for their \
                 records; a crash loses the newest ones"
            ),
            (Durability::Acked, None, None) => tracing::info!(
                "store.durability = \"acked\" has no sink to wait for (store disabled, no jsonl)"
            ),
            (Durability::Acked, None, Some(_)) => tracing::info!(
                "store.durability = \"acked\": sources acknowledge once their records are \
                 written to the JSON lines"
            ),
            (Durability::Acked, Some(_), _) => tracing::info!(
                "store.durability = \"acked\": sources acknowledge once their records are \
                 committed to the record store"
            ),
        }
        Ok(RecordSinks {
            store,
            reader,
            jsonl,
            durability,
        })
    }

    /// `outcomes` with every open sink attached.
    pub fn attach(&self, mut outcomes: Outcomes) -> Outcomes {
        if let Some(store) = &self.store {
            outcomes = outcomes.with_sink(store.sender());
        }
        if let Some(jsonl) = &self.jsonl {
            outcomes = outcomes.with_sink(jsonl.sender());
        }
        if self.durability == Durability::Acked {
            let log = match (&self.store, &self.jsonl) {
                (Some(store), _) => Some(store.commit_log()),
                (None, Some(jsonl)) => Some(jsonl.commit_log()),
                (None, None) => None,
            };
            if let Some(log) = log {
                outcomes = outcomes.acked_by(log);
            }
        }
        outcomes
    }

    /// The store's backend and whether its database answers, when it is enabled.
    pub fn state(&self) -> Option<Arc<BackendState>> {
        self.store.as_ref().map(Store::state)
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
