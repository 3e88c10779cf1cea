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
//! Validation reports every problem at once with its key path; entries of `[[tenant]]` and
//! `[[instance]]` are named by index, `tenant[1].forward_tps`, and the message names the id.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::report::{Reporter, Seg};
use super::{Config, ConfigError};

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

/// Builds a limit from the four fields; `None` when `tps` is absent (not limited). Out-of-range
/// values (rejected by validation) are clamped so an unvalidated set never panics.
fn limit_of(
    tps: Option<u32>,
    burst: Option<u32>,
    on_limit: Option<OnLimit>,
    max_wait_ms: Option<u64>,
) -> Option<Limit> {
    let tps = tps?.clamp(1, MAX_TPS);
    let burst = burst.unwrap_or(tps).clamp(1, MAX_BURST);
    let on_limit = on_limit.unwrap_or_default();
    let max_wait = match on_limit {
        OnLimit::Fail => Duration::ZERO,
        OnLimit::Wait => Duration::from_millis(
            max_wait_ms
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

impl TenantQuota {
    /// The tenant's effective limit; `None` when it is not limited.
    pub fn limit(&self) -> Option<Limit> {
        limit_of(
            self.forward_tps,
            self.burst,
            self.on_limit,
            self.max_wait_ms,
        )
    }
}

impl InstanceQuota {
    /// The instance's effective limit (its specification); `None` when it is not limited.
    pub fn limit(&self) -> Option<Limit> {
        limit_of(
            self.forward_tps,
            self.burst,
            self.on_limit,
            self.max_wait_ms,
        )
    }
}

impl DeviceQuota {
    /// The default per-device limit; `None` when devices are not limited by default.
    pub fn limit(&self) -> Option<Limit> {
        limit_of(
            self.forward_tps,
            self.burst,
            self.on_limit,
            self.max_wait_ms,
        )
    }

    /// The per-device limit for the devices of `product_key`: its override merged over the
    /// default, or the default.
    pub fn limit_for(&self, product_key: &str) -> Option<Limit> {
        match self.products.get(product_key) {
            None => self.limit(),
            Some(o) => {
                let burst = match (o.burst, o.forward_tps) {
                    (Some(burst), _) => Some(burst),
                    (None, Some(tps)) => Some(tps),
                    (None, None) => self.burst,
                };
                limit_of(
                    o.forward_tps.or(self.forward_tps),
                    burst,
                    o.on_limit.or(self.on_limit),
                    o.max_wait_ms.or(self.max_wait_ms),
                )
            }
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

/// The four limit fields of one scope, for validation.
struct LimitFields<'a> {
    path: Vec<Seg<'a>>,
    forward_tps: Option<u32>,
    burst: Option<u32>,
    on_limit: Option<OnLimit>,
    max_wait_ms: Option<u64>,
    /// For an override: what it inherits from `[quota.device]` (tps, on_limit).
    inherited: Option<(Option<u32>, Option<OnLimit>)>,
}

fn check_limit(r: &mut Reporter<'_>, f: &LimitFields<'_>) {
    let at = |field: &'static str| {
        let mut path = f.path.clone();
        path.push(Seg::Key(field));
        path
    };
    if let Some(tps) = f.forward_tps
        && !(1..=MAX_TPS).contains(&tps)
    {
        r.report(
            &[&at("forward_tps")],
            format!("{tps} is out of range (expected 1..={MAX_TPS} messages per second)"),
        );
    }
    if let Some(burst) = f.burst
        && !(1..=MAX_BURST).contains(&burst)
    {
        r.report(
            &[&at("burst")],
            format!("{burst} is out of range (expected 1..={MAX_BURST} messages)"),
        );
    }
    let (inherited_tps, inherited_on_limit) = f.inherited.unwrap_or((None, None));
    if f.forward_tps.or(inherited_tps).is_none() {
        let set = [
            ("burst", f.burst.is_some()),
            ("on_limit", f.on_limit.is_some()),
            ("max_wait_ms", f.max_wait_ms.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
            let whence = if f.inherited.is_some() {
                "neither this override nor [quota.device] sets forward_tps"
            } else {
                "forward_tps is not set"
            };
            r.report(
                &[&at(field)],
                format!("has no effect: {whence}, so this scope is not limited"),
            );
        }
    }
    if let Some(ms) = f.max_wait_ms {
        if !(1..=MAX_WAIT_MS).contains(&ms) {
            r.report(
                &[&at("max_wait_ms")],
                format!("{ms} is out of range (expected 1..={MAX_WAIT_MS} milliseconds)"),
            );
        }
        if f.on_limit.or(inherited_on_limit).unwrap_or_default() != OnLimit::Wait {
            r.report(
                &[&at("max_wait_ms"), &at("on_limit")],
                "only applies with on_limit = \"wait\" (on_limit is \"fail\", the default, \
                 when not set)"
                    .to_owned(),
            );
        }
    }
}

/// Reports every problem of `[[tenant]]`, `[[instance]]` and `[quota]` into `r`.
pub(super) fn validate(config: &Config, r: &mut Reporter<'_>) {
    let enabled = !config.tenant.is_empty() || !config.instance.is_empty();

    // Tenants: ids and limits.
    let mut tenant_index: HashMap<&str, usize> = HashMap::new();
    for (i, t) in config.tenant.iter().enumerate() {
        let base = [Seg::Key("tenant"), Seg::Index(i)];
        let id_path = [Seg::Key("tenant"), Seg::Index(i), Seg::Key("id")];
        if t.id.trim().is_empty() {
            r.report(&[&id_path], "must not be empty".to_owned());
        } else if let Some(&first) = tenant_index.get(t.id.as_str()) {
            r.report(
                &[&id_path],
                format!(
                    "tenant {:?} is declared twice (first as tenant[{first}])",
                    t.id
                ),
            );
        } else {
            tenant_index.insert(&t.id, i);
        }
        check_limit(
            r,
            &LimitFields {
                path: base.to_vec(),
                forward_tps: t.forward_tps,
                burst: t.burst,
                on_limit: t.on_limit,
                max_wait_ms: t.max_wait_ms,
                inherited: None,
            },
        );
    }

    // Instances: ids, tenants, products and limits.
    let mut instance_index: HashMap<&str, usize> = HashMap::new();
    let mut product_owner: HashMap<&str, usize> = HashMap::new();
    for (i, inst) in config.instance.iter().enumerate() {
        let base = [Seg::Key("instance"), Seg::Index(i)];
        let id_path = [Seg::Key("instance"), Seg::Index(i), Seg::Key("id")];
        let tenant_path = [Seg::Key("instance"), Seg::Index(i), Seg::Key("tenant")];
        if inst.id.trim().is_empty() {
            r.report(&[&id_path], "must not be empty".to_owned());
        } else if let Some(&first) = instance_index.get(inst.id.as_str()) {
            r.report(
                &[&id_path],
                format!(
                    "instance {:?} is declared twice (first as instance[{first}])",
                    inst.id
                ),
            );
        } else {
            instance_index.insert(&inst.id, i);
        }
        if inst.tenant.trim().is_empty() {
            r.report(
                &[&tenant_path],
                "must name the [[tenant]] this instance belongs to".to_owned(),
            );
        } else if !tenant_index.contains_key(inst.tenant.as_str()) {
            let declared = if config.tenant.is_empty() {
                "no [[tenant]] is declared".to_owned()
            } else {
                // Each declared id once, in file order.
                let ids: Vec<String> = config
                    .tenant
                    .iter()
                    .enumerate()
                    .filter(|(j, t)| tenant_index.get(t.id.as_str()) == Some(j))
                    .map(|(_, t)| format!("{:?}", t.id))
                    .collect();
                let more = if ids.len() > 10 { ", ..." } else { "" };
                let ids = &ids[..ids.len().min(10)];
                format!("declared: {}{more}", ids.join(", "))
            };
            r.report(
                &[&tenant_path],
                format!(
                    "{:?} is not a declared tenant ({declared}); instance {:?}",
                    inst.tenant, inst.id
                ),
            );
        }
        let mut own: HashMap<&str, usize> = HashMap::new();
        for (k, product) in inst.products.iter().enumerate() {
            let path = [
                Seg::Key("instance"),
                Seg::Index(i),
                Seg::Key("products"),
                Seg::Index(k),
            ];
            if product.is_empty() {
                r.report(&[&path], "an empty productKey".to_owned());
                continue;
            }
            if own.insert(product, k).is_some() {
                r.report(
                    &[&path],
                    format!(
                        "product {product:?} is listed twice in instance {:?}",
                        inst.id
                    ),
                );
                continue;
            }
            match product_owner.get(product.as_str()) {
                Some(&j) => r.report(
                    &[&path],
                    format!(
                        "product {product:?} is already in instance {:?} (instance[{j}]); \
                         a product belongs to one instance",
                        config.instance[j].id
                    ),
                ),
                None => {
                    product_owner.insert(product, i);
                }
            }
        }
        check_limit(
            r,
            &LimitFields {
                path: base.to_vec(),
                forward_tps: inst.forward_tps,
                burst: inst.burst,
                on_limit: inst.on_limit,
                max_wait_ms: inst.max_wait_ms,
                inherited: None,
            },
        );
    }
    if !config.tenant.is_empty() && config.instance.is_empty() {
        r.report(
            &[
                &[Seg::Key("instance")],
                &[Seg::Key("tenant"), Seg::Index(0)],
            ],
            "none is declared, but [[tenant]] is: quotas resolve each message's product to an \
             [[instance]] (and it to its tenant), so declare at least one"
                .to_owned(),
        );
    }

    // [quota]: unmapped products.
    let quota = &config.quota;
    let unmapped_path = [Seg::Key("quota"), Seg::Key("unmapped")];
    let default_path = [Seg::Key("quota"), Seg::Key("default_instance")];
    if enabled {
        match (quota.unmapped, &quota.default_instance) {
            (Unmapped::DefaultInstance, None) => r.report(
                &[&default_path, &unmapped_path],
                "required with quota.unmapped = \"default_instance\" (the [[instance]] id that \
                 products of no instance count against)"
                    .to_owned(),
            ),
            (Unmapped::DefaultInstance, Some(id)) if !instance_index.contains_key(id.as_str()) => r
                .report(
                    &[&default_path],
                    format!("{id:?} is not a declared [[instance]]"),
                ),
            (Unmapped::Refuse, Some(_)) => r.report(
                &[&default_path],
                "is never used: quota.unmapped is \"refuse\" (the default); set quota.unmapped \
                 = \"default_instance\" to send products of no instance there"
                    .to_owned(),
            ),
            _ => {}
        }
    }

    // [quota.device] and its overrides.
    let device = &quota.device;
    check_limit(
        r,
        &LimitFields {
            path: vec![Seg::Key("quota"), Seg::Key("device")],
            forward_tps: device.forward_tps,
            burst: device.burst,
            on_limit: device.on_limit,
            max_wait_ms: device.max_wait_ms,
            inherited: None,
        },
    );
    for (product, o) in &device.products {
        let path = vec![
            Seg::Key("quota"),
            Seg::Key("device"),
            Seg::Key("products"),
            Seg::Key(product),
        ];
        if product.is_empty() {
            r.report(&[&path], "an empty productKey".to_owned());
        }
        check_limit(
            r,
            &LimitFields {
                path,
                forward_tps: o.forward_tps,
                burst: o.burst,
                on_limit: o.on_limit,
                max_wait_ms: o.max_wait_ms,
                inherited: Some((device.forward_tps, device.on_limit)),
            },
        );
    }

    if !enabled && *quota != QuotaConfig::default() {
        r.report(
            &[
                &[Seg::Key("quota")],
                &[Seg::Key("quota"), Seg::Key("device")],
            ],
            "has no effect: quotas are off because no [[tenant]] or [[instance]] is declared"
                .to_owned(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn errors(text: &str) -> Vec<String> {
        Config::from_toml_str(text, Some(Path::new("q.toml")))
            .expect_err("config should be rejected")
            .iter()
            .map(ToString::to_string)
            .collect()
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

    #[test]
    fn every_quota_problem_is_reported_with_its_path_and_position() {
        let text = r#"[[tenant]]
id = "acme"
forward_tps = 0

[[tenant]]
id = "acme"
burst = 5

[[instance]]
id = "i1"
tenant = "acme"
products = ["pk1", "pk1"]
on_limit = "wait"
forward_tps = 10
max_wait_ms = 60000

[[instance]]
id = "i2"
tenant = "nobody"
products = ["pk1"]
forward_tps = 5
max_wait_ms = 100

[quota]
default_instance = "i1"

[quota.device]
burst = 4

[quota.device.products.pk9]
on_limit = "wait"
"#;
        let errs = errors(text);
        assert_eq!(
            errs,
            [
                "q.toml:3:15: tenant[0].forward_tps: 0 is out of range (expected 1..=100000000 messages per second)",
                "q.toml:6:6: tenant[1].id: tenant \"acme\" is declared twice (first as tenant[0])",
                "q.toml:7:9: tenant[1].burst: has no effect: forward_tps is not set, so this scope is not limited",
                "q.toml:12:20: instance[0].products[1]: product \"pk1\" is listed twice in instance \"i1\"",
                "q.toml:15:15: instance[0].max_wait_ms: 60000 is out of range (expected 1..=10000 milliseconds)",
                "q.toml:19:10: instance[1].tenant: \"nobody\" is not a declared tenant (declared: \"acme\"); instance \"i2\"",
                "q.toml:20:13: instance[1].products[0]: product \"pk1\" is already in instance \"i1\" (instance[0]); a product belongs to one instance",
                "q.toml:22:15: instance[1].max_wait_ms: only applies with on_limit = \"wait\" (on_limit is \"fail\", the default, when not set)",
                "q.toml:25:20: quota.default_instance: is never used: quota.unmapped is \"refuse\" (the default); set quota.unmapped = \"default_instance\" to send products of no instance there",
                "q.toml:28:9: quota.device.burst: has no effect: forward_tps is not set, so this scope is not limited",
                "q.toml:31:12: quota.device.products.pk9.on_limit: has no effect: neither this override nor [quota.device] sets forward_tps, so this scope is not limited",
            ]
        );
    }

    #[test]
    fn unmapped_default_instance_must_name_a_declared_instance() {
        let base = "[[tenant]]\nid = \"t\"\n[[instance]]\nid = \"i\"\ntenant = \"t\"\n[quota]\n";
        let errs = errors(&format!("{base}unmapped = \"default_instance\"\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("q.toml:7:12: quota.default_instance: required with"),
            "{errs:?}"
        );
        let errs = errors(&format!(
            "{base}unmapped = \"default_instance\"\ndefault_instance = \"x\"\n"
        ));
        assert_eq!(
            errs,
            ["q.toml:8:20: quota.default_instance: \"x\" is not a declared [[instance]]"]
        );
        let ok = format!("{base}unmapped = \"default_instance\"\ndefault_instance = \"i\"\n");
        assert!(Config::from_toml_str(&ok, None).is_ok());
        let errs = errors(&format!("{base}unmapped = \"everywhere\"\n"));
        assert!(errs[0].contains("quota.unmapped"), "{errs:?}");
    }

    #[test]
    fn tenants_without_instances_and_quota_without_tenants_are_errors() {
        let errs = errors("[[tenant]]\nid = \"t\"\nforward_tps = 5\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("q.toml:1:1: instance: none is declared"),
            "{errs:?}"
        );

        let errs = errors("[quota.device]\nforward_tps = 5\n");
        assert_eq!(
            errs,
            [
                "q.toml:1:2: quota: has no effect: quotas are off because no [[tenant]] or \
              [[instance]] is declared"
            ]
        );
        // An explicit default is harmless.
        assert!(Config::from_toml_str("[quota]\nunmapped = \"refuse\"\n", None).is_ok());
    }

    #[test]
    fn missing_and_empty_ids_are_errors() {
        let errs = errors("[[tenant]]\nforward_tps = 5\n");
        assert!(errs[0].contains("id"), "{errs:?}");
        let errs = errors(
            "[[tenant]]\nid = \"\"\n[[instance]]\nid = \" \"\ntenant = \"\"\nproducts = [\"\"]\n",
        );
        assert_eq!(
            errs,
            [
                "q.toml:2:6: tenant[0].id: must not be empty",
                "q.toml:4:6: instance[0].id: must not be empty",
                "q.toml:5:10: instance[0].tenant: must name the [[tenant]] this instance belongs to",
                "q.toml:6:13: instance[0].products[0]: an empty productKey",
            ]
        );
        let errs = errors("[[tenant]]\nid = \"t\"\nfoward_tps = 5\n");
        assert!(errs[0].contains("foward_tps"), "{errs:?}");
    }
}
