//! `${key}` templates for action parameters, e.g. an AMQP routing key `temp.${device}`.
//!
//! A template is parsed once when its rule loads, so a malformed one keeps the rule from
//! loading instead of failing on every message; rendering is then a walk over the parts.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A parsed template: literal text with `${key}` placeholders naming keys of a rule's
/// output object.
///
/// Syntax: `${key}` is a placeholder, `$$` is a literal `$`, and a `$` not followed by
/// `{` or `$` is literal too. Keys consist of `A-Z a-z 0-9 _ . -`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    raw: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Key(String),
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

impl Template {
    /// Parses `${key}` placeholders.
    ///
    /// Errors (each naming the byte position in `raw`): an unterminated `${`, an empty
    /// key `${}`, or a key with a character outside `[A-Za-z0-9_.-]`.
    pub fn parse(raw: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = raw.char_indices().peekable();
        while let Some((pos, c)) = chars.next() {
            if c != '$' {
                literal.push(c);
                continue;
            }
            match chars.peek() {
                Some((_, '$')) => {
                    chars.next();
                    literal.push('$');
                }
                Some((_, '{')) => {
                    chars.next();
                    let key_start = pos + 2;
                    let mut key_end = None;
                    for (i, c) in chars.by_ref() {
                        if c == '}' {
                            key_end = Some(i);
                            break;
                        }
                        if !is_key_char(c) {
                            return Err(if c == '$' && raw[i..].starts_with("${") {
                                format!(
                                    "unterminated \"${{\" at byte {pos} (a placeholder starts again at byte {i} before it is closed)"
                                )
                            } else {
                                format!(
                                    "invalid character {c:?} at byte {i} in the placeholder starting at byte {pos} (keys may contain only A-Z a-z 0-9 _ . -)"
                                )
                            });
                        }
                    }
                    let Some(key_end) = key_end else {
                        return Err(format!(
                            "unterminated \"${{\" at byte {pos} (missing closing '}}')"
                        ));
                    };
                    if key_end == key_start {
                        return Err(format!("empty placeholder \"${{}}\" at byte {pos}"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Key(raw[key_start..key_end].to_owned()));
                }
                _ => literal.push('$'),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            raw: raw.to_owned(),
            parts,
        })
    }

    /// The template as written (with `$$` still escaped).
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The placeholder keys, in order of appearance (repeats included).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Key(key) => Some(key.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// True when the template has no placeholders, so it renders the same for every
    /// message.
    pub fn is_literal(&self) -> bool {
        self.keys().next().is_none()
    }

    /// Renders against a rule's output object.
    ///
    /// Strings render raw (without quotes), numbers and booleans as their JSON text,
    /// objects and arrays as compact JSON. A key is looked up as written first; a dotted
    /// key that is not itself in the output (`${items.temperature}`) is then followed into
    /// nested objects, so templates can reach into a `SELECT *` payload. A key that is
    /// missing or JSON null is an error: an action must not silently send to a wrong
    /// destination such as routing key `temp.`.
    pub fn render(&self, output: &Map<String, Value>) -> Result<String, String> {
        let mut out = String::with_capacity(self.raw.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Key(key) => match lookup(output, key) {
                    None => return Err(format!("${{{key}}} is not in the rule's output")),
                    Some(Value::Null) => return Err(format!("${{{key}}} is null")),
                    Some(Value::String(s)) => out.push_str(s),
                    // Value's Display is compact JSON for numbers, bools, arrays and objects.
                    Some(value) => out.push_str(&value.to_string()),
                },
            }
        }
        Ok(out)
    }
}

fn lookup<'a>(output: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    if let Some(value) = output.get(key) {
        return Some(value);
    }
    if !key.contains('.') {
        return None;
    }
    let mut segments = key.split('.');
    let mut value = output.get(segments.next()?)?;
    for segment in segments {
        value = value.as_object()?.get(segment)?;
    }
    Some(value)
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl std::str::FromStr for Template {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Template::parse(s)
    }
}

impl Serialize for Template {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Template::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn output(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    fn render(template: &str, value: Value) -> Result<String, String> {
        Template::parse(template).unwrap().render(&output(value))
    }

    #[test]
    fn parses_placeholders_and_literals() {
        let t = Template::parse("temp.${device}.${ts}").unwrap();
        assert_eq!(t.keys().collect::<Vec<_>>(), ["device", "ts"]);
        assert!(!t.is_literal());
        assert_eq!(t.as_str(), "temp.${device}.${ts}");
        assert_eq!(t.to_string(), "temp.${device}.${ts}");
        assert_eq!(
            t.parts,
            [
                Part::Literal("temp.".into()),
                Part::Key("device".into()),
                Part::Literal(".".into()),
                Part::Key("ts".into()),
            ]
        );

        let t = Template::parse("${a-b_c.D9}${a-b_c.D9}").unwrap();
        assert_eq!(t.keys().collect::<Vec<_>>(), ["a-b_c.D9", "a-b_c.D9"]);
    }

    #[test]
    fn literal_templates() {
        for raw in ["", "alerts", "a.b.#", "héllo wörld"] {
            let t = Template::parse(raw).unwrap();
            assert!(t.is_literal(), "{raw}");
            assert_eq!(t.render(&Map::new()).unwrap(), raw);
        }
    }

    #[test]
    fn dollar_escapes() {
        let t = Template::parse("cost$$${amount}").unwrap();
        assert_eq!(t.keys().collect::<Vec<_>>(), ["amount"]);
        assert_eq!(t.render(&output(json!({"amount": 5}))).unwrap(), "cost$5");
        // "$${x}" is an escaped '$' followed by the literal "{x}".
        let t = Template::parse("$${x}").unwrap();
        assert!(t.is_literal());
        assert_eq!(t.render(&Map::new()).unwrap(), "${x}");
        // A lone '$' is literal, including at the end and before '}'.
        for raw in ["$", "a$b", "price: 5$", "$}", "$ {x}"] {
            let t = Template::parse(raw).unwrap();
            assert!(t.is_literal(), "{raw}");
            assert_eq!(t.render(&Map::new()).unwrap(), raw);
        }
        assert_eq!(
            Template::parse("$$$$")
                .unwrap()
                .render(&Map::new())
                .unwrap(),
            "$$"
        );
    }

    #[test]
    fn parse_errors_say_what_and_where() {
        let err = Template::parse("temp.${device").unwrap_err();
        assert!(err.contains("unterminated"), "{err}");
        assert!(err.contains("byte 5"), "{err}");

        let err = Template::parse("ab${").unwrap_err();
        assert!(
            err.contains("unterminated") && err.contains("byte 2"),
            "{err}"
        );

        let err = Template::parse("x${}").unwrap_err();
        assert!(err.contains("empty") && err.contains("byte 1"), "{err}");

        let err = Template::parse("${dev ice}").unwrap_err();
        assert!(err.contains("invalid character ' '"), "{err}");
        assert!(err.contains("byte 5"), "{err}");

        let err = Template::parse("é${dévice}").unwrap_err();
        assert!(err.contains("'é'") && err.contains("byte 5"), "{err}");

        let err = Template::parse("${a${b}}").unwrap_err();
        assert!(
            err.contains("unterminated") && err.contains("byte 0"),
            "{err}"
        );
    }

    #[test]
    fn renders_json_types() {
        let out = json!({
            "device": "dev-1",
            "temp": 38.5,
            "count": 3,
            "neg": -7,
            "ok": true,
            "tags": ["a", 1],
            "obj": {"k": "v", "n": null},
            "quote": "say \"hi\"",
        });
        assert_eq!(render("temp.${device}", out.clone()).unwrap(), "temp.dev-1");
        assert_eq!(render("${temp}", out.clone()).unwrap(), "38.5");
        assert_eq!(render("${count}/${neg}", out.clone()).unwrap(), "3/-7");
        assert_eq!(render("${ok}", out.clone()).unwrap(), "true");
        assert_eq!(render("${tags}", out.clone()).unwrap(), r#"["a",1]"#);
        assert_eq!(
            render("${obj}", out.clone()).unwrap(),
            r#"{"k":"v","n":null}"#
        );
        assert_eq!(render("${quote}", out).unwrap(), r#"say "hi""#);
    }

    #[test]
    fn missing_and_null_keys_are_errors() {
        let out = json!({"device": null, "other": 1});
        assert_eq!(
            render("temp.${device}", out.clone()).unwrap_err(),
            "${device} is null"
        );
        assert_eq!(
            render("temp.${missing}", out).unwrap_err(),
            "${missing} is not in the rule's output"
        );
    }

    #[test]
    fn dotted_keys() {
        let out = json!({
            "items.temperature.value": 40,
            "items": {"temperature": {"value": 41, "unit": null}},
            "flat": 1,
        });
        // A key spelled exactly as an output key wins over the nested path.
        assert_eq!(
            render("${items.temperature.value}", out.clone()).unwrap(),
            "40"
        );
        let out = output(out);
        let mut nested = out.clone();
        nested.remove("items.temperature.value");
        let t = Template::parse("${items.temperature.value}").unwrap();
        assert_eq!(t.render(&nested).unwrap(), "41");
        let t = Template::parse("${items.temperature.unit}").unwrap();
        assert_eq!(
            t.render(&nested).unwrap_err(),
            "${items.temperature.unit} is null"
        );
        for missing in [
            "${items.humidity}",
            "${flat.x}",
            "${items.temperature.value.x}",
        ] {
            let err = Template::parse(missing)
                .unwrap()
                .render(&nested)
                .unwrap_err();
            assert!(err.ends_with("is not in the rule's output"), "{err}");
        }
    }

    #[test]
    fn serde_round_trip() {
        #[derive(Debug, Deserialize, Serialize)]
        struct Action {
            routing_key: Template,
        }
        let action: Action = toml::from_str("routing_key = \"temp.${device}\"").unwrap();
        assert_eq!(action.routing_key.keys().collect::<Vec<_>>(), ["device"]);
        assert_eq!(
            toml::to_string(&action).unwrap().trim(),
            "routing_key = \"temp.${device}\""
        );
        let json = serde_json::to_string(&action.routing_key).unwrap();
        assert_eq!(json, r#""temp.${device}""#);
        let back: Template = serde_json::from_str(&json).unwrap();
        assert_eq!(back, action.routing_key);

        let err = toml::from_str::<Action>("routing_key = \"temp.${device\"").unwrap_err();
        assert!(err.message().contains("unterminated"), "{err}");
        assert!(err.span().is_some());
        assert!(serde_json::from_str::<Template>(r#""${}""#).is_err());
        assert!(serde_json::from_str::<Template>("5").is_err());
    }

    #[test]
    fn from_str_matches_parse() {
        let t: Template = "a.${b}".parse().unwrap();
        assert_eq!(t, Template::parse("a.${b}").unwrap());
    }

    /// What a template without placeholders renders to: `$$` is one `$`, any other `$` is
    /// itself.
    fn unescaped(raw: &str) -> String {
        let mut out = String::new();
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$' && chars.peek() == Some(&'$') {
                chars.next();
            }
            out.push(c);
        }
        out
    }

    /// A template must parse or say at which byte it is wrong; a parsed one gives its text
    /// back, its keys are well-formed and written in it, and it renders against any output or
    /// says which key is missing or null; without placeholders it renders its unescaped text.
    fn check(raw: &str, output: &Map<String, Value>) -> Result<&'static str, String> {
        let template = match Template::parse(raw) {
            Ok(t) => t,
            Err(why) if why.contains("at byte") => return Ok("refused"),
            Err(why) => return Err(format!("refused without a position: {why}")),
        };
        if template.as_str() != raw || template.to_string() != raw {
            return Err(format!("gives back {:?}", template.as_str()));
        }
        for key in template.keys() {
            if key.is_empty()
                || !key.chars().all(is_key_char)
                || !raw.contains(&format!("${{{key}}}"))
            {
                return Err(format!("key {key:?}"));
            }
        }
        match template.render(output) {
            Ok(text) if template.is_literal() && text != unescaped(raw) => {
                Err(format!("a literal template rendered {text:?}"))
            }
            Ok(_) => Ok("rendered"),
            Err(why) if why.contains("${") => Ok("not-rendered"),
            Err(why) => Err(format!("render failed without naming the key: {why}")),
        }
    }

    /// Robustness: mutations of routing keys and topics with `${…}` placeholders, and any text,
    /// parsed and rendered against outputs of any JSON (docs/security.md, "Robustness").
    #[test]
    fn robustness_templates() {
        use crate::robustness;
        use proptest::prelude::*;
        let seeds = [
            "temp.${device}",
            "${a}.${b.c}/${items.t.value}",
            "$$x$-${a-b_c.d}$",
            "/out/${d}/${items.t}",
            "plant-${device}",
            "",
        ]
        .map(str::to_owned)
        .to_vec();
        let vocabulary = [
            "$", "${", "}", "{", "$$", "a", "b.c", ".", "-", "é", "\0", " ", "${a}",
        ];
        let raw = prop_oneof![
            4 => robustness::mutated_text(seeds, &vocabulary),
            1 => robustness::text(),
        ];
        let key = prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("b.c".to_owned()),
            Just("device".to_owned()),
            Just("items".to_owned()),
            Just("d".to_owned()),
            "[a-z.]{1,4}",
        ];
        let output = prop::collection::vec((key, robustness::json()), 0..6)
            .prop_map(|kv| kv.into_iter().collect::<Map<String, Value>>());
        let seen = robustness::Seen::default();
        robustness::run("templates", 2000, (raw, output), |(raw, output)| {
            seen.outcome(check(&raw, &output))
        });
        seen.print("templates");
    }
}
