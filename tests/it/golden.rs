//! Golden SQL cases: every `tests/sql/*.toml` file is one rule plus the messages it is run on and
//! what each message must give.
//!
//! A case file holds `sql` and either `load_error` (the rule must not load) or `[[message]]`
//! tables, each with exactly one expectation: `output`, `no_result`, `no_match` or `error`. Every
//! message is evaluated alone and checked; then all of a case's messages are evaluated as one
//! batch, which must give exactly the one-at-a-time results (unless the case is `volatile`, e.g.
//! it calls `newuuid()`). Every failure of every file is collected and reported in one panic.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use iotfwd::engine::{Engine, RuleOutcome};
use iotfwd::message::{Identity, Message};
use iotfwd::rules::{Compiler, RuleSet};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The fewest case files the suite accepts, so a lost directory cannot pass silently.
const MIN_CASES: usize = 40;

/// Variants each rule keeps compiled: small, so cases with many payload types also run the
/// uncached path.
const MAX_VARIANTS: usize = 4;

/// One case file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    sql: String,
    /// The rule must fail to load with this code.
    load_error: Option<u16>,
    /// ... and this text in one of its error messages.
    load_error_contains: Option<String>,
    /// The outputs are random (`newuuid()`): skip the batch-equals-singles check.
    #[serde(default)]
    volatile: bool,
    #[serde(default, rename = "message")]
    messages: Vec<CaseMessage>,
}

/// One message of a case and its expectation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseMessage {
    topic: String,
    /// The raw payload text; need not be valid JSON.
    payload: String,
    /// Message time, ms since the Unix epoch.
    timestamp: Option<i64>,
    message_id: Option<String>,
    trace_id: Option<String>,
    tenant_id: Option<String>,
    instance_id: Option<String>,
    /// The expected output object, as JSON text; key order is checked too.
    output: Option<String>,
    /// WHERE is false or NULL.
    #[serde(default)]
    no_result: bool,
    /// The topic does not match the rule's FROM filter.
    #[serde(default)]
    no_match: bool,
    /// A runtime failure with this code.
    error: Option<u16>,
    /// ... whose reason contains this text.
    error_contains: Option<String>,
}

/// What a message must give.
#[derive(Debug)]
enum Expect {
    Output(Map<String, Value>),
    NoResult,
    NoMatch,
    Error { code: u16, contains: Option<String> },
}

/// What a message gave: its one rule's outcome, or `None` when the topic matched no rule.
type Observed = Option<RuleOutcome>;

impl CaseMessage {
    fn expectation(&self) -> Result<Expect, String> {
        let given = usize::from(self.output.is_some())
            + usize::from(self.no_result)
            + usize::from(self.no_match)
            + usize::from(self.error.is_some());
        if given != 1 {
            return Err(format!(
                "needs exactly one of output, no_result, no_match, error; has {given}"
            ));
        }
        if self.error_contains.is_some() && self.error.is_none() {
            return Err("error_contains without error".to_owned());
        }
        Ok(if let Some(text) = &self.output {
            match serde_json::from_str(text) {
                Ok(Value::Object(map)) => Expect::Output(map),
                Ok(other) => return Err(format!("output must be a JSON object, got {other}")),
                Err(e) => return Err(format!("output is not valid JSON: {e}")),
            }
        } else if self.no_result {
            Expect::NoResult
        } else if self.no_match {
            Expect::NoMatch
        } else {
            Expect::Error {
                code: self.error.expect("counted above"),
                contains: self.error_contains.clone(),
            }
        })
    }

    fn to_message(&self) -> Result<Message, String> {
        let identity = Identity {
            message_id: self.message_id.clone(),
            trace_id: self.trace_id.clone(),
            timestamp_ms: self.timestamp,
            tenant_id: self.tenant_id.clone(),
            instance_id: self.instance_id.clone(),
            ..Identity::default()
        };
        Message::new(
            self.topic.clone(),
            Bytes::from(self.payload.clone()),
            identity,
        )
        .map_err(|r| {
            format!(
                "message rejected: {}",
                iotfwd::outcome::Failure::rejected(&r)
            )
        })
    }
}

/// Checks one observation against its expectation; `Err` says how they differ.
fn check(expect: &Expect, got: &Observed) -> Result<(), String> {
    let ok = match (expect, got) {
        (Expect::NoMatch, None) => true,
        (Expect::NoResult, Some(RuleOutcome::NoResult)) => true,
        (Expect::Output(want), Some(RuleOutcome::Passed(out))) => {
            want == out && want.keys().eq(out.keys())
        }
        (Expect::Error { code, contains }, Some(RuleOutcome::Failed(failure))) => {
            failure.code().as_u16() == *code
                && contains
                    .as_ref()
                    .is_none_or(|s| failure.reason().contains(s.as_str()))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected {}\n      actual   {}",
            show_expect(expect),
            show(got)
        ))
    }
}

fn show_expect(expect: &Expect) -> String {
    match expect {
        Expect::Output(map) => format!("output {}", Value::Object(map.clone())),
        Expect::NoResult => "no_result".to_owned(),
        Expect::NoMatch => "no_match".to_owned(),
        Expect::Error {
            code,
            contains: None,
        } => format!("error {code}"),
        Expect::Error {
            code,
            contains: Some(s),
        } => format!("error {code} containing {s:?}"),
    }
}

fn show(got: &Observed) -> String {
    match got {
        None => "no_match".to_owned(),
        Some(RuleOutcome::NoResult) => "no_result".to_owned(),
        Some(RuleOutcome::Passed(map)) => format!("output {}", Value::Object(map.clone())),
        Some(RuleOutcome::Failed(failure)) => {
            format!("error {}: {}", failure.code(), failure.reason())
        }
    }
}

/// Equal outcomes, with output keys in the same order.
fn same(a: &Observed, b: &Observed) -> bool {
    match (a, b) {
        (Some(RuleOutcome::Passed(x)), Some(RuleOutcome::Passed(y))) => {
            x == y && x.keys().eq(y.keys())
        }
        _ => a == b,
    }
}

/// The one outcome of a single-rule engine for one message.
fn observe(results: Vec<iotfwd::engine::RuleResult>) -> Result<Observed, String> {
    let mut results = results.into_iter();
    let first = results.next().map(|r| r.outcome);
    match results.next() {
        None => Ok(first),
        Some(_) => Err("one rule gave more than one result for a message".to_owned()),
    }
}

/// Runs one case file; returns its failures, each prefixed by where it is.
fn run_case(compiler: &Arc<Compiler>, path: &Path) -> Vec<String> {
    let file = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let fail = |what: String| vec![format!("{file}: {what}")];
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot read: {e}")),
    };
    let case: Case = match toml::from_str(&text) {
        Ok(c) => c,
        Err(e) => return fail(format!("invalid case file: {e}")),
    };
    let name = path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();

    #[derive(Serialize)]
    struct RuleText<'a> {
        sql: &'a str,
    }
    let rule_text = toml::to_string(&RuleText { sql: &case.sql }).expect("a string serializes");
    let compiled = compiler.compile_text(&name, path, &rule_text);

    if let Some(code) = case.load_error {
        if !case.messages.is_empty() || case.volatile {
            return fail("a load_error case has no messages and is not volatile".to_owned());
        }
        return match compiled {
            Ok(_) => fail(format!("expected load error {code}, but the rule loaded")),
            Err(errors) => {
                let code_ok = errors.iter().any(|e| e.code.as_u16() == code);
                let text_ok = case
                    .load_error_contains
                    .as_ref()
                    .is_none_or(|s| errors.iter().any(|e| e.message.contains(s.as_str())));
                if code_ok && text_ok {
                    Vec::new()
                } else {
                    let got: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                    fail(format!(
                        "expected load error {code}{}\n      actual   {}",
                        case.load_error_contains
                            .as_ref()
                            .map(|s| format!(" containing {s:?}"))
                            .unwrap_or_default(),
                        got.join("\n               ")
                    ))
                }
            }
        };
    }
    if case.load_error_contains.is_some() {
        return fail("load_error_contains without load_error".to_owned());
    }
    if case.messages.is_empty() {
        return fail("a case needs load_error or at least one [[message]]".to_owned());
    }
    let rule = match compiled {
        Ok(rule) => rule,
        Err(errors) => {
            let got: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            return fail(format!("the rule did not load: {}", got.join("; ")));
        }
    };
    let engine = Engine::new(Arc::clone(compiler), Arc::new(RuleSet::new(vec![rule])));

    let mut failures = Vec::new();
    let mut messages = Vec::new();
    let mut expects = Vec::new();
    for (i, m) in case.messages.iter().enumerate() {
        match m.expectation().and_then(|e| Ok((e, m.to_message()?))) {
            Ok((expect, message)) => {
                expects.push(expect);
                messages.push(message);
            }
            Err(e) => failures.push(format!("{file}: message {i}: {e}")),
        }
    }
    if !failures.is_empty() {
        return failures;
    }

    let mut singles = Vec::with_capacity(messages.len());
    for (i, (message, expect)) in messages.iter().zip(&expects).enumerate() {
        let got = match observe(engine.evaluate(std::slice::from_ref(message)).remove(0)) {
            Ok(got) => got,
            Err(e) => {
                failures.push(format!("{file}: message {i}: {e}"));
                continue;
            }
        };
        if let Err(e) = check(expect, &got) {
            failures.push(format!(
                "{file}: message {i} ({}):\n      {e}",
                case.messages[i].topic
            ));
        }
        singles.push(got);
    }
    if case.volatile || singles.len() != messages.len() {
        return failures;
    }

    let batch = engine.evaluate(&messages);
    if batch.len() != messages.len() {
        failures.push(format!(
            "{file}: batch gave {} results for {} messages",
            batch.len(),
            messages.len()
        ));
        return failures;
    }
    for (i, (results, single)) in batch.into_iter().zip(&singles).enumerate() {
        match observe(results) {
            Ok(got) if same(&got, single) => {}
            Ok(got) => failures.push(format!(
                "{file}: message {i} in a batch differs from alone:\n      alone    {}\n      \
                 in batch {}",
                show(single),
                show(&got)
            )),
            Err(e) => failures.push(format!("{file}: message {i} in a batch: {e}")),
        }
    }
    failures
}

fn case_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sql");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn golden_sql_cases() {
    let files = case_files();
    assert!(
        files.len() >= MIN_CASES,
        "expected at least {MIN_CASES} case files in tests/sql, found {}",
        files.len()
    );
    let compiler = Arc::new(Compiler::new(MAX_VARIANTS));
    let failures: Vec<String> = files.iter().flat_map(|f| run_case(&compiler, f)).collect();
    if !failures.is_empty() {
        let mut report = format!("{} golden failure(s):\n", failures.len());
        for f in &failures {
            let _ = writeln!(report, "  {f}");
        }
        panic!("{report}");
    }
}
