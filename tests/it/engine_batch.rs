//! Property: evaluating a batch gives exactly the results of evaluating its messages one at a
//! time, whatever the rules and however the payload types are mixed within the batch.
//!
//! Rules come from a small template family (topic filters with `+` and `#` over three products,
//! WHERE comparisons on nested fields, projections with arithmetic, CASE, `upper` and `coalesce`);
//! payloads give each field a random JSON kind (absent, null, int, float, numeric string, string,
//! bool, object), with the odd payload that is not a JSON object at all.

use std::sync::Arc;

use bytes::Bytes;
use iotfwd::engine::{Engine, RuleOutcome, RuleResult};
use iotfwd::message::{Identity, Message};
use iotfwd::rules::{Compiler, RuleSet};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const PRODUCTS: [&str; 3] = ["p1", "p2", "p3"];
const DEVICES: [&str; 3] = ["d1", "d2", "d3"];
const SUFFIXES: [&str; 4] = [
    "thing/event/property/post",
    "thing/event/alarm/post",
    "user/update",
    "user/a/b",
];
/// The payload paths rules read, from one to three levels deep; all but the last are usually
/// numbers.
const FIELDS: [&str; 4] = ["a", "b.c", "items.t.value", "s"];
const NUMERIC_FIELDS: [&str; 3] = ["a", "b.c", "items.t.value"];
/// How many variants each rule keeps; small, so the uncached path is exercised too.
const MAX_VARIANTS: usize = 6;

fn filter() -> impl Strategy<Value = String> {
    (0..PRODUCTS.len(), 0..DEVICES.len(), 0..6usize).prop_map(|(p, d, shape)| {
        let (p, d) = (PRODUCTS[p], DEVICES[d]);
        match shape {
            0 => format!("/{p}/+/thing/event/property/post"),
            1 => format!("/{p}/#"),
            2 => "/+/+/user/#".to_owned(),
            3 => format!("/{p}/{d}/user/update"),
            4 => format!("/+/{d}/#"),
            _ => "/+/+/thing/event/+/post".to_owned(),
        }
    })
}

fn field() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&FIELDS[..])
}

fn numeric_field() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&NUMERIC_FIELDS[..])
}

/// A numeric SQL literal: an integer or a float.
fn constant() -> impl Strategy<Value = String> {
    prop_oneof![
        (-5i64..60).prop_map(|n| n.to_string()),
        (-20i32..120).prop_map(|n| format!("{n}.5"))
    ]
}

/// `field <op> constant`, mostly on the numeric fields.
fn compare() -> impl Strategy<Value = String> {
    let op = || prop::sample::select(&[">", "<", "=", "<>", ">="][..]);
    prop_oneof![
        4 => (numeric_field(), op(), constant()).prop_map(|(f, op, c)| format!("{f} {op} {c}")),
        1 => (field(), op(), constant()).prop_map(|(f, op, c)| format!("{f} {op} {c}")),
        1 => prop::sample::select(&["on", "Dev", "7"][..]).prop_map(|c| format!("s = '{c}'")),
    ]
}

fn condition() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => compare(),
        1 => field().prop_map(|f| format!("{f} IS NULL")),
        1 => field().prop_map(|f| format!("{f} IS NOT NULL")),
        1 => (compare(), compare()).prop_map(|(x, y)| format!("{x} AND {y}")),
        1 => (field(), constant(), constant())
            .prop_map(|(f, lo, hi)| format!("{f} BETWEEN {lo} AND {hi}")),
    ]
}

/// One select expression, without its alias.
fn projection() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => field().prop_map(str::to_owned),
        2 => (numeric_field(), 1i64..5).prop_map(|(f, k)| format!("{f} + {k}")),
        1 => numeric_field().prop_map(|f| format!("{f} * 2")),
        1 => (numeric_field(), 0i64..4).prop_map(|(f, k)| format!("{f} / {k}")),
        1 => (numeric_field(), numeric_field()).prop_map(|(f, g)| format!("{f} - {g}")),
        2 => (numeric_field(), constant())
            .prop_map(|(f, c)| format!("CASE WHEN {f} > {c} THEN 'hi' ELSE 'lo' END")),
        1 => field().prop_map(|f| format!("upper({f})")),
        1 => (numeric_field(), numeric_field()).prop_map(|(f, g)| format!("coalesce({f}, {g})")),
        1 => field().prop_map(|f| format!("coalesce({f}, 'none')")),
        1 => Just("deviceName()".to_owned()),
        1 => Just("topic(2)".to_owned()),
    ]
}

fn rule_sql() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(projection(), 1..4),
        any::<bool>(),
        filter(),
        prop::option::weighted(0.7, condition()),
    )
        .prop_map(|(items, star, filter, condition)| {
            let mut select: Vec<String> = items
                .iter()
                .enumerate()
                .map(|(i, e)| format!("{e} AS x{i}"))
                .collect();
            if star {
                select.insert(0, "*".to_owned());
            }
            let mut sql = format!("SELECT {} FROM \"{filter}\"", select.join(", "));
            if let Some(c) = condition {
                sql.push_str(&format!(" WHERE {c}"));
            }
            sql
        })
}

/// One field's value, `None` when absent: mostly numbers for the numeric fields and strings for
/// `s`, but any JSON kind can turn up anywhere.
fn value(numeric: bool) -> impl Strategy<Value = Option<Value>> {
    let (number, text) = if numeric { (4, 1) } else { (1, 4) };
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(Value::Null)),
        number => prop_oneof![8 => -5i64..60, 1 => Just(i64::MAX), 1 => Just(i64::MIN)]
            .prop_map(|n| Some(json!(n))),
        number => (-40i32..480).prop_map(|n| Some(json!(f64::from(n) / 8.0 + 0.125))),
        1 => prop::sample::select(&["38", "7", "-1.5", "0"][..]).prop_map(|s| Some(json!(s))),
        text => prop::sample::select(&["on", "abc", "", "Dev"][..]).prop_map(|s| Some(json!(s))),
        1 => any::<bool>().prop_map(|b| Some(json!(b))),
        1 => Just(Some(json!({"x": 1, "y": [1, 2]}))),
    ]
}

/// Puts `v` at the dotted `path` of `object`, making the objects on the way.
fn set_path(object: &mut Map<String, Value>, path: &str, v: Value) {
    let mut segments: Vec<&str> = path.split('.').collect();
    let last = segments.pop().expect("a path has a segment");
    let mut at = object;
    for s in segments {
        let next = at.entry(s).or_insert_with(|| Value::Object(Map::new()));
        if !next.is_object() {
            return;
        }
        at = next.as_object_mut().expect("checked");
    }
    at.insert(last.to_owned(), v);
}

fn payload() -> impl Strategy<Value = String> {
    let object = (
        (value(true), value(true), value(true), value(false)),
        // Sometimes `b` is a scalar, so `b.c` walks through a non-object.
        prop::bool::weighted(0.1),
    )
        .prop_map(|(values, b_scalar)| {
            let mut object = Map::new();
            if b_scalar {
                object.insert("b".to_owned(), json!(5));
            }
            let (a, bc, t, s) = values;
            for (path, v) in FIELDS.iter().zip([a, bc, t, s]) {
                if let Some(v) = v {
                    set_path(&mut object, path, v);
                }
            }
            Value::Object(object).to_string()
        });
    let invalid = prop::sample::select(&["not json", "[1,2]", "{\"a\":", "42", "null", ""][..])
        .prop_map(str::to_owned);
    prop_oneof![12 => object, 1 => invalid]
}

fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => (
            prop::sample::select(&PRODUCTS[..]),
            prop::sample::select(&DEVICES[..]),
            prop::sample::select(&SUFFIXES[..]),
        )
            .prop_map(|(p, d, s)| format!("/{p}/{d}/{s}")),
        1 => Just("/p9/d1/user/update".to_owned()),
    ]
}

fn messages() -> impl Strategy<Value = Vec<Message>> {
    prop::collection::vec((topic(), payload()), 1..=40).prop_map(|pairs| {
        pairs
            .into_iter()
            .enumerate()
            .map(|(i, (topic, payload))| {
                let identity = Identity {
                    message_id: Some(format!("m{i}")),
                    trace_id: Some(format!("t{i}")),
                    timestamp_ms: Some(1_700_000_000_000 + i as i64),
                    ..Identity::default()
                };
                Message::new(topic, Bytes::from(payload), identity).expect("a platform topic")
            })
            .collect()
    })
}

/// A rule file holding just its SQL.
#[derive(serde::Serialize)]
struct RuleText<'a> {
    sql: &'a str,
}

/// Outcomes compared as JSON values (with key order) and failures by code.
fn same_outcome(a: &RuleOutcome, b: &RuleOutcome) -> bool {
    match (a, b) {
        (RuleOutcome::Passed(x), RuleOutcome::Passed(y)) => x == y && x.keys().eq(y.keys()),
        (RuleOutcome::NoResult, RuleOutcome::NoResult) => true,
        (RuleOutcome::Failed(x), RuleOutcome::Failed(y)) => x.code() == y.code(),
        _ => false,
    }
}

fn describe(results: &[RuleResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| format!("{}: {:?}", r.rule.name, r.outcome))
        .collect()
}

proptest! {
    // Debug builds of DataFusion are slow: 64 cases by default. A failure prints its minimal
    // input in full, so nothing is persisted into the source tree.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(64)
    })]

    #[test]
    fn batch_equals_one_at_a_time(
        sqls in prop::collection::vec(rule_sql(), 2..=5),
        batch in messages(),
    ) {
        let compiler = Arc::new(Compiler::new(MAX_VARIANTS));
        let mut rules = Vec::new();
        for (i, sql) in sqls.iter().enumerate() {
            let text = toml::to_string(&RuleText { sql }).expect("a string serializes");
            let name = format!("r{i}");
            let rule = compiler
                .compile_text(&name, std::path::Path::new(&name), &text)
                .map_err(|e| {
                    TestCaseError::fail(format!("template rule does not load: {sql}\n{e:?}"))
                })?;
            rules.push(rule);
        }
        let engine = Engine::new(Arc::clone(&compiler), Arc::new(RuleSet::new(rules)));

        let together = engine.evaluate(&batch);
        prop_assert_eq!(together.len(), batch.len());
        for (i, (message, got)) in batch.iter().zip(&together).enumerate() {
            let alone = engine.evaluate(std::slice::from_ref(message)).remove(0);
            let equal = alone.len() == got.len()
                && alone.iter().zip(got).all(|(a, b)| {
                    a.rule.name == b.rule.name && same_outcome(&a.outcome, &b.outcome)
                });
            prop_assert!(
                equal,
                "message {} (topic {}, payload {}) differs:\n alone:    {:?}\n in batch: {:?}\n \
                 rules: {:#?}",
                i,
                message.topic,
                String::from_utf8_lossy(&message.payload),
                describe(&alone),
                describe(got),
                sqls
            );
        }
    }
}
