//! Forwarding quotas: per device, per instance and per tenant (9324, 9326), on governor.
//!
//! Each forward (one action of one matching rule for one message) is counted once against
//! its device's quota, its instance's specification and its tenant's quota, before the action
//! runs: [`Limiter::acquire`]. The configuration model is in [`crate::config::quota`]; the
//! operator's view in README "Quotas".
//!
//! # Resolution
//!
//! The productKey decides: a product listed in an `[[instance]]` counts against that instance
//! and its tenant, whatever the envelope says; the configured mapping is authoritative, so a
//! client cannot move its traffic onto another instance's quota with a header. For a product of
//! no instance, an envelope `instanceId` naming a declared instance is used (when the envelope
//! also names a tenant, it must be that instance's tenant). Otherwise `[quota] unmapped`
//! applies: `"refuse"` (the default) fails the forward with 9321 (see [`Throttle`]), and
//! `"default_instance"` counts it against `default_instance`.
//!
//! # Check order, and check-then-commit
//!
//! The scopes are checked narrowest first: device, then instance, then tenant. The first to
//! refuse gives the code and reason, so a single flooding device is reported (and stopped) as
//! a device, not as its whole tenant.
//!
//! governor's `check` consumes a token when it allows. A forward refused by a later scope must
//! not keep the tokens it took from earlier ones, or a device throttled by its tenant would
//! also use up its own quota, and a flooding device would eat its instance's budget. Two ways
//! to get there: probe every scope without consuming and then commit (governor has no probe;
//! it would also cost every forward two checks per scope, and another forward can take the
//! last token between probe and commit), or consume and hand back on refusal. This module
//! does the latter: each limiter's state store is shared with us (governor's own in-memory
//! stores, behind an `Arc`), and when a later scope refuses, the tokens already taken in this
//! attempt are refunded by moving their GCRA "theoretical arrival time" back by one emission
//! interval, through governor's public `StateStore::measure_and_replace`. The refund happens
//! in the same synchronous step as the take (no `.await` between), so it is exact: the state
//! is as if the forward had never been counted. (The only inexactness would need another
//! forward of the same key to find that key's bucket completely refilled between our take and
//! our refund, i.e. more than one emission interval, 1/forward_tps, later; the step takes
//! well under a microsecond.) The happy path, where no scope refuses, costs one check per
//! scope and nothing more. Tests pin the edge exactly.
//!
//! # Waiting
//!
//! A scope with `on_limit = "wait"` does not fail at once: the forward sleeps until that
//! scope's next token (governor says when) and tries all scopes again, as long as the total
//! wait stays within that scope's `max_wait_ms`; when the next token is further away than
//! the remaining budget, it fails at once with the code (no pointless sleep). Nothing is
//! buffered: the caller's future is what waits, so the wait is backpressure on whoever awaits
//! it. Tokens are never held while waiting (refund first, then sleep), so a waiting forward
//! does not block other forwards of the same device or instance. Waiters are not served in
//! FIFO order, and each token of a scope wakes every forward waiting on it (one wins, the
//! others sleep again): bound how many forwards may wait at once (the engine's batch does).
//!
//! # State, reload, memory
//!
//! Tenants and instances each have one governor direct limiter. Devices have governor keyed
//! limiters, one per tenant and distinct rate (`forward_tps`, `burst`): the `[quota.device]`
//! default is one class, and each per-product override with a different rate another. The key
//! is a 128-bit fingerprint of (productKey, deviceName): SipHash-1-3 and a seeded FxHash,
//! with random keys, so no allocation per check, no collision a client can aim for, and no
//! practical chance of two devices sharing a bucket (with a million devices, about 10^-27).
//!
//! [`Limiter::update`] swaps in a new quota set; a tenant, instance or device class whose
//! rate did not change keeps its state (its limiter is carried over). A changed rate starts
//! with a full bucket.
//!
//! Idle device state is dropped by [`Limiter::prune`] (governor's `retain_recent`): a key is
//! dropped once its bucket is full again, which is lossless, since a missing key is a full
//! bucket. Run it on an interval ([`Limiter::spawn_pruner`]). Memory is then bounded by the
//! devices active within the last interval: 33 bytes each, 3.3 MB for 100 000 devices
//! (measured in the tests with a counting allocator), and back to nothing once they are idle.
//!
//! Each thread caches the last quota set it used (see Fairness), so after an update a thread
//! that does not check again keeps the previous set, and the device state only it still
//! references, alive until it does; that state no longer grows.
//!
//! # Fairness
//!
//! Tenants share no mutable state on the check path: each has its own buckets and its own
//! device maps, and the current quota set is read through a per-thread cache validated by one
//! read-mostly generation number (no lock, no reference-count traffic). A tenant far over its
//! quota therefore costs another tenant neither tokens nor contended cache lines; the tests
//! measure it.
//!
//! # Time
//!
//! The limiters run on tokio's clock ([`tokio::time::Instant`]), so waits and buckets agree,
//! and tests drive both with paused time.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures::future::Either;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};
use serde::Serialize;

use crate::config::quota::{Limit, OnLimit, QuotaSet, Rate, Unmapped};
use crate::outcome::{Code, Failure};
use crate::telemetry::Metrics;

/// Which quota refused a forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The device's quota (`[quota.device]` or its product's override): 9324.
    Device,
    /// The instance's specification (`[[instance]] forward_tps`): 9326.
    Instance,
    /// The tenant's quota (`[[tenant]] forward_tps`): 9324.
    Tenant,
    /// Not a quota: the product is in no instance and `[quota] unmapped = "refuse"`: 9321.
    Unmapped,
}

impl Scope {
    /// `"device"`, `"instance"`, `"tenant"` or `"unmapped"` (the metric's `scope` label).
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Device => "device",
            Scope::Instance => "instance",
            Scope::Tenant => "tenant",
            Scope::Unmapped => "unmapped",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an allowed forward was counted: the ids its records carry as `tenantId` and
/// `instanceId`. Both `None` when quotas are off (records then keep the message's own ids).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub tenant: Option<Arc<str>>,
    pub instance: Option<Arc<str>>,
}

impl Resolved {
    /// The resolved tenant id, else `fallback` (the message's own tenantId).
    pub fn tenant_or<'a>(&'a self, fallback: Option<&'a str>) -> Option<&'a str> {
        self.tenant.as_deref().or(fallback)
    }

    /// The resolved instance id, else `fallback` (the message's own instanceId).
    pub fn instance_or<'a>(&'a self, fallback: Option<&'a str>) -> Option<&'a str> {
        self.instance.as_deref().or(fallback)
    }
}

/// A refused forward: the code and reason for its outcome record.
///
/// - [`Scope::Device`] and [`Scope::Tenant`]: [`Code::Throttled`] (9324);
/// - [`Scope::Instance`]: [`Code::InstanceSpecExceeded`] (9326);
/// - [`Scope::Unmapped`]: [`Code::ParamInvalid`] (9321). It is not throttling, so neither 9324
///   nor 9326 (they would send the operator to raise a quota); nor 9399 (nothing internal
///   failed). The forward's parameters, its productKey as the config resolves it, are invalid
///   for this deployment, and the fix is in the config, which is what 9321 ("invalid
///   parameter") tells an operator. The reason names the product and both fixes.
///
/// The reason says which quota and its value, e.g. `device quota exceeded: pk1/dev1 at 10
/// msg/s, burst 10`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", failure.code(), failure.reason())]
pub struct Throttle {
    /// The failure the forward ends in (9324, 9326 or 9321), with the reason.
    pub failure: Failure,
    pub scope: Scope,
    /// `productKey/deviceName`, the tenant id, the instance id, or (unmapped) the productKey.
    pub key: String,
    /// The tenant the forward was counted against (`None` for an unmapped product).
    pub tenant: Option<Arc<str>>,
    /// The instance the forward was counted against (`None` for an unmapped product).
    pub instance: Option<Arc<str>>,
    /// The refusing quota's forwards per second (0 for an unmapped product).
    pub limit_tps: u32,
    /// The refusing quota's burst (0 for an unmapped product).
    pub burst: u32,
    /// How long the forward waited (`on_limit = "wait"`) before it was refused.
    pub waited: Duration,
}

impl Throttle {
    pub fn code(&self) -> Code {
        self.failure.code()
    }

    pub fn reason(&self) -> &str {
        self.failure.reason()
    }
}

/// governor's clock, on tokio's time (so it pauses and advances with `tokio::time::pause`).
///
/// While one attempt checks its scopes, the time is pinned (see [`PinnedNow`]): all of its
/// checks see the same instant, and the clock is read once per attempt instead of once per
/// scope.
#[derive(Clone, Copy, Debug)]
struct TokioClock {
    base: tokio::time::Instant,
}

impl TokioClock {
    fn read(&self) -> Nanos {
        Nanos::from(tokio::time::Instant::now().saturating_duration_since(self.base))
    }
}

thread_local! {
    static PINNED_NOW: Cell<Option<Nanos>> = const { Cell::new(None) };
}

/// Pins this thread's [`TokioClock`] time until dropped.
struct PinnedNow;

impl PinnedNow {
    fn pin(now: Nanos) -> PinnedNow {
        PINNED_NOW.with(|pinned| pinned.set(Some(now)));
        PinnedNow
    }
}

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

/// `BuildHasher` for the maps built from the config (products, instances, tenants): FxHash,
/// several times cheaper than SipHash for short keys. Flooding is no concern there: the maps
/// are never inserted into after they are built, so a key chosen by a client only costs one
/// probe sequence among the configured keys.
#[derive(Clone, Copy, Debug, Default)]
struct FxState;

struct FxHasher(u64);

const FX_K: u64 = 0x517c_c1b7_2722_0a95;

impl BuildHasher for FxState {
    type Hasher = FxHasher;

    fn build_hasher(&self) -> FxHasher {
        FxHasher(0)
    }
}

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = fx(self.0, bytes);
    }

    fn write_u8(&mut self, v: u8) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(v)).wrapping_mul(FX_K);
    }
}

fn fx(mut h: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        h = (h.rotate_left(5) ^ word).wrapping_mul(FX_K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(FX_K);
    }
    (h.rotate_left(5) ^ bytes.len() as u64).wrapping_mul(FX_K)
}

type FxMap<V> = HashMap<Box<str>, V, FxState>;

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

/// Gives back one token taken from `key`: moves its theoretical arrival time back by one
/// emission interval `t`. See the module docs for why this is exact here.
fn refund<S: StateStore>(store: &S, key: &S::Key, t: Nanos) {
    let _ = store.measure_and_replace(key, |tat| match tat {
        Some(tat) => Ok(((), Nanos::from(tat.as_u64().saturating_sub(t.as_u64())))),
        None => Err(()),
    });
}

fn quota_of(rate: Rate) -> (Quota, Nanos) {
    let tps = NonZeroU32::new(rate.tps.max(1)).expect("at least 1");
    let burst = NonZeroU32::new(rate.burst.max(1)).expect("at least 1");
    let quota = Quota::per_second(tps).allow_burst(burst);
    // governor's emission interval: the replenish interval, at least 1 ns.
    let t = Nanos::from(quota.replenish_interval().max(Duration::from_nanos(1)));
    (quota, t)
}

type DirectLimiter =
    RateLimiter<NotKeyed, Shared<InMemoryState>, TokioClock, NoOpMiddleware<Nanos>>;

/// One tenant's or instance's bucket: a governor direct limiter.
struct DirectBucket {
    limiter: DirectLimiter,
    store: Arc<InMemoryState>,
    t: Nanos,
}

impl DirectBucket {
    fn new(rate: Rate, clock: TokioClock) -> DirectBucket {
        let (quota, t) = quota_of(rate);
        let store = Arc::new(InMemoryState::default());
        DirectBucket {
            limiter: RateLimiter::new(quota, Shared(Arc::clone(&store)), clock),
            store,
            t,
        }
    }

    fn refund(&self) {
        refund(&*self.store, &NotKeyed::NonKey, self.t);
    }
}

/// `BuildHasher` for the device fingerprints, which are already uniformly random: folds the
/// 128 bits to 64 instead of hashing them again.
#[derive(Clone, Copy, Debug, Default)]
struct FoldState;

struct FoldHasher(u64);

impl BuildHasher for FoldState {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        FoldHasher(0)
    }
}

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = self.0.rotate_left(29) ^ v;
    }
}

/// A device's key: a 128-bit fingerprint of (productKey, deviceName), as two words (8-byte
/// aligned, so an entry is 24 bytes, not the 32 a `u128` key would take).
type DeviceKey = (u64, u64);
type DeviceStore = DashMapStateStore<DeviceKey, FoldState>;
type KeyedLimiter = RateLimiter<DeviceKey, Shared<DeviceStore>, TokioClock, NoOpMiddleware<Nanos>>;

/// One tenant's devices with one rate: a governor keyed limiter, keyed by device fingerprint.
struct DeviceClass {
    limiter: KeyedLimiter,
    store: Arc<DeviceStore>,
    rate: Rate,
    t: Nanos,
}

impl DeviceClass {
    fn new(rate: Rate, clock: TokioClock) -> DeviceClass {
        let (quota, t) = quota_of(rate);
        let store = Arc::new(DeviceStore::default());
        DeviceClass {
            limiter: RateLimiter::new(quota, Shared(Arc::clone(&store)), clock),
            store,
            rate,
            t,
        }
    }

    fn refund(&self, key: DeviceKey) {
        refund(&*self.store, &key, self.t);
    }

    /// Drops the state of devices whose bucket is full again; returns how many remain.
    fn prune(&self) -> usize {
        self.limiter.retain_recent();
        let len = self.store.len();
        if self.store.capacity() > 2 * len + 1024 {
            self.store.shrink_to_fit();
        }
        len
    }
}

/// A tenant's or instance's limit and its bucket.
#[derive(Clone)]
struct Gate {
    bucket: Arc<DirectBucket>,
    limit: Limit,
}

struct TenantPlan {
    id: Arc<str>,
    gate: Option<Gate>,
    /// This tenant's device classes, one per distinct device rate, indexed as
    /// [`DeviceRule::class`]. Per tenant, so tenants share no mutable state when they check.
    classes: Vec<Arc<DeviceClass>>,
}

struct InstancePlan {
    id: Arc<str>,
    tenant: Arc<TenantPlan>,
    gate: Option<Gate>,
}

/// The device limit of a product: its limit and the index of its class in each tenant.
#[derive(Clone, Copy)]
struct DeviceRule {
    class: usize,
    limit: Limit,
}

/// One quota set, resolved: what `acquire` reads. Immutable; `update` builds a new one.
#[derive(Default)]
struct Plan {
    enabled: bool,
    tenants: FxMap<Arc<TenantPlan>>,
    instances: FxMap<Arc<InstancePlan>>,
    products: FxMap<Arc<InstancePlan>>,
    /// Where unmapped products go; `None`: refused.
    unmapped: Option<Arc<InstancePlan>>,
    device_default: Option<DeviceRule>,
    /// Products with a `[quota.device.products.<pk>]` override (`None`: not limited).
    device_products: FxMap<Option<DeviceRule>>,
}

impl Plan {
    /// Builds the plan for `set`, carrying over the buckets of `prev` whose rate is unchanged.
    fn build(set: &QuotaSet, prev: &Plan, clock: TokioClock) -> Plan {
        // The distinct device rates, each a class index.
        let device = &set.quota.device;
        let mut rates: Vec<Rate> = Vec::new();
        let mut rule = |limit: Option<Limit>| {
            limit.map(|limit| {
                let class = match rates.iter().position(|r| *r == limit.rate) {
                    Some(i) => i,
                    None => {
                        rates.push(limit.rate);
                        rates.len() - 1
                    }
                };
                DeviceRule { class, limit }
            })
        };
        let device_default = rule(device.limit());
        let device_products: FxMap<Option<DeviceRule>> = device
            .products
            .keys()
            .map(|pk| (pk.as_str().into(), rule(device.limit_for(pk))))
            .collect();

        let gate = |prev: Option<&Gate>, limit: Option<Limit>| {
            limit.map(|limit| Gate {
                bucket: prev
                    .filter(|g| g.limit.rate == limit.rate)
                    .map(|g| Arc::clone(&g.bucket))
                    .unwrap_or_else(|| Arc::new(DirectBucket::new(limit.rate, clock))),
                limit,
            })
        };
        let tenant = |id: &str, limit: Option<Limit>| {
            let old = prev.tenants.get(id);
            let classes = rates
                .iter()
                .map(|&rate| {
                    old.and_then(|t| t.classes.iter().find(|c| c.rate == rate))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(DeviceClass::new(rate, clock)))
                })
                .collect();
            Arc::new(TenantPlan {
                id: Arc::from(id),
                gate: gate(old.and_then(|t| t.gate.as_ref()), limit),
                classes,
            })
        };

        let mut plan = Plan {
            enabled: set.is_enabled(),
            device_default,
            device_products,
            ..Plan::default()
        };
        for t in &set.tenants {
            if !plan.tenants.contains_key(t.id.as_str()) {
                // (A duplicate id is rejected by validation; the first one counts.)
                plan.tenants
                    .insert(t.id.as_str().into(), tenant(&t.id, t.limit()));
            }
        }
        for i in &set.instances {
            if plan.instances.contains_key(i.id.as_str()) {
                continue;
            }
            // An undeclared tenant (rejected by validation) is an unlimited one.
            let owner = Arc::clone(
                plan.tenants
                    .entry(i.tenant.as_str().into())
                    .or_insert_with(|| tenant(&i.tenant, None)),
            );
            let old = prev
                .instances
                .get(i.id.as_str())
                .and_then(|p| p.gate.as_ref());
            let instance = Arc::new(InstancePlan {
                id: Arc::from(i.id.as_str()),
                tenant: owner,
                gate: gate(old, i.limit()),
            });
            for product in &i.products {
                plan.products
                    .entry(product.as_str().into())
                    .or_insert_with(|| Arc::clone(&instance));
            }
            plan.instances.insert(i.id.as_str().into(), instance);
        }
        plan.unmapped = match set.quota.unmapped {
            Unmapped::Refuse => None,
            Unmapped::DefaultInstance => set
                .quota
                .default_instance
                .as_deref()
                .and_then(|id| plan.instances.get(id))
                .cloned(),
        };
        plan
    }

    /// The instance a forward counts against; `None`: unmapped and refused.
    fn instance_for(
        &self,
        product_key: &str,
        tenant_hint: Option<&str>,
        instance_hint: Option<&str>,
    ) -> Option<&Arc<InstancePlan>> {
        if let Some(instance) = self.products.get(product_key) {
            return Some(instance);
        }
        if let Some(instance) = instance_hint.and_then(|id| self.instances.get(id))
            && tenant_hint.is_none_or(|t| t == &*instance.tenant.id)
        {
            return Some(instance);
        }
        self.unmapped.as_ref()
    }

    fn device_rule(&self, product_key: &str) -> Option<DeviceRule> {
        match self.device_products.get(product_key) {
            Some(rule) => *rule,
            None => self.device_default,
        }
    }

    fn classes(&self) -> impl Iterator<Item = &Arc<DeviceClass>> {
        self.tenants.values().flat_map(|t| t.classes.iter())
    }
}

/// Why one attempt was refused.
struct Refusal {
    scope: Scope,
    limit: Limit,
    /// Until the refusing scope's next token.
    wait: Duration,
}

/// What one attempt at every scope decided.
enum Step {
    Done(Result<Resolved, Throttle>),
    /// Refused by a scope that waits: try again after this long.
    Sleep(Duration),
}

/// Numbers plan versions across all limiters, so a thread's cached plan is never mistaken for
/// another limiter's.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's copy of the last plan it used: the hot path reads it after comparing one
    /// shared, read-mostly generation number, instead of taking a lock and cloning an `Arc`
    /// (writes to cache lines that every thread, of every tenant, would share).
    static PLAN_CACHE: RefCell<Option<(u64, Arc<Plan>)>> = const { RefCell::new(None) };
}

struct Inner {
    /// Fast path: false while quotas are off. The plan's own flag is authoritative.
    enabled: AtomicBool,
    /// The current plan's generation (from [`GENERATIONS`]).
    generation: AtomicU64,
    plan: RwLock<Arc<Plan>>,
    update: Mutex<()>,
    clock: TokioClock,
    /// Keys of the device fingerprint.
    fingerprint: (RandomState, u64),
    metrics: Option<Arc<Metrics>>,
}

/// The quota limiter. Cheap to clone (an `Arc`); share one per daemon.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plan = self.plan();
        f.debug_struct("Limiter")
            .field("enabled", &plan.enabled)
            .field("tenants", &plan.tenants.len())
            .field("instances", &plan.instances.len())
            .field("device_classes", &plan.classes().count())
            .finish()
    }
}

impl Limiter {
    /// Builds the limiter for a quota set (use `QuotaSet::from(&config)`). With no tenant
    /// and no instance, quotas are off and [`Limiter::acquire`] allows everything at the cost of
    /// one atomic load. `metrics` gets `iotfwd_throttled_total` (labels `tenant`,
    /// `iot_instance`, `scope`).
    pub fn new(set: &QuotaSet, metrics: Option<Arc<Metrics>>) -> Limiter {
        let clock = TokioClock {
            base: tokio::time::Instant::now(),
        };
        let plan = Plan::build(set, &Plan::default(), clock);
        Limiter {
            inner: Arc::new(Inner {
                enabled: AtomicBool::new(plan.enabled),
                generation: AtomicU64::new(GENERATIONS.fetch_add(1, Ordering::Relaxed)),
                plan: RwLock::new(Arc::new(plan)),
                update: Mutex::new(()),
                clock,
                fingerprint: (RandomState::new(), RandomState::new().hash_one(0x10f_u16)),
                metrics,
            }),
        }
    }

    /// A limiter with quotas off.
    pub fn disabled() -> Limiter {
        Limiter::new(&QuotaSet::default(), None)
    }

    /// Whether quotas are on (at least one tenant or instance is configured).
    pub fn is_enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Acquire)
    }

    fn plan(&self) -> Arc<Plan> {
        Arc::clone(
            &self
                .inner
                .plan
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Runs `f` on the current plan, through this thread's cache. `f` must not call back in.
    fn with_plan<R>(&self, f: impl FnOnce(&Arc<Plan>) -> R) -> R {
        let generation = self.inner.generation.load(Ordering::Acquire);
        let mut f = Some(f);
        let cached = PLAN_CACHE.try_with(|cell| {
            let mut cache = cell.borrow_mut();
            match &*cache {
                Some((g, _)) if *g == generation => {}
                _ => *cache = Some((generation, self.plan())),
            }
            let (_, plan) = cache.as_ref().expect("just filled");
            (f.take().expect("called once"))(plan)
        });
        match cached {
            Ok(r) => r,
            // The thread is exiting and its cache is gone.
            Err(_) => (f.take().expect("not called"))(&self.plan()),
        }
    }

    /// Swaps in a new quota set (config reload). Tenants, instances and device classes whose
    /// rate (`forward_tps`, `burst`) is unchanged keep their state; `on_limit` and
    /// `max_wait_ms` changes apply at once without touching it. Forwards already inside
    /// `acquire` finish under the set they started with.
    pub fn update(&self, set: &QuotaSet) {
        let _serialized = self
            .inner
            .update
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let prev = self.plan();
        let plan = Arc::new(Plan::build(set, &prev, self.inner.clock));
        let enabled = plan.enabled;
        *self
            .inner
            .plan
            .write()
            .unwrap_or_else(PoisonError::into_inner) = plan;
        self.inner.generation.store(
            GENERATIONS.fetch_add(1, Ordering::Relaxed),
            Ordering::Release,
        );
        self.inner.enabled.store(enabled, Ordering::Release);
    }

    /// Resolves where a forward would count, without counting it: the ids for records of
    /// steps before the forward. `Err` only for an unmapped product that is refused.
    pub fn resolve(
        &self,
        product_key: &str,
        tenant_hint: Option<&str>,
        instance_hint: Option<&str>,
    ) -> Result<Resolved, Throttle> {
        if !self.is_enabled() {
            return Ok(Resolved::default());
        }
        self.with_plan(|plan| {
            if !plan.enabled {
                return Ok(Resolved::default());
            }
            match plan.instance_for(product_key, tenant_hint, instance_hint) {
                Some(instance) => Ok(resolved(instance)),
                None => Err(unmapped(product_key, instance_hint)),
            }
        })
    }

    /// Counts one forward (one action of one matching rule for one message) once against its
    /// device, instance and tenant; call it right before the action executes.
    ///
    /// Resolves to `Ok` with the tenant and instance it was counted against (both `None` when
    /// quotas are off: keep the message's own ids), or to `Err` with the code and reason for
    /// the outcome record: 9324 (device or tenant), 9326 (instance) or 9321 (unmapped product
    /// refused); the forward did not happen and counted against nothing, so hand the message
    /// to the rule's error action.
    ///
    /// The check runs when `acquire` is called, synchronously; the returned future is ready at
    /// once unless a refusing scope has `on_limit = "wait"`, in which case it sleeps (up to that
    /// scope's `max_wait_ms`) for a token. Run the forwards of different messages concurrently
    /// if one waiting forward must not hold up the others.
    pub fn acquire<'a>(
        &'a self,
        product_key: &'a str,
        device_name: &'a str,
        tenant_hint: Option<&'a str>,
        instance_hint: Option<&'a str>,
    ) -> impl Future<Output = Result<Resolved, Throttle>> + Send + 'a {
        let step = if self.is_enabled() {
            self.with_plan(|plan| {
                self.attempt(
                    plan,
                    product_key,
                    device_name,
                    tenant_hint,
                    instance_hint,
                    Duration::ZERO,
                )
            })
        } else {
            Step::Done(Ok(Resolved::default()))
        };
        match step {
            Step::Done(result) => Either::Left(std::future::ready(result)),
            Step::Sleep(first) => Either::Right(Box::pin(self.wait_for_token(
                product_key,
                device_name,
                tenant_hint,
                instance_hint,
                first,
            ))),
        }
    }

    /// The slow path of [`Limiter::acquire`]: sleep, try again, under one plan throughout.
    async fn wait_for_token(
        &self,
        product_key: &str,
        device_name: &str,
        tenant_hint: Option<&str>,
        instance_hint: Option<&str>,
        mut sleep: Duration,
    ) -> Result<Resolved, Throttle> {
        let started = tokio::time::Instant::now();
        let plan = self.plan();
        loop {
            tokio::time::sleep(sleep).await;
            let waited = started.elapsed();
            match self.attempt(
                &plan,
                product_key,
                device_name,
                tenant_hint,
                instance_hint,
                waited,
            ) {
                Step::Done(result) => return result,
                Step::Sleep(next) => sleep = next,
            }
        }
    }

    /// One attempt: resolve, then every scope; says whether to sleep and try again.
    fn attempt(
        &self,
        plan: &Plan,
        product_key: &str,
        device_name: &str,
        tenant_hint: Option<&str>,
        instance_hint: Option<&str>,
        waited: Duration,
    ) -> Step {
        if !plan.enabled {
            return Step::Done(Ok(Resolved::default()));
        }
        let Some(instance) = plan.instance_for(product_key, tenant_hint, instance_hint) else {
            return Step::Done(Err(unmapped(product_key, instance_hint)));
        };
        let device = plan.device_rule(product_key).map(|rule| {
            (
                &*instance.tenant.classes[rule.class],
                rule.limit,
                self.fingerprint(product_key, device_name),
            )
        });
        match self.try_once(instance, device) {
            Ok(()) => Step::Done(Ok(resolved(instance))),
            Err(refusal)
                if refusal.limit.on_limit == OnLimit::Wait
                    && waited + refusal.wait <= refusal.limit.max_wait =>
            {
                Step::Sleep(refusal.wait)
            }
            Err(refusal) => Step::Done(Err(self.throttle(
                &refusal,
                instance,
                product_key,
                device_name,
                waited,
            ))),
        }
    }

    /// One attempt at every scope, narrowest first; on refusal, the tokens this attempt took
    /// are given back before returning.
    fn try_once(
        &self,
        instance: &InstancePlan,
        device: Option<(&DeviceClass, Limit, DeviceKey)>,
    ) -> Result<(), Refusal> {
        // One instant for every check of this attempt (and one clock read).
        let now = self.inner.clock.read();
        let _pinned = PinnedNow::pin(now);
        let refusal = |scope, limit: Limit, not_until: NotUntil<Nanos>| Refusal {
            scope,
            limit,
            wait: not_until.wait_time_from(now),
        };
        if let Some((class, limit, key)) = device
            && let Err(nu) = class.limiter.check_key(&key)
        {
            return Err(refusal(Scope::Device, limit, nu));
        }
        if let Some(gate) = &instance.gate
            && let Err(nu) = gate.bucket.limiter.check()
        {
            if let Some((class, _, key)) = device {
                class.refund(key);
            }
            return Err(refusal(Scope::Instance, gate.limit, nu));
        }
        if let Some(gate) = &instance.tenant.gate
            && let Err(nu) = gate.bucket.limiter.check()
        {
            if let Some(instance_gate) = &instance.gate {
                instance_gate.bucket.refund();
            }
            if let Some((class, _, key)) = device {
                class.refund(key);
            }
            return Err(refusal(Scope::Tenant, gate.limit, nu));
        }
        Ok(())
    }

    /// SipHash-1-3 (keyed: a client cannot aim collisions) and a seeded FxHash (cheap) of
    /// (productKey, deviceName): 128 bits.
    fn fingerprint(&self, product_key: &str, device_name: &str) -> DeviceKey {
        let (sip, seed) = &self.inner.fingerprint;
        let fx = fx(fx(*seed, product_key.as_bytes()), device_name.as_bytes());
        (sip.hash_one((product_key, device_name)), fx)
    }

    fn throttle(
        &self,
        refusal: &Refusal,
        instance: &InstancePlan,
        product_key: &str,
        device_name: &str,
        waited: Duration,
    ) -> Throttle {
        let limit = refusal.limit;
        let (failure, key, what): (fn(String) -> Failure, _, _) = match refusal.scope {
            Scope::Device => (
                Failure::throttled,
                format!("{product_key}/{device_name}"),
                "device quota exceeded: ",
            ),
            Scope::Tenant => (
                Failure::throttled,
                instance.tenant.id.to_string(),
                "tenant quota exceeded: tenant ",
            ),
            Scope::Instance | Scope::Unmapped => (
                Failure::instance_spec_exceeded,
                instance.id.to_string(),
                "instance specification exceeded: instance ",
            ),
        };
        let mut reason = format!("{what}{key} at {}", limit.rate);
        if limit.on_limit == OnLimit::Wait {
            reason.push_str(&format!(
                " (on_limit = \"wait\": waited {} ms, next token in {} ms, max_wait_ms {})",
                waited.as_millis(),
                refusal.wait.as_millis(),
                limit.max_wait.as_millis()
            ));
        }
        if let Some(metrics) = &self.inner.metrics {
            metrics
                .throttled
                .with_label_values(&[&*instance.tenant.id, &*instance.id, refusal.scope.as_str()])
                .inc();
        }
        Throttle {
            failure: failure(reason),
            scope: refusal.scope,
            key,
            tenant: Some(Arc::clone(&instance.tenant.id)),
            instance: Some(Arc::clone(&instance.id)),
            limit_tps: limit.rate.tps,
            burst: limit.rate.burst,
            waited,
        }
    }

    /// Drops the state of idle devices (those whose bucket has refilled, which is lossless)
    /// and returns how many device states remain. Call it on an interval
    /// ([`Limiter::spawn_pruner`]); it holds each shard's lock while it sweeps it.
    pub fn prune(&self) -> usize {
        self.plan().classes().map(|class| class.prune()).sum()
    }

    /// Device states currently held (one per device seen recently).
    pub fn device_states(&self) -> usize {
        self.plan().classes().map(|class| class.store.len()).sum()
    }

    /// Spawns a task that calls [`Limiter::prune`] every `every`; it ends when every other
    /// clone of this limiter is dropped (or when the handle is aborted).
    pub fn spawn_pruner(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let remaining = Limiter { inner }.prune();
                tracing::debug!(remaining, "quota state of idle devices pruned");
            }
        })
    }
}

fn resolved(instance: &InstancePlan) -> Resolved {
    Resolved {
        tenant: Some(Arc::clone(&instance.tenant.id)),
        instance: Some(Arc::clone(&instance.id)),
    }
}

fn unmapped(product_key: &str, instance_hint: Option<&str>) -> Throttle {
    let hint = match instance_hint {
        Some(id) => format!(
            " (the envelope's instanceId {id:?} is not a declared instance, or not of the \
             envelope's tenantId)"
        ),
        None => String::new(),
    };
    Throttle {
        failure: Failure::invalid_parameter(format!(
            "product {product_key:?} is in no [[instance]]{hint} and [quota] unmapped = \
             \"refuse\": add it to the products of an [[instance]], or set [quota] unmapped = \
             \"default_instance\" with a default_instance"
        )),
        scope: Scope::Unmapped,
        key: product_key.to_owned(),
        tenant: None,
        instance: None,
        limit_tps: 0,
        burst: 0,
        waited: Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::quota::{InstanceQuota, TenantQuota};

    fn tenant(id: &str, tps: Option<u32>, burst: Option<u32>) -> TenantQuota {
        TenantQuota {
            id: id.into(),
            forward_tps: tps,
            burst,
            on_limit: None,
            max_wait_ms: None,
        }
    }

    fn instance(id: &str, tenant: &str, products: &[&str], tps: Option<u32>) -> InstanceQuota {
        InstanceQuota {
            id: id.into(),
            tenant: tenant.into(),
            products: products.iter().map(|p| p.to_string()).collect(),
            forward_tps: tps,
            burst: None,
            on_limit: None,
            max_wait_ms: None,
        }
    }

    fn set(tenants: Vec<TenantQuota>, instances: Vec<InstanceQuota>) -> QuotaSet {
        QuotaSet {
            tenants,
            instances,
            ..QuotaSet::default()
        }
    }

    async fn count(l: &Limiter, pk: &str, dn: &str, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            if l.acquire(pk, dn, None, None).await.is_ok() {
                ok += 1;
            }
        }
        ok
    }

    #[tokio::test(start_paused = true)]
    async fn off_allows_everything_and_resolves_nothing() {
        let l = Limiter::disabled();
        assert!(!l.is_enabled());
        for _ in 0..1000 {
            assert_eq!(
                l.acquire("pk", "d", Some("t"), Some("i")).await,
                Ok(Resolved::default())
            );
        }
        assert_eq!(l.resolve("pk", None, None), Ok(Resolved::default()));
        let r = Resolved::default();
        assert_eq!(r.tenant_or(Some("t")), Some("t"));
        assert_eq!(l.device_states(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn refund_restores_the_bucket_exactly() {
        // Tenant 3 msg/s; instance 5 msg/s: the tenant refuses the 4th, and the instance must
        // not have been charged for it.
        let l = Limiter::new(
            &set(
                vec![tenant("t", Some(3), None)],
                vec![instance("i", "t", &["pk"], Some(5))],
            ),
            None,
        );
        assert_eq!(count(&l, "pk", "d", 10).await, 3);
        let plan = l.plan();
        let gate = plan.instances["i"].gate.clone().unwrap();
        // The instance was charged 3 times only: 2 of its 5 tokens remain.
        assert!(gate.bucket.limiter.check().is_ok());
        assert!(gate.bucket.limiter.check().is_ok());
        assert!(gate.bucket.limiter.check().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn tenants_share_no_device_state_and_update_carries_it_over() {
        let mut quotas = set(
            vec![tenant("a", None, None), tenant("b", None, None)],
            vec![
                instance("ia", "a", &["pa"], None),
                instance("ib", "b", &["pb"], None),
            ],
        );
        quotas.quota.device.forward_tps = Some(10);
        let l = Limiter::new(&quotas, None);
        let plan = l.plan();
        let (a, b) = (&plan.tenants["a"].classes, &plan.tenants["b"].classes);
        assert_eq!((a.len(), b.len()), (1, 1));
        assert!(!Arc::ptr_eq(&a[0], &b[0]));
        assert!(l.acquire("pa", "d", None, None).await.is_ok());
        assert_eq!((a[0].store.len(), b[0].store.len()), (1, 0));

        quotas.tenants[1].forward_tps = Some(5);
        l.update(&quotas);
        let next = l.plan();
        assert!(Arc::ptr_eq(&next.tenants["a"].classes[0], &a[0]));
        assert!(Arc::ptr_eq(&next.tenants["b"].classes[0], &b[0]));
        quotas.quota.device.forward_tps = Some(11);
        l.update(&quotas);
        assert!(!Arc::ptr_eq(&l.plan().tenants["a"].classes[0], &a[0]));
    }

    #[test]
    fn fold_hasher_mixes_both_words() {
        let hash = |key: DeviceKey| FoldState.hash_one(key);
        assert_eq!(hash((0, 5)), 5);
        assert_eq!(hash((1, 0)), 1 << 29);
        assert_ne!(hash((1, 2)), hash((2, 1)));
        let mut h = FoldState.build_hasher();
        h.write(&[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(h.finish(), 1);
    }
}
