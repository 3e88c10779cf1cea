//! The record store's views beyond `GET /api/v1/logs`: a message's trace with its verdict,
//! counts over time, and the code catalog they are read with.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::outcome::query::{Status, parse_duration, parse_time};
use crate::outcome::stats::{GroupBy, StatsQuery, auto_bucket_ms};
use crate::outcome::{BizCode, codes};
use crate::source::http::json_error as error;

/// The longest window `GET /api/v1/stats` counts over.
pub const MAX_WINDOW_MS: i64 = 31 * 86_400_000;

fn store_disabled() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "the record store is disabled (store.enabled = false); enable it to query logs here",
    )
}

/// `GET /api/v1/codes`: the code catalog (meaning, cause, troubleshooting of every code
/// iotfwd logs), as `iotfwd codes` prints it.
pub async fn list_codes() -> Response {
    Json(json!({ "codes": codes::catalog() })).into_response()
}

/// `GET /api/v1/trace/{id}`: every record of a message, oldest first, and the verdict of
/// `iotfwd logs trace` ([`crate::outcome::trace::verdict`]). `id` is a messageId or a traceId.
/// 404 (with the verdict `unknown`) when nothing is recorded under it.
pub async fn trace(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let Some(reader) = state.logs.clone() else {
        return store_disabled();
    };
    if id.is_empty() {
        return error(StatusCode::BAD_REQUEST, "give a messageId or traceId");
    }
    let lookup = id.clone();
    let trace = match state
        .queries
        .run(&state.metrics, move |cancel| {
            reader.cancellable(cancel).trace(&lookup)
        })
        .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(refused) => return refused,
    };
    let verdict = crate::outcome::trace::verdict(&trace.records);
    let status = if trace.records.is_empty() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    let mut body = json!({
        "id": id,
        "records": trace.records,
        "count": trace.records.len(),
        "truncated": trace.truncated,
        "verdict": verdict,
    });
    if trace.records.is_empty() {
        body["error"] = json!(format!(
            "no records with messageId or traceId {id:?}; check the id, and note that records \
             older than store.retention_days are deleted"
        ));
    }
    (status, Json(body)).into_response()
}

/// `GET /api/v1/stats`: records counted by `by` in time buckets over a window. Parameters:
/// `since` (default `1h`) or `from`/`to` (RFC 3339); `by` (`code` by default, `serviceType`,
/// `rule`, `operation`, `tenant`, `instance`, `product`, `device`); `status` and
/// `serviceType` as in `GET /api/v1/logs`; `bucket` (a duration; by default the window in about
/// 60–100 buckets). A bad or unknown parameter is a 400 naming every problem.
pub async fn stats(
    State(state): State<Arc<AppState>>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let Some(reader) = state.logs.clone() else {
        return store_disabled();
    };
    let Query(pairs) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad query string: {e}")),
    };
    let now = crate::message::now_ms();
    let query = match stats_query(&pairs, now) {
        Ok(q) => q,
        Err(problems) => return error(StatusCode::BAD_REQUEST, problems.join("; ")),
    };
    let console = Arc::clone(&state);
    let result = state
        .queries
        .run(&state.metrics, move |cancel| {
            let reader = reader.cancellable(cancel);
            crate::outcome::stats::stats(&reader, &query, Some(&console.console.stats_cache), now)
        })
        .await;
    match result {
        Ok(Ok(stats)) => Json(stats).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(refused) => refused,
    }
}

/// The parameters of `GET /api/v1/stats`, checked all at once.
pub fn stats_query(pairs: &[(String, String)], now_ms: i64) -> Result<StatsQuery, Vec<String>> {
    const KNOWN: [&str; 8] = [
        "since",
        "from",
        "to",
        "by",
        "status",
        "serviceType",
        "bizCode",
        "bucket",
    ];
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let get = |name: &str| -> Option<&str> {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    for (k, _) in pairs {
        if !KNOWN.contains(&k.as_str()) {
            problems.push(format!(
                "unknown parameter {k:?}; known: {}",
                KNOWN.join(", ")
            ));
        } else if !seen.insert(k.as_str()) {
            problems.push(format!("parameter {k:?} is given more than once"));
        }
    }
    let mut ms = |name: &str, f: fn(&str) -> Result<i64, String>| match get(name) {
        None => None,
        Some(v) => match f(v) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                None
            }
        },
    };
    let duration_ms = |s: &str| parse_duration(s).map(|d| d.as_millis() as i64);
    let since = ms("since", duration_ms);
    let from = ms("from", parse_time);
    let to = ms("to", parse_time);
    let bucket = ms("bucket", duration_ms);
    let by = match get("by") {
        None => GroupBy::Code,
        Some(b) => GroupBy::parse(b).unwrap_or_else(|e| {
            problems.push(e);
            GroupBy::Code
        }),
    };
    let status = get("status").and_then(|s| Status::parse(s).map_err(|e| problems.push(e)).ok());
    let service_type = get("serviceType").or(get("bizCode")).and_then(|s| {
        BizCode::parse(s).or_else(|| {
            problems.push(format!(
                "serviceType {s:?} is not uplink, ruleengine or ServerSubscribe"
            ));
            None
        })
    });
    if since.is_some() && (from.is_some() || to.is_some()) {
        problems.push("give since, or from/to, not both".to_owned());
    }
    let (from_ms, to_ms) = match (since, from, to) {
        (Some(s), _, _) => (now_ms - s, now_ms),
        (None, None, None) => (now_ms - 3_600_000, now_ms),
        (None, f, t) => {
            let t = t.unwrap_or(now_ms);
            (f.unwrap_or(t - 3_600_000), t)
        }
    };
    if from_ms >= to_ms {
        problems.push("from must be earlier than to".to_owned());
    }
    if to_ms - from_ms > MAX_WINDOW_MS {
        problems.push(format!(
            "the window is longer than {} days; count a shorter one",
            MAX_WINDOW_MS / 86_400_000
        ));
    }
    let bucket_ms = bucket.unwrap_or_else(|| auto_bucket_ms(to_ms - from_ms));
    if (to_ms - from_ms) / bucket_ms.max(1) > crate::outcome::stats::MAX_BUCKETS {
        problems.push(format!(
            "bucket is too small for the window: at most {} buckets",
            crate::outcome::stats::MAX_BUCKETS
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(StatsQuery {
        from_ms,
        to_ms,
        bucket_ms,
        by,
        status,
        service_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<StatsQuery, Vec<String>> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        stats_query(&pairs, 100 * 86_400_000)
    }

    #[test]
    fn parameters_are_checked_all_at_once() {
        let ok = q(&[("since", "24h"), ("by", "rule"), ("status", "failed")]).unwrap();
        assert_eq!(ok.to_ms - ok.from_ms, 86_400_000);
        assert_eq!(ok.bucket_ms, 900_000);
        assert_eq!(ok.by, GroupBy::Rule);
        let default = q(&[]).unwrap();
        assert_eq!(default.to_ms - default.from_ms, 3_600_000);
        assert_eq!(default.by, GroupBy::Code);
        let bad = q(&[
            ("since", "1h"),
            ("from", "2026-01-01T00:00:00Z"),
            ("by", "color"),
            ("status", "nope"),
            ("serviceType", "x"),
            ("limit", "3"),
            ("by", "code"),
        ])
        .unwrap_err();
        assert_eq!(bad.len(), 6, "{bad:?}");
        assert!(q(&[("since", "15m"), ("bucket", "1s")]).is_ok());
        assert!(q(&[("since", "1h"), ("bucket", "1s")]).is_err());
        assert!(q(&[("since", "7d"), ("bucket", "1s")]).is_err());
        assert!(q(&[("since", "60d")]).is_err());
    }
}
