//! `POST /api/v1/rules/test`: one message through one rule, with the daemon's own engine, the
//! way `iotfwd rules test` does it: the rule is compiled by [`Compiler::compile_text`] and run
//! by [`Engine::evaluate`], so the console's tester, the CLI and the daemon always agree.
//!
//! The rule is a running rule by name, or SQL typed in the console, or both (the running
//! rule's description and actions with other SQL, so an action template that uses a key the new
//! SELECT no longer produces is a 9321 here too). Nothing is written: no rule file, no record,
//! no metric.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::{Engine, RuleOutcome};
use crate::message::{Identity, Message};
use crate::outcome::{Code, Failure};
use crate::rules::{Compiler, RuleError, RuleSet};

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TestRequest {
    /// The message topic, e.g. `/a1b2c3/sensor7/thing/event/property/post`.
    pub topic: String,
    /// The payload as the device sends it: a string is taken as its text exactly (so a payload
    /// that is not JSON can be tried); any other JSON value is taken as that JSON.
    #[serde(default)]
    pub payload: Option<Value>,
    /// A binary payload, base64 (instead of `payload`).
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// A running rule, by name: its SQL unless `sql` is given, and its actions.
    #[serde(default)]
    pub rule: Option<String>,
    /// The SQL to try.
    #[serde(default)]
    pub sql: Option<String>,
    /// The message time in ms since the epoch (default: now), for `timestamp()`.
    #[serde(default)]
    pub timestamp: Option<i64>,
}

/// Why a request could not be tried at all (a 400 or 404; a rule that fails is a 200 answer).
#[derive(Debug)]
pub enum Refusal {
    BadRequest(String),
    UnknownRule(String),
}

/// The rule text to compile: the running rule's file with `sql` in place of its SQL, or the
/// SQL alone. The SQL comes first, as a multi-line literal string starting on line 2, so an
/// error's line minus 1 is its line in the SQL (`sql_line_offset`).
struct Source {
    text: String,
    sql_line_offset: usize,
}

fn source(sql: &str, running_file: Option<&str>) -> Source {
    let literal_ok = !sql.contains("'''")
        && !sql
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t');
    let (mut text, sql_line_offset) = if literal_ok {
        (format!("sql = '''\n{sql}\n'''\n"), 1)
    } else {
        (
            format!("sql = {}\n", toml::Value::String(sql.to_owned())),
            0,
        )
    };
    // The rest of the running rule's file (description, enabled, actions), when it parses.
    if let Some(file) = running_file
        && let Ok(mut table) = file.parse::<toml::Table>()
    {
        table.remove("sql");
        if let Ok(rest) = toml::to_string(&table) {
            text.push_str(&rest);
        }
    }
    Source {
        text,
        sql_line_offset,
    }
}

/// Runs the test. `rules` are the rules running now; `compiler` the session to compile with.
pub fn run(
    request: TestRequest,
    rules: &RuleSet,
    compiler: Arc<Compiler>,
) -> Result<Value, Refusal> {
    let payload: Vec<u8> = match (&request.payload, &request.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(Refusal::BadRequest(
                "give payload or payloadBase64, not both".into(),
            ));
        }
        (Some(Value::String(text)), None) => text.as_bytes().to_vec(),
        (Some(value), None) => value.to_string().into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| Refusal::BadRequest(format!("payloadBase64 is not base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    let running = match &request.rule {
        None => None,
        Some(name) => Some(
            rules
                .get(name)
                .ok_or_else(|| {
                    Refusal::UnknownRule(format!(
                        "no running rule {name:?}; running: {}",
                        rules
                            .rules()
                            .iter()
                            .map(|r| r.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
                .clone(),
        ),
    };
    let sql = match (&request.sql, &running) {
        (Some(sql), _) => sql.clone(),
        (None, Some(rule)) => rule.sql.clone(),
        (None, None) => {
            return Err(Refusal::BadRequest(
                "give the SQL to try (sql), a running rule (rule), or both".into(),
            ));
        }
    };
    let name = running.as_ref().map_or("console_test", |r| r.name.as_str());
    let file_text = running
        .as_ref()
        .and_then(|r| std::fs::read_to_string(&r.file).ok());
    let src = source(&sql, file_text.as_deref());
    let base = json!({ "rule": name, "sql": sql, "topic": request.topic });
    let answer = |extra: Value| {
        let mut v = base.clone();
        merge(&mut v, extra);
        v
    };
    let mut rule = match compiler.compile_text(name, Path::new(name), &src.text) {
        Ok(rule) => rule,
        Err(errors) => {
            let code = errors.first().map_or(Code::SqlError, |e| e.code);
            let mut v = json!({
                "result": "failed",
                "stage": "compile",
                "errors": errors
                    .iter()
                    .map(|e| error_json(e, src.sql_line_offset))
                    .collect::<Vec<_>>(),
                "reason": errors
                    .iter()
                    .map(|e| e.message.clone())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
            merge(&mut v, code_json(code));
            return Ok(answer(v));
        }
    };
    // A disabled rule is tried too: the point is to try it before enabling it.
    rule.enabled = true;
    let filter = rule.program.parsed.filter.as_str().to_owned();
    let message = match Message::new(
        request.topic.clone(),
        payload.into(),
        Identity {
            timestamp_ms: request.timestamp,
            ..Identity::default()
        },
    ) {
        Ok(m) => m,
        Err(rejection) => {
            let failure = Failure::rejected(&rejection);
            return Ok(answer(failed(&failure, "message", &filter)));
        }
    };
    let engine = Engine::new(compiler, Arc::new(RuleSet::new(vec![rule])));
    let results = engine.evaluate(std::slice::from_ref(&message)).remove(0);
    let Some(result) = results.into_iter().next() else {
        return Ok(answer(json!({
            "result": "no_match",
            "filter": filter,
            "reason": format!(
                "the topic {:?} does not match the rule's FROM filter {filter:?}",
                message.topic
            ),
        })));
    };
    Ok(answer(match result.outcome {
        RuleOutcome::Passed(output) => json!({
            "result": "passed",
            "filter": filter,
            "code": Code::Ok,
            "output": Value::Object(output),
        }),
        RuleOutcome::NoResult => json!({
            "result": "no_result",
            "filter": filter,
            "reason": "WHERE is false or NULL for this message: the rule writes nothing for it",
        }),
        RuleOutcome::Failed(failure) => failed(&failure, "evaluate", &filter),
    }))
}

fn code_json(code: Code) -> Value {
    let info = code.info();
    json!({ "code": code, "name": info.name, "meaning": info.meaning })
}

fn failed(failure: &Failure, stage: &str, filter: &str) -> Value {
    let mut v = json!({
        "result": "failed",
        "stage": stage,
        "filter": filter,
        "reason": failure.reason(),
    });
    merge(&mut v, code_json(failure.code()));
    v
}

/// Adds `extra`'s keys to `v` (both objects).
fn merge(v: &mut Value, extra: Value) {
    if let (Value::Object(o), Value::Object(e)) = (v, extra) {
        o.extend(e);
    }
}

/// One compile error; `line` is the line in the SQL when the error has one there.
fn error_json(e: &RuleError, sql_line_offset: usize) -> Value {
    let line = e
        .line
        .and_then(|l| l.checked_sub(sql_line_offset))
        .filter(|l| *l >= 1);
    json!({
        "code": e.code,
        "message": e.message,
        "line": line,
        "column": line.and(e.column),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_goes_first_so_its_lines_are_known() {
        let s = source("SELECT a\nFROM \"/p/+/x\"", None);
        assert_eq!(s.sql_line_offset, 1);
        let doc: toml::Table = s.text.parse().unwrap();
        assert_eq!(doc["sql"].as_str().unwrap(), "SELECT a\nFROM \"/p/+/x\"\n");
        // SQL that a literal string cannot hold is escaped instead.
        for sql in [
            "SELECT ''' AS a FROM \"/p/+/x\"",
            "SELECT 'a\u{1}' AS a FROM \"/#\"",
        ] {
            let s = source(sql, None);
            assert_eq!(s.sql_line_offset, 0);
            let doc: toml::Table = s.text.parse().unwrap();
            assert_eq!(doc["sql"].as_str().unwrap(), sql);
        }
        // The running rule's actions come along; its SQL does not.
        let file = "description = \"d\"\nsql = \"SELECT 1 AS x FROM \\\"/#\\\"\"\n[[action]]\nto = \"group\"\ngroup = \"g\"\n";
        let s = source("SELECT 2 AS y FROM \"/#\"", Some(file));
        let doc: toml::Table = s.text.parse().unwrap();
        assert!(doc["sql"].as_str().unwrap().contains("SELECT 2"));
        assert_eq!(doc["action"].as_array().unwrap().len(), 1);
    }
}
