//! Validation of `[[tenant]]`, `[[instance]]` and `[quota]`: every problem at once, with its
//! key path through the arrays (`tenant[1].forward_tps`, `instance[0].products[2]`) and a
//! message that names the entry's id.
//!
//! Kept apart from the model (`mod.rs`): the model says what a quota means, this file what a
//! config may not say, and each is as long as a whole other section. Settings that would
//! silently do nothing are errors too (`burst` without `forward_tps`, `[quota]` while quotas
//! are off), since an operator who wrote them expected an effect.

use std::collections::HashMap;

use super::{LimitFields, MAX_BURST, MAX_TPS, MAX_WAIT_MS, OnLimit, QuotaConfig, Unmapped};
use crate::config::Config;
use crate::config::report::{Reporter, Seg};

/// Checks one scope's limit fields (at `path`); `inherited` is what an override takes from
/// `[quota.device]`.
fn check_limit(
    r: &mut Reporter<'_>,
    path: &[Seg<'_>],
    f: LimitFields,
    inherited: Option<LimitFields>,
) {
    let at = |field: &'static str| {
        let mut path = path.to_vec();
        path.push(Seg::Key(field));
        path
    };
    if let Some(tps) = f.forward_tps {
        r.in_range(&at("forward_tps"), tps, 1..=MAX_TPS, " messages per second");
    }
    if let Some(burst) = f.burst {
        r.in_range(&at("burst"), burst, 1..=MAX_BURST, " messages");
    }
    let base = inherited.unwrap_or_default();
    if f.forward_tps.or(base.forward_tps).is_none() {
        let set = [
            ("burst", f.burst.is_some()),
            ("on_limit", f.on_limit.is_some()),
            ("max_wait_ms", f.max_wait_ms.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
            let whence = if inherited.is_some() {
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
        r.in_range(&at("max_wait_ms"), ms, 1..=MAX_WAIT_MS, " milliseconds");
        if f.on_limit.or(base.on_limit).unwrap_or_default() != OnLimit::Wait {
            r.report(
                &[&at("max_wait_ms"), &at("on_limit")],
                "only applies with on_limit = \"wait\" (on_limit is \"fail\", the default, \
                 when not set)"
                    .to_owned(),
            );
        }
    }
}

/// Checks the id of the entry `table[i]`: not empty, and not declared before (`declared`
/// maps each id to the entry that declared it first, and gets this one when it is new).
fn check_id<'c>(
    r: &mut Reporter<'_>,
    declared: &mut HashMap<&'c str, usize>,
    table: &'static str,
    i: usize,
    id: &'c str,
) {
    let path = [Seg::Key(table), Seg::Index(i), Seg::Key("id")];
    if id.trim().is_empty() {
        r.report(&[&path], "must not be empty".to_owned());
    } else if let Some(&first) = declared.get(id) {
        r.report(
            &[&path],
            format!("{table} {id:?} is declared twice (first as {table}[{first}])"),
        );
    } else {
        declared.insert(id, i);
    }
}

/// Reports every problem of `[[tenant]]`, `[[instance]]` and `[quota]` into `r`.
pub(in crate::config) fn validate(config: &Config, r: &mut Reporter<'_>) {
    check_backend(config, r);
    let enabled = !config.tenant.is_empty() || !config.instance.is_empty();

    // Tenants: ids and limits.
    let mut tenant_index: HashMap<&str, usize> = HashMap::new();
    for (i, t) in config.tenant.iter().enumerate() {
        let base = [Seg::Key("tenant"), Seg::Index(i)];
        check_id(r, &mut tenant_index, "tenant", i, &t.id);
        check_limit(r, &base, t.fields(), None);
    }

    // Instances: ids, tenants, products and limits.
    let mut instance_index: HashMap<&str, usize> = HashMap::new();
    let mut product_owner: HashMap<&str, usize> = HashMap::new();
    for (i, inst) in config.instance.iter().enumerate() {
        let base = [Seg::Key("instance"), Seg::Index(i)];
        let tenant_path = [Seg::Key("instance"), Seg::Index(i), Seg::Key("tenant")];
        check_id(r, &mut instance_index, "instance", i, &inst.id);
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
        check_limit(r, &base, inst.fields(), None);
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
        &[Seg::Key("quota"), Seg::Key("device")],
        device.fields(),
        None,
    );
    for (product, o) in &device.products {
        let path = [
            Seg::Key("quota"),
            Seg::Key("device"),
            Seg::Key("products"),
            Seg::Key(product),
        ];
        if product.is_empty() {
            r.report(&[&path], "an empty productKey".to_owned());
        }
        check_limit(r, &path, o.fields(), Some(device.fields()));
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

/// `[quota] backend` and its settings; `[redis]` is validated on its own.
fn check_backend(config: &Config, r: &mut Reporter<'_>) {
    let q = &config.quota;
    let at = |key: &'static str| [Seg::Key("quota"), Seg::Key(key)];
    if let Some(n) = q.processes {
        r.in_range(&at("processes"), n, 1..=1000, "");
    }
    if let Some(n) = q.lease {
        r.in_range(&at("lease"), n, 1..=10_000, "");
    }
    if let Some(ms) = q.lease_ttl_ms {
        r.in_range(&at("lease_ttl_ms"), ms, 10..=60_000, " ms");
    }
    if let Some(ms) = q.lease_rate_ms {
        r.in_range(&at("lease_rate_ms"), ms, 0..=10_000, " ms");
        let ttl = q.lease_ttl().as_millis();
        if (1..=10_000).contains(&ms) && u128::from(ms) > ttl {
            r.report(
                &[&at("lease_rate_ms")],
                format!(
                    "{ms} ms is longer than lease_ttl_ms ({ttl} ms): a lease would hold more of \
                     a scope's rate than its lifetime lets it spend, and hand the rest back"
                ),
            );
        }
    }
    if q.backend == super::QuotaBackend::Redis && config.redis.is_none() {
        r.report(
            &[&at("backend")],
            "is \"redis\" but there is no [redis] section with the server's url".to_owned(),
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
    fn a_lease_rate_out_of_range_or_longer_than_the_lease_ttl_is_named() {
        let base = "[[tenant]]\nid = \"t\"\nforward_tps = 5\n\
                    [[instance]]\nid = \"i\"\ntenant = \"t\"\n[quota]\n";
        let errs = errors(&format!("{base}lease_rate_ms = 20000\n"));
        assert_eq!(
            errs,
            ["q.toml:8:17: quota.lease_rate_ms: 20000 is out of range (expected 0..=10000 ms)"]
        );
        let errs = errors(&format!("{base}lease_ttl_ms = 200\nlease_rate_ms = 500\n"));
        assert_eq!(
            errs,
            [
                "q.toml:9:17: quota.lease_rate_ms: 500 ms is longer than lease_ttl_ms (200 ms): \
                 a lease would hold more of a scope's rate than its lifetime lets it spend, and \
                 hand the rest back"
            ]
        );
        let ok = format!("{base}lease_ttl_ms = 200\nlease_rate_ms = 200\n");
        assert!(Config::from_toml_str(&ok, None).is_ok());
        let ok = format!("{base}lease_rate_ms = 0\n");
        assert!(Config::from_toml_str(&ok, None).is_ok());
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
