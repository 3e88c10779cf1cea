//! The daemon: wiring only. [`run`] builds each stage of the data path, connects them
//! source → pipeline → engine → limits → actions → outcome, serves until shutdown, then drains.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::action::Dispatcher;
use crate::api::AppState;
use crate::config::Config;
use crate::control::health::Health;
use crate::control::reload::{self, Reloader};
use crate::control::stages::Stages;
use crate::engine::Engine;
use crate::outcome::Outcomes;
use crate::rules::Compiler;
use crate::telemetry::Metrics;

/// The sockets the daemon serves: HTTP, and the AMQP 1.0 consumer-group endpoint when it
/// runs (see [`crate::subscription::wants_listener`]). Bound by the caller, so a test binds
/// `127.0.0.1:0` and asks each for its port.
pub struct Listeners {
    pub http: TcpListener,
    pub amqp: Option<TcpListener>,
}

impl Listeners {
    /// Binds `http.listen`, and `subscription.listen` when the endpoint runs. Errors name
    /// the address and the config key.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let addr = config.listen_addr();
        let http = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (http.listen): {e}"))?;
        let amqp = if crate::subscription::wants_listener(config) {
            let listen = &config.subscription.listen;
            let addr: std::net::SocketAddr = listen
                .parse()
                .map_err(|_| anyhow::anyhow!("subscription.listen {listen:?} is not ip:port"))?;
            Some(TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on {addr} (subscription.listen): {e}; set another address or subscription.enabled = false")
            })?)
        } else {
            None
        };
        Ok(Listeners { http, amqp })
    }

    /// Both on 127.0.0.1 with ports the system picks (tests, benchmarks).
    pub async fn loopback(config: &Config) -> std::io::Result<Listeners> {
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let amqp = if crate::subscription::wants_listener(config) {
            Some(TcpListener::bind("127.0.0.1:0").await?)
        } else {
            None
        };
        Ok(Listeners { http, amqp })
    }
}

/// Runs the daemon on bound listeners until `shutdown` resolves, then drains in-flight work
/// within `shutdown.grace_ms`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_from_file(config, None, listeners, shutdown).await
}

/// [`run`] for a config loaded from `file`: SIGHUP and `POST /api/v1/rules/reload` re-read it
/// and apply its quotas (see [`crate::control::reload`]).
pub async fn run_from_file(
    config: Config,
    file: Option<&Path>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data.dir).with_context(|| {
        format!(
            "cannot create the data directory {} (data.dir)",
            config.data.dir.display()
        )
    })?;
    // `[http.tls]`: its files are read before anything starts, so a bad one stops the start.
    let http_tls = match &config.http.tls {
        None => None,
        Some(tls) => Some(tokio_rustls::TlsAcceptor::from(
            crate::tls::server_config("http", tls, &[b"http/1.1"]).map_err(anyhow::Error::msg)?,
        )),
    };
    let metrics = Arc::new(Metrics::new());
    // The API's tokens are read first: a daemon that could not check them must not start.
    let auth = crate::api::auth::Auth::from_config(&config.http, Arc::clone(&metrics))
        .map(Arc::new)
        .map_err(|errors| {
            anyhow::anyhow!(
                "{} (the daemon reads each [[http.token]] at start; see docs/security.md)",
                errors.join("; ")
            )
        })?;
    if auth.enabled() {
        tracing::info!(
            tokens = config.http.token.len(),
            "HTTP API: bearer tokens required"
        );
    }
    let stages = Arc::new(Stages::new());
    // outcome: the record store and the JSON lines ([store]), attached before the engine
    // starts, closed (everything queued written) after it drained.
    let record_sinks = crate::outcome::store::RecordSinks::open(&config, &metrics).await?;
    let outcomes = record_sinks.attach(Outcomes::new(Arc::clone(&metrics)));

    // engine: the rules, hot-reloaded.
    let compiler = Arc::new(Compiler::new(config.engine.max_variants_per_rule));
    let health = Arc::new(Health::new());
    let reloader = Reloader::start(
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

    // The RabbitMQ connection, shared by the source and the amqp actions.
    let broker = match &config.broker {
        None => None,
        Some(b) => {
            let broker = crate::broker::Broker::new(b).map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(broker = %broker.redacted_url(), "broker configured; connecting in the background");
            metrics.export_broker_gauges();
            tokio::spawn(crate::broker::keep_connected(
                Arc::clone(&broker),
                Arc::clone(&metrics),
                sources_stopped.clone(),
            ));
            Some(broker)
        }
    };

    // limits
    let quota_set = crate::config::quota::QuotaSet::from(&config);
    let limiter = match (&config.quota.backend, &config.redis) {
        (crate::config::quota::QuotaBackend::Redis, Some(redis)) => {
            let limiter =
                crate::limits::Limiter::shared(&quota_set, redis, Some(Arc::clone(&metrics)))
                    .map_err(anyhow::Error::msg)?;
            tracing::info!(
                url = limiter.backend().map(|(url, _)| url).unwrap_or_default(),
                processes = config.quota.processes(),
                lease = config.quota.lease(),
                lease_rate_ms = config.quota.lease_rate_ms(),
                on_backend_down = ?config.quota.on_backend_down,
                "quotas shared through Redis"
            );
            limiter
        }
        _ => crate::limits::Limiter::new(&quota_set, Some(Arc::clone(&metrics))),
    };
    // Always: a config reload may turn quotas on. With shared quotas it also hands unspent
    // leases back, so it runs once per lease time-to-live.
    let every = match limiter.backend() {
        Some(_) => config.quota.lease_ttl(),
        None => std::time::Duration::from_secs(60),
    };
    limiter.spawn_pruner(every);
    health.set_quotas(limiter.clone());
    if let Some(state) = record_sinks.state() {
        health.set_store(state);
    }
    if limiter.is_enabled() {
        tracing::info!(
            tenants = config.tenant.len(),
            instances = config.instance.len(),
            "quotas on"
        );
    }

    // actions, and the consumer groups their group destination feeds.
    let mut dispatcher = Dispatcher::new(outcomes.clone(), limiter.clone())
        .with_destinations(Arc::clone(health.destinations()));
    if let Some(b) = &broker {
        dispatcher = dispatcher.with_broker(Arc::clone(b));
    }
    // Without a broker, the spool on disk keeps the dead-letter queue and the consumer-group
    // backlogs (one handle, one writer thread).
    let (spool, dead_letters) = match (&broker, &config.broker) {
        (Some(b), Some(bc)) => (
            None,
            crate::action::dead_letter::DeadLetters::on_broker(
                Arc::clone(b),
                &bc.dead_letter_exchange,
                outcomes.clone(),
            ),
        ),
        _ => {
            let path = crate::spool::Spool::path_in(&config.data.dir);
            let spool = crate::spool::Spool::open(&path)?;
            let dead_letters =
                crate::action::dead_letter::DeadLetters::in_spool(spool.clone(), outcomes.clone());
            (Some(spool), dead_letters)
        }
    };
    dispatcher = dispatcher.with_dead_letters(dead_letters.clone());
    if let Some(mqtt) = &config.mqtt {
        dispatcher = dispatcher
            .with_mqtt(crate::action::mqtt::Mqtt::start(mqtt).map_err(|e| anyhow::anyhow!(e))?);
    }
    let rule_lookup: crate::subscription::RuleLookup = {
        // The running version of the rule: hot reload swaps rules.
        let rules = Arc::clone(&reloader);
        Arc::new(move |name: &str| rules.current().get(name).cloned())
    };
    let mut groups = crate::subscription::start(
        &config,
        listeners.amqp,
        broker.clone(),
        spool.filter(|_| crate::subscription::wants_listener(&config)),
        outcomes.clone(),
        metrics.groups.clone(),
        Arc::clone(&rule_lookup),
    )
    .await?;
    if let Some(g) = &mut groups {
        dispatcher = dispatcher.with_groups(Arc::clone(&g.hub));
        if let Some(rejects) = g.take_rejects() {
            crate::action::group::spawn_reject_handler(rejects, dispatcher.clone(), rule_lookup);
        }
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

    // pipeline, then the sources that feed it.
    let (pipeline, engine_task) = crate::pipeline::start(&config, engine, dispatcher, outcomes);
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
    let queries = crate::api::bounded::QueryGate::new(&config.store);
    let mqtt_task = match (&config.mqtt, &config.source.mqtt) {
        (Some(mqtt), Some(source)) => {
            metrics.export_mqtt_gauge();
            let link = Arc::new(crate::source::mqtt::MqttLink::new(
                metrics.mqtt_connected.clone(),
            ));
            health.set_mqtt(Arc::clone(&link));
            let source = crate::source::mqtt::MqttSource::new(mqtt, source, link)
                .map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(broker = %source.broker(), "MQTT source configured; connecting in the background");
            Some(stages.supervise(
                "source.mqtt",
                tokio::spawn(crate::source::mqtt::run(
                    source,
                    pipeline.clone(),
                    sources_stopped.clone(),
                    grace,
                )),
            ))
        }
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
        stages: Arc::clone(&stages),
        dead_letters: Some(dead_letters),
        ready: AtomicBool::new(false),
        console: Default::default(),
        auth,
        queries,
    });
    crate::api::spawn_rule_sampler(&state);
    // Rule reloads: on changes in the rules directory (rules.watch) and on SIGHUP.
    let reload_task = stages.supervise(
        "reload",
        reload::spawn(
            Arc::clone(&reloader),
            state.config.rules.watch,
            sources_stopped.clone(),
        ),
    );
    let app = crate::api::router(Arc::clone(&state));
    let addr = listeners.http.local_addr().context("listener address")?;
    let scheme = if http_tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, "listening: POST {scheme}://{addr}/api/v1/messages, GET /metrics, /healthz, /readyz; the console: {scheme}://{addr}/console");
    state.ready.store(true, Ordering::Relaxed);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server_stages = Arc::clone(&stages);
    let header_timeout = std::time::Duration::from_millis(state.config.http.header_timeout_ms);
    let server = crate::api::serve(listeners.http, http_tls, app, header_timeout, async move {
        shutdown.await;
        // Before the server can end: its end is not a failure now.
        server_stages.stopping();
        let _ = stop_tx.send(());
    });
    let server_task = stages.supervise("http", tokio::spawn(server));

    // Wait for the signal (or a stage that stopped), then give in-flight requests and
    // batches `grace` to finish.
    let failed = tokio::select! {
        _ = stop_rx => None,
        f = stages.failure() => Some(f),
    };
    stages.stopping();
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
        if let Some(source) = mqtt_task {
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
    match failed {
        None => Ok(()),
        Some(f) => Err(anyhow::anyhow!("{f}")),
    }
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
