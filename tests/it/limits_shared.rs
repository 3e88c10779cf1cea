//! Quotas shared by the processes of a cluster, on the machine's real Redis (127.0.0.1:6379):
//! several limiters (each standing for one process) count against one quota, leases keep the
//! overshoot within the documented margin, refusals keep their codes, and an unreachable
//! Redis follows `[quota] on_backend_down`. Each test uses its own key prefix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iotfwd::config::Config;
use iotfwd::config::quota::{QuotaSet, Rate};
use iotfwd::limits::{Limiter, Scope};
use iotfwd::outcome::Code;
use iotfwd::telemetry::Metrics;

use super::harness::unique;

const REDIS: &str = "redis://127.0.0.1:6379/0";

/// The config `quota` (a TOML fragment) with `[quota] backend = "redis"` at `url` under a key
/// prefix of its own.
fn shared_config(quota: &str, url: &str) -> Config {
    let text = format!(
        "{quota}\n[redis]\nurl = \"{url}\"\nkey_prefix = \"{}\"\n",
        unique("itq")
    );
    Config::from_toml_str(&text, None).unwrap_or_else(|errs| {
        panic!(
            "{}",
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn limiter(config: &Config, metrics: Option<Arc<Metrics>>) -> Limiter {
    Limiter::shared(
        &QuotaSet::from(config),
        config.redis.as_ref().unwrap(),
        metrics,
    )
    .unwrap()
}

fn tenant_quota(tps: u32, burst: u32, lease: u32, extra: &str) -> String {
    format!(
        "[[tenant]]\nid = \"acme\"\nforward_tps = {tps}\nburst = {burst}\n\
         [[instance]]\nid = \"acme-1\"\ntenant = \"acme\"\nproducts = [\"pk1\"]\n\
         [quota]\nbackend = \"redis\"\nlease = {lease}\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_tenant_quota_within_the_lease_margin() {
    let (tps, burst, lease) = (200u32, 50u32, 10u32);
    let config = shared_config(&tenant_quota(tps, burst, lease, ""), REDIS);
    let processes: Vec<Limiter> = (0..3).map(|_| limiter(&config, None)).collect();
    let started = Instant::now();
    let run_for = Duration::from_millis(1500);
    let runs = processes.iter().enumerate().map(|(p, l)| async move {
        let mut allowed = 0u64;
        let mut n = 0u64;
        while started.elapsed() < run_for {
            n += 1;
            match l
                .acquire("pk1", &format!("dev{p}-{}", n % 7), None, None)
                .await
            {
                Ok(_) => allowed += 1,
                Err(t) => {
                    assert_eq!((t.code(), t.scope), (Code::Throttled, Scope::Tenant));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        allowed
    });
    let per_process = futures::future::join_all(runs).await;
    let elapsed = started.elapsed().as_secs_f64();
    let total: u64 = per_process.iter().sum();
    // The quota over the run (a full bucket at the start, then the rate), and what leases may
    // add: each process may hold one lease of this scope (docs/quotas.md has the formula).
    let quota = f64::from(burst) + f64::from(tps) * elapsed;
    let size = QuotaSet::from(&config).quota.lease_size();
    let margin = f64::from(3 * size.of(Rate { tps, burst }));
    println!(
        "shared tenant quota: {total} allowed over {elapsed:.2} s by 3 processes {per_process:?}; \
         quota {quota:.0} (+ lease margin {margin})"
    );
    assert!(
        (total as f64) <= quota + margin,
        "{total} forwards allowed, quota {quota:.0} + margin {margin}"
    );
    assert!(
        (total as f64) >= 0.8 * f64::from(burst) + 0.8 * f64::from(tps) * (elapsed - 0.1),
        "{total} forwards allowed: far under the quota {quota:.0}"
    );
    assert!(
        per_process.iter().all(|&n| n > 0),
        "every process got a share: {per_process:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lease_1_the_edge_is_exact_and_the_code_is_the_scope_s() {
    let quota = "[[tenant]]\nid = \"acme\"\nforward_tps = 1\nburst = 100\n\
                 [[instance]]\nid = \"acme-1\"\ntenant = \"acme\"\nproducts = [\"pk1\"]\n\
                 forward_tps = 1\nburst = 7\n\
                 [quota]\nbackend = \"redis\"\nlease = 1\n";
    let config = shared_config(quota, REDIS);
    let (a, b) = (limiter(&config, None), limiter(&config, None));
    let mut allowed = 0;
    let mut refused = None;
    for n in 0..10 {
        let l = if n % 2 == 0 { &a } else { &b };
        match l.acquire("pk1", "d", None, None).await {
            Ok(r) => {
                allowed += 1;
                assert_eq!(r.instance.as_deref(), Some("acme-1"));
            }
            Err(t) => refused = Some(t),
        }
    }
    assert_eq!(allowed, 7, "the instance's burst, across both processes");
    let t = refused.unwrap();
    assert_eq!(
        (t.code(), t.scope),
        (Code::InstanceSpecExceeded, Scope::Instance)
    );
    assert!(
        t.reason().contains("acme-1 at 1 msg/s, burst 7"),
        "{}",
        t.reason()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_refuses_with_the_reason_when_told_to() {
    // Port 1: nothing listens there.
    let config = shared_config(
        &tenant_quota(100, 100, 10, "on_backend_down = \"refuse\"\n"),
        "redis://127.0.0.1:1/0",
    );
    let metrics = Arc::new(Metrics::new());
    let l = limiter(&config, Some(Arc::clone(&metrics)));
    let t = l.acquire("pk1", "d", None, None).await.unwrap_err();
    assert_eq!((t.code(), t.scope), (Code::Throttled, Scope::Tenant));
    assert!(
        t.reason()
            .contains("shared quota backend (Redis at redis://127.0.0.1:1/0) cannot be reached"),
        "{}",
        t.reason()
    );
    assert_eq!(metrics.quota_backend_up.get(), 0);
    assert_eq!(l.backend().map(|(_, up)| up), Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_falls_back_to_this_process_s_share() {
    let config = shared_config(
        &tenant_quota(10, 10, 10, "on_backend_down = \"local\"\nprocesses = 2\n"),
        "redis://127.0.0.1:1/0",
    );
    let l = limiter(&config, None);
    let mut allowed = 0;
    for _ in 0..8 {
        if l.acquire("pk1", "d", None, None).await.is_ok() {
            allowed += 1;
        }
    }
    assert_eq!(
        allowed, 5,
        "half of the tenant's burst of 10, for one of 2 processes"
    );
}

#[test]
fn a_redis_backend_without_a_redis_section_is_a_config_error() {
    let errs = Config::from_toml_str("[quota]\nbackend = \"redis\"\n", None).unwrap_err();
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|e| e.contains("quota.backend") && e.contains("there is no [redis] section")),
        "{text:?}"
    );
    let errs = Config::from_toml_str("[redis]\nurl = \"http://x\"\n", None).unwrap_err();
    assert!(errs[0].to_string().contains("redis.url"), "{}", errs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_shows_an_unreachable_quota_backend_and_forwards_are_refused_as_told() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fwd.toml"),
        "sql = '''SELECT * FROM \"/pk1/+/post\"'''\n[[action]]\nto = \"amqp\"\nexchange = \"x\"\n",
    )
    .unwrap();
    let quota = shared_config(
        &tenant_quota(100, 100, 10, "on_backend_down = \"refuse\"\n"),
        "redis://127.0.0.1:1/0",
    );
    let d = super::harness::Daemon::start_without_broker(dir.path(), move |c| {
        c.tenant = quota.tenant.clone();
        c.instance = quota.instance.clone();
        c.quota = quota.quota.clone();
        c.redis = quota.redis.clone();
    })
    .await;
    let health = d.get_json("/api/v1/health").await;
    assert_eq!(health["quotas"]["backend"], "redis", "{health}");
    let report = d.post(r#"{"topic": "/pk1/dev/post", "payload": {}}"#).await;
    let action = &report["messages"][0]["rules"][0]["actions"][0];
    assert_eq!(action["code"], 9324, "{report}");
    let health = d.get_json("/api/v1/health").await;
    assert_eq!(health["quotas"]["up"], false, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_unspent_goes_back_to_the_bucket_when_it_expires() {
    // One token a second, a bucket of 10: process a leases all 10 for one forward.
    let config = shared_config(&tenant_quota(1, 10, 10, "lease_ttl_ms = 100\n"), REDIS);
    let (a, b) = (limiter(&config, None), limiter(&config, None));
    a.acquire("pk1", "d", None, None).await.unwrap();
    let refused = b.acquire("pk1", "d", None, None).await.unwrap_err();
    assert_eq!(
        refused.scope,
        Scope::Tenant,
        "a holds the rest of the bucket"
    );
    // Once a's lease has expired, its pruner hands the 9 unspent tokens back.
    let pruner = a.spawn_pruner(Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut allowed = 0;
    for _ in 0..9 {
        if b.acquire("pk1", "d", None, None).await.is_ok() {
            allowed += 1;
        }
    }
    pruner.abort();
    assert!(allowed >= 8, "b got {allowed} of the 9 a handed back");
}

/// Counts, from each limiter as fast as it can go, the forwards allowed from `from` to
/// `until` (and spends the time before `from` the same way): (allowed in the window, in all).
async fn flat_out(l: &Limiter, device: &str, from: Instant, until: Instant) -> (u64, u64) {
    let (mut window, mut all) = (0u64, 0u64);
    while Instant::now() < until {
        let ok = l.acquire("pk1", device, None, None).await.is_ok();
        let now = Instant::now();
        if ok {
            all += 1;
            if now >= from && now < until {
                window += 1;
            }
        } else {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    (window, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_stay_within_the_rate_and_the_margin_of_rate_sized_leases() {
    // 2000 msg/s, burst 400: 100 ms of the rate is a lease of 200 tokens (not `lease` = 10).
    let (tps, burst) = (2000u32, 400u32);
    let config = shared_config(
        &tenant_quota(tps, burst, 10, "lease_rate_ms = 100\n"),
        REDIS,
    );
    let lease = QuotaSet::from(&config)
        .quota
        .lease_size()
        .of(Rate { tps, burst });
    assert_eq!(lease, 200);
    let (a, b) = (limiter(&config, None), limiter(&config, None));
    // 400 ms flat out first, so the window below starts with the bucket drained and each
    // process holding what its lease holds; then a window of 1.2 s.
    let started = Instant::now();
    let from = started + Duration::from_millis(400);
    let until = from + Duration::from_millis(1200);
    let ((wa, aa), (wb, ab)) = tokio::join!(
        flat_out(&a, "dev-a", from, until),
        flat_out(&b, "dev-b", from, until)
    );
    let t = until.duration_since(from).as_secs_f64();
    let total_t = until.duration_since(started).as_secs_f64();
    let window = (wa + wb) as f64;
    let bound = f64::from(burst) + f64::from(tps) * t + f64::from(2 * lease);
    let calls = a.backend_calls().unwrap() + b.backend_calls().unwrap();
    println!(
        "window {t:.2} s: {window} allowed ({wa} + {wb}), bound {bound:.0}; \
         from the start: {} of {:.0}; {calls} Redis calls",
        aa + ab,
        f64::from(burst) + f64::from(tps) * total_t
    );
    assert!(
        window <= bound,
        "{window} allowed in {t:.2} s: over {bound:.0}"
    );
    // From the start the bucket was full: no lease lets the cluster beyond the quota.
    assert!(
        (aa + ab) as f64 <= f64::from(burst) + f64::from(tps) * total_t,
        "{} allowed in {total_t:.2} s",
        aa + ab
    );
    assert!(
        window >= 0.8 * f64::from(tps) * t,
        "{window} allowed in {t:.2} s: far under the rate"
    );
    assert!(wa > 0 && wb > 0, "both processes got a share: {wa}, {wb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_refills_all_its_scopes_in_one_call_and_busy_scopes_refill_rarely() {
    // Device 100 msg/s (lease 10), instance and tenant 100 000 msg/s (lease 10 000).
    let quota = "[[tenant]]\nid = \"acme\"\nforward_tps = 100000\n\
                 [[instance]]\nid = \"acme-1\"\ntenant = \"acme\"\nproducts = [\"pk1\"]\n\
                 forward_tps = 100000\n\
                 [quota]\nbackend = \"redis\"\nlease = 10\n\
                 [quota.device]\nforward_tps = 100\n";
    let config = shared_config(quota, REDIS);
    let l = limiter(&config, None);
    l.acquire("pk1", "d0", None, None).await.unwrap();
    assert_eq!(l.backend_calls(), Some(1), "three scopes, one call");
    // 200 devices, 5 forwards each: every device's first forward is one call (its instance
    // and tenant leases last); the refills ahead of the two busy scopes are the rest.
    for n in 0..1000 {
        l.acquire("pk1", &format!("d{}", n % 200 + 1), None, None)
            .await
            .unwrap();
    }
    let calls = l.backend_calls().unwrap();
    assert!(
        (201..=205).contains(&calls),
        "{calls} calls for 1001 forwards of 201 devices"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_that_refuses_takes_nothing_from_the_others() {
    // The tenant has 3 tokens, its instance 5; with lease 1 every forward asks both at once,
    // and the tenant's refusals must leave the instance's tokens in Redis (not in a lease).
    let prefix = unique("itq");
    let config = |tenant_limit: &str| {
        let text = format!(
            "[[tenant]]\nid = \"acme\"\n{tenant_limit}\
             [[instance]]\nid = \"acme-1\"\ntenant = \"acme\"\nproducts = [\"pk1\"]\n\
             forward_tps = 1\nburst = 5\n\
             [quota]\nbackend = \"redis\"\nlease = 1\n\
             [redis]\nurl = \"{REDIS}\"\nkey_prefix = \"{prefix}\"\n"
        );
        Config::from_toml_str(&text, None).unwrap()
    };
    let a = limiter(&config("forward_tps = 1\nburst = 3\n"), None);
    let mut allowed = 0;
    for _ in 0..6 {
        match a.acquire("pk1", "d", None, None).await {
            Ok(_) => allowed += 1,
            Err(t) => assert_eq!(t.scope, Scope::Tenant),
        }
    }
    assert_eq!(allowed, 3);
    // Another process, whose tenant is not limited, finds the instance's other 2 tokens.
    let b = limiter(&config(""), None);
    let mut other = 0;
    for _ in 0..4 {
        if b.acquire("pk1", "d", None, None).await.is_ok() {
            other += 1;
        }
    }
    assert_eq!(
        other, 2,
        "the instance's tokens the refused forwards did not keep"
    );
}

// One thread: the three forwards are all waiting before the call goes out.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_forwards_share_one_call_each_all_or_nothing_on_its_own() {
    // A device may forward once (burst 1); the tenant has 10 tokens; lease 1 everywhere, so
    // every forward needs Redis for both scopes.
    let quota = "[[tenant]]\nid = \"acme\"\nforward_tps = 1\nburst = 10\n\
                 [[instance]]\nid = \"acme-1\"\ntenant = \"acme\"\nproducts = [\"pk1\"]\n\
                 [quota]\nbackend = \"redis\"\nlease = 1\n\
                 [quota.device]\nforward_tps = 1\nburst = 1\n";
    let config = shared_config(quota, REDIS);
    let l = limiter(&config, None);
    // Polled together, as the forwards of one batch: a, a again, b.
    let (first, again, other) = tokio::join!(
        l.acquire("pk1", "a", None, None),
        l.acquire("pk1", "a", None, None),
        l.acquire("pk1", "b", None, None)
    );
    assert_eq!(l.backend_calls(), Some(1), "three forwards, one call");
    assert!(first.is_ok() && other.is_ok(), "{first:?} {other:?}");
    assert_eq!(again.unwrap_err().scope, Scope::Device);
    // The refused forward took nothing from the tenant: 8 of its 10 tokens are left.
    let mut allowed = 0;
    for n in 0..10 {
        if l.acquire("pk1", &format!("d{n}"), None, None).await.is_ok() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 8);
}
