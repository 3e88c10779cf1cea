//! `iotfwd bench groups`: push throughput of the AMQP 1.0 consumer-group endpoint, against the
//! engine's ingest rate measured in the same run.
//!
//! The endpoint runs in this process on 127.0.0.1 with an in-memory backlog, or with the
//! embedded default's backlog in the spool on disk (`--backlog`); consumers are fe2o3-amqp
//! clients in the same process that accept every message (one disposition each). A push run
//! enqueues N rule outputs, [`ENQUEUE_AT_ONCE`] at a time as the pipeline's batches do, and
//! ends when the endpoint has seen N Accepted outcomes, so the figure is settled deliveries
//! per second, not frames written.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;

use crate::client::{Consumer, ConsumerOptions};
use crate::config::Config;
use crate::config::subscription::GroupConfig;
use crate::outcome::Outcomes;
use crate::subscription::{Delivery, RuleLookup};
use crate::telemetry::Metrics;

/// Where a run keeps the group's backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backlog {
    /// In memory only (the baseline of the spool's cost).
    Memory,
    /// In the spool (SQLite on disk, group commit), as the daemon does without a broker.
    Spool,
}

/// Forwards enqueued at once: a pipeline batch (`engine.batch_max_messages` default).
pub const ENQUEUE_AT_ONCE: usize = 512;

/// Runs the benchmark and prints its figures.
pub fn run(messages: usize, connections: &[usize], backlogs: &[Backlog]) -> anyhow::Result<()> {
    let messages = messages.max(1);
    let engine = super::bench_engine(10);
    let msgs = super::property_posts(messages);
    for chunk in msgs.chunks(512).take(4) {
        std::hint::black_box(engine.evaluate(chunk));
    }
    let started = Instant::now();
    let mut outputs = 0usize;
    for chunk in msgs.chunks(512) {
        outputs += engine.evaluate(chunk).iter().map(Vec::len).sum::<usize>();
    }
    let ingest = super::rate(messages, started.elapsed());
    println!("bench groups: {messages} messages per run");
    println!(
        "engine ingest (10 rules, batch 512, baseline): {ingest:>10.0} msg/s ({:.2} rule results/msg)",
        outputs as f64 / messages as f64
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    for &n in connections {
        let mut memory = None;
        for &backlog in backlogs {
            let push = runtime.block_on(push(messages, n.max(1), backlog))?;
            let name = format!("{backlog:?}").to_lowercase();
            let vs_memory = match (backlog, memory) {
                (Backlog::Spool, Some(m)) => format!("  ratio to memory {:.3}", push / m),
                _ => String::new(),
            };
            println!(
                "push to {n} connection(s), {name:<6} backlog: {push:>10.0} msg/s  ratio to ingest {:.3}{vs_memory}",
                push / ingest
            );
            if backlog == Backlog::Memory {
                memory = Some(push);
            }
        }
    }
    Ok(())
}

async fn push(messages: usize, connections: usize, backlog: Backlog) -> anyhow::Result<f64> {
    use futures::StreamExt;
    let dir = std::env::temp_dir().join(format!("iotfwd-bench-groups-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let spool = match backlog {
        Backlog::Memory => None,
        Backlog::Spool => Some(crate::spool::Spool::open(&crate::spool::Spool::path_in(
            &dir,
        ))?),
    };
    let secret_file = dir.join("bench.secret");
    std::fs::write(&secret_file, "bench-secret\n")?;
    let mut group = GroupConfig::demo(&dir);
    group.id = "bench".into();
    group.access_key_id = "bench".into();
    group.secret_file = Some(secret_file);
    group.create_secret = false;
    group.max_backlog = messages;
    group.max_connections = connections;
    let mut config = Config::default();
    config.subscription.listen = "127.0.0.1:0".into();
    config.group = vec![group];
    let metrics = Arc::new(Metrics::new());
    let outcomes = Outcomes::new(Arc::clone(&metrics));
    let no_rules: RuleLookup = Arc::new(|_| None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = crate::subscription::start(
        &config,
        Some(listener),
        None,
        spool,
        outcomes,
        metrics.groups.clone(),
        no_rules,
    )
    .await?
    .expect("the endpoint is enabled");
    let url = format!("amqp://{}", running.addr.expect("a group is configured"));
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for i in 0..connections {
        let mut o = ConsumerOptions::new(&url, "bench", "bench", "bench-secret");
        o.client_id = format!("bench-{i}");
        o.credit = 500;
        let mut c = Consumer::connect(&o).await?;
        let stop = Arc::clone(&stop);
        consumers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(
                    Duration::from_millis(200),
                    c.receiver.recv::<Body<Value>>(),
                )
                .await
                {
                    Ok(Ok(d)) => {
                        if c.receiver.accept(&d).await.is_err() {
                            break;
                        }
                    }
                    Ok(Err(_)) => break,
                    Err(_) => {}
                }
            }
            c.close().await;
        }));
    }
    let hub = Arc::clone(&running.hub);
    let accepted = hub
        .metrics
        .outcomes
        .with_label_values(&["bench", "accepted"]);
    let template = super::property_posts(1).remove(0);
    let mut output = serde_json::Map::new();
    output.insert("device".into(), "dev0001".into());
    output.insert("temperature".into(), serde_json::json!(38.5));
    output.insert("ts".into(), serde_json::json!(1_764_201_600_000i64));
    let started = Instant::now();
    let mut failures = std::pin::pin!(
        futures::stream::iter(0..messages)
            .map(|i| {
                let (hub, template, output) = (&hub, &template, &output);
                async move {
                    let mut d = Delivery::new(template, "bench_rule", output);
                    d.message_id = i.to_string();
                    hub.enqueue("bench", d).await
                }
            })
            .buffer_unordered(ENQUEUE_AT_ONCE)
            .filter_map(|r| async move { r.err() })
    );
    let failed = failures.next().await;
    if let Some(e) = failed {
        anyhow::bail!("a forward failed: {}", e.reason());
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while (accepted.get() as usize) < messages {
        if Instant::now() > deadline {
            anyhow::bail!(
                "only {} of {messages} accepted within 300 s",
                accepted.get()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.await;
    }
    running.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(super::rate(messages, elapsed))
}
