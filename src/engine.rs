//! The engine: evaluates a micro-batch of messages against the rule set.
//!
//! For each message the topic index picks the candidate rules, so a message never runs a rule
//! whose filter it does not match. The payload is parsed once, and only when some rule is a
//! candidate. Each rule then runs once per batch and type variant over just the messages that
//! are its candidates, with columns built only for the payload paths it references.
//!
//! Evaluation is pure: no I/O, no metrics. The daemon, `iotfwd rules test` and the benchmark all
//! call [`Engine::evaluate`], so they always agree.
//!
//! Hot reload: an engine may [`Engine::follow`] a channel on which the reloader publishes new
//! rule sets. The daemon's engine loop calls [`Engine::refresh`] before it evaluates a batch, so
//! a batch runs under exactly one version and a swap happens only between batches. Results hold
//! the `Arc<Rule>` that matched, so a message already evaluated finishes its actions under that
//! version even when a newer one is in by then.

use std::cell::OnceCell;
use std::sync::Arc;

use base64::Engine as _;
use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::datatypes::{self as dt, DataType};
use datafusion::arrow::util::display::array_value_to_string;
use serde_json::{Map, Number, Value};
use tokio::sync::watch;

use crate::message::Message;
use crate::outcome::Failure;
use crate::rules::compile::{Field, Kind, VariantOutput};
use crate::rules::sql::{Item, ParsedSql};
use crate::rules::{Compiler, Rule, RuleSet};

/// A rule's output for one message: one JSON object, one key per select item.
pub type Output = Map<String, Value>;

/// What one candidate rule did with one message.
#[derive(Clone, Debug, PartialEq)]
pub enum RuleOutcome {
    /// WHERE held (or there is none): the output object.
    Passed(Output),
    /// WHERE was false or NULL.
    NoResult,
    /// The rule could not run on this message: 9320 (payload) or 9307 (SQL at run time).
    Failed(Failure),
}

/// One candidate rule's outcome for one message.
#[derive(Clone, Debug)]
pub struct RuleResult {
    pub rule: Arc<Rule>,
    pub outcome: RuleOutcome,
}

/// Evaluates batches against one version of the rule set.
#[derive(Clone)]
pub struct Engine {
    compiler: Arc<Compiler>,
    rules: Arc<RuleSet>,
    /// The payload paths `rules` reference, as the decoder walks them.
    paths: Arc<PathIndex>,
    /// Newer rule sets, published by the reloader; picked up by [`Engine::refresh`].
    updates: Option<watch::Receiver<Arc<RuleSet>>>,
    /// Fault injection ([`PANIC_TOPIC_ENV`]): evaluating a batch that holds a message with
    /// this topic panics.
    panic_topic: Option<String>,
}

/// Fault injection for tests of the daemon's supervision: when this environment variable is
/// set when an engine is made, evaluating a batch with a message of exactly that topic
/// panics. Unset (always, in production), it costs one `Option` check per batch.
pub const PANIC_TOPIC_ENV: &str = "IOTFWD_FAULT_PANIC_TOPIC";

impl Engine {
    pub fn new(compiler: Arc<Compiler>, rules: Arc<RuleSet>) -> Engine {
        Engine {
            compiler,
            paths: Arc::new(PathIndex::new(rules.rules())),
            rules,
            updates: None,
            panic_topic: std::env::var(PANIC_TOPIC_ENV)
                .ok()
                .filter(|t| !t.is_empty()),
        }
    }

    /// Follows the rule sets published on `updates`: [`Engine::refresh`] swaps in the newest.
    pub fn follow(mut self, updates: watch::Receiver<Arc<RuleSet>>) -> Engine {
        self.updates = Some(updates);
        self
    }

    /// Swaps in the newest published rule set, if there is one this engine has not seen yet.
    /// Returns whether it swapped. Call it between batches, never during one.
    pub fn refresh(&mut self) -> bool {
        let Some(updates) = &mut self.updates else {
            return false;
        };
        if !updates.has_changed().unwrap_or(false) {
            return false;
        }
        self.rules = Arc::clone(&updates.borrow_and_update());
        self.paths = Arc::new(PathIndex::new(self.rules.rules()));
        true
    }

    /// This engine with the payload decoder's fast pass off (every payload parsed whole), to
    /// compare the two.
    #[cfg(test)]
    pub fn full_parse_only(&self) -> Engine {
        let mut engine = self.clone();
        engine.paths = Arc::new(PathIndex::new(self.rules.rules()).full_parse_only());
        engine
    }

    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// Evaluates a batch. The result has one entry per message, each listing its candidate rules
    /// in rule order. Equal, message for message, to evaluating each message alone.
    pub fn evaluate(&self, messages: &[Message]) -> Vec<Vec<RuleResult>> {
        if let Some(topic) = &self.panic_topic
            && messages.iter().any(|m| &m.topic == topic)
        {
            panic!("fault injection: a message on {topic} ({PANIC_TOPIC_ENV})");
        }
        let rules = self.rules.rules();
        let index = &self.paths;
        let mut results: Vec<Vec<RuleResult>> = (0..messages.len()).map(|_| Vec::new()).collect();
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); rules.len()];
        // Each candidate message's referenced paths: `decoded[from..to]`, from its sonic-rs
        // document (`docs`, the fast pass) or, for the payloads the fast pass leaves, from its
        // serde_json tree (`trees`, parsed whole).
        let mut state: Vec<Decoded> = vec![Decoded::NotCandidate; messages.len()];
        let mut docs: Vec<(usize, sonic_rs::Value)> = Vec::new();
        let mut trees: Vec<(usize, Value)> = Vec::new();
        let mut candidates = Vec::new();
        for (m, message) in messages.iter().enumerate() {
            self.rules.candidates_into(&message.topic, &mut candidates);
            if candidates.is_empty() {
                continue;
            }
            state[m] = if let Some(doc) = index.parse_fast(&message.payload) {
                docs.push((m, doc));
                Decoded::Parsed
            } else {
                match parse_payload(&message.payload) {
                    Ok(tree) => {
                        trees.push((m, tree));
                        Decoded::Parsed
                    }
                    Err(reason) => Decoded::Invalid(reason),
                }
            };
            for &r in &candidates {
                members[r].push(m);
            }
        }
        let mut decoded: Vec<(u32, Slot<'_>)> = Vec::with_capacity(docs.len() * 4);
        for (m, doc) in &docs {
            let from = decoded.len();
            index.decode_dom(doc, &mut decoded);
            state[*m] = Decoded::Paths {
                from,
                to: decoded.len(),
                source: Source::Dom(doc),
            };
        }
        for (m, tree) in &trees {
            let from = decoded.len();
            let object = tree.as_object().expect("only objects are kept");
            index.decode_tree(object, &mut decoded);
            state[*m] = Decoded::Paths {
                from,
                to: decoded.len(),
                source: Source::Tree(object),
            };
        }
        let batch = Batch {
            messages,
            decoded: &decoded,
            state: &state,
            whole: (0..if index.wildcard { messages.len() } else { 0 })
                .map(|_| OnceCell::new())
                .collect(),
        };
        for (r, members) in members.iter().enumerate() {
            if members.is_empty() {
                continue;
            }
            let rule = &rules[r];
            let mut ok = Vec::with_capacity(members.len());
            for &m in members {
                match &state[m] {
                    Decoded::Paths { .. } => ok.push(m),
                    Decoded::Invalid(reason) => results[m].push(RuleResult {
                        rule: Arc::clone(rule),
                        outcome: RuleOutcome::Failed(Failure::payload_invalid(reason.clone())),
                    }),
                    Decoded::NotCandidate | Decoded::Parsed => {
                        unreachable!("every candidate is decoded")
                    }
                }
            }
            if ok.is_empty() {
                continue;
            }
            let outcomes = self.run_rule(rule, index.slots(r), &batch, &ok);
            for (m, outcome) in ok.into_iter().zip(outcomes) {
                results[m].push(RuleResult {
                    rule: Arc::clone(rule),
                    outcome,
                });
            }
        }
        results
    }

    /// Runs one rule over the messages `ok` (all valid objects); one outcome each.
    fn run_rule(
        &self,
        rule: &Rule,
        slots: &[u32],
        batch: &Batch<'_, '_>,
        ok: &[usize],
    ) -> Vec<RuleOutcome> {
        let paths = slots.len();
        let mut outcomes = vec![RuleOutcome::NoResult; ok.len()];
        let mut raw: Vec<Option<Slot<'_>>> = Vec::with_capacity(ok.len() * paths);
        let mut fields: Vec<Field<'_>> = Vec::with_capacity(ok.len() * paths);
        let mut kinds: Vec<Kind> = Vec::with_capacity(ok.len() * paths);
        let mut rows: Vec<usize> = Vec::with_capacity(ok.len());
        'messages: for (row, &m) in ok.iter().enumerate() {
            let decoded = batch.decoded_of(m);
            let start = fields.len();
            for &slot in slots {
                let value = decode::find(decoded, slot);
                match value.map(Slot::field).transpose() {
                    Ok(field) => {
                        let field = field.unwrap_or(Field::Null);
                        kinds.push(field.kind());
                        fields.push(field);
                        raw.push(value);
                    }
                    Err(decode::OutOfRange) => {
                        fields.truncate(start);
                        kinds.truncate(start);
                        raw.truncate(start);
                        outcomes[row] =
                            RuleOutcome::Failed(Failure::payload_invalid(batch.invalid_reason(m)));
                        continue 'messages;
                    }
                }
            }
            rows.push(row);
        }
        // `rows[i]`'s values are at `i * paths`. Group them by type variant; nearly always one
        // group.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in 0..rows.len() {
            let sig = &kinds[i * paths..(i + 1) * paths];
            match groups
                .iter_mut()
                .find(|(rep, _)| &kinds[rep * paths..(rep + 1) * paths] == sig)
            {
                Some((_, members)) => members.push(i),
                None => groups.push((i, vec![i])),
            }
        }
        let values = Values {
            ok,
            rows: &rows,
            fields: &fields,
            raw: &raw,
            paths,
        };
        for (rep, members) in groups {
            let sig = &kinds[rep * paths..(rep + 1) * paths];
            self.run_group(rule, batch, &values, sig, &members, &mut outcomes);
        }
        outcomes
    }

    /// Runs one type variant of a rule over `members` (indexes into `values.rows`).
    fn run_group(
        &self,
        rule: &Rule,
        batch: &Batch<'_, '_>,
        values: &Values<'_, '_>,
        sig: &[Kind],
        members: &[usize],
        outcomes: &mut [RuleOutcome],
    ) {
        let parsed = &rule.program.parsed;
        let paths = values.paths;
        let variant = match rule.program.variant(sig, self.compiler.state()) {
            Ok(v) => v,
            Err(reason) => {
                for &i in members {
                    outcomes[values.rows[i]] = RuleOutcome::Failed(Failure::sql(reason.clone()));
                }
                return;
            }
        };
        let group_messages: Vec<&Message> = members
            .iter()
            .map(|&i| &batch.messages[values.ok[values.rows[i]]])
            .collect();
        let group_values: Vec<&Field<'_>> = members
            .iter()
            .flat_map(|&i| values.fields[i * paths..(i + 1) * paths].iter())
            .collect();
        match variant.run(parsed, &group_messages, &group_values, sig) {
            Ok(VariantOutput { passed, columns }) => {
                for (out_row, &g) in passed.iter().enumerate() {
                    let i = members[g];
                    let row = values.rows[i];
                    let m = values.ok[row];
                    outcomes[row] = match build_output(
                        parsed,
                        || batch.whole(m),
                        &values.raw[i * paths..(i + 1) * paths],
                        &values.fields[i * paths..(i + 1) * paths],
                        &columns,
                        out_row,
                    ) {
                        Ok(output) => RuleOutcome::Passed(output),
                        Err(reason) => RuleOutcome::Failed(Failure::payload_invalid(reason)),
                    };
                }
            }
            // One bad row fails a whole Arrow evaluation: re-run the rows alone so only the
            // messages that cause the error get it.
            Err(_) if members.len() > 1 => {
                for &i in members {
                    self.run_group(rule, batch, values, sig, &[i], outcomes);
                }
            }
            Err(reason) => {
                outcomes[values.rows[members[0]]] = RuleOutcome::Failed(Failure::sql(reason));
            }
        }
    }
}

/// How a message's payload was decoded for this batch.
#[derive(Clone, Debug)]
enum Decoded<'d> {
    /// No rule is a candidate: never looked at.
    NotCandidate,
    /// Its referenced paths are `decoded[from..to]`, taken from `source`.
    Paths {
        from: usize,
        to: usize,
        source: Source<'d>,
    },
    /// Parsed (kept in `docs` or `trees`); becomes `Paths` once they are walked.
    Parsed,
    /// Not a JSON object: the 9320 reason.
    Invalid(String),
}

/// A payload as parsed: its sonic-rs document (the fast pass) or its serde_json object.
#[derive(Clone, Copy, Debug)]
enum Source<'d> {
    Dom(&'d sonic_rs::Value),
    Tree(&'d Map<String, Value>),
}

/// A batch's messages and what their decoding found, shared by every rule's run.
struct Batch<'m, 'd> {
    messages: &'m [Message],
    decoded: &'d [(u32, Slot<'d>)],
    state: &'d [Decoded<'d>],
    /// The whole object for `SELECT *` of a message the fast pass took, converted from its
    /// document at most once.
    whole: Vec<OnceCell<Result<Map<String, Value>, String>>>,
}

impl<'d> Batch<'_, 'd> {
    fn decoded_of(&self, m: usize) -> &'d [(u32, Slot<'d>)] {
        match self.state[m] {
            Decoded::Paths { from, to, .. } => &self.decoded[from..to],
            _ => &[],
        }
    }

    /// The whole payload object of message `m`, for `SELECT *`.
    fn whole(&self, m: usize) -> Result<&Map<String, Value>, String> {
        let doc = match self.state[m] {
            Decoded::Paths {
                source: Source::Tree(object),
                ..
            } => return Ok(object),
            Decoded::Paths {
                source: Source::Dom(doc),
                ..
            } => doc,
            _ => unreachable!("only decoded messages have outputs"),
        };
        self.whole[m]
            .get_or_init(|| match decode::dom_to_json(doc) {
                Ok(Value::Object(map)) => Ok(map),
                _ => Err(self.invalid_reason(m)),
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Why message `m`'s payload is refused when the fast pass took it but a value it holds is
    /// beyond what the full parse accepts (a number out of a double's range): the full parse's
    /// own reason.
    fn invalid_reason(&self, m: usize) -> String {
        match parse_payload(&self.messages[m].payload) {
            Err(reason) => reason,
            Ok(_) => "payload holds a number out of the range of a double".to_owned(),
        }
    }
}

/// One rule's decoded values for its candidate messages.
struct Values<'o, 'd> {
    /// The messages (batch indexes) the rule runs over.
    ok: &'o [usize],
    /// Rows of `ok` whose values decoded; row `rows[i]` has its values at `i * paths`.
    rows: &'o [usize],
    fields: &'o [Field<'d>],
    raw: &'o [Option<Slot<'d>>],
    paths: usize,
}

/// Parses a payload for the JSON rules: it must be a JSON object.
fn parse_payload(payload: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(other) => Err(format!(
            "payload is JSON but not an object (it is {}); rules read the fields of an object",
            json_kind(&other)
        )),
        Err(e) => Err(format!("payload is not valid JSON: {e}")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn build_output<'w>(
    parsed: &ParsedSql,
    whole: impl FnOnce() -> Result<&'w Map<String, Value>, String>,
    row_values: &[Option<Slot<'_>>],
    row_fields: &[Field<'_>],
    columns: &[Option<ArrayRef>],
    out_row: usize,
) -> Result<Output, String> {
    let mut out = Map::with_capacity(parsed.items.len());
    let mut whole = Some(whole);
    for (i, item) in parsed.items.iter().enumerate() {
        match item {
            Item::Wildcard => {
                // A rule has at most one `*`.
                let payload = (whole.take().expect("one wildcard per rule"))()?;
                for (k, v) in payload {
                    out.insert(k.clone(), v.clone());
                }
            }
            Item::Path { key, path } => {
                out.insert(
                    key.clone(),
                    row_values[*path].map_or(Value::Null, |v| v.json(&row_fields[*path])),
                );
            }
            Item::Expr { key, .. } => {
                let column = columns[i].as_ref().expect("expression items have a column");
                out.insert(key.clone(), arrow_to_json(column.as_ref(), out_row));
            }
        }
    }
    Ok(out)
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// One Arrow value as JSON: numbers as numbers, lists as arrays, structs as objects, and
/// anything else (dates, decimals, durations) as its display text.
pub fn arrow_to_json(array: &dyn Array, row: usize) -> Value {
    if array.is_null(row) {
        return Value::Null;
    }
    match array.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Int8 => array.as_primitive::<dt::Int8Type>().value(row).into(),
        DataType::Int16 => array.as_primitive::<dt::Int16Type>().value(row).into(),
        DataType::Int32 => array.as_primitive::<dt::Int32Type>().value(row).into(),
        DataType::Int64 => array.as_primitive::<dt::Int64Type>().value(row).into(),
        DataType::UInt8 => array.as_primitive::<dt::UInt8Type>().value(row).into(),
        DataType::UInt16 => array.as_primitive::<dt::UInt16Type>().value(row).into(),
        DataType::UInt32 => array.as_primitive::<dt::UInt32Type>().value(row).into(),
        DataType::UInt64 => array.as_primitive::<dt::UInt64Type>().value(row).into(),
        DataType::Float16 => float(array.as_primitive::<dt::Float16Type>().value(row).to_f64()),
        DataType::Float32 => float(array.as_primitive::<dt::Float32Type>().value(row) as f64),
        DataType::Float64 => float(array.as_primitive::<dt::Float64Type>().value(row)),
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_owned()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(row).to_owned()),
        DataType::Utf8View => Value::String(array.as_string_view().value(row).to_owned()),
        DataType::Binary => Value::String(
            base64::engine::general_purpose::STANDARD.encode(array.as_binary::<i32>().value(row)),
        ),
        DataType::List(_) => {
            let list = array.as_list::<i32>().value(row);
            Value::Array(
                (0..list.len())
                    .map(|i| arrow_to_json(list.as_ref(), i))
                    .collect(),
            )
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>().value(row);
            Value::Array(
                (0..list.len())
                    .map(|i| arrow_to_json(list.as_ref(), i))
                    .collect(),
            )
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            Value::Object(
                fields
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| (f.name().clone(), arrow_to_json(c.as_ref(), row)))
                    .collect(),
            )
        }
        _ => array_value_to_string(array, row)
            .map(Value::String)
            .unwrap_or(Value::Null),
    }
}

mod decode;
#[cfg(test)]
mod robustness;

use decode::{PathIndex, Slot};

#[cfg(test)]
mod tests {
    use std::path::Path;

    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::message::Identity;

    fn compiler() -> Arc<Compiler> {
        Arc::new(Compiler::new(8))
    }

    fn rule(compiler: &Compiler, name: &str, sql: &str) -> Rule {
        let text = format!("sql = '''{sql}'''\n");
        compiler
            .compile_text(name, Path::new("test.toml"), &text)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
    }

    fn message(topic: &str, payload: &str) -> Message {
        Message::new(
            topic.to_owned(),
            Bytes::copy_from_slice(payload.as_bytes()),
            Identity::default(),
        )
        .unwrap()
    }

    fn engine(rules: &[(&str, &str)]) -> Engine {
        let c = compiler();
        let rules = rules.iter().map(|(n, sql)| rule(&c, n, sql)).collect();
        Engine::new(c, Arc::new(RuleSet::new(rules)))
    }

    fn names(results: &[RuleResult]) -> Vec<&str> {
        results.iter().map(|r| r.rule.name.as_str()).collect()
    }

    #[test]
    fn only_rules_whose_filter_matches_are_candidates() {
        let e = engine(&[
            ("hot", r#"SELECT t FROM "/p1/+/up" WHERE t > 30"#),
            ("all", r#"SELECT deviceName() AS d FROM "/#""#),
        ]);
        let out = e.evaluate(&[
            message("/p1/d1/up", r#"{"t": 35}"#),
            message("/p2/d2/up", r#"{"t": 35}"#),
            message("/p1/d3/up", r#"{"t": 20}"#),
        ]);
        assert_eq!(names(&out[0]), ["hot", "all"]);
        assert_eq!(names(&out[1]), ["all"]);
        assert_eq!(
            out[0][0].outcome,
            RuleOutcome::Passed(obj(json!({"t": 35})))
        );
        assert_eq!(
            out[1][0].outcome,
            RuleOutcome::Passed(obj(json!({"d": "d2"})))
        );
        assert_eq!(out[2][0].outcome, RuleOutcome::NoResult, "WHERE false");
    }

    #[test]
    fn a_payload_that_is_not_an_object_fails_with_9320_for_each_candidate_only() {
        let e = engine(&[("r", r#"SELECT * FROM "/p1/+/up""#)]);
        let out = e.evaluate(&[
            message("/p1/d/up", "[1, 2]"),
            message("/p1/d/up", "not json"),
            message("/p9/d/up", "not json"),
            message("/p1/d/up", r#"{"a": 1}"#),
        ]);
        for (m, kind) in [(0, "not an object"), (1, "not valid JSON")] {
            match &out[m][0].outcome {
                RuleOutcome::Failed(f) => {
                    assert_eq!(f.code().as_u16(), 9320);
                    assert!(f.reason().contains(kind), "{}", f.reason());
                }
                other => panic!("message {m}: {other:?}"),
            }
        }
        assert!(
            out[2].is_empty(),
            "no candidate, so the payload is never parsed"
        );
        assert_eq!(out[3][0].outcome, RuleOutcome::Passed(obj(json!({"a": 1}))));
    }

    #[test]
    fn a_batch_of_mixed_types_gives_what_each_message_gives_alone() {
        let e = engine(&[(
            "r",
            r#"SELECT v + 1 AS w FROM "/p1/+/up" WHERE v IS NOT NULL"#,
        )]);
        let batch = vec![
            message("/p1/a/up", r#"{"v": 1}"#),
            message("/p1/b/up", r#"{"v": 2.5}"#),
            message("/p1/c/up", r#"{"x": 1}"#),
            message("/p1/d/up", r#"{"v": 41}"#),
        ];
        let together = e.evaluate(&batch);
        for (m, msg) in batch.iter().enumerate() {
            let alone = e.evaluate(std::slice::from_ref(msg));
            assert_eq!(together[m][0].outcome, alone[0][0].outcome, "message {m}");
        }
        assert_eq!(
            together[3][0].outcome,
            RuleOutcome::Passed(obj(json!({"w": 42})))
        );
        assert_eq!(together[2][0].outcome, RuleOutcome::NoResult);
    }

    #[test]
    fn refresh_swaps_the_rule_set_only_when_a_new_one_is_published() {
        let c = compiler();
        let first = Arc::new(RuleSet::new(vec![rule(
            &c,
            "v1",
            r#"SELECT 1 AS v FROM "/p1/+/up""#,
        )]));
        let (tx, rx) = watch::channel(Arc::clone(&first));
        let mut e = Engine::new(Arc::clone(&c), first).follow(rx);
        assert!(!e.refresh(), "nothing new yet");
        let msg = [message("/p1/d/up", "{}")];
        assert_eq!(names(&e.evaluate(&msg)[0]), ["v1"]);
        tx.send(Arc::new(RuleSet::new(vec![rule(
            &c,
            "v2",
            r#"SELECT 2 AS v FROM "/p1/+/up""#,
        )])))
        .unwrap();
        assert_eq!(
            names(&e.evaluate(&msg)[0]),
            ["v1"],
            "no swap within a batch"
        );
        assert!(e.refresh());
        assert!(!e.refresh(), "each version is taken once");
        let out = e.evaluate(&msg);
        assert_eq!(names(&out[0]), ["v2"]);
        assert_eq!(out[0][0].outcome, RuleOutcome::Passed(obj(json!({"v": 2}))));
    }

    fn obj(v: Value) -> Output {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }
}
