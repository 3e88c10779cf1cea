//! The daemon: wires source -> engine -> actions -> outcome, and runs until shutdown.
//!
//! Sources submit messages to the [`Pipeline`]. One engine task collects submissions into
//! micro-batches (up to `engine.batch_max_messages`, or `engine.batch_max_wait_ms` after the
//! first message), evaluates each batch, records the outcomes and runs the actions. The queue in
//! front of it is bounded (`engine.queue_capacity` messages), so a slow engine slows the sources
//! rather than growing memory.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::action::{ActionReport, Dispatcher};
use crate::config::Config;
use crate::engine::{Engine, RuleOutcome, RuleResult};
use crate::message::Message;
use crate::outcome::{BizCode, Code, Outcomes, Record};
use crate::rules::{Compiler, RuleError, RuleSet};
use crate::telemetry::Metrics;

/// What happened to one message, as the ingest API reports it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageReport {
    pub message_id: String,
    pub trace_id: String,
    pub code: Code,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Every rule whose topic filter matched, with what it did.
    pub rules: Vec<RuleReport>,
    /// An action and its error action both failed: the source must not ack the message.
    #[serde(skip)]
    pub requeue: bool,
}

/// One candidate rule's result for one message.
#[derive(Clone, Debug, Serialize)]
pub struct RuleReport {
    pub rule: String,
    /// `passed` (WHERE held), `no_result` (WHERE false or NULL) or `failed`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Map<String, Value>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionReport>,
}

struct Submission {
    messages: Vec<Message>,
    reply: oneshot::Sender<Vec<MessageReport>>,
    /// Capacity this submission holds until every action of its messages is terminal, so the
    /// queue bounds what is in flight, not just what waits for the engine.
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// The entry point for sources. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    tx: mpsc::UnboundedSender<Submission>,
    capacity: Arc<Semaphore>,
    max_messages: usize,
    outcomes: Outcomes,
}

/// Why a submission was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("{0} messages exceed the engine queue ({1}); send fewer per request")]
    TooMany(usize, usize),
}

impl Pipeline {
    /// Records the uplink of each message, then evaluates them; resolves when every rule and
    /// action of every message has reached its outcome. Waits while the engine queue is full.
    pub async fn submit(
        &self,
        messages: Vec<Message>,
        source: &str,
    ) -> Result<Vec<MessageReport>, SubmitError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        if messages.len() > self.max_messages {
            return Err(SubmitError::TooMany(messages.len(), self.max_messages));
        }
        let permit = Arc::clone(&self.capacity)
            .acquire_many_owned(messages.len() as u32)
            .await
            .map_err(|_| SubmitError::ShuttingDown)?;
        let metrics = self.outcomes.metrics();
        metrics
            .messages_received
            .with_label_values(&[source])
            .inc_by(messages.len() as u64);
        for m in &messages {
            self.outcomes
                .record(Record::for_message(
                    m,
                    BizCode::Uplink,
                    m.topic.clone(),
                    Code::Ok,
                    "",
                    payload_excerpt(&m.payload),
                ))
                .await;
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Submission {
                messages,
                reply,
                permit,
            })
            .map_err(|_| SubmitError::ShuttingDown)?;
        rx.await.map_err(|_| SubmitError::ShuttingDown)
    }

    /// Records a message a source could not accept (e.g. 1903 for a bad topic).
    pub async fn reject(&self, topic: &str, payload: &[u8], code: Code, reason: &str) {
        self.outcomes
            .record(Record {
                time_ms: crate::message::now_ms(),
                trace_id: crate::message::new_trace_id(),
                message_id: crate::message::new_message_id(),
                product_key: String::new(),
                device_name: String::new(),
                biz_code: BizCode::Uplink,
                operation: topic.to_owned(),
                code,
                reason: reason.to_owned(),
                content: payload_excerpt(payload),
                tenant_id: String::new(),
                instance_id: String::new(),
            })
            .await;
    }
}

/// Up to 256 bytes of the payload, as text, for a record's content.
fn payload_excerpt(payload: &[u8]) -> String {
    let cut = &payload[..payload.len().min(256)];
    let text = String::from_utf8_lossy(cut);
    if payload.len() > cut.len() {
        format!("{text}…")
    } else {
        text.into_owned()
    }
}

/// Starts the engine task. Returns the pipeline and the task's handle; the task ends when every
/// `Pipeline` clone is dropped and the queue is drained.
pub fn start_engine(
    config: &Config,
    engine: Engine,
    dispatcher: Dispatcher,
    outcomes: Outcomes,
) -> (Pipeline, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let capacity = config.engine.queue_capacity;
    let pipeline = Pipeline {
        tx,
        capacity: Arc::new(Semaphore::new(capacity)),
        max_messages: capacity,
        outcomes: outcomes.clone(),
    };
    let batch_max = config.engine.batch_max_messages;
    let wait = config.batch_max_wait();
    let task = tokio::spawn(engine_loop(
        rx, engine, dispatcher, outcomes, batch_max, wait,
    ));
    (pipeline, task)
}

async fn engine_loop(
    mut rx: mpsc::UnboundedReceiver<Submission>,
    mut engine: Engine,
    dispatcher: Dispatcher,
    outcomes: Outcomes,
    batch_max: usize,
    wait: std::time::Duration,
) {
    let metrics = Arc::clone(outcomes.metrics());
    metrics.rules_loaded.set(engine.rules().len() as i64);
    let mut in_flight = tokio::task::JoinSet::new();
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + wait;
        let mut submissions = vec![first];
        let mut size = submissions[0].messages.len();
        while size < batch_max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => {
                    size += s.messages.len();
                    submissions.push(s);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let mut messages = Vec::with_capacity(size);
        let mut owners = Vec::with_capacity(submissions.len());
        for s in submissions {
            owners.push((s.reply, s.permit, s.messages.len()));
            messages.extend(s.messages);
        }
        // A reloaded rule set is swapped in here, between batches; results hold their Arc<Rule>.
        if engine.refresh() {
            metrics.rules_loaded.set(engine.rules().len() as i64);
        }
        let mut results = Vec::with_capacity(messages.len());
        for chunk in messages.chunks(batch_max) {
            let started = Instant::now();
            // Evaluation is CPU work; let the runtime move other tasks off this worker.
            results.extend(tokio::task::block_in_place(|| engine.evaluate(chunk)));
            metrics
                .batch_eval_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.batch_size.observe(chunk.len() as f64);
        }
        // Actions run concurrently with the next batch's evaluation; each submission is
        // answered (and its capacity released) when all of its messages are terminal.
        let mut messages = messages.into_iter();
        let mut results = results.into_iter();
        for (reply, permit, n) in owners {
            let msgs: Vec<Message> = messages.by_ref().take(n).collect();
            let res: Vec<Vec<RuleResult>> = results.by_ref().take(n).collect();
            let dispatcher = dispatcher.clone();
            let outcomes = outcomes.clone();
            in_flight.spawn(async move {
                let reports = futures::future::join_all(
                    msgs.iter()
                        .zip(res)
                        .map(|(m, r)| finish_message(&dispatcher, &outcomes, m, r)),
                )
                .await;
                let _ = reply.send(reports);
                drop(permit);
            });
        }
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

/// Counts and records one message's rule outcomes and runs the actions of the rules it passed.
async fn finish_message(
    dispatcher: &Dispatcher,
    outcomes: &Outcomes,
    message: &Message,
    results: Vec<RuleResult>,
) -> MessageReport {
    let metrics = outcomes.metrics();
    let mut rules = Vec::with_capacity(results.len());
    let mut requeue = false;
    for result in results {
        let rule = &result.rule;
        metrics.rule_matched.with_label_values(&[&rule.name]).inc();
        let mut report = RuleReport {
            rule: rule.name.clone(),
            result: "passed",
            code: None,
            reason: String::new(),
            output: None,
            actions: Vec::new(),
        };
        match result.outcome {
            RuleOutcome::Passed(output) => {
                metrics.rule_passed.with_label_values(&[&rule.name]).inc();
                let dispatched = dispatcher.dispatch(message, rule, &output).await;
                requeue |= dispatched.requeue;
                report.actions = dispatched.actions;
                report.output = Some(output);
            }
            RuleOutcome::NoResult => {
                metrics
                    .rule_no_result
                    .with_label_values(&[&rule.name])
                    .inc();
                report.result = "no_result";
            }
            RuleOutcome::Failed { code, reason } => {
                metrics
                    .rule_failed
                    .with_label_values(&[&rule.name, &code.to_string()])
                    .inc();
                outcomes
                    .record(Record::for_message(
                        message,
                        BizCode::RuleEngine,
                        rule.name.clone(),
                        code,
                        reason.clone(),
                        payload_excerpt(&message.payload),
                    ))
                    .await;
                report.result = "failed";
                report.code = Some(code);
                report.reason = reason;
            }
        }
        rules.push(report);
    }
    MessageReport {
        message_id: message.message_id.clone(),
        trace_id: message.trace_id.clone(),
        code: Code::Ok,
        reason: String::new(),
        rules,
        requeue,
    }
}

/// Loads the rules of `dir`, logging 9307 for each file that does not load.
pub fn load_rules(compiler: &Compiler, dir: &Path) -> (RuleSet, Vec<RuleError>) {
    let (rules, errors) = compiler.load_dir(dir);
    for e in &errors {
        tracing::error!(code = e.code.as_u16(), file = %e.file.display(), "rule not loaded: {e}");
    }
    (RuleSet::new(rules), errors)
}

/// Shared state the HTTP server reads.
pub struct AppState {
    pub pipeline: Pipeline,
    pub metrics: Arc<Metrics>,
    /// The rules: `rules.current()` is the set running now (hot reload swaps it).
    pub rules: Arc<crate::reload::Reloader>,
    /// Destinations, rule files and the last reload, for `GET /api/v1/health`.
    pub health: Arc<crate::health::Health>,
    pub config: Config,
    pub broker: Option<Arc<crate::broker::Broker>>,
    /// The consumer groups, when the AMQP 1.0 endpoint runs.
    pub groups: Option<Arc<crate::subscription::Hub>>,
    /// The record store's reader for `GET /api/v1/logs`; `None` when `store.enabled = false`.
    pub logs: Option<crate::outcome::store::Reader>,
    pub ready: AtomicBool,
}

impl AppState {
    /// Ready: rules loaded, listener up, and the broker connected when one is configured.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.broker.as_ref().is_none_or(|b| b.is_connected())
    }
}

/// Runs the daemon on a bound listener until `shutdown` resolves, then drains in-flight work
/// within `shutdown.grace_ms`. Tests bind `127.0.0.1:0` and drive the real daemon.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_from_file(config, None, listener, shutdown).await
}

/// [`run`] for a config loaded from `file`: SIGHUP and `POST /api/v1/rules/reload` re-read it
/// and apply its quotas (see [`crate::reload`]).
pub async fn run_from_file(
    config: Config,
    file: Option<&Path>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data.dir).with_context(|| {
        format!(
            "cannot create the data directory {} (data.dir)",
            config.data.dir.display()
        )
    })?;
    let metrics = Arc::new(Metrics::new());
    let outcomes = Outcomes::new(Arc::clone(&metrics));
    // The record store and the JSON lines ([store]): attached before the engine starts, closed
    // (everything queued written) after it drained.
    let record_sinks = crate::outcome::store::RecordSinks::open(&config, &metrics.registry).await?;
    let outcomes = record_sinks.attach(outcomes);
    let compiler = Arc::new(Compiler::new(config.engine.max_variants_per_rule));
    let health = Arc::new(crate::health::Health::new());
    let reloader = crate::reload::Reloader::start(
        Arc::clone(&compiler),
        &config.rules.dir,
        outcomes.clone(),
        Arc::clone(&health),
    )
    .await;
    let rules = reloader.current();
    tracing::info!(
        dir = %config.rules.dir.display(),
        loaded = rules.len(),
        failed = reloader.failed().len(),
        "rules: {}",
        rules.rules().iter().map(|r| format!("{} (FROM {})", r.name, r.program.parsed.filter)).collect::<Vec<_>>().join(", ")
    );
    let engine = Engine::new(compiler, Arc::clone(&rules)).follow(reloader.subscribe());
    let (stop_sources, sources_stopped) = tokio::sync::watch::channel(false);
    let broker = match &config.broker {
        None => None,
        Some(b) => {
            let broker = crate::broker::Broker::new(b).map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(broker = %broker.redacted_url(), "broker configured; connecting in the background");
            metrics.export_broker_connected();
            tokio::spawn(crate::broker::keep_connected(
                Arc::clone(&broker),
                Arc::clone(&metrics),
                sources_stopped.clone(),
            ));
            Some(broker)
        }
    };
    let limiter = crate::limits::Limiter::new(
        &crate::config::quota::QuotaSet::from(&config),
        Some(Arc::clone(&metrics)),
    );
    // Always: a config reload may turn quotas on.
    limiter.spawn_pruner(std::time::Duration::from_secs(60));
    if limiter.is_enabled() {
        tracing::info!(
            tenants = config.tenant.len(),
            instances = config.instance.len(),
            "quotas on"
        );
    }
    let mut dispatcher = Dispatcher::new(outcomes.clone(), broker.clone(), limiter.clone())
        .with_health(Arc::clone(&health));
    // Consumer groups and their AMQP 1.0 endpoint ([subscription], [[group]]).
    let rule_lookup: crate::subscription::RuleLookup = {
        // The running version of the rule: hot reload swaps rules.
        let rules = Arc::clone(&reloader);
        Arc::new(move |name: &str| rules.current().get(name).cloned())
    };
    let mut groups = crate::subscription::start(
        &config,
        broker.clone(),
        outcomes.clone(),
        &metrics.registry,
        Arc::clone(&rule_lookup),
    )
    .await?;
    if let Some(g) = &mut groups {
        dispatcher = dispatcher.with_groups(Arc::clone(&g.hub));
        g.spawn_reject_handler(dispatcher.clone(), rule_lookup);
        let hub = Arc::clone(&g.hub);
        health.set_groups(Box::new(move || serde_json::Value::Array(hub.status())));
    }
    if let Some(file) = file {
        reloader.follow_config(
            file,
            config.clone(),
            limiter,
            groups.as_ref().map(|g| Arc::clone(&g.hub)),
        );
    }
    let (pipeline, engine_task) = start_engine(&config, engine, dispatcher, outcomes);
    let grace = config.shutdown_grace();
    let source_task = match (&broker, &config.source.amqp) {
        (Some(broker), Some(source)) => Some(tokio::spawn(crate::source::amqp::run(
            Arc::clone(broker),
            source.clone(),
            pipeline.clone(),
            sources_stopped.clone(),
            grace,
        ))),
        _ => None,
    };
    let state = Arc::new(AppState {
        pipeline,
        metrics,
        rules: Arc::clone(&reloader),
        health,
        config,
        broker: broker.clone(),
        groups: groups.as_ref().map(|g| Arc::clone(&g.hub)),
        logs: record_sinks.reader(),
        ready: AtomicBool::new(false),
    });
    // Rule reloads: on changes in the rules directory (rules.watch) and on SIGHUP.
    let reload_task = crate::reload::spawn(
        Arc::clone(&reloader),
        state.config.rules.watch,
        sources_stopped.clone(),
    );
    let app = crate::http::router(Arc::clone(&state));
    let addr = listener.local_addr().context("listener address")?;
    tracing::info!(%addr, "listening: POST http://{addr}/api/v1/messages, GET /metrics, /healthz, /readyz");
    state.ready.store(true, Ordering::Relaxed);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(());
    });
    let server_task = tokio::spawn(async move { server.await });
    // Wait for the signal, then give in-flight requests and batches `grace` to finish.
    let _ = stop_rx.await;
    state.ready.store(false, Ordering::Relaxed);
    // Sources stop taking messages first; what they have in flight finishes or is requeued.
    let _ = stop_sources.send(true);
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: intake stopped, draining in-flight messages"
    );
    drop(state);
    let stopping_since = Instant::now();
    let drained = tokio::time::timeout(grace, async {
        let _ = reload_task.await;
        if let Some(source) = source_task {
            let _ = source.await;
        }
        let _ = server_task.await;
        let _ = engine_task.await;
    })
    .await;
    // AMQP 1.0 consumers are closed (9602 each) once in-flight work had its chance to reach
    // them; unsettled deliveries stay in a broker-backed backlog.
    if let Some(g) = groups {
        // Within what is left of the grace period (at least half a second to say goodbye).
        let left = grace.saturating_sub(stopping_since.elapsed());
        g.shutdown(left.max(std::time::Duration::from_millis(500)))
            .await;
    }
    if let Some(broker) = &broker {
        broker.close().await;
    }
    match drained {
        Ok(()) => tracing::info!("shutdown complete"),
        Err(_) => tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace elapsed with work still in flight"
        ),
    }
    record_sinks.shutdown().await;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
