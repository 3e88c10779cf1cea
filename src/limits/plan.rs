//! The quota plan: one [`QuotaSet`] resolved into what a check reads, and carried over on
//! reload.
//!
//! The config speaks of tenants, instances with their products, and device quotas with
//! per-product overrides; a check needs, for one productKey, its instance, that instance's
//! tenant, and its device class, each with its bucket. [`Plan::build`] does that resolution
//! once per quota set, so a check is a few map look-ups. A plan is immutable: a reload builds
//! a new one, and forwards already under way finish under the one they started with.
//!
//! Tenants and instances each have one [`Bucket`]. Devices have one [`DeviceClass`] per
//! tenant and distinct rate (`forward_tps`, `burst`): the `[quota.device]` default is one
//! class, and each per-product override with a different rate another. Classes are per
//! tenant so that tenants share no mutable state when they check.
//!
//! Carry-over: building a plan from the previous one keeps the bucket of every tenant,
//! instance and device class whose rate did not change; a changed rate starts with a full
//! bucket. `on_limit` and `max_wait_ms` are not part of a bucket, so changing them keeps it.

use std::sync::Arc;

use super::buckets::{Bucket, DeviceClass, TokioClock};
use super::hash::FxMap;
use crate::config::quota::{Limit, QuotaSet, Rate, Unmapped};

/// A tenant's or instance's limit and its bucket.
#[derive(Clone)]
pub(super) struct Gate {
    pub(super) bucket: Arc<Bucket>,
    pub(super) limit: Limit,
}

pub(super) struct TenantPlan {
    pub(super) id: Arc<str>,
    pub(super) gate: Option<Gate>,
    /// This tenant's device classes, one per distinct device rate, indexed as
    /// [`DeviceRule::class`]. Per tenant, so tenants share no mutable state when they check.
    pub(super) classes: Vec<Arc<DeviceClass>>,
}

pub(super) struct InstancePlan {
    pub(super) id: Arc<str>,
    pub(super) tenant: Arc<TenantPlan>,
    pub(super) gate: Option<Gate>,
}

/// The device limit of a product: its limit and the index of its class in each tenant.
#[derive(Clone, Copy)]
pub(super) struct DeviceRule {
    pub(super) class: usize,
    pub(super) limit: Limit,
}

/// One quota set, resolved: what `acquire` reads. Immutable; `update` builds a new one.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) enabled: bool,
    pub(super) tenants: FxMap<Arc<TenantPlan>>,
    pub(super) instances: FxMap<Arc<InstancePlan>>,
    products: FxMap<Arc<InstancePlan>>,
    /// Where unmapped products go; `None`: refused.
    unmapped: Option<Arc<InstancePlan>>,
    device_default: Option<DeviceRule>,
    /// Products with a `[quota.device.products.<pk>]` override (`None`: not limited).
    device_products: FxMap<Option<DeviceRule>>,
}

impl Plan {
    /// Builds the plan for `set`, carrying over the buckets of `prev` whose rate is unchanged.
    pub(super) fn build(set: &QuotaSet, prev: &Plan, clock: TokioClock) -> Plan {
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
                    .unwrap_or_else(|| Arc::new(Bucket::new(limit.rate, clock))),
                limit,
            })
        };
        let tenant = |id: &str, limit: Option<Limit>| {
            let old = prev.tenants.get(id);
            let classes = rates
                .iter()
                .map(|&rate| {
                    old.and_then(|t| t.classes.iter().find(|c| c.rate() == rate))
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
    pub(super) fn instance_for(
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

    /// The device limit of `product_key`'s devices; `None`: they are not limited.
    pub(super) fn device_rule(&self, product_key: &str) -> Option<DeviceRule> {
        match self.device_products.get(product_key) {
            Some(rule) => *rule,
            None => self.device_default,
        }
    }

    /// Every device class of every tenant.
    pub(super) fn classes(&self) -> impl Iterator<Item = &Arc<DeviceClass>> {
        self.tenants.values().flat_map(|t| t.classes.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limiter;
    use crate::limits::tests::{instance, set, tenant};

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
        assert_eq!((a[0].devices(), b[0].devices()), (1, 0));

        quotas.tenants[1].forward_tps = Some(5);
        l.update(&quotas);
        let next = l.plan();
        assert!(Arc::ptr_eq(&next.tenants["a"].classes[0], &a[0]));
        assert!(Arc::ptr_eq(&next.tenants["b"].classes[0], &b[0]));
        quotas.quota.device.forward_tps = Some(11);
        l.update(&quotas);
        assert!(!Arc::ptr_eq(&l.plan().tenants["a"].classes[0], &a[0]));
    }
}
