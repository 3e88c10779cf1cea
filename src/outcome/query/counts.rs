//! The store's side of a stats query (`GET /api/v1/stats`): records counted by a key and code
//! in time buckets, as SQL text and its bound values for either backend.
//!
//! One statement over the window's rows: `time_ms / bucket`, the key, the code and `count(*)`,
//! grouped by the three. The conditions are a [`LogQuery`]'s (time range, status, service type),
//! so a status or a service type narrows a count exactly as it narrows a log query. The only
//! difference between the dialects is the placeholders and the function that finds the `/` in a
//! rule's operation ([`Dialect::position`]); integer division, `substr`, `CAST(.. AS TEXT)` and
//! `count(*)` are the same in both.

use rusqlite::types::Value;
use serde::Serialize;

use super::sql::Sql;
use super::{Dialect, LogQuery, Status};
use crate::outcome::{BizCode, Code};

/// What the records are counted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GroupBy {
    /// The status code (`200`, `9325`, ...).
    Code,
    /// The service type (`uplink`, `ruleengine`, `ServerSubscribe`).
    ServiceType,
    /// The rule: a `ruleengine` record's operation up to its first `/` (its rule's name).
    Rule,
    /// The whole operation: the topic, `rule/destination`, the rule, the group.
    Operation,
    /// The tenant id (9324 records carry the tenant over its quota).
    Tenant,
    /// The instance id (9326 records carry the instance over its specification).
    Instance,
    /// The product key.
    Product,
    /// The device name.
    Device,
}

impl GroupBy {
    /// Every grouping, with its name in `by=`.
    pub const ALL: [(GroupBy, &'static str); 8] = [
        (GroupBy::Code, "code"),
        (GroupBy::ServiceType, "serviceType"),
        (GroupBy::Rule, "rule"),
        (GroupBy::Operation, "operation"),
        (GroupBy::Tenant, "tenant"),
        (GroupBy::Instance, "instance"),
        (GroupBy::Product, "product"),
        (GroupBy::Device, "device"),
    ];

    /// `code`, `serviceType`, ... (ASCII case ignored).
    pub fn parse(s: &str) -> Result<GroupBy, String> {
        GroupBy::ALL
            .iter()
            .find(|(_, name)| name.eq_ignore_ascii_case(s.trim()))
            .map(|(by, _)| *by)
            .ok_or_else(|| {
                format!(
                    "by {s:?} is not one of {}",
                    GroupBy::ALL
                        .iter()
                        .map(|(_, n)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    pub fn as_str(self) -> &'static str {
        GroupBy::ALL
            .iter()
            .find(|(by, _)| *by == self)
            .map(|(_, n)| *n)
            .expect("every GroupBy is listed")
    }

    /// The SQL expression of the group's key in `dialect`.
    fn key_sql(self, dialect: Dialect) -> String {
        match self {
            GroupBy::Code => "CAST(code AS TEXT)".to_owned(),
            GroupBy::ServiceType => "biz_code".to_owned(),
            GroupBy::Rule => {
                let slash = dialect.position("operation", "'/'");
                format!(
                    "CASE WHEN {slash} > 0 THEN substr(operation, 1, {slash} - 1) \
                     ELSE operation END"
                )
            }
            GroupBy::Operation => "operation".to_owned(),
            GroupBy::Tenant => "tenant_id".to_owned(),
            GroupBy::Instance => "instance_id".to_owned(),
            GroupBy::Product => "product_key".to_owned(),
            GroupBy::Device => "device_name".to_owned(),
        }
    }
}

/// A counting query: records with `from_ms <= time < to_ms`, narrowed by status and service
/// type, counted by `by` in buckets of `bucket_ms` (aligned to the epoch).
#[derive(Clone, Debug, PartialEq)]
pub struct StatsQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub bucket_ms: i64,
    pub by: GroupBy,
    pub status: Option<Status>,
    pub service_type: Option<BizCode>,
}

/// A counted row: bucket index (`time / bucket_ms`), group key, code, records.
pub type CountRow = (i64, String, u16, u64);

/// A counted row from the values a store read (a key may be NULL; a code this build does not
/// know still counts, under [`Code::Internal`]).
pub(crate) fn count_row(bucket: i64, key: Option<String>, code: i64, count: i64) -> CountRow {
    (
        bucket,
        key.unwrap_or_default(),
        u16::try_from(code).unwrap_or(Code::Internal.as_u16()),
        count.max(0) as u64,
    )
}

impl StatsQuery {
    /// The statement that counts the query's records, and its values, in `dialect`. Selects
    /// bucket, key, code and count, in that order (see [`count_row`]).
    pub fn to_sql_for(&self, dialect: Dialect) -> (String, Vec<Value>) {
        let mut sql = Sql::new(String::new());
        sql.dialect = dialect;
        let bucket = sql.param(Value::Integer(self.bucket_ms.max(1)));
        sql.text = format!(
            "SELECT time_ms / {bucket} AS bucket, {} AS k, code, count(*) FROM records",
            self.by.key_sql(dialect)
        );
        // A rule is a `ruleengine` record's: the other service types have no rule.
        let service_type = match (self.by, self.service_type) {
            (GroupBy::Rule, None) => Some(BizCode::RuleEngine),
            (_, s) => s,
        };
        // The same conditions as a log query's; its `to` is inclusive, times are whole ms.
        LogQuery {
            from_ms: Some(self.from_ms),
            to_ms: Some(self.to_ms - 1),
            status: self.status,
            service_type,
            ..LogQuery::default()
        }
        .conditions(&mut sql, true, "time_ms");
        sql.text.push_str(" GROUP BY bucket, k, code");
        (sql.text, sql.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bind_every_value_in_both_dialects() {
        let q = StatsQuery {
            from_ms: 1000,
            to_ms: 2000,
            bucket_ms: 100,
            by: GroupBy::Rule,
            status: Some(Status::Code(Code::Throttled)),
            service_type: None,
        };
        let (sql, values) = q.to_sql_for(Dialect::Sqlite);
        assert_eq!(
            sql,
            "SELECT time_ms / ?1 AS bucket, CASE WHEN instr(operation, '/') > 0 THEN \
             substr(operation, 1, instr(operation, '/') - 1) ELSE operation END AS k, code, \
             count(*) FROM records WHERE biz_code = ?2 AND code = ?3 AND time_ms >= ?4 AND \
             time_ms <= ?5 GROUP BY bucket, k, code"
        );
        assert_eq!(
            values,
            [
                Value::Integer(100),
                Value::Text("ruleengine".into()),
                Value::Integer(9324),
                Value::Integer(1000),
                Value::Integer(1999),
            ]
        );
        let (pg, pg_values) = q.to_sql_for(Dialect::Postgres);
        assert_eq!(
            pg,
            sql.replace("instr(", "strpos(")
                .replace("?1", "$1")
                .replace("?2", "$2")
                .replace("?3", "$3")
                .replace("?4", "$4")
                .replace("?5", "$5")
        );
        assert_eq!(pg_values, values);
        let (sql, values) = StatsQuery {
            by: GroupBy::Code,
            status: None,
            ..q
        }
        .to_sql_for(Dialect::Sqlite);
        assert!(
            sql.starts_with("SELECT time_ms / ?1 AS bucket, CAST(code AS TEXT) AS k"),
            "{sql}"
        );
        assert!(
            sql.ends_with("WHERE time_ms >= ?2 AND time_ms <= ?3 GROUP BY bucket, k, code"),
            "{sql}"
        );
        assert_eq!(values.len(), 3);
    }
}
