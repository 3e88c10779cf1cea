//! Quotas in the daemon config: `[[tenant]]`, `[[instance]]` and `[quota]`.
//!
//! The model (see docs/quotas.md for the operator's view):
//! - a **tenant** owns instances; its `forward_tps` caps all forwards of all its instances;
//! - an **instance** belongs to one tenant and serves a set of products; its `forward_tps` is
//!   its specification (over it: 9326);
//! - every **device** (productKey + deviceName) has the `[quota.device]` quota, or its
//!   product's `[quota.device.products.<productKey>]` override (over it: 9324, as for a tenant).
//!
//! A message's productKey resolves it to its instance, and the instance to its tenant. Quotas
//! are on as soon as one `[[tenant]]` or `[[instance]]` is declared; with neither (the
//! embedded default) they are off and the limiter costs one atomic load per forward.
//!
//! Every limit has the same four fields: `forward_tps` (absent: that scope is not limited),
//! `burst` (default: `forward_tps`, i.e. one second's worth), `on_limit` (`"fail"`, the default,
//! or `"wait"`) and `max_wait_ms` (only with `on_limit = "wait"`; default 1000).
//!
//! Validation (`check.rs`) reports every problem at once with its key path; entries of
//! `[[tenant]]` and `[[instance]]` are named by index, `tenant[1].forward_tps`, and the
//! message names the id.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

mod check;
pub(super) use self::check::validate;

/// Highest `forward_tps` accepted (messages per second).
pub const MAX_TPS: u32 = 100_000_000;
/// Highest `burst` accepted (messages).
pub const MAX_BURST: u32 = 100_000_000;
/// Highest `max_wait_ms` accepted. A waiting forward holds its message (and, through the
/// engine's bounded queue, its source) for up to this long.
pub const MAX_WAIT_MS: u64 = 10_000;
/// `max_wait_ms` when `on_limit = "wait"` does not give one.
pub const DEFAULT_MAX_WAIT_MS: u64 = 1_000;

/// What a forward over a quota does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    /// Refuse the forward at once: 9324 (device, tenant) or 9326 (instance). The default.
    #[default]
    Fail,
    /// Wait for a token, up to `max_wait_ms`, then refuse with the same code. Smooths short
    /// bursts; the waiting forward holds its message, which slows the source (backpressure);
    /// nothing is buffered.
    Wait,
}

impl OnLimit {
    /// `"fail"` or `"wait"`, as written in the config.
    pub const fn as_str(self) -> &'static str {
        match self {
            OnLimit::Fail => "fail",
            OnLimit::Wait => "wait",
        }
    }
}

/// What happens to a message whose product is in no `[[instance]]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmapped {
    /// Refuse its forwards with 9321 and a reason naming the product. The default: with quotas
    /// on, every product should be accounted to an instance, and a forgotten one shows up at
    /// once (records, `iotfwd_outcomes_total{code="9321"}`) instead of being charged silently
    /// to someone else's instance.
    #[default]
    Refuse,
    /// Count its forwards against `[quota] default_instance` (and that instance's tenant).
    DefaultInstance,
}

impl Unmapped {
    /// `"refuse"` or `"default_instance"`, as written in the config.
    pub const fn as_str(self) -> &'static str {
        match self {
            Unmapped::Refuse => "refuse",
            Unmapped::DefaultInstance => "default_instance",
        }
    }
}

/// `[[tenant]]`: a tenant and its forwarding quota.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct TenantQuota {
    /// The tenant's id, unique among tenants; records carry it as `tenantId`.
    pub id: String,
    /// Forwards per second allowed for all instances of this tenant together; over it, 9324.
    /// Range 1..=100000000. Absent: the tenant is not limited (its instances still are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_tps: Option<u32>,
    /// Forwards allowed at once after an idle period (the bucket size). Range 1..=100000000.
    /// Default `forward_tps` (one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `"fail"` (default): refuse a forward over the quota at once. `"wait"`: wait up to
    /// `max_wait_ms` for a token first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
    /// With `on_limit = "wait"`: longest wait for a token, in ms. Range 1..=10000.
    /// Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
}

/// `[[instance]]`: an instance, its tenant, its products and its specification.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct InstanceQuota {
    /// The instance's id, unique among instances; records carry it as `instanceId`.
    pub id: String,
    /// The id of the `[[tenant]]` this instance belongs to.
    pub tenant: String,
    /// The productKeys this instance serves. A product belongs to at most one instance.
    #[serde(default)]
    pub products: Vec<String>,
    /// The instance's specification: forwards per second for all its products together;
    /// over it, 9326. Range 1..=100000000. Absent: the instance is not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_tps: Option<u32>,
    /// Forwards allowed at once after an idle period. Range 1..=100000000.
    /// Default `forward_tps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `"fail"` (default) or `"wait"`, as for a tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
    /// With `on_limit = "wait"`: longest wait for a token, in ms. Range 1..=10000.
    /// Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
}

/// `[quota]`: device quotas and what happens to products of no instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct QuotaConfig {
    /// A message whose product is in no `[[instance]]` (and whose envelope names no declared
    /// instance): `"refuse"` (default: its forwards fail with 9321) or `"default_instance"`
    /// (they count against `default_instance`).
    pub unmapped: Unmapped,
    /// The `[[instance]]` id that unmapped products count against; required with, and only
    /// allowed with, `unmapped = "default_instance"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_instance: Option<String>,
    /// `[quota.device]`: the per-device quota.
    pub device: DeviceQuota,
    /// Where the buckets live: `"local"` (default: in this process) or `"redis"` (shared by
    /// every process of a cluster through `[redis]`; see docs/cluster.md). Takes effect at
    /// start.
    pub backend: QuotaBackend,
    /// With `backend = "redis"`, what a forward does while Redis cannot be reached:
    /// `"local"` (default: this process's own buckets at each quota divided by `processes`)
    /// or `"refuse"` (9324 / 9326 with a reason naming the outage).
    pub on_backend_down: OnBackendDown,
    /// With `backend = "redis"`: how many processes share the quotas; the `"local"` fallback
    /// gives each `1/processes` of every quota. Range 1..=1000. Default `1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<u32>,
    /// With `backend = "redis"`: the fewest tokens a process leases from one bucket in one
    /// round trip (fewer only when the bucket's burst is smaller); a busy scope leases more,
    /// see `lease_rate_ms` and [`LeaseSize`]. Larger means fewer round trips; the cluster can
    /// then run ahead of a quota by at most one lease per scope and process.
    /// Range 1..=10000. Default `10`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<u32>,
    /// With `backend = "redis"`: a scope's lease holds up to this many milliseconds of its
    /// own rate when that is more than `lease` (still at most its burst), so a scope with a
    /// high rate (a tenant, an instance) makes at most about `1000 / lease_rate_ms` round
    /// trips a second per process. `0`: every scope leases `lease`. Range 0..=10000, and
    /// not longer than `lease_ttl_ms`. Default `100` (or `lease_ttl_ms` when shorter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_rate_ms: Option<u64>,
    /// With `backend = "redis"`: how long leased tokens stay usable; unused ones are handed
    /// back after it. Range 10..=60000. Default `1000`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl_ms: Option<u64>,
}

impl QuotaConfig {
    /// `processes`, default 1.
    pub fn processes(&self) -> u32 {
        self.processes.unwrap_or(1)
    }

    /// `lease`, default 10.
    pub fn lease(&self) -> u32 {
        self.lease.unwrap_or(10)
    }

    /// `lease_ttl_ms` as a duration, default 1 s.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms.unwrap_or(1000))
    }

    /// `lease_rate_ms`, default 100 (`lease_ttl_ms` when that is shorter).
    pub fn lease_rate_ms(&self) -> u64 {
        self.lease_rate_ms
            .unwrap_or_else(|| self.lease_ttl_ms.unwrap_or(1000).min(100))
    }

    /// How many tokens a process leases from each bucket (`lease`, `lease_rate_ms`).
    pub fn lease_size(&self) -> LeaseSize {
        LeaseSize {
            min: self.lease(),
            rate_ms: self.lease_rate_ms(),
        }
    }
}

/// How many tokens a process leases from a shared bucket of rate `tps`, burst `burst`:
///
/// `min(burst, max(lease, tps × lease_rate_ms / 1000))`
///
/// This is also the margin: a process never holds more unspent tokens of one bucket than
/// this, so in any interval of `t` seconds a scope allows at most
/// `burst + tps × t + processes × lease size` forwards across the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseSize {
    /// `[quota] lease`.
    pub min: u32,
    /// `[quota] lease_rate_ms`.
    pub rate_ms: u64,
}

impl LeaseSize {
    /// The lease of a bucket with this rate (at least 1).
    pub fn of(self, rate: Rate) -> u32 {
        let by_rate = u64::from(rate.tps).saturating_mul(self.rate_ms) / 1000;
        let size = by_rate.max(u64::from(self.min)).min(u64::from(rate.burst));
        u32::try_from(size).unwrap_or(u32::MAX).max(1)
    }
}

/// Where the quota buckets live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaBackend {
    /// In this process (one process, or quotas per process).
    #[default]
    Local,
    /// In Redis, shared by every process (`[redis]`).
    Redis,
}

/// What a forward does while the shared quota backend cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendDown {
    /// This process's own buckets, each quota divided by `[quota] processes`.
    #[default]
    Local,
    /// Refuse with 9324 / 9326, the reason naming the outage.
    Refuse,
}

/// `[quota.device]`: the quota of every device (productKey + deviceName), and per-product
/// overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct DeviceQuota {
    /// Forwards per second allowed for each device; over it, 9324. Range 1..=100000000.
    /// Absent: devices are not limited (unless their product has an override).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_tps: Option<u32>,
    /// Forwards a device may make at once after an idle period. Range 1..=100000000.
    /// Default `forward_tps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `"fail"` (default) or `"wait"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
    /// With `on_limit = "wait"`: longest wait for a token, in ms. Range 1..=10000.
    /// Default 1000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
    /// `[quota.device.products.<productKey>]`: the device quota for that product's devices.
    /// A field it leaves out is taken from `[quota.device]`, except `burst`, which follows
    /// the override's own `forward_tps` when the override sets one.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub products: BTreeMap<String, DeviceOverride>,
}

/// `[quota.device.products.<productKey>]`: the device quota of one product's devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a table")]
pub struct DeviceOverride {
    /// Forwards per second for each device of this product. Range 1..=100000000.
    /// Default `[quota.device] forward_tps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_tps: Option<u32>,
    /// Range 1..=100000000. Default: this override's `forward_tps` when it sets one, else
    /// `[quota.device]`'s burst.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Default `[quota.device] on_limit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
    /// Default `[quota.device] max_wait_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
}

/// A rate: `tps` tokens per second, at most `burst` at once. The identity of a quota: two
/// scopes with equal rates behave alike, and a reload keeps the state of a scope whose rate
/// did not change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rate {
    /// Tokens (forwards) per second, at least 1.
    pub tps: u32,
    /// Bucket size, at least 1.
    pub burst: u32,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} msg/s, burst {}", self.tps, self.burst)
    }
}

/// An effective limit: a rate and what to do over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    pub rate: Rate,
    pub on_limit: OnLimit,
    /// How long `on_limit = "wait"` may wait (zero with `"fail"`).
    pub max_wait: Duration,
}

/// The four limit fields as a scope writes them, before defaults: the same in `[[tenant]]`,
/// `[[instance]]`, `[quota.device]` and its overrides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct LimitFields {
    forward_tps: Option<u32>,
    burst: Option<u32>,
    on_limit: Option<OnLimit>,
    max_wait_ms: Option<u64>,
}

impl LimitFields {
    /// The effective limit; `None` when `forward_tps` is absent (not limited). Out-of-range
    /// values (rejected by validation) are clamped so an unvalidated set never panics.
    fn limit(self) -> Option<Limit> {
        let tps = self.forward_tps?.clamp(1, MAX_TPS);
        let burst = self.burst.unwrap_or(tps).clamp(1, MAX_BURST);
        let on_limit = self.on_limit.unwrap_or_default();
        let max_wait = match on_limit {
            OnLimit::Fail => Duration::ZERO,
            OnLimit::Wait => Duration::from_millis(
                self.max_wait_ms
                    .unwrap_or(DEFAULT_MAX_WAIT_MS)
                    .clamp(1, MAX_WAIT_MS),
            ),
        };
        Some(Limit {
            rate: Rate { tps, burst },
            on_limit,
            max_wait,
        })
    }

    /// An override's fields over `[quota.device]`'s (`base`): a field the override leaves out
    /// is the base's, except `burst`, which follows the override's own `forward_tps` when it
    /// sets one.
    fn over(self, base: LimitFields) -> LimitFields {
        LimitFields {
            forward_tps: self.forward_tps.or(base.forward_tps),
            burst: self.burst.or(self.forward_tps).or(base.burst),
            on_limit: self.on_limit.or(base.on_limit),
            max_wait_ms: self.max_wait_ms.or(base.max_wait_ms),
        }
    }
}

/// `fields()` for each table that spells out the four limit fields.
macro_rules! limit_fields {
    ($($table:ty),+) => {$(
        impl $table {
            /// This table's four limit fields, as written.
            fn fields(&self) -> LimitFields {
                LimitFields {
                    forward_tps: self.forward_tps,
                    burst: self.burst,
                    on_limit: self.on_limit,
                    max_wait_ms: self.max_wait_ms,
                }
            }
        }
    )+};
}

limit_fields!(TenantQuota, InstanceQuota, DeviceQuota, DeviceOverride);

impl TenantQuota {
    /// The tenant's effective limit; `None` when it is not limited.
    pub fn limit(&self) -> Option<Limit> {
        self.fields().limit()
    }
}

impl InstanceQuota {
    /// The instance's effective limit (its specification); `None` when it is not limited.
    pub fn limit(&self) -> Option<Limit> {
        self.fields().limit()
    }
}

impl DeviceQuota {
    /// The default per-device limit; `None` when devices are not limited by default.
    pub fn limit(&self) -> Option<Limit> {
        self.fields().limit()
    }

    /// The per-device limit for the devices of `product_key`: its override merged over the
    /// default, or the default.
    pub fn limit_for(&self, product_key: &str) -> Option<Limit> {
        match self.products.get(product_key) {
            None => self.limit(),
            Some(o) => o.fields().over(self.fields()).limit(),
        }
    }
}

/// Everything the limiter needs from the config: tenants, instances and `[quota]`.
///
/// Build it with `QuotaSet::from(&config)`; hand a new one to `Limiter::update` on reload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuotaSet {
    pub tenants: Vec<TenantQuota>,
    pub instances: Vec<InstanceQuota>,
    pub quota: QuotaConfig,
}

impl QuotaSet {
    /// Quotas are on when at least one tenant or instance is declared.
    pub fn is_enabled(&self) -> bool {
        !self.tenants.is_empty() || !self.instances.is_empty()
    }

    /// This set with every rate and burst divided by `n` (at least 1 each): one process's
    /// share of a cluster's quotas, for `[quota] on_backend_down = "local"`.
    pub fn divided(&self, n: u32) -> QuotaSet {
        let n = n.max(1);
        let div = |v: &mut Option<u32>| {
            if let Some(x) = v {
                *x = (*x / n).max(1);
            }
        };
        let mut set = self.clone();
        for t in &mut set.tenants {
            div(&mut t.forward_tps);
            div(&mut t.burst);
        }
        for i in &mut set.instances {
            div(&mut i.forward_tps);
            div(&mut i.burst);
        }
        div(&mut set.quota.device.forward_tps);
        div(&mut set.quota.device.burst);
        for o in set.quota.device.products.values_mut() {
            div(&mut o.forward_tps);
            div(&mut o.burst);
        }
        set
    }

    /// Parses the quota part of a config text (the whole config is parsed and validated).
    pub fn from_toml_str(text: &str) -> Result<QuotaSet, Vec<ConfigError>> {
        Config::from_toml_str(text, None).map(|config| QuotaSet::from(&config))
    }
}

impl From<&Config> for QuotaSet {
    fn from(config: &Config) -> QuotaSet {
        QuotaSet {
            tenants: config.tenant.clone(),
            instances: config.instance.clone(),
            quota: config.quota.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_the_rate_s_share_between_lease_and_burst() {
        let size = LeaseSize {
            min: 10,
            rate_ms: 100,
        };
        let rate = |tps, burst| Rate { tps, burst };
        // 100 ms of 50 000 msg/s.
        assert_eq!(size.of(rate(50_000, 50_000)), 5_000);
        // A slow scope leases `lease`...
        assert_eq!(size.of(rate(20, 20)), 10);
        // ...never more than its burst.
        assert_eq!(size.of(rate(20, 4)), 4);
        assert_eq!(size.of(rate(50_000, 1_000)), 1_000);
        // lease_rate_ms = 0: `lease` for every scope, as before.
        let flat = LeaseSize {
            min: 10,
            rate_ms: 0,
        };
        assert_eq!(flat.of(rate(50_000, 50_000)), 10);
        // The defaults, and a lease_ttl_ms shorter than the default lease_rate_ms.
        let q = QuotaConfig::default();
        assert_eq!(q.lease_size(), size);
        let q = QuotaConfig {
            lease_ttl_ms: Some(40),
            ..QuotaConfig::default()
        };
        assert_eq!(q.lease_rate_ms(), 40);
    }

    const GOOD: &str = r#"
[[tenant]]
id = "acme"
forward_tps = 100

[[tenant]]
id = "beta"
forward_tps = 50
burst = 200
on_limit = "wait"
max_wait_ms = 250

[[instance]]
id = "acme-1"
tenant = "acme"
products = ["pk1", "pk2"]
forward_tps = 80

[[instance]]
id = "beta-1"
tenant = "beta"
products = ["pk3"]

[quota]
unmapped = "default_instance"
default_instance = "acme-1"

[quota.device]
forward_tps = 10

[quota.device.products.pk2]
forward_tps = 1
burst = 3

[quota.device.products.pk3]
on_limit = "wait"
"#;

    #[test]
    fn a_full_quota_config_loads_with_its_defaults() {
        let set = QuotaSet::from_toml_str(GOOD).unwrap();
        assert!(set.is_enabled());
        let acme = set.tenants[0].limit().unwrap();
        assert_eq!(
            acme.rate,
            Rate {
                tps: 100,
                burst: 100
            }
        );
        assert_eq!(
            (acme.on_limit, acme.max_wait),
            (OnLimit::Fail, Duration::ZERO)
        );
        let beta = set.tenants[1].limit().unwrap();
        assert_eq!(
            beta.rate,
            Rate {
                tps: 50,
                burst: 200
            }
        );
        assert_eq!(beta.max_wait, Duration::from_millis(250));
        assert_eq!(set.instances[0].limit().unwrap().rate.burst, 80);
        assert_eq!(set.instances[1].limit(), None);
        assert_eq!(set.quota.unmapped, Unmapped::DefaultInstance);
        let device = &set.quota.device;
        assert_eq!(
            device.limit_for("pk1").unwrap().rate,
            Rate { tps: 10, burst: 10 }
        );
        assert_eq!(
            device.limit_for("pk2").unwrap().rate,
            Rate { tps: 1, burst: 3 }
        );
        let pk3 = device.limit_for("pk3").unwrap();
        assert_eq!(pk3.rate, Rate { tps: 10, burst: 10 });
        assert_eq!(
            (pk3.on_limit, pk3.max_wait),
            (OnLimit::Wait, Duration::from_millis(DEFAULT_MAX_WAIT_MS))
        );
        // The set round-trips through the config text.
        let config = Config::from_toml_str(GOOD, None).unwrap();
        let text = toml::to_string(&config).unwrap();
        assert_eq!(Config::from_toml_str(&text, None).unwrap(), config);
    }

    #[test]
    fn override_burst_follows_its_own_rate_else_the_default_burst() {
        let text = "[[tenant]]\nid = \"t\"\n[[instance]]\nid = \"i\"\ntenant = \"t\"\n\
                    [quota.device]\nforward_tps = 10\nburst = 30\n\
                    [quota.device.products.a]\nforward_tps = 5\n\
                    [quota.device.products.b]\non_limit = \"wait\"\nmax_wait_ms = 20\n";
        let set = QuotaSet::from_toml_str(text).unwrap();
        let d = &set.quota.device;
        assert_eq!(d.limit_for("a").unwrap().rate, Rate { tps: 5, burst: 5 });
        assert_eq!(d.limit_for("b").unwrap().rate, Rate { tps: 10, burst: 30 });
        assert_eq!(
            d.limit_for("b").unwrap().max_wait,
            Duration::from_millis(20)
        );
        assert_eq!(
            d.limit_for("other").unwrap().rate,
            Rate { tps: 10, burst: 30 }
        );
    }

    #[test]
    fn no_tenants_no_instances_is_quotas_off() {
        let set = QuotaSet::from(&Config::default());
        assert!(!set.is_enabled());
        assert_eq!(set, QuotaSet::default());
        let text = toml::to_string(&Config::default()).unwrap();
        assert!(!text.contains("[[tenant]]"), "{text}");
    }
}
