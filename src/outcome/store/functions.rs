//! The SQL function the store registers on every reader connection: `iotfwd_contains`, the
//! keyword filter of log queries.
//!
//! A function of its own, rather than SQLite's `instr()` or `LIKE`: the keyword is a literal,
//! case-sensitive substring with no wildcard or escape rules, and one vectorised search (memchr's
//! memmem) per row over three columns is what keeps a keyword scan of the whole store within
//! seconds (see [`crate::outcome::query`]).
//!
//! Payloads are stored as the JSON text the device sent, so a keyword the device sent inside a
//! JSON string (`say "hi"`, a line break) is there in its escaped form (`say \"hi\"`, `\n`).
//! A record matches when a column holds the keyword as typed or, for a keyword with characters
//! JSON escapes, as it is written inside a JSON string.

use rusqlite::Connection;

/// Registers `iotfwd_contains(needle, haystack...)`: true when any haystack contains the needle
/// as a literal byte substring (UTF-8 text in, so the same as a character substring), or the
/// needle as JSON writes it inside a string. NULL and non-text haystacks never match. The
/// needle's searchers are built once per statement.
pub fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    use rusqlite::types::ValueRef;
    conn.create_scalar_function(
        "iotfwd_contains",
        -1,
        FunctionFlags::SQLITE_UTF8
            | FunctionFlags::SQLITE_DETERMINISTIC
            | FunctionFlags::SQLITE_INNOCUOUS,
        |ctx| {
            if ctx.len() < 2 {
                return Err(rusqlite::Error::UserFunctionError(
                    "iotfwd_contains(needle, haystack, ...) needs a needle and a haystack".into(),
                ));
            }
            let finders = ctx.get_or_create_aux(0, |needle| match needle {
                ValueRef::Text(t) | ValueRef::Blob(t) => Ok::<_, rusqlite::Error>(finders(t)),
                _ => Err(rusqlite::Error::UserFunctionError(
                    "iotfwd_contains: the needle must be text".into(),
                )),
            })?;
            for i in 1..ctx.len() {
                if let ValueRef::Text(haystack) = ctx.get_raw(i)
                    && finders.iter().any(|f| f.find(haystack).is_some())
                {
                    return Ok(true);
                }
            }
            Ok(false)
        },
    )
}

/// A searcher for `needle`, and one for its JSON-escaped form when that differs.
fn finders(needle: &[u8]) -> Vec<memchr::memmem::Finder<'static>> {
    let mut out = vec![memchr::memmem::Finder::new(needle).into_owned()];
    if let Ok(text) = std::str::from_utf8(needle)
        && let Some(escaped) = crate::outcome::query::json_escaped(text)
    {
        out.push(memchr::memmem::Finder::new(escaped.as_bytes()).into_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_is_a_literal_substring_test() {
        let conn = Connection::open_in_memory().unwrap();
        register_functions(&conn).unwrap();
        let contains = |needle: &str, hay: &[Option<&str>]| -> bool {
            let sql = format!(
                "SELECT iotfwd_contains(?1{})",
                (0..hay.len())
                    .map(|i| format!(", ?{}", i + 2))
                    .collect::<String>()
            );
            let mut values: Vec<rusqlite::types::Value> = vec![needle.to_owned().into()];
            values.extend(hay.iter().map(|h| match h {
                Some(s) => rusqlite::types::Value::Text((*s).to_owned()),
                None => rusqlite::types::Value::Null,
            }));
            conn.query_row(&sql, rusqlite::params_from_iter(values), |r| r.get(0))
                .unwrap()
        };
        assert!(contains("b", &[Some("abc")]));
        assert!(contains("x%y", &[None, Some("ax%yb")]));
        assert!(!contains("x%y", &[Some("xzy"), None]));
        assert!(!contains("_", &[Some("abc")]));
        assert!(contains("\n\t", &[Some(""), Some("a\n\tb")]));
        assert!(!contains("ABC", &[Some("abc")]), "case-sensitive");
        assert!(contains("é", &[Some("café")]));
        assert!(contains("", &[Some("abc")]));
        assert!(!contains("a", &[None]));
        // As the device sent it, inside a JSON string of its payload.
        assert!(contains("say \"hi\"", &[Some(r#"{"msg":"say \"hi\""}"#)]));
        assert!(contains("a\nb", &[Some(r#"{"m":"a\nb"}"#)]));
        assert!(contains("C:\\x", &[Some(r#"{"p":"C:\\x"}"#)]));
        assert!(!contains("say \"ho\"", &[Some(r#"{"msg":"say \"hi\""}"#)]));
    }
}
