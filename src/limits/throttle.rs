//! What a refused forward becomes: the scope that refused it, its code (9324, 9326 or 9321),
//! the reason an operator reads in its record, and its count in `iotfwd_throttled_total`.
//!
//! Apart from the limiter so that every reason's wording, the one thing operators read,
//! stands in one place, next to the choice of code it explains.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::plan::InstancePlan;
use crate::config::quota::{Limit, OnLimit};
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

    /// The failure of a forward whose product is in no instance while `[quota] unmapped =
    /// "refuse"`: 9321, naming the product and both fixes.
    pub(super) fn unmapped(product_key: &str, instance_hint: Option<&str>) -> Throttle {
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
}

/// Why one attempt was refused.
pub(super) struct Refusal {
    pub(super) scope: Scope,
    pub(super) limit: Limit,
    /// Until the refusing scope's next token.
    pub(super) wait: Duration,
}

impl Refusal {
    /// The failure of a forward while the shared quota backend cannot be reached and
    /// `[quota] on_backend_down = "refuse"`: the code of this scope (9324, or 9326 for an
    /// instance), the reason naming the outage.
    pub(super) fn backend_down(
        &self,
        instance: &InstancePlan,
        product_key: &str,
        device_name: &str,
        backend: &str,
        error: &str,
        metrics: Option<&Metrics>,
    ) -> Throttle {
        let (scope, limit) = (self.scope, self.limit);
        let (failure, key): (fn(String) -> Failure, _) = match scope {
            Scope::Device => (Failure::throttled, format!("{product_key}/{device_name}")),
            Scope::Tenant => (Failure::throttled, instance.tenant.id.to_string()),
            Scope::Instance | Scope::Unmapped => {
                (Failure::instance_spec_exceeded, instance.id.to_string())
            }
        };
        if let Some(metrics) = metrics {
            metrics
                .throttled
                .with_label_values(&[&*instance.tenant.id, &*instance.id, scope.as_str()])
                .inc();
        }
        Throttle {
            failure: failure(format!(
                "the shared quota backend (Redis at {backend}) cannot be reached ({error}), so \
                 the {scope} quota of {key} cannot be checked and [quota] on_backend_down = \
                 \"refuse\""
            )),
            scope,
            key,
            tenant: Some(Arc::clone(&instance.tenant.id)),
            instance: Some(Arc::clone(&instance.id)),
            limit_tps: limit.rate.tps,
            burst: limit.rate.burst,
            waited: Duration::ZERO,
        }
    }

    /// The failure of a forward that `instance` (or its tenant, or the device) refused after
    /// it `waited`; counts it in `iotfwd_throttled_total`.
    pub(super) fn throttle(
        &self,
        instance: &InstancePlan,
        product_key: &str,
        device_name: &str,
        waited: Duration,
        metrics: Option<&Metrics>,
    ) -> Throttle {
        let limit = self.limit;
        let (failure, key, what): (fn(String) -> Failure, _, _) = match self.scope {
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
                self.wait.as_millis(),
                limit.max_wait.as_millis()
            ));
        }
        if let Some(metrics) = metrics {
            metrics
                .throttled
                .with_label_values(&[&*instance.tenant.id, &*instance.id, self.scope.as_str()])
                .inc();
        }
        Throttle {
            failure: failure(reason),
            scope: self.scope,
            key,
            tenant: Some(Arc::clone(&instance.tenant.id)),
            instance: Some(Arc::clone(&instance.id)),
            limit_tps: limit.rate.tps,
            burst: limit.rate.burst,
            waited,
        }
    }
}
