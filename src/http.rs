//! The HTTP server: ingest (`POST /api/v1/messages`), `/metrics`, `/healthz`, `/readyz`,
//! `GET /api/v1/rules`, `POST /api/v1/rules/reload`, `GET /api/v1/health` and `GET /api/v1/logs`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::daemon::{AppState, MessageReport, SubmitError};
use crate::message::{Envelope, Message};
use crate::outcome::Code;

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.http.max_body_bytes;
    Router::new()
        .route("/api/v1/messages", post(ingest))
        .route("/api/v1/rules", get(list_rules))
        .route("/api/v1/rules/reload", post(reload_rules))
        .route("/api/v1/health", get(health))
        .route("/api/v1/logs", get(query_logs))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

#[derive(Debug, Default, Deserialize)]
struct IngestParams {
    /// Include each passed rule's output object in the response.
    #[serde(default)]
    verbose: bool,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
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
    match tokio::task::spawn_blocking(move || reader.query(&query)).await {
        Ok(Ok(page)) => Json(json!({
            "records": page.records,
            "count": page.records.len(),
            "nextCursor": page.next_cursor.map(|c| c.to_string()),
        }))
        .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("log query failed: {e}"),
        ),
    }
}

/// Accepts one JSON envelope, or NDJSON with one envelope per line. The whole body is checked
/// before anything is taken: a malformed line refuses the request (400, naming the line) so a
/// client never has to guess which messages went in.
async fn ingest(
    State(state): State<Arc<AppState>>,
    Query(params): Query<IngestParams>,
    body: Bytes,
) -> Response {
    let envelopes = match parse_body(&body) {
        Ok(e) => e,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let max = state.config.http.max_messages_per_request;
    if envelopes.len() > max {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} messages in one request; the limit is {max} (http.max_messages_per_request)",
                envelopes.len()
            ),
        );
    }
    if envelopes.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "the body holds no message envelope",
        );
    }
    // Keep each envelope's slot so the response lists messages in request order.
    let mut slots: Vec<Option<MessageReport>> = Vec::with_capacity(envelopes.len());
    let mut accepted: Vec<Message> = Vec::new();
    let mut accepted_slots = Vec::new();
    for envelope in envelopes {
        let topic = envelope.topic.clone();
        let raw = envelope
            .payload
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default();
        match envelope.into_message() {
            Ok(m) => {
                accepted_slots.push(slots.len());
                slots.push(None);
                accepted.push(m);
            }
            Err(rejection) => {
                state
                    .pipeline
                    .reject(&topic, raw.as_bytes(), rejection.code, &rejection.reason)
                    .await;
                slots.push(Some(MessageReport {
                    message_id: String::new(),
                    trace_id: String::new(),
                    code: rejection.code,
                    reason: rejection.reason,
                    rules: Vec::new(),
                    requeue: false,
                }));
            }
        }
    }
    let reports = match state.pipeline.submit(accepted, "http").await {
        Ok(r) => r,
        Err(e @ SubmitError::ShuttingDown) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
        Err(e @ SubmitError::TooMany(..)) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string());
        }
    };
    for (slot, mut report) in accepted_slots.into_iter().zip(reports) {
        if !params.verbose {
            report.rules.iter_mut().for_each(|r| r.output = None);
        }
        slots[slot] = Some(report);
    }
    let messages: Vec<MessageReport> = slots
        .into_iter()
        .map(|s| s.expect("every slot filled"))
        .collect();
    let rejected = messages.iter().filter(|m| m.code != Code::Ok).count();
    Json(json!({
        "accepted": messages.len() - rejected,
        "rejected": rejected,
        "messages": messages,
    }))
    .into_response()
}

/// One envelope (a JSON object), or NDJSON. Errors name the line.
fn parse_body(body: &[u8]) -> Result<Vec<Envelope>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
    if text.trim().is_empty() {
        return Err(
            "the body is empty; send a JSON envelope {\"topic\": ..., \"payload\": ...} or NDJSON"
                .into(),
        );
    }
    if let Ok(one) = serde_json::from_str::<Envelope>(text) {
        return Ok(vec![one]);
    }
    let mut envelopes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let envelope = serde_json::from_str::<Envelope>(line)
            .map_err(|e| format!("line {}: not a message envelope: {e}", i + 1))?;
        envelopes.push(envelope);
    }
    Ok(envelopes)
}

async fn list_rules(State(state): State<Arc<AppState>>) -> Response {
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
                "from": r.program.parsed.filter.as_str(),
                "actions": r.actions,
                "error_action": r.error_action,
            })
        })
        .collect();
    Json(json!({ "rules": rules })).into_response()
}

/// `POST /api/v1/rules/reload`: what SIGHUP does (the rules, and with `--config` the config
/// file's quotas), answered with what the reload did (the `lastReload` of `GET
/// /api/v1/health`). 200 when every rule file and the config file loaded, else 422.
async fn reload_rules(State(state): State<Arc<AppState>>) -> Response {
    let last = state.rules.reload(crate::reload::Cause::Api).await;
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
/// groups (see [`crate::health`]). Always 200; `status` says `ok` or `degraded`.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let broker = state.broker.as_ref().map(|b| b.is_connected());
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
    if state.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
