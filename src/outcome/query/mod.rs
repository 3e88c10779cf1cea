//! Log queries: the console's filters, validated once for the CLI and the HTTP API alike.
//!
//! `iotfwd logs` and `GET /api/v1/logs` both turn their input into [`LogParams`] (the filters as
//! the user wrote them) and then into a [`LogQuery`] with [`LogParams::validate`]; the store runs
//! a [`LogQuery`] as SQL built from constant fragments with every user value bound
//! ([`LogQuery::to_sql`]). This file holds the validated query and its parts (the status filter,
//! the cursor, the error), `params.rs` the user's side and `sql.rs` the store's; `counts.rs` the
//! store's side of a stats query ([`StatsQuery`], the console's chart), on the same conditions.
//!
//! Results are newest first, ordered by (time, id), where id is the store's insertion
//! sequence. A page's [`Cursor`] says "older than this (time, id)" and also carries the highest
//! id the first page could see, so later pages show exactly the continuation of the first one:
//! records written while an operator pages through (even with an older time) never shift,
//! duplicate or slip into the pages.

mod counts;
mod params;
mod sql;

pub(crate) use counts::count_row;
pub use counts::{CountRow, GroupBy, StatsQuery};
pub use params::{HTTP_PARAMS, LogParams, parse_duration, parse_time};
pub use sql::Dialect;
pub(crate) use sql::{COLUMNS, KEY_TABLES, Order, json_escaped};

use std::fmt;

use super::codes::{self, BizCode, Code};
pub use super::record::format_time_ms;

/// Default page size.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest page size.
pub const MAX_LIMIT: usize = 1000;

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

impl LogQuery {
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

    /// True when no filter narrows the query (only limit and cursor).
    pub fn is_unfiltered(&self) -> bool {
        LogQuery {
            limit: self.limit,
            cursor: self.cursor,
            ..LogQuery::default()
        } == *self
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
