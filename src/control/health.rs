//! Health: what `GET /api/v1/health` reports.
//!
//! - **Destinations**, keyed by the action's destination name (`amqp:alerts`, `group:demo`):
//!   their states come from [`crate::action::destinations`], which the dispatcher feeds with
//!   every terminal action outcome.
//! - **Rules**: how many are loaded, every rule file that does not load (with its 9307 and the
//!   time), and the last reload ([`super::reload`] keeps these up to date).
//! - **Consumer groups**: reported by whoever hosts them, through [`Health::set_groups`].
//! - **MQTT**: the `[source.mqtt]` connection, through [`Health::set_mqtt`].
//! - **Quotas**: where the buckets live, and with `[quota] backend = "redis"` whether Redis
//!   answered the last call, through [`Health::set_quotas`].
//! - **Store**: the record store's backend (`sqlite`, `postgres`) and whether its database
//!   answered the writer's last call, through [`Health::set_store`].
//!
//! The overall `status` is `ok` when everything is healthy and `degraded` otherwise: a
//! destination not `healthy`, a rule file not loaded, the broker (when configured) not
//! connected, the MQTT broker (when configured) not connected, the shared quota backend (when
//! configured) not answering, or a consumer group whose `state` is not `healthy`.

use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use serde_json::{Value, json};

use crate::action::destinations::{Destinations, State};
use crate::outcome::{Code, ser_time_ms};

/// A rule file that did not load (its previous version, if any, keeps running).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleFileFailure {
    pub file: String,
    /// The rule's name (the file's stem); empty when the stem is not a valid name.
    pub rule: String,
    pub code: Code,
    pub reason: String,
    #[serde(rename = "time", serialize_with = "ser_time_ms")]
    pub time_ms: i64,
    /// Whether an earlier version of this rule keeps running in its place.
    pub previous_running: bool,
}

/// The last load of the rules directory.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastReload {
    #[serde(rename = "time", serialize_with = "ser_time_ms")]
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

/// The broker connection as health reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerState {
    pub connected: bool,
    /// Why the broker blocks publishers (connection.blocked), while it does.
    pub blocked: Option<String>,
    /// Why the last connection attempt failed, while not connected (a TLS handshake, a
    /// refused login, the broker down).
    pub last_error: Option<String>,
}

impl From<bool> for BrokerState {
    fn from(connected: bool) -> BrokerState {
        BrokerState {
            connected,
            blocked: None,
            last_error: None,
        }
    }
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
    destinations: Arc<Destinations>,
    rules: Mutex<RulesHealth>,
    groups: RwLock<Option<GroupsProbe>>,
    mqtt: RwLock<Option<Arc<crate::source::mqtt::MqttLink>>>,
    quotas: RwLock<Option<crate::limits::Limiter>>,
    store: RwLock<Option<Arc<crate::outcome::store::BackendState>>>,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    /// The destinations' states, fed by the dispatcher (see [`crate::action::destinations`]).
    pub fn destinations(&self) -> &Arc<Destinations> {
        &self.destinations
    }

    /// Replaces the rules part: rules running, files that do not load, the last reload.
    pub fn set_rules(&self, loaded: usize, failed: Vec<RuleFileFailure>, last: LastReload) {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
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
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone()
    }

    /// The rule files that do not load.
    pub fn failed_rules(&self) -> Vec<RuleFileFailure> {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed
            .clone()
    }

    /// Where consumer groups plug in: `probe` is called on every `GET /api/v1/health` and its
    /// JSON array becomes the report's `groups`. A group whose `state` is not `healthy` makes the
    /// status `degraded`. Without a probe, `groups` is `[]`.
    pub fn set_groups(&self, probe: GroupsProbe) {
        *self.groups.write().unwrap_or_else(|p| p.into_inner()) = Some(probe);
    }

    /// The MQTT connection of `[source.mqtt]`: the report's `mqtt` shows it, and a
    /// disconnected one makes the status `degraded`. Without it, `mqtt` is
    /// `{"configured": false}`.
    pub fn set_mqtt(&self, link: Arc<crate::source::mqtt::MqttLink>) {
        *self.mqtt.write().unwrap_or_else(|p| p.into_inner()) = Some(link);
    }

    /// The quota limiter: the report's `quotas` says where its buckets live; a shared backend
    /// (Redis) that did not answer its last call makes the status `degraded`.
    pub fn set_quotas(&self, limiter: crate::limits::Limiter) {
        *self.quotas.write().unwrap_or_else(|p| p.into_inner()) = Some(limiter);
    }

    /// The record store: the report's `store` shows its backend and whether its database
    /// answers; a PostgreSQL store that does not makes the status `degraded`.
    pub fn set_store(&self, state: Arc<crate::outcome::store::BackendState>) {
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    /// The whole report. `broker` is `None` without `[broker]`, else whether it is connected.
    pub fn report(&self, broker: Option<BrokerState>) -> Value {
        self.report_at(broker, crate::message::now_ms())
    }

    pub fn report_at(&self, broker: Option<BrokerState>, now_ms: i64) -> Value {
        let mut degraded = broker
            .as_ref()
            .is_some_and(|b| !b.connected || b.blocked.is_some());
        let destinations = self.destinations.reports(now_ms);
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
            let rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
            degraded |= !rules.failed.is_empty();
            degraded |= rules.config.as_ref().is_some_and(|c| c.result != "success");
            (
                json!({ "loaded": rules.loaded, "failed": rules.failed }),
                serde_json::to_value(&rules.last_reload).unwrap_or(Value::Null),
                serde_json::to_value(&rules.config).unwrap_or(Value::Null),
            )
        };
        let groups = match &*self.groups.read().unwrap_or_else(|p| p.into_inner()) {
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
        let mqtt = match &*self.mqtt.read().unwrap_or_else(|p| p.into_inner()) {
            None => json!({ "configured": false }),
            Some(link) => {
                degraded |= !link.connected();
                let mut v = json!({ "configured": true, "connected": link.connected() });
                if let Some(e) = link.last_error() {
                    v["lastError"] = Value::String(e);
                }
                v
            }
        };
        let quotas = match &*self.quotas.read().unwrap_or_else(|p| p.into_inner()) {
            Some(limiter) => match limiter.backend() {
                Some((url, up)) => {
                    degraded |= !up;
                    json!({ "enabled": limiter.is_enabled(), "backend": "redis", "url": url, "up": up })
                }
                None => json!({ "enabled": limiter.is_enabled(), "backend": "local" }),
            },
            None => json!({ "enabled": false, "backend": "local" }),
        };
        let store = match &*self.store.read().unwrap_or_else(|p| p.into_inner()) {
            None => json!({ "enabled": false }),
            Some(state) => {
                let up = state.up();
                degraded |= !up;
                let mut v = json!({
                    "enabled": true,
                    "backend": state.backend,
                    "location": state.target,
                    "up": up,
                });
                if let Some(e) = state.last_error().filter(|_| !up) {
                    v["lastError"] = Value::String(e);
                }
                v
            }
        };
        json!({
            "status": if degraded { "degraded" } else { "ok" },
            "broker": match broker {
                None => json!({ "configured": false }),
                Some(BrokerState { connected, blocked, last_error }) => {
                    let mut v = json!({ "configured": true, "connected": connected });
                    if let Some(reason) = blocked {
                        v["blocked"] = Value::String(reason);
                    }
                    if let Some(e) = last_error.filter(|_| !connected) {
                        v["lastError"] = Value::String(e);
                    }
                    v
                }
            },
            "mqtt": mqtt,
            "quotas": quotas,
            "store": store,
            "destinations": destinations,
            "rules": rules,
            "lastReload": last_reload,
            "config": config,
            "groups": groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::action::destinations::DEAD_AFTER_MS;
    use crate::outcome::{Failure, format_time_ms};

    fn err(code: Code, retryable: bool) -> Result<(), Failure> {
        let reason = format!("failed with {code}");
        Err(match (code, retryable) {
            (Code::DestinationUnavailable, true) => Failure::unreachable(reason),
            (Code::DestinationMisconfigured, false) => Failure::misconfigured(reason),
            (Code::ParamInvalid, false) => Failure::invalid_parameter(reason),
            (Code::Throttled, false) => Failure::throttled(reason),
            (Code::InstanceSpecExceeded, false) => Failure::instance_spec_exceeded(reason),
            other => panic!("no failure constructor for {other:?} in this test"),
        })
    }

    #[test]
    fn states_follow_the_outcomes() {
        let h = Health::new();
        let t0 = 1_000_000;
        h.destinations().observe_at("amqp:a", &Ok(()), t0);
        let state = |now| {
            h.report_at(None, now)["destinations"][0]["state"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(state(t0), "healthy");
        // Transient failures: unhealthy, until they have lasted more than a minute.
        h.destinations()
            .observe_at("amqp:a", &err(Code::DestinationUnavailable, true), t0 + 10);
        h.destinations().observe_at(
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
        h.destinations().observe_at("amqp:a", &Ok(()), t0 + 40_000);
        assert_eq!(state(t0 + 200_000), "healthy");
        let r = h.report_at(None, t0 + 40_000);
        assert_eq!(r["destinations"][0]["lastError"]["code"], 9325);
        assert_eq!(r["destinations"][0]["failingSince"], Value::Null);
        assert_eq!(r["status"], "ok");
        // A failure retrying cannot fix is dead at once.
        h.destinations().observe_at(
            "amqp:a",
            &err(Code::DestinationMisconfigured, false),
            t0 + 50_000,
        );
        assert_eq!(state(t0 + 50_000), "dead");
    }

    #[test]
    fn per_message_codes_do_not_touch_the_destination() {
        let h = Health::new();
        h.destinations().observe_at("amqp:a", &Ok(()), 1);
        for code in [
            Code::ParamInvalid,
            Code::Throttled,
            Code::InstanceSpecExceeded,
        ] {
            h.destinations().observe_at("amqp:a", &err(code, false), 2);
            h.destinations().observe_at("amqp:b", &err(code, false), 2);
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
        assert_eq!(h.report_at(Some(true.into()), 0)["status"], "ok");
        assert_eq!(h.report_at(Some(false.into()), 0)["status"], "degraded");
        assert_eq!(
            h.report_at(Some(false.into()), 0)["broker"],
            json!({"configured": true, "connected": false})
        );
        let blocked = h.report_at(
            Some(BrokerState {
                connected: true,
                blocked: Some("low on memory".into()),
                last_error: Some("an earlier attempt failed".into()),
            }),
            0,
        );
        assert_eq!(blocked["status"], "degraded");
        assert_eq!(blocked["broker"]["blocked"], "low on memory");
        // While connected, an earlier failure is not news.
        assert_eq!(blocked["broker"].get("lastError"), None);
        let down = BrokerState {
            connected: false,
            blocked: None,
            last_error: Some("TLS handshake with h failed".into()),
        };
        assert_eq!(
            h.report_at(Some(down), 0)["broker"]["lastError"],
            "TLS handshake with h failed"
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
