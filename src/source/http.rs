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
        match envelope.into_message_keeping(trust) {
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
            Err(refused) => {
                // Its record keeps the ids the envelope gave, so the client can look it up.
                let report = state
                    .pipeline
                    .reject(
                        &refused.topic,
                        &refused.payload,
                        &Failure::rejected(&refused.rejection),
                        &refused.ids,
                    )
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
    // Serialized straight from the reports (`json!` would build a tree of them first).
    let body = Json(Answer {
        accepted: messages.len() - rejected,
        rejected,
        messages,
    });
    (status, body).into_response()
}

/// The ingest's answer (docs/api.md).
#[derive(serde::Serialize)]
struct Answer {
    accepted: usize,
    rejected: usize,
    messages: Vec<MessageReport>,
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::message::{Identity, RejectionKind, parse_platform_topic};
    use crate::outcome::{BizCode, Record};
    use crate::robustness::{self, Raw};

    /// Valid bodies, to be mutated.
    fn seeds() -> Vec<Vec<u8>> {
        let one = json!({"topic": "/pk/dn/user/update", "payload": {"a": 1, "items": {"t": {"value": 39}}}});
        let all = json!({"topic": "/pk/dn/thing/event/property/post", "payload": [1, "x"],
            "messageId": "m1", "traceId": "t1", "timestamp": 1_764_201_600_000_i64,
            "productKey": "pk2", "deviceName": "dn2", "tenantId": "t", "instanceId": "i"});
        let b64 = json!({"topic": "/pk/dn/raw", "payload_base64": "AAECAwQ="});
        vec![
            one.to_string().into_bytes(),
            serde_json::to_vec_pretty(&all).unwrap(),
            format!("{one}\n{b64}\r\n\n{all}\n").into_bytes(),
            format!("{b64}\n{b64}").into_bytes(),
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_vec(),
        ]
    }

    fn body() -> impl Strategy<Value = Raw> {
        let line_end = prop::sample::select(vec!["\n", "\r\n", "\n\n", "\n \t\n"]);
        prop_oneof![
            3 => robustness::envelope().prop_map(|e| Raw(e.to_string().into_bytes())),
            3 => prop::collection::vec((robustness::envelope(), line_end), 1..6).prop_map(|lines| {
                Raw(lines
                    .into_iter()
                    .map(|(e, end)| format!("{e}{end}"))
                    .collect::<String>()
                    .into_bytes())
            }),
            4 => robustness::mutated_bytes(
                seeds(),
                &[b"\"topic\":", b"\"payload\":", b"\"payload_base64\":", b"null", b"{}", b"\"\""],
            ),
            1 => robustness::json().prop_map(|v| Raw(v.to_string().into_bytes())),
            1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Raw),
        ]
    }

    /// What the ingest route does with a body, short of the pipeline: parse it, turn each
    /// envelope into a message or a rejection, and build the record each gets. A body refused
    /// as a whole (400) must say why; every envelope must become a platform message or a
    /// rejection recorded with 1903 (its topic) or 9321 (the rest of the envelope).
    fn check(body: &[u8], trust: bool, seen: &robustness::Seen) -> Result<(), String> {
        let envelopes = match parse_body(body) {
            Ok(envelopes) => envelopes,
            Err(why) if why.trim().is_empty() => return Err("refused without a reason".into()),
            Err(_) => {
                seen.count("body-refused");
                return Ok(());
            }
        };
        for envelope in envelopes {
            let topic = envelope.topic.clone();
            let ids = Identity {
                message_id: envelope.message_id.clone(),
                trace_id: envelope.trace_id.clone(),
                ..Identity::default()
            };
            match envelope.into_message_trusting(trust) {
                Ok((m, _)) => {
                    let (pk, dn) = parse_platform_topic(&m.topic).map_err(|e| {
                        format!("accepted a topic that is not a platform topic: {e}")
                    })?;
                    if m.product_key.is_empty() || m.device_name.is_empty() {
                        return Err(format!("accepted with an empty identity: {m:?}"));
                    }
                    if m.message_id.is_empty() || m.trace_id.is_empty() {
                        return Err(format!("accepted without ids: {m:?}"));
                    }
                    if !trust && (m.product_key != pk || m.device_name != dn) {
                        return Err(format!("an untrusted envelope set the identity: {m:?}"));
                    }
                    let record = Record::uplink(&m);
                    if record.code != Code::Ok || record.message_id != m.message_id {
                        return Err(format!("the uplink record is wrong: {record:?}"));
                    }
                    seen.count("accepted");
                }
                Err(rejection) => {
                    if rejection.reason.trim().is_empty() {
                        return Err(format!("rejected without a reason: {rejection:?}"));
                    }
                    if rejection.kind == RejectionKind::Topic
                        && parse_platform_topic(&topic).is_ok()
                    {
                        return Err(format!("rejected the platform topic {topic:?}"));
                    }
                    let failure = Failure::rejected(&rejection);
                    let want = match rejection.kind {
                        RejectionKind::Topic => Code::TopicInvalid,
                        RejectionKind::Envelope => Code::ParamInvalid,
                    };
                    let record = Record::rejected(&topic, body, &failure, &ids);
                    if record.code != want
                        || record.biz_code != BizCode::Uplink
                        || record.reason != rejection.reason
                        || record.message_id.is_empty()
                        || record.trace_id.is_empty()
                        || ids
                            .message_id
                            .as_ref()
                            .is_some_and(|id| !id.is_empty() && *id != record.message_id)
                    {
                        return Err(format!("the rejection's record is wrong: {record:?}"));
                    }
                    seen.count(want.to_string());
                }
            }
        }
        Ok(())
    }

    /// Robustness: bodies of envelopes with fields of every kind, NDJSON, mutations of valid
    /// bodies and random bytes (docs/security.md, "Robustness").
    #[test]
    fn robustness_envelope_and_ndjson_parser() {
        let seen = robustness::Seen::default();
        robustness::run(
            "envelope-ndjson",
            2000,
            (body(), any::<bool>()),
            |(Raw(body), trust)| check(&body, trust, &seen),
        );
        seen.print("envelope-ndjson");
    }

    #[test]
    fn each_line_of_ndjson_is_an_envelope_and_a_bad_one_is_named() {
        let ok = b"{\"topic\":\"/p/d/x\",\"payload\":1}\n\n{\"topic\":\"/p/d/y\",\"payload\":2}\n";
        assert_eq!(parse_body(ok).unwrap().len(), 2);
        let bad = b"{\"topic\":\"/p/d/x\",\"payload\":1}\n{\"topic\":1}\n";
        let why = parse_body(bad).unwrap_err();
        assert!(why.starts_with("line 2: not a message envelope"), "{why}");
        assert!(
            parse_body(b" \n ")
                .unwrap_err()
                .contains("the body is empty")
        );
        assert!(parse_body(b"\xff").unwrap_err().contains("not UTF-8"));
    }
}
