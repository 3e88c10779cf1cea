//! The robustness suites' runner (test code only; see docs/security.md, "Robustness").
//!
//! Every parser of outside input has a suite next to its code that feeds it generated and
//! mutated input through [`run`]: a proptest runner whose cases each run under
//! `catch_unwind`, so a panic is counted and fails the suite naming the (shrunk) input instead
//! of tearing the test down. Each suite prints one line, `robustness: <suite> cases=N panics=P`,
//! which `scripts/robustness` collects.
//!
//! How many cases: each suite's default (small, for `scripts/test`), or [`CASES_ENV`] for all
//! of them. The library's unit tests compile this file as `crate::robustness`; the live suites
//! in `tests/it/robustness.rs` include the same file, so both read the count in one place.
//!
//! The generators here are shared: byte mutations of seeds ([`mutated_bytes`]) and token
//! mutations of seed texts ([`mutated_text`]): delete, duplicate, swap, insert and replace
//! tokens, then maybe a few byte edits on top.

use std::cell::Cell;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// The environment variable that sets every suite's case count (`scripts/robustness N`).
pub const CASES_ENV: &str = "IOTFWD_ROBUST_CASES";

/// The case count: [`CASES_ENV`] when set, else the suite's `default`.
pub fn cases(default: u32) -> u32 {
    match std::env::var(CASES_ENV) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{CASES_ENV}={v:?} is not a number of cases")),
        Err(_) => default,
    }
}

/// What a suite ran: cases, and how many of them panicked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub cases: u64,
    pub panics: u64,
}

/// Runs `check` on [`cases`]`(default_cases)` inputs drawn from `strategy`. `check` returns
/// `Err` with what is wrong for an input it handled badly; a panic inside it is caught and
/// counted. Either fails the suite once proptest has shrunk the input; the failure names that
/// input. Prints `robustness: <suite> cases=N panics=P` either way (shrinking runs count).
pub fn run<S>(
    suite: &str,
    default_cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), String>,
) -> Tally
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    });
    let ran = Cell::new(0u64);
    let panics = Cell::new(0u64);
    let result = runner.run(&strategy, |input| {
        ran.set(ran.get() + 1);
        match catch_unwind(AssertUnwindSafe(|| check(input))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(wrong)) => Err(TestCaseError::fail(wrong)),
            Err(payload) => {
                panics.set(panics.get() + 1);
                Err(TestCaseError::fail(format!(
                    "panicked: {}",
                    panic_message(payload.as_ref())
                )))
            }
        }
    });
    let tally = Tally {
        cases: ran.get(),
        panics: panics.get(),
    };
    println!(
        "robustness: {suite} cases={} panics={}",
        tally.cases, tally.panics
    );
    if let Err(e) = result {
        panic!("robustness: {suite}: {e}");
    }
    tally
}

/// What a suite's cases came to, by label (`refused`, `loaded`, `9320`, ...), so its line
/// shows it reaches each branch: `robustness: <suite> refused=N loaded=M`.
#[derive(Default)]
pub struct Seen(std::cell::RefCell<std::collections::BTreeMap<String, u64>>);

impl Seen {
    /// Counts one case under `label`.
    pub fn count(&self, label: impl Into<String>) {
        *self.0.borrow_mut().entry(label.into()).or_default() += 1;
    }

    /// How many cases were counted under `label` (for the live suites' own checks).
    #[allow(dead_code)]
    pub fn get(&self, label: &str) -> u64 {
        self.0.borrow().get(label).copied().unwrap_or(0)
    }

    /// Counts a check's label and passes its result on.
    pub fn outcome(&self, result: Result<&'static str, String>) -> Result<(), String> {
        result.map(|label| self.count(label))
    }

    /// Prints `robustness: <suite> <label>=<count> ...`.
    pub fn print(&self, suite: &str) {
        let counts: Vec<String> = (self.0.borrow().iter())
            .map(|(label, n)| format!("{label}={n}"))
            .collect();
        println!("robustness: {suite} {}", counts.join(" "));
    }
}

/// The text of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Bytes that print as a byte string (`b"AMQP\x03..."`), so a failing input is readable.
#[derive(Clone, PartialEq, Eq)]
pub struct Raw(pub Vec<u8>);

impl fmt::Debug for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// Fragments worth inserting anywhere: boundaries, separators, escapes, multi-byte text.
const BYTE_FRAGMENTS: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
    b"\x80",
    b"\xc3",
    b"\xe2\x82",
    "é".as_bytes(),
    "\u{10ffff}".as_bytes(),
    "\u{202e}".as_bytes(),
    b"\r\n",
    b"\n",
    b"\t",
    b" ",
    b"\"",
    b"'",
    b"\\",
    b"/",
    b"+",
    b"#",
    b"$",
    b"${",
    b"}",
    b"{",
    b"[",
    b"]",
    b",",
    b"=",
    b"|",
    b"%",
    b"-1",
    b"0",
    b"18446744073709551616",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"1e309",
    b"NaN",
];

/// One edit of a byte string; positions are drawn relative to its length at that point.
#[derive(Clone, Debug)]
enum ByteEdit {
    Delete(Index, u8),
    Insert(Index, Vec<u8>),
    Replace(Index, u8, Vec<u8>),
    Flip(Index, u8),
    Duplicate(Index, u8),
    Truncate(Index),
}

fn fragment(extra: &'static [&'static [u8]]) -> BoxedStrategy<Vec<u8>> {
    let known: Vec<Vec<u8>> = BYTE_FRAGMENTS
        .iter()
        .chain(extra)
        .map(|f| f.to_vec())
        .collect();
    prop_oneof![
        2 => prop::sample::select(known),
        1 => prop::collection::vec(any::<u8>(), 1..12),
    ]
    .boxed()
}

fn byte_edit(extra: &'static [&'static [u8]]) -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        3 => (any::<Index>(), 1..16u8).prop_map(|(i, n)| ByteEdit::Delete(i, n)),
        4 => (any::<Index>(), fragment(extra)).prop_map(|(i, f)| ByteEdit::Insert(i, f)),
        3 => (any::<Index>(), 1..8u8, fragment(extra)).prop_map(|(i, n, f)| ByteEdit::Replace(i, n, f)),
        2 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| ByteEdit::Flip(i, m)),
        1 => (any::<Index>(), 1..64u8).prop_map(|(i, n)| ByteEdit::Duplicate(i, n)),
        1 => any::<Index>().prop_map(ByteEdit::Truncate),
    ]
}

fn apply_byte_edits(mut bytes: Vec<u8>, edits: &[ByteEdit]) -> Vec<u8> {
    for edit in edits {
        let len = bytes.len();
        match edit {
            ByteEdit::Delete(i, n) => {
                let at = i.index(len + 1);
                let end = (at + *n as usize).min(len);
                bytes.drain(at..end);
            }
            ByteEdit::Insert(i, f) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, f.iter().copied());
            }
            ByteEdit::Replace(i, n, f) => {
                let at = i.index(len + 1);
                let end = (at + *n as usize).min(len);
                bytes.splice(at..end, f.iter().copied());
            }
            ByteEdit::Flip(i, mask) => {
                if len > 0 {
                    bytes[i.index(len)] ^= mask;
                }
            }
            ByteEdit::Duplicate(i, n) => {
                let at = i.index(len + 1);
                let end = (at + *n as usize).min(len);
                let copy = bytes[at..end].to_vec();
                bytes.splice(end..end, copy);
            }
            ByteEdit::Truncate(i) => bytes.truncate(i.index(len + 1)),
        }
    }
    bytes
}

/// One of `seeds` with 1–6 byte edits (deletions, insertions of boundary bytes, separators,
/// `extra` fragments or random bytes, bit flips, duplications, truncation); in one case of ten
/// the seed as it is, so the suite shows that valid input gets through.
pub fn mutated_bytes(
    seeds: Vec<Vec<u8>>,
    extra: &'static [&'static [u8]],
) -> impl Strategy<Value = Raw> {
    assert!(!seeds.is_empty(), "mutations need a seed");
    (
        prop::sample::select(seeds),
        prop_oneof![
            1 => prop::collection::vec(byte_edit(extra), 0..=0),
            9 => prop::collection::vec(byte_edit(extra), 1..=6),
        ],
    )
        .prop_map(|(seed, edits)| Raw(apply_byte_edits(seed, &edits)))
}

/// A text's tokens: runs of word characters, quoted strings (`'…'`, `"…"`, with their
/// quotes), runs of white space, and every other character on its own. Concatenated, they
/// give the text back.
pub fn tokens(text: &str) -> Vec<String> {
    fn word(c: char) -> bool {
        c.is_alphanumeric() || c == '_'
    }
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        let mut end = start + c.len_utf8();
        let run: Option<fn(char) -> bool> = if word(c) {
            Some(word)
        } else if c.is_whitespace() {
            Some(char::is_whitespace)
        } else {
            None
        };
        if let Some(run) = run {
            while let Some(&(i, x)) = chars.peek() {
                if !run(x) {
                    break;
                }
                end = i + x.len_utf8();
                chars.next();
            }
        } else if c == '\'' || c == '"' {
            for (i, x) in chars.by_ref() {
                end = i + x.len_utf8();
                if x == c {
                    break;
                }
            }
        }
        out.push(text[start..end].to_owned());
    }
    out
}

/// One edit of a token list; positions relative to its length at that point.
#[derive(Clone, Debug)]
enum TokenEdit {
    Delete(Index),
    Duplicate(Index),
    Swap(Index, Index),
    Insert(Index, Index),
    Replace(Index, Index),
}

fn apply_token_edits(mut toks: Vec<String>, edits: &[TokenEdit], vocab: &[String]) -> String {
    assert!(!vocab.is_empty(), "token edits need a vocabulary");
    for edit in edits {
        let len = toks.len();
        match edit {
            TokenEdit::Delete(i) if len > 0 => {
                toks.remove(i.index(len));
            }
            TokenEdit::Duplicate(i) if len > 0 => {
                let at = i.index(len);
                toks.insert(at, toks[at].clone());
            }
            TokenEdit::Swap(a, b) if len > 0 => toks.swap(a.index(len), b.index(len)),
            TokenEdit::Insert(i, w) => toks.insert(i.index(len + 1), w.get(vocab).clone()),
            TokenEdit::Replace(i, w) if len > 0 => toks[i.index(len)] = w.get(vocab).clone(),
            _ => {}
        }
    }
    toks.concat()
}

fn token_edit() -> impl Strategy<Value = TokenEdit> {
    prop_oneof![
        3 => any::<Index>().prop_map(TokenEdit::Delete),
        1 => any::<Index>().prop_map(TokenEdit::Duplicate),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| TokenEdit::Swap(a, b)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, w)| TokenEdit::Insert(i, w)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, w)| TokenEdit::Replace(i, w)),
    ]
}

/// One of `seeds` with up to 5 token edits, mostly one or two (delete, duplicate, swap, or
/// insert or replace with a token of `vocabulary` or of the seeds), and in one case of six a
/// byte edit or two on top (the result made UTF-8 again, lossily). Some seeds come through
/// unchanged.
pub fn mutated_text(seeds: Vec<String>, vocabulary: &[&str]) -> impl Strategy<Value = String> {
    assert!(!seeds.is_empty(), "mutations need a seed");
    let mut vocab: Vec<String> = vocabulary.iter().map(|s| (*s).to_owned()).collect();
    for seed in &seeds {
        vocab.extend(tokens(seed));
    }
    vocab.sort();
    vocab.dedup();
    let tokenized: Vec<Vec<String>> = seeds.iter().map(|s| tokens(s)).collect();
    // Mostly one or two edits: input close to valid gets past the first check.
    let edits = prop_oneof![
        2 => prop::collection::vec(token_edit(), 0..=0),
        4 => prop::collection::vec(token_edit(), 1..=2),
        2 => prop::collection::vec(token_edit(), 3..=5),
    ];
    (
        prop::sample::select(tokenized),
        edits,
        prop::collection::vec(byte_edit(&[]), 1..=2),
        0..6u8,
    )
        .prop_map(move |(toks, edits, bytes, with_bytes)| {
            let text = apply_token_edits(toks, &edits, &vocab);
            if with_bytes == 0 {
                String::from_utf8_lossy(&apply_byte_edits(text.into_bytes(), &bytes)).into_owned()
            } else {
                text
            }
        })
}

/// Text: any Unicode, text over the characters the parsers here split on, or bytes made
/// UTF-8 (lossily).
pub fn text() -> BoxedStrategy<String> {
    prop_oneof![
        2 => any::<String>(),
        3 => "[a-z0-9/+#$.{}|=,:'\" _\\-]{0,40}",
        1 => prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
    .boxed()
}

/// Topic-shaped text: levels joined by `/`, some empty, some wildcards or with NUL, long or
/// non-ASCII, with or without the leading and a trailing `/`; or any [`text`].
pub fn topic() -> BoxedStrategy<String> {
    let level = prop_oneof![
        8 => "[a-z0-9]{1,6}",
        1 => Just(String::new()),
        1 => Just("+".to_owned()),
        1 => Just("#".to_owned()),
        1 => prop::sample::select(vec!["a+b", "a#", "\0", "é", "$SYS", " ", ".", "%2F"])
            .prop_map(str::to_owned),
        1 => (200..1100usize).prop_map(|n| "x".repeat(n)),
    ];
    prop_oneof![
        6 => (
            prop::bool::weighted(0.9),
            prop::collection::vec(level, 0..8),
            prop::bool::weighted(0.1)
        )
            .prop_map(|(lead, levels, trail)| {
                let mut s = if lead { "/".to_owned() } else { String::new() };
                s.push_str(&levels.join("/"));
                if trail {
                    s.push('/');
                }
                s
            }),
        1 => text(),
    ]
    .boxed()
}

/// A platform topic: `/productKey/deviceName/` and one to four more levels.
pub fn platform_topic() -> BoxedStrategy<String> {
    "/p[0-9]/d[0-9]{1,2}(/[a-z]{1,6}){1,4}".boxed()
}

/// Any JSON value, nested up to 5 deep: extreme numbers, any text, short keys (so payload
/// paths like `a.b` find something) or any keys.
pub fn json() -> BoxedStrategy<serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![0, -1, 1, 38, 39, i64::MAX, i64::MIN]).prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    let key = prop_oneof![4 => "[a-z]{1,2}", 1 => text()];
    leaf.prop_recursive(5, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A JSON object shaped like an ingest envelope: usually a topic (a platform topic, a
/// topic-shaped text, now and then any JSON) and a payload (an object with the fields rules read, or any JSON), now and then
/// the other fields, each usually of its type, and rarely a field the envelope does not have.
pub fn envelope() -> BoxedStrategy<serde_json::Value> {
    use serde_json::Value;
    let string = || prop_oneof![8 => "[a-z0-9]{0,8}".prop_map(Value::String), 1 => json()];
    let payload = prop_oneof![
        2 => prop::collection::vec((prop::sample::select(vec!["a", "b", "s", "items"]), json()), 0..4)
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        1 => json(),
    ];
    let other = prop::sample::select(vec![
        "extra",
        "message_id",
        "payloadBase64",
        "tenantId",
        "instanceId",
    ]);
    (
        prop::option::weighted(
            0.95,
            prop_oneof![
                4 => platform_topic().prop_map(Value::String),
                5 => topic().prop_map(Value::String),
                1 => json(),
            ],
        ),
        prop::option::weighted(0.75, payload),
        prop::option::weighted(
            0.2,
            prop_oneof![4 => "[A-Za-z0-9+/=]{0,16}".prop_map(Value::String), 1 => json()],
        ),
        prop::option::weighted(0.3, string()),
        prop::option::weighted(0.3, string()),
        prop::option::weighted(
            0.2,
            prop_oneof![4 => any::<i64>().prop_map(Value::from), 1 => json()],
        ),
        prop::option::weighted(0.2, string()),
        prop::option::weighted(0.1, string()),
        prop::option::weighted(0.05, (other, json())),
    )
        .prop_map(|(topic, payload, b64, mid, tid, ts, pk, dn, other)| {
            let mut m = serde_json::Map::new();
            let fields = [
                ("topic", topic),
                ("payload", payload),
                ("payload_base64", b64),
                ("messageId", mid),
                ("traceId", tid),
                ("timestamp", ts),
                ("productKey", pk),
                ("deviceName", dn),
            ];
            for (k, v) in fields {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            if let Some((k, v)) = other {
                m.insert(k.to_owned(), v);
            }
            Value::Object(m)
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_give_the_text_back() {
        let sql = "SELECT a.b AS x, 'it''s' FROM \"/p/+/#\" WHERE n >= 1.5";
        let toks = tokens(sql);
        assert_eq!(toks.concat(), sql);
        assert!(toks.contains(&"\"/p/+/#\"".to_owned()), "{toks:?}");
        assert!(toks.contains(&"SELECT".to_owned()), "{toks:?}");
        assert_eq!(tokens("é ü'x"), ["é", " ", "ü", "'x"]);
    }
}
