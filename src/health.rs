//! Health: what `GET /api/v1/health` reports.
//!
//! - **Destinations**, keyed by the action's destination name ([`crate::rules::ActionSpec::destination`],
//!   e.g. `amqp:alerts`, `group:demo`): the dispatcher reports every terminal action outcome
//!   ([`Health::observe`]). Each keeps its last success time, its last error (code, reason, time)
//!   and a state:
//!   - `healthy`: the last outcome was a delivery;
//!   - `unhealthy`: the last outcome failed with a code that may pass (9325 unreachable, 9331
//!     refused), for less than [`DEAD_AFTER_MS`] without a success in between;
//!   - `dead`: the last outcome failed with a code that will not pass by retrying (9332
//!     misconfigured, 9333 credentials, 9325 "not hosted"), or it has been failing for more than
//!     [`DEAD_AFTER_MS`].
//!
//!   Codes about one message rather than the destination (9321 a parameter, 9324 / 9326 a quota)
//!   do not change a destination's state.
//! - **Rules**: how many are loaded, every rule file that does not load (with its 9307 and the
//!   time), and the last reload ([`crate::reload`] keeps these up to date).
//! - **Consumer groups**: reported by whoever hosts them, through [`Health::set_groups`].
//!
//! The overall `status` is `ok` when everything is healthy and `degraded` otherwise: a
//! destination not `healthy`, a rule file not loaded, the broker (when configured) not
//! connected, or a consumer group whose `state` is not `healthy`.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use serde::Serialize;
use serde_json::{Value, json};

use crate::broker::BrokerError;
use crate::outcome::Code;
use crate::outcome::query::format_time_ms;

/// A destination failing this long without a success in between is `dead`.
pub const DEAD_AFTER_MS: i64 = 60_000;

/// The state of a destination or consumer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Healthy,
    Unhealthy,
    Dead,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Unhealthy => "unhealthy",
            State::Dead => "dead",
        }
    }
}

/// An error with its time, as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LastError {
    pub code: Code,
    pub reason: String,
    #[serde(rename = "time", serialize_with = "ser_time")]
    pub time_ms: i64,
}

/// The recent outcomes of one destination (or anything else with the same states, such as a
/// consumer group), and the state they add up to. Public so that other hosts of destinations
/// report the same way.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    last_success_ms: Option<i64>,
    last_error: Option<LastError>,
    /// The first failure since the last success; `None` while the last outcome is a success.
    failing_since_ms: Option<i64>,
    /// The last outcome failed with a code retrying will not fix.
    last_final: bool,
}

/// A tracker's state as `GET /api/v1/health` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackerReport {
    pub state: State,
    #[serde(serialize_with = "ser_opt_time")]
    pub last_success: Option<i64>,
    pub last_error: Option<LastError>,
    #[serde(serialize_with = "ser_opt_time")]
    pub failing_since: Option<i64>,
}

impl Tracker {
    pub fn success(&mut self, now_ms: i64) {
        self.last_success_ms = Some(now_ms);
        self.failing_since_ms = None;
        self.last_final = false;
    }

    /// A failure; `retryable` when the same delivery may pass later (the destination is
    /// unreachable or refused it for now), not when it never will (misconfigured, credentials).
    pub fn failure(&mut self, code: Code, reason: &str, retryable: bool, now_ms: i64) {
        self.last_error = Some(LastError {
            code,
            reason: reason.to_owned(),
            time_ms: now_ms,
        });
        self.failing_since_ms.get_or_insert(now_ms);
        self.last_final = !retryable;
    }

    pub fn state(&self, now_ms: i64) -> State {
        match self.failing_since_ms {
            None => State::Healthy,
            Some(_) if self.last_final => State::Dead,
            Some(since) if now_ms - since > DEAD_AFTER_MS => State::Dead,
            Some(_) => State::Unhealthy,
        }
    }

    pub fn report(&self, now_ms: i64) -> TrackerReport {
        TrackerReport {
            state: self.state(now_ms),
            last_success: self.last_success_ms,
            last_error: self.last_error.clone(),
            failing_since: self.failing_since_ms,
        }
    }
}

/// A rule file that did not load (its previous version, if any, keeps running).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleFileFailure {
    pub file: String,
    /// The rule's name (the file's stem); empty when the stem is not a valid name.
    pub rule: String,
    pub code: Code,
    pub reason: String,
    #[serde(rename = "time", serialize_with = "ser_time")]
    pub time_ms: i64,
    /// Whether an earlier version of this rule keeps running in its place.
    pub previous_running: bool,
}

/// The last load of the rules directory.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastReload {
    #[serde(rename = "time", serialize_with = "ser_time")]
    pub time_ms: i64,
    /// `startup`, `watch` (a change in the directory), `SIGHUP` or `api`.
    pub cause: &'static str,
    /// `success` when every rule file (and the config file, when re-read) loaded, else
    /// `failure`.
    pub result: &'static str,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Every rule file that does not load after this reload, by rule name (file name when the
    /// stem is not a valid name).
    pub failed: Vec<String>,
    pub unchanged: usize,
    /// Rules running after this reload.
    pub loaded: usize,
    /// What the reload did with the config file, when the daemon runs with `--config` (not at
    /// start-up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigReload>,
}

/// A reload's pass over the config file: the quotas apply at once; other changed sections are
/// listed and wait for a restart.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigReload {
    pub file: String,
    /// `success`, or `failure` when the file does not load (the running config stays).
    pub result: &'static str,
    /// Every problem of the file, with its line and column.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Whether `[[tenant]]`, `[[instance]]` or `[quota]` changed (and were applied).
    pub quotas_changed: bool,
    /// Top-level sections that differ from what runs; they apply at the next restart.
    pub restart_needed: Vec<String>,
    /// Consumer groups whose secret (re-read from its `secret_env` or `secret_file`) changed.
    pub secrets_rotated: Vec<String>,
}

/// What consumer groups report: a JSON array, one object per group, each with a `state` key
/// (`healthy`, `unhealthy`, `dead`) and whatever else the host wants to show (the
/// [`TrackerReport`] fields, connections, backlog, ...). See [`Health::set_groups`].
pub type GroupsProbe = Box<dyn Fn() -> Value + Send + Sync>;

#[derive(Default)]
struct RulesHealth {
    loaded: usize,
    failed: Vec<RuleFileFailure>,
    last_reload: Option<LastReload>,
    /// The last pass over the config file (reloads by a directory change make none).
    config: Option<ConfigReload>,
}

/// The registry behind `GET /api/v1/health`. One per daemon; cheap to update from the data path.
#[derive(Default)]
pub struct Health {
    destinations: Mutex<HashMap<String, Tracker>>,
    rules: Mutex<RulesHealth>,
    groups: RwLock<Option<GroupsProbe>>,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    /// Reports a terminal action outcome for `destination`.
    pub fn observe(&self, destination: &str, result: &Result<(), BrokerError>) {
        self.observe_at(destination, result, crate::message::now_ms());
    }

    pub fn observe_at(&self, destination: &str, result: &Result<(), BrokerError>, now_ms: i64) {
        if let Err(e) = result
            && matches!(
                e.code,
                Code::ParamInvalid | Code::Throttled | Code::InstanceSpecExceeded
            )
        {
            // About this message (its parameters, its quota), not about the destination.
            return;
        }
        let mut destinations = self.destinations.lock().expect("health lock poisoned");
        let tracker = match destinations.get_mut(destination) {
            Some(t) => t,
            None => destinations.entry(destination.to_owned()).or_default(),
        };
        match result {
            Ok(()) => tracker.success(now_ms),
            Err(e) => tracker.failure(e.code, &e.reason, e.retryable, now_ms),
        }
    }

    /// The state of one destination, if it has had an outcome.
    pub fn destination(&self, destination: &str) -> Option<TrackerReport> {
        let now = crate::message::now_ms();
        self.destinations
            .lock()
            .expect("health lock poisoned")
            .get(destination)
            .map(|t| t.report(now))
    }

    /// Replaces the rules part: rules running, files that do not load, the last reload.
    pub fn set_rules(&self, loaded: usize, failed: Vec<RuleFileFailure>, last: LastReload) {
        let mut rules = self.rules.lock().expect("health lock poisoned");
        rules.loaded = loaded;
        rules.failed = failed;
        if let Some(config) = &last.config {
            rules.config = Some(config.clone());
        }
        rules.last_reload = Some(last);
    }

    /// The last pass of a reload over the config file, if there was one.
    pub fn config_reload(&self) -> Option<ConfigReload> {
        self.rules
            .lock()
            .expect("health lock poisoned")
            .config
            .clone()
    }

    /// The rule files that do not load.
    pub fn failed_rules(&self) -> Vec<RuleFileFailure> {
        self.rules
            .lock()
            .expect("health lock poisoned")
            .failed
            .clone()
    }

    /// Where consumer groups plug in: `probe` is called on every `GET /api/v1/health` and its
    /// JSON array becomes the report's `groups`. A group whose `state` is not `healthy` makes the
    /// status `degraded`. Without a probe, `groups` is `[]`.
    pub fn set_groups(&self, probe: GroupsProbe) {
        *self.groups.write().expect("health lock poisoned") = Some(probe);
    }

    /// The whole report. `broker` is `None` without `[broker]`, else whether it is connected.
    pub fn report(&self, broker: Option<bool>) -> Value {
        self.report_at(broker, crate::message::now_ms())
    }

    pub fn report_at(&self, broker: Option<bool>, now_ms: i64) -> Value {
        let mut degraded = broker == Some(false);
        let mut destinations: Vec<(String, TrackerReport)> = self
            .destinations
            .lock()
            .expect("health lock poisoned")
            .iter()
            .map(|(name, t)| (name.clone(), t.report(now_ms)))
            .collect();
        destinations.sort_by(|a, b| a.0.cmp(&b.0));
        degraded |= destinations.iter().any(|(_, r)| r.state != State::Healthy);
        let destinations: Vec<Value> = destinations
            .into_iter()
            .map(|(name, report)| {
                let mut v = json!({ "destination": name });
                if let (Value::Object(o), Ok(Value::Object(r))) =
                    (&mut v, serde_json::to_value(report))
                {
                    o.extend(r);
                }
                v
            })
            .collect();
        let (rules, last_reload, config) = {
            let rules = self.rules.lock().expect("health lock poisoned");
            degraded |= !rules.failed.is_empty();
            degraded |= rules.config.as_ref().is_some_and(|c| c.result != "success");
            (
                json!({ "loaded": rules.loaded, "failed": rules.failed }),
                serde_json::to_value(&rules.last_reload).unwrap_or(Value::Null),
                serde_json::to_value(&rules.config).unwrap_or(Value::Null),
            )
        };
        let groups = match &*self.groups.read().expect("health lock poisoned") {
            Some(probe) => probe(),
            None => Value::Array(Vec::new()),
        };
        if let Value::Array(groups) = &groups {
            degraded |= groups.iter().any(|g| {
                g.get("state")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s != State::Healthy.as_str())
            });
        }
        json!({
            "status": if degraded { "degraded" } else { "ok" },
            "broker": match broker {
                None => json!({ "configured": false }),
                Some(connected) => json!({ "configured": true, "connected": connected }),
            },
            "destinations": destinations,
            "rules": rules,
            "lastReload": last_reload,
            "config": config,
            "groups": groups,
        })
    }
}

fn ser_time<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time_ms(*ms))
}

fn ser_opt_time<S: serde::Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format_time_ms(*ms)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: Code, retryable: bool) -> Result<(), BrokerError> {
        Err(BrokerError {
            code,
            reason: format!("failed with {code}"),
            retryable,
        })
    }

    #[test]
    fn states_follow_the_outcomes() {
        let h = Health::new();
        let t0 = 1_000_000;
        h.observe_at("amqp:a", &Ok(()), t0);
        let state = |now| {
            h.report_at(None, now)["destinations"][0]["state"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(state(t0), "healthy");
        // Transient failures: unhealthy, until they have lasted more than a minute.
        h.observe_at("amqp:a", &err(Code::DestinationUnavailable, true), t0 + 10);
        h.observe_at(
            "amqp:a",
            &err(Code::DestinationUnavailable, true),
            t0 + 30_000,
        );
        assert_eq!(state(t0 + 30_000), "unhealthy");
        assert_eq!(state(t0 + 10 + DEAD_AFTER_MS), "unhealthy");
        assert_eq!(state(t0 + 11 + DEAD_AFTER_MS), "dead");
        let r = h.report_at(None, t0 + 30_000);
        let d = &r["destinations"][0];
        assert_eq!(d["destination"], "amqp:a");
        assert_eq!(d["lastError"]["code"], 9325);
        assert_eq!(d["lastError"]["time"], format_time_ms(t0 + 30_000));
        assert_eq!(d["lastSuccess"], format_time_ms(t0));
        assert_eq!(d["failingSince"], format_time_ms(t0 + 10));
        assert_eq!(r["status"], "degraded");
        // A success heals it; the last error stays visible.
        h.observe_at("amqp:a", &Ok(()), t0 + 40_000);
        assert_eq!(state(t0 + 200_000), "healthy");
        let r = h.report_at(None, t0 + 40_000);
        assert_eq!(r["destinations"][0]["lastError"]["code"], 9325);
        assert_eq!(r["destinations"][0]["failingSince"], Value::Null);
        assert_eq!(r["status"], "ok");
        // A failure retrying cannot fix is dead at once.
        h.observe_at(
            "amqp:a",
            &err(Code::DestinationMisconfigured, false),
            t0 + 50_000,
        );
        assert_eq!(state(t0 + 50_000), "dead");
    }

    #[test]
    fn per_message_codes_do_not_touch_the_destination() {
        let h = Health::new();
        h.observe_at("amqp:a", &Ok(()), 1);
        for code in [
            Code::ParamInvalid,
            Code::Throttled,
            Code::InstanceSpecExceeded,
        ] {
            h.observe_at("amqp:a", &err(code, false), 2);
            h.observe_at("amqp:b", &err(code, false), 2);
        }
        let r = h.report_at(None, 3);
        assert_eq!(r["destinations"].as_array().unwrap().len(), 1, "{r}");
        assert_eq!(r["destinations"][0]["state"], "healthy");
    }

    #[test]
    fn status_counts_broker_rules_and_groups() {
        let h = Health::new();
        assert_eq!(h.report_at(None, 0)["status"], "ok");
        assert_eq!(h.report_at(None, 0)["groups"], json!([]));
        assert_eq!(h.report_at(Some(true), 0)["status"], "ok");
        assert_eq!(h.report_at(Some(false), 0)["status"], "degraded");
        assert_eq!(
            h.report_at(Some(false), 0)["broker"],
            json!({"configured": true, "connected": false})
        );
        h.set_groups(Box::new(|| json!([{"group": "g", "state": "unhealthy"}])));
        let r = h.report_at(None, 0);
        assert_eq!(
            (r["status"].as_str(), r["groups"][0]["group"].as_str()),
            (Some("degraded"), Some("g"))
        );
        h.set_groups(Box::new(|| json!([{"group": "g", "state": "healthy"}])));
        assert_eq!(h.report_at(None, 0)["status"], "ok");
        let failure = RuleFileFailure {
            file: "rules/a.toml".into(),
            rule: "a".into(),
            code: Code::SqlError,
            reason: "SQL: bad".into(),
            time_ms: 0,
            previous_running: true,
        };
        let last = LastReload {
            time_ms: 0,
            cause: "watch",
            result: "failure",
            added: vec![],
            changed: vec![],
            removed: vec![],
            failed: vec!["a".into()],
            unchanged: 1,
            loaded: 2,
            config: None,
        };
        h.set_rules(2, vec![failure], last);
        let r = h.report_at(None, 0);
        assert_eq!(r["status"], "degraded");
        assert_eq!(r["rules"]["loaded"], 2);
        assert_eq!(r["rules"]["failed"][0]["code"], 9307);
        assert_eq!(r["rules"]["failed"][0]["file"], "rules/a.toml");
        assert_eq!(r["lastReload"]["result"], "failure");
        assert_eq!(r["lastReload"]["cause"], "watch");
    }
}
