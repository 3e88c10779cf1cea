//! The token buckets behind the quotas: the clock they run on, governor's state stores, and
//! giving a token back (refund).
//!
//! Two kinds of bucket, both governor's GCRA: a [`Bucket`] is one tenant's or instance's
//! (a governor direct limiter), and a [`DeviceClass`] holds the buckets of one tenant's devices
//! that share a rate (a governor keyed limiter, keyed by the device fingerprint of
//! [`super::hash`]). The limiter and the plan use them only through the calls here: take a
//! token (or learn how long until the next one), refund it, prune idle devices, count them.
//! governor stays inside this file. That is the seam for cluster mode, where quotas hold
//! across processes (token leases from a shared store): a shared bucket is a second
//! implementation of these same calls, chosen when the plan builds its buckets, and the check
//! order, the refunds and the waits above it stay as they are.
//!
//! # Refund
//!
//! governor's `check` consumes a token when it allows. To give one back (see the limiter's
//! check-then-commit), each limiter's state store is shared with us ([`Shared`]: governor's
//! own in-memory stores, behind an `Arc`), and a refund moves the key's GCRA "theoretical
//! arrival time" back by one emission interval, through governor's public
//! `StateStore::measure_and_replace`. The limiter refunds in the same synchronous step as the
//! take (no `.await` between), so it is exact: the state is as if the forward had never been
//! counted. (The only inexactness would need another forward of the same key to find that
//! key's bucket completely refilled between our take and our refund, i.e. more than one
//! emission interval, 1/forward_tps, later; the step takes well under a microsecond.)
//!
//! # Time
//!
//! The buckets run on tokio's clock ([`tokio::time::Instant`]), so the limiter's waits and
//! the buckets agree, and tests drive both with paused time. While one attempt checks its
//! scopes the time is pinned ([`TokioClock::pin`]): every check of the attempt sees the same
//! instant, and the clock is read once per attempt instead of once per scope.
//!
//! # Memory
//!
//! A device's state is dropped once its bucket is full again ([`DeviceClass::prune`],
//! governor's `retain_recent`), which is lossless: a missing key is a full bucket. Memory is
//! then bounded by the devices active within the last prune interval, 33 bytes each.

use std::cell::Cell;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};

use super::hash::{DeviceKey, FoldState};
use crate::config::quota::Rate;

/// governor's clock, on tokio's time (so it pauses and advances with `tokio::time::pause`).
#[derive(Clone, Copy, Debug)]
pub(super) struct TokioClock {
    base: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose zero is now.
    pub(super) fn new() -> TokioClock {
        TokioClock {
            base: tokio::time::Instant::now(),
        }
    }

    fn read(&self) -> Nanos {
        Nanos::from(tokio::time::Instant::now().saturating_duration_since(self.base))
    }

    /// Pins this thread's time to now until the guard is dropped: every bucket checked
    /// meanwhile sees this one instant.
    pub(super) fn pin(&self) -> PinnedNow {
        PINNED_NOW.with(|pinned| pinned.set(Some(self.read())));
        PinnedNow
    }
}

thread_local! {
    static PINNED_NOW: Cell<Option<Nanos>> = const { Cell::new(None) };
}

/// Keeps this thread's [`TokioClock`] time pinned until dropped.
pub(super) struct PinnedNow;

impl Drop for PinnedNow {
    fn drop(&mut self) {
        PINNED_NOW.with(|pinned| pinned.set(None));
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        PINNED_NOW.with(Cell::get).unwrap_or_else(|| self.read())
    }
}

/// A governor state store shared between the rate limiter and us, for refunds.
struct Shared<S>(Arc<S>);

impl<S: StateStore> StateStore for Shared<S> {
    type Key = S::Key;

    fn measure_and_replace<T, F, E>(&self, key: &Self::Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl<K, S> ShrinkableKeyedStateStore<K> for Shared<S>
where
    K: Hash + Eq + Clone,
    S: ShrinkableKeyedStateStore<K>,
{
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0);
    }

    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.0)
    }

    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&*self.0)
    }
}

fn quota_of(rate: Rate) -> (Quota, Nanos) {
    let tps = NonZeroU32::new(rate.tps.max(1)).expect("at least 1");
    let burst = NonZeroU32::new(rate.burst.max(1)).expect("at least 1");
    let quota = Quota::per_second(tps).allow_burst(burst);
    // governor's emission interval: the replenish interval, at least 1 ns.
    let t = Nanos::from(quota.replenish_interval().max(Duration::from_nanos(1)));
    (quota, t)
}

/// What both kinds of bucket are: a governor limiter over a state store shared with us, and
/// the emission interval `t` (what one token is worth), for refunds.
struct Gcra<S: StateStore> {
    limiter: RateLimiter<S::Key, Shared<S>, TokioClock, NoOpMiddleware<Nanos>>,
    store: Arc<S>,
    t: Nanos,
}

impl<S: StateStore + Default> Gcra<S> {
    fn new(rate: Rate, clock: TokioClock) -> Gcra<S> {
        let (quota, t) = quota_of(rate);
        let store = Arc::new(S::default());
        Gcra {
            limiter: RateLimiter::new(quota, Shared(Arc::clone(&store)), clock),
            store,
            t,
        }
    }

    /// How long from now (the pinned instant, within an attempt) until `not_until`.
    fn wait(&self, not_until: &NotUntil<Nanos>) -> Duration {
        not_until.wait_time_from(self.limiter.clock().now())
    }

    /// Gives back one token taken from `key`: moves its theoretical arrival time back by one
    /// emission interval. See the module docs for why this is exact here.
    fn refund(&self, key: &S::Key) {
        let t = self.t.as_u64();
        let _ = self.store.measure_and_replace(key, |tat| match tat {
            Some(tat) => Ok(((), Nanos::from(tat.as_u64().saturating_sub(t)))),
            None => Err(()),
        });
    }
}

/// One tenant's or instance's bucket: a governor direct limiter.
pub(super) struct Bucket(Gcra<InMemoryState>);

impl Bucket {
    pub(super) fn new(rate: Rate, clock: TokioClock) -> Bucket {
        Bucket(Gcra::new(rate, clock))
    }

    /// Takes one token; `Err` holds how long until the next one.
    pub(super) fn take(&self) -> Result<(), Duration> {
        self.0.limiter.check().map_err(|nu| self.0.wait(&nu))
    }

    /// Gives back the token a [`Bucket::take`] of this attempt took.
    pub(super) fn refund(&self) {
        self.0.refund(&NotKeyed::NonKey);
    }
}

type DeviceStore = DashMapStateStore<DeviceKey, FoldState>;

/// One tenant's devices with one rate: a governor keyed limiter, keyed by device fingerprint.
pub(super) struct DeviceClass {
    gcra: Gcra<DeviceStore>,
    rate: Rate,
}

impl DeviceClass {
    pub(super) fn new(rate: Rate, clock: TokioClock) -> DeviceClass {
        DeviceClass {
            gcra: Gcra::new(rate, clock),
            rate,
        }
    }

    /// The rate every device of this class has.
    pub(super) fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one token from the device `key`; `Err` holds how long until its next one.
    pub(super) fn take(&self, key: &DeviceKey) -> Result<(), Duration> {
        self.gcra
            .limiter
            .check_key(key)
            .map_err(|nu| self.gcra.wait(&nu))
    }

    /// Gives back the token a [`DeviceClass::take`] of this attempt took from `key`.
    pub(super) fn refund(&self, key: DeviceKey) {
        self.gcra.refund(&key);
    }

    /// Drops the state of devices whose bucket is full again; returns how many remain.
    pub(super) fn prune(&self) -> usize {
        self.gcra.limiter.retain_recent();
        let store = &self.gcra.store;
        let len = store.len();
        if store.capacity() > 2 * len + 1024 {
            store.shrink_to_fit();
        }
        len
    }

    /// Device states held (one per device seen since its bucket was last full).
    pub(super) fn devices(&self) -> usize {
        self.gcra.store.len()
    }
}
