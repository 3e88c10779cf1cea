//! The benchmarks behind `iotfwd bench`: each reports its figures as a ratio against a
//! baseline measured in the same run (the machines are noisy). docs/benchmarks.md gives each
//! one's method and latest figures.
//!
//! This module holds the shared workload: deterministic property posts and rule files.

pub mod engine;
pub mod groups;
pub mod ingest;
pub mod logs;
pub mod pipeline;
pub mod pipeline_mqtt;

use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;
use crate::message::{Identity, Message};
use crate::rules::{Compiler, RuleSet};

pub(crate) const PRODUCTS: usize = 10;
pub(crate) const DEVICES: usize = 1000;

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

/// Messages per second.
pub(crate) fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// The engine over `rule_texts(rules)`.
pub(crate) fn bench_engine(rules: usize) -> Engine {
    bench_engine_measured(rules, || 0).0
}

/// [`bench_engine`], and how much `memory()` grew while the rules were compiled (after a
/// first rule, compiled and dropped, set up what every rule shares).
pub(crate) fn bench_engine_measured(rules: usize, memory: impl Fn() -> u64) -> (Engine, u64) {
    let compiler = Arc::new(Compiler::new(32));
    let compile = |(name, text): (String, String)| {
        compiler
            .compile_text(&name, std::path::Path::new(&name), &text)
            .expect("benchmark rules compile")
    };
    drop(rule_texts(1).into_iter().map(compile).collect::<Vec<_>>());
    let before = memory();
    let loaded: Vec<_> = rule_texts(rules).into_iter().map(compile).collect();
    let set = Arc::new(RuleSet::new(loaded));
    let grown = memory().saturating_sub(before);
    (Engine::new(compiler, set), grown)
}
