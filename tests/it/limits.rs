//! Quotas: the limiter against configs written as operators write them.
//!
//! Time is tokio's paused clock wherever the behaviour is about rates (the limiter runs on
//! tokio's clock), so counts at the edge are exact. Two tests use real time on purpose: the
//! fairness measurement (CPU and lock contention are real) and the per-acquire cost.
//!
//! This module installs the test binary's global allocator: `System` plus a per-thread count
//! of live bytes, which the 100 000-device memory test reads. Counting is one thread-local
//! add per allocation, invisible to the other tests.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use iotfwd::config::quota::QuotaSet;
use iotfwd::limits::{Limiter, Resolved, Scope, Throttle};
use iotfwd::outcome::Code;
use iotfwd::telemetry::Metrics;

struct CountingAlloc;

thread_local! {
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE_BYTES.try_with(|live| live.set(live.get() + delta));
}

// SAFETY: every call is forwarded to `System` unchanged; the counter has no destructor and
// never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn live_bytes() -> isize {
    LIVE_BYTES.with(Cell::get)
}

fn quotas(text: &str) -> QuotaSet {
    QuotaSet::from_toml_str(text).unwrap_or_else(|errs| {
        panic!(
            "quota config rejected:\n{}",
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

/// Acquires `n` times for one device at the current instant; returns how many were allowed
/// and the last refusal.
async fn burst(l: &Limiter, pk: &str, dn: &str, n: usize) -> (usize, Option<Throttle>) {
    let mut ok = 0;
    let mut last = None;
    for _ in 0..n {
        match l.acquire(pk, dn, None, None).await {
            Ok(_) => ok += 1,
            Err(t) => last = Some(t),
        }
    }
    (ok, last)
}

async fn advance_ms(ms: u64) {
    tokio::time::advance(Duration::from_millis(ms)).await;
}

const ONE_TENANT: &str = r#"
[[tenant]]
id = "acme"
forward_tps = 1000

[[instance]]
id = "acme-1"
tenant = "acme"
products = ["pk1", "pk2"]

[quota.device]
forward_tps = 10
"#;

#[tokio::test(start_paused = true)]
async fn device_quota_edge_is_exact() {
    let metrics = Arc::new(Metrics::new());
    let l = Limiter::new(&quotas(ONE_TENANT), Some(Arc::clone(&metrics)));
    assert!(l.is_enabled());

    let (ok, refused) = burst(&l, "pk1", "dev1", 11).await;
    assert_eq!(ok, 10);
    let t = refused.unwrap();
    assert_eq!(t.code(), Code::Throttled);
    assert_eq!(t.code().as_u16(), 9324);
    assert_eq!(t.scope, Scope::Device);
    assert_eq!(t.key, "pk1/dev1");
    assert_eq!((t.limit_tps, t.burst), (10, 10));
    assert_eq!(
        t.reason(),
        "device quota exceeded: pk1/dev1 at 10 msg/s, burst 10"
    );
    assert_eq!(t.tenant.as_deref(), Some("acme"));
    assert_eq!(t.instance.as_deref(), Some("acme-1"));
    assert_eq!(t.waited, Duration::ZERO);

    // Another device of the same product has its own bucket.
    assert_eq!(burst(&l, "pk1", "dev2", 10).await.0, 10);
    // The same device name under another product is another device.
    assert_eq!(burst(&l, "pk2", "dev1", 10).await.0, 10);

    // One token every 100 ms: not at 99 ms, exactly one at 100 ms.
    advance_ms(99).await;
    assert_eq!(burst(&l, "pk1", "dev1", 1).await.0, 0);
    advance_ms(1).await;
    assert_eq!(burst(&l, "pk1", "dev1", 5).await.0, 1);
    // After a full second of quiet the whole burst is back, and no more.
    advance_ms(1000).await;
    assert_eq!(burst(&l, "pk1", "dev1", 15).await.0, 10);

    let counted = metrics
        .throttled
        .with_label_values(&["acme", "acme-1", "device"])
        .get();
    assert_eq!(counted, 1 + 1 + 4 + 5);
    // The IoT instance is `iot_instance`: `instance` is Prometheus' target label.
    let rendered = metrics.render();
    let series: Vec<&str> = rendered
        .lines()
        .filter(|l| l.starts_with("iotfwd_throttled_total{"))
        .collect();
    assert_eq!(series.len(), 1, "{rendered}");
    for label in [
        "tenant=\"acme\"",
        "iot_instance=\"acme-1\"",
        "scope=\"device\"",
    ] {
        assert!(series[0].contains(label), "{label} in {}", series[0]);
    }
    assert!(
        !series[0].contains("{instance=") && !series[0].contains(",instance="),
        "{}",
        series[0]
    );
    assert!(series[0].ends_with(" 11"), "{}", series[0]);
}

#[tokio::test(start_paused = true)]
async fn a_burst_larger_than_the_rate_then_the_rate() {
    let l = Limiter::new(
        &quotas(
            r#"
[[tenant]]
id = "t"
[[instance]]
id = "i"
tenant = "t"
products = ["pk"]
[quota.device]
forward_tps = 10
burst = 25
"#,
        ),
        None,
    );
    assert_eq!(burst(&l, "pk", "d", 30).await.0, 25);
    // Then exactly the rate: 10 over the next second, trying every millisecond.
    let mut ok = 0;
    for _ in 0..1000 {
        advance_ms(1).await;
        ok += burst(&l, "pk", "d", 3).await.0;
    }
    assert_eq!(ok, 10);
}

#[tokio::test(start_paused = true)]
async fn tenant_quota_edge_is_exact_across_devices_and_instances() {
    let metrics = Arc::new(Metrics::new());
    let l = Limiter::new(
        &quotas(
            r#"
[[tenant]]
id = "acme"
forward_tps = 100

[[tenant]]
id = "beta"
forward_tps = 100

[[instance]]
id = "acme-1"
tenant = "acme"
products = ["pk1"]

[[instance]]
id = "acme-2"
tenant = "acme"
products = ["pk2"]

[[instance]]
id = "beta-1"
tenant = "beta"
products = ["pk3"]
"#,
        ),
        Some(Arc::clone(&metrics)),
    );
    // 100 forwards from 100 devices over two instances: the tenant's whole burst.
    for n in 0..100 {
        let pk = if n % 2 == 0 { "pk1" } else { "pk2" };
        let r = l.acquire(pk, &format!("d{n}"), None, None).await.unwrap();
        assert_eq!(r.tenant.as_deref(), Some("acme"));
    }
    let t = l.acquire("pk2", "fresh", None, None).await.unwrap_err();
    assert_eq!((t.code(), t.scope), (Code::Throttled, Scope::Tenant));
    assert_eq!(t.key, "acme");
    assert_eq!(
        t.reason(),
        "tenant quota exceeded: tenant acme at 100 msg/s, burst 100"
    );
    assert_eq!(t.instance.as_deref(), Some("acme-2"));
    // Another tenant is untouched.
    assert_eq!(burst(&l, "pk3", "x", 1).await.0, 1);
    // 10 ms is one token.
    advance_ms(10).await;
    assert_eq!(burst(&l, "pk1", "y", 3).await.0, 1);
    assert_eq!(
        metrics
            .throttled
            .with_label_values(&["acme", "acme-1", "tenant"])
            .get(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn instance_spec_edge_is_exact_and_9326() {
    let metrics = Arc::new(Metrics::new());
    let l = Limiter::new(
        &quotas(
            r#"
[[tenant]]
id = "acme"

[[instance]]
id = "acme-1"
tenant = "acme"
products = ["pk1"]
forward_tps = 50

[[instance]]
id = "acme-2"
tenant = "acme"
products = ["pk2"]
forward_tps = 50
burst = 5
"#,
        ),
        Some(Arc::clone(&metrics)),
    );
    let mut allowed = 0;
    let mut last = None;
    for n in 0..60 {
        match l.acquire("pk1", &format!("d{n}"), None, None).await {
            Ok(_) => allowed += 1,
            Err(t) => last = Some(t),
        }
    }
    assert_eq!(allowed, 50);
    let t = last.unwrap();
    assert_eq!(t.code(), Code::InstanceSpecExceeded);
    assert_eq!(t.code().as_u16(), 9326);
    assert_eq!((t.scope, t.key.as_str()), (Scope::Instance, "acme-1"));
    assert_eq!(
        t.reason(),
        "instance specification exceeded: instance acme-1 at 50 msg/s, burst 50"
    );
    // The other instance of the same tenant has its own specification (burst 5).
    assert_eq!(burst(&l, "pk2", "d", 10).await.0, 5);
    advance_ms(20).await;
    assert_eq!(burst(&l, "pk1", "d", 5).await.0, 1);
    assert_eq!(
        metrics
            .throttled
            .with_label_values(&["acme", "acme-1", "instance"])
            .get(),
        10 + 4
    );
    assert_eq!(
        metrics
            .throttled
            .with_label_values(&["acme", "acme-2", "instance"])
            .get(),
        5
    );
}

#[tokio::test(start_paused = true)]
async fn per_product_device_overrides_have_their_own_edge() {
    let l = Limiter::new(
        &quotas(
            r#"
[[tenant]]
id = "t"
[[instance]]
id = "i"
tenant = "t"
products = ["meter", "camera", "free"]
[quota.device]
forward_tps = 10
[quota.device.products.camera]
forward_tps = 2
burst = 3
"#,
        ),
        None,
    );
    let (ok, t) = burst(&l, "camera", "cam1", 10).await;
    assert_eq!(ok, 3);
    assert_eq!(
        t.unwrap().reason(),
        "device quota exceeded: camera/cam1 at 2 msg/s, burst 3"
    );
    assert_eq!(burst(&l, "meter", "m1", 20).await.0, 10);
    advance_ms(499).await;
    assert_eq!(burst(&l, "camera", "cam1", 1).await.0, 0);
    advance_ms(1).await;
    assert_eq!(burst(&l, "camera", "cam1", 2).await.0, 1);
}

/// A forward refused by one scope keeps nothing it took from the others.
#[tokio::test(start_paused = true)]
async fn a_refused_forward_takes_no_tokens_from_other_scopes() {
    // The device refills slowly (1/s, burst 10); the tenant fast (100/s, burst 5).
    let l = Limiter::new(
        &quotas(
            r#"
[[tenant]]
id = "t"
forward_tps = 100
burst = 5
[[instance]]
id = "i"
tenant = "t"
products = ["pk"]
[quota.device]
forward_tps = 1
burst = 10
"#,
        ),
        None,
    );
    let (ok, t) = burst(&l, "pk", "d", 10).await;
    assert_eq!(ok, 5);
    assert_eq!(t.unwrap().scope, Scope::Tenant);
    // 50 ms later the tenant has 5 tokens again; the device still has the 5 it was not
    // charged for the refused forwards (and has gained only 0.05).
    advance_ms(50).await;
    let (ok, t) = burst(&l, "pk", "d", 10).await;
    assert_eq!(ok, 5);
    assert_eq!(t.unwrap().scope, Scope::Device);

    // Same for an instance refusal: the device keeps its tokens.
    let l = Limiter::new(
        &quotas(
            r#"
[[tenant]]
id = "t"
[[instance]]
id = "i"
tenant = "t"
products = ["pk"]
forward_tps = 100
burst = 2
[quota.device]
forward_tps = 1
burst = 4
"#,
        ),
        None,
    );
    let (ok, t) = burst(&l, "pk", "d", 4).await;
    assert_eq!((ok, t.unwrap().scope), (2, Scope::Instance));
    advance_ms(20).await;
    let (ok, t) = burst(&l, "pk", "d", 4).await;
    assert_eq!((ok, t.unwrap().scope), (2, Scope::Device));
}

#[tokio::test(start_paused = true)]
async fn the_narrowest_refusing_scope_is_reported() {
    // Device, instance and tenant all at 1 msg/s: the device is named.
    let l = Limiter::new(
        &quotas(
            r#"
[[tenant]]
id = "t"
forward_tps = 1
[[instance]]
id = "i"
tenant = "t"
products = ["pk"]
forward_tps = 1
[quota.device]
forward_tps = 1
"#,
        ),
        None,
    );
    assert!(l.acquire("pk", "d", None, None).await.is_ok());
    assert_eq!(
        l.acquire("pk", "d", None, None).await.unwrap_err().scope,
        Scope::Device
    );
    assert_eq!(
        l.acquire("pk", "other", None, None)
            .await
            .unwrap_err()
            .scope,
        Scope::Instance
    );
}

const WAITING_DEVICE: &str = r#"
[[tenant]]
id = "t"
[[instance]]
id = "i"
tenant = "t"
products = ["pk"]
[quota.device]
forward_tps = 10
on_limit = "wait"
max_wait_ms = 1000
"#;

#[tokio::test(start_paused = true)]
async fn wait_mode_smooths_a_short_burst() {
    let l = Limiter::new(&quotas(WAITING_DEVICE), None);
    let start = tokio::time::Instant::now();
    // 15 forwards at once: 10 from the burst, then one every 100 ms.
    let done = futures::future::join_all((0..15).map(|_| {
        let l = l.clone();
        async move {
            l.acquire("pk", "d", None, None).await.unwrap();
            start.elapsed()
        }
    }))
    .await;
    let mut times: Vec<u128> = done.iter().map(Duration::as_millis).collect();
    times.sort_unstable();
    assert_eq!(
        times,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 100, 200, 300, 400, 500]
    );

    // One caller alone: the next forward waits (backpressure) and succeeds.
    let before = tokio::time::Instant::now();
    l.acquire("pk", "d", None, None).await.unwrap();
    assert_eq!(before.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn wait_mode_fails_past_max_wait_with_the_code() {
    let metrics = Arc::new(Metrics::new());
    let l = Limiter::new(&quotas(WAITING_DEVICE), Some(Arc::clone(&metrics)));
    let start = tokio::time::Instant::now();
    let results = futures::future::join_all((0..25).map(|_| {
        let l = l.clone();
        async move { l.acquire("pk", "d", None, None).await }
    }))
    .await;
    // 10 at once, 10 more within max_wait (at 100..=1000 ms), 5 refused.
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 20);
    assert!(start.elapsed() <= Duration::from_millis(1000));
    for t in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!((t.code(), t.scope), (Code::Throttled, Scope::Device));
        assert!(t.waited <= Duration::from_millis(1000), "{t:?}");
        assert!(
            t.reason().starts_with(
                "device quota exceeded: pk/d at 10 msg/s, burst 10 (on_limit = \"wait\": waited "
            ),
            "{}",
            t.reason()
        );
        assert!(t.reason().ends_with("max_wait_ms 1000)"), "{}", t.reason());
    }
    assert_eq!(
        metrics
            .throttled
            .with_label_values(&["t", "i", "device"])
            .get(),
        5
    );

    // A forward that would need more than max_wait fails at once, without sleeping.
    let l = Limiter::new(
        &quotas(
            r#"
[[tenant]]
id = "t"
[[instance]]
id = "i"
tenant = "t"
products = ["pk"]
forward_tps = 1
on_limit = "wait"
max_wait_ms = 500
"#,
        ),
        None,
    );
    assert!(l.acquire("pk", "d", None, None).await.is_ok());
    let before = tokio::time::Instant::now();
    let t = l.acquire("pk", "d", None, None).await.unwrap_err();
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(t.code(), Code::InstanceSpecExceeded);
    assert_eq!(
        t.reason(),
        "instance specification exceeded: instance i at 1 msg/s, burst 1 (on_limit = \"wait\": \
         waited 0 ms, next token in 1000 ms, max_wait_ms 500)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiting_forward_holds_no_tokens() {
    // The tenant waits; while it does, the device's token is not held, so another forward of
    // the same device can still use the device's remaining tokens once the tenant allows.
    let l = Limiter::new(
        &quotas(
            r#"
[[tenant]]
id = "t"
forward_tps = 10
burst = 1
on_limit = "wait"
max_wait_ms = 1000
[[instance]]
id = "i"
tenant = "t"
products = ["pk"]
[quota.device]
forward_tps = 1
burst = 3
"#,
        ),
        None,
    );
    let start = tokio::time::Instant::now();
    let results = futures::future::join_all((0..3).map(|_| {
        let l = l.clone();
        async move {
            l.acquire("pk", "d", None, None).await.unwrap();
            start.elapsed().as_millis()
        }
    }))
    .await;
    let mut results = results;
    results.sort_unstable();
    // Device burst 3 suffices for all three; the tenant spaces them 100 ms apart.
    assert_eq!(results, [0, 100, 200]);
    // And the device has spent exactly 3 tokens: the 4th is a device refusal.
    assert_eq!(
        l.acquire("pk", "d", None, None).await.unwrap_err().scope,
        Scope::Device
    );
}

#[tokio::test(start_paused = true)]
async fn update_keeps_the_state_of_unchanged_quotas() {
    let v1 = r#"
[[tenant]]
id = "a"
forward_tps = 5
[[tenant]]
id = "b"
forward_tps = 5
[[instance]]
id = "ia"
tenant = "a"
products = ["pa"]
[[instance]]
id = "ib"
tenant = "b"
products = ["pb"]
[quota.device]
forward_tps = 3
[quota.device.products.pb]
forward_tps = 100
"#;
    let l = Limiter::new(&quotas(v1), None);
    assert_eq!(burst(&l, "pa", "d1", 5).await.0, 3); // device quota 3
    assert_eq!(burst(&l, "pa", "d2", 5).await.0, 2); // tenant a: 5 in all
    assert_eq!(burst(&l, "pb", "d1", 9).await.0, 5); // tenant b: 5

    // v2: tenant a unchanged (but now waits), tenant b's rate changed, a new tenant c, the
    // default device quota unchanged, pb's override changed.
    let v2 = r#"
[[tenant]]
id = "a"
forward_tps = 5
on_limit = "wait"
max_wait_ms = 100
[[tenant]]
id = "b"
forward_tps = 6
[[tenant]]
id = "c"
forward_tps = 1
[[instance]]
id = "ia"
tenant = "a"
products = ["pa"]
[[instance]]
id = "ib"
tenant = "b"
products = ["pb"]
[[instance]]
id = "ic"
tenant = "c"
products = ["pc"]
[quota.device]
forward_tps = 3
[quota.device.products.pb]
forward_tps = 50
"#;
    l.update(&quotas(v2));
    // Tenant a kept its empty bucket; its new on_limit applies: it waits 200 ms for a token,
    // beyond max_wait 100, so it fails at once.
    let t = l.acquire("pa", "d3", None, None).await.unwrap_err();
    assert_eq!(t.scope, Scope::Tenant);
    assert!(t.reason().contains("on_limit = \"wait\""), "{}", t.reason());
    // d1 of pa kept its device state (class 3 msg/s unchanged).
    advance_ms(200).await; // tenant a: +1 token; d1: +0.6
    assert_eq!(
        l.acquire("pa", "d1", None, None).await.unwrap_err().scope,
        Scope::Device
    );
    assert_eq!(burst(&l, "pa", "d3", 1).await.0, 1);
    // Tenant b's rate changed: a fresh bucket of 6 (plus 1 token from the 200 ms is moot).
    assert_eq!(burst(&l, "pb", "d1", 10).await.0, 6);
    assert_eq!(burst(&l, "pc", "d1", 3).await.0, 1);

    // Turning quotas off, then on again.
    l.update(&QuotaSet::default());
    assert!(!l.is_enabled());
    assert_eq!(burst(&l, "pa", "d1", 100).await.0, 100);
    assert_eq!(
        l.acquire("pa", "d1", None, None).await,
        Ok(Resolved::default())
    );
    l.update(&quotas(v1));
    assert!(l.is_enabled());
    assert_eq!(burst(&l, "pa", "fresh", 10).await.0, 3);
}

const UNMAPPED_BASE: &str = r#"
[[tenant]]
id = "acme"
forward_tps = 100
[[tenant]]
id = "spare"
forward_tps = 100
[[instance]]
id = "acme-1"
tenant = "acme"
products = ["pk1"]
[[instance]]
id = "spare-1"
tenant = "spare"
forward_tps = 2
"#;

#[tokio::test(start_paused = true)]
async fn unmapped_products_are_refused_by_default_with_9321() {
    let metrics = Arc::new(Metrics::new());
    let l = Limiter::new(&quotas(UNMAPPED_BASE), Some(Arc::clone(&metrics)));
    let t = l.acquire("pk9", "d", None, None).await.unwrap_err();
    assert_eq!((t.code(), t.scope), (Code::ParamInvalid, Scope::Unmapped));
    assert_eq!(t.code().as_u16(), 9321);
    assert_eq!(t.key, "pk9");
    assert_eq!((t.tenant.clone(), t.instance.clone()), (None, None));
    assert_eq!(
        t.reason(),
        "product \"pk9\" is in no [[instance]] and [quota] unmapped = \"refuse\": add it to the \
         products of an [[instance]], or set [quota] unmapped = \"default_instance\" with a \
         default_instance"
    );
    assert_eq!(l.resolve("pk9", None, None).unwrap_err(), t);
    // Not throttling: no throttled count.
    assert!(!metrics.render().contains("iotfwd_throttled_total{"));
    // A mapped product resolves.
    assert_eq!(
        l.resolve("pk1", None, None).unwrap(),
        Resolved {
            tenant: Some("acme".into()),
            instance: Some("acme-1".into())
        }
    );
}

#[tokio::test(start_paused = true)]
async fn unmapped_products_can_go_to_a_default_instance() {
    let l = Limiter::new(
        &quotas(&format!(
            "{UNMAPPED_BASE}[quota]\nunmapped = \"default_instance\"\ndefault_instance = \"spare-1\"\n"
        )),
        None,
    );
    let r = l.acquire("pk9", "d", None, None).await.unwrap();
    assert_eq!(
        (r.tenant.as_deref(), r.instance.as_deref()),
        (Some("spare"), Some("spare-1"))
    );
    // They count against the default instance: its spec is 2.
    let t = l.acquire("pk8", "e", None, None).await;
    assert!(t.is_ok());
    let t = l.acquire("pk7", "f", None, None).await.unwrap_err();
    assert_eq!(
        (t.code(), t.key.as_str()),
        (Code::InstanceSpecExceeded, "spare-1")
    );
    // Mapped products are unaffected.
    assert!(l.acquire("pk1", "d", None, None).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn envelope_hints_only_fill_gaps() {
    let l = Limiter::new(&quotas(UNMAPPED_BASE), None);
    // A mapped product ignores the envelope's ids: the config is authoritative.
    let r = l
        .acquire("pk1", "d", Some("spare"), Some("spare-1"))
        .await
        .unwrap();
    assert_eq!(r.instance.as_deref(), Some("acme-1"));
    // An unmapped product follows a declared instance named by the envelope...
    let r = l.acquire("pk9", "d", None, Some("spare-1")).await.unwrap();
    assert_eq!(
        (r.tenant.as_deref(), r.instance.as_deref()),
        (Some("spare"), Some("spare-1"))
    );
    let r = l
        .acquire("pk9", "d", Some("spare"), Some("spare-1"))
        .await
        .unwrap();
    assert_eq!(r.instance.as_deref(), Some("spare-1"));
    // ...and counts against it (spec 2).
    assert_eq!(
        l.acquire("pk9", "d", None, Some("spare-1"))
            .await
            .unwrap_err()
            .code(),
        Code::InstanceSpecExceeded
    );
    // An unknown instance, or one of another tenant, is not taken.
    let t = l.acquire("pk9", "d", None, Some("nope")).await.unwrap_err();
    assert_eq!(t.code(), Code::ParamInvalid);
    assert!(t.reason().contains("instanceId \"nope\""), "{}", t.reason());
    let t = l
        .acquire("pk9", "d", Some("acme"), Some("spare-1"))
        .await
        .unwrap_err();
    assert_eq!(t.scope, Scope::Unmapped);
}

const FAIR: &str = r#"
[[tenant]]
id = "A"
forward_tps = 100
on_limit = "wait"
max_wait_ms = 1000
[[tenant]]
id = "B"
forward_tps = 100
burst = 10
on_limit = "wait"
max_wait_ms = 1000
[[instance]]
id = "iA"
tenant = "A"
products = ["pa"]
[[instance]]
id = "iB"
tenant = "B"
products = ["pb"]
[quota.device]
forward_tps = 1000
"#;

/// B's forwards (80/s, under its 100/s) in paused time, with or without A offering 10x its
/// quota in wait mode: (allowed, total wait of B's forwards).
async fn run_b(with_a: bool) -> (usize, Duration) {
    let l = Limiter::new(&quotas(FAIR), None);
    let mut a_tasks = Vec::new();
    let mut b_ok = 0;
    let mut b_wait = Duration::ZERO;
    for tick in 0..1000u32 {
        if with_a {
            // A: 1000/s (10x), each forward waiting up to a second.
            let l = l.clone();
            a_tasks.push(tokio::spawn(async move {
                l.acquire("pa", &format!("a{}", tick % 50), None, None)
                    .await
                    .is_ok()
            }));
        }
        if tick % 25 == 0 {
            for n in 0..2 {
                let before = tokio::time::Instant::now();
                if l.acquire("pb", &format!("b{n}"), None, None).await.is_ok() {
                    b_ok += 1;
                }
                b_wait += before.elapsed();
            }
        }
        advance_ms(1).await;
    }
    let mut a_ok = 0;
    for task in a_tasks {
        a_ok += usize::from(task.await.unwrap());
    }
    if with_a {
        // A got its own quota and no more: 100 at once, then 100/s for ~2 s (1 s of offers
        // plus the last ones' waits).
        assert!((250..=301).contains(&a_ok), "A got {a_ok}");
    }
    (b_ok, b_wait)
}

#[tokio::test(start_paused = true)]
async fn fairness_in_quota_time_tenant_a_flooding_does_not_touch_tenant_b() {
    let alone = run_b(false).await;
    let beside_a = run_b(true).await;
    assert_eq!(alone, (80, Duration::ZERO));
    assert_eq!(beside_a, alone);
}

/// Real time, real threads: B's throughput and acquire latency, with and without A sending
/// 10x its quota on another thread. Short rounds alternate so background load (other tests,
/// other processes) hits both alike; a measurement disturbed anyway is repeated, up to three
/// times (a real coupling between tenants would fail every time).
#[test]
fn fairness_in_cpu_time_tenant_a_flooding_does_not_slow_tenant_b() {
    let mut report = Vec::new();
    for _ in 0..3 {
        let m = measure_fairness();
        let fair = m.fair();
        report.push(m.to_string());
        if fair {
            eprintln!("fairness: {}", report.join("; retried: "));
            return;
        }
    }
    panic!(
        "B slowed down beside A in 3 measurements out of 3:\n{}",
        report.join("\n")
    );
}

struct Fairness {
    b_offered: u64,
    b_alone: (u64, Duration, Vec<u64>),
    b_beside: (u64, Duration, Vec<u64>),
    a: (u64, u64),
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

impl Fairness {
    fn throughput(run: &(u64, Duration, Vec<u64>)) -> f64 {
        run.0 as f64 / run.1.as_secs_f64()
    }

    /// B's throughput is the same (it offers a fixed load under its quota, and every forward
    /// is allowed with or without A: exactly equal counts) and its median acquire latency is
    /// within 10%. The wall-clock rate is printed as well, but it measures how punctually the
    /// machine wakes a sleeping thread more than the limiter.
    fn fair(&self) -> bool {
        let (m_alone, m_beside) = (
            percentile(&self.b_alone.2, 0.5),
            percentile(&self.b_beside.2, 0.5),
        );
        self.b_beside.0 == self.b_alone.0
            // Plus 100 ns for clock resolution at this scale.
            && m_beside as f64 <= m_alone as f64 * 1.10 + 100.0
    }
}

impl std::fmt::Display for Fairness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = |run: &(u64, Duration, Vec<u64>)| {
            format!(
                "{:.0} fwd/s ({} of {} allowed), median {} ns, p99 {} ns",
                Self::throughput(run),
                run.0,
                self.b_offered,
                percentile(&run.2, 0.5),
                percentile(&run.2, 0.99)
            )
        };
        write!(
            f,
            "B alone {}; B beside A {}; A: {} allowed, {} refused",
            line(&self.b_alone),
            line(&self.b_beside),
            self.a.0,
            self.a.1
        )
    }
}

fn measure_fairness() -> Fairness {
    let text = r#"
[[tenant]]
id = "A"
forward_tps = 2000
burst = 100
[[tenant]]
id = "B"
forward_tps = 20000
[[instance]]
id = "iA"
tenant = "A"
products = ["pa"]
[[instance]]
id = "iB"
tenant = "B"
products = ["pb"]
[quota.device]
forward_tps = 1000000
"#;
    let limiter = Limiter::new(&quotas(text), None);
    const ROUNDS: u32 = 20;
    const TICKS: u32 = 50; // 1 ms each
    const B_PER_TICK: u32 = 10; // 10 000/s, half of B's quota
    const A_PER_TICK: u32 = 20; // 20 000/s, 10x A's quota

    let run = |with_a: bool| {
        let stop = Arc::new(AtomicBool::new(false));
        let flood = with_a.then(|| {
            let l = limiter.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut ok, mut refused) = (0u64, 0u64);
                let start = Instant::now();
                let mut tick = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    for n in 0..A_PER_TICK {
                        let dn = format!("a{n}");
                        match l.acquire("pa", &dn, None, None).now_or_never().unwrap() {
                            Ok(_) => ok += 1,
                            Err(_) => refused += 1,
                        }
                    }
                    tick += 1;
                    sleep_until(start + Duration::from_millis(u64::from(tick)));
                }
                (ok, refused)
            })
        });
        let mut latencies = Vec::with_capacity((TICKS * B_PER_TICK) as usize);
        let mut ok = 0u64;
        let start = Instant::now();
        for tick in 0..TICKS {
            for n in 0..B_PER_TICK {
                let dn = format!("b{n}");
                let before = Instant::now();
                let r = limiter
                    .acquire("pb", &dn, None, None)
                    .now_or_never()
                    .unwrap();
                latencies.push(before.elapsed().as_nanos() as u64);
                ok += u64::from(r.is_ok());
            }
            sleep_until(start + Duration::from_millis(u64::from(tick + 1)));
        }
        let elapsed = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        let a = flood.map_or((0, 0), |flood| flood.join().unwrap());
        (ok, elapsed, latencies, a)
    };

    let mut m = Fairness {
        b_offered: u64::from(ROUNDS * TICKS * B_PER_TICK),
        b_alone: (0, Duration::ZERO, Vec::new()),
        b_beside: (0, Duration::ZERO, Vec::new()),
        a: (0, 0),
    };
    for _ in 0..ROUNDS {
        for with_a in [false, true] {
            let (ok, elapsed, lat, a) = run(with_a);
            let acc = if with_a {
                &mut m.b_beside
            } else {
                &mut m.b_alone
            };
            acc.0 += ok;
            acc.1 += elapsed;
            acc.2.extend(lat);
            m.a.0 += a.0;
            m.a.1 += a.1;
        }
    }
    m.b_alone.2.sort_unstable();
    m.b_beside.2.sort_unstable();
    // B is under its quota with or without A; A is far over its own.
    assert_eq!(m.b_alone.0, m.b_offered, "B was throttled alone: {m}");
    assert_eq!(m.b_beside.0, m.b_offered, "B was throttled beside A: {m}");
    assert!(m.a.1 > m.a.0, "A must be over its quota: {m}");
    m
}

fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

/// 100 000 devices: the device state is bounded, pruned back once they go idle, and stays
/// bounded over repeated waves of new devices.
#[test]
fn memory_of_100_000_devices_is_bounded_after_prune() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let set = quotas(&ONE_TENANT.replace("forward_tps = 1000\n", "forward_tps = 100000000\n"));
        let base = live_bytes();
        let l = Limiter::new(&set, None);
        let empty = live_bytes() - base;
        let names: Vec<String> = (0..100_000).map(|n| format!("device-{n:06}")).collect();
        let names_bytes = live_bytes() - base - empty;
        let mut peaks = Vec::new();
        let mut after = Vec::new();
        for wave in 0..3 {
            let before = live_bytes();
            for name in &names {
                let pk = if wave % 2 == 0 { "pk1" } else { "pk2" };
                l.acquire(pk, name, None, None).await.unwrap();
            }
            assert_eq!(l.device_states(), 100_000);
            peaks.push(live_bytes() - before);
            // Still busy (within one emission interval, 100 ms): nothing is dropped.
            advance_ms(50).await;
            assert_eq!(l.prune(), 100_000);
            // Idle: every bucket is full again, so all state goes.
            advance_ms(1000).await;
            assert_eq!(l.prune(), 0);
            assert_eq!(l.device_states(), 0);
            after.push(live_bytes() - before);
        }
        eprintln!(
            "memory: empty limiter {empty} B; 100 000 devices: +{} B ({} B/device), waves {peaks:?} B; \
             after prune {after:?} B (device names themselves: {names_bytes} B, not counted)",
            peaks[0],
            peaks[0] / 100_000
        );
        for peak in &peaks {
            assert!(*peak < 100_000 * 100, "more than 100 B per device: {peak}");
        }
        for left in &after {
            assert!(*left < 64 * 1024, "state left after prune: {left} B");
        }
    });
}

/// Per-acquire cost with quotas off and on (100 tenants, 100 instances, 100 000 devices, none
/// throttled). Printed, not asserted (beyond sanity): `cargo test --test it limits::cost --
/// --nocapture` (debug build unless `--release`).
#[test]
fn cost_per_acquire_off_and_on() {
    const N: usize = 1_000_000;
    let mut text = String::new();
    for t in 0..100 {
        text.push_str(&format!(
            "[[tenant]]\nid = \"t{t}\"\nforward_tps = 10000000\n\
             [[instance]]\nid = \"i{t}\"\ntenant = \"t{t}\"\nproducts = [\"pk{t}\"]\nforward_tps = 10000000\n"
        ));
    }
    text.push_str("[quota.device]\nforward_tps = 1000\n");
    let on = Limiter::new(&quotas(&text), None);
    let off = Limiter::disabled();
    let products: Vec<String> = (0..100).map(|t| format!("pk{t}")).collect();
    let devices: Vec<String> = (0..100_000).map(|d| format!("dev{d}")).collect();
    let time = |l: &Limiter| {
        let start = Instant::now();
        for n in 0..N {
            let r = l
                .acquire(&products[n % 100], &devices[n % 100_000], None, None)
                .now_or_never()
                .unwrap();
            assert!(r.is_ok());
        }
        start.elapsed().as_nanos() as f64 / N as f64
    };
    // Warm up (creates the 100 000 device states), then measure.
    time(&on);
    let ns_off = time(&off);
    let ns_on = time(&on);
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    eprintln!(
        "cost per acquire ({build}): quotas off {ns_off:.0} ns, on {ns_on:.0} ns \
         (100 tenants, 100 instances, 100 000 devices, none throttled); device states {}",
        on.device_states()
    );
    assert_eq!(on.device_states(), 100_000);
}

#[tokio::test(start_paused = true)]
async fn the_pruner_task_drops_idle_devices_and_ends_with_the_limiter() {
    let l = Limiter::new(&quotas(ONE_TENANT), None);
    let pruner = l.spawn_pruner(Duration::from_secs(1));
    for n in 0..500 {
        l.acquire("pk1", &format!("d{n}"), None, None)
            .await
            .unwrap();
    }
    assert_eq!(l.device_states(), 500);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(l.device_states(), 0);
    drop(l);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pruner.is_finished());
}
