//! One consumer group: its consumers, its ready queue, and how each delivery is scheduled and
//! settled (the table in the module docs of [`super`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::BasicAckOptions;
use tokio::sync::{mpsc, watch};

use super::backlog::Backend;
use super::delivery::{Delivery, RejectedDelivery};
use super::device_order::{ByDevice, Pick, device_of, preferred};
use crate::config::subscription::{GroupConfig, GroupOrdering};
use crate::outcome::{Code, Failure, GroupOutcome, Outcomes, Record};
use crate::telemetry::GroupMetrics;

/// A delivery waiting for, or out with, a consumer.
pub struct Pending {
    pub delivery: Arc<Delivery>,
    /// Times it was handed to a consumer.
    pub attempts: u32,
    /// The consumer that last had it, so a redelivery prefers another.
    pub(super) last_consumer: Option<u64>,
    /// Its RabbitMQ delivery, acked when it is settled for good (broker-backed backlog).
    pub(super) ack: Option<lapin::Acker>,
    /// Its row in the spool (spool-backed backlog), deleted when it is settled for good.
    pub(super) spool_id: Option<i64>,
    pub(super) since: Instant,
    /// When it was last handed to a consumer connection: its ACK time-out runs from here,
    /// through any wait for link credit, to the consumer's outcome.
    pub(super) handed_at: Instant,
}

impl Pending {
    /// A delivery that has not been handed to a consumer yet.
    pub(super) fn new(delivery: Arc<Delivery>, ack: Option<lapin::Acker>) -> Pending {
        Pending {
            delivery,
            attempts: 0,
            last_consumer: None,
            ack,
            spool_id: None,
            since: Instant::now(),
            handed_at: Instant::now(),
        }
    }

    /// When the consumer's outcome is due: `ack_timeout` after it was handed over.
    pub fn due(&self, ack_timeout: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.handed_at + ack_timeout)
    }
}

struct Slot {
    id: u64,
    client_id: String,
    tx: mpsc::UnboundedSender<Pending>,
    outstanding: usize,
}

#[derive(Default)]
pub(super) struct State {
    /// What waits for a consumer, in backlog order (with `ordering = "device"`, only until
    /// the next [`Group::pump`] moves it into `by_device`).
    pub(super) ready: VecDeque<Pending>,
    /// `ordering = "device"`: what waits for a consumer, per device.
    by_device: ByDevice,
    /// When `by_device` was last swept for messages past the retention.
    swept: Option<Instant>,
    /// Forwards being written to the spool: they count against `max_backlog` already.
    storing: usize,
    consumers: Vec<Slot>,
    next: usize,
    /// Stops the broker consumer feeding `ready` (broker-backed groups, while consumers are
    /// online).
    pub(super) feed: Option<watch::Sender<bool>>,
}

impl State {
    /// Messages waiting for a consumer (not out with one), held here.
    fn waiting(&self) -> usize {
        self.ready.len() + self.by_device.len()
    }

    /// Forgets the waiting copies of broker-held messages: their RabbitMQ channel is gone
    /// (or being closed), so RabbitMQ delivers them again.
    pub(super) fn drop_broker_held(&mut self) {
        self.ready.retain(|p| p.ack.is_none());
        self.by_device.remove_unless(|p| p.ack.is_none());
    }
}

/// One consumer group.
pub struct Group {
    pub config: GroupConfig,
    pub(super) state: Mutex<State>,
    pub(super) backend: Backend,
    outcomes: Outcomes,
    metrics: GroupMetrics,
    rejects: mpsc::UnboundedSender<RejectedDelivery>,
    rate: Option<governor::DefaultDirectRateLimiter>,
    has_error_action: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

/// How a delivery was settled, as the endpoint saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    Accepted,
    /// Released or Modified.
    Released,
    Rejected(String),
    Timeout,
    /// The link or connection went away before an outcome: redelivered, no record.
    Lost,
}

static NEXT_CONSUMER: AtomicU64 = AtomicU64::new(1);

/// A consumer connection's place in its group.
pub struct Membership {
    pub id: u64,
    pub group: Arc<Group>,
    pub rx: mpsc::UnboundedReceiver<Pending>,
}

impl Group {
    pub(super) fn new(
        config: GroupConfig,
        backend: Backend,
        outcomes: Outcomes,
        metrics: GroupMetrics,
        rejects: mpsc::UnboundedSender<RejectedDelivery>,
        has_error_action: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> Group {
        let rate = std::num::NonZeroU32::new(config.push_rate)
            .map(|r| governor::RateLimiter::direct(governor::Quota::per_second(r)));
        for gauge in [&metrics.connections, &metrics.backlog, &metrics.unsettled] {
            gauge.with_label_values(&[&config.id]).set(0);
        }
        Group {
            config,
            state: Mutex::new(State::default()),
            backend,
            outcomes,
            metrics,
            rejects,
            rate,
            has_error_action,
        }
    }

    /// For `GET /api/v1/health`: `state` (`unhealthy` while messages wait and no consumer is
    /// connected here, else `healthy`), connections and their client ids, the backlog
    /// (`memory`, `spool` or `broker`), the group's `ordering`, messages waiting and deliveries
    /// unsettled.
    pub fn status(&self) -> serde_json::Value {
        let st = self.lock();
        let unsettled: usize = st.consumers.iter().map(|s| s.outstanding).sum();
        let waiting = st.waiting() as u64 + self.backend.depth();
        // Messages waiting with nobody to take them is the 9203 situation.
        let state = if st.consumers.is_empty() && waiting > 0 {
            "unhealthy"
        } else {
            "healthy"
        };
        serde_json::json!({
            "group": self.config.id,
            "state": state,
            "backlog": self.backend.kind(),
            "ordering": self.config.ordering,
            "connections": st.consumers.len(),
            "clients": st.consumers.iter().map(|s| s.client_id.clone()).collect::<Vec<_>>(),
            "waiting": waiting,
            "unsettled": unsettled,
        })
    }

    /// The group's state. A panic while it was held (a bug) leaves it usable: one panic must
    /// not turn into a panic for every later delivery.
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn labels(&self) -> [&str; 1] {
        [self.config.id.as_str()]
    }

    /// Takes a consumer connection in, or refuses it (9600) when the group is full.
    pub fn join(self: &Arc<Self>, client_id: &str) -> Result<Membership, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = NEXT_CONSUMER.fetch_add(1, Ordering::Relaxed);
        let start_feed = {
            let mut st = self.lock();
            if st.consumers.len() >= self.config.max_connections {
                return Err(format!(
                    "consumer group {:?} already has {} connections (max_connections {})",
                    self.config.id,
                    st.consumers.len(),
                    self.config.max_connections
                ));
            }
            st.consumers.push(Slot {
                id,
                client_id: client_id.to_owned(),
                tx,
                outstanding: 0,
            });
            self.metrics
                .connections
                .with_label_values(&self.labels())
                .set(st.consumers.len() as i64);
            self.backend.is_broker() && st.feed.is_none()
        };
        if start_feed {
            let (stop_tx, stop_rx) = watch::channel(false);
            self.lock().feed = Some(stop_tx);
            tokio::spawn(Arc::clone(self).feed_from_broker(stop_rx));
        }
        self.pump();
        Ok(Membership {
            id,
            group: Arc::clone(self),
            rx,
        })
    }

    /// A consumer connection is gone: whatever it held unsent goes back to the front.
    pub fn leave(&self, membership: &mut Membership) {
        let mut returned = Vec::new();
        while let Ok(p) = membership.rx.try_recv() {
            returned.push(p);
        }
        let mut st = self.lock();
        st.consumers.retain(|s| s.id != membership.id);
        self.metrics
            .connections
            .with_label_values(&self.labels())
            .set(st.consumers.len() as i64);
        for p in returned.into_iter().rev() {
            self.give_back(&mut st, p);
        }
        if st.consumers.is_empty() {
            // Nobody here to deliver to: hand broker-held messages back to the queue (the
            // channel closes, so RabbitMQ requeues them) for another process or later.
            if let Some(stop) = st.feed.take() {
                let _ = stop.send(true);
                st.drop_broker_held();
            }
        }
        self.update_gauges(&st);
        drop(st);
        self.pump();
    }

    pub(super) fn update_gauges(&self, st: &State) {
        let unsettled: usize = st.consumers.iter().map(|s| s.outstanding).sum();
        self.metrics
            .unsettled
            .with_label_values(&self.labels())
            .set(unsettled as i64);
        let depth = self.backend.depth();
        self.metrics
            .backlog
            .with_label_values(&self.labels())
            .set((st.waiting() as u64 + depth) as i64);
    }

    fn by_device(&self) -> bool {
        self.config.ordering == GroupOrdering::Device
    }

    /// A delivery that was handed out comes back to be handed out again, before what came
    /// after it (of its device, with `ordering = "device"`).
    fn give_back(&self, st: &mut State, p: Pending) {
        if self.by_device() {
            st.by_device.put_back(p);
        } else {
            st.ready.push_front(p);
        }
    }

    /// Hands `p` to consumer `i`; a consumer on its way out is dropped and `p` given back.
    fn hand_over(&self, st: &mut State, i: usize, mut p: Pending) {
        p.attempts += 1;
        p.last_consumer = Some(st.consumers[i].id);
        p.handed_at = Instant::now();
        match st.consumers[i].tx.send(p) {
            Ok(()) => {
                st.consumers[i].outstanding += 1;
                st.next = i + 1;
            }
            Err(mpsc::error::SendError(mut p)) => {
                // The connection is on its way out; leave() removes it.
                p.attempts -= 1;
                self.give_back(st, p);
                let id = st.consumers[i].id;
                st.consumers.retain(|s| s.id != id);
            }
        }
    }

    /// Hands ready deliveries to consumers with room, round robin; a redelivery goes to
    /// another consumer than the last one when one has room. With `ordering = "device"`, see
    /// [`Group::pump_by_device`].
    pub(super) fn pump(&self) {
        let mut st = self.lock();
        if self.by_device() {
            self.pump_by_device(&mut st);
            self.update_gauges(&st);
            return;
        }
        self.expire(&mut st);
        let window = self.config.window;
        while !st.ready.is_empty() && !st.consumers.is_empty() {
            let n = st.consumers.len();
            let last = st.ready.front().and_then(|p| p.last_consumer);
            let start = st.next % n;
            let order = (0..n).map(|k| (start + k) % n);
            let mut pick = None;
            for i in order {
                let s = &st.consumers[i];
                if s.outstanding < window {
                    if Some(s.id) != last || n == 1 {
                        pick = Some(i);
                        break;
                    }
                    pick.get_or_insert(i);
                }
            }
            let Some(i) = pick else { break };
            let p = st.ready.pop_front().expect("not empty");
            self.hand_over(&mut st, i, p);
        }
        self.update_gauges(&st);
    }

    /// `ordering = "device"`: each device's first waiting message goes to the device's own
    /// consumer ([`preferred`]) when that one has room and none of the device's messages is out
    /// (a redelivery goes to its second choice); a device whose consumer is full waits, the
    /// others go on.
    fn pump_by_device(&self, st: &mut State) {
        while let Some(p) = st.ready.pop_front() {
            st.by_device.push_back(p);
        }
        self.expire_by_device(st);
        let window = self.config.window;
        while st.consumers.iter().any(|s| s.outstanding < window) {
            let State {
                by_device,
                consumers,
                ..
            } = &mut *st;
            let next = by_device.take(|device, p| {
                let avoid = p.last_consumer.filter(|_| p.attempts > 0);
                let to = preferred(device, consumers.iter().map(|s| s.id), avoid)
                    .and_then(|id| consumers.iter().position(|s| s.id == id));
                match to {
                    Some(i) if consumers[i].outstanding < window => Pick::To(i),
                    _ => Pick::Wait,
                }
            });
            let Some((p, i)) = next else { break };
            self.hand_over(st, i, p);
        }
    }

    /// `ordering = "device"`: drops waiting deliveries older than the retention (9203), at
    /// most once a second (it looks at every device).
    fn expire_by_device(&self, st: &mut State) {
        let now = Instant::now();
        if st
            .swept
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        st.swept = Some(now);
        let retention = Duration::from_secs(self.config.retention_s);
        for p in st
            .by_device
            .expire(|p| p.ack.is_none() && p.since.elapsed() >= retention)
        {
            self.expired(p);
        }
    }

    /// Drops in-memory deliveries older than the retention (9203: nobody took them).
    fn expire(&self, st: &mut State) {
        let retention = Duration::from_secs(self.config.retention_s);
        while let Some(p) = st.ready.front() {
            if p.ack.is_some() || p.since.elapsed() < retention {
                break;
            }
            let p = st.ready.pop_front().expect("front exists");
            self.expired(p);
        }
    }

    /// Records a delivery nobody took within the retention (9203) and forgets it.
    fn expired(&self, p: Pending) {
        self.forget(&p);
        let record = self.record(
            &p.delivery,
            GroupOutcome::Expired {
                retention_s: self.config.retention_s,
            },
            "",
        );
        let outcomes = self.outcomes.clone();
        tokio::spawn(async move { outcomes.record(record).await });
    }

    /// The `ServerSubscribe` record of one delivery; `client` is empty when no consumer had it.
    fn record(&self, d: &Delivery, outcome: GroupOutcome<'_>, client: &str) -> Record {
        Record::group(
            d,
            &self.config.id,
            self.config.tenant.as_deref().unwrap_or_default(),
            outcome,
            client,
            &d.rule,
            &d.body,
        )
    }

    /// Waits for the group's push rate, if it has one.
    pub async fn pace(&self) {
        if let Some(rate) = &self.rate {
            rate.until_ready().await;
        }
    }

    /// Counts one delivery sent.
    pub fn delivered(&self) {
        self.metrics
            .delivered
            .with_label_values(&self.labels())
            .inc();
    }

    /// A consumer's outcome for one of its deliveries.
    pub async fn settle(&self, consumer: u64, client_id: &str, mut p: Pending, how: Settlement) {
        {
            let mut st = self.lock();
            if let Some(s) = st.consumers.iter_mut().find(|s| s.id == consumer) {
                s.outstanding = s.outstanding.saturating_sub(1);
            }
        }
        // A release or time-out that used up the group's max_redeliveries ends here: it is
        // dead-lettered with that code instead of going round again.
        let exhausted = matches!(how, Settlement::Released | Settlement::Timeout)
            && p.attempts >= self.config.max_redeliveries;
        let (outcome, mut redeliver) = match &how {
            Settlement::Accepted => (Some(("accepted", GroupOutcome::Accepted)), false),
            Settlement::Released => (
                Some((
                    "released",
                    GroupOutcome::Released {
                        attempt: p.attempts,
                    },
                )),
                !exhausted,
            ),
            Settlement::Timeout => (
                Some((
                    "timeout",
                    GroupOutcome::AckTimeout {
                        ack_timeout_ms: self.config.ack_timeout_ms,
                        attempt: p.attempts,
                    },
                )),
                !exhausted,
            ),
            Settlement::Rejected(error) => {
                (Some(("rejected", GroupOutcome::Rejected { error })), false)
            }
            Settlement::Lost => (None, true),
        };
        if let Some((name, outcome)) = outcome {
            self.metrics
                .outcomes
                .with_label_values(&[self.config.id.as_str(), name])
                .inc();
            let mut record = self.record(&p.delivery, outcome, client_id);
            if exhausted {
                let reason = record.reason.replace(
                    "; redelivering",
                    &format!(
                        "; that is max_redeliveries ({}), so it is dead-lettered",
                        self.config.max_redeliveries
                    ),
                );
                record = record.with_reason(reason);
            }
            let (code, reason) = (record.code, record.reason.clone());
            self.outcomes.record(record).await;
            if matches!(how, Settlement::Rejected(_)) || exhausted {
                // Not taken by the error action nor the dead-letter queue: delivered again,
                // never acked away.
                redeliver = !self
                    .dead_letter(&p.delivery, code, reason, p.attempts)
                    .await;
            }
        }
        if redeliver {
            let mut st = self.lock();
            // A broker-held copy whose consumer channel is gone comes back from RabbitMQ
            // itself; keeping it too would deliver it twice.
            if p.ack.is_none() || st.feed.is_some() {
                self.give_back(&mut st, p);
            } else if self.by_device() {
                st.by_device.settled(&device_of(&p));
            }
        } else {
            if self.by_device() {
                // Terminal here: the device's next message may go.
                self.lock().by_device.settled(&device_of(&p));
            }
            self.forget(&p);
            if let Some(ack) = p.ack.take()
                && let Err(e) = ack.ack(BasicAckOptions::default()).await
            {
                tracing::warn!(group = %self.config.id, "could not ack the backlog copy ({e}); it will be delivered again");
            }
        }
        self.pump();
    }

    /// A delivery is settled for good (or expired): its spool row goes. The delete is not
    /// waited for; should a crash undo it, the message is delivered once more, never lost.
    fn forget(&self, p: &Pending) {
        if let (Some(spool), Some(id)) = (self.backend.spool(), p.spool_id) {
            spool.remove_backlog(id);
        }
    }

    /// Spool-backed: takes back what the spool holds for this group (a restart, or kill -9,
    /// of the daemon), oldest first, each with the age it had. The number taken back.
    pub(super) async fn restore(&self) -> Result<usize, String> {
        let Some(spool) = self.backend.spool() else {
            return Ok(0);
        };
        let rows = spool
            .backlog(&self.config.id)
            .await
            .map_err(|e| format!("cannot read the backlog of group {:?}: {e}", self.config.id))?;
        let now_ms = crate::message::now_ms();
        let mut restored = 0;
        let mut st = self.lock();
        for (id, time_ms, row) in rows {
            match Delivery::from_spool(&row) {
                Ok(d) => {
                    let mut p = Pending::new(Arc::new(d), None);
                    p.spool_id = Some(id);
                    let age = Duration::from_millis(now_ms.saturating_sub(time_ms).max(0) as u64);
                    p.since = Instant::now().checked_sub(age).unwrap_or(p.since);
                    st.ready.push_back(p);
                    restored += 1;
                }
                // Kept, not deleted: a later iotfwd may read it.
                Err(e) => tracing::error!(
                    group = %self.config.id,
                    spool = %spool.path().display(),
                    row = id,
                    "a backlog row cannot be read ({e}); it is left in the spool"
                ),
            }
        }
        drop(st);
        self.pump();
        Ok(restored)
    }

    /// A delivery that ends without a consumer accepting it (`code`: 9652, or 9651 / 9650
    /// after max_redeliveries): a reject whose rule has no error action goes to the group's
    /// own `dead_letter_exchange` when it has one; everything else goes to whoever runs error
    /// actions and the dead-letter queue (`action::group`). Whether it was taken.
    async fn dead_letter(
        &self,
        d: &Arc<Delivery>,
        code: Code,
        reason: String,
        attempts: u32,
    ) -> bool {
        if code == Code::Rejected
            && !(self.has_error_action)(&d.rule)
            && let Some(exchange) = &self.config.dead_letter_exchange
            && let Some(record) = self.backend.dead_letter(self, d, exchange, &reason).await
        {
            let taken = record.code.is_success();
            self.outcomes.record(record).await;
            if taken {
                return true;
            }
        }
        let (done, taken) = tokio::sync::oneshot::channel();
        let sent = self.rejects.send(RejectedDelivery {
            group: self.config.id.clone(),
            delivery: Arc::clone(d),
            code,
            reason,
            attempts,
            done,
        });
        sent.is_ok() && taken.await.unwrap_or(false)
    }

    /// Takes one forward into the backlog. 9203 is recorded when no consumer is online.
    pub async fn enqueue(&self, d: Delivery) -> Result<(), Failure> {
        let online = !self.lock().consumers.is_empty();
        let d = Arc::new(d);
        if self.backend.is_broker() {
            self.backend.publish(self, &d).await?;
        } else {
            let full = || {
                Failure::not_available(format!(
                    "the backlog of consumer group {:?} is full ({} messages, max_backlog)",
                    self.config.id, self.config.max_backlog
                ))
            };
            let mut p = Pending::new(Arc::clone(&d), None);
            if let Some(spool) = self.backend.spool() {
                // The row is committed (its commit shared with the forwards around it)
                // before the forward is answered: what was answered 200 survives a crash.
                let slot = Storing::take(self).ok_or_else(full)?;
                let id = spool
                    .push_backlog(&self.config.id, d.to_spool())
                    .await
                    .map_err(|e| {
                        Failure::not_available(format!(
                            "cannot store the message in the backlog of consumer group {:?}: {e}",
                            self.config.id
                        ))
                    })?;
                p.spool_id = Some(id);
                slot.place(p);
            } else {
                let mut st = self.lock();
                if st.waiting() >= self.config.max_backlog {
                    return Err(full());
                }
                st.ready.push_back(p);
            }
        }
        if !online {
            self.offline(&d).await;
        }
        if !self.backend.is_broker() {
            self.pump();
        }
        Ok(())
    }

    async fn offline(&self, d: &Delivery) {
        let r = self.record(d, GroupOutcome::Offline, "");
        self.outcomes.record(r).await;
    }
}

/// A place in a spool-backed backlog held while its row is written; given back when dropped
/// (written or not, or the forward abandoned).
struct Storing<'a>(&'a Group);

impl<'a> Storing<'a> {
    /// A place, unless the backlog is full (`max_backlog`, counting rows being written).
    fn take(group: &'a Group) -> Option<Storing<'a>> {
        let mut st = group.lock();
        if st.waiting() + st.storing >= group.config.max_backlog {
            return None;
        }
        st.storing += 1;
        Some(Storing(group))
    }

    /// The row is written: the delivery takes the place, in the same moment.
    fn place(self, p: Pending) {
        let mut st = self.0.lock();
        st.storing = st.storing.saturating_sub(1);
        st.ready.push_back(p);
        drop(st);
        std::mem::forget(self);
    }
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.storing = st.storing.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscription::Hub;
    use bytes::Bytes;

    fn hub(
        configure: impl FnOnce(&mut GroupConfig),
    ) -> (Hub, mpsc::UnboundedReceiver<RejectedDelivery>) {
        hub_in(None, configure)
    }

    /// A hub whose backlogs are in `spool` when given.
    fn hub_in(
        spool: Option<&crate::spool::Spool>,
        configure: impl FnOnce(&mut GroupConfig),
    ) -> (Hub, mpsc::UnboundedReceiver<RejectedDelivery>) {
        let dir = std::env::temp_dir();
        let mut g = GroupConfig::demo(&dir);
        g.id = "g".into();
        g.secret_env = Some("PATH".into()); // any variable that is set
        g.secret_file = None;
        g.create_secret = false;
        configure(&mut g);
        let metrics = Arc::new(crate::telemetry::Metrics::new());
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Hub::new(
            &[g],
            None,
            spool,
            Outcomes::new(Arc::clone(&metrics)),
            metrics.groups.clone(),
            tx,
            Arc::new(|_: &str| false),
        )
        .unwrap();
        (hub, rx)
    }

    fn delivery(n: usize) -> Delivery {
        Delivery {
            body: Bytes::from(format!("{{\"n\":{n}}}")),
            topic: "/p/d/post".into(),
            product_key: "p".into(),
            device_name: "d".into(),
            message_id: n.to_string(),
            trace_id: format!("t{n}"),
            rule: "r".into(),
            generate_time: 0,
            tenant_id: String::new(),
            instance_id: String::new(),
        }
    }

    fn ids(m: &mut Membership) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(p) = m.rx.try_recv() {
            out.push(p.delivery.message_id.clone());
        }
        out
    }

    #[tokio::test]
    async fn deliveries_spread_round_robin_within_each_window() {
        let (hub, _rx) = hub(|g| g.window = 2);
        let g = Arc::clone(hub.group("g").unwrap());
        let mut a = g.join("a").unwrap();
        let mut b = g.join("b").unwrap();
        for n in 0..6 {
            hub.enqueue("g", delivery(n)).await.unwrap();
        }
        let (got_a, got_b) = (ids(&mut a), ids(&mut b));
        assert_eq!((got_a.len(), got_b.len()), (2, 2), "{got_a:?} {got_b:?}");
        let mut all = [got_a, got_b].concat();
        all.sort();
        assert_eq!(all, ["0", "1", "2", "3"]);
        assert_eq!(
            g.state.lock().unwrap().ready.len(),
            2,
            "the rest waits for room"
        );
    }

    fn of(device: &str, n: usize) -> Delivery {
        Delivery {
            device_name: device.into(),
            ..delivery(n)
        }
    }

    /// `(device, message id)` of what a consumer was handed, in order.
    fn handed(m: &mut Membership) -> Vec<Pending> {
        let mut out = Vec::new();
        while let Ok(p) = m.rx.try_recv() {
            out.push(p);
        }
        out
    }

    #[tokio::test]
    async fn an_ordered_group_hands_out_one_message_per_device_and_redelivers_it_first() {
        let (hub, _rx) = hub(|g| g.ordering = GroupOrdering::Device);
        let g = Arc::clone(hub.group("g").unwrap());
        let mut a = g.join("a").unwrap();
        let mut b = g.join("b").unwrap();
        // 3 messages each of 20 devices, interleaved.
        for n in 0..60 {
            hub.enqueue("g", of(&format!("d{}", n % 20), n))
                .await
                .unwrap();
        }
        let (first_a, first_b) = (handed(&mut a), handed(&mut b));
        let ids = |ps: &[Pending]| {
            let mut v: Vec<usize> = ps
                .iter()
                .map(|p| p.delivery.message_id.parse().unwrap())
                .collect();
            v.sort_unstable();
            v
        };
        // Each device's first message, and only that, is out; the devices are spread over
        // both consumers (rendezvous hashing over 20 devices).
        let mut all = [ids(&first_a), ids(&first_b)].concat();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert!(
            !first_a.is_empty() && !first_b.is_empty(),
            "both consumers get devices"
        );
        assert_eq!(g.lock().waiting(), 40);

        // a releases all it has: each goes to b (its second choice) before the device's next.
        let released: Vec<usize> = ids(&first_a);
        for p in first_a {
            g.settle(a.id, "a", p, Settlement::Released).await;
        }
        let again = handed(&mut b);
        assert_eq!(
            ids(&again),
            released,
            "the released ones, and nothing later"
        );
        assert!(handed(&mut a).is_empty());
        // Accepting them lets each device's second message go, back to its own consumer a.
        for p in again {
            g.settle(b.id, "b", p, Settlement::Accepted).await;
        }
        let second: Vec<usize> = ids(&handed(&mut a));
        assert_eq!(second, released.iter().map(|n| n + 20).collect::<Vec<_>>());

        // b leaves with its devices' messages out: they are redelivered to a, in order.
        let out_b = handed(&mut b);
        assert!(out_b.is_empty(), "b's first messages are still out with it");
        for p in first_b {
            g.settle(b.id, "b", p, Settlement::Lost).await;
        }
        g.leave(&mut b);
        let moved = handed(&mut a);
        assert!(!moved.is_empty());
        for p in &moved {
            let n: usize = p.delivery.message_id.parse().unwrap();
            assert!(
                n < 20,
                "a device of b continues with its first message, not {n}"
            );
        }
    }

    #[tokio::test]
    async fn a_timed_out_delivery_goes_to_the_other_consumer_and_a_full_backlog_refuses() {
        let (hub, _rx) = hub(|g| g.max_backlog = 2);
        let g = Arc::clone(hub.group("g").unwrap());
        let mut a = g.join("a").unwrap();
        hub.enqueue("g", delivery(1)).await.unwrap();
        let p = a.rx.try_recv().unwrap();
        let mut b = g.join("b").unwrap();
        g.settle(a.id, "a", p, Settlement::Timeout).await;
        assert_eq!(ids(&mut b), ["1"], "redelivered to the other consumer");
        assert!(ids(&mut a).is_empty());

        g.leave(&mut a);
        g.leave(&mut b);
        hub.enqueue("g", delivery(2)).await.unwrap();
        hub.enqueue("g", delivery(3)).await.unwrap();
        let full = hub.enqueue("g", delivery(4)).await.unwrap_err();
        assert_eq!(full.code(), Code::DestinationUnavailable);
        assert!(full.reason().contains("max_backlog"), "{}", full.reason());
        let unknown = hub.enqueue("nope", delivery(5)).await.unwrap_err();
        assert!(
            unknown.reason().contains("no consumer group \"nope\""),
            "{}",
            unknown.reason()
        );
    }

    #[tokio::test]
    async fn a_full_group_refuses_a_connection_and_unsent_deliveries_return_on_leave() {
        let (hub, _rx) = hub(|g| g.max_connections = 1);
        let g = Arc::clone(hub.group("g").unwrap());
        let mut a = g.join("a").unwrap();
        let refused = g.join("b").err().unwrap();
        assert!(refused.contains("max_connections 1"), "{refused}");
        for n in 0..3 {
            hub.enqueue("g", delivery(n)).await.unwrap();
        }
        g.leave(&mut a);
        let st = g.state.lock().unwrap();
        let back: Vec<_> = st
            .ready
            .iter()
            .map(|p| p.delivery.message_id.clone())
            .collect();
        assert_eq!(back, ["0", "1", "2"], "in their order");
    }

    /// The group's ready queue, by message id.
    fn ready(g: &Group) -> Vec<String> {
        g.lock()
            .ready
            .iter()
            .map(|p| p.delivery.message_id.clone())
            .collect()
    }

    /// The message ids the spool holds for group `g`, once every write queued so far is
    /// committed (a later committed write proves it).
    async fn stored(spool: &crate::spool::Spool) -> Vec<String> {
        spool.push_backlog("flush", Vec::new()).await.unwrap();
        spool
            .backlog("g")
            .await
            .unwrap()
            .into_iter()
            .map(|(_, _, row)| Delivery::from_spool(&row).unwrap().message_id)
            .collect()
    }

    #[tokio::test]
    async fn a_spool_backed_backlog_is_taken_back_after_a_restart_until_settled_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::spool::Spool::path_in(dir.path());
        let spool = crate::spool::Spool::open(&path).unwrap();
        let (hub, _rx) = hub_in(Some(&spool), |_| {});
        for n in 0..4 {
            hub.enqueue("g", delivery(n)).await.unwrap();
        }
        assert_eq!(
            stored(&spool).await,
            ["0", "1", "2", "3"],
            "stored before the answer"
        );
        drop(hub);
        drop(spool);

        // A restart: the backlog comes back from the file, in order, with its fields.
        let spool = crate::spool::Spool::open(&path).unwrap();
        let (hub, mut rejects) = hub_in(Some(&spool), |_| {});
        // Stands for the dead-letter queue: takes every rejected delivery.
        tokio::spawn(async move {
            while let Some(r) = rejects.recv().await {
                let _ = r.done.send(true);
            }
        });
        assert_eq!(hub.restore().await.unwrap(), 4);
        let g = Arc::clone(hub.group("g").unwrap());
        assert_eq!(ready(&g), ["0", "1", "2", "3"]);
        assert_eq!(g.status()["backlog"], "spool");
        assert_eq!(g.status()["ordering"], "spread");
        let mut a = g.join("a").unwrap();
        let mut out = Vec::new();
        while let Ok(p) = a.rx.try_recv() {
            out.push(p);
        }
        assert_eq!(*out[2].delivery, delivery(2), "every field survives");
        let mut out = out.into_iter();
        let (p0, p1, p2) = (
            out.next().unwrap(),
            out.next().unwrap(),
            out.next().unwrap(),
        );
        g.settle(a.id, "a", p0, Settlement::Accepted).await;
        g.settle(a.id, "a", p1, Settlement::Released).await;
        g.settle(a.id, "a", p2, Settlement::Rejected("bad".into()))
            .await;
        // Accepted and rejected are done; released and the one still out stay.
        assert_eq!(stored(&spool).await, ["1", "3"]);
        drop(a);
        drop(hub);
        drop(g);
        drop(spool);

        // Again, with a retention the rest has outlived: expired (9203) and gone from disk.
        let spool = crate::spool::Spool::open(&path).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let (hub, _rx) = hub_in(Some(&spool), |g| g.retention_s = 1);
        assert_eq!(hub.restore().await.unwrap(), 2);
        assert!(ready(hub.group("g").unwrap()).is_empty(), "expired");
        assert!(stored(&spool).await.is_empty());
    }

    #[tokio::test]
    async fn a_full_spool_backed_backlog_refuses_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::spool::Spool::open(&crate::spool::Spool::path_in(dir.path())).unwrap();
        let (hub, _rx) = hub_in(Some(&spool), |g| g.max_backlog = 2);
        hub.enqueue("g", delivery(1)).await.unwrap();
        hub.enqueue("g", delivery(2)).await.unwrap();
        let full = hub.enqueue("g", delivery(3)).await.unwrap_err();
        assert_eq!(full.code(), Code::DestinationUnavailable);
        assert!(full.reason().contains("max_backlog"), "{}", full.reason());
        assert_eq!(stored(&spool).await, ["1", "2"]);
    }
}
