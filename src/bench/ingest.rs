//! The HTTP ingest benchmarks: NDJSON requests -> iotfwd in-process (rules without actions) ->
//! the record store.
//!
//! - `iotfwd bench ingest` ([`scale`]): 1, 2 and 4 clients, the store on and off, each rate
//!   beside `bench engine`'s rate measured in the same run, with where the time went (the
//!   daemon's own stage metrics and the process's CPU time).
//! - The HTTP part of `iotfwd bench pipeline` ([`run`]): `store.durability = "async"` against
//!   `"acked"`, throughput and the answer latency at half rate.
//!
//! Both post the `bench engine` payloads ([`super::property_posts`]) as envelopes, so a rate
//! here and the engine's are rates of the same messages. The bodies are built before the clock
//! starts: the clients share the cores with the daemon and should cost it as little as possible.
//!
//! Throughput: `clients` clients each post requests of `per_request` messages back to back
//! until `messages` were answered. Latency: then one client posts requests of
//! [`LATENCY_BATCH`] messages paced at half the measured rate, timing each answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;

use crate::config::Config;
use crate::config::store::Durability;

/// Messages per request in the latency run.
pub const LATENCY_BATCH: usize = 100;

/// Settings of the HTTP part of `bench pipeline`.
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

/// NDJSON bodies of `per_request` envelopes each, `messages` in all (the last body may hold
/// fewer), carrying the `bench engine` payloads under their topics.
pub fn bodies(messages: usize, per_request: usize) -> Vec<Bytes> {
    let per_request = per_request.max(1);
    let posts = super::property_posts(messages);
    posts
        .chunks(per_request)
        .map(|chunk| {
            let mut body = Vec::with_capacity(chunk.len() * 320);
            for m in chunk {
                body.extend_from_slice(b"{\"topic\":\"");
                body.extend_from_slice(m.topic.as_bytes());
                body.extend_from_slice(b"\",\"payload\":");
                body.extend_from_slice(&m.payload);
                body.extend_from_slice(b"}\n");
            }
            Bytes::from(body)
        })
        .collect()
}

/// A daemon running in this process on a loopback port, with the benchmark's rules.
struct InProcess {
    url: String,
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    dir: std::path::PathBuf,
}

impl InProcess {
    /// Starts the daemon on `config` with `rules` benchmark rules, its rules and data in a
    /// fresh temporary directory, without broker or AMQP source.
    async fn start(rules: usize, mut config: Config) -> anyhow::Result<InProcess> {
        let dir = std::env::temp_dir().join(format!(
            "iotfwd-bench-ingest-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        for (name, text) in super::rule_texts(rules) {
            std::fs::write(dir.join(format!("{name}.toml")), text)?;
        }
        config.rules.dir = dir.clone();
        config.data.dir = dir.join("data");
        config.broker = None;
        config.source.amqp = None;
        let listeners = crate::daemon::Listeners::loopback(&config).await?;
        let base = format!(
            "http://{}",
            listeners.http.local_addr().context("listener address")?
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::daemon::run(config, listeners, async move {
            let _ = stopped.await;
        }));
        Ok(InProcess {
            url: format!("{base}/api/v1/messages"),
            base,
            stop,
            task,
            dir,
        })
    }

    /// Its `/metrics` scrape.
    async fn metrics(&self, client: &reqwest::Client) -> anyhow::Result<String> {
        Ok(client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn post(client: &reqwest::Client, url: &str, body: Bytes) -> anyhow::Result<()> {
    let r = client.post(url).body(body).send().await?;
    let status = r.status();
    anyhow::ensure!(
        status.is_success(),
        "ingest answered {status}: {}",
        r.text().await.unwrap_or_default()
    );
    Ok(())
}

/// `clients` clients posting `bodies` back to back (each body once); messages per second.
async fn throughput(
    client: &reqwest::Client,
    url: &str,
    bodies: &Arc<Vec<Bytes>>,
    messages: usize,
    clients: usize,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        let (client, url, next, bodies) = (
            client.clone(),
            url.to_owned(),
            Arc::clone(&next),
            Arc::clone(bodies),
        );
        tasks.spawn(async move {
            while let Some(body) = bodies.get(next.fetch_add(1, Relaxed)) {
                post(&client, &url, body.clone()).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(super::rate(messages, started.elapsed()))
}

/// Runs the daemon in-process with `durability` and measures it.
pub async fn measure(b: &IngestBench, durability: Durability) -> anyhow::Result<IngestFigures> {
    let mut config = b.base.clone();
    config.store.durability = durability;
    let daemon = InProcess::start(b.rules, config).await?;
    let client = reqwest::Client::new();
    let bodies = Arc::new(bodies(b.messages, b.per_request));
    let small = bodies_cycle(LATENCY_BATCH);
    let result = async {
        // Warm up: compile caches, the store's first pages.
        post(&client, &daemon.url, bodies[0].clone()).await?;
        let rate = throughput(&client, &daemon.url, &bodies, b.messages, b.concurrency).await?;

        let pace = Duration::from_secs_f64(LATENCY_BATCH as f64 / (rate / 2.0));
        let count = ((rate / 2.0 * 5.0) as usize / LATENCY_BATCH).clamp(50, 2000);
        let mut latencies = Vec::with_capacity(count);
        let begun = Instant::now();
        for i in 0..count {
            tokio::time::sleep_until((begun + pace * i as u32).into()).await;
            let sent = Instant::now();
            post(&client, &daemon.url, small[i % small.len()].clone()).await?;
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
    daemon.stop().await;
    result
}

/// A few distinct bodies of `per_request` messages, to post in turn.
fn bodies_cycle(per_request: usize) -> Vec<Bytes> {
    bodies(per_request * 16, per_request)
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

/// Settings of `iotfwd bench ingest`.
pub struct ScaleBench {
    /// Messages per measurement.
    pub messages: usize,
    pub per_request: usize,
    /// The client counts to measure, each with the store on and off.
    pub clients: Vec<usize>,
    pub rules: usize,
    /// The daemon's config (the built-in defaults unless `--config`): the store as it says
    /// for "on", `store.enabled = false` for "off".
    pub base: Config,
}

/// What one ingest run measured, and where its time went.
#[derive(Clone, Copy, Debug)]
struct Run {
    rate: f64,
    /// CPU time of the whole process (daemon and clients) per message.
    cpu_us: f64,
    /// `iotfwd_batch_eval_seconds` per message: the engine's share.
    engine_us: f64,
    /// `iotfwd_store_ack_wait_seconds` per message: answers waiting for the store's commit
    /// (time, not CPU; overlapping between clients).
    ack_wait_us: f64,
}

/// The sum of a histogram (`NAME_sum`) in a scrape.
fn histogram_sum(scrape: &str, name: &str) -> f64 {
    let key = format!("{name}_sum ");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat` (in
/// USER_HZ ticks, 100 a second on Linux); zero where that cannot be read.
pub(crate) fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // The fields after the command name (which is in parentheses and may hold spaces):
    // utime and stime are the 12th and 13th of them.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// One daemon on `config`, measured with `clients` clients.
async fn scale_run(
    b: &ScaleBench,
    config: Config,
    clients: usize,
    bodies: &Arc<Vec<Bytes>>,
) -> anyhow::Result<Run> {
    let daemon = InProcess::start(b.rules, config).await?;
    let client = reqwest::Client::new();
    let result = async {
        // Warm up: compile caches, the store's first pages, the connections.
        for body in bodies.iter().take(clients.max(2)) {
            post(&client, &daemon.url, body.clone()).await?;
        }
        let before = daemon.metrics(&client).await?;
        let cpu = process_cpu();
        let rate = throughput(&client, &daemon.url, bodies, b.messages, clients).await?;
        let cpu = process_cpu().saturating_sub(cpu);
        let after = daemon.metrics(&client).await?;
        let per_message = |name: &str| {
            (histogram_sum(&after, name) - histogram_sum(&before, name)) * 1e6 / b.messages as f64
        };
        anyhow::Ok(Run {
            rate,
            cpu_us: cpu.as_secs_f64() * 1e6 / b.messages as f64,
            engine_us: per_message("iotfwd_batch_eval_seconds"),
            ack_wait_us: per_message("iotfwd_store_ack_wait_seconds"),
        })
    }
    .await;
    daemon.stop().await;
    result
}

/// `iotfwd bench ingest`: every client count with the store on and off, each rate beside the
/// engine's (`engine_rate`, measured by the caller in the same run).
pub async fn scale(b: &ScaleBench, engine_rate: f64) -> anyhow::Result<()> {
    let bodies = Arc::new(bodies(b.messages, b.per_request));
    println!(
        "bench ingest: {} messages per run in NDJSON requests of {}, {} rules without actions, \
         store durability {:?}",
        b.messages, b.per_request, b.rules, b.base.store.durability
    );
    println!("engine baseline: {engine_rate:>10.0} msg/s  (bench engine, same payloads)");
    let mut off_config = b.base.clone();
    off_config.store.enabled = false;
    for &clients in &b.clients {
        let on = scale_run(b, b.base.clone(), clients, &bodies).await?;
        print_run(clients, "on", &on, engine_rate);
        let off = scale_run(b, off_config.clone(), clients, &bodies).await?;
        print_run(clients, "off", &off, engine_rate);
        println!(
            "{clients} client(s): ratio store on / off {:.3}",
            on.rate / off.rate
        );
    }
    Ok(())
}

fn print_run(clients: usize, store: &str, r: &Run, engine_rate: f64) {
    println!(
        "{clients} client(s), store {store:<3}: {:>10.0} msg/s, ratio to engine {:.3}; \
         per message: CPU {:.2} us (engine {:.2} us), ack wait {:.2} us",
        r.rate,
        r.rate / engine_rate,
        r.cpu_us,
        r.engine_us,
        r.ack_wait_us
    );
}
