//! Shared buckets for a cluster: the same GCRA buckets as `buckets.rs`, kept in Redis
//! (`[quota] backend = "redis"`) so every process of a cluster counts against one quota.
//!
//! A process does not pay a round trip per forward. It *leases* tokens: one call to a
//! server-side script takes a lease of tokens from a bucket at once (never more than the
//! bucket allows at that moment, so the cluster as a whole never takes more tokens than the
//! quota gives), and the forwards of this process then spend them locally. A bucket's lease
//! size follows its rate ([`LeaseSize`]: `lease_rate_ms` of its rate, at least `lease`, at
//! most its burst), so a busy tenant or instance refills rarely while a device leases little.
//!
//! The price is timing, not amount: a process never holds more than one lease of unspent
//! tokens of a bucket (concurrent refills ask only for what is missing), so in any interval
//! a scope can see at most `processes × lease size` forwards more than `burst + rate × t`.
//! Tokens of a lease left unused for `lease_ttl` are handed back (the script moves the
//! bucket's theoretical arrival time back by that much, never before now).
//!
//! One forward waits for at most one call: every scope whose lease is empty is refilled in
//! the same script call, all or nothing (a bucket that cannot give one token refuses the
//! forward, and then no bucket gives any), together with the hand-back of an expired lease.
//! The forwards that need Redis at about the same time (those of one batch, say) share that
//! call: each is a group of its own in it, all or nothing per group, applied in order. The
//! tokens this forward took from the local leases of other scopes go back to them on
//! refusal, as the local limiter refunds. When a forward leaves a lease below half, a refill
//! of what is missing starts in the background (taking what the bucket has, possibly
//! nothing), so busy scopes rarely make a forward wait for Redis.
//!
//! Keys are `<prefix>:quota:<scope>:<id>:<tps>:<burst>`: the rate is part of the key, so a
//! reload that changes a rate starts a fresh (full) bucket, as the local limiter does. Each
//! key expires once its bucket would be full again, so idle devices cost Redis nothing.
//!
//! The clock is Redis's (`TIME` inside the script), one clock for every process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::throttle::Refusal;
use super::{Limiter, Resolved, Scope, Throttle, resolved};
use crate::config::quota::{LeaseSize, Limit, OnBackendDown, OnLimit, Rate};
use crate::config::redis::RedisConfig;

/// Leases from, and hands back to, the GCRA buckets KEYS, for several forwards at once. For
/// key i, ARGV[6i-5 .. 6i] are: the emission interval (µs), the tolerance (µs, burst ×
/// interval), the tokens wanted, the tokens handed back, whether the forward needs one (1)
/// or the tokens are a refill ahead (0), and the forward's group number. The keys of one
/// group are consecutive; a key may appear in several groups. Group by group, in order: the
/// hand-backs apply, then when a needed bucket cannot give one token the group takes
/// nothing, else each bucket gives up to what is wanted. The reply holds two numbers per key:
/// {taken, 0}, or for a refused group {-2, µs until its next token} at the bucket that
/// refused and {-1, 0} at the others.
const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function a(i, j) return tonumber(ARGV[6 * (i - 1) + j]) end
local tat, touched = {}, {}
local function get(key)
  local v = tat[key]
  if v == nil then
    v = tonumber(redis.call('GET', key) or '0')
    if v < now then v = now end
    tat[key] = v
  end
  return v
end
local out = {}
local first, n = 1, #KEYS
while first <= n do
  local last = first
  while last < n and a(last + 1, 6) == a(first, 6) do last = last + 1 end
  for j = first, last do
    if a(j, 4) > 0 then
      local v = get(KEYS[j]) - a(j, 4) * a(j, 1)
      if v < now then v = now end
      tat[KEYS[j]] = v
      touched[KEYS[j]] = true
    end
  end
  local refused = 0
  for j = first, last do
    if a(j, 5) == 1 and now + a(j, 2) - get(KEYS[j]) < a(j, 1) then
      refused = j
      break
    end
  end
  for j = first, last do
    local v = get(KEYS[j])
    if refused == j then
      out[2 * j - 1], out[2 * j] = -2, math.ceil(v + a(j, 1) - a(j, 2) - now)
    elseif refused > 0 then
      out[2 * j - 1], out[2 * j] = -1, 0
    else
      local k = math.max(0, math.min(a(j, 3), math.floor((now + a(j, 2) - v) / a(j, 1))))
      if k > 0 then
        tat[KEYS[j]] = v + k * a(j, 1)
        touched[KEYS[j]] = true
      end
      out[2 * j - 1], out[2 * j] = k, 0
    end
  end
  first = last + 1
end
for key, _ in pairs(touched) do
  local v = tat[key]
  if v <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.0f', v), 'PX', math.ceil((v - now) / 1000) + 1)
  end
end
return out
";

/// Cluster mode: the buckets in Redis, and what to do while Redis cannot be reached.
pub(super) struct Shared {
    pub(super) buckets: Arc<SharedBuckets>,
    pub(super) on_down: OnBackendDown,
    /// This process's own buckets at `1/processes` of every quota, for `on_down = local`.
    pub(super) fallback: Limiter,
    pub(super) processes: u32,
}

impl Limiter {
    /// [`Limiter::acquire`] on the shared buckets: the same scopes in the same order, taken
    /// from this process's leases (at most one call to Redis for all of them), the same
    /// refunds, waits and codes.
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
            let mut scopes: Vec<(Limit, Scope)> = Vec::with_capacity(3);
            let mut keys: Vec<(String, Rate)> = Vec::with_capacity(3);
            if let Some(rule) = plan.device_rule(product_key) {
                let id = format!("{product_key}/{device_name}");
                keys.push((b.key("d", &id, rule.limit.rate), rule.limit.rate));
                scopes.push((rule.limit, Scope::Device));
            }
            if let Some(gate) = &instance.gate {
                keys.push((b.key("i", &instance.id, gate.limit.rate), gate.limit.rate));
                scopes.push((gate.limit, Scope::Instance));
            }
            if let Some(gate) = &instance.tenant.gate {
                let key = b.key("t", &instance.tenant.id, gate.limit.rate);
                keys.push((key, gate.limit.rate));
                scopes.push((gate.limit, Scope::Tenant));
            }
            let taken = b.take(&keys).await;
            if let Some(m) = metrics {
                m.quota_backend_up.set(i64::from(b.is_up()));
            }
            let Err((i, denied)) = taken else {
                return Ok(resolved(instance));
            };
            let (limit, scope) = &scopes[i];
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
    /// Tokens asked of Redis for this bucket whose answer has not come yet: a refill asks
    /// only for what the lease misses beyond them, so unspent tokens stay within one lease.
    pending: u32,
}

/// One bucket of a call to the script: where it is in the forward's scopes, and what is
/// asked of it.
#[derive(Clone, Copy)]
struct Ask {
    scope: usize,
    want: u32,
    give: u32,
    /// The forward needs one of these tokens (else: a refill ahead, or a hand-back only).
    need: bool,
    /// Which forward of a shared call it is for (all or nothing is per group).
    group: u32,
}

/// A forward's part of a shared call's reply (two numbers per ask), or what went wrong.
type Answer = Result<Vec<i64>, String>;

/// The asks of the forwards that will share the next call.
#[derive(Default)]
struct Batch {
    keys: Vec<(String, Rate)>,
    asks: Vec<Ask>,
    /// Per forward: where its asks start, how many, and where its answer goes.
    groups: Vec<(usize, usize, oneshot::Sender<Answer>)>,
}

/// The shared buckets of one process. Cheap to share (`Arc`).
pub(super) struct SharedBuckets {
    conn: redis::aio::ConnectionManager,
    lease: redis::Script,
    prefix: String,
    url: String,
    timeout: Duration,
    size: LeaseSize,
    lease_ttl: Duration,
    leases: Mutex<HashMap<String, Lease>>,
    /// The asks gathered for the next call, while one is being gathered.
    batch: Mutex<Option<Batch>>,
    /// Calls made to the script (round trips), for tests and benchmarks.
    calls: AtomicU64,
    /// Whether the last call reached Redis (for health, the metric and the warning on change).
    up: AtomicBool,
    /// While Redis is down: when to ask it again, and what failed. Until then forwards do not
    /// wait for a connection attempt each; they follow `on_backend_down` at once.
    down: Mutex<Option<(Instant, String)>>,
}

/// How long an unreachable Redis is left alone before the next forward tries it again.
const RETRY_DOWN_AFTER: Duration = Duration::from_secs(1);

/// Most buckets handed back in one call.
const HAND_BACK_BATCH: usize = 256;

/// Most forwards sharing one call.
const BATCH_GROUPS: usize = 256;

impl SharedBuckets {
    /// Connects lazily to `config`'s server: nothing is sent until the first forward, and an
    /// unreachable server shows as [`Denied::Down`] then.
    pub(super) fn new(
        config: &RedisConfig,
        size: LeaseSize,
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
            prefix: config.key_prefix.clone(),
            url: redacted(&config.url),
            timeout,
            size,
            lease_ttl,
            leases: Mutex::new(HashMap::new()),
            batch: Mutex::new(None),
            calls: AtomicU64::new(0),
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

    /// Calls made to Redis so far.
    pub(super) fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The key of a bucket: `scope` (`d`, `i`, `t`), its id and its rate.
    pub(super) fn key(&self, scope: &str, id: &str, rate: Rate) -> String {
        format!(
            "{}:quota:{scope}:{id}:{}:{}",
            self.prefix, rate.tps, rate.burst
        )
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one token from each bucket of `scopes` (key and rate, narrowest scope first)
    /// for one forward: from this process's leases where they have tokens, and from Redis in
    /// one call for the others. On refusal nothing is kept: the error names the first scope
    /// (its index in `scopes`) that could not give a token, and why.
    pub(super) async fn take(
        self: &Arc<Self>,
        scopes: &[(String, Rate)],
    ) -> Result<(), (usize, Denied)> {
        let now = Instant::now();
        // Bit i: scope i's token came from the local lease (given back on refusal).
        let mut reserved = 0u32;
        let mut asks: Vec<Ask> = Vec::new();
        let mut ahead: Vec<Ask> = Vec::new();
        {
            let mut leases = self.leases();
            for (i, (key, rate)) in scopes.iter().enumerate() {
                let size = self.size.of(*rate);
                match leases.get_mut(key.as_str()) {
                    Some(l) if l.tokens > 0 && l.expires > now => {
                        l.tokens -= 1;
                        // A lease in use stays; one left unused for `lease_ttl` goes back.
                        l.expires = now + self.lease_ttl;
                        reserved |= 1 << i;
                        // Just fell below half, and no refill under way: top it up.
                        let half = size / 2;
                        // (Less the token just taken, which a refusal gives back.)
                        if l.tokens < half && l.tokens + 1 >= half && l.pending == 0 {
                            let want = size - l.tokens - 1;
                            l.pending += want;
                            ahead.push(Ask {
                                scope: i,
                                want,
                                give: 0,
                                need: false,
                                group: 0,
                            });
                        }
                    }
                    Some(l) => {
                        // Empty, or expired: what it still holds goes back in the same call.
                        let give = std::mem::take(&mut l.tokens);
                        let want = size.saturating_sub(l.pending).max(1);
                        l.pending += want;
                        asks.push(Ask {
                            scope: i,
                            want,
                            give,
                            need: true,
                            group: 0,
                        });
                    }
                    None => {
                        leases.insert(
                            key.clone(),
                            Lease {
                                tokens: 0,
                                expires: now,
                                pending: size,
                            },
                        );
                        asks.push(Ask {
                            scope: i,
                            want: size,
                            give: 0,
                            need: true,
                            group: 0,
                        });
                    }
                }
            }
        }
        let down = self
            .down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(retry_at, _)| Instant::now() < *retry_at)
            .map(|(_, error)| error.clone());
        if asks.is_empty() {
            if !ahead.is_empty() {
                match down {
                    None => {
                        let keys: Vec<(String, Rate)> =
                            ahead.iter().map(|a| scopes[a.scope].clone()).collect();
                        let ahead: Vec<Ask> = ahead
                            .iter()
                            .enumerate()
                            .map(|(n, a)| Ask { scope: n, ..*a })
                            .collect();
                        let this = Arc::clone(self);
                        tokio::spawn(async move {
                            let reply = this.call_batched(&keys, &ahead).await;
                            this.settle(&keys, &ahead, reply.as_deref().ok());
                        });
                    }
                    Some(_) => self.settle(scopes, &ahead, None),
                }
            }
            return Ok(());
        }
        asks.extend(ahead);
        let first = asks[0].scope;
        if let Some(error) = down {
            self.settle(scopes, &asks, None);
            self.give_back_local(scopes, reserved);
            return Err((first, Denied::Down(error)));
        }
        let reply = self.call_batched(scopes, &asks).await;
        self.settle(scopes, &asks, reply.as_deref().ok());
        let denied = match reply {
            Ok(r) => {
                let refused = (0..asks.len()).find(|n| r.get(2 * n) == Some(&-2));
                match refused {
                    Some(n) => {
                        let wait = r.get(2 * n + 1).and_then(|&w| u64::try_from(w).ok());
                        let wait = Duration::from_micros(wait.unwrap_or(1).max(1));
                        (asks[n].scope, Denied::Empty(wait))
                    }
                    None if r.len() == 2 * asks.len() => return Ok(()),
                    None => (
                        first,
                        Denied::Down(format!("unexpected reply from the quota script: {r:?}")),
                    ),
                }
            }
            Err(e) => (first, Denied::Down(e)),
        };
        self.give_back_local(scopes, reserved);
        Err(denied)
    }

    /// `asks` (each naming its bucket in `keys`) as one group of the next call to the
    /// script: the forwards that need Redis at about the same time share one call. The
    /// reply's two numbers per ask, or what went wrong.
    async fn call_batched(self: &Arc<Self>, keys: &[(String, Rate)], asks: &[Ask]) -> Answer {
        let (tx, rx) = oneshot::channel();
        let (full, first) = {
            let mut gathering = self.batch.lock().unwrap_or_else(|e| e.into_inner());
            let batch = gathering.get_or_insert_with(Batch::default);
            let first = batch.groups.is_empty();
            let start = batch.asks.len();
            let group = u32::try_from(batch.groups.len()).unwrap_or(u32::MAX);
            for ask in asks {
                batch.keys.push(keys[ask.scope].clone());
                batch.asks.push(Ask {
                    scope: batch.keys.len() - 1,
                    group,
                    ..*ask
                });
            }
            batch.groups.push((start, asks.len(), tx));
            let full = batch.groups.len() >= BATCH_GROUPS;
            (full.then(|| gathering.take()).flatten(), first)
        };
        // The call runs in a task of its own, so a forward given up (dropped) while it waits
        // does not take the others' answers with it.
        if full.is_some() || first {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                let batch = match full {
                    Some(batch) => Some(batch),
                    None => {
                        // Let the forwards running beside this one add their asks.
                        tokio::task::yield_now().await;
                        this.batch.lock().unwrap_or_else(|e| e.into_inner()).take()
                    }
                };
                if let Some(batch) = batch {
                    this.flush(batch).await;
                }
            });
        }
        rx.await
            .unwrap_or_else(|_| Err("the quota call was dropped".to_owned()))
    }

    /// Makes the call for `batch` and hands each forward its part of the reply.
    async fn flush(&self, batch: Batch) {
        let reply = self.call(&batch.keys, &batch.asks).await;
        let asked = batch.asks.len();
        for (start, len, tx) in batch.groups {
            let part = match &reply {
                Ok(r) => r.get(2 * start..2 * (start + len)).map(<[i64]>::to_vec).ok_or_else(|| {
                    format!(
                        "unexpected reply from the quota script: {} numbers for {asked} buckets",
                        r.len()
                    )
                }),
                Err(e) => Err(e.clone()),
            };
            // Its forward may have been given up.
            let _ = tx.send(part);
        }
    }

    /// One call to the script for `asks` (each naming its bucket in `keys`): its reply, or
    /// what went wrong. Marks the backend up or down.
    async fn call(&self, keys: &[(String, Rate)], asks: &[Ask]) -> Result<Vec<i64>, String> {
        let mut call = self.lease.prepare_invoke();
        for ask in asks {
            let (key, rate) = &keys[ask.scope];
            let interval = interval_us(*rate);
            call.key(key)
                .arg(interval)
                .arg(interval.saturating_mul(u64::from(rate.burst)))
                .arg(ask.want)
                .arg(ask.give)
                .arg(u8::from(ask.need))
                .arg(ask.group);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        let reply = match tokio::time::timeout(self.timeout, call.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        };
        match &reply {
            Ok(_) => self.mark(true, ""),
            Err(e) => self.mark(false, e),
        }
        reply
    }

    /// Books the answer to `asks` (`None`: no answer) into the leases: what each bucket
    /// gave, less the token a forward needed, and the asks are no longer pending.
    fn settle(&self, keys: &[(String, Rate)], asks: &[Ask], reply: Option<&[i64]>) {
        let now = Instant::now();
        let mut leases = self.leases();
        for (n, ask) in asks.iter().enumerate() {
            let taken = reply
                .and_then(|r| r.get(2 * n))
                .and_then(|&k| u32::try_from(k).ok())
                .unwrap_or(0);
            let Some(lease) = leases.get_mut(keys[ask.scope].0.as_str()) else {
                continue;
            };
            lease.pending = lease.pending.saturating_sub(ask.want);
            let kept = taken.saturating_sub(u32::from(ask.need));
            if kept > 0 {
                lease.tokens += kept;
                lease.expires = now + self.lease_ttl;
            }
        }
    }

    /// Gives the tokens a refused forward took from local leases (bits of `reserved`) back
    /// to them; never beyond one lease with what is pending (a token that would go beyond,
    /// because a refill came meanwhile, is dropped: the bucket then refills a token late).
    fn give_back_local(&self, scopes: &[(String, Rate)], reserved: u32) {
        if reserved == 0 {
            return;
        }
        let mut leases = self.leases();
        for (i, (key, rate)) in scopes.iter().enumerate() {
            if reserved & (1 << i) != 0 {
                let lease = leases.entry(key.clone()).or_insert(Lease {
                    tokens: 0,
                    expires: Instant::now() + self.lease_ttl,
                    pending: 0,
                });
                let room = self.size.of(*rate).saturating_sub(lease.pending);
                lease.tokens = (lease.tokens + 1).min(room.max(lease.tokens));
            }
        }
    }

    /// Hands every lease that expired back to Redis (in batches of calls), and forgets it.
    /// Call it on an interval; a lease is also handed back when its bucket is next used.
    pub(super) async fn hand_back_expired(&self) {
        let now = Instant::now();
        let expired: Vec<(String, Rate, u32)> = {
            let mut leases = self.leases();
            let keys: Vec<String> = leases
                .iter()
                .filter(|(_, l)| l.expires <= now && l.pending == 0)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| leases.remove(&k).map(|l| (k, l.tokens)))
                .filter(|(_, n)| *n > 0)
                .filter_map(|(k, n)| rate_of(&k).map(|rate| (k, rate, n)))
                .collect()
        };
        for batch in expired.chunks(HAND_BACK_BATCH) {
            let keys: Vec<(String, Rate)> = batch.iter().map(|(k, r, _)| (k.clone(), *r)).collect();
            let asks: Vec<Ask> = batch
                .iter()
                .enumerate()
                .map(|(scope, (_, _, give))| Ask {
                    scope,
                    want: 0,
                    give: *give,
                    need: false,
                    group: 0,
                })
                .collect();
            if let Err(error) = self.call(&keys, &asks).await {
                // Not handed back: the buckets refill on their own, a little later.
                tracing::debug!(
                    buckets = batch.len(),
                    error,
                    "unspent quota tokens not handed back to Redis"
                );
            }
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
