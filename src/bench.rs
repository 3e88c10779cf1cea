//! `iotfwd bench engine`: engine throughput against a parse-only baseline, in the same run.
//!
//! Messages are realistic property posts of about 200 bytes from 10 products and 1000 devices,
//! with nested `items.<prop>.value`. The baseline is what no engine can beat: parsing the same
//! payloads with serde_json. The engine run does everything the daemon's engine does per batch
//! (topic index, one parse, column building, the compiled rules, output objects) and no I/O.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Engine, RuleOutcome};
use crate::message::{Identity, Message};
use crate::rules::{Compiler, RuleSet};

const PRODUCTS: usize = 10;
const DEVICES: usize = 1000;

/// Generates `n` property-post messages from 1000 devices, deterministic.
pub fn property_posts(n: usize) -> Vec<Message> {
    property_posts_from(n, DEVICES)
}

/// Generates `n` property-post messages from `devices` devices, deterministic.
pub fn property_posts_from(n: usize, devices: usize) -> Vec<Message> {
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|i| {
            let device = (next() as usize) % devices.max(1);
            let product = device % PRODUCTS;
            let topic = format!("/pk{product:02}a7Hx/dev{device:04}/thing/event/property/post");
            let r = next();
            let payload = format!(
                r#"{{"id":"{i}","version":"1.0","items":{{"temperature":{{"value":{:.1},"time":1764201600000}},"humidity":{{"value":{},"time":1764201600000}},"voltage":{{"value":{:.2},"time":1764201600000}}}},"method":"thing.event.property.post"}}"#,
                15.0 + (r % 300) as f64 / 10.0,
                30 + (r >> 12) % 60,
                3.0 + ((r >> 24) % 60) as f64 / 100.0,
            );
            Message::new(topic, payload.into_bytes().into(), Identity::default())
                .expect("generated topics are valid")
        })
        .collect()
}

/// Rule files for the benchmark. Rules 0..30 match the generated products (three per product
/// when there are enough rules); the rest watch products that send nothing here, as other
/// tenants' rules do, so each message matches at most 3 rules by topic.
pub fn rule_texts(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let product = if i < 3 * PRODUCTS {
                format!("pk{:02}a7Hx", i % PRODUCTS)
            } else {
                format!("other{i:05}")
            };
            let threshold = 20 + (i % 3) * 5;
            let sql = format!(
                "SELECT deviceName() AS device, items.temperature.value AS temperature, \
                 items.humidity.value AS humidity, timestamp() AS ts \
                 FROM \"/{product}/+/thing/event/property/post\" \
                 WHERE items.temperature.value > {threshold}"
            );
            (format!("bench{i:04}"), format!("sql = '''{sql}'''\n"))
        })
        .collect()
}

pub(crate) fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// The engine over `rule_texts(rules)`.
pub(crate) fn bench_engine(rules: usize) -> Engine {
    let compiler = Arc::new(Compiler::new(32));
    let loaded: Vec<_> = rule_texts(rules)
        .into_iter()
        .map(|(name, text)| {
            compiler
                .compile_text(&name, std::path::Path::new(&name), &text)
                .expect("benchmark rules compile")
        })
        .collect();
    Engine::new(compiler, Arc::new(RuleSet::new(loaded)))
}

/// Runs the engine benchmark and prints its figures.
pub fn engine(rules: usize, messages: usize, batch: usize) {
    let batch = batch.max(1);
    let engine = bench_engine(rules);
    let msgs = property_posts(messages);
    let avg_bytes = msgs.iter().map(|m| m.payload.len()).sum::<usize>() / msgs.len().max(1);
    println!(
        "bench engine: {messages} messages (~{avg_bytes} B payload, {PRODUCTS} products, {DEVICES} devices), \
         {rules} rules, batch {batch}"
    );

    // Warm up: compile the type variants, fault in the allocator.
    for chunk in msgs.chunks(batch).take(4) {
        black_box(engine.evaluate(chunk));
    }

    let started = Instant::now();
    for m in &msgs {
        black_box(serde_json::from_slice::<serde_json::Value>(&m.payload).expect("valid JSON"));
    }
    let parse_time = started.elapsed();

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
    let engine_time = started.elapsed();

    let parse_rate = rate(messages, parse_time);
    let engine_rate = rate(messages, engine_time);
    println!(
        "parse-only baseline: {parse_rate:>12.0} msg/s  ({:.2} us/msg)",
        1e6 / parse_rate
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
    println!("ratio engine / parse-only: {:.3}", engine_rate / parse_rate);
}

/// The quota set of `bench engine --quotas`: 100 tenants with one instance each; the ten
/// generated products belong to the first ten instances; every device has a quota. The rates
/// are high enough that nothing is throttled: the benchmark measures the bookkeeping.
fn bench_quotas() -> crate::config::quota::QuotaSet {
    let mut toml = String::from("[quota.device]\nforward_tps = 1000000\n");
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

/// Engine plus quota check for every passed output, as the daemon counts forwards.
fn run_with_limiter(
    engine: &Engine,
    limiter: &crate::limits::Limiter,
    msgs: &[Message],
    batch: usize,
    runtime: &tokio::runtime::Runtime,
) -> (Duration, usize) {
    let mut throttled = 0;
    let started = Instant::now();
    for chunk in msgs.chunks(batch) {
        let results = engine.evaluate(chunk);
        runtime.block_on(async {
            for (m, r) in chunk.iter().zip(&results) {
                for x in r {
                    if matches!(x.outcome, RuleOutcome::Passed(_))
                        && limiter
                            .acquire(&m.product_key, &m.device_name, None, None)
                            .await
                            .is_err()
                    {
                        throttled += 1;
                    }
                }
            }
        });
        black_box(results);
    }
    (started.elapsed(), throttled)
}

/// `bench engine --quotas`: the engine with quotas on (100 tenants, 100 000 devices, none
/// throttled) against quotas off, in the same run.
pub fn engine_quotas(rules: usize, messages: usize, batch: usize) {
    let batch = batch.max(1);
    let engine = bench_engine(rules);
    let msgs = property_posts_from(messages, 100_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let off = crate::limits::Limiter::disabled();
    let on = runtime.block_on(async { crate::limits::Limiter::new(&bench_quotas(), None) });
    println!(
        "bench engine --quotas: {messages} messages from 100000 devices, {rules} rules, batch {batch}, 100 tenants"
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
    let (t_off, _) = run_with_limiter(&engine, &off, &msgs, batch, &runtime);
    let (t_on, throttled) = run_with_limiter(&engine, &on, &msgs, batch, &runtime);
    let (r_off, r_on) = (rate(messages, t_off), rate(messages, t_on));
    println!("quotas off: {r_off:>12.0} msg/s");
    println!("quotas on:  {r_on:>12.0} msg/s  ({throttled} throttled)");
    println!("ratio on / off: {:.3}", r_on / r_off);
}
