//! Counts over the record store: how many records per code (or service type, rule, tenant, ...)
//! in a time window, in time buckets. The console's overview charts and the rules page's
//! per-action counts come from here, through `GET /api/v1/stats`.
//!
//! One statement per call, over the window's rows only: the range on `time_ms` is served by
//! the store's time index, and nothing else is indexed for it on purpose. A covering index
//! (time, code, ...) would turn the row lookups into an index-only scan, but every insert would
//! pay for it, and the store's insert rate is the tighter budget; the lookups follow the index
//! in id order (ids follow time), so they read the table nearly sequentially. Measured in
//! `docs/console.md`.
//!
//! The statement is the query layer's ([`StatsQuery::to_sql_for`], in either backend's dialect)
//! and runs through the store's [`Reader`], SQLite or PostgreSQL alike, so a cancellable reader
//! (the API's query time-out) stops it. This file chooses the buckets to read, keeps the settled
//! ones, and assembles the answer.

use std::collections::BTreeMap;

use serde::Serialize;

use super::BizCode;
use super::query::CountRow as Row;
pub use super::query::{GroupBy, StatsQuery};
use super::store::{Reader, StoreError};

/// Most buckets one answer may have.
pub const MAX_BUCKETS: i64 = 2000;

/// Most groups one answer lists (the largest ones); the rest are summed into `other`.
pub const MAX_GROUPS: usize = 100;

/// The bucket widths, in ms, that [`auto_bucket_ms`] chooses from.
const BUCKETS_MS: [i64; 10] = [
    1_000,
    10_000,
    60_000,
    300_000,
    900_000,
    3_600_000,
    7_200_000,
    21_600_000,
    86_400_000,
    604_800_000,
];

/// The bucket width for a window: the smallest of 1 s, 10 s, 1 min, 5 min, 15 min, 1 h, 2 h,
/// 6 h, 1 d, 1 w that gives at most 100 buckets.
pub fn auto_bucket_ms(window_ms: i64) -> i64 {
    BUCKETS_MS
        .iter()
        .copied()
        .find(|b| window_ms / b <= 100)
        .unwrap_or(BUCKETS_MS[BUCKETS_MS.len() - 1])
}

/// One group: its key, its records, and those by code.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Group {
    pub key: String,
    pub total: u64,
    /// Records by code, ascending by code.
    pub codes: BTreeMap<u16, u64>,
}

/// One time bucket: its start and the records in it by group key (only keys with records).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bucket {
    #[serde(rename = "time", serialize_with = "super::ser_time_ms")]
    pub start_ms: i64,
    pub counts: BTreeMap<String, u64>,
}

/// The answer: every bucket of the window (empty ones too), and the groups, largest first.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    #[serde(rename = "from", serialize_with = "super::ser_time_ms")]
    pub from_ms: i64,
    #[serde(rename = "to", serialize_with = "super::ser_time_ms")]
    pub to_ms: i64,
    pub bucket_seconds: f64,
    pub by: GroupBy,
    pub total: u64,
    pub groups: Vec<Group>,
    /// Groups beyond [`MAX_GROUPS`], summed (absent when there are none); their bucket counts
    /// are under the key `other`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other: Option<Group>,
    pub buckets: Vec<Bucket>,
}

/// How long after a bucket ends its counts are taken as final: records reach the store a little
/// after their time (the writer commits in batches, and waits behind a full queue).
pub const SETTLE_MS: i64 = 300_000;

/// The counts of buckets that are over, kept between calls so a chart that refreshes reads
/// only the buckets still filling: a day in 15-minute buckets costs one bucket per refresh,
/// not a day of records. Buckets that leave the window are dropped. Counts of records that
/// retention deletes later stay as they were counted (they are history).
#[derive(Default)]
pub struct StatsCache {
    /// Per query shape (everything but the window), the rows of each settled bucket.
    shapes: std::sync::Mutex<std::collections::HashMap<Shape, BTreeMap<i64, Vec<Row>>>>,
}

/// A query without its window.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Shape {
    bucket_ms: i64,
    by: GroupBy,
    status: Option<String>,
    service_type: Option<BizCode>,
}

/// Most query shapes a cache keeps (a page asks a handful).
const MAX_SHAPES: usize = 64;

impl StatsCache {
    pub fn new() -> StatsCache {
        StatsCache::default()
    }
}

/// Counts the records of `reader`'s store as `query` says; with a `cache`, settled buckets
/// (over more than [`SETTLE_MS`] before `now_ms`) are read once and kept there.
pub fn stats(
    reader: &Reader,
    query: &StatsQuery,
    cache: Option<&StatsCache>,
    now_ms: i64,
) -> Result<Stats, StoreError> {
    let bucket_ms = query.bucket_ms.max(1);
    let first = query.from_ms.div_euclid(bucket_ms);
    let last = (query.to_ms - 1).max(query.from_ms).div_euclid(bucket_ms);
    let shape = Shape {
        bucket_ms,
        by: query.by,
        status: query.status.map(|s| s.to_string()),
        service_type: query.service_type,
    };
    // A bucket can be kept when the window covers all of it and it is settled.
    let keepable = |b: i64| {
        b * bucket_ms >= query.from_ms
            && (b + 1) * bucket_ms <= query.to_ms
            && (b + 1) * bucket_ms <= now_ms - SETTLE_MS
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut missing: Vec<i64> = Vec::new();
    match cache {
        Some(cache) => {
            let mut shapes = cache.shapes.lock().unwrap_or_else(|p| p.into_inner());
            if shapes.len() >= MAX_SHAPES && !shapes.contains_key(&shape) {
                shapes.clear();
            }
            let kept = shapes.entry(shape.clone()).or_default();
            // Buckets before the window are not asked for again by a window that moves on.
            *kept = kept.split_off(&first);
            for b in first..=last {
                match kept.get(&b) {
                    Some(r) => rows.extend(r.iter().cloned()),
                    None => missing.push(b),
                }
            }
        }
        None => missing.extend(first..=last),
    }
    if !missing.is_empty() {
        let mut fresh: Vec<Row> = Vec::new();
        // One statement per run of consecutive missing buckets, clipped to the window.
        let mut i = 0;
        while i < missing.len() {
            let mut j = i;
            while j + 1 < missing.len() && missing[j + 1] == missing[j] + 1 {
                j += 1;
            }
            let from = (missing[i] * bucket_ms).max(query.from_ms);
            let to = ((missing[j] + 1) * bucket_ms).min(query.to_ms);
            fresh.extend(reader.counts(&StatsQuery {
                from_ms: from,
                to_ms: to,
                bucket_ms,
                ..query.clone()
            })?);
            i = j + 1;
        }
        if let Some(cache) = cache {
            let mut shapes = cache.shapes.lock().unwrap_or_else(|p| p.into_inner());
            let kept = shapes.entry(shape).or_default();
            for &b in missing.iter().filter(|b| keepable(**b)) {
                kept.insert(b, Vec::new());
            }
            for row in &fresh {
                if let Some(bucket) = kept.get_mut(&row.0) {
                    bucket.push(row.clone());
                }
            }
        }
        rows.extend(fresh);
    }
    Ok(assemble(query, bucket_ms, first, last, rows))
}

/// The answer from counted rows: groups largest first, every bucket of the window.
fn assemble(query: &StatsQuery, bucket_ms: i64, first: i64, last: i64, rows: Vec<Row>) -> Stats {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut per_bucket: BTreeMap<(i64, String), u64> = BTreeMap::new();
    let mut total = 0u64;
    for (bucket, key, code, count) in rows {
        total += count;
        let g = groups.entry(key.clone()).or_insert_with(|| Group {
            key: key.clone(),
            total: 0,
            codes: BTreeMap::new(),
        });
        g.total += count;
        *g.codes.entry(code).or_default() += count;
        *per_bucket.entry((bucket, key)).or_default() += count;
    }
    let mut groups: Vec<Group> = groups.into_values().collect();
    groups.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.key.cmp(&b.key)));
    let other = if groups.len() > MAX_GROUPS {
        let rest = groups.split_off(MAX_GROUPS);
        let mut other = Group {
            key: "other".to_owned(),
            total: 0,
            codes: BTreeMap::new(),
        };
        for g in rest {
            other.total += g.total;
            for (c, n) in g.codes {
                *other.codes.entry(c).or_default() += n;
            }
        }
        Some(other)
    } else {
        None
    };
    let shown: std::collections::HashSet<&str> = groups.iter().map(|g| g.key.as_str()).collect();
    let mut buckets: Vec<Bucket> = (first..=last)
        .map(|b| Bucket {
            start_ms: b * bucket_ms,
            counts: BTreeMap::new(),
        })
        .collect();
    for ((bucket, key), n) in per_bucket {
        let Some(b) = buckets.get_mut((bucket - first) as usize) else {
            continue;
        };
        let key = if shown.contains(key.as_str()) {
            key
        } else {
            "other".to_owned()
        };
        *b.counts.entry(key).or_default() += n;
    }
    Stats {
        from_ms: query.from_ms,
        to_ms: query.to_ms,
        bucket_seconds: bucket_ms as f64 / 1000.0,
        by: query.by,
        total,
        groups,
        other,
        buckets,
    }
}

/// The database's plan for a query, one step per line (tests, diagnosis).
pub fn explain(reader: &Reader, query: &StatsQuery) -> Result<String, StoreError> {
    reader.explain_counts(query)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::query::Status;
    use crate::outcome::store::StoreOptions;
    use crate::outcome::store::testing::{Backend, open_on};
    use crate::outcome::{Code, Record};

    fn record(time_ms: i64, biz: BizCode, operation: &str, code: Code, tenant: &str) -> Record {
        Record {
            time_ms,
            trace_id: format!("t{time_ms}"),
            message_id: format!("m{time_ms}"),
            product_key: "p".into(),
            device_name: "d".into(),
            biz_code: biz,
            operation: operation.into(),
            code,
            reason: String::new(),
            content: String::new(),
            tenant_id: tenant.into(),
            instance_id: String::new(),
        }
    }

    #[tokio::test]
    async fn counts_by_code_rule_and_tenant_in_buckets() {
        counts_by_code_rule_and_tenant_in_buckets_on(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_by_code_rule_and_tenant_in_buckets_on_postgres() {
        counts_by_code_rule_and_tenant_in_buckets_on(Backend::Postgres).await;
    }

    async fn counts_by_code_rule_and_tenant_in_buckets_on(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let Some((store, _db)) = open_on(backend, dir.path(), StoreOptions::default()).await else {
            return;
        };
        // Minutes 0..3 of a recent hour, aligned to a minute.
        let t0 = (crate::message::now_ms() - 3_600_000) / 60_000 * 60_000;
        let tx = store.sender();
        let rows = [
            record(t0, BizCode::Uplink, "/p/d/x", Code::Ok, ""),
            record(
                t0 + 1,
                BizCode::RuleEngine,
                "hot/amqp:alerts",
                Code::Ok,
                "a",
            ),
            record(
                t0 + 2,
                BizCode::RuleEngine,
                "hot/amqp:alerts",
                Code::DestinationUnavailable,
                "a",
            ),
            record(
                t0 + 60_000,
                BizCode::RuleEngine,
                "cold",
                Code::Throttled,
                "b",
            ),
            record(
                t0 + 120_000,
                BizCode::RuleEngine,
                "cold",
                Code::Throttled,
                "b",
            ),
            // Outside the window.
            record(t0 + 180_000, BizCode::RuleEngine, "cold", Code::Ok, "b"),
        ];
        for r in rows {
            tx.send(r).await.unwrap();
        }
        store.flush().await.unwrap();
        let reader = store.reader().unwrap();
        let q = StatsQuery {
            from_ms: t0,
            to_ms: t0 + 180_000,
            bucket_ms: 60_000,
            by: GroupBy::Code,
            status: None,
            service_type: None,
        };
        let now = crate::message::now_ms();
        let s = stats(&reader, &q, None, now).unwrap();
        assert_eq!(s.total, 5);
        assert_eq!(s.buckets.len(), 3);
        let keys: Vec<(&str, u64)> = s.groups.iter().map(|g| (g.key.as_str(), g.total)).collect();
        assert_eq!(keys, [("200", 2), ("9324", 2), ("9325", 1)]);
        assert_eq!(s.buckets[0].counts["200"], 2);
        assert_eq!(s.buckets[1].counts["9324"], 1);
        assert_eq!(s.buckets[2].start_ms, t0 + 120_000);

        let by_rule = stats(
            &reader,
            &StatsQuery {
                by: GroupBy::Rule,
                ..q.clone()
            },
            None,
            now,
        )
        .unwrap();
        let rules: Vec<(&str, u64, Vec<u16>)> = by_rule
            .groups
            .iter()
            .map(|g| (g.key.as_str(), g.total, g.codes.keys().copied().collect()))
            .collect();
        assert_eq!(
            rules,
            [("cold", 2, vec![9324]), ("hot", 2, vec![200, 9325])],
            "uplink records are not rules"
        );

        let throttled = stats(
            &reader,
            &StatsQuery {
                by: GroupBy::Tenant,
                status: Some(Status::Code(Code::Throttled)),
                ..q.clone()
            },
            None,
            now,
        )
        .unwrap();
        assert_eq!(throttled.total, 2);
        assert_eq!(throttled.groups[0].key, "b");

        let failed = stats(
            &reader,
            &StatsQuery {
                status: Some(Status::Failed),
                service_type: Some(BizCode::RuleEngine),
                ..q.clone()
            },
            None,
            now,
        )
        .unwrap();
        assert_eq!(failed.total, 3);

        // Through the time index (PostgreSQL's planner may scan a table this small).
        let plan = explain(&reader, &q).unwrap();
        if backend == Backend::Sqlite {
            assert!(plan.contains("records_time"), "{plan}");
        }

        // With a cache: the same answer; then a settled bucket is read from the cache (a
        // record written into it later is not seen) while the newest bucket is read again.
        let cache = StatsCache::new();
        let window = StatsQuery {
            to_ms: now,
            ..q.clone()
        };
        let first = stats(&reader, &window, Some(&cache), now).unwrap();
        assert_eq!(first, stats(&reader, &window, None, now).unwrap());
        tx.send(record(t0 + 5, BizCode::Uplink, "/p/d/x", Code::Ok, ""))
            .await
            .unwrap();
        tx.send(record(now - 1, BizCode::Uplink, "/p/d/x", Code::Ok, ""))
            .await
            .unwrap();
        store.flush().await.unwrap();
        let again = stats(&reader, &window, Some(&cache), now).unwrap();
        assert_eq!(
            again.buckets[0], first.buckets[0],
            "a settled bucket is kept"
        );
        assert_eq!(
            again.total,
            first.total + 1,
            "the open bucket is read again"
        );
        assert_eq!(
            stats(&reader, &window, None, now).unwrap().total,
            first.total + 2
        );
        store.shutdown().await;
    }

    #[test]
    fn bucket_widths_keep_charts_readable() {
        assert_eq!(auto_bucket_ms(3_600_000), 60_000);
        assert_eq!(auto_bucket_ms(86_400_000), 900_000);
        assert_eq!(auto_bucket_ms(7 * 86_400_000), 7_200_000);
        assert_eq!(auto_bucket_ms(60_000), 1_000);
        assert!(GroupBy::parse("servicetype").is_ok());
        assert!(
            GroupBy::parse("nope")
                .unwrap_err()
                .contains("code, serviceType")
        );
    }
}
