//! The HTTP API: the ingest route of [`crate::source::http`], and `GET /api/v1/rules`,
//! `POST /api/v1/rules/reload`, `POST /api/v1/rules/test`, `GET /api/v1/health`,
//! `GET /api/v1/logs`, `GET /api/v1/trace/{id}`, `GET /api/v1/stats`, `GET /api/v1/codes`,
//! `/metrics`, `/healthz` and `/readyz` (see docs/api.md); and the console in the browser,
//! `GET /console` (see docs/console.md), which uses only those.
//!
//! Who may call what ([`auth`], docs/security.md): `/healthz`, `/readyz`, the console's page
//! and assets, and `/metrics` (unless `http.metrics_auth`) are open; every other route is in
//! the router of the scope it needs, in [`router`]: `ingest`, `read` or `admin`, each wrapped
//! by [`guarded`]. **A new route goes into the router of its scope** (e.g. `GET /api/v1/dlq`
//! into `read`, `POST /api/v1/dlq/replay` into `admin`); that is all it takes for it to ask
//! for a token and to read its body within `http.body_timeout_ms`.
//! Record-store reads go through [`AppState::queries`] ([`bounded::QueryGate`]).

pub mod auth;
pub mod bounded;
mod console;
pub mod dlq;
mod records;
pub mod rule_counts;
mod rule_test;
mod server;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::config::{Config, Scope};
use crate::control::health::{BrokerState, Health};
use crate::control::reload::{Cause, Reloader};
use crate::control::stages::Stages;
use crate::pipeline::Pipeline;
use crate::source::http::{Ingest, json_error as error};

pub use self::server::serve;
use crate::telemetry::Metrics;

/// Shared state the HTTP server reads.
pub struct AppState {
    pub pipeline: Pipeline,
    pub metrics: Arc<Metrics>,
    /// The rules: `rules.current()` is the set running now (hot reload swaps it).
    pub rules: Arc<Reloader>,
    /// Destinations, rule files and the last reload, for `GET /api/v1/health`.
    pub health: Arc<Health>,
    pub config: Config,
    pub broker: Option<Arc<crate::broker::Broker>>,
    /// The consumer groups, when the AMQP 1.0 endpoint runs.
    pub groups: Option<Arc<crate::subscription::Hub>>,
    /// The record store's reader for `GET /api/v1/logs`; `None` when `store.enabled = false`.
    pub logs: Option<crate::outcome::store::Reader>,
    /// The supervised stages: one that stopped makes `/readyz` fail, naming it.
    pub stages: Arc<Stages>,
    /// The dead-letter queue (`/api/v1/dlq`).
    pub dead_letters: Option<crate::action::dead_letter::DeadLetters>,
    pub ready: AtomicBool,
    /// What the console's views keep between requests.
    pub console: ConsoleState,
    /// The API's tokens ([`auth`]).
    pub auth: Arc<auth::Auth>,
    /// The slots of record-store reads (`store.max_concurrent_queries`).
    pub queries: bounded::QueryGate,
}

/// What the console's views keep between requests: the counted buckets of `GET
/// /api/v1/stats`, the rules' counters of the last hour, and a rule compiler for the tester.
#[derive(Default)]
pub struct ConsoleState {
    pub stats_cache: crate::outcome::stats::StatsCache,
    pub rule_window: rule_counts::RuleWindow,
    compiler: OnceLock<Arc<crate::rules::Compiler>>,
}

impl AppState {
    /// Ready: rules loaded, listener up, and the broker connected when one is configured.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.broker.as_ref().is_none_or(|b| b.is_connected())
    }
}

/// The daemon's router: every route, each behind the token scope it needs ([`guarded`]), with
/// `http.max_body_bytes` as the body limit and `http.body_timeout_ms` to send it.
pub fn router(state: Arc<AppState>) -> Router {
    let http = &state.config.http;
    let ingest = Arc::new(Ingest::new(state.pipeline.clone(), http));
    // Scope `read`: everything that shows records, rules, health details or counts.
    let read = Router::new()
        .route("/api/v1/rules", get(list_rules))
        .route("/api/v1/rules/test", post(test_rule))
        .route("/api/v1/health", get(health))
        .route("/api/v1/logs", get(query_logs))
        .route("/api/v1/trace/{id}", get(records::trace))
        .route("/api/v1/stats", get(records::stats))
        .route("/api/v1/codes", get(records::list_codes))
        .route("/api/v1/dlq", get(dlq::list));
    // Scope `admin`: what changes the running daemon.
    let admin = Router::new()
        .route("/api/v1/rules/reload", post(reload_rules))
        .route("/api/v1/dlq/replay", post(dlq::replay));
    let metrics_route = Router::new().route("/metrics", get(metrics));
    let metrics_route = if http.metrics_auth {
        guarded(metrics_route, Scope::Read, &state)
    } else {
        metrics_route
    };
    // Open: the probes.
    let open = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    Router::new()
        .merge(guarded(read, Scope::Read, &state))
        .merge(guarded(admin, Scope::Admin, &state))
        .merge(metrics_route)
        .merge(open)
        .with_state(Arc::clone(&state))
        .merge(console::routes())
        .merge(guarded(
            crate::source::http::routes(ingest),
            Scope::Ingest,
            &state,
        ))
        .layer(DefaultBodyLimit::max(http.max_body_bytes))
}

/// `router`'s routes behind a token with `scope` ([`auth::scoped`]), and then reading the
/// request body within `http.body_timeout_ms` ([`bounded::read_body_within`]): the token is
/// checked first, so a caller without one never gets a body buffered.
fn guarded<S>(router: Router<S>, scope: Scope, state: &AppState) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let http = &state.config.http;
    let body_read = (
        Arc::clone(&state.metrics),
        std::time::Duration::from_millis(http.body_timeout_ms),
        http.max_body_bytes,
    );
    let router = router.route_layer(axum::middleware::from_fn_with_state(
        body_read,
        bounded::read_body_within,
    ));
    auth::scoped(router, scope, &state.auth)
}

/// Keeps a sample of the rules' counters every minute while the daemon runs (for the last
/// hour's counts of `GET /api/v1/rules`); ends when the state is dropped at shutdown.
pub fn spawn_rule_sampler(state: &Arc<AppState>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let every = std::time::Duration::from_millis(rule_counts::SAMPLE_EVERY_MS as u64);
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { return };
            state
                .console
                .rule_window
                .sample(&state.metrics, crate::message::now_ms());
        }
    })
}

/// `GET /api/v1/logs`: the filters of `iotfwd logs` as query parameters (names in
/// [`crate::outcome::query::HTTP_PARAMS`]), the same validation and the same results:
/// `{"records": [...], "count": n, "nextCursor": "..." | null}`, newest first, each record with
/// the platform's field names. A bad query is a 400 naming every problem.
async fn query_logs(
    State(state): State<Arc<AppState>>,
    params: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    use crate::outcome::query::LogParams;
    let Some(reader) = state.logs.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "the record store is disabled (store.enabled = false); enable it to query logs here",
        );
    };
    let Query(pairs) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad query string: {e}")),
    };
    let query =
        match LogParams::from_pairs(pairs).and_then(|p| p.validate(crate::message::now_ms())) {
            Ok(q) => q,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        };
    match state
        .queries
        .run(&state.metrics, move |cancel| {
            reader.cancellable(cancel).query(&query)
        })
        .await
    {
        Ok(Ok(page)) => Json(json!({
            "records": page.records,
            "count": page.records.len(),
            "nextCursor": page.next_cursor.map(|c| c.to_string()),
        }))
        .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(refused) => refused,
    }
}

/// `GET /api/v1/rules`: the rules running now, each with its SQL, actions and what it did over
/// the last hour (see [`rule_counts`]). The rule files that do not load are in
/// `GET /api/v1/health`.
async fn list_rules(State(state): State<Arc<AppState>>) -> Response {
    let (since, mut counts) = state
        .console
        .rule_window
        .last_hour(&state.metrics, crate::message::now_ms());
    let rules: Vec<_> = state
        .rules
        .current()
        .rules()
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "file": r.file.display().to_string(),
                "description": r.description,
                "enabled": r.enabled,
                "from": r.program.parsed.filter.as_str(),
                "sql": r.sql,
                "actions": r.actions,
                "error_action": r.error_action,
                "lastHour": counts.remove(&r.name).unwrap_or_default(),
            })
        })
        .collect();
    Json(json!({
        "rules": rules,
        "countsSince": crate::outcome::format_time_ms(since),
    }))
    .into_response()
}

/// `POST /api/v1/rules/test`: one message through one rule with the daemon's engine (see
/// [`rule_test`]). 200 with the result (`passed` and the output, `no_match`, `no_result`, or
/// `failed` with its code); 400 for a body that is not a test, 404 for an unknown rule.
async fn test_rule(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let request: rule_test::TestRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad test request: {e}")),
    };
    let compiler = Arc::clone(state.console.compiler.get_or_init(|| {
        Arc::new(crate::rules::Compiler::new(
            state.config.engine.max_variants_per_rule,
        ))
    }));
    let rules = state.rules.current();
    match tokio::task::spawn_blocking(move || rule_test::run(request, &rules, compiler)).await {
        Ok(Ok(answer)) => Json(answer).into_response(),
        Ok(Err(rule_test::Refusal::BadRequest(e))) => error(StatusCode::BAD_REQUEST, e),
        Ok(Err(rule_test::Refusal::UnknownRule(e))) => error(StatusCode::NOT_FOUND, e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rule test failed: {e}"),
        ),
    }
}

/// `POST /api/v1/rules/reload`: what SIGHUP does (the rules, and with `--config` the config
/// file's quotas), answered with what the reload did (the `lastReload` of `GET
/// /api/v1/health`). 200 when every rule file and the config file loaded, else 422.
async fn reload_rules(State(state): State<Arc<AppState>>) -> Response {
    let last = state.rules.reload(Cause::Api).await;
    let status = if last.result == "success" {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (
        status,
        Json(json!({
            "reload": last,
            "failed": state.rules.failed(),
        })),
    )
        .into_response()
}

/// `GET /api/v1/health`: destinations, rule files, the last reload, the broker and the consumer
/// groups (see [`crate::control::health`]). Always 200; `status` says `ok` or `degraded`.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let broker = state.broker.as_ref().map(|b| BrokerState {
        connected: b.is_connected(),
        blocked: b.blocked(),
        last_error: b.last_error(),
    });
    Json(state.health.report(broker)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Compiled variants change as payloads arrive; read them at scrape time.
    for rule in state.rules.current().rules() {
        state
            .metrics
            .rule_variants
            .with_label_values(&[&rule.name])
            .set(rule.program.variant_count() as i64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if let Some(failure) = state.stages.failed() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {failure}\n"),
        )
            .into_response()
    } else if state.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
