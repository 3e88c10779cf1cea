//! The rule set the engine runs: the enabled rules and their topic index.

use std::sync::Arc;

use super::Rule;
use super::topic::TopicIndex;

/// The enabled rules and their topic index. Immutable: a reload builds a new one and swaps it
/// in between batches, so a message is evaluated under exactly one version.
pub struct RuleSet {
    rules: Vec<Arc<Rule>>,
    index: TopicIndex<usize>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> RuleSet {
        RuleSet::from_shared(rules.into_iter().map(Arc::new).collect())
    }

    /// A rule set of rules that may also be in other versions of the set (a reload keeps the
    /// very same `Arc<Rule>` of every rule whose file did not change). Disabled rules are left
    /// out.
    pub fn from_shared(rules: Vec<Arc<Rule>>) -> RuleSet {
        let rules: Vec<Arc<Rule>> = rules.into_iter().filter(|r| r.enabled).collect();
        let mut index = TopicIndex::new();
        for (i, rule) in rules.iter().enumerate() {
            index.insert(&rule.program.parsed.filter, i);
        }
        RuleSet { rules, index }
    }

    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    /// The rule named `name`, if it is in this set.
    pub fn get(&self, name: &str) -> Option<&Arc<Rule>> {
        self.rules.iter().find(|r| r.name == name)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The indexes (into [`Self::rules`]) of the rules whose topic filter matches `topic`.
    pub fn candidates_into(&self, topic: &str, out: &mut Vec<usize>) {
        self.index.matches_into(topic, out);
    }
}
