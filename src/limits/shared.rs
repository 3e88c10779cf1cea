//! Shared buckets for a cluster: the same GCRA buckets as `buckets.rs`, kept in Redis
//! (`[quota] backend = "redis"`) so every process of a cluster counts against one quota.
//!
//! A process does not pay a round trip per forward. It *leases* tokens: one call to a
//! server-side script takes up to `lease` tokens from a bucket at once (never more than the
//! bucket allows at that moment, so the cluster as a whole never takes more tokens than the
//! quota gives), and the forwards of this process then spend them locally. The price is
//! timing, not amount: a leased token may be spent up to `lease_ttl` later, so within one
//! lease time-to-live a scope can see up to `lease` forwards per process more than its rate
//! would allow at that instant. Tokens still unspent when their lease expires are handed back
//! (the script moves the bucket's theoretical arrival time back by that much, never before
//! now). A refusal in a later scope gives the earlier scopes' tokens back to the local lease,
//! as the local limiter refunds.
//!
//! Keys are `<prefix>:quota:<scope>:<id>:<tps>:<burst>`: the rate is part of the key, so a
//! reload that changes a rate starts a fresh (full) bucket, as the local limiter does. Each
//! key expires once its bucket would be full again, so idle devices cost Redis nothing.
//!
//! The clock is Redis's (`TIME` inside the script), one clock for every process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::throttle::Refusal;
use super::{Limiter, Resolved, Scope, Throttle, resolved};
use crate::config::quota::{Limit, OnBackendDown, OnLimit, Rate};
use crate::config::redis::RedisConfig;

/// Takes up to ARGV[3] tokens from the GCRA bucket KEYS[1] (emission interval ARGV[1] µs,
/// tolerance ARGV[2] µs = burst × interval). Returns {taken, µs until the next token}.
const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((now + tolerance - tat) / interval)
local k = math.min(want, room)
if k <= 0 then
  return {0, math.ceil(tat + interval - tolerance - now)}
end
tat = tat + k * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return {k, 0}
";

/// Hands ARGV[2] unspent tokens back to bucket KEYS[1] (emission interval ARGV[1] µs).
const GIVE_BACK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
tat = tat - tonumber(ARGV[2]) * tonumber(ARGV[1])
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
return 1
";

/// Cluster mode: the buckets in Redis, and what to do while Redis cannot be reached.
pub(super) struct Shared {
    pub(super) buckets: SharedBuckets,
    pub(super) on_down: OnBackendDown,
    /// This process's own buckets at `1/processes` of every quota, for `on_down = local`.
    pub(super) fallback: Limiter,
    pub(super) processes: u32,
}

impl Limiter {
    /// [`Limiter::acquire`] on the shared buckets: the same scopes in the same order, each a
    /// take from Redis (through this process's lease), the same refunds, waits and codes.
    pub(super) async fn acquire_shared(
        &self,
        shared: &Shared,
        product_key: &str,
        device_name: &str,
        tenant_hint: Option<&str>,
        instance_hint: Option<&str>,
    ) -> Result<Resolved, Throttle> {
        let started = tokio::time::Instant::now();
        let plan = self.plan();
        let metrics = self.inner.metrics.as_deref();
        loop {
            let waited = started.elapsed();
            if !plan.enabled {
                return Ok(Resolved::default());
            }
            let Some(instance) = plan.instance_for(product_key, tenant_hint, instance_hint) else {
                return Err(Throttle::unmapped(product_key, instance_hint));
            };
            let b = &shared.buckets;
            let mut scopes: Vec<(String, Limit, Scope)> = Vec::with_capacity(3);
            if let Some(rule) = plan.device_rule(product_key) {
                let id = format!("{product_key}/{device_name}");
                scopes.push((b.key("d", &id, rule.limit.rate), rule.limit, Scope::Device));
            }
            if let Some(gate) = &instance.gate {
                let key = b.key("i", &instance.id, gate.limit.rate);
                scopes.push((key, gate.limit, Scope::Instance));
            }
            if let Some(gate) = &instance.tenant.gate {
                let key = b.key("t", &instance.tenant.id, gate.limit.rate);
                scopes.push((key, gate.limit, Scope::Tenant));
            }
            let mut denied = None;
            for (i, (key, limit, _)) in scopes.iter().enumerate() {
                if let Err(d) = b.take(key, limit.rate).await {
                    for (earlier, _, _) in &scopes[..i] {
                        b.refund(earlier);
                    }
                    denied = Some((i, d));
                    break;
                }
            }
            if let Some(m) = metrics {
                m.quota_backend_up.set(i64::from(b.is_up()));
            }
            let Some((i, denied)) = denied else {
                return Ok(resolved(instance));
            };
            let (_, limit, scope) = &scopes[i];
            match denied {
                Denied::Down(error) => match shared.on_down {
                    OnBackendDown::Local => {
                        return shared
                            .fallback
                            .acquire(product_key, device_name, tenant_hint, instance_hint)
                            .await;
                    }
                    OnBackendDown::Refuse => {
                        let refusal = Refusal {
                            scope: *scope,
                            limit: *limit,
                            wait: Duration::ZERO,
                        };
                        return Err(refusal.backend_down(
                            instance,
                            product_key,
                            device_name,
                            b.url(),
                            &error,
                            metrics,
                        ));
                    }
                },
                Denied::Empty(wait) => {
                    let refusal = Refusal {
                        scope: *scope,
                        limit: *limit,
                        wait,
                    };
                    if limit.on_limit == OnLimit::Wait && waited + wait <= limit.max_wait {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    return Err(refusal.throttle(
                        instance,
                        product_key,
                        device_name,
                        waited,
                        metrics,
                    ));
                }
            }
        }
    }
}

/// Why a shared take did not give a token.
#[derive(Debug)]
pub(super) enum Denied {
    /// The bucket is empty: the next token comes in this long.
    Empty(Duration),
    /// Redis could not be asked (unreachable, too slow, an error): the reason.
    Down(String),
}

/// Tokens of one bucket leased to this process.
struct Lease {
    tokens: u32,
    expires: Instant,
}

/// The shared buckets of one process. Cheap to share (`Arc`).
pub(super) struct SharedBuckets {
    conn: redis::aio::ConnectionManager,
    lease: redis::Script,
    give_back: redis::Script,
    prefix: String,
    url: String,
    timeout: Duration,
    max_lease: u32,
    lease_ttl: Duration,
    leases: Mutex<HashMap<String, Lease>>,
    /// Whether the last call reached Redis (for health, the metric and the warning on change).
    up: AtomicBool,
    /// While Redis is down: when to ask it again, and what failed. Until then forwards do not
    /// wait for a connection attempt each; they follow `on_backend_down` at once.
    down: Mutex<Option<(Instant, String)>>,
}

/// How long an unreachable Redis is left alone before the next forward tries it again.
const RETRY_DOWN_AFTER: Duration = Duration::from_secs(1);

impl SharedBuckets {
    /// Connects lazily to `config`'s server: nothing is sent until the first forward, and an
    /// unreachable server shows as [`Denied::Down`] then.
    pub(super) fn new(
        config: &RedisConfig,
        max_lease: u32,
        lease_ttl: Duration,
    ) -> Result<SharedBuckets, String> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(config.url.as_str())
            .map_err(|e| format!("redis.url {:?}: {e}", config.url))?;
        if let Some(var) = &config.password_env {
            let password = std::env::var(var).map_err(|_| {
                format!("redis.password_env names {var:?}, which is not set in the environment")
            })?;
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match &config.tls {
            Some(tls) if config.is_tls() => {
                let read = |key: &str, path: &std::path::Path| {
                    std::fs::read(path)
                        .map_err(|e| format!("redis.tls.{key} {}: {e}", path.display()))
                };
                let root_cert = match &tls.ca_file {
                    Some(ca) => Some(read("ca_file", ca)?),
                    None => None,
                };
                let client_tls = match tls.identity() {
                    Some((cert, key)) => Some(redis::ClientTlsConfig {
                        client_cert: read("cert", cert)?,
                        client_key: read("key", key)?,
                    }),
                    None => None,
                };
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls,
                        root_cert,
                    },
                )
            }
            _ => redis::Client::open(info),
        }
        .map_err(|e| format!("redis.url: {e}"))?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| format!("redis: {e}"))?;
        Ok(SharedBuckets {
            conn,
            lease: redis::Script::new(LEASE),
            give_back: redis::Script::new(GIVE_BACK),
            prefix: config.key_prefix.clone(),
            url: redacted(&config.url),
            timeout,
            max_lease: max_lease.max(1),
            lease_ttl,
            leases: Mutex::new(HashMap::new()),
            up: AtomicBool::new(true),
            down: Mutex::new(None),
        })
    }

    /// The server, for reasons and health (no password).
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// Whether the last call reached Redis.
    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The key of a bucket: `scope` (`d`, `i`, `t`), its id and its rate.
    pub(super) fn key(&self, scope: &str, id: &str, rate: Rate) -> String {
        format!(
            "{}:quota:{scope}:{id}:{}:{}",
            self.prefix, rate.tps, rate.burst
        )
    }

    /// Takes one token from bucket `key`: from this process's lease when it has one, else
    /// by leasing more from Redis.
    pub(super) async fn take(&self, key: &str, rate: Rate) -> Result<(), Denied> {
        let expired = {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            match leases.get_mut(key) {
                Some(l) if l.tokens > 0 && l.expires > Instant::now() => {
                    l.tokens -= 1;
                    return Ok(());
                }
                Some(l) => std::mem::take(&mut l.tokens),
                None => 0,
            }
        };
        if let Some((retry_at, error)) = &*self.down.lock().unwrap_or_else(|e| e.into_inner())
            && Instant::now() < *retry_at
        {
            return Err(Denied::Down(error.clone()));
        }
        if expired > 0 {
            self.hand_back(key, rate, expired).await;
        }
        let interval = interval_us(rate);
        let want = self.max_lease.min(rate.burst).max(1);
        let mut conn = self.conn.clone();
        let mut call = self.lease.key(key);
        call.arg(interval)
            .arg(interval.saturating_mul(u64::from(rate.burst)))
            .arg(want);
        let reply: Result<(u64, u64), String> =
            match tokio::time::timeout(self.timeout, call.invoke_async(&mut conn)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
            };
        let (taken, wait_us) = match reply {
            Ok(v) => {
                self.mark(true, "");
                v
            }
            Err(e) => {
                self.mark(false, &e);
                return Err(Denied::Down(e));
            }
        };
        if taken == 0 {
            return Err(Denied::Empty(Duration::from_micros(wait_us.max(1))));
        }
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let lease = leases.entry(key.to_owned()).or_insert(Lease {
            tokens: 0,
            expires: Instant::now(),
        });
        lease.tokens += (taken - 1) as u32;
        lease.expires = Instant::now() + self.lease_ttl;
        Ok(())
    }

    /// Gives one token of bucket `key` back to this process's lease (a later scope refused
    /// the forward it was taken for).
    pub(super) fn refund(&self, key: &str) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let lease = leases.entry(key.to_owned()).or_insert(Lease {
            tokens: 0,
            expires: Instant::now() + self.lease_ttl,
        });
        lease.tokens += 1;
    }

    /// Hands every lease that expired back to Redis, and forgets it. Call it on an interval;
    /// a lease is also handed back when its bucket is next used.
    pub(super) async fn hand_back_expired(&self) {
        let now = Instant::now();
        let expired: Vec<(String, u32)> = {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<String> = leases
                .iter()
                .filter(|(_, l)| l.expires <= now)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| leases.remove(&k).map(|l| (k, l.tokens)))
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        for (key, tokens) in expired {
            if let Some(rate) = rate_of(&key) {
                self.hand_back(&key, rate, tokens).await;
            }
        }
    }

    async fn hand_back(&self, key: &str, rate: Rate, tokens: u32) {
        let mut conn = self.conn.clone();
        let mut call = self.give_back.key(key);
        call.arg(interval_us(rate)).arg(tokens);
        let done = tokio::time::timeout(self.timeout, call.invoke_async::<i64>(&mut conn)).await;
        if !matches!(done, Ok(Ok(_))) {
            // Not handed back: the bucket refills on its own, a little later than it could.
            tracing::debug!(key, tokens, "unspent quota tokens not handed back to Redis");
        }
    }

    /// Notes whether Redis answered; says so once per change.
    fn mark(&self, up: bool, error: &str) {
        *self.down.lock().unwrap_or_else(|e| e.into_inner()) =
            (!up).then(|| (Instant::now() + RETRY_DOWN_AFTER, error.to_owned()));
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(url = %self.url, "quota backend Redis reachable again");
            } else {
                tracing::warn!(url = %self.url, error, "quota backend Redis unreachable");
            }
        }
    }
}

/// A bucket's emission interval (time per token) in microseconds.
fn interval_us(rate: Rate) -> u64 {
    (1_000_000 / u64::from(rate.tps.max(1))).max(1)
}

/// The rate a key was made with (its last two parts).
fn rate_of(key: &str) -> Option<Rate> {
    let mut parts = key.rsplit(':');
    let burst = parts.next()?.parse().ok()?;
    let tps = parts.next()?.parse().ok()?;
    Some(Rate { tps, burst })
}

/// `url` without a password.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}
