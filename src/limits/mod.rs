//! Forwarding quotas: per device, per instance and per tenant (9324, 9326), on governor.
//!
//! Each forward (one action of one matching rule for one message) is counted once against
//! its device's quota, its instance's specification and its tenant's quota, before the action
//! runs: [`Limiter::acquire`]. The configuration model is in [`crate::config::quota`]; the
//! operator's view in docs/quotas.md.
//!
//! One job per file: this one holds the limiter (resolution, check order, refunds on refusal,
//! waiting, the public API); `plan.rs` resolves a quota set into what a check reads and
//! carries state over on reload; `buckets.rs` holds the token buckets (clock, governor state
//! stores, refund), the layer a shared store for cluster mode would plug into; `hash.rs` the
//! device fingerprint and the maps' hashers; `throttle.rs` what a refusal becomes (code,
//! reason, metric); `shared.rs` the same buckets kept in Redis for a cluster
//! (`[quota] backend = "redis"`, [`Limiter::shared`]), leased in batches sized by each
//! scope's rate.
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
//! does the latter: when a later scope refuses, the tokens already taken in this attempt are
//! refunded (`buckets.rs` says how, and why it is exact), in the same synchronous step as the
//! take. The happy path, where no scope refuses, costs one check per scope and nothing more.
//! Tests pin the edge exactly.
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
//! Tenants and instances each have one bucket; devices have one bucket per device, in a
//! device class per tenant and distinct rate (`plan.rs`), keyed by a 128-bit fingerprint of
//! (productKey, deviceName) (`hash.rs`).
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
//! The buckets run on tokio's clock ([`tokio::time::Instant`]), so waits and buckets agree,
//! and tests drive both with paused time.

mod buckets;
mod hash;
mod plan;
mod shared;
mod throttle;

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures::future::Either;

use self::buckets::{DeviceClass, TokioClock};
use self::hash::{DeviceKey, Fingerprint};
use self::plan::{InstancePlan, Plan};
use self::shared::{Shared, SharedBuckets};
use self::throttle::Refusal;
pub use self::throttle::{Scope, Throttle};
use crate::config::quota::{Limit, OnLimit, QuotaSet};
use crate::config::redis::RedisConfig;
use crate::telemetry::Metrics;

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

/// The future of an `acquire` that does not decide at once.
type BoxedAcquire<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<Resolved, Throttle>> + Send + 'a>>;

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
    fingerprint: Fingerprint,
    metrics: Option<Arc<Metrics>>,
    /// With `[quota] backend = "redis"`: the shared buckets (`shared.rs`).
    shared: Option<Shared>,
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
        let clock = TokioClock::new();
        let plan = Plan::build(set, &Plan::default(), clock);
        Limiter {
            inner: Arc::new(Inner {
                enabled: AtomicBool::new(plan.enabled),
                generation: AtomicU64::new(GENERATIONS.fetch_add(1, Ordering::Relaxed)),
                plan: RwLock::new(Arc::new(plan)),
                update: Mutex::new(()),
                clock,
                fingerprint: Fingerprint::new(),
                metrics,
                shared: None,
            }),
        }
    }

    /// The limiter of one process of a cluster (`[quota] backend = "redis"`): the same
    /// resolution, scopes and codes as [`Limiter::new`], with the buckets in Redis
    /// (`shared.rs` says how leases keep that cheap). Nothing is sent to Redis before the
    /// first forward. `Err` names what is wrong with `[redis]`.
    pub fn shared(
        set: &QuotaSet,
        redis: &RedisConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Limiter, String> {
        let q = &set.quota;
        let buckets = Arc::new(SharedBuckets::new(redis, q.lease_size(), q.lease_ttl())?);
        if let Some(m) = &metrics {
            m.export_quota_backend_gauge();
        }
        let fallback = Limiter::new(&set.divided(q.processes()), metrics.clone());
        let mut limiter = Limiter::new(set, metrics);
        Arc::get_mut(&mut limiter.inner).expect("just made").shared = Some(Shared {
            buckets,
            on_down: q.on_backend_down,
            fallback,
            processes: q.processes(),
        });
        Ok(limiter)
    }

    /// With `[quota] backend = "redis"`: the server (no password) and whether it answered the
    /// last call. `None` for local quotas.
    pub fn backend(&self) -> Option<(String, bool)> {
        let shared = self.inner.shared.as_ref()?;
        Some((shared.buckets.url().to_owned(), shared.buckets.is_up()))
    }

    /// With `[quota] backend = "redis"`: how many calls this limiter has made to Redis so far
    /// (one per forward at most; none while leases last). `None` for local quotas.
    pub fn backend_calls(&self) -> Option<u64> {
        Some(self.inner.shared.as_ref()?.buckets.calls())
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
        if let Some(shared) = &self.inner.shared {
            shared.fallback.update(&set.divided(shared.processes));
        }
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
                None => Err(Throttle::unmapped(product_key, instance_hint)),
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
        if let Some(shared) = &self.inner.shared
            && self.is_enabled()
        {
            let shared =
                self.acquire_shared(shared, product_key, device_name, tenant_hint, instance_hint);
            return Either::Right(Box::pin(shared) as BoxedAcquire<'a>);
        }
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
            )) as BoxedAcquire<'a>),
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
            return Step::Done(Err(Throttle::unmapped(product_key, instance_hint)));
        };
        let device = plan.device_rule(product_key).map(|rule| {
            (
                &*instance.tenant.classes[rule.class],
                rule.limit,
                self.inner.fingerprint.of(product_key, device_name),
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
            Err(refusal) => Step::Done(Err(refusal.throttle(
                instance,
                product_key,
                device_name,
                waited,
                self.inner.metrics.as_deref(),
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
        let _pinned = self.inner.clock.pin();
        let refusal = |scope, limit: Limit, wait: Duration| Refusal { scope, limit, wait };
        if let Some((class, limit, key)) = device
            && let Err(wait) = class.take(&key)
        {
            return Err(refusal(Scope::Device, limit, wait));
        }
        if let Some(gate) = &instance.gate
            && let Err(wait) = gate.bucket.take()
        {
            if let Some((class, _, key)) = device {
                class.refund(key);
            }
            return Err(refusal(Scope::Instance, gate.limit, wait));
        }
        if let Some(gate) = &instance.tenant.gate
            && let Err(wait) = gate.bucket.take()
        {
            if let Some(instance_gate) = &instance.gate {
                instance_gate.bucket.refund();
            }
            if let Some((class, _, key)) = device {
                class.refund(key);
            }
            return Err(refusal(Scope::Tenant, gate.limit, wait));
        }
        Ok(())
    }

    /// Drops the state of idle devices (those whose bucket has refilled, which is lossless)
    /// and returns how many device states remain. Call it on an interval
    /// ([`Limiter::spawn_pruner`]); it holds each shard's lock while it sweeps it.
    pub fn prune(&self) -> usize {
        self.plan().classes().map(|class| class.prune()).sum()
    }

    /// Device states currently held (one per device seen recently).
    pub fn device_states(&self) -> usize {
        self.plan().classes().map(|class| class.devices()).sum()
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
                if let Some(shared) = &inner.shared {
                    shared.buckets.hand_back_expired().await;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::quota::{InstanceQuota, TenantQuota};

    pub(super) fn tenant(id: &str, tps: Option<u32>, burst: Option<u32>) -> TenantQuota {
        TenantQuota {
            id: id.into(),
            forward_tps: tps,
            burst,
            on_limit: None,
            max_wait_ms: None,
        }
    }

    pub(super) fn instance(
        id: &str,
        tenant: &str,
        products: &[&str],
        tps: Option<u32>,
    ) -> InstanceQuota {
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

    pub(super) fn set(tenants: Vec<TenantQuota>, instances: Vec<InstanceQuota>) -> QuotaSet {
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
        assert!(gate.bucket.take().is_ok());
        assert!(gate.bucket.take().is_ok());
        assert!(gate.bucket.take().is_err());
    }
}
