//! `iotfwd bench engine`: engine throughput against a parse-only baseline, in the same run.
//!
//! Messages are realistic property posts of about 200 bytes from 10 products and 1000 devices,
//! with nested `items.<prop>.value`. The baseline is what no engine can beat: parsing the same
//! payloads with the fastest JSON parser at hand (sonic-rs); serde_json's figure is printed
//! too. The engine run does everything the daemon's engine does per batch (topic index, one
//! parse, column building, the compiled rules, output objects) and no I/O.

use std::hint::black_box;
use std::time::Instant;

use std::time::Duration;

use super::{DEVICES, PRODUCTS, bench_engine, property_posts, property_posts_from, rate};
use crate::engine::Engine;
use crate::engine::RuleOutcome;
use crate::message::Message;

/// This process's resident memory (`VmRSS` of `/proc/self/status`) in bytes; 0 where that
/// cannot be read.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Runs the engine benchmark and prints its figures.
pub fn engine(rules: usize, messages: usize, batch: usize) {
    let batch = batch.max(1);
    let msgs = property_posts(messages);
    let (engine, rss_growth) = super::bench_engine_measured(rules, rss_bytes);
    let avg_bytes = msgs.iter().map(|m| m.payload.len()).sum::<usize>() / msgs.len().max(1);
    println!(
        "bench engine: {messages} messages (~{avg_bytes} B payload, {PRODUCTS} products, {DEVICES} devices), \
         {rules} rules, batch {batch}"
    );
    println!(
        "rule set memory: VmRSS +{:.1} MiB compiling {rules} rules, {:.1} KiB per rule",
        rss_growth as f64 / (1024.0 * 1024.0),
        rss_growth as f64 / 1024.0 / rules.max(1) as f64
    );

    // The baseline: the fastest JSON parser at hand (sonic-rs, SIMD) parsing every payload
    // into its document; serde_json's tree (with the ordered map the engine's parse uses
    // today) is printed beside it.
    let started = Instant::now();
    for m in &msgs {
        black_box(sonic_rs::from_slice::<sonic_rs::Value>(&m.payload).expect("valid JSON"));
    }
    let parse_time = started.elapsed();
    let started = Instant::now();
    for m in &msgs {
        black_box(serde_json::from_slice::<serde_json::Value>(&m.payload).expect("valid JSON"));
    }
    let serde_time = started.elapsed();

    let (engine_time, matched, passed) = run_engine(&engine, &msgs, batch);
    let parse_rate = rate(messages, parse_time);
    let serde_rate = rate(messages, serde_time);
    let engine_rate = rate(messages, engine_time);
    println!(
        "parse-only baseline: {parse_rate:>12.0} msg/s  ({:.2} us/msg; sonic-rs)",
        1e6 / parse_rate
    );
    println!(
        "parse-only serde:    {serde_rate:>12.0} msg/s  ({:.2} us/msg; serde_json::Value)",
        1e6 / serde_rate
    );
    println!(
        "engine:              {engine_rate:>12.0} msg/s  ({:.2} us/msg)",
        1e6 / engine_rate
    );
    println!(
        "rule matches per message: {:.2} by topic, {:.2} passed WHERE",
        matched as f64 / messages as f64,
        passed as f64 / messages as f64
    );
    println!(
        "ratio engine / parse-only: {:.3} (to serde_json's parse: {:.3})",
        engine_rate / parse_rate,
        engine_rate / serde_rate
    );
}

/// Runs `engine` over `msgs` in batches of `batch` after a warm-up: the time taken, rule
/// matches by topic, and how many passed their WHERE.
fn run_engine(engine: &Engine, msgs: &[Message], batch: usize) -> (Duration, usize, usize) {
    let batch = batch.max(1);
    // Warm up: compile the type variants, fault in the allocator.
    for chunk in msgs.chunks(batch).take(4) {
        black_box(engine.evaluate(chunk));
    }
    let mut matched = 0usize;
    let mut passed = 0usize;
    let started = Instant::now();
    for chunk in msgs.chunks(batch) {
        let results = engine.evaluate(chunk);
        for r in &results {
            matched += r.len();
            passed += r
                .iter()
                .filter(|x| matches!(x.outcome, RuleOutcome::Passed(_)))
                .count();
        }
        black_box(results);
    }
    (started.elapsed(), matched, passed)
}

/// The engine's rate (messages/s) with `rules` rules on `messages` of the benchmark's
/// messages in batches of 512, as `bench engine` measures it: the baseline of `bench ingest`.
pub fn engine_rate(rules: usize, messages: usize) -> f64 {
    let engine = bench_engine(rules);
    let msgs = property_posts(messages);
    rate(messages, run_engine(&engine, &msgs, 512).0)
}

/// `[quota] lease` and `lease_rate_ms` for `bench engine --quotas --redis` (`None`: the
/// default).
#[derive(Clone, Copy, Debug, Default)]
pub struct Leases {
    pub lease: Option<u32>,
    pub rate_ms: Option<u64>,
}

/// The quota set of `bench engine --quotas`: 100 tenants with one instance each; the ten
/// generated products belong to the first ten instances; every device has a quota. The rates
/// are high enough that nothing is throttled: the benchmark measures the bookkeeping.
fn bench_quotas(leases: Leases) -> crate::config::quota::QuotaSet {
    let mut toml = String::from("[quota]\n");
    if let Some(lease) = leases.lease {
        toml.push_str(&format!("lease = {lease}\n"));
    }
    if let Some(ms) = leases.rate_ms {
        toml.push_str(&format!("lease_rate_ms = {ms}\n"));
    }
    toml.push_str("[quota.device]\nforward_tps = 1000000\n");
    for t in 0..100 {
        toml.push_str(&format!(
            "[[tenant]]\nid = \"tenant{t:03}\"\nforward_tps = 100000000\n"
        ));
        let products = if t < PRODUCTS {
            format!("\"pk{t:02}a7Hx\"")
        } else {
            format!("\"idle{t:03}\"")
        };
        toml.push_str(&format!(
            "[[instance]]\nid = \"inst{t:03}\"\ntenant = \"tenant{t:03}\"\nproducts = [{products}]\nforward_tps = 100000000\n"
        ));
    }
    crate::config::quota::QuotaSet::from_toml_str(&toml).expect("benchmark quotas are valid")
}

/// Engine plus quota check for every passed output, as the daemon counts forwards: the time
/// taken, forwards throttled, and forwards counted.
fn run_with_limiter(
    engine: &Engine,
    limiter: &crate::limits::Limiter,
    msgs: &[Message],
    batch: usize,
    runtime: &tokio::runtime::Runtime,
) -> (Duration, usize, usize) {
    let mut throttled = 0;
    let mut forwards = 0;
    let started = Instant::now();
    for chunk in msgs.chunks(batch) {
        let results = engine.evaluate(chunk);
        // The outputs of a batch take their tokens concurrently, as the daemon's actions do,
        // so a shared backend's round trips overlap.
        let acquires = chunk.iter().zip(&results).flat_map(|(m, r)| {
            r.iter()
                .filter(|x| matches!(x.outcome, RuleOutcome::Passed(_)))
                .map(|_| limiter.acquire(&m.product_key, &m.device_name, None, None))
        });
        let done = runtime.block_on(futures::future::join_all(acquires));
        forwards += done.len();
        throttled += done.iter().filter(|r| r.is_err()).count();
        black_box(results);
    }
    (started.elapsed(), throttled, forwards)
}

/// `bench engine --quotas`: the engine with quotas on (100 tenants, `devices` devices, none
/// throttled) against quotas off, in the same run; with `redis` (a URL), also with the buckets
/// shared in that Redis (`[quota] backend = "redis"`, `leases` or the defaults), against
/// local ones.
pub fn engine_quotas(
    rules: usize,
    messages: usize,
    batch: usize,
    devices: usize,
    redis: Option<&str>,
    leases: Leases,
) -> anyhow::Result<()> {
    let batch = batch.max(1);
    let engine = bench_engine(rules);
    let msgs = property_posts_from(messages, devices);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let off = crate::limits::Limiter::disabled();
    let on = runtime
        .block_on(async { crate::limits::Limiter::new(&bench_quotas(Leases::default()), None) });
    println!(
        "bench engine --quotas: {messages} messages from {devices} devices, {rules} rules, batch {batch}, 100 tenants"
    );
    // Warm up both paths (compiled variants, limiter state for every device).
    run_with_limiter(
        &engine,
        &off,
        &msgs[..msgs.len().min(4 * batch)],
        batch,
        &runtime,
    );
    run_with_limiter(&engine, &on, &msgs, batch, &runtime);
    let (t_off, _, _) = run_with_limiter(&engine, &off, &msgs, batch, &runtime);
    let (t_on, throttled, _) = run_with_limiter(&engine, &on, &msgs, batch, &runtime);
    let (r_off, r_on) = (rate(messages, t_off), rate(messages, t_on));
    println!("quotas off: {r_off:>12.0} msg/s");
    println!("quotas on:  {r_on:>12.0} msg/s  ({throttled} throttled)");
    println!("ratio on / off: {:.3}", r_on / r_off);
    let Some(url) = redis else {
        return Ok(());
    };
    // A key prefix of this run's own, so runs never share buckets.
    let mut config = crate::config::redis::RedisConfig::new(url);
    config.key_prefix = format!("iotfwd-bench-{}", uuid::Uuid::new_v4().simple());
    let quotas = bench_quotas(leases);
    let shared = runtime.block_on(async {
        crate::limits::Limiter::shared(&quotas, &config, None)
            .map_err(|e| anyhow::anyhow!("the Redis quota backend: {e}"))
    })?;
    // Warm up: every device's first lease, as for the local buckets above.
    run_with_limiter(&engine, &shared, &msgs, batch, &runtime);
    anyhow::ensure!(
        shared.backend().is_some_and(|(_, up)| up),
        "Redis at {} did not answer",
        crate::config::broker::redact(url)
    );
    let (t_local, _, _) = run_with_limiter(&engine, &on, &msgs, batch, &runtime);
    let calls_before = shared.backend_calls().unwrap_or(0);
    let (t_shared, throttled, forwards) =
        run_with_limiter(&engine, &shared, &msgs, batch, &runtime);
    let calls = shared.backend_calls().unwrap_or(0) - calls_before;
    let (r_local, r_shared) = (rate(messages, t_local), rate(messages, t_shared));
    println!("quotas on, local buckets again: {r_local:>12.0} msg/s");
    println!(
        "quotas on, buckets in Redis (lease {}, lease_rate_ms {}): {r_shared:>12.0} msg/s  \
         ({throttled} throttled; {calls} Redis calls for {forwards} forwards, {:.3} per forward)",
        quotas.quota.lease(),
        quotas.quota.lease_rate_ms(),
        calls as f64 / forwards.max(1) as f64
    );
    println!("ratio Redis / local: {:.3}", r_shared / r_local);
    Ok(())
}
