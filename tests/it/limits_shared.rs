//! Quotas shared by the processes of a cluster, on the machine's real Redis (127.0.0.1:6379):
//! several limiters (each standing for one process) count against one quota, leases keep the
//! overshoot within the documented margin, refusals keep their codes, and an unreachable
//! Redis follows `[quota] on_backend_down`. Each test uses its own key prefix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iotfwd::config::Config;
use iotfwd::config::quota::QuotaSet;
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
    // add: each process may hold one lease of this scope when the run ends.
    let quota = f64::from(burst) + f64::from(tps) * elapsed;
    let margin = f64::from(3 * lease);
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
