//! [`Hub`]: every consumer group of this daemon, by id.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::auth;
use super::backlog::Backend;
use super::delivery::{Delivery, RejectedDelivery};
use super::group::Group;
use crate::broker::Broker;
use crate::config::subscription::GroupConfig;
use crate::outcome::{Failure, Outcomes};
use crate::spool::Spool;
use crate::telemetry::GroupMetrics;

/// Every consumer group of this daemon.
pub struct Hub {
    groups: HashMap<String, Arc<Group>>,
    pub metrics: GroupMetrics,
    pub verifier: Arc<auth::Verifier>,
}

impl Hub {
    /// Builds the groups; their secrets are resolved now, so a missing one stops the start.
    /// Deliveries that end without a consumer accepting them are sent to `rejects` (a reject
    /// of a rule without an error action, `has_error_action(rule)`, goes to the group's own
    /// `dead_letter_exchange` first when it has one).
    /// Backlogs live in `broker`'s queues, else in `spool`, else in memory.
    pub fn new(
        configs: &[GroupConfig],
        broker: Option<Arc<Broker>>,
        spool: Option<&Spool>,
        outcomes: Outcomes,
        metrics: GroupMetrics,
        rejects: mpsc::UnboundedSender<RejectedDelivery>,
        has_error_action: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> Result<Hub, String> {
        let mut groups = HashMap::new();
        let mut creds = HashMap::new();
        for c in configs {
            let secret = c.secret()?;
            creds.insert(
                c.id.clone(),
                auth::GroupCredentials {
                    access_key_id: c.access_key_id.clone(),
                    secret,
                    instance_id: c.instance.clone(),
                },
            );
            groups.insert(
                c.id.clone(),
                Arc::new(Group::new(
                    c.clone(),
                    Backend::for_group(&c.id, broker.as_ref(), spool),
                    outcomes.clone(),
                    metrics.clone(),
                    rejects.clone(),
                    Arc::clone(&has_error_action),
                )),
            );
        }
        Ok(Hub {
            groups,
            metrics,
            verifier: Arc::new(auth::Verifier::new(creds)),
        })
    }

    pub fn group(&self, id: &str) -> Option<&Arc<Group>> {
        self.groups.get(id)
    }

    /// Reads every group's secret again from its `secret_env` or `secret_file` (never creating
    /// the file) and swaps in those that changed: the names of the rotated groups, or, per
    /// group whose secret cannot be read, why (that group keeps its running secret).
    pub fn reload_secrets(&self) -> (Vec<String>, Vec<String>) {
        let (mut rotated, mut errors) = (Vec::new(), Vec::new());
        let mut ids: Vec<&String> = self.groups.keys().collect();
        ids.sort();
        for id in ids {
            let mut config = self.groups[id].config.clone();
            config.create_secret = false;
            match config.secret() {
                Ok(secret) => {
                    if self.verifier.rotate_secret(id, secret) {
                        rotated.push(id.clone());
                    }
                }
                Err(e) => errors.push(format!("{e} (group {id:?} keeps its running secret)")),
            }
        }
        (rotated, errors)
    }

    pub fn groups(&self) -> impl Iterator<Item = &Arc<Group>> {
        self.groups.values()
    }

    /// Takes back every spool-backed group's backlog (see [`Group::restore`]): how many
    /// messages, in all. Messages the spool holds for a group that is not configured (any
    /// more) are left there, with a warning.
    pub async fn restore(&self) -> Result<usize, String> {
        if let Some(spool) = self.groups.values().find_map(|g| g.backend.spool()) {
            let held = spool.backlog_groups().await.map_err(|e| e.to_string())?;
            for (id, n) in held.iter().filter(|(id, _)| !self.groups.contains_key(id)) {
                tracing::warn!(
                    group = %id,
                    messages = n,
                    spool = %spool.path().display(),
                    "the spool holds messages of a consumer group that is not configured; they wait there until a [[group]] with this id is configured again"
                );
            }
        }
        let mut restored = 0;
        for g in self.groups.values() {
            let n = g.restore().await?;
            if n > 0 {
                tracing::info!(group = %g.config.id, messages = n, "backlog taken back from the spool; redelivering");
            }
            restored += n;
        }
        Ok(restored)
    }

    /// Hands one rule output to group `id` (the `to = "group"` action).
    pub async fn enqueue(&self, id: &str, d: Delivery) -> Result<(), Failure> {
        match self.groups.get(id) {
            Some(g) => g.enqueue(d).await,
            None => Err(Failure::not_available(format!(
                "no consumer group {id:?} is configured (add a [[group]] with id = {id:?})"
            ))),
        }
    }

    /// Per group, for `GET /api/v1/health` (see [`Group::status`]), by group id.
    pub fn status(&self) -> Vec<serde_json::Value> {
        let mut out: Vec<_> = self.groups.values().map(|g| g.status()).collect();
        out.sort_by(|a, b| a["group"].as_str().cmp(&b["group"].as_str()));
        out
    }
}

/// Finds the current version of a rule by name (rules are hot-reloaded).
pub type RuleLookup = Arc<dyn Fn(&str) -> Option<Arc<crate::rules::Rule>> + Send + Sync>;
