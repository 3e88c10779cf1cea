//! Topic filters (the FROM clause of a rule), the index that maps a message's topic to
//! the rules whose filters match it, and the helpers that read a platform topic.
//!
//! Level numbering everywhere in this module (error texts, [`topic_level`]) is 1-based
//! and does not count the empty level before the leading '/', so it agrees with the
//! `topic(n)` function that rule authors write: in `/pk/dn/user/update`, level 1 is
//! `pk` and level 4 is `update`.

use std::collections::HashMap;
use std::fmt;

/// Most levels a topic filter may have, not counting the empty one before the leading '/'.
const MAX_FILTER_LEVELS: usize = 32;

/// One level of a parsed filter.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Literal(Box<str>),
    /// `+`: exactly one level.
    Single,
    /// `#`: zero or more levels; always the last level of a valid filter.
    Multi,
}

/// A validated topic filter from a rule's FROM clause.
///
/// Filters always start with '/', so a topic that does not start with '/' matches no
/// filter. Otherwise MQTT semantics apply: `+` matches exactly one level (which may be
/// empty) and `#` matches the remaining levels, including none at all, so `/pk/#`
/// matches `/pk` as well as `/pk/dn/user/update`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicFilter {
    raw: Box<str>,
    /// The levels after the leading '/'.
    levels: Box<[Level]>,
}

impl TopicFilter {
    /// Parses and validates a topic filter.
    ///
    /// The filter must be non-empty and start with '/'; '#' may only be a whole level
    /// and only the last one; '+' may only be a whole level; no level may be empty
    /// (so `/a//b` and `/a/b/` are rejected); no NUL; at most 32 levels. The error
    /// text says what is wrong and at which level, e.g.
    /// `'#' must be the last level (level 2 of "/a/#/b")`.
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        if filter.is_empty() {
            return Err("topic filter is empty".to_string());
        }
        let Some(rest) = filter.strip_prefix('/') else {
            return Err(format!("topic filter must start with '/' (got {filter:?})"));
        };
        let count = rest.split('/').count();
        if count > MAX_FILTER_LEVELS {
            return Err(format!(
                "topic filter has {count} levels, at most {MAX_FILTER_LEVELS} are allowed ({filter:?})"
            ));
        }
        let mut levels = Vec::with_capacity(count);
        for (i, text) in rest.split('/').enumerate() {
            let n = i + 1;
            let at = || format!("(level {n} of {filter:?})");
            let level = if text.contains('\0') {
                return Err(format!("topic filter contains a NUL character {}", at()));
            } else if text.is_empty() {
                return Err(format!("empty level {}", at()));
            } else if text == "#" {
                if n != count {
                    return Err(format!("'#' must be the last level {}", at()));
                }
                Level::Multi
            } else if text.contains('#') {
                return Err(format!("'#' must be a whole level {}", at()));
            } else if text == "+" {
                Level::Single
            } else if text.contains('+') {
                return Err(format!("'+' must be a whole level {}", at()));
            } else {
                Level::Literal(text.into())
            };
            levels.push(level);
        }
        Ok(TopicFilter {
            raw: filter.into(),
            levels: levels.into_boxed_slice(),
        })
    }

    /// The filter as written in the rule.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `topic` matches this filter. Allocation-free.
    pub fn matches(&self, topic: &str) -> bool {
        let Some(rest) = topic.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for level in &self.levels {
            match level {
                Level::Multi => return true,
                Level::Single => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Level::Literal(lit) => {
                    if parts.next() != Some(&**lit) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// Whether the filter contains '+' or '#', i.e. may match more than one topic.
    pub fn has_wildcards(&self) -> bool {
        self.levels.iter().any(|l| !matches!(l, Level::Literal(_)))
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Index from topic filters to values (rule ids): a trie over levels with '+' and '#'
/// branches, so matching a topic costs O(levels) rather than O(filters).
///
/// The index holds a set of (filter, value) pairs: inserting a pair twice keeps one.
#[derive(Clone, Debug)]
pub struct TopicIndex<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Clone, Debug)]
struct Node<T> {
    literal: HashMap<Box<str>, Node<T>, foldhash::fast::RandomState>,
    single: Option<Box<Node<T>>>,
    /// Values of filters ending in '#' right below this node; kept sorted.
    multi: Vec<T>,
    /// Values of filters ending exactly at this node; kept sorted.
    exact: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: HashMap::default(),
            single: None,
            multi: Vec::new(),
            exact: Vec::new(),
        }
    }
}

impl<T: Copy + Ord> Node<T> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.single.is_none()
            && self.multi.is_empty()
            && self.exact.is_empty()
    }

    /// `parts` is a `Split` iterator rather than a slice so that matching never has to
    /// collect the topic's levels; cloning it to try a second branch costs nothing.
    fn collect(&self, mut parts: std::str::Split<'_, char>, out: &mut Vec<T>) {
        // '#' also matches the parent level, so it applies before consuming a level.
        out.extend_from_slice(&self.multi);
        match parts.next() {
            None => out.extend_from_slice(&self.exact),
            Some(part) => {
                if let Some(child) = self.literal.get(part) {
                    child.collect(parts.clone(), out);
                }
                if let Some(child) = &self.single {
                    child.collect(parts, out);
                }
            }
        }
    }

    /// Removes `value` below this node and prunes branches left empty, so that
    /// reloading rules over time does not grow the trie.
    fn remove(&mut self, levels: &[Level], value: T) -> bool {
        match levels.split_first() {
            None => remove_sorted(&mut self.exact, value),
            Some((Level::Multi, _)) => remove_sorted(&mut self.multi, value),
            Some((Level::Single, rest)) => {
                let Some(child) = self.single.as_deref_mut() else {
                    return false;
                };
                let removed = child.remove(rest, value);
                if child.is_empty() {
                    self.single = None;
                }
                removed
            }
            Some((Level::Literal(lit), rest)) => {
                let Some(child) = self.literal.get_mut(&**lit) else {
                    return false;
                };
                let removed = child.remove(rest, value);
                if child.is_empty() {
                    self.literal.remove(&**lit);
                }
                removed
            }
        }
    }
}

fn insert_sorted<T: Ord>(values: &mut Vec<T>, value: T) -> bool {
    match values.binary_search(&value) {
        Ok(_) => false,
        Err(pos) => {
            values.insert(pos, value);
            true
        }
    }
}

fn remove_sorted<T: Ord>(values: &mut Vec<T>, value: T) -> bool {
    match values.binary_search(&value) {
        Ok(pos) => {
            values.remove(pos);
            true
        }
        Err(_) => false,
    }
}

impl<T: Copy + Ord> TopicIndex<T> {
    /// An empty index.
    pub fn new() -> Self {
        TopicIndex {
            root: Node::default(),
            len: 0,
        }
    }

    /// Adds `value` under `filter`. Adding a pair that is already present does nothing.
    pub fn insert(&mut self, filter: &TopicFilter, value: T) {
        let mut node = &mut self.root;
        for level in &filter.levels {
            node = match level {
                Level::Literal(lit) => node.literal.entry(lit.clone()).or_default(),
                Level::Single => node.single.get_or_insert_with(Default::default),
                Level::Multi => {
                    if insert_sorted(&mut node.multi, value) {
                        self.len += 1;
                    }
                    return;
                }
            };
        }
        if insert_sorted(&mut node.exact, value) {
            self.len += 1;
        }
    }

    /// Removes `value` from under `filter`; returns whether it was there.
    pub fn remove(&mut self, filter: &TopicFilter, value: T) -> bool {
        let removed = self.root.remove(&filter.levels, value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Number of (filter, value) pairs in the index.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index holds no pairs.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Clears `out`, then pushes every value whose filter matches `topic`, sorted
    /// ascending and deduplicated. Allocates only if `out` has to grow.
    pub fn matches_into(&self, topic: &str, out: &mut Vec<T>) {
        out.clear();
        // Filters all start with '/', see `TopicFilter::matches`.
        let Some(rest) = topic.strip_prefix('/') else {
            return;
        };
        self.root.collect(rest.split('/'), out);
        out.sort_unstable();
        out.dedup();
    }
}

impl<T: Copy + Ord> Default for TopicIndex<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// `topic(n)`: the n-th level of `topic`, 1-based, not counting the empty level before
/// the leading '/'. `None` when `n` is past the end.
///
/// `n == 0` is the caller's error to report (9307); here it only trips a debug
/// assertion and otherwise yields `None`.
pub fn topic_level(topic: &str, n: usize) -> Option<&str> {
    debug_assert!(n >= 1, "topic levels are 1-based");
    let index = n.checked_sub(1)?;
    topic
        .strip_prefix('/')
        .unwrap_or(topic)
        .split('/')
        .nth(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn literal_filters_match_exactly() {
        let f = filter("/pk/dn/user/update");
        assert!(!f.has_wildcards());
        assert!(f.matches("/pk/dn/user/update"));
        assert!(!f.matches("/pk/dn/user"));
        assert!(!f.matches("/pk/dn/user/update/x"));
        assert!(!f.matches("/pk/dn/user/update/"));
        assert!(!f.matches("pk/dn/user/update"));
        assert!(!f.matches(""));
    }

    #[test]
    fn plus_matches_exactly_one_level_at_any_depth() {
        let f = filter("/+/dn/user/update");
        assert!(f.has_wildcards());
        assert!(f.matches("/pk/dn/user/update"));
        assert!(!f.matches("/dn/user/update"));

        let f = filter("/pk/+/thing/event/+/post");
        assert!(f.matches("/pk/d1/thing/event/property/post"));
        assert!(f.matches("/pk/d2/thing/event/alarm/post"));
        assert!(!f.matches("/pk/d1/thing/event/post"));
        assert!(!f.matches("/pk/d1/thing/event/a/b/post"));

        let f = filter("/pk/dn/+");
        assert!(f.matches("/pk/dn/x"));
        assert!(f.matches("/pk/dn/"), "'+' matches an empty level");
        assert!(!f.matches("/pk/dn"));
        assert!(!f.matches("/pk/dn/x/y"));
    }

    #[test]
    fn hash_matches_the_rest_including_the_parent() {
        let f = filter("/pk/#");
        assert!(f.matches("/pk"));
        assert!(f.matches("/pk/dn"));
        assert!(f.matches("/pk/dn/thing/event/property/post"));
        assert!(!f.matches("/other/dn"));
        assert!(!f.matches("/pkx"));

        let f = filter("/#");
        assert!(f.matches("/"));
        assert!(f.matches("/a/b/c"));
        assert!(!f.matches("a/b"));

        let f = filter("/+/+/user/#");
        assert!(f.matches("/pk/dn/user"));
        assert!(f.matches("/pk/dn/user/update"));
        assert!(f.matches("/pk/dn/user/a/b/c"));
        assert!(!f.matches("/pk/dn"));
        assert!(!f.matches("/pk/dn/thing/update"));
    }

    #[test]
    fn display_and_as_str_give_the_filter_back() {
        let f = filter("/pk/+/user/#");
        assert_eq!(f.as_str(), "/pk/+/user/#");
        assert_eq!(f.to_string(), "/pk/+/user/#");
    }

    #[test]
    fn parse_errors_say_what_and_where() {
        let cases = [
            ("", "topic filter is empty"),
            ("a/b", "topic filter must start with '/' (got \"a/b\")"),
            (
                "/a/#/b",
                "'#' must be the last level (level 2 of \"/a/#/b\")",
            ),
            ("/a/b#", "'#' must be a whole level (level 2 of \"/a/b#\")"),
            ("/a+/b", "'+' must be a whole level (level 1 of \"/a+/b\")"),
            ("/a//b", "empty level (level 2 of \"/a//b\")"),
            ("/a/b/", "empty level (level 3 of \"/a/b/\")"),
            ("/", "empty level (level 1 of \"/\")"),
            (
                "/a/b\0c",
                "topic filter contains a NUL character (level 2 of \"/a/b\\0c\")",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(TopicFilter::parse(input).unwrap_err(), want, "{input:?}");
        }

        let ok = "/x".repeat(MAX_FILTER_LEVELS);
        assert!(TopicFilter::parse(&ok).is_ok());
        let too_deep = "/x".repeat(MAX_FILTER_LEVELS + 1);
        let err = TopicFilter::parse(&too_deep).unwrap_err();
        assert!(
            err.starts_with("topic filter has 33 levels, at most 32 are allowed"),
            "{err}"
        );
    }

    /// Deterministic filters over a small alphabet, with and without a trailing '#'.
    fn generated_filters() -> Vec<String> {
        let alphabet = ["a", "b", "+"];
        let mut out = vec!["/#".to_string()];
        let mut prefixes = vec![String::new()];
        for depth in 1..=3 {
            let mut next = Vec::new();
            for p in &prefixes {
                for l in alphabet {
                    next.push(format!("{p}/{l}"));
                }
            }
            out.extend(next.iter().cloned());
            if depth < 3 {
                out.extend(next.iter().map(|p| format!("{p}/#")));
            }
            prefixes = next;
        }
        out
    }

    /// All topics of a few depths over small alphabets, plus odd shapes.
    fn generated_topics() -> Vec<String> {
        fn all(alphabet: &[&str], depth: usize) -> Vec<String> {
            let mut topics = vec![String::new()];
            for _ in 0..depth {
                topics = topics
                    .iter()
                    .flat_map(|t| alphabet.iter().map(move |l| format!("{t}/{l}")))
                    .collect();
            }
            topics
        }
        let mut out = Vec::new();
        for depth in 1..=3 {
            out.extend(all(&["a", "b", "c", ""], depth));
        }
        out.extend(all(&["a", "b", "c"], 4));
        out.extend(all(&["a", "b"], 5));
        out.extend(["", "a", "a/b", "//", "+", "/#"].map(String::from));
        out
    }

    /// The value of the i-th generated filter; several filters share a value so that
    /// deduplication is exercised.
    fn value_of(i: usize) -> u32 {
        (i % 37) as u32
    }

    fn brute_force(filters: &[(TopicFilter, u32)], topic: &str) -> Vec<u32> {
        let mut want: Vec<u32> = filters
            .iter()
            .filter(|(f, _)| f.matches(topic))
            .map(|&(_, v)| v)
            .collect();
        want.sort_unstable();
        want.dedup();
        want
    }

    #[test]
    fn index_agrees_with_brute_force_then_after_removals() {
        let filters: Vec<(TopicFilter, u32)> = generated_filters()
            .iter()
            .enumerate()
            .map(|(i, s)| (filter(s), value_of(i)))
            .collect();
        let topics = generated_topics();
        assert!(filters.len() >= 50, "{}", filters.len());
        assert!(topics.len() >= 200, "{}", topics.len());

        let mut index = TopicIndex::new();
        for (f, v) in &filters {
            index.insert(f, *v);
        }
        // Inserting again must not change anything.
        for (f, v) in &filters {
            index.insert(f, *v);
        }
        assert_eq!(index.len(), filters.len());

        let mut got = vec![999];
        let mut nonempty = 0;
        for topic in &topics {
            index.matches_into(topic, &mut got);
            assert_eq!(got, brute_force(&filters, topic), "topic {topic:?}");
            nonempty += usize::from(!got.is_empty());
        }
        assert!(
            nonempty > topics.len() / 2,
            "the test data exercises matching"
        );

        // Remove every other pair, and check against what remains.
        let (gone, kept): (Vec<_>, Vec<_>) = filters
            .iter()
            .cloned()
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        let kept: Vec<_> = kept.into_iter().map(|(_, p)| p).collect();
        for (_, (f, v)) in &gone {
            assert!(index.remove(f, *v), "remove {f} -> {v}");
            assert!(!index.remove(f, *v), "second remove {f} -> {v}");
        }
        assert_eq!(index.len(), kept.len());
        for topic in &topics {
            index.matches_into(topic, &mut got);
            assert_eq!(got, brute_force(&kept, topic), "topic {topic:?}");
        }

        for (f, v) in &kept {
            assert!(index.remove(f, *v));
        }
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "emptied branches are pruned");
    }

    #[test]
    fn remove_only_removes_the_given_pair() {
        let plus = filter("/pk/+/user/update");
        let lit = filter("/pk/dn/user/update");
        let hash = filter("/pk/#");
        let mut index = TopicIndex::default();
        index.insert(&plus, 1);
        index.insert(&lit, 2);
        index.insert(&hash, 3);
        index.insert(&hash, 4);
        assert_eq!(index.len(), 4);

        let mut out = Vec::new();
        index.matches_into("/pk/dn/user/update", &mut out);
        assert_eq!(out, [1, 2, 3, 4]);

        assert!(!index.remove(&lit, 1), "value under another filter");
        assert!(
            !index.remove(&filter("/pk/dn/user"), 2),
            "prefix of a filter"
        );
        assert!(!index.remove(&filter("/zz/#"), 3), "unknown branch");
        assert!(index.remove(&hash, 3));
        assert_eq!(index.len(), 3);

        index.matches_into("/pk/dn/user/update", &mut out);
        assert_eq!(out, [1, 2, 4]);
        index.matches_into("/pk", &mut out);
        assert_eq!(out, [4]);
        index.matches_into("no-slash", &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn topic_level_is_one_based_after_the_leading_slash() {
        let t = "/pk/dn/user/update";
        assert_eq!(topic_level(t, 1), Some("pk"));
        assert_eq!(topic_level(t, 2), Some("dn"));
        assert_eq!(topic_level(t, 3), Some("user"));
        assert_eq!(topic_level(t, 4), Some("update"));
        assert_eq!(topic_level(t, 5), None);
        assert_eq!(topic_level(t, usize::MAX), None);
    }

    /// MQTT matching written the plain way, to compare the filter and the index with.
    fn reference_match(filter: &str, topic: &str) -> bool {
        let (Some(f), Some(t)) = (filter.strip_prefix('/'), topic.strip_prefix('/')) else {
            return false;
        };
        let (f, t): (Vec<&str>, Vec<&str>) = (f.split('/').collect(), t.split('/').collect());
        for (i, level) in f.iter().enumerate() {
            if *level == "#" {
                return true;
            }
            if i >= t.len() || (*level != "+" && *level != t[i]) {
                return false;
            }
        }
        f.len() == t.len()
    }

    /// Filters parse or say what is wrong; those that parse give their text back and match
    /// exactly the topics the plain reference matches, alone and through the index, which is
    /// empty again once they are removed. Platform topics parse to two non-empty levels.
    fn check(
        filters: &[String],
        topics: &[String],
        seen: &crate::robustness::Seen,
    ) -> Result<(), String> {
        let mut parsed = Vec::new();
        for (i, raw) in filters.iter().enumerate() {
            match TopicFilter::parse(raw) {
                Ok(f) if f.as_str() == raw => {
                    seen.count("filter-parsed");
                    parsed.push((f, i as u32 % 5));
                }
                Ok(f) => return Err(format!("{raw:?} gives back {:?}", f.as_str())),
                Err(why) if why.trim().is_empty() => {
                    return Err(format!("{raw:?} refused without a reason"));
                }
                Err(_) => seen.count("filter-refused"),
            }
        }
        let mut index = TopicIndex::new();
        for (f, v) in &parsed {
            index.insert(f, *v);
        }
        let mut out = Vec::new();
        for topic in topics {
            for (f, _) in &parsed {
                if f.matches(topic) != reference_match(f.as_str(), topic) {
                    return Err(format!(
                        "{:?} on {topic:?}: matches() disagrees",
                        f.as_str()
                    ));
                }
            }
            index.matches_into(topic, &mut out);
            if out != brute_force(&parsed, topic) {
                return Err(format!("{topic:?}: the index gives {out:?}"));
            }
            match crate::message::parse_platform_topic(topic) {
                Ok((pk, dn)) => {
                    if pk.is_empty()
                        || dn.is_empty()
                        || topic.len() > crate::message::MAX_TOPIC_BYTES
                    {
                        return Err(format!("{topic:?} accepted as ({pk:?}, {dn:?})"));
                    }
                    seen.count("platform-topic");
                }
                Err(why) if why.trim().is_empty() => {
                    return Err(format!("{topic:?} refused without a reason"));
                }
                Err(_) => {}
            }
            for n in 1..10 {
                let _ = topic_level(topic, n);
            }
        }
        for (f, v) in &parsed {
            index.remove(f, *v);
        }
        if !index.is_empty() {
            return Err(format!("{} pairs left after removing all", index.len()));
        }
        Ok(())
    }

    /// Robustness: topic filters and topics of every shape (wildcards anywhere, empty and
    /// long levels, NUL, no leading slash, any text) (docs/security.md, "Robustness").
    #[test]
    fn robustness_topic_filters() {
        use crate::robustness;
        use proptest::prelude::*;
        let some = |n| prop::collection::vec(robustness::topic(), 1..n);
        let seen = robustness::Seen::default();
        robustness::run(
            "topic-filters",
            2000,
            (some(8), some(8)),
            |(filters, topics)| check(&filters, &topics, &seen),
        );
        seen.print("topic-filters");
    }
}
