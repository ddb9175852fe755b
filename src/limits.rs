//! Per-tenant rate limits and unit quotas.
//!
//! * **Rate**: with Redis, a GCRA in one Lua script per tenant key, with
//!   Redis's own clock, so all replicas share one bucket; without Redis (or
//!   while it is down) governor in this process. A busy tenant's replica
//!   leases a few tokens per Redis call ([`lease_size`]) so most requests do
//!   not wait on Redis; a replica can hold at most `lease_size − 1` unused
//!   tokens, which bounds the overshoot, and leases expire after
//!   [`LEASE_TTL`].
//! * **Quota**: units per UTC day or month. A request's own units are
//!   reserved atomically before the upstream call (a Lua check-and-add, so
//!   concurrent requests cannot overshoot), settled to upstream's figure on
//!   success and released on failure. While Redis is down,
//!   `quota_on_store_error` decides: `deny`, or `allow` with local
//!   accounting that is added to Redis when it returns.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::{QuotaConfig, QuotaPeriod, RateConfig, StoreErrorPolicy};
use crate::date::Day;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::redis_store::{tenant_tag, RedisStore};
use crate::tenants::Tenant;

/// What the rate limiter said, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct RateState {
    pub limit: u32,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// governor in this process.
pub struct LocalRate<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>,
    clock: C,
    cfg: RateConfig,
}

fn governor_quota(cfg: RateConfig) -> Quota {
    let period = Duration::from_secs_f64(1.0 / cfg.per_second).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(cfg.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl LocalRate<DefaultClock> {
    pub fn new(cfg: RateConfig) -> Self {
        LocalRate::with_clock(cfg, DefaultClock::default())
    }
}

impl<C: Clock + Clone> LocalRate<C> {
    pub fn with_clock(cfg: RateConfig, clock: C) -> Self {
        let limiter = RateLimiter::direct_with_clock(governor_quota(cfg), clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        LocalRate {
            limiter,
            clock,
            cfg,
        }
    }

    /// Takes one token, or says how long until one is free.
    pub fn check(&self) -> Result<RateState, Duration> {
        let interval = Duration::from_secs_f64(1.0 / self.cfg.per_second);
        match self.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Ok(RateState {
                    limit: self.cfg.burst,
                    remaining: u64::from(remaining),
                    reset: interval
                        .mul_f64(f64::from(self.cfg.burst - remaining.min(self.cfg.burst))),
                })
            }
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }
}

/// GCRA over Redis time that grants up to ARGV[3] tokens at once. KEYS[1]
/// the tenant's rate key; ARGV[1] emission interval in µs, ARGV[2] burst.
/// Returns {granted, remaining, retry_us, reset_us}.
const RATE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local avail = math.floor((burst * interval - (tat - now)) / interval)
if avail < 1 then
  return {0, 0, math.ceil((tat - now) - (burst - 1) * interval), math.ceil(tat - now)}
end
local grant = math.min(want, avail)
local new_tat = tat + grant * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {grant, avail - grant, 0, math.ceil(new_tat - now)}
"#;

/// Leased tokens unused after this are dropped (never used late).
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// Tokens a replica takes per Redis call: 1 (no leasing) for small rates;
/// for busy tenants up to 5 % of a second's rate, an eighth of the burst,
/// and never more than 100.
pub fn lease_size(cfg: RateConfig) -> u64 {
    let by_rate = (cfg.per_second * 0.05).floor();
    let by_burst = f64::from(cfg.burst / 8);
    by_rate.min(by_burst).clamp(1.0, 100.0) as u64
}

/// Tokens this replica holds for a tenant.
struct Lease {
    cfg: RateConfig,
    tokens: u64,
    expires: Instant,
    /// The shared bucket's remaining tokens when the lease was taken.
    remaining: u64,
    reset: Duration,
    /// The shared bucket said no: nothing frees up before this, so refuse
    /// locally until then instead of asking Redis again.
    denied_until: Option<Instant>,
}

/// Check-and-add. KEYS[1] the tenant's quota key for the period; ARGV[1]
/// units, ARGV[2] limit, ARGV[3] TTL in s. Returns {granted, used}.
const QUOTA_SCRIPT: &str = r#"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local units = tonumber(ARGV[1])
if used + units > tonumber(ARGV[2]) then
  return {0, used}
end
used = redis.call('INCRBY', KEYS[1], units)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, used}
"#;

/// Units reserved for one request; settle or release it exactly once.
#[derive(Debug)]
pub struct Reservation {
    tenant: Arc<str>,
    period: String,
    units: u64,
    limit: u64,
    ttl: u64,
    /// Reserved in Redis (else in local accounting).
    in_redis: bool,
    pub remaining: u64,
}

#[derive(Default, Clone, Copy)]
struct LocalQuota {
    /// Units used as far as this process knows (Redis's figure when seen).
    used: u64,
    /// Units taken locally while Redis was down, owed to Redis.
    owed: i64,
}

pub struct Limits {
    redis: Option<Arc<RedisStore>>,
    policy: StoreErrorPolicy,
    local: Mutex<HashMap<(Arc<str>, String), LocalQuota>>,
    leases: Mutex<HashMap<Arc<str>, Lease>>,
    rate_script: redis::Script,
    quota_script: redis::Script,
    metrics: Arc<Metrics>,
}

fn period_key(per: QuotaPeriod) -> (String, u64) {
    let today = Day::today();
    match per {
        // Kept a day past the period so late settlements still find it.
        QuotaPeriod::Day => (today.to_string(), today.seconds_left() + 86_400),
        QuotaPeriod::Month => {
            let end = today.next_month_start();
            let secs = (end.days() - today.days() - 1).max(0) as u64 * 86_400
                + today.seconds_left()
                + 86_400;
            (today.month_key(), secs)
        }
    }
}

impl Limits {
    pub fn new(
        redis: Option<Arc<RedisStore>>,
        policy: StoreErrorPolicy,
        metrics: Arc<Metrics>,
    ) -> Arc<Limits> {
        let limits = Arc::new(Limits {
            redis,
            policy,
            local: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            rate_script: redis::Script::new(RATE_SCRIPT),
            quota_script: redis::Script::new(QUOTA_SCRIPT),
            metrics,
        });
        if limits.redis.is_some() {
            let l = limits.clone();
            tokio::spawn(async move { l.repay_loop().await });
        }
        limits
    }

    /// Takes one request from the tenant's rate. `Ok(None)`: no rate limit.
    pub async fn check_rate(&self, tenant: &Tenant) -> Result<Option<RateState>, GatewayError> {
        let Some(cfg) = tenant.rate else {
            return Ok(None);
        };
        if let Some(redis) = &self.redis {
            if let Some(state) = self.take_leased(&tenant.name, cfg) {
                return state.map(Some);
            }
            let key = &tenant.rate_key;
            let interval_us = (1_000_000.0 / cfg.per_second).max(1.0).round() as u64;
            let want = lease_size(cfg);
            let script = &self.rate_script;
            let r = redis
                .call("rate", false, |mut c| async move {
                    script
                        .key(key)
                        .arg(interval_us)
                        .arg(cfg.burst)
                        .arg(want)
                        .invoke_async::<(i64, i64, i64, i64)>(&mut c)
                        .await
                })
                .await;
            if let Ok((granted, remaining, retry_us, reset_us)) = r {
                let reset = Duration::from_micros(reset_us.max(0) as u64);
                if granted < 1 {
                    let retry_after = Duration::from_micros(retry_us.max(0) as u64);
                    self.keep_lease(
                        &tenant.name,
                        Lease {
                            cfg,
                            tokens: 0,
                            expires: Instant::now(),
                            remaining: 0,
                            reset,
                            denied_until: Some(Instant::now() + retry_after),
                        },
                    );
                    return Err(GatewayError::RateLimited { retry_after });
                }
                let remaining = remaining.max(0) as u64;
                let spare = granted as u64 - 1;
                if spare > 0 {
                    self.keep_lease(
                        &tenant.name,
                        Lease {
                            cfg,
                            tokens: spare,
                            expires: Instant::now() + LEASE_TTL,
                            remaining,
                            reset,
                            denied_until: None,
                        },
                    );
                }
                return Ok(Some(RateState {
                    limit: cfg.burst,
                    remaining: remaining + spare,
                    reset,
                }));
            }
            // Redis failed or is down: this process's limiter decides.
        }
        match &tenant.local_rate {
            Some(local) => local
                .check()
                .map(Some)
                .map_err(|wait| GatewayError::RateLimited { retry_after: wait }),
            None => Ok(None),
        }
    }

    /// Replaces what this replica holds for the tenant.
    fn keep_lease(&self, tenant: &Arc<str>, lease: Lease) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.insert(tenant.clone(), lease);
    }

    /// Answers from what this replica already knows: a token it leased
    /// from the shared bucket, or a refusal the bucket gave that still holds.
    /// `None`: ask Redis.
    fn take_leased(
        &self,
        tenant: &Arc<str>,
        cfg: RateConfig,
    ) -> Option<Result<RateState, GatewayError>> {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let lease = leases.get_mut(tenant)?;
        let now = Instant::now();
        if lease.cfg != cfg {
            leases.remove(tenant);
            return None;
        }
        if let Some(until) = lease.denied_until {
            if now < until {
                return Some(Err(GatewayError::RateLimited {
                    retry_after: until - now,
                }));
            }
            lease.denied_until = None;
        }
        if lease.tokens == 0 || now >= lease.expires {
            lease.tokens = 0;
            return None;
        }
        lease.tokens -= 1;
        Some(Ok(RateState {
            limit: cfg.burst,
            remaining: lease.remaining + lease.tokens,
            reset: lease.reset,
        }))
    }

    /// Reserves `units` of the tenant's quota. `Ok(None)`: no quota.
    pub async fn reserve(
        &self,
        tenant: &Tenant,
        units: u64,
    ) -> Result<Option<Reservation>, GatewayError> {
        let Some(QuotaConfig { units: limit, per }) = tenant.quota else {
            return Ok(None);
        };
        let (period, ttl) = period_key(per);
        if let Some(redis) = &self.redis {
            let key = format!("{}:quota:{period}", tenant_tag(&tenant.name));
            let script = &self.quota_script;
            let r = redis
                .call("quota", false, |mut c| async move {
                    script
                        .key(&key)
                        .arg(units)
                        .arg(limit)
                        .arg(ttl)
                        .invoke_async::<(i64, i64)>(&mut c)
                        .await
                })
                .await;
            match r {
                Ok((granted, used)) => {
                    let used = used.max(0) as u64;
                    self.remember_used(&tenant.name, &period, used);
                    let remaining = limit.saturating_sub(used);
                    self.publish_remaining(&tenant.name, remaining);
                    return if granted == 1 {
                        Ok(Some(Reservation {
                            tenant: tenant.name.clone(),
                            period,
                            units,
                            limit,
                            ttl,
                            in_redis: true,
                            remaining,
                        }))
                    } else {
                        Err(GatewayError::QuotaExceeded { remaining })
                    };
                }
                Err(e) => {
                    if self.policy == StoreErrorPolicy::Deny {
                        tracing::warn!(tenant = %tenant.name, error = %e, "quota store unavailable; denying (quota_on_store_error = deny)");
                        return Err(GatewayError::StoreUnavailable);
                    }
                }
            }
        }
        // Local accounting: the whole quota without Redis, the fallback with it.
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let entry = local
            .entry((tenant.name.clone(), period.clone()))
            .or_default();
        let used = entry.used;
        if used + units > limit {
            let remaining = limit.saturating_sub(used);
            return Err(GatewayError::QuotaExceeded { remaining });
        }
        entry.used += units;
        if self.redis.is_some() {
            entry.owed += units as i64;
        }
        let remaining = limit - entry.used;
        drop(local);
        self.publish_remaining(&tenant.name, remaining);
        Ok(Some(Reservation {
            tenant: tenant.name.clone(),
            period,
            units,
            limit,
            ttl,
            in_redis: false,
            remaining,
        }))
    }

    /// The request succeeded and upstream billed `actual` units: adjust the
    /// reservation to upstream's figure.
    pub async fn settle(&self, r: Reservation, actual: u64) {
        let delta = actual as i64 - r.units as i64;
        if delta != 0 {
            self.adjust(&r, delta).await;
        }
    }

    /// The request failed: give the units back.
    pub async fn release(&self, r: Reservation) {
        let delta = -(r.units as i64);
        self.adjust(&r, delta).await;
    }

    async fn adjust(&self, r: &Reservation, delta: i64) {
        if r.in_redis {
            if let Some(redis) = &self.redis {
                let key = format!("{}:quota:{}", tenant_tag(&r.tenant), r.period);
                let ttl = r.ttl;
                match add_used(redis, "quota_adjust", true, key, delta, ttl).await {
                    Ok(used) => {
                        let used = used.max(0) as u64;
                        self.remember_used(&r.tenant, &r.period, used);
                        self.publish_remaining(&r.tenant, r.limit.saturating_sub(used));
                        return;
                    }
                    Err(_) => {
                        // Owed to Redis; repaid when it returns.
                    }
                }
            }
        }
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let entry = local
            .entry((r.tenant.clone(), r.period.clone()))
            .or_default();
        entry.used = (entry.used as i64 + delta).max(0) as u64;
        if self.redis.is_some() {
            entry.owed += delta;
        }
        let remaining = r.limit.saturating_sub(entry.used);
        drop(local);
        self.publish_remaining(&r.tenant, remaining);
    }

    fn publish_remaining(&self, tenant: &str, remaining: u64) {
        self.metrics
            .quota_remaining
            .with_label_values(&[tenant])
            .set(remaining.min(i64::MAX as u64) as i64);
    }

    fn remember_used(&self, tenant: &Arc<str>, period: &str, used: u64) {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let e = local
            .entry((tenant.clone(), period.to_string()))
            .or_default();
        // What Redis says plus what this process still owes it.
        e.used = (used as i64 + e.owed).max(0) as u64;
    }

    /// Units left for the tenant in the current period, as last seen here.
    ///
    /// A replica that has not yet seen the tenant's counter (after a start,
    /// or in a new period) fetches it in the background, so the figure on
    /// cache hits soon reflects what other replicas spent.
    pub fn remaining(self: &Arc<Self>, tenant: &Tenant) -> Option<u64> {
        let q = tenant.quota?;
        let (period, _) = period_key(q.per);
        let key = (tenant.name.clone(), period);
        let used = {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            match local.get(&key) {
                Some(e) => e.used,
                None => {
                    // Placeholder until the fetch answers; fetched once.
                    local.insert(key.clone(), LocalQuota::default());
                    if let Some(redis) = self.redis.clone() {
                        let me = self.clone();
                        tokio::spawn(async move {
                            let rkey = format!("{}:quota:{}", tenant_tag(&key.0), key.1);
                            let got = redis
                                .call("quota_read", false, |mut c| async move {
                                    redis::cmd("GET")
                                        .arg(&rkey)
                                        .query_async::<Option<i64>>(&mut c)
                                        .await
                                })
                                .await;
                            if let Ok(Some(used)) = got {
                                me.remember_used(&key.0, &key.1, used.max(0) as u64);
                            }
                        });
                    }
                    0
                }
            }
        };
        Some(q.units.saturating_sub(used))
    }

    /// Adds what was accounted locally during an outage to Redis.
    async fn repay_loop(self: Arc<Self>) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if !redis.is_up() {
                continue;
            }
            let owed: Vec<((Arc<str>, String), i64)> = {
                let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
                local
                    .iter()
                    .filter(|(_, q)| q.owed != 0)
                    .map(|(k, q)| (k.clone(), q.owed))
                    .collect()
            };
            for ((tenant, period), amount) in owed {
                let key = format!("{}:quota:{period}", tenant_tag(&tenant));
                let ttl = 40 * 86_400u64;
                let r = add_used(&redis, "quota_repay", false, key, amount, ttl).await;
                if let Ok(used) = r {
                    let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(e) = local.get_mut(&(tenant.clone(), period.clone())) {
                        e.owed -= amount;
                        e.used = (used + e.owed).max(0) as u64;
                    }
                    tracing::info!(tenant = %tenant, units = amount, "quota usage from the Redis outage reconciled");
                }
            }
        }
    }
}

/// Adds `delta` to a quota counter and refreshes its expiry, atomically;
/// returns the units now used.
async fn add_used(
    redis: &RedisStore,
    op: &'static str,
    force: bool,
    key: String,
    delta: i64,
    ttl: u64,
) -> Result<i64, crate::redis_store::StoreError> {
    redis
        .call(op, force, |mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("INCRBY")
                .arg(&key)
                .arg(delta)
                .cmd("EXPIRE")
                .arg(&key)
                .arg(ttl)
                .query_async::<(i64, i64)>(&mut c)
                .await
        })
        .await
        .map(|(used, _)| used)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn local_rate_admits_burst_then_refills_with_time() {
        let clock = FakeRelativeClock::default();
        let l = LocalRate::with_clock(
            RateConfig {
                per_second: 2.0,
                burst: 3,
            },
            clock.clone(),
        );
        let admitted = (0..10).filter(|_| l.check().is_ok()).count();
        assert_eq!(admitted, 3);
        let wait = l.check().unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        clock.advance(Duration::from_millis(499));
        assert!(l.check().is_err());
        clock.advance(Duration::from_millis(1));
        let s = l.check().unwrap();
        assert_eq!(s.remaining, 0);
        assert!(l.check().is_err());
        // A long pause refills the burst, never more.
        clock.advance(Duration::from_secs(60));
        let admitted = (0..10).filter(|_| l.check().is_ok()).count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn lease_sizes() {
        let size = |per_second, burst| lease_size(RateConfig { per_second, burst });
        assert_eq!(size(0.001, 5), 1);
        assert_eq!(size(20.0, 40), 1);
        assert_eq!(size(1000.0, 2000), 50);
        assert_eq!(size(1000.0, 80), 10);
        assert_eq!(size(1.0e6, 1_000_000), 100);
    }

    #[test]
    fn remaining_counts_down() {
        let l = LocalRate::with_clock(
            RateConfig {
                per_second: 1.0,
                burst: 4,
            },
            FakeRelativeClock::default(),
        );
        let r: Vec<u64> = (0..4).map(|_| l.check().unwrap().remaining).collect();
        assert_eq!(r, vec![3, 2, 1, 0]);
    }
}
