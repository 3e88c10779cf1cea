//! The state of each destination, from the terminal outcomes of its actions: what
//! `GET /api/v1/health` shows under `destinations` (see docs/operations.md "Health").
//!
//! - `healthy`: the last outcome was a delivery;
//! - `unhealthy`: the last outcome failed with a code that may pass (9325 unreachable, 9331
//!   refused), for less than [`DEAD_AFTER_MS`] without a success in between;
//! - `dead`: the last outcome failed with a code that will not pass by retrying (9332
//!   misconfigured, 9333 credentials, 9325 "not hosted"), or it has been failing for more than
//!   [`DEAD_AFTER_MS`].
//!
//! A failure whose code is about the one message rather than the destination (the catalog's
//! [`Scope::Message`]: 9321 a parameter, 9324 / 9326 a quota) does not change a destination's
//! state.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::message::now_ms;
use crate::outcome::{Code, Failure, Scope, ser_opt_time_ms, ser_time_ms};

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
    #[serde(rename = "time", serialize_with = "ser_time_ms")]
    pub time_ms: i64,
}

/// The recent outcomes of one destination, and the state they add up to.
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
    #[serde(serialize_with = "ser_opt_time_ms")]
    pub last_success: Option<i64>,
    pub last_error: Option<LastError>,
    #[serde(serialize_with = "ser_opt_time_ms")]
    pub failing_since: Option<i64>,
}

impl Tracker {
    pub fn success(&mut self, now_ms: i64) {
        self.last_success_ms = Some(now_ms);
        self.failing_since_ms = None;
        self.last_final = false;
    }

    /// A failure; retryable when the same delivery may pass later (the destination is
    /// unreachable or refused it for now), not when it never will (misconfigured, credentials).
    pub fn failure(&mut self, failure: &Failure, now_ms: i64) {
        self.last_error = Some(LastError {
            code: failure.code(),
            reason: failure.reason().to_owned(),
            time_ms: now_ms,
        });
        self.failing_since_ms.get_or_insert(now_ms);
        self.last_final = !failure.retryable();
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

/// Every destination's tracker, keyed by destination name (`amqp:alerts`, `group:demo`). One
/// per daemon, fed by the dispatcher with every terminal action outcome.
#[derive(Default)]
pub struct Destinations {
    trackers: Mutex<HashMap<String, Tracker>>,
}

impl Destinations {
    /// Reports a terminal action outcome for `destination`.
    pub fn observe(&self, destination: &str, result: &Result<(), Failure>) {
        self.observe_at(destination, result, now_ms());
    }

    pub fn observe_at(&self, destination: &str, result: &Result<(), Failure>, now_ms: i64) {
        if let Err(f) = result
            && f.code().scope() == Scope::Message
        {
            return;
        }
        let mut trackers = self.trackers.lock().unwrap_or_else(|p| p.into_inner());
        let tracker = match trackers.get_mut(destination) {
            Some(t) => t,
            None => trackers.entry(destination.to_owned()).or_default(),
        };
        match result {
            Ok(()) => tracker.success(now_ms),
            Err(f) => tracker.failure(f, now_ms),
        }
    }

    /// The state of one destination, if it has had an outcome.
    pub fn get(&self, destination: &str) -> Option<TrackerReport> {
        let now = now_ms();
        self.trackers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(destination)
            .map(|t| t.report(now))
    }

    /// Every destination with its report, by name.
    pub fn reports(&self, now_ms: i64) -> Vec<(String, TrackerReport)> {
        let mut out: Vec<_> = self
            .trackers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, t)| (name.clone(), t.report(now_ms)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
