//! The config's one error reporter: every problem at once, each at its file, line and column
//! and under the dotted key path it concerns.
//!
//! An operator should fix a config in one edit–check round, not one round per mistake, and
//! find each mistake without searching: so every section's checks report into one
//! [`Reporter`], which collects all problems and places each at the value the file spells
//! out (`iotfwd.toml:12:21: instance[0].products[1]: ...`). A problem about a value the file
//! does not write (a default) is placed at the nearest enclosing key the file writes, if any.
//!
//! Syntax, type and unknown-key errors come from the TOML deserializer, which stops at the
//! first; [`ConfigError::from_toml`] recovers the key path from its position so even those
//! name the key.

use std::fmt::{self, Display, Write as _};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem found in a config file: where (file, and line/column when known) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in, when the config came from a file.
    pub file: Option<PathBuf>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub column: Option<usize>,
    /// What is wrong, starting with the dotted key path when one applies
    /// (`"engine.batch_max_messages: must be ..."`).
    pub message: String,
}

impl ConfigError {
    fn at(
        file: Option<&Path>,
        text: Option<&str>,
        span: Option<Range<usize>>,
        message: String,
    ) -> Self {
        let (line, column) = match (text, span) {
            (Some(text), Some(span)) => {
                let (line, column) = line_col(text, span.start);
                (Some(line), Some(column))
            }
            _ => (None, None),
        };
        ConfigError {
            file: file.map(Path::to_path_buf),
            line,
            column,
            message,
        }
    }

    /// The deserializer's error for `text`, placed, and prefixed with the key path it is about.
    pub(super) fn from_toml(err: &toml::de::Error, text: &str, file: Option<&Path>) -> Self {
        let span = err.span();
        // toml's message does not say which key it is about; recover the path from the span
        // so "invalid type: string" becomes actionable.
        let path = span.as_ref().and_then(|span| {
            let doc = DeTable::parse(text).ok()?;
            let path = key_path_at(doc.get_ref(), span.start);
            (!path.is_empty()).then(|| path.join("."))
        });
        let message = match path {
            Some(path) => format!("{path}: {}", err.message().trim_end()),
            None => err.message().trim_end().to_owned(),
        };
        ConfigError::at(file, Some(text), span, message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}", file.display())?,
            None => f.write_str("config")?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// 1-based (line, column) of a byte offset in text.
///
/// The column counts characters, not bytes, so it matches what editors show. An offset
/// past the end is clamped to the end; one inside a multi-byte character points at it.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |pos| pos + 1);
    let column = text[line_start..]
        .char_indices()
        .take_while(|(i, _)| line_start + i < offset)
        .count()
        + 1;
    (line, column)
}

/// One step of a key path: a table key or an array index.
#[derive(Clone, Copy, Debug)]
pub(super) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// `tenant[1].forward_tps`, `quota.device.products.pk1.burst` (keys that are not bare TOML
/// keys are quoted).
fn render_path(path: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(key);
                } else {
                    let _ = write!(out, "{key:?}");
                }
            }
        }
    }
    out
}

/// Span of the value at a path, through tables and arrays, if the document spells it out.
fn span_of(doc: &DeTable<'_>, path: &[Seg<'_>]) -> Option<Range<usize>> {
    let (Seg::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut value = doc.get(*first)?;
    for seg in rest {
        value = match (seg, value.get_ref()) {
            (Seg::Key(key), DeValue::Table(table)) => table.get(*key)?,
            (Seg::Index(i), DeValue::Array(array)) => array.get(*i)?,
            _ => return None,
        };
    }
    Some(value.span())
}

/// The deepest key path whose key or value contains `offset`; empty if none does.
fn key_path_at(table: &DeTable<'_>, offset: usize) -> Vec<String> {
    for (key, value) in table.iter() {
        // Children first: a `[section]` table's own span need not cover its body.
        if let DeValue::Table(inner) = value.get_ref() {
            let mut inner_path = key_path_at(inner, offset);
            if !inner_path.is_empty() {
                inner_path.insert(0, key.get_ref().to_string());
                return inner_path;
            }
        }
        // An array of tables (`[[group]]`): the element, as `group[0]`.
        if let DeValue::Array(items) = value.get_ref() {
            for (i, item) in items.iter().enumerate() {
                if let DeValue::Table(inner) = item.get_ref() {
                    let mut inner_path = key_path_at(inner, offset);
                    if !inner_path.is_empty() {
                        inner_path.insert(0, format!("{}[{i}]", key.get_ref()));
                        return inner_path;
                    }
                }
            }
        }
        if key.span().contains(&offset) || value.span().contains(&offset) {
            return vec![key.get_ref().to_string()];
        }
    }
    Vec::new()
}

/// Collects problems, each with its key path and, when the file spells it out, its position.
pub(super) struct Reporter<'a> {
    doc: Option<Spanned<DeTable<'a>>>,
    text: Option<&'a str>,
    file: Option<&'a Path>,
    errors: Vec<ConfigError>,
}

impl<'a> Reporter<'a> {
    /// A reporter for a config read from `text` (which places the problems) in `file` (which
    /// labels them); with neither, problems carry only their key paths.
    pub(super) fn new(text: Option<&'a str>, file: Option<&'a Path>) -> Self {
        Reporter {
            doc: text.and_then(|text| DeTable::parse(text).ok()),
            text,
            file,
            errors: Vec::new(),
        }
    }

    /// Reports `message` under the key path `paths[0]`. The position is that of the first of
    /// `paths` written in the file, else of the nearest written parent of `paths[0]`.
    pub(super) fn report(&mut self, paths: &[&[Seg<'_>]], message: String) {
        let span = self.doc.as_ref().map(Spanned::get_ref).and_then(|doc| {
            paths
                .iter()
                .find_map(|path| span_of(doc, path))
                .or_else(|| {
                    (1..paths[0].len())
                        .rev()
                        .find_map(|n| span_of(doc, &paths[0][..n]))
                })
        });
        let path = render_path(paths[0]);
        self.errors.push(ConfigError::at(
            self.file,
            self.text,
            span,
            format!("{path}: {message}"),
        ));
    }

    /// Reports `value` at `path` unless it is in `range`: `<value> is out of range (expected
    /// <start>..=<end><unit>)`, where `unit` reads on from the range (`" milliseconds"`).
    pub(super) fn in_range<T: PartialOrd + Display>(
        &mut self,
        path: &[Seg<'_>],
        value: T,
        range: RangeInclusive<T>,
        unit: &str,
    ) {
        if !range.contains(&value) {
            let (start, end) = range.into_inner();
            self.report(
                &[path],
                format!("{value} is out of range (expected {start}..={end}{unit})"),
            );
        }
    }

    /// Reports `must not be empty` at `path` if `empty`.
    pub(super) fn if_empty(&mut self, path: &[Seg<'_>], empty: bool) {
        if empty {
            self.report(&[path], "must not be empty".to_owned());
        }
    }

    /// Reports `must be at least 1` at `path` when `value` is 0.
    pub(super) fn at_least_one(&mut self, path: &[Seg<'_>], value: usize) {
        if value == 0 {
            self.report(&[path], "must be at least 1".to_owned());
        }
    }

    /// Every problem reported, in the order reported.
    pub(super) fn into_errors(self) -> Vec<ConfigError> {
        self.errors
    }
}

/// The messages `check` reports on its own, without a file: for a section's unit tests.
#[cfg(test)]
pub(super) fn messages(check: impl FnOnce(&mut Reporter<'_>)) -> Vec<String> {
    let mut r = Reporter::new(None, None);
    check(&mut r);
    r.into_errors().into_iter().map(|e| e.message).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_forms() {
        let mut err = ConfigError {
            file: None,
            line: None,
            column: None,
            message: "x: bad".to_owned(),
        };
        assert_eq!(err.to_string(), "config: x: bad");
        err.line = Some(3);
        assert_eq!(err.to_string(), "config:3: x: bad");
        err.column = Some(7);
        err.file = Some(PathBuf::from("a.toml"));
        assert_eq!(err.to_string(), "a.toml:3:7: x: bad");
    }

    #[test]
    fn line_col_positions() {
        let text = "ab\ncd\n\né = 1";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 1), (1, 2));
        assert_eq!(line_col(text, 2), (1, 3));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 6), (3, 1));
        assert_eq!(line_col(text, 7), (4, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_col(text, 9), (4, 2));
        assert_eq!(line_col(text, 8), (4, 2));
        assert_eq!(line_col(text, 1000), (4, 6));
        assert_eq!(line_col("", 0), (1, 1));
    }

    #[test]
    fn paths_quote_keys_that_are_not_bare() {
        assert_eq!(
            render_path(&[
                Seg::Key("quota"),
                Seg::Key("device"),
                Seg::Key("products"),
                Seg::Key("a.b"),
                Seg::Key("burst"),
            ]),
            "quota.device.products.\"a.b\".burst"
        );
        assert_eq!(
            render_path(&[Seg::Key("tenant"), Seg::Index(3), Seg::Key("id")]),
            "tenant[3].id"
        );
    }
}
