//! Log queries: the console's filters, validated once for the CLI and the HTTP API alike.
//!
//! `iotfwd logs` and `GET /api/v1/logs` both turn their input into [`LogParams`] (the filters as
//! the user wrote them) and then into a [`LogQuery`] with [`LogParams::validate`], which
//! reports *every* problem at once in words (an unknown service type, a bad time, `from` later
//! than `to`, ...). A bad query is an error, never an empty result that looks as if nothing
//! matched.
//!
//! The store runs a [`LogQuery`] as SQL whose text is assembled only from constant fragments
//! ([`LogQuery::to_sql`]); every user value is a bound parameter. The keyword is a literal,
//! case-sensitive substring of `operation`, `reason` or `content`, with no wildcard or escape
//! rules, so `, '";=()[]{}?@&<>/:`, `%`, `_`, tabs and newlines are found as they are. It is
//! tested by `iotfwd_contains(keyword, operation, reason, content)`, a function the store
//! registers on its connections: the same result as SQLite's `instr()` on each column, but a
//! vectorised substring search (memchr's memmem) run once per row instead of three scalar
//! scans, which is what makes a keyword scan over 10 million records fit in seconds.
//!
//! Plans: an exact filter (messageId, traceId, device, product) uses its index, whose entries are
//! already in time order; an unfiltered or time-range-only query walks the time index; both stop
//! after one page. A query narrowed only by keyword, status or service type
//! ([`LogQuery::scans`]) is split by the store at the time of the 65536th newest record in range:
//! the newer part through the time index (a common keyword fills the page there), the older
//! part, only if the page is not full yet, in storage order keeping the newest rows
//! (`ORDER BY +time_ms`), split by id ranges across the cores. Reading rows sequentially is
//! about four times cheaper than walking the time index and looking each row up, so the worst
//! case (a keyword that matches nothing) is one sequential pass, shared by the cores.
//!
//! Results are newest first, ordered by (time, id), where id is the store's insertion
//! sequence. A page's [`Cursor`] says "older than this (time, id)" and also carries the highest
//! id the first page could see, so later pages show exactly the continuation of the first one:
//! records written while an operator pages through (even with an older time) never shift,
//! duplicate or slip into the pages.

use std::fmt;
use std::time::Duration;

use rusqlite::types::Value;

use super::codes::{self, BizCode, Code};
pub use super::record::format_time_ms;

/// Default page size.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest page size.
pub const MAX_LIMIT: usize = 1000;

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

/// A query that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogQuery {
    pub device: Option<String>,
    pub product: Option<String>,
    pub trace_id: Option<String>,
    pub message_id: Option<String>,
    /// Literal, case-sensitive substring of operation, reason or content.
    pub keyword: Option<String>,
    pub status: Option<Status>,
    pub service_type: Option<BizCode>,
    /// Inclusive lower bound on `time`, ms since the epoch.
    pub from_ms: Option<i64>,
    /// Inclusive upper bound on `time`, ms since the epoch.
    pub to_ms: Option<i64>,
    /// Page size, 1..=[`MAX_LIMIT`].
    pub limit: usize,
    /// Continue after this point (from a previous page).
    pub cursor: Option<Cursor>,
}

impl Default for LogQuery {
    fn default() -> Self {
        LogQuery {
            device: None,
            product: None,
            trace_id: None,
            message_id: None,
            keyword: None,
            status: None,
            service_type: None,
            from_ms: None,
            to_ms: None,
            limit: DEFAULT_LIMIT,
            cursor: None,
        }
    }
}

/// The columns every query selects, in [`super::store`]'s row order.
pub(crate) const COLUMNS: &str = "id, time_ms, trace_id, message_id, product_key, device_name, \
     biz_code, operation, code, reason, content, tenant_id, instance_id";

impl LogQuery {
    /// The SQL and its bound parameters. The text is built only from constant fragments; every
    /// value the user gave is a parameter. Selects `limit + 1` rows so the store can tell whether
    /// a next page exists. This is the index-ordered form; the store splits queries for which
    /// [`LogQuery::scans`] holds (see the module doc).
    pub fn to_sql(&self) -> (String, Vec<Value>) {
        self.to_sql_in(Order::Index, None, None, None, self.limit + 1)
    }

    /// The id of the oldest record at or after `from_ms` (for estimating how many records a
    /// time range holds: ids follow time closely).
    pub(crate) fn first_id_from_sql() -> &'static str {
        "SELECT id FROM records WHERE time_ms >= ?1 ORDER BY time_ms, id LIMIT 1"
    }

    /// True when only row-by-row filters (keyword, status, service type) narrow the query, so the
    /// store reads the newest part through the time index and the rest in storage order.
    pub fn scans(&self) -> bool {
        let exact = self.message_id.is_some()
            || self.trace_id.is_some()
            || self.device.is_some()
            || self.product.is_some();
        let row_filters =
            self.keyword.is_some() || self.status.is_some() || self.service_type.is_some();
        row_filters && !exact
    }

    /// The query restricted to `at_least <= time_ms < before` and to ids in `ids` (`lo < id <=
    /// hi`), in `order`, for `rows` rows.
    pub(crate) fn to_sql_in(
        &self,
        order: Order,
        at_least: Option<i64>,
        before: Option<i64>,
        ids: Option<(i64, i64)>,
        rows: usize,
    ) -> (String, Vec<Value>) {
        // In storage order, `+time_ms` keeps SQLite from using the time index for any term.
        let time = match order {
            Order::Index => "time_ms",
            Order::Scan => "+time_ms",
        };
        let mut sql = Sql::new(format!("SELECT {COLUMNS} FROM records"));
        self.conditions(&mut sql, true, time);
        if let Some(t) = at_least {
            let p = sql.param(Value::Integer(t));
            sql.and(&format!("{time} >= {p}"));
        }
        if let Some(t) = before {
            let p = sql.param(Value::Integer(t));
            sql.and(&format!("{time} < {p}"));
        }
        if let Some((lo, hi)) = ids {
            let lo = sql.param(Value::Integer(lo));
            let hi = sql.param(Value::Integer(hi));
            sql.and(&format!("id > {lo} AND id <= {hi}"));
        }
        let limit = sql.param(Value::Integer(rows as i64));
        let id = match order {
            Order::Index => "id",
            Order::Scan => "+id",
        };
        sql.text
            .push_str(&format!(" ORDER BY {time} DESC, {id} DESC LIMIT {limit}"));
        (sql.text, sql.values)
    }

    /// The time and id of the record `offset` places after the newest one within the query's
    /// time range and cursor (row filters ignored): where the index-ordered part of a split query
    /// ends.
    pub(crate) fn boundary_sql(&self, offset: usize) -> (String, Vec<Value>) {
        let mut sql = Sql::new("SELECT time_ms, id FROM records".to_owned());
        self.conditions(&mut sql, false, "time_ms");
        let p = sql.param(Value::Integer(offset as i64));
        sql.text.push_str(&format!(
            " ORDER BY time_ms DESC, id DESC LIMIT 1 OFFSET {p}"
        ));
        (sql.text, sql.values)
    }

    /// The WHERE conditions: the filters (all, or only time range and cursor), with `time` for
    /// the time column (`time_ms`, or `+time_ms` to keep its index out).
    fn conditions(&self, sql: &mut Sql, row_filters: bool, time: &str) {
        if row_filters {
            for (column, value) in [
                ("message_id", &self.message_id),
                ("trace_id", &self.trace_id),
                ("device_name", &self.device),
                ("product_key", &self.product),
            ] {
                if let Some(v) = value {
                    let p = sql.param(Value::Text(v.clone()));
                    sql.and(&format!("{column} = {p}"));
                }
            }
            if let Some(biz) = self.service_type {
                let p = sql.param(Value::Text(biz.as_str().to_owned()));
                sql.and(&format!("biz_code = {p}"));
            }
            let ok = Value::Integer(i64::from(Code::Ok.as_u16()));
            match self.status {
                None => {}
                Some(Status::Success) => {
                    let p = sql.param(ok);
                    sql.and(&format!("code = {p}"));
                }
                Some(Status::Failed) => {
                    let p = sql.param(ok);
                    sql.and(&format!("code <> {p}"));
                }
                Some(Status::Code(code)) => {
                    let p = sql.param(Value::Integer(i64::from(code.as_u16())));
                    sql.and(&format!("code = {p}"));
                }
            }
        }
        if let Some(from) = self.from_ms {
            let p = sql.param(Value::Integer(from));
            sql.and(&format!("{time} >= {p}"));
        }
        if let Some(to) = self.to_ms {
            let p = sql.param(Value::Integer(to));
            sql.and(&format!("{time} <= {p}"));
        }
        if row_filters && let Some(keyword) = &self.keyword {
            let p = sql.param(Value::Text(keyword.clone()));
            sql.and(&format!("iotfwd_contains({p}, operation, reason, content)"));
        }
        if let Some(cursor) = &self.cursor {
            let t = sql.param(Value::Integer(cursor.time_ms));
            let id = sql.param(Value::Integer(cursor.id));
            let hw = sql.param(Value::Integer(cursor.high_water));
            sql.and(&format!("({time}, id) < ({t}, {id}) AND id <= {hw}"));
        }
    }

    /// True when no filter narrows the query (only limit and cursor).
    pub fn is_unfiltered(&self) -> bool {
        LogQuery {
            limit: self.limit,
            cursor: self.cursor,
            ..LogQuery::default()
        } == *self
    }
}

/// SQL text from constant fragments, and the values bound to its numbered parameters.
struct Sql {
    text: String,
    values: Vec<Value>,
    has_where: bool,
}

impl Sql {
    fn new(text: String) -> Sql {
        Sql {
            text,
            values: Vec::new(),
            has_where: false,
        }
    }

    /// Binds a value; returns its placeholder (`?3`).
    fn param(&mut self, value: Value) -> String {
        self.values.push(value);
        format!("?{}", self.values.len())
    }

    /// Appends a condition (constant text with placeholders).
    fn and(&mut self, condition: &str) {
        self.text
            .push_str(if self.has_where { " AND " } else { " WHERE " });
        self.has_where = true;
        self.text.push_str(condition);
    }
}

/// How the store reads a query's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// Through an index already in (time, id) order; stops after one page.
    Index,
    /// In storage order, keeping the newest rows; reads every row in range.
    Scan,
}

/// The status filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Code 200.
    Success,
    /// Any code but 200.
    Failed,
    /// Exactly this code.
    Code(Code),
}

impl Status {
    /// `success`, `failed` (ASCII case ignored) or a code iotfwd logs.
    pub fn parse(s: &str) -> Result<Status, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("success") {
            return Ok(Status::Success);
        }
        if t.eq_ignore_ascii_case("failed") {
            return Ok(Status::Failed);
        }
        let known = || {
            Code::ALL
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match t.parse::<u16>() {
            Ok(n) => match codes::lookup(n) {
                Some(info) => Ok(Status::Code(info.as_code())),
                None => Err(format!(
                    "status {n} is not a code iotfwd logs (known: {}); see `iotfwd codes`",
                    known()
                )),
            },
            Err(_) => Err(format!(
                "status {s:?} is not success, failed or a code (e.g. 9325); see `iotfwd codes`"
            )),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Success => f.write_str("success"),
            Status::Failed => f.write_str("failed"),
            Status::Code(c) => write!(f, "{c}"),
        }
    }
}

/// Where the next page starts: strictly older than (`time_ms`, `id`), and no newer than the
/// first page's `high_water` id. Opaque to users: `v1.<time>.<id>.<high water>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub time_ms: i64,
    pub id: i64,
    pub high_water: i64,
}

impl Cursor {
    pub fn parse(s: &str) -> Result<Cursor, String> {
        let bad = || {
            format!(
                "cursor {s:?} is not one iotfwd gave out; pass the nextCursor of the previous \
                 page unchanged"
            )
        };
        let mut parts = s.strip_prefix("v1.").ok_or_else(bad)?.split('.');
        let mut next = || -> Result<i64, String> {
            parts
                .next()
                .and_then(|p| p.parse::<i64>().ok())
                .ok_or_else(bad)
        };
        let cursor = Cursor {
            time_ms: next()?,
            id: next()?,
            high_water: next()?,
        };
        if parts.next().is_some() || cursor.id > cursor.high_water {
            return Err(bad());
        }
        Ok(cursor)
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1.{}.{}.{}", self.time_ms, self.id, self.high_water)
    }
}

/// Everything wrong with a query, one line each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryError {
    pub problems: Vec<String>,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

impl std::error::Error for QueryError {}

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

    #[test]
    fn status_forms() {
        assert_eq!(Status::parse("success"), Ok(Status::Success));
        assert_eq!(Status::parse("FAILED"), Ok(Status::Failed));
        assert_eq!(Status::parse("200"), Ok(Status::Code(Code::Ok)));
        assert_eq!(Status::parse("9650"), Ok(Status::Code(Code::AckTimeout)));
    }

    #[test]
    fn cursor_round_trips() {
        let c = Cursor {
            time_ms: 1_764_208_800_123,
            id: 42,
            high_water: 99,
        };
        assert_eq!(Cursor::parse(&c.to_string()), Ok(c));
    }

    #[test]
    fn sql_binds_every_value_and_numbers_parameters() {
        let q = LogQuery {
            device: Some("d'; DROP TABLE records; --".into()),
            keyword: Some("?1".into()),
            status: Some(Status::Failed),
            from_ms: Some(5),
            cursor: Some(Cursor {
                time_ms: 9,
                id: 3,
                high_water: 4,
            }),
            limit: 7,
            ..LogQuery::default()
        };
        let (sql, values) = q.to_sql();
        assert!(!sql.contains("DROP"), "{sql}");
        assert!(
            sql.ends_with(
                " WHERE device_name = ?1 AND code <> ?2 AND time_ms >= ?3 AND \
                 iotfwd_contains(?4, operation, reason, content) AND (time_ms, id) < (?5, ?6) \
                 AND id <= ?7 ORDER BY time_ms DESC, id DESC LIMIT ?8"
            ),
            "{sql}"
        );
        assert_eq!(
            values,
            [
                Value::Text("d'; DROP TABLE records; --".into()),
                Value::Integer(200),
                Value::Integer(5),
                Value::Text("?1".into()),
                Value::Integer(9),
                Value::Integer(3),
                Value::Integer(4),
                Value::Integer(8),
            ]
        );
        let (sql, values) = LogQuery::default().to_sql();
        assert!(
            sql.ends_with("FROM records ORDER BY time_ms DESC, id DESC LIMIT ?1"),
            "{sql}"
        );
        assert_eq!(values, [Value::Integer(51)]);
        // Split queries: the scan part, and the boundary that ignores row filters.
        let q = LogQuery {
            keyword: Some("k".into()),
            from_ms: Some(1),
            ..LogQuery::default()
        };
        assert!(q.scans());
        let (sql, values) = q.to_sql_in(Order::Scan, None, Some(9), None, 3);
        assert!(
            sql.ends_with(
                " WHERE +time_ms >= ?1 AND iotfwd_contains(?2, operation, reason, content) AND \
                 +time_ms < ?3 ORDER BY +time_ms DESC, +id DESC LIMIT ?4"
            ),
            "{sql}"
        );
        assert_eq!(values.len(), 4);
        let (sql, values) = q.boundary_sql(100);
        assert!(
            sql.ends_with(
                "SELECT time_ms, id FROM records WHERE time_ms >= ?1 ORDER BY time_ms DESC, id DESC \
                 LIMIT 1 OFFSET ?2"
            ),
            "{sql}"
        );
        assert_eq!(values, [Value::Integer(1), Value::Integer(100)]);
        assert!(
            !LogQuery {
                keyword: Some("k".into()),
                device: Some("d".into()),
                ..LogQuery::default()
            }
            .scans()
        );
    }
}
