//! The HTTP ingest: `POST /api/v1/messages` takes one JSON envelope or NDJSON (one envelope
//! per line) and answers with what became of each message (see docs/api.md).
//!
//! The identity of each message comes from its topic; the envelope's `productKey`,
//! `deviceName`, `tenantId` and `instanceId` are taken only when the caller may speak for any
//! device ([`TrustIdentity`], set by the API's token layer). Otherwise they are ignored and
//! counted in `iotfwd_identity_override_ignored_total{source="http"}`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;

use crate::message::{Envelope, Message};
use crate::outcome::{Code, Failure};
use crate::pipeline::{MessageReport, Pipeline, SubmitError};

/// What the ingest route needs.
pub struct Ingest {
    pub pipeline: Pipeline,
    /// `http.max_messages_per_request`.
    pub max_messages_per_request: usize,
    /// One per request being handled: `http.max_concurrent_ingest` of them.
    pub slots: Arc<tokio::sync::Semaphore>,
}

impl Ingest {
    pub fn new(pipeline: Pipeline, http: &crate::config::HttpConfig) -> Ingest {
        Ingest {
            pipeline,
            max_messages_per_request: http.max_messages_per_request,
            slots: Arc::new(tokio::sync::Semaphore::new(http.max_concurrent_ingest)),
        }
    }
}

/// Whether the caller may set an envelope's identity fields (`productKey`, `deviceName`,
/// `tenantId`, `instanceId`); put in the request's extensions by the API's token layer.
/// Without it, they are not trusted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrustIdentity(pub bool);

/// The ingest route, ready to merge into the daemon's router.
pub fn routes(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/api/v1/messages", post(ingest_messages))
        .with_state(ingest)
}

#[derive(Debug, Default, Deserialize)]
struct IngestParams {
    /// Include each passed rule's output object in the response.
    #[serde(default)]
    verbose: bool,
}

/// A JSON error body `{"error": message}` with `status`.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Accepts one JSON envelope, or NDJSON with one envelope per line. The whole body is checked
/// before anything is taken: a malformed line refuses the request (400, naming the line) so a
/// client never has to guess which messages went in.
async fn ingest_messages(
    State(state): State<Arc<Ingest>>,
    trust: Option<Extension<TrustIdentity>>,
    Query(params): Query<IngestParams>,
    body: Bytes,
) -> Response {
    let Ok(_slot) = state.slots.try_acquire() else {
        state
            .pipeline
            .metrics()
            .http_limited
            .with_label_values(&["max_concurrent_ingest"])
            .inc();
        return json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many ingest requests at once (http.max_concurrent_ingest); retry shortly",
        );
    };
    let trust = trust.is_some_and(|Extension(t)| t.0);
    let envelopes = match parse_body(&body) {
        Ok(e) => e,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, message),
    };
    let max = state.max_messages_per_request;
    if envelopes.len() > max {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} messages in one request; the limit is {max} (http.max_messages_per_request)",
                envelopes.len()
            ),
        );
    }
    if envelopes.is_empty() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "the body holds no message envelope",
        );
    }
    // Before the first record: the answer waits for the records' commit (store.durability).
    let mark = state.pipeline.mark();
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
        match envelope.into_message_trusting(trust) {
            Ok((m, ignored)) => {
                if ignored {
                    state
                        .pipeline
                        .metrics()
                        .identity_override_ignored
                        .with_label_values(&["http"])
                        .inc();
                }
                accepted_slots.push(slots.len());
                slots.push(None);
                accepted.push(m);
            }
            Err(rejection) => {
                let report = state
                    .pipeline
                    .reject(&topic, raw.as_bytes(), &Failure::rejected(&rejection))
                    .await;
                slots.push(Some(report));
            }
        }
    }
    let reports = match state.pipeline.submit(accepted, "http").await {
        Ok(r) => r,
        Err(e @ SubmitError::ShuttingDown) => {
            return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
        Err(e @ SubmitError::TooMany(..)) => {
            return json_error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string());
        }
        Err(e @ SubmitError::NotRecorded(_)) => {
            return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
    };
    // The rejections' records (submit has already waited for those of the accepted messages).
    if let Err(e) = state.pipeline.committed(mark).await {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
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
    // A message whose failure neither the error action nor the dead-letter queue took is
    // not done with: 503 tells the client to send it again (the report says which failed).
    let status = if messages.iter().any(|m| m.requeue) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = Json(json!({
        "accepted": messages.len() - rejected,
        "rejected": rejected,
        "messages": messages,
    }));
    (status, body).into_response()
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
