//! Text for terminals: wrapping (keeping `code spans` whole) and escaping control characters.
//! Used by the code catalog's renderers and by `iotfwd logs`.

use textwrap::core::Word;
use textwrap::{Options, WordSeparator, WordSplitter};

/// Splits a line into words at spaces, except inside backtick code spans, which stay one word
/// (an unclosed span runs to the end of the line).
fn words_keeping_code_spans(line: &str) -> Box<dyn Iterator<Item = Word<'_>> + '_> {
    let mut words = Vec::new();
    let mut start = None;
    let mut in_code_span = false;
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'`' {
            in_code_span = !in_code_span;
        }
        let at_space = b == b' ' && !in_code_span;
        match (start, at_space) {
            (None, false) => start = Some(i),
            (Some(s), true) => {
                // The word with its trailing spaces (textwrap keeps them apart).
                let mut end = i;
                while end < bytes.len() && bytes[end] == b' ' {
                    end += 1;
                }
                words.push(Word::from(&line[s..end]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push(Word::from(&line[s..]));
    }
    Box::new(words.into_iter())
}

/// The words [`wrap_into`] never breaks: split at spaces, code spans whole.
pub fn unbreakable_words(line: &str) -> Vec<&str> {
    words_keeping_code_spans(line).map(|w| w.word).collect()
}

/// Appends `text` word-wrapped to `width` columns, each line starting with `indent`. A
/// `code span` is never broken across lines, and a word (or span) longer than a line gets a
/// line of its own rather than being split. Every line ends with `\n`; empty text adds nothing.
pub fn wrap_into(out: &mut String, text: &str, indent: &str, width: usize) {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        return;
    }
    let options = Options::new(width)
        .initial_indent(indent)
        .subsequent_indent(indent)
        .break_words(false)
        .word_splitter(WordSplitter::NoHyphenation)
        .word_separator(WordSeparator::Custom(words_keeping_code_spans));
    for line in textwrap::wrap(&text, options) {
        out.push_str(&line);
        out.push('\n');
    }
}

/// Control characters as escapes (`\n`, `\t`, `\r`, `\u{1b}`), so one record stays one line.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters, with `…` when cut.
pub fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_keeps_words_and_width() {
        let mut out = String::new();
        wrap_into(&mut out, "aaa bbb ccc ddd", "  ", 9);
        assert_eq!(out, "  aaa bbb\n  ccc ddd\n");
        let mut out = String::new();
        wrap_into(&mut out, "x averyveryverylongword y", "  ", 9);
        assert_eq!(out, "  x\n  averyveryverylongword\n  y\n");
        let mut out = String::new();
        wrap_into(&mut out, "run `a b c d` now", "", 8);
        assert_eq!(out, "run\n`a b c d`\nnow\n");
        let mut out = String::new();
        wrap_into(&mut out, "x `unclosed span", "", 3);
        assert_eq!(out, "x\n`unclosed span\n");
    }

    #[test]
    fn controls_are_escaped_and_cuts_are_marked() {
        assert_eq!(escape_controls("a\nb\tc\r\u{1b}"), "a\\nb\\tc\\r\\u{1b}");
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
    }
}
