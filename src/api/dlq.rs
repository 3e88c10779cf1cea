//! The dead-letter queue over HTTP: `GET /api/v1/dlq` lists what waits there and
//! `POST /api/v1/dlq/replay` replays it, both with the filters `rule`, `code`, `since` (a
//! duration back from now: `30m`, `1h`, `7d`) and `limit` (docs/dead-letters.md).
//!
//! A replay of a rule's dead letter runs the message through the pipeline again under its
//! original message id and trace id, for that rule and the destination that failed only
//! ([`crate::pipeline::Pipeline::replay`]); a group's dead letter (a rule output a consumer
//! rejected or never accepted) is handed to its group again. Its `uplink` record says it is a
//! replay. A dead letter that is delivered leaves the queue; one that fails again stays there
//! with its new failure.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::action::dead_letter::{DeadLetter, DeadLetters, Filter, Origin, Replayed};
use crate::outcome::Code;
use crate::outcome::query::parse_duration;
use crate::pipeline::{MessageReport, ReplayOf};
use crate::source::http::json_error as error;
use crate::subscription::Delivery;

/// Dead letters listed or replayed per request when `limit` is not given, and at most.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// The filters as the request gave them.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqParams {
    rule: Option<String>,
    code: Option<String>,
    since: Option<String>,
    limit: Option<String>,
}

impl DlqParams {
    /// The filter, or every problem at once (each naming its parameter).
    pub fn filter(&self, now_ms: i64) -> Result<Filter, String> {
        let mut problems = Vec::new();
        let code = match self.code.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(c) => match c.parse::<u16>().ok().and_then(Code::from_u16) {
                Some(code) => Some(code),
                None => {
                    problems.push(format!(
                        "code {c:?} is not a code iotfwd logs (see iotfwd codes)"
                    ));
                    None
                }
            },
        };
        let since_ms = match self.since.as_deref() {
            None | Some("") => None,
            Some(s) => match parse_duration(s) {
                Ok(d) => Some(now_ms - d.as_millis() as i64),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
        };
        let limit = match self.limit.as_deref() {
            None | Some("") => DEFAULT_LIMIT,
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    problems.push(format!(
                        "limit {l:?} must be a whole number 1..={MAX_LIMIT}"
                    ));
                    DEFAULT_LIMIT
                }
            },
        };
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Filter {
            rule: self.rule.clone().filter(|r| !r.is_empty()),
            code,
            since_ms,
            limit,
        })
    }
}

type Params = Result<Query<DlqParams>, QueryRejection>;

fn parse(state: &AppState, params: Params) -> Result<(DeadLetters, Filter), Box<Response>> {
    let Some(queue) = state.dead_letters.clone() else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "this daemon has no dead-letter queue",
        )));
    };
    let Query(params) = params.map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("bad query string: {e} (parameters: rule, code, since, limit)"),
        ))
    })?;
    let filter = params
        .filter(crate::message::now_ms())
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e)))?;
    Ok((queue, filter))
}

/// `GET /api/v1/dlq`: the dead letters matching the filters, oldest first.
pub async fn list(State(state): State<Arc<AppState>>, params: Params) -> Response {
    let (queue, filter) = match parse(&state, params) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match queue.list(&filter).await {
        Ok(letters) => Json(json!({
            "queue": queue.name(),
            "count": letters.len(),
            "deadLetters": letters.iter().map(DeadLetter::to_json).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the dead-letter queue {}: {e}", queue.name()),
        ),
    }
}

/// `POST /api/v1/dlq/replay`: replays the dead letters matching the filters, oldest first,
/// (up to 32 at once from the spool, one at a time from the broker); answers with each one's
/// result, in queue order.
pub async fn replay(State(state): State<Arc<AppState>>, params: Params) -> Response {
    let (queue, filter) = match parse(&state, params) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let state = &state;
    let results = queue.replay(&filter, |d| replay_one(state, d)).await;
    match results {
        Ok(results) => {
            let delivered = results.iter().filter(|r| r.result == "delivered").count();
            Json(json!({
                "queue": queue.name(),
                "replayed": results.len(),
                "delivered": delivered,
                "failed": results.len() - delivered,
                "results": results,
            }))
            .into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "cannot replay from the dead-letter queue {}: {e}",
                queue.name()
            ),
        ),
    }
}

/// Replays one dead letter: through the pipeline (a rule's), or to its group again (a
/// group's).
async fn replay_one(state: &AppState, d: DeadLetter) -> Replayed {
    let note = format!(
        "rule {}, {} failed with {}, replay {}",
        d.rule,
        d.destination,
        d.code,
        d.replays + 1
    );
    let message = d.to_message();
    match d.origin {
        Origin::Rule => {
            let of = ReplayOf {
                rule: d.rule.clone(),
                destination: d.destination.clone(),
            };
            match state.pipeline.replay(message, of, &note).await {
                Ok(report) => judge(&d, &report),
                Err(e) => Replayed::Failed(d.code, format!("the replay was not taken: {e}"), 0),
            }
        }
        Origin::Group => {
            state.pipeline.record_replay(&message, &note).await;
            let group = d
                .destination
                .strip_prefix("group:")
                .unwrap_or(&d.destination);
            let Some(hub) = &state.groups else {
                return Replayed::Failed(
                    Code::DestinationUnavailable,
                    format!("consumer group {group:?} is not hosted: the AMQP 1.0 endpoint is off"),
                    0,
                );
            };
            let delivery = Delivery {
                body: d.payload.clone(),
                topic: d.topic.clone(),
                product_key: d.product_key.clone(),
                device_name: d.device_name.clone(),
                message_id: d.message_id.clone(),
                trace_id: d.trace_id.clone(),
                rule: d.rule.clone(),
                generate_time: d.message_time_ms,
                tenant_id: d.tenant_id.clone(),
                instance_id: d.instance_id.clone(),
            };
            match hub.enqueue(group, delivery).await {
                Ok(()) => Replayed::Delivered,
                Err(f) => Replayed::Failed(f.code(), f.reason().to_owned(), 1),
            }
        }
    }
}

/// What a replay's report says of the dead letter `d`: delivered when every action of its
/// rule to its destination reached 200 (or its error action did); else the first failure.
fn judge(d: &DeadLetter, report: &MessageReport) -> Replayed {
    let Some(rule) = report.rules.iter().find(|r| r.rule == d.rule) else {
        return Replayed::Failed(
            d.code,
            format!(
                "rule {:?} is not loaded or its FROM no longer matches topic {:?}; the dead letter stays",
                d.rule, d.topic
            ),
            0,
        );
    };
    match rule.result {
        "passed" => {}
        "no_result" => {
            return Replayed::Failed(
                d.code,
                format!(
                    "rule {:?}'s WHERE no longer holds for this message; the dead letter stays",
                    d.rule
                ),
                0,
            );
        }
        _ => {
            return Replayed::Failed(rule.code.unwrap_or(Code::Internal), rule.reason.clone(), 0);
        }
    }
    if rule.actions.is_empty() {
        return Replayed::Failed(
            d.code,
            format!(
                "rule {:?} has no action any more; the dead letter stays",
                d.rule
            ),
            0,
        );
    }
    let failed = rule.actions.iter().find(|a| {
        !a.code.is_success() && !a.error_action.as_ref().is_some_and(|e| e.code.is_success())
    });
    match failed {
        None => Replayed::Delivered,
        Some(a) => Replayed::Failed(a.code, a.reason.clone(), a.attempts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_and_every_problem_is_named() {
        let p = DlqParams {
            rule: Some("fwd".into()),
            code: Some("9332".into()),
            since: Some("1h".into()),
            limit: Some("5".into()),
        };
        let f = p.filter(10_000_000).unwrap();
        assert_eq!(f.rule.as_deref(), Some("fwd"));
        assert_eq!(f.code, Some(Code::DestinationMisconfigured));
        assert_eq!(f.since_ms, Some(10_000_000 - 3_600_000));
        assert_eq!(f.limit, 5);
        assert_eq!(DlqParams::default().filter(0).unwrap().limit, DEFAULT_LIMIT);
        let bad = DlqParams {
            code: Some("42".into()),
            since: Some("soon".into()),
            limit: Some("0".into()),
            ..DlqParams::default()
        };
        let e = bad.filter(0).unwrap_err();
        assert!(e.contains("code \"42\""), "{e}");
        assert!(e.contains("since \"soon\""), "{e}");
        assert!(e.contains("limit \"0\""), "{e}");
    }
}
