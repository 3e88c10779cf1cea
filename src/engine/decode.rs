//! Payload decoding: only the paths that rules reference, never the whole document.
//!
//! A rule set's payload paths (`items.temperature.value`, `a`, …) form a trie of object keys
//! ([`PathIndex`]). A payload is parsed by sonic-rs (SIMD, validating all of it, as before,
//! into one arena per document) and only the trie's keys are walked: a referenced value stays
//! a node of that document and becomes a typed [`Field`] only when a candidate rule reads it,
//! straight into that rule's Arrow columns. serde_json values are built, from the document, only
//! for the output of bare paths and of `SELECT *`.
//!
//! The fast pass takes payloads with no backslash (so strings need no unescaping), at most
//! [`MAX_FAST_CONTAINERS`] objects and arrays (so no nesting can run deep), no negative zero and
//! no number beyond a double's range (where sonic-rs and serde_json read differently). Every
//! other payload, and any payload sonic-rs refuses, is parsed whole with serde_json as before,
//! which also gives the 9320 reason for an invalid one. Either way a message decodes the same way
//! whatever batch it is in.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::{Map, Value};
use sonic_rs::{JsonContainerTrait, JsonType, JsonValueTrait};

use crate::rules::Rule;
use crate::rules::compile::Field;
use crate::rules::sql::Item;

/// Payloads with more objects and arrays than this take the full parse: the fast pass's
/// validation recurses once per level of nesting and has no depth limit of its own, so this
/// bounds its stack (a test runs it at this depth on a small stack).
pub const MAX_FAST_CONTAINERS: usize = 32;

/// Children above which a trie node looks keys up by hash rather than by scan.
const SCAN_CHILDREN: usize = 12;

/// The payload paths of a rule set as a trie. Nodes are numbered in pre-order, so a node's
/// subtree is the range `id..id + size`; a node's number is the slot of the path ending there.
pub struct PathIndex {
    nodes: Vec<Node>,
    /// Per rule of the set (by index), the slot of each of its paths.
    rule_slots: Vec<Vec<u32>>,
    /// Whether any rule selects `*` (its output needs the whole object).
    pub wildcard: bool,
    /// The fast pass is on (tests turn it off to compare against the full parse).
    fast: bool,
}

struct Node {
    children: Vec<(Box<str>, u32)>,
    by_key: Option<HashMap<Box<str>, u32>>,
    /// A path ends here.
    end: bool,
    /// Nodes in this subtree, itself included.
    size: u32,
}

impl Node {
    fn child(&self, key: &str) -> Option<u32> {
        match &self.by_key {
            Some(map) => map.get(key).copied(),
            None => self
                .children
                .iter()
                .find(|(k, _)| k.as_ref() == key)
                .map(|(_, c)| *c),
        }
    }
}

#[derive(Default)]
struct Building {
    children: Vec<(String, Building)>,
    end: bool,
}

impl Building {
    fn insert(&mut self, segments: &[String]) {
        match segments.split_first() {
            None => self.end = true,
            Some((first, rest)) => {
                let i = match self.children.iter().position(|(k, _)| k == first) {
                    Some(i) => i,
                    None => {
                        self.children.push((first.clone(), Building::default()));
                        self.children.len() - 1
                    }
                };
                self.children[i].1.insert(rest);
            }
        }
    }

    fn flatten(self, nodes: &mut Vec<Node>) -> u32 {
        let me = nodes.len();
        nodes.push(Node {
            children: Vec::new(),
            by_key: None,
            end: self.end,
            size: 1,
        });
        let children: Vec<(Box<str>, u32)> = self
            .children
            .into_iter()
            .map(|(k, c)| (k.into_boxed_str(), c.flatten(nodes)))
            .collect();
        let size = (nodes.len() - me) as u32;
        let node = &mut nodes[me];
        if children.len() > SCAN_CHILDREN {
            node.by_key = Some(children.iter().cloned().collect());
        }
        node.children = children;
        node.size = size;
        me as u32
    }
}

/// Where a referenced path's value is: a node of the payload's sonic-rs document (fast pass)
/// or of its serde_json tree (full parse).
#[derive(Clone, Copy, Debug)]
pub enum Slot<'a> {
    Dom(&'a sonic_rs::Value),
    Tree(&'a Value),
}

/// A referenced number that JSON allows but a double cannot hold (`1e400`).
#[derive(Debug)]
pub struct OutOfRange;

impl<'a> Slot<'a> {
    /// The value as a column field.
    pub fn field(self) -> Result<Field<'a>, OutOfRange> {
        match self {
            Slot::Tree(v) => Ok(match v {
                Value::Null => Field::Null,
                Value::Bool(b) => Field::Bool(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => Field::Int(i),
                    None => Field::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
                Value::String(s) => Field::Str(Cow::Borrowed(s)),
                Value::Array(_) | Value::Object(_) => Field::Json(Cow::Owned(v.to_string())),
            }),
            Slot::Dom(v) => Ok(match v.get_type() {
                JsonType::Null => Field::Null,
                JsonType::Boolean => Field::Bool(v.as_bool().unwrap_or_default()),
                JsonType::Number => match v.as_i64() {
                    Some(i) => Field::Int(i),
                    None => Field::Float(v.as_f64().ok_or(OutOfRange)?),
                },
                JsonType::String => Field::Str(Cow::Borrowed(v.as_str().unwrap_or_default())),
                JsonType::Array | JsonType::Object => {
                    Field::Json(Cow::Owned(dom_to_json(v)?.to_string()))
                }
            }),
        }
    }

    /// The value as JSON, for a bare path in the output; `field` is what [`Slot::field`] gave.
    pub fn json(self, field: &Field<'_>) -> Value {
        match (self, field) {
            (Slot::Tree(v), _) => v.clone(),
            (_, Field::Null) => Value::Null,
            (_, Field::Bool(b)) => Value::Bool(*b),
            (_, Field::Int(i)) => Value::from(*i),
            (Slot::Dom(v), Field::Float(f)) => match v.as_u64() {
                Some(u) => Value::from(u),
                None => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            },
            (_, Field::Str(s)) => Value::String(s.clone().into_owned()),
            (Slot::Dom(v), Field::Json(_)) => dom_to_json(v).unwrap_or(Value::Null),
        }
    }
}

/// A sonic-rs node as serde_json reads the same text: the same numbers (serde_json is built
/// with `float_roundtrip`, so both read doubles exactly), and a repeated key keeps its last
/// value in its first place.
pub fn dom_to_json(v: &sonic_rs::Value) -> Result<Value, OutOfRange> {
    Ok(match v.get_type() {
        JsonType::Null => Value::Null,
        JsonType::Boolean => Value::Bool(v.as_bool().unwrap_or_default()),
        JsonType::Number => match (v.as_i64(), v.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::Number(
                v.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .ok_or(OutOfRange)?,
            ),
        },
        JsonType::String => Value::String(v.as_str().unwrap_or_default().to_owned()),
        JsonType::Array => Value::Array(
            v.as_array()
                .map(|a| a.iter().map(dom_to_json).collect::<Result<_, _>>())
                .transpose()?
                .unwrap_or_default(),
        ),
        JsonType::Object => {
            let mut map = Map::new();
            if let Some(o) = v.as_object() {
                for (k, v) in o.iter() {
                    map.insert(k.to_owned(), dom_to_json(v)?);
                }
            }
            Value::Object(map)
        }
    })
}

/// Whether `payload` holds an escape or more than [`MAX_FAST_CONTAINERS`] objects and arrays.
/// The containers are counted over the whole payload in one plain loop; against a memchr
/// search that stops past the bound it measured no different (docs/benchmarks.md, Engine).
fn escapes_or_deep(payload: &[u8]) -> bool {
    memchr::memchr(b'\\', payload).is_some()
        || payload.iter().filter(|&&b| b == b'{' || b == b'[').count() > MAX_FAST_CONTAINERS
}

/// Whether `payload` may hold a negative zero (`-0`, `-0.0`, `-0e5`): serde_json reads a
/// double -0.0, sonic-rs reads 0 (or +0.0).
fn negative_zero(payload: &[u8]) -> bool {
    memchr::memchr_iter(b'-', payload).any(|i| {
        payload.get(i + 1) == Some(&b'0')
            && payload[i + 1..]
                .iter()
                .take_while(|b| matches!(b, b'0'..=b'9' | b'.'))
                .all(|&b| b == b'0' || b == b'.')
    })
}

/// Whether `payload` may hold a number beyond a double's range, which the full parse refuses
/// (the fast pass skips the numbers no rule reads without reading them): an exponent of three
/// or more digits after a digit, or a run of more than 308 digits. Strings can only make this
/// say yes when it need not, which costs the full parse and nothing else.
fn may_overflow(payload: &[u8]) -> bool {
    let exponent = memchr::memchr2_iter(b'e', b'E', payload).any(|i| {
        if i == 0 || !matches!(payload[i - 1], b'0'..=b'9' | b'.') {
            return false;
        }
        let mut j = i + 1;
        if matches!(payload.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        payload
            .get(j..j + 3)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    });
    exponent
        || (payload.len() > 308
            && payload
                .split(|b| !b.is_ascii_digit())
                .any(|run| run.len() > 308))
}

impl PathIndex {
    /// The index of `rules` (a rule set's rules, in its order).
    pub fn new(rules: &[std::sync::Arc<Rule>]) -> PathIndex {
        let mut root = Building::default();
        for rule in rules {
            for path in &rule.program.parsed.paths {
                root.insert(&path.segments);
            }
        }
        let mut nodes = Vec::new();
        root.flatten(&mut nodes);
        let rule_slots = rules
            .iter()
            .map(|rule| {
                rule.program
                    .parsed
                    .paths
                    .iter()
                    .map(|path| {
                        path.segments.iter().fold(0u32, |node, key| {
                            nodes[node as usize]
                                .child(key)
                                .expect("every path was inserted")
                        })
                    })
                    .collect()
            })
            .collect();
        let wildcard = rules.iter().any(|r| {
            r.program
                .parsed
                .items
                .iter()
                .any(|i| matches!(i, Item::Wildcard))
        });
        PathIndex {
            nodes,
            rule_slots,
            wildcard,
            fast: true,
        }
    }

    /// This index with the fast pass off: every payload is parsed whole.
    #[cfg(test)]
    pub fn full_parse_only(mut self) -> PathIndex {
        self.fast = false;
        self
    }

    /// The slots of rule `rule`'s paths, in the order of its `parsed.paths`.
    pub fn slots(&self, rule: usize) -> &[u32] {
        &self.rule_slots[rule]
    }

    /// The fast pass's parse: the payload as a sonic-rs document, when the fast pass takes it
    /// and it is a valid JSON object; None sends it to the full parse.
    pub fn parse_fast(&self, payload: &[u8]) -> Option<sonic_rs::Value> {
        if !self.fast || escapes_or_deep(payload) || may_overflow(payload) || negative_zero(payload)
        {
            return None;
        }
        let doc: sonic_rs::Value = sonic_rs::from_slice(payload).ok()?;
        doc.is_object().then_some(doc)
    }

    /// Appends `(slot, value)` for each referenced path present in `doc` (an object from
    /// [`PathIndex::parse_fast`]).
    pub fn decode_dom<'a>(&self, doc: &'a sonic_rs::Value, out: &mut Vec<(u32, Slot<'a>)>) {
        if let Some(object) = doc.as_object() {
            let from = out.len();
            self.walk_dom(0, object, out, from);
        }
    }

    fn walk_dom<'a>(
        &self,
        node: u32,
        object: &'a sonic_rs::Object,
        out: &mut Vec<(u32, Slot<'a>)>,
        from: usize,
    ) {
        let node = &self.nodes[node as usize];
        for (key, value) in object.iter() {
            let Some(child) = node.child(key) else {
                continue;
            };
            self.forget(child, out, from);
            let c = &self.nodes[child as usize];
            if c.end {
                out.push((child, Slot::Dom(value)));
            }
            if c.size > 1
                && let Some(inner) = value.as_object()
            {
                self.walk_dom(child, inner, out, from);
            }
        }
    }

    /// A key seen again: the last occurrence wins (as in a parsed object), so what the earlier
    /// one left in `out[from..]` under `node` goes.
    fn forget(&self, node: u32, out: &mut Vec<(u32, Slot<'_>)>, from: usize) {
        let under = node..node + self.nodes[node as usize].size;
        if out[from..].iter().any(|(s, _)| under.contains(s)) {
            let mut i = from;
            while i < out.len() {
                if under.contains(&out[i].0) {
                    out.remove(i);
                } else {
                    i += 1;
                }
            }
        }
    }

    /// The slow pass over a payload parsed whole: appends `(slot, value)` for each referenced
    /// path present in `object`.
    pub fn decode_tree<'a>(&self, object: &'a Map<String, Value>, out: &mut Vec<(u32, Slot<'a>)>) {
        self.walk_tree(0, object, out);
    }

    fn walk_tree<'a>(
        &self,
        node: u32,
        object: &'a Map<String, Value>,
        out: &mut Vec<(u32, Slot<'a>)>,
    ) {
        for (key, child) in &self.nodes[node as usize].children {
            let Some(value) = object.get(key.as_ref()) else {
                continue;
            };
            let c = &self.nodes[*child as usize];
            if c.end {
                out.push((*child, Slot::Tree(value)));
            }
            if let Value::Object(inner) = value
                && c.size > 1
            {
                self.walk_tree(*child, inner, out);
            }
        }
    }
}

/// The value of slot `slot` among one message's decoded `(slot, value)` pairs.
pub fn find<'a>(decoded: &[(u32, Slot<'a>)], slot: u32) -> Option<Slot<'a>> {
    decoded.iter().find(|(s, _)| *s == slot).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::rules::Compiler;

    fn index(sqls: &[&str]) -> PathIndex {
        let c = Compiler::new(8);
        let rules: Vec<Arc<Rule>> = sqls
            .iter()
            .enumerate()
            .map(|(i, sql)| {
                Arc::new(
                    c.compile_text(
                        &format!("r{i}"),
                        Path::new("t.toml"),
                        &format!("sql = '''{sql}'''\n"),
                    )
                    .unwrap(),
                )
            })
            .collect();
        PathIndex::new(&rules)
    }

    /// The fields of rule 0's paths: by the fast pass when it takes the payload, and always by
    /// the slow pass; None where the payload is not a JSON object.
    /// Rule 0's fields, one per path, None where absent.
    type Fields = Vec<Option<Field<'static>>>;

    fn both(index: &PathIndex, payload: &str) -> (Option<Fields>, Option<Fields>) {
        let own = |d: &[(u32, Slot<'_>)]| -> Fields {
            index
                .slots(0)
                .iter()
                .map(|&s| {
                    find(d, s).map(|v| match v.field().expect("in range") {
                        Field::Str(s) => Field::Str(Cow::Owned(s.into_owned())),
                        Field::Json(s) => Field::Json(Cow::Owned(s.into_owned())),
                        Field::Null => Field::Null,
                        Field::Bool(b) => Field::Bool(b),
                        Field::Int(i) => Field::Int(i),
                        Field::Float(f) => Field::Float(f),
                    })
                })
                .collect()
        };
        let fast = index.parse_fast(payload.as_bytes()).map(|doc| {
            let mut out = Vec::new();
            index.decode_dom(&doc, &mut out);
            own(&out)
        });
        let slow = match serde_json::from_str::<Value>(payload) {
            Ok(Value::Object(map)) => {
                let mut out = Vec::new();
                index.decode_tree(&map, &mut out);
                Some(own(&out))
            }
            _ => None,
        };
        (fast, slow)
    }

    #[test]
    fn the_fast_pass_reads_what_the_full_parse_reads() {
        let ix = index(&[r#"SELECT a, b.c, b.d.e, s FROM "/p/+/up""#]);
        for payload in [
            r#"{"a": 1, "b": {"c": 2.5, "d": {"e": "x"}}, "s": [1, {"z": null}]}"#,
            r#"{"b": {"d": 3}, "a": -0.5, "s": "t"}"#,
            r#"{"a": 1, "a": 2, "b": {"c": 1}, "b": {"d": {"e": true}}}"#,
            r#"{"a": 18446744073709551615, "s": {"k": [1, 2 ]}}"#,
            r#" { } "#,
            "{\"a\":1}\n",
        ] {
            let (fast, slow) = both(&ix, payload);
            assert_eq!(fast, slow, "{payload}");
            assert!(fast.is_some(), "{payload}");
        }
        let (fast, _) = both(
            &ix,
            r#"{"a": 1, "a": 2, "b": {"c": 1}, "b": {"d": {"e": true}}}"#,
        );
        assert_eq!(
            fast.unwrap(),
            [Some(Field::Int(2)), None, Some(Field::Bool(true)), None],
            "the last of a repeated key wins, with what it holds"
        );
    }

    #[test]
    fn payloads_the_fast_pass_leaves_to_the_full_parse() {
        let ix = index(&[r#"SELECT a FROM "/p/+/up""#]);
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(150), "]".repeat(150));
        for payload in [
            r#"{"a": "with \"escapes\""}"#,
            deep.as_str(),
            r#"{"a": 1} {"#,
            r#"{"a": 1}}"#,
            r#"{"a": 1,}"#,
            r#"[1]"#,
            r#"{"a": 01}"#,
            "{\"a\": \"\u{1}\"}",
            r#"{"a": tru}"#,
            r#"{"a": 1, "z": 1e400}"#,
            r#"{"a": 1, "z": 2.5E-999}"#,
            r#"{"a": 1, "z": [-0]}"#,
            r#"{"a": 1, "z": [-0.00e3]}"#,
        ] {
            assert!(ix.parse_fast(payload.as_bytes()).is_none(), "{payload}");
        }
    }

    /// The deepest payload the fast pass takes, in the debug build's large frames, on half the
    /// stack of the smallest thread the engine runs on (a tokio worker's 2 MiB).
    #[test]
    fn the_deepest_fast_payload_fits_a_small_stack() {
        let ix = index(&[r#"SELECT a FROM "/p/+/up""#]);
        let depth = MAX_FAST_CONTAINERS - 1;
        let arrays = format!("{{\"b\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!(
            "{{{}\"a\":1{}}}",
            "\"z\":{".repeat(depth),
            "}".repeat(depth)
        );
        std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(move || {
                for payload in [arrays, objects] {
                    let doc = ix.parse_fast(payload.as_bytes());
                    assert!(doc.is_some(), "{payload}");
                    let mut out = Vec::new();
                    ix.decode_dom(doc.as_ref().unwrap(), &mut out);
                }
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    fn json_text() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            any::<i64>().prop_map(|i| i.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| f.to_string()),
            "[a-c ]{0,4}".prop_map(|s| format!("\"{s}\"")),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(
                    (prop::sample::select(vec!["a", "b", "c", "d", "e"]), inner),
                    0..5
                )
                .prop_map(|kv| {
                    let kv: Vec<String> =
                        kv.iter().map(|(k, v)| format!("\"{k}\" : {v}")).collect();
                    format!("{{ {} }}", kv.join(", "))
                }),
            ]
        })
    }

    proptest! {
        /// On any object the fast pass takes, it reads every referenced path exactly as the
        /// full parse does; what it refuses, the full parse decides.
        #[test]
        fn fast_pass_equals_full_parse(payload in json_text()) {
            let ix = index(&[r#"SELECT a, b.c, b.d.e, c, e.a.b FROM "/p/+/up""#]);
            let (fast, slow) = both(&ix, &payload);
            if let Some(fast) = fast {
                prop_assert_eq!(Some(fast), slow);
            }
        }
    }
}
