//! What each rule did over the last hour: messages matched, passed, without result, failed by
//! code, and each action's outcomes by code. Shown by `GET /api/v1/rules` and the console's
//! rules page.
//!
//! The rules' counters ([`Metrics`]: `iotfwd_rule_*_total`, `iotfwd_action_*_total`) count
//! since the process started. A sample of them is kept once a minute for an hour; the last
//! hour is the counters now minus the sample of an hour ago. The record store cannot say this:
//! a rule whose WHERE is false writes no record, so "matched" exists only as a counter.
//! Until the daemon has run an hour (or when no sample is old enough), the baseline is the
//! start, where every counter was 0, and the answer says so in `since`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use prometheus::core::Collector;
use serde::Serialize;

use crate::telemetry::Metrics;

/// The window the counts cover.
pub const WINDOW_MS: i64 = 3_600_000;

/// How often a sample is kept.
pub const SAMPLE_EVERY_MS: i64 = 60_000;

/// One rule's counters (or their change over the window).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleCounts {
    /// Messages whose topic matched the rule's FROM (the rule ran on them).
    pub matched: u64,
    /// Matched messages for which WHERE held: an output was produced.
    pub passed: u64,
    /// Matched messages for which WHERE was false or NULL.
    pub no_result: u64,
    /// Matched messages the rule failed on, by code (9307, 9320, 9399).
    pub failed: BTreeMap<u16, u64>,
    /// Each action (by destination): its terminal outcomes by code (200 = delivered).
    pub actions: BTreeMap<String, BTreeMap<u16, u64>>,
}

impl RuleCounts {
    /// `self - earlier`, never below 0 (a counter never goes down within a process).
    fn minus(&self, earlier: &RuleCounts) -> RuleCounts {
        let sub = |a: &BTreeMap<u16, u64>, b: Option<&BTreeMap<u16, u64>>| {
            a.iter()
                .map(|(k, v)| {
                    let before = b.and_then(|b| b.get(k)).copied().unwrap_or(0);
                    (*k, v.saturating_sub(before))
                })
                .filter(|(_, v)| *v > 0)
                .collect::<BTreeMap<u16, u64>>()
        };
        RuleCounts {
            matched: self.matched.saturating_sub(earlier.matched),
            passed: self.passed.saturating_sub(earlier.passed),
            no_result: self.no_result.saturating_sub(earlier.no_result),
            failed: sub(&self.failed, Some(&earlier.failed)),
            actions: self
                .actions
                .iter()
                .map(|(dest, codes)| (dest.clone(), sub(codes, earlier.actions.get(dest))))
                .filter(|(_, codes)| !codes.is_empty())
                .collect(),
        }
    }
}

struct Sample {
    at_ms: i64,
    counts: HashMap<String, RuleCounts>,
}

/// The samples of the last hour. One per daemon, in the API's state.
pub struct RuleWindow {
    started_ms: i64,
    samples: Mutex<VecDeque<Sample>>,
}

impl Default for RuleWindow {
    fn default() -> Self {
        RuleWindow::new(crate::message::now_ms())
    }
}

impl RuleWindow {
    /// A window for a process whose counters were all 0 at `started_ms`.
    pub fn new(started_ms: i64) -> RuleWindow {
        RuleWindow {
            started_ms,
            samples: Mutex::new(VecDeque::new()),
        }
    }

    /// Keeps a sample of the counters as of `now_ms` when the newest one is a minute old.
    pub fn sample(&self, metrics: &Metrics, now_ms: i64) {
        self.sample_counts(read(metrics), now_ms);
    }

    fn sample_counts(&self, counts: HashMap<String, RuleCounts>, now_ms: i64) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples
            .back()
            .is_some_and(|s| now_ms - s.at_ms < SAMPLE_EVERY_MS)
        {
            return;
        }
        samples.push_back(Sample {
            at_ms: now_ms,
            counts,
        });
        // Keep the newest sample that is at least an hour old (the baseline), and the later
        // ones.
        while samples.len() >= 2 && samples[1].at_ms <= now_ms - WINDOW_MS {
            samples.pop_front();
        }
    }

    /// Each rule's counts over the last hour, and since when they count (an hour ago, or the
    /// start when the daemon has not kept a sample that old).
    pub fn last_hour(&self, metrics: &Metrics, now_ms: i64) -> (i64, HashMap<String, RuleCounts>) {
        let now = read(metrics);
        self.sample_counts(now.clone(), now_ms);
        self.since(now, now_ms)
    }

    fn since(
        &self,
        now: HashMap<String, RuleCounts>,
        now_ms: i64,
    ) -> (i64, HashMap<String, RuleCounts>) {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let baseline = samples.iter().rev().find(|s| s.at_ms <= now_ms - WINDOW_MS);
        match baseline {
            None => (self.started_ms, now),
            Some(base) => {
                let empty = RuleCounts::default();
                let counts = now
                    .into_iter()
                    .map(|(rule, c)| {
                        let diff = c.minus(base.counts.get(&rule).unwrap_or(&empty));
                        (rule, diff)
                    })
                    .collect();
                (base.at_ms, counts)
            }
        }
    }
}

/// The rules' counters now, by rule. Read through `collect`, so no series is created for a
/// rule that never ran.
fn read(metrics: &Metrics) -> HashMap<String, RuleCounts> {
    let mut out: HashMap<String, RuleCounts> = HashMap::new();
    let each = |collector: &dyn Collector, f: &mut dyn FnMut(&HashMap<&str, &str>, u64)| {
        for family in collector.collect() {
            for m in family.get_metric() {
                let labels: HashMap<&str, &str> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                f(&labels, m.get_counter().get_value() as u64);
            }
        }
    };
    let code = |labels: &HashMap<&str, &str>| {
        labels
            .get("code")
            .and_then(|c| c.parse::<u16>().ok())
            .unwrap_or(0)
    };
    each(&metrics.rule_matched, &mut |l, v| {
        out.entry(l["rule"].to_owned()).or_default().matched = v;
    });
    each(&metrics.rule_passed, &mut |l, v| {
        out.entry(l["rule"].to_owned()).or_default().passed = v;
    });
    each(&metrics.rule_no_result, &mut |l, v| {
        out.entry(l["rule"].to_owned()).or_default().no_result = v;
    });
    each(&metrics.rule_failed, &mut |l, v| {
        *out.entry(l["rule"].to_owned())
            .or_default()
            .failed
            .entry(code(l))
            .or_default() += v;
    });
    each(&metrics.action_success, &mut |l, v| {
        *out.entry(l["rule"].to_owned())
            .or_default()
            .actions
            .entry(l["action"].to_owned())
            .or_default()
            .entry(200)
            .or_default() += v;
    });
    each(&metrics.action_failed, &mut |l, v| {
        *out.entry(l["rule"].to_owned())
            .or_default()
            .actions
            .entry(l["action"].to_owned())
            .or_default()
            .entry(code(l))
            .or_default() += v;
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(matched: u64, failed: u64) -> HashMap<String, RuleCounts> {
        let mut c = RuleCounts {
            matched,
            passed: matched - failed,
            ..RuleCounts::default()
        };
        if failed > 0 {
            c.failed.insert(9320, failed);
        }
        HashMap::from([("r".to_owned(), c)])
    }

    #[test]
    fn the_last_hour_is_now_minus_the_sample_of_an_hour_ago() {
        let w = RuleWindow::new(0);
        let t = 10 * WINDOW_MS;
        // Before a sample an hour old exists, the counts are since the start.
        w.sample_counts(counts(5, 1), t);
        let (since, c) = w.since(counts(7, 1), t + 1000);
        assert_eq!((since, c["r"].matched), (0, 7));
        // Samples every minute for an hour and a bit.
        for i in 1..=62 {
            w.sample_counts(counts(5 + i, 1), t + i as i64 * SAMPLE_EVERY_MS);
        }
        let now = t + 62 * SAMPLE_EVERY_MS;
        let (since, c) = w.since(counts(100, 3), now);
        assert_eq!(since, t + 2 * SAMPLE_EVERY_MS);
        assert_eq!(c["r"].matched, 100 - 7);
        assert_eq!(c["r"].failed[&9320], 2);
        // Old samples are dropped: one baseline and the hour after it.
        assert!(w.samples.lock().unwrap().len() <= 62);
        // Samples closer than a minute apart are not kept.
        let before = w.samples.lock().unwrap().len();
        w.sample_counts(counts(101, 3), now + 10);
        assert_eq!(w.samples.lock().unwrap().len(), before);
    }

    #[test]
    fn reads_the_rule_and_action_counters() {
        let m = Metrics::new();
        m.rule_matched.with_label_values(&["r"]).inc_by(3);
        m.rule_passed.with_label_values(&["r"]).inc_by(2);
        m.rule_failed.with_label_values(&["r", "9320"]).inc();
        m.action_success
            .with_label_values(&["r", "amqp:alerts"])
            .inc_by(2);
        m.action_failed
            .with_label_values(&["r", "amqp:alerts", "9325"])
            .inc();
        let c = &read(&m)["r"];
        assert_eq!((c.matched, c.passed, c.no_result), (3, 2, 0));
        assert_eq!(c.failed[&9320], 1);
        assert_eq!(
            c.actions["amqp:alerts"],
            BTreeMap::from([(200, 2), (9325, 1)])
        );
    }
}
