//! The AMQP 1.0 endpoint's door: what a socket may take before it has logged in.
//!
//! A socket in its handshake (protocol header, TLS, SASL) holds a pending slot: at most
//! `subscription.max_pending_connections` over all peers and `max_pending_per_ip` from one
//! source IP. Pending slots are separate from the `max_connections` slots of logged-in
//! consumers, so idle or slow sockets can only fill the pending budget. A source IP whose
//! logins failed `max_auth_failures_per_ip` times within [`FAILURE_WINDOW`] has its new
//! sockets closed at once until that minute is over.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::subscription::SubscriptionConfig;

/// The span over which failed logins of one IP are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Source IPs whose failures are tracked at once; beyond it, expired entries are dropped and,
/// if none expired, a new IP's failures are not counted (memory stays bounded).
pub const MAX_TRACKED_IPS: usize = 65_536;

/// Why a socket was closed before its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    PendingFull,
    PendingPerIp,
    AuthRateLimited,
}

impl Refusal {
    /// The `reason` label of `iotfwd_endpoint_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::PendingFull => "pending_full",
            Refusal::PendingPerIp => "pending_per_ip",
            Refusal::AuthRateLimited => "auth_rate_limited",
        }
    }
}

struct Failures {
    since: Instant,
    count: u32,
}

pub struct Gate {
    pending: Arc<Semaphore>,
    max_pending: usize,
    max_per_ip: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_failures: u32,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

/// A pending slot; given back when dropped (the socket logged in, or was closed).
pub struct PendingSlot {
    gate: Arc<Gate>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut per_ip = self
            .gate
            .per_ip
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Gate {
    pub fn new(config: &SubscriptionConfig) -> Arc<Gate> {
        Arc::new(Gate {
            pending: Arc::new(Semaphore::new(config.max_pending_connections)),
            max_pending: config.max_pending_connections,
            max_per_ip: config.max_pending_per_ip,
            per_ip: Mutex::new(HashMap::new()),
            max_failures: config.max_auth_failures_per_ip,
            failures: Mutex::new(HashMap::new()),
        })
    }

    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// A pending slot for a socket from `ip` accepted at `now`, or why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<PendingSlot, Refusal> {
        if self.rate_limited(ip, now) {
            return Err(Refusal::AuthRateLimited);
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        let n = per_ip.get(&ip).copied().unwrap_or(0);
        if n >= self.max_per_ip {
            return Err(Refusal::PendingPerIp);
        }
        let permit = Arc::clone(&self.pending)
            .try_acquire_owned()
            .map_err(|_| Refusal::PendingFull)?;
        per_ip.insert(ip, n + 1);
        Ok(PendingSlot {
            gate: Arc::clone(self),
            ip,
            _permit: permit,
        })
    }

    /// Counts a failed login from `ip`.
    pub fn login_failed(&self, ip: IpAddr, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if failures.len() >= MAX_TRACKED_IPS && !failures.contains_key(&ip) {
            failures.retain(|_, f| now.saturating_duration_since(f.since) < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED_IPS {
                return;
            }
        }
        let f = failures.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
        });
        if now.saturating_duration_since(f.since) >= FAILURE_WINDOW {
            *f = Failures {
                since: now,
                count: 0,
            };
        }
        f.count = f.count.saturating_add(1);
    }

    /// Whether `ip` has failed `max_auth_failures_per_ip` logins in the current minute.
    fn rate_limited(&self, ip: IpAddr, now: Instant) -> bool {
        let failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        failures.get(&ip).is_some_and(|f| {
            now.saturating_duration_since(f.since) < FAILURE_WINDOW && f.count >= self.max_failures
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(pending: usize, per_ip: usize, failures: u32) -> Arc<Gate> {
        Gate::new(&SubscriptionConfig {
            max_pending_connections: pending,
            max_pending_per_ip: per_ip,
            max_auth_failures_per_ip: failures,
            ..SubscriptionConfig::default()
        })
    }

    #[test]
    fn pending_slots_are_bounded_per_ip_and_overall_and_given_back() {
        let g = gate(3, 2, 10);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let now = Instant::now();
        let a1 = g.admit(a, now).unwrap();
        let _a2 = g.admit(a, now).unwrap();
        assert_eq!(g.admit(a, now).err(), Some(Refusal::PendingPerIp));
        let _b1 = g.admit(b, now).unwrap();
        assert_eq!(g.admit(c, now).err(), Some(Refusal::PendingFull));
        drop(a1);
        let _c1 = g.admit(c, now).expect("a freed slot is reusable");
        assert!(g.admit(a, now).is_err(), "c took the freed overall slot");
    }

    #[test]
    fn an_ip_is_refused_after_its_failures_until_the_minute_is_over() {
        let g = gate(10, 10, 3);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(g.admit(ip, t0).is_ok(), "refused after {i} failures");
            g.login_failed(ip, t0);
        }
        assert_eq!(g.admit(ip, t0).err(), Some(Refusal::AuthRateLimited));
        assert!(g.admit(other, t0).is_ok(), "another IP is not affected");
        let later = t0 + FAILURE_WINDOW;
        assert!(g.admit(ip, later).is_ok(), "the minute is over");
        g.login_failed(ip, later);
        assert!(g.admit(ip, later).is_ok(), "the count started again");
    }
}
