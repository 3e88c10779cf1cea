//! Consumer groups: the platform's server-side subscription, hosted by iotfwd.
//!
//! A `to = "group"` action hands the rule output to its group ([`Hub::enqueue`]). The group
//! keeps a backlog (bounded, on disk in the spool, or a durable RabbitMQ queue when
//! `[broker]` is set) and
//! pushes each message to exactly one of its consumer connections, round robin over those
//! with room in their window; with `ordering = "device"` a device's messages go one at a time
//! to the device's own connection ([`device_order`]). A delivery stays unsettled until the
//! consumer settles it:
//!
//! | consumer outcome | code | then |
//! |---|---|---|
//! | Accepted | 200 | done |
//! | Released, Modified | 9651 | redelivered; after `max_redeliveries` hand-overs, dead-lettered |
//! | Rejected | 9652 | the rule's error action, else the group's dead-letter exchange, else the dead-letter queue |
//! | none within `ack_timeout_ms` | 9650 | redelivered, to another consumer when there is one; after `max_redeliveries`, dead-lettered |
//! | consumer disconnects | — | redelivered |
//!
//! Every outcome is a `ServerSubscribe` record. A forward while no consumer is online is 9203
//! and waits in the backlog. The AMQP 1.0 side lives in [`endpoint`].

pub mod auth;
mod backlog;
mod delivery;
mod device_order;
pub mod endpoint;
mod frames;
pub mod gate;
mod group;
mod hub;

pub use delivery::{Delivery, PROPERTIES, RejectedDelivery};
pub use group::{Group, Membership, Pending, Settlement};
pub use hub::{Hub, RuleLookup};

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::broker::Broker;
use crate::outcome::Outcomes;
use crate::telemetry::GroupMetrics;

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The running endpoint: the groups, and how to stop it.
pub struct Running {
    pub hub: Arc<Hub>,
    /// Where the endpoint listens; `None` when no group is configured.
    pub addr: Option<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    rejects: Option<mpsc::UnboundedReceiver<RejectedDelivery>>,
}

/// Whether the endpoint needs a listener: `[subscription]` is enabled and some `[[group]]`
/// exists (with none, nobody could log in, so the port is not taken).
pub fn wants_listener(config: &crate::config::Config) -> bool {
    config.subscription.enabled && !config.group.is_empty()
}

/// Builds the groups and starts the AMQP 1.0 endpoint on `listener` when `[subscription]` is
/// enabled (see [`wants_listener`]; the caller binds `subscription.listen`, or port 0 in
/// tests). Without a broker, backlogs live in `spool` (and what it held is taken back and
/// redelivered), or in memory when there is none. Fails (and the daemon does not start) on
/// a missing secret, unreadable TLS files, an unreadable spool or a missing listener.
pub async fn start(
    config: &crate::config::Config,
    listener: Option<TcpListener>,
    broker: Option<Arc<Broker>>,
    spool: Option<crate::spool::Spool>,
    outcomes: Outcomes,
    metrics: GroupMetrics,
    rules: RuleLookup,
) -> anyhow::Result<Option<Running>> {
    let sub = &config.subscription;
    if !sub.enabled {
        if !config.group.is_empty() {
            tracing::warn!(
                groups = config.group.len(),
                "subscription.enabled = false: consumer groups are configured but not served; to = \"group\" actions fail with 9325"
            );
        }
        return Ok(None);
    }
    let (rejects_tx, rejects_rx) = mpsc::unbounded_channel();
    let lookup = Arc::clone(&rules);
    let hub = Hub::new(
        &config.group,
        broker.clone(),
        spool.as_ref(),
        outcomes.clone(),
        metrics,
        rejects_tx,
        Arc::new(move |rule: &str| lookup(rule).is_some_and(|r| r.error_action.is_some())),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    hub.verifier.set_window_ms(sub.auth_window_ms);
    let hub = Arc::new(hub);
    if broker.is_none() {
        hub.restore().await.map_err(|e| anyhow::anyhow!(e))?;
    }
    if !wants_listener(config) {
        tracing::info!("no [[group]] configured: the AMQP 1.0 endpoint is not started");
        return Ok(Some(Running {
            hub,
            addr: None,
            stop: watch::channel(false).0,
            task: None,
            rejects: Some(rejects_rx),
        }));
    }
    let tls = endpoint::tls_acceptor(sub).map_err(|e| anyhow::anyhow!(e))?;
    let listener = listener.ok_or_else(|| {
        anyhow::anyhow!("the AMQP 1.0 endpoint has no listener (subscription.listen)")
    })?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(endpoint::serve(
        listener,
        Arc::clone(&hub),
        sub.clone(),
        tls.clone(),
        outcomes,
        stopped,
    ));
    let mut ids: Vec<&str> = config.group.iter().map(|g| g.id.as_str()).collect();
    ids.sort_unstable();
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        groups = %ids.join(", "),
        "AMQP 1.0 consumer-group endpoint listening"
    );
    match (&broker, &spool) {
        (Some(_), _) => {}
        (None, Some(spool)) => tracing::info!(
            spool = %spool.path().display(),
            "consumer-group backlogs are kept on disk (no [broker]): a restart redelivers them"
        ),
        (None, None) => tracing::warn!(
            "consumer-group backlogs are held in memory: messages waiting for a consumer do not survive a restart"
        ),
    }
    Ok(Some(Running {
        hub,
        addr: Some(addr),
        stop,
        task: Some(task),
        rejects: Some(rejects_rx),
    }))
}

impl Running {
    /// The deliveries that end without a consumer accepting them (rejected, or released or
    /// timed out `max_redeliveries` times), for whoever runs error actions and the dead-letter
    /// queue (`action::group`). Taken once.
    pub fn take_rejects(&mut self) -> Option<mpsc::UnboundedReceiver<RejectedDelivery>> {
        self.rejects.take()
    }

    /// Closes every consumer connection (9602 each) and stops listening.
    pub async fn shutdown(self, within: Duration) {
        let _ = self.stop.send(true);
        let Some(task) = self.task else { return };
        if tokio::time::timeout(within, task).await.is_err() {
            tracing::warn!("consumer connections did not close within {within:?}");
        }
    }
}
