//! The user's side of a log query: the filters as given ([`LogParams`]), from CLI flags or HTTP
//! parameters, and their validation into a [`LogQuery`].
//!
//! [`LogParams::validate`] reports *every* problem at once in words (an unknown service type, a
//! bad time, `from` later than `to`, ...). A bad query is an error, never an empty result that
//! looks as if nothing matched.

use std::time::Duration;

use super::{Cursor, DEFAULT_LIMIT, LogQuery, MAX_LIMIT, QueryError, Status, format_time_ms};
use crate::outcome::BizCode;

/// The filters as given by a user (CLI flags or HTTP query parameters), not yet checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogParams {
    pub device: Option<String>,
    pub product: Option<String>,
    pub trace_id: Option<String>,
    pub message_id: Option<String>,
    pub keyword: Option<String>,
    /// `success`, `failed`, or a code such as `9325`.
    pub status: Option<String>,
    /// `uplink`, `ruleengine` or `ServerSubscribe` (ASCII case ignored).
    pub service_type: Option<String>,
    /// A duration back from now: `90s`, `15m`, `1h`, `7d`.
    pub since: Option<String>,
    /// RFC 3339, inclusive.
    pub from: Option<String>,
    /// RFC 3339, inclusive.
    pub to: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// The HTTP query parameter names, each with the [`LogParams`] field it fills. The CLI flag of
/// each is the snake_case name with dashes (`--trace-id`); HTTP accepts both spellings.
pub const HTTP_PARAMS: &[(&str, &str)] = &[
    ("device", "device"),
    ("deviceName", "device"),
    ("product", "product"),
    ("productKey", "product"),
    ("traceId", "trace_id"),
    ("trace_id", "trace_id"),
    ("messageId", "message_id"),
    ("message_id", "message_id"),
    ("keyword", "keyword"),
    ("status", "status"),
    ("serviceType", "service_type"),
    ("service_type", "service_type"),
    ("bizCode", "service_type"),
    ("since", "since"),
    ("from", "from"),
    ("to", "to"),
    ("limit", "limit"),
    ("cursor", "cursor"),
];

impl LogParams {
    /// Builds the parameters from decoded `name=value` pairs (an HTTP query string). An unknown
    /// name, or a filter given twice, is an error: silently ignoring a misspelt filter would
    /// return everything as if it matched.
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<LogParams, QueryError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut params = LogParams::default();
        let mut problems = Vec::new();
        for (name, value) in pairs {
            let name = name.as_ref();
            let Some(&(_, field)) = HTTP_PARAMS.iter().find(|(n, _)| *n == name) else {
                problems.push(format!(
                    "unknown parameter {name:?}; the filters are device, product, traceId, \
                     messageId, keyword, status, serviceType, since, from, to, limit, cursor"
                ));
                continue;
            };
            let slot = match field {
                "device" => &mut params.device,
                "product" => &mut params.product,
                "trace_id" => &mut params.trace_id,
                "message_id" => &mut params.message_id,
                "keyword" => &mut params.keyword,
                "status" => &mut params.status,
                "service_type" => &mut params.service_type,
                "since" => &mut params.since,
                "from" => &mut params.from,
                "to" => &mut params.to,
                "limit" => &mut params.limit,
                _ => &mut params.cursor,
            };
            if slot.is_some() {
                problems.push(format!("{name} is given more than once; give it once"));
            } else {
                *slot = Some(value.into());
            }
        }
        if problems.is_empty() {
            Ok(params)
        } else {
            Err(QueryError { problems })
        }
    }

    /// Checks every filter, relative to `now_ms` for `since`, and reports every problem at once.
    pub fn validate(&self, now_ms: i64) -> Result<LogQuery, QueryError> {
        let mut problems = Vec::new();
        let mut text = |name: &str, value: &Option<String>| -> Option<String> {
            match value {
                Some(v) if v.is_empty() => {
                    problems.push(format!("{name} is empty; leave it out to match any {name}"));
                    None
                }
                v => v.clone(),
            }
        };
        let device = text("device", &self.device);
        let product = text("product", &self.product);
        let trace_id = text("traceId", &self.trace_id);
        let message_id = text("messageId", &self.message_id);
        let keyword = text("keyword", &self.keyword);

        let status = self.status.as_deref().and_then(|s| match Status::parse(s) {
            Ok(status) => Some(status),
            Err(e) => {
                problems.push(e);
                None
            }
        });
        let service_type = self.service_type.as_deref().and_then(|s| {
            let parsed = BizCode::parse(s);
            if parsed.is_none() {
                problems.push(format!(
                    "service type {s:?} is not one iotfwd logs; use uplink, ruleengine or \
                     ServerSubscribe"
                ));
            }
            parsed
        });

        let mut from_ms = None;
        let mut to_ms = None;
        if let Some(since) = &self.since {
            if self.from.is_some() || self.to.is_some() {
                problems.push(
                    "since cannot be combined with from/to; give either since (a duration back \
                     from now) or from and/or to (RFC 3339 times)"
                        .to_owned(),
                );
            }
            match parse_duration(since) {
                Ok(d) => from_ms = Some(now_ms.saturating_sub(d.as_millis() as i64)),
                Err(e) => problems.push(e),
            }
        } else {
            let mut time = |name: &str, value: &Option<String>| {
                value.as_deref().and_then(|v| match parse_time(v) {
                    Ok(ms) => Some(ms),
                    Err(e) => {
                        problems.push(format!("{name} {e}"));
                        None
                    }
                })
            };
            from_ms = time("from", &self.from);
            to_ms = time("to", &self.to);
            if let (Some(f), Some(t)) = (from_ms, to_ms)
                && f > t
            {
                problems.push(format!(
                    "from ({}) is later than to ({}); swap them",
                    format_time_ms(f),
                    format_time_ms(t)
                ));
            }
        }

        let limit = match self.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(l) => match l.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                Ok(n) => {
                    problems.push(format!(
                        "limit {n} is out of range (expected 1..={MAX_LIMIT}); page with the \
                         cursor for more"
                    ));
                    DEFAULT_LIMIT
                }
                Err(_) => {
                    problems.push(format!(
                        "limit {l:?} is not a number (expected 1..={MAX_LIMIT})"
                    ));
                    DEFAULT_LIMIT
                }
            },
        };
        let cursor = self.cursor.as_deref().and_then(|c| match Cursor::parse(c) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(e);
                None
            }
        });

        if !problems.is_empty() {
            return Err(QueryError { problems });
        }
        Ok(LogQuery {
            device,
            product,
            trace_id,
            message_id,
            keyword,
            status,
            service_type,
            from_ms,
            to_ms,
            limit,
            cursor,
        })
    }
}

/// `90s`, `15m`, `1h`, `7d`, `2w` (a whole number and one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "since {s:?} is not a duration; write a whole number and a unit: 30s, 15m, 1h, 7d \
             or 2w"
        )
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(format!("since {s:?} is zero; give a positive duration"));
    }
    n.checked_mul(secs)
        .filter(|secs| *secs <= 100 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("since {s:?} is longer than 100 years"))
}

/// RFC 3339 (`2026-11-27T02:00:00Z`, `2026-11-27T10:00:00+08:00`, fractions allowed) to ms
/// since the epoch. The error starts after the parameter's name.
pub fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            format!(
                "{s:?} is not an RFC 3339 time ({e}); write e.g. 2026-11-27T02:00:00Z or \
                 2026-11-27T10:00:00+08:00"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Code;

    const NOW: i64 = 1_764_208_800_000; // 2025-11-27T02:00:00Z

    fn params(pairs: &[(&str, &str)]) -> LogParams {
        LogParams::from_pairs(pairs.iter().map(|(k, v)| (*k, v.to_string()))).unwrap()
    }

    fn problems(pairs: &[(&str, &str)]) -> Vec<String> {
        params(pairs).validate(NOW).unwrap_err().problems
    }

    #[test]
    fn every_filter_is_parsed() {
        let q = params(&[
            ("device", "d1"),
            ("productKey", "p1"),
            ("traceId", "t1"),
            ("message_id", "m1"),
            ("keyword", "a,b"),
            ("status", "9325"),
            ("serviceType", "ruleengine"),
            ("from", "2025-11-27T01:00:00Z"),
            ("to", "2025-11-27T10:00:00+08:00"),
            ("limit", "10"),
            ("cursor", "v1.5.7.9"),
        ])
        .validate(NOW)
        .unwrap();
        assert_eq!(
            q,
            LogQuery {
                device: Some("d1".into()),
                product: Some("p1".into()),
                trace_id: Some("t1".into()),
                message_id: Some("m1".into()),
                keyword: Some("a,b".into()),
                status: Some(Status::Code(Code::DestinationUnavailable)),
                service_type: Some(BizCode::RuleEngine),
                from_ms: Some(NOW - 3_600_000),
                to_ms: Some(NOW),
                limit: 10,
                cursor: Some(Cursor {
                    time_ms: 5,
                    id: 7,
                    high_water: 9
                }),
            }
        );
        assert!(!q.is_unfiltered());
        assert!(LogQuery::default().is_unfiltered());
    }

    #[test]
    fn since_is_back_from_now() {
        for (since, ms) in [
            ("30s", 30_000),
            ("15m", 900_000),
            ("1h", 3_600_000),
            ("7d", 604_800_000),
            ("2w", 1_209_600_000),
        ] {
            let q = params(&[("since", since)]).validate(NOW).unwrap();
            assert_eq!(q.from_ms, Some(NOW - ms), "{since}");
            assert_eq!(q.to_ms, None);
        }
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        let p = problems(&[("serviceType", "rules")]);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("\"rules\"") && p[0].contains("ServerSubscribe"),
            "{p:?}"
        );

        let p = problems(&[("from", "yesterday")]);
        assert!(
            p[0].starts_with("from \"yesterday\" is not an RFC 3339 time"),
            "{p:?}"
        );

        let p = problems(&[
            ("from", "2025-11-27T03:00:00Z"),
            ("to", "2025-11-27T02:00:00Z"),
        ]);
        assert_eq!(
            p,
            [
                "from (2025-11-27T03:00:00.000Z) is later than to (2025-11-27T02:00:00.000Z); swap them"
            ]
        );

        assert!(problems(&[("since", "1y")])[0].contains("not a duration"));
        assert!(problems(&[("since", "h")])[0].contains("not a duration"));
        assert!(problems(&[("since", "0h")])[0].contains("zero"));
        assert!(
            problems(&[("since", "1h"), ("from", "2025-11-27T03:00:00Z")])[0]
                .contains("cannot be combined")
        );
        assert!(problems(&[("status", "ok")])[0].contains("not success, failed or a code"));
        assert!(problems(&[("status", "9999")])[0].contains("9999 is not a code iotfwd logs"));
        assert!(problems(&[("limit", "0")])[0].contains("out of range"));
        assert!(problems(&[("limit", "1001")])[0].contains("out of range"));
        assert!(problems(&[("limit", "ten")])[0].contains("not a number"));
        assert!(problems(&[("cursor", "abc")])[0].contains("not one iotfwd gave out"));
        assert!(problems(&[("cursor", "v1.1.2")])[0].contains("not one iotfwd gave out"));
        assert!(problems(&[("cursor", "v1.1.9.2")])[0].contains("not one iotfwd gave out"));
        assert!(problems(&[("device", "")])[0].contains("device is empty"));
        assert!(problems(&[("keyword", "")])[0].contains("keyword is empty"));

        // Every problem at once.
        let p = problems(&[
            ("serviceType", "x"),
            ("status", "x"),
            ("from", "x"),
            ("limit", "x"),
        ]);
        assert_eq!(p.len(), 4, "{p:?}");

        let e = LogParams::from_pairs([("devcie", "d1"), ("status", "failed")]).unwrap_err();
        assert!(
            e.to_string().contains("unknown parameter \"devcie\""),
            "{e}"
        );
        let e = LogParams::from_pairs([("device", "a"), ("deviceName", "b")]).unwrap_err();
        assert!(e.to_string().contains("more than once"), "{e}");
    }
}
