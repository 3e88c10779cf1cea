//! The store's side of a log query: a [`LogQuery`] as SQL text and its bound values.
//!
//! The SQL text is assembled only from constant fragments ([`LogQuery::to_sql`]); every user
//! value is a bound parameter. The keyword is a literal,
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
//! The same query runs on a PostgreSQL store ([`Dialect::Postgres`], [`LogQuery::to_sql_for`]):
//! the same conditions with `$n` placeholders, no SQLite index hints, and the keyword as
//! `strpos()` on the same three columns for the keyword as typed and as JSON writes it
//! ([`json_escaped`]): the same literal, case-sensitive match as `iotfwd_contains`. PostgreSQL's
//! planner picks the indexes itself, so a PostgreSQL query is never split.

use rusqlite::types::Value;

use super::{LogQuery, Status};
use crate::outcome::Code;

/// The columns every query selects, in the order the store reads a row.
pub(crate) const COLUMNS: &str = "id, time_ms, trace_id, message_id, product_key, device_name, \
     biz_code, operation, code, reason, content, tenant_id, instance_id";

/// The lookup tables of a SQLite store of schema version 2 (`outcome::store::schema` creates
/// them): (table, its key column, the records column it stands for). Each row is (key,
/// time_ms, record id) for the records with ids up to `indexed.through`; a query for a device
/// or a product walks its key's rows backwards from the newest, as it would a B-tree index on
/// (key, time), and reads the newer records (the tail) from `records` itself
/// ([`LogQuery::to_sql_by_key`]).
pub(crate) const KEY_TABLES: [(&str, &str, &str); 2] = [
    ("by_device", "device", "device_name"),
    ("by_product", "product", "product_key"),
];

/// Which database's SQL to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The 1-based position of `needle` in `haystack` (both SQL expressions), 0 when absent:
    /// `instr()` in SQLite, `strpos()` in PostgreSQL (both count characters).
    pub(super) fn position(self, haystack: &str, needle: &str) -> String {
        match self {
            Dialect::Sqlite => format!("instr({haystack}, {needle})"),
            Dialect::Postgres => format!("strpos({haystack}, {needle})"),
        }
    }
}

/// `needle` as it is written inside a JSON string, when that differs from `needle` (a quote, a
/// backslash, a control character): a keyword also matches a payload in this form.
pub(crate) fn json_escaped(needle: &str) -> Option<String> {
    let quoted = serde_json::to_string(needle).ok()?;
    let escaped = &quoted[1..quoted.len() - 1];
    (escaped != needle).then(|| escaped.to_owned())
}

impl LogQuery {
    /// [`LogQuery::to_sql`] in `dialect`: one index-ordered statement.
    pub fn to_sql_for(&self, dialect: Dialect) -> (String, Vec<Value>) {
        self.to_sql_in_dialect(dialect, Order::Index, None, None, None, self.limit + 1)
    }

    /// The SQL and its bound parameters. The text is built only from constant fragments; every
    /// value the user gave is a parameter. Selects `limit + 1` rows so the store can tell whether
    /// a next page exists. This is the index-ordered form; the store splits queries for which
    /// [`LogQuery::scans`] holds (see the module doc).
    pub fn to_sql(&self) -> (String, Vec<Value>) {
        self.to_sql_in(Order::Index, None, None, None, self.limit + 1)
    }

    /// [`LogQuery::to_sql`] on a SQLite store with lookup tables ([`KEY_TABLES`]), for a query
    /// that names a device or a product (`None` for any other): the records up to `through`
    /// found through the device's (else the product's) lookup rows, newest first, and the newer
    /// ones read from `records`, merged in one statement. SQLite merges the two ordered parts
    /// and stops after the page.
    pub fn to_sql_by_key(&self, through: i64) -> Option<(String, Vec<Value>)> {
        let ((table, key, _), value) = match (&self.device, &self.product) {
            (Some(device), _) => (KEY_TABLES[0], device),
            (None, Some(product)) => (KEY_TABLES[1], product),
            (None, None) => return None,
        };
        let columns = COLUMNS.replacen("id, time_ms", "rid AS id, t AS time_ms", 1);
        let mut sql = Sql::new(format!(
            "SELECT {columns} FROM {table} JOIN records ON records.id = {table}.rid"
        ));
        let v = sql.param(Value::Text(value.clone()));
        sql.and(&format!("{key} = {v}"));
        let t = sql.param(Value::Integer(through));
        sql.and(&format!("rid <= {t}"));
        // The same bounds on the lookup rows' own columns, so the walk starts and stops there.
        if let Some(from) = self.from_ms {
            let p = sql.param(Value::Integer(from));
            sql.and(&format!("t >= {p}"));
        }
        if let Some(to) = self.to_ms {
            let p = sql.param(Value::Integer(to));
            sql.and(&format!("t <= {p}"));
        }
        if let Some(cursor) = &self.cursor {
            let ct = sql.param(Value::Integer(cursor.time_ms));
            let cid = sql.param(Value::Integer(cursor.id));
            sql.and(&format!("(t, rid) < ({ct}, {cid})"));
        }
        self.conditions(&mut sql, true, "time_ms");
        // The tail by its ids: without NOT INDEXED, SQLite walks the time index for the order
        // and tests every record in the time range.
        sql.text.push_str(&format!(
            " UNION ALL SELECT {COLUMNS} FROM records NOT INDEXED"
        ));
        sql.has_where = false;
        let t = sql.param(Value::Integer(through));
        sql.and(&format!("id > {t}"));
        self.conditions(&mut sql, true, "time_ms");
        let limit = sql.param(Value::Integer(self.limit as i64 + 1));
        sql.text
            .push_str(&format!(" ORDER BY time_ms DESC, id DESC LIMIT {limit}"));
        Some((sql.text, sql.values))
    }

    /// The id of the oldest record at or after `from_ms` (for estimating how many records a
    /// time range holds: ids follow time closely).
    pub(crate) fn first_id_from_sql() -> &'static str {
        "SELECT id FROM records WHERE time_ms >= ?1 ORDER BY time_ms, id LIMIT 1"
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
        self.to_sql_in_dialect(Dialect::Sqlite, order, at_least, before, ids, rows)
    }

    fn to_sql_in_dialect(
        &self,
        dialect: Dialect,
        order: Order,
        at_least: Option<i64>,
        before: Option<i64>,
        ids: Option<(i64, i64)>,
        rows: usize,
    ) -> (String, Vec<Value>) {
        // In storage order, `+time_ms` keeps SQLite from using the time index for any term.
        let time = match (order, dialect) {
            (Order::Scan, Dialect::Sqlite) => "+time_ms",
            _ => "time_ms",
        };
        let mut sql = Sql::new(format!("SELECT {COLUMNS} FROM records"));
        sql.dialect = dialect;
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
        let id = match (order, dialect) {
            (Order::Scan, Dialect::Sqlite) => "+id",
            _ => "id",
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
    pub(super) fn conditions(&self, sql: &mut Sql, row_filters: bool, time: &str) {
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
            match sql.dialect {
                Dialect::Sqlite => {
                    sql.and(&format!("iotfwd_contains({p}, operation, reason, content)"));
                }
                Dialect::Postgres => {
                    let mut any = format!(
                        "(strpos(operation, {p}) > 0 OR strpos(reason, {p}) > 0 OR \
                         strpos(content, {p}) > 0"
                    );
                    if let Some(escaped) = json_escaped(keyword) {
                        let e = sql.param(Value::Text(escaped));
                        any.push_str(&format!(
                            " OR strpos(operation, {e}) > 0 OR strpos(reason, {e}) > 0 OR \
                             strpos(content, {e}) > 0"
                        ));
                    }
                    any.push(')');
                    sql.and(&any);
                }
            }
        }
        if let Some(cursor) = &self.cursor {
            let t = sql.param(Value::Integer(cursor.time_ms));
            let id = sql.param(Value::Integer(cursor.id));
            let hw = sql.param(Value::Integer(cursor.high_water));
            sql.and(&format!("({time}, id) < ({t}, {id}) AND id <= {hw}"));
        }
    }
}

/// SQL text from constant fragments, and the values bound to its numbered parameters.
pub(super) struct Sql {
    pub(super) text: String,
    pub(super) values: Vec<Value>,
    has_where: bool,
    pub(super) dialect: Dialect,
}

impl Sql {
    pub(super) fn new(text: String) -> Sql {
        Sql {
            text,
            values: Vec::new(),
            has_where: false,
            dialect: Dialect::Sqlite,
        }
    }

    /// Binds a value; returns its placeholder (`?3`, or `$3` for PostgreSQL).
    pub(super) fn param(&mut self, value: Value) -> String {
        self.values.push(value);
        match self.dialect {
            Dialect::Sqlite => format!("?{}", self.values.len()),
            Dialect::Postgres => format!("${}", self.values.len()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::query::Cursor;

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
