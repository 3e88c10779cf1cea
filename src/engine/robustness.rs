//! Robustness suites of the rule SQL compiler and of payload decoding (docs/security.md,
//! "Robustness"): mutated rule SQL must load or be refused with a 9307/9321 report that says
//! where, and whatever loads must evaluate every message to an outcome; payloads of any bytes
//! must end in an output, no result, or a failure with its code (9320 when not a JSON object).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

use super::{Engine, RuleOutcome};
use crate::message::{Identity, Message};
use crate::outcome::{Code, Record};
use crate::robustness::{self, Raw};
use crate::rules::{Compiler, Rule, RuleSet};

/// Tokens the SQL mutations insert: the dialect's keywords, operators and functions, the
/// platform functions with good and bad arguments, literals at the edges, and SQL the dialect
/// refuses.
const SQL_VOCABULARY: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "AS",
    "AND",
    "OR",
    "NOT",
    "NULL",
    "IS",
    "IN",
    "LIKE",
    "BETWEEN",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "CAST",
    "BIGINT",
    "DOUBLE",
    "VARCHAR",
    "BOOLEAN",
    "DECIMAL(38,10)",
    "TRUE",
    "FALSE",
    "DISTINCT",
    "GROUP BY",
    "ORDER BY",
    "LIMIT 1",
    "UNION",
    "JOIN",
    "WITH",
    "VALUES",
    "INTERVAL",
    "ARRAY",
    ",",
    "(",
    ")",
    "*",
    ".",
    "+",
    "-",
    "/",
    "%",
    "||",
    "=",
    "<>",
    "!=",
    "<",
    ">=",
    "[",
    "]",
    "::",
    ";",
    "--",
    "/*",
    "*/",
    "?",
    "$1",
    "@",
    "'",
    "\"",
    "''",
    "'x'",
    "'%'",
    "'\\'",
    "\"/p1/#\"",
    "\"/+/+/#\"",
    "\"/#\"",
    "\"/p1/+/x\"",
    "\"p1/#\"",
    "\"/a/#/b\"",
    "\"\"",
    "0",
    "1",
    "-1",
    "2.5",
    "1e308",
    "-1e308",
    "1e-320",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551616",
    "99999999999999999999999999999999999999",
    "deviceName()",
    "productKey()",
    "topic()",
    "topic(0)",
    "topic(-1)",
    "topic(2)",
    "topic(9999999999)",
    "topic('a')",
    "topic(a)",
    "timestamp()",
    "timestamp('yyyy-MM-dd HH:mm:ss')",
    "timestamp('')",
    "timestamp('''')",
    "timestamp(a)",
    "timestamp('yyyy', 1)",
    "messageId()",
    "traceId()",
    "newuuid()",
    "payload()",
    "payload(1)",
    "ruleName()",
    "tenantId()",
    "instanceId()",
    "upper",
    "lower",
    "substr",
    "length",
    "concat",
    "coalesce",
    "nvl",
    "abs",
    "round",
    "power",
    "sqrt",
    "ln",
    "regexp_replace",
    "regexp_like",
    "to_timestamp_millis",
    "to_char",
    "date_trunc",
    "arrow_cast",
    "now()",
    "random()",
    "repeat",
    "lpad",
    "a",
    "b.c",
    "items.t.value",
    "s",
    "\"a b\"",
    "`a`",
    "x.\"y\"",
    "é",
    "\t",
    "\n",
    " ",
];

/// Actions a mutated rule may carry, so template keys are checked against its outputs.
const ACTIONS: &[&str] = &[
    "",
    "\n[[action]]\nto = \"amqp\"\nexchange = \"x\"\nrouting_key = \"r.${a}\"\n",
    "\n[[action]]\nto = \"group\"\ngroup = \"g\"\n",
    "\n[[action]]\nto = \"mqtt\"\ntopic = \"/out/${d}/${items.t}\"\n[error_action]\nto = \"amqp\"\nexchange = \"e\"\n",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One message of a golden case: topic, payload, timestamp.
type Sample = (String, String, Option<i64>);

/// The SQL of every golden case (tests/sql) and example rule (rules/), and the messages of the
/// golden cases.
fn golden() -> (Vec<String>, Vec<Sample>) {
    let mut sqls = Vec::new();
    let mut samples = Vec::new();
    for dir in [repo().join("tests/sql"), repo().join("rules")] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let doc: toml::Table =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            sqls.push(doc["sql"].as_str().expect("sql is a string").to_owned());
            for m in doc
                .get("message")
                .and_then(|m| m.as_array())
                .into_iter()
                .flatten()
            {
                samples.push((
                    m["topic"].as_str().unwrap().to_owned(),
                    m["payload"].as_str().unwrap().to_owned(),
                    m.get("timestamp").and_then(|t| t.as_integer()),
                ));
            }
        }
    }
    assert!(
        sqls.len() >= 40,
        "the golden cases are missing: {}",
        sqls.len()
    );
    assert!(!samples.is_empty());
    (sqls, samples)
}

/// A rule file holding `sql` as a multi-line literal string (so SQL lines are file lines),
/// or, when `sql` cannot be one, as a basic string; then `action`.
fn rule_file(sql: &str, action: &str) -> String {
    let literal = format!("sql = '''\n{sql}'''\n{action}");
    match toml::from_str::<toml::Table>(&literal) {
        Ok(doc) if doc.get("sql").and_then(|s| s.as_str()) == Some(sql) => literal,
        _ => format!("sql = {}\n{action}", toml::Value::String(sql.to_owned())),
    }
}

/// A topic that `filter` matches: `+` levels become `x`, `#` becomes `a/b`.
fn topic_matching(filter: &str) -> String {
    filter
        .split('/')
        .map(|level| match level {
            "+" => "x",
            "#" => "a/b",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn message(topic: &str, payload: &[u8], timestamp_ms: Option<i64>) -> Option<Message> {
    let identity = Identity {
        timestamp_ms,
        tenant_id: Some("t1".into()),
        ..Identity::default()
    };
    Message::new(topic.to_owned(), Bytes::copy_from_slice(payload), identity).ok()
}

/// Whether `payload` is what rules read: a JSON object.
fn is_object(payload: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<Value>(payload),
        Ok(Value::Object(_))
    )
}

/// Evaluates `messages` with `engine` and checks every message got exactly its candidate
/// rules, each with an outcome a malformed message may have: 9320 for a payload that is not a
/// JSON object, else an output, no result, or 9307 (a function's arguments at run time). Each
/// failure's record must carry its code.
fn evaluate_and_check(
    engine: &Engine,
    messages: &[Message],
    seen: &robustness::Seen,
) -> Result<(), String> {
    let results = engine.evaluate(messages);
    // The decoder's fast pass reads exactly what the full parse reads. Rules with volatile
    // functions (random(), newuuid(), now()) differ run to run: for them, an output whose values
    // differ between two runs of the same engine is compared by its keys only.
    let full = engine.full_parse_only().evaluate(messages);
    let again = engine.evaluate(messages);
    for (m, ((fast, full), again)) in messages.iter().zip(results.iter().zip(&full).zip(&again)) {
        let same = fast.len() == full.len()
            && fast
                .iter()
                .zip(full)
                .zip(again)
                .all(|((a, b), c)| match (&a.outcome, &b.outcome) {
                    (RuleOutcome::Passed(x), RuleOutcome::Passed(y)) => {
                        x.keys().eq(y.keys())
                            && (x == y || !matches!(&c.outcome, RuleOutcome::Passed(z) if z == x))
                    }
                    (RuleOutcome::NoResult, RuleOutcome::NoResult) => true,
                    (RuleOutcome::Failed(x), RuleOutcome::Failed(y)) => x.code() == y.code(),
                    _ => false,
                });
        if !same {
            return Err(format!(
                "{:?}: the fast pass gives {fast:?}, the full parse {full:?}",
                String::from_utf8_lossy(&m.payload)
            ));
        }
    }
    if results.len() != messages.len() {
        return Err(format!(
            "{} results for {} messages",
            results.len(),
            messages.len()
        ));
    }
    for (m, results) in messages.iter().zip(&results) {
        let want: Vec<&str> = (engine.rules().rules().iter())
            .filter(|r| r.program.parsed.filter.matches(&m.topic))
            .map(|r| r.name.as_str())
            .collect();
        let got: Vec<&str> = results.iter().map(|r| r.rule.name.as_str()).collect();
        if want != got {
            return Err(format!(
                "{}: candidates {got:?}, expected {want:?}",
                m.topic
            ));
        }
        let object = is_object(&m.payload);
        for r in results {
            match &r.outcome {
                RuleOutcome::Failed(f) => {
                    let allowed = if object {
                        f.code() == Code::SqlError
                    } else {
                        f.code() == Code::PayloadInvalid
                    };
                    if !allowed || f.reason().trim().is_empty() {
                        return Err(format!(
                            "rule {} on {:?}: failed with {} ({:?})",
                            r.rule.name,
                            String::from_utf8_lossy(&m.payload),
                            f.code(),
                            f.reason()
                        ));
                    }
                    let record = Record::rule_failed(m, &r.rule.name, f);
                    if record.code != f.code() || record.message_id != m.message_id {
                        return Err(format!("the failure's record is wrong: {record:?}"));
                    }
                    seen.count(f.code().to_string());
                }
                RuleOutcome::Passed(output) if object => {
                    serde_json::to_string(output).map_err(|e| e.to_string())?;
                    seen.count("passed");
                }
                RuleOutcome::NoResult if object => seen.count("no_result"),
                other => {
                    return Err(format!(
                        "rule {}: {other:?} for a payload that is not a JSON object: {:?}",
                        r.rule.name,
                        String::from_utf8_lossy(&m.payload)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks what loading a rule file gave: a rule, or problems each with a code of the rule
/// engine, a message, and a line inside the file.
fn check_loaded(
    text: &str,
    loaded: Result<Rule, Vec<crate::rules::RuleError>>,
) -> Result<Option<Rule>, String> {
    let lines = text.lines().count().max(1);
    let errors = match loaded {
        Ok(rule) => return Ok(Some(rule)),
        Err(errors) => errors,
    };
    if errors.is_empty() {
        return Err("refused without a problem".into());
    }
    for e in errors {
        if !matches!(e.code, Code::SqlError | Code::ParamInvalid) {
            return Err(format!("{e}: code {}", e.code));
        }
        if e.message.trim().is_empty() {
            return Err(format!("{e}: no message"));
        }
        if let Some(line) = e.line
            && !(1..=lines).contains(&line)
        {
            return Err(format!(
                "{e}: line {line} is not in the file's {lines} lines"
            ));
        }
    }
    Ok(None)
}

/// Robustness: mutations of the golden cases' SQL (tokens deleted, duplicated, swapped,
/// inserted, replaced; bytes edited) load as rules or are refused with where and why; a rule
/// that loads is evaluated on golden messages and on one its filter matches.
#[test]
fn robustness_sql_compiler() {
    let (sqls, samples) = golden();
    let compiler = Arc::new(Compiler::new(4));
    let sql = prop_oneof![
        12 => robustness::mutated_text(sqls, SQL_VOCABULARY),
        1 => robustness::text(),
    ];
    let strategy = (
        sql,
        prop_oneof![4 => Just(ACTIONS[0]), 2 => Just(ACTIONS[2]), 1 => Just(ACTIONS[1]), 1 => Just(ACTIONS[3])],
        prop::collection::vec(any::<Index>(), 1..4),
    );
    let file = Path::new("mutant.toml");
    let seen = robustness::Seen::default();
    robustness::run("sql-compiler", 1500, strategy, |(sql, action, picks)| {
        let text = rule_file(&sql, action);
        let result = compiler.compile_text("mutant", file, &text);
        let Some(rule) = check_loaded(&text, result)? else {
            seen.count("refused");
            return Ok(());
        };
        seen.count("loaded");
        let mut messages: Vec<Message> = picks
            .iter()
            .filter_map(|i| {
                let (topic, payload, ts) = i.get(&samples);
                message(topic, payload.as_bytes(), *ts)
            })
            .collect();
        let (_, payload, ts) = picks[0].get(&samples);
        let matching = topic_matching(rule.program.parsed.filter.as_str());
        messages.extend(message(&matching, payload.as_bytes(), *ts));
        let engine = Engine::new(Arc::clone(&compiler), Arc::new(RuleSet::new(vec![rule])));
        evaluate_and_check(&engine, &messages, &seen)
    });
    seen.print("sql-compiler");
}

/// The rules payloads are decoded for: every kind of item, WHERE, and the platform functions.
const PAYLOAD_RULES: &[(&str, &str)] = &[
    ("star", r#"SELECT * FROM "/+/+/#""#),
    (
        "paths",
        r#"SELECT a, b.c AS bc, items.t.value AS t, s FROM "/p/+/#"
           WHERE items.t.value > 38 OR a = 1 OR s = 'x' OR b.c IS NULL"#,
    ),
    (
        "exprs",
        r#"SELECT a + 1 AS a1, a * 2.5 AS a2, a / 2 AS half, upper(s) AS us, length(s) AS ls,
           concat(s, '!') AS s2, coalesce(b.c, a, 0) AS c FROM "/p/#""#,
    ),
    (
        "platform",
        r#"SELECT payload() AS raw, topic(2) AS dev, topic(9) AS none, timestamp() AS ts,
           timestamp('yyyy-MM-dd HH:mm:ss') AS at, deviceName() AS d, messageId() AS id,
           tenantId() AS tenant FROM "/+/+/#""#,
    ),
    (
        "cases",
        r#"SELECT CASE WHEN a > 10 THEN 'hi' ELSE 'lo' END AS level, CAST(s AS BIGINT) AS n,
           items, * FROM "/p/+/thing/#" WHERE a BETWEEN -5 AND 1e6 OR NOT (s LIKE 'a%')"#,
    ),
];

const TOPICS: &[&str] = &[
    "/p/d1/up",
    "/p/d2/thing/event/property/post",
    "/q/d3/user/update",
];

/// Payloads: objects with the fields the rules read, any JSON, mutated valid payloads, deep
/// nesting and random bytes.
fn payload() -> impl Strategy<Value = Raw> {
    let field = prop_oneof![
        Just("a"),
        Just("b"),
        Just("s"),
        Just("items"),
        Just("c"),
        Just("t"),
        Just("value")
    ];
    let object = prop::collection::vec((field, robustness::json()), 0..6).prop_map(|kv| {
        let map: serde_json::Map<String, Value> =
            kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        Raw(Value::Object(map).to_string().into_bytes())
    });
    let seeds = vec![
        br#"{"a":1,"b":{"c":2},"s":"x","items":{"t":{"value":39.5}}}"#.to_vec(),
        br#"{"a":"12","s":"abc","items":{"t":{"value":"hot"}}}"#.to_vec(),
        br#"{"a":1e400,"b":[1,2,{"c":null}],"s":"\ud800"}"#.to_vec(),
        format!("{}1{}", "[".repeat(200), "]".repeat(200)).into_bytes(),
        format!("{{\"a\":{}{}}}", "{\"a\":".repeat(140), "}".repeat(140)).into_bytes(),
    ];
    prop_oneof![
        4 => object,
        2 => robustness::json().prop_map(|v| Raw(v.to_string().into_bytes())),
        3 => robustness::mutated_bytes(seeds, &[b"{", b"}", b"\"a\":", b"\"items\":{\"t\":{\"value\":"]),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Raw),
    ]
}

/// Robustness: batches of messages with payloads of any bytes (and any message time) through
/// rules that read them every way; every candidate rule ends in an outcome with its code.
#[test]
fn robustness_payload_decoding() {
    let compiler = Arc::new(Compiler::new(8));
    let rules = PAYLOAD_RULES
        .iter()
        .map(|(name, sql)| {
            compiler
                .compile_text(
                    name,
                    Path::new("payload.toml"),
                    &format!("sql = '''{sql}'''\n"),
                )
                .unwrap_or_else(|e| panic!("{name}: {e:?}"))
        })
        .collect();
    let engine = Engine::new(Arc::clone(&compiler), Arc::new(RuleSet::new(rules)));
    let time = prop_oneof![
        3 => Just(None),
        1 => any::<i64>().prop_map(Some),
        1 => prop::sample::select(vec![i64::MIN, i64::MAX, -1, 0, 253_402_300_800_000]).prop_map(Some),
    ];
    let one = (prop::sample::select(TOPICS), payload(), time);
    let seen = robustness::Seen::default();
    robustness::run(
        "payload-decoding",
        300,
        prop::collection::vec(one, 1..6),
        |batch| {
            let messages: Vec<Message> = batch
                .iter()
                .map(|(topic, Raw(payload), ts)| {
                    message(topic, payload, *ts).expect("a platform topic")
                })
                .collect();
            evaluate_and_check(&engine, &messages, &seen)
        },
    );
    seen.print("payload-decoding");
}
