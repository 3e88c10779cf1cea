//! The HTTP ingest path of `iotfwd bench pipeline`: NDJSON requests -> iotfwd (rules without
//! actions) -> the record store, once with `store.durability = "async"` and once with
//! `"acked"`, in the same run. What it shows is the cost of answering a request only after its
//! messages' records are committed.
//!
//! Throughput: `concurrency` clients each post requests of `per_request` messages back to
//! back until `messages` were answered. Latency: then one client posts requests of
//! [`LATENCY_BATCH`] messages paced at half the measured rate, timing each answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::config::Config;
use crate::config::store::Durability;

/// Messages per request in the latency run.
pub const LATENCY_BATCH: usize = 100;

/// Settings of one ingest measurement.
pub struct IngestBench {
    pub messages: usize,
    pub per_request: usize,
    pub concurrency: usize,
    pub rules: usize,
    /// The daemon's config before the benchmark sets its rules, data and durability.
    pub base: Config,
}

/// What one mode measured.
#[derive(Clone, Copy, Debug)]
pub struct IngestFigures {
    /// Messages answered per second at full speed.
    pub rate: f64,
    /// Answer latency of a paced request of [`LATENCY_BATCH`] messages.
    pub p50: Duration,
    pub p99: Duration,
}

fn ndjson(from: usize, n: usize) -> String {
    let mut body = String::with_capacity(n * 200);
    for i in from..from + n {
        body.push_str(&format!(
            "{{\"topic\":\"/pk{:02}a7Hx/dev{:04}/thing/event/property/post\",\"payload\":\
             {{\"id\":\"{i}\",\"items\":{{\"temperature\":{{\"value\":{}.5}},\
             \"humidity\":{{\"value\":{}}}}}}}}}\n",
            i % super::PRODUCTS,
            i % super::DEVICES,
            15 + i % 30,
            40 + i % 30
        ));
    }
    body
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> anyhow::Result<()> {
    let r = client.post(url).body(body).send().await?;
    anyhow::ensure!(r.status().is_success(), "ingest answered {}", r.status());
    Ok(())
}

/// Runs the daemon in-process with `durability` and measures it.
pub async fn measure(b: &IngestBench, durability: Durability) -> anyhow::Result<IngestFigures> {
    let dir = std::env::temp_dir().join(format!(
        "iotfwd-bench-ingest-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    for (name, text) in super::rule_texts(b.rules) {
        std::fs::write(dir.join(format!("{name}.toml")), text)?;
    }
    let mut config = b.base.clone();
    config.rules.dir = dir.clone();
    config.data.dir = dir.join("data");
    config.broker = None;
    config.source.amqp = None;
    config.store.durability = durability;
    let listeners = crate::daemon::Listeners::loopback(&config).await?;
    let url = format!(
        "http://{}/api/v1/messages",
        listeners.http.local_addr().context("listener address")?
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(crate::daemon::run(config, listeners, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let result = async {
        // Warm up: compile caches, the store's first pages.
        post(&client, &url, ndjson(0, b.per_request)).await?;

        let requests = b.messages.div_ceil(b.per_request);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..b.concurrency.max(1) {
            let (client, url, next) = (client.clone(), url.clone(), Arc::clone(&next));
            let per_request = b.per_request;
            clients.spawn(async move {
                loop {
                    let r = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if r >= requests {
                        return anyhow::Ok(());
                    }
                    post(&client, &url, ndjson(r * per_request, per_request)).await?;
                }
            });
        }
        while let Some(done) = clients.join_next().await {
            done??;
        }
        let rate = (requests * b.per_request) as f64 / started.elapsed().as_secs_f64();

        let pace = Duration::from_secs_f64(LATENCY_BATCH as f64 / (rate / 2.0));
        let count = ((rate / 2.0 * 5.0) as usize / LATENCY_BATCH).clamp(50, 2000);
        let mut latencies = Vec::with_capacity(count);
        let begun = Instant::now();
        for i in 0..count {
            tokio::time::sleep_until((begun + pace * i as u32).into()).await;
            let sent = Instant::now();
            post(&client, &url, ndjson(i * LATENCY_BATCH, LATENCY_BATCH)).await?;
            latencies.push(sent.elapsed());
        }
        latencies.sort();
        anyhow::Ok(IngestFigures {
            rate,
            p50: super::pipeline::percentile(&latencies, 0.50),
            p99: super::pipeline::percentile(&latencies, 0.99),
        })
    }
    .await;
    let _ = stop.send(());
    let _ = daemon.await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Both modes in one run, printed with their ratio.
pub async fn run(b: &IngestBench) -> anyhow::Result<()> {
    println!(
        "HTTP ingest: {} messages in requests of {}, {} clients, {} rules without actions",
        b.messages, b.per_request, b.concurrency, b.rules
    );
    let asynchronous = measure(b, Durability::Async).await?;
    print_figures("async", &asynchronous);
    let acked = measure(b, Durability::Acked).await?;
    print_figures("acked", &acked);
    println!(
        "ratio acked / async: throughput {:.3}, p99 {:+.2} ms",
        acked.rate / asynchronous.rate,
        (acked.p99.as_secs_f64() - asynchronous.p99.as_secs_f64()) * 1e3
    );
    Ok(())
}

fn print_figures(mode: &str, f: &IngestFigures) {
    println!(
        "ingest {mode:<5} {:>10.0} msg/s; at half rate ({LATENCY_BATCH} per request) p50 {:.2} ms, p99 {:.2} ms",
        f.rate,
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3
    );
}
