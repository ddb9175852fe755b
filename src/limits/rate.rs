//! Request rate per tenant.
//!
//! With Redis, a GCRA in one Lua script per tenant key, with Redis's own
//! clock, so all replicas share one bucket; without Redis (or while it is
//! down) governor in this process. A busy tenant's replica leases a few
//! tokens per Redis call ([`lease_size`]) so most requests do not wait on
//! Redis. Leasing loses no tokens: a replica has at most one refill of a
//! tenant's lease in flight (concurrent requests wait for it and share
//! what it brings), a refill adds to the lease instead of replacing it, a
//! refusal leaves leased tokens alone, and tokens still unused after
//! [`LEASE_TTL`] go back to the shared bucket with the replica's next
//! refill. A replica holds at most `lease_size − 1` unused tokens, which
//! bounds what the replicas admit beyond the shared bucket.
//!
//! A lease is topped up ahead of need: the request that leaves it at a
//! quarter of [`lease_size`] or less starts a refill in the background (it
//! asks for what brings the lease back to `lease_size − 1`, so the bound
//! holds) and goes on with its own token, so a busy tenant's requests do
//! not wait for Redis while the lease holds tokens. Refills are counted by
//! whether a request waited for them: `embedgate_rate_lease_refills_total`
//! `{when="waited"|"ahead"}`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::RateConfig;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::redis_store::{tenant_tag, RedisStore};
use prometheus::IntCounter;

/// What the rate limiter said, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateState {
    pub(crate) limit: u32,
    pub(crate) remaining: u64,
    /// Until the bucket is full again.
    pub(crate) reset: Duration,
}

/// A refusal, with the state to report in the headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateRefusal {
    pub(crate) retry_after: Duration,
    pub(crate) state: RateState,
}

impl RateRefusal {
    fn new(cfg: RateConfig, retry_after: Duration) -> RateRefusal {
        RateRefusal {
            retry_after,
            // None left, full again once the wait is over.
            state: RateState {
                limit: cfg.burst,
                remaining: 0,
                reset: retry_after,
            },
        }
    }

    pub(crate) fn error(&self) -> GatewayError {
        GatewayError::RateLimited {
            retry_after: self.retry_after,
        }
    }
}

/// governor in this process.
pub(crate) struct LocalRate<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>,
    clock: C,
    cfg: RateConfig,
}

/// Seconds as a duration, saturating: a rate of 1e-300 per second is valid
/// config and must not panic on overflow.
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

fn governor_quota(cfg: RateConfig) -> Quota {
    // governor counts in u64 nanoseconds (584 years): one request a
    // century is as good as never.
    let period = secs(1.0 / cfg.per_second).clamp(
        Duration::from_nanos(1),
        Duration::from_secs(100 * 365 * 86_400),
    );
    let burst = NonZeroU32::new(cfg.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl LocalRate<DefaultClock> {
    pub(crate) fn new(cfg: RateConfig) -> Self {
        LocalRate::with_clock(cfg, DefaultClock::default())
    }
}

impl<C: Clock + Clone> LocalRate<C> {
    pub(crate) fn with_clock(cfg: RateConfig, clock: C) -> Self {
        let limiter = RateLimiter::direct_with_clock(governor_quota(cfg), clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        LocalRate {
            limiter,
            clock,
            cfg,
        }
    }

    /// Takes one token, or says how long until one is free.
    pub(crate) fn check(&self) -> Result<RateState, Duration> {
        let interval = secs(1.0 / self.cfg.per_second);
        match self.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Ok(RateState {
                    limit: self.cfg.burst,
                    remaining: u64::from(remaining),
                    reset: secs(
                        interval.as_secs_f64()
                            * f64::from(self.cfg.burst - remaining.min(self.cfg.burst)),
                    ),
                })
            }
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }
}

/// GCRA over Redis time that grants up to ARGV[3] tokens at once. KEYS[1]
/// the tenant's rate key; ARGV[1] emission interval in µs, ARGV[2] burst,
/// ARGV[3] tokens wanted, ARGV[4] leased tokens given back unused (their
/// consumption is undone, never past a full bucket).
/// Returns {granted, remaining, retry_us, reset_us}.
const RATE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local back = tonumber(ARGV[4] or '0')
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') - back * interval
if tat < now then tat = now end
local avail = math.floor((burst * interval - (tat - now)) / interval)
if avail < 1 then
  if back > 0 then
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
  return {0, 0, math.ceil((tat - now) - (burst - 1) * interval), math.ceil(tat - now)}
end
local grant = math.min(want, avail)
local new_tat = tat + grant * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {grant, avail - grant, 0, math.ceil(new_tat - now)}
"#;

/// Leased tokens unused after this are not used here any more (never used
/// late); the next refill gives them back to the shared bucket.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(1);

/// Tokens a replica takes per Redis call: 1 (no leasing) for small rates;
/// for busy tenants up to 5 % of a second's rate (50 ms of it), an eighth
/// of the burst, and never more than [`MAX_LEASE`].
/// The largest lease. Every Redis call wakes Redis, which (on a machine
/// where it shares the gateway's cores) preempts a worker: with 100 a
/// tenant at 55k requests/s made 550 refills a second and measured ~10%
/// fewer hits per second, and a longer p99, than with 1,000 (55 a second).
pub(crate) const MAX_LEASE: u64 = 1000;

pub(crate) fn lease_size(cfg: RateConfig) -> u64 {
    let by_rate = (cfg.per_second * 0.05).floor();
    let by_burst = f64::from(cfg.burst / 8);
    by_rate.min(by_burst).clamp(1.0, MAX_LEASE as f64) as u64
}

/// Tokens this replica holds for a tenant.
#[derive(Default)]
struct Lease {
    tokens: u64,
    expires: Option<Instant>,
    /// Tokens to give back with the next refill: leased ones that expired
    /// unused, or one taken for a request that went away meanwhile.
    expired: u64,
    /// The shared bucket's remaining tokens when the lease was taken.
    remaining: u64,
    reset: Duration,
    /// The shared bucket said no: nothing frees up before this, so refuse
    /// locally until then instead of asking Redis again.
    denied_until: Option<Instant>,
}

/// One tenant's rate state in this process, kept across reloads while the
/// tenant's rate is unchanged.
pub(crate) struct TenantRate {
    cfg: RateConfig,
    /// The shared bucket's Redis key, built once: `{eg:<tenant>}:<suffix>`,
    /// in the tenant's Cluster slot.
    key: String,
    /// The whole limit without Redis, the fallback while Redis is down.
    pub(crate) local: LocalRate,
    lease: Mutex<Lease>,
    /// Held while a refill of the lease is in flight: one at a time, so
    /// concurrent requests share its tokens instead of each taking a lease.
    refill: Arc<tokio::sync::Mutex<()>>,
}

impl TenantRate {
    fn new(tenant: &str, suffix: &str, cfg: RateConfig) -> TenantRate {
        TenantRate {
            cfg,
            key: format!("{}:{suffix}", tenant_tag(tenant)),
            local: LocalRate::new(cfg),
            lease: Mutex::new(Lease::default()),
            refill: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Answers from what this replica already knows: a token it leased
    /// from the shared bucket, or a refusal the bucket gave that still
    /// holds. `None`: ask Redis.
    fn take_leased(&self) -> Option<Result<RateState, RateRefusal>> {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if lease.tokens > 0 && lease.expires.is_none_or(|e| now >= e) {
            lease.expired += lease.tokens;
            lease.tokens = 0;
        }
        if lease.tokens > 0 {
            lease.tokens -= 1;
            return Some(Ok(RateState {
                limit: self.cfg.burst,
                remaining: lease.remaining + lease.tokens,
                reset: lease.reset,
            }));
        }
        if let Some(until) = lease.denied_until {
            if now < until {
                return Some(Err(RateRefusal::new(self.cfg, until - now)));
            }
            lease.denied_until = None;
        }
        None
    }

    /// After a token was taken from the lease: how many tokens to ask for
    /// now, ahead of need, when the lease is down to a quarter of `want`
    /// (what brings it back to `want − 1`).
    fn top_up_due(&self, want: u64) -> Option<u64> {
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if lease.tokens == 0 || lease.tokens > want / 4 {
            return None;
        }
        Some(want.saturating_sub(1 + lease.tokens)).filter(|&ask| ask > 0)
    }

    /// Expired tokens to give back with a refill; taken once, so a refill
    /// whose answer is lost cannot give them back twice.
    fn take_expired(&self) -> u64 {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut lease.expired)
    }

    /// Tokens taken but not used: they go back with the next refill.
    fn give_back(&self, n: u64) {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        lease.expired += n;
    }

    /// Adds a refill's spare tokens to the lease.
    fn add_tokens(&self, spare: u64, remaining: u64, reset: Duration) {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        lease.tokens += spare;
        lease.expires = Some(Instant::now() + LEASE_TTL);
        lease.remaining = remaining;
        lease.reset = reset;
        lease.denied_until = None;
    }

    /// Remembers a refusal of the shared bucket; leased tokens stay.
    fn denied(&self, until: Instant, reset: Duration) {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        lease.denied_until = Some(until);
        lease.reset = reset;
    }
}

/// Every tenant's state of one kind of rate in this process, by tenant name.
pub(crate) struct Rates {
    redis: Option<Arc<RedisStore>>,
    /// `embedgate_rate_lease_refills_total{when="waited"}`: refills a
    /// request waited for.
    refills_waited: IntCounter,
    /// `…{when="ahead"}`: top-ups started before the lease ran out.
    refills_ahead: IntCounter,
    /// Names this kind's Redis keys, apart from the tenant's other rates.
    suffix: &'static str,
    by_tenant: RwLock<HashMap<Arc<str>, Arc<TenantRate>>>,
    script: redis::Script,
}

impl Rates {
    pub(crate) fn new(
        redis: Option<Arc<RedisStore>>,
        suffix: &'static str,
        metrics: &Metrics,
    ) -> Rates {
        let refills = |when: &str| metrics.rate_lease_refills.with_label_values(&[when]);
        Rates {
            redis,
            refills_waited: refills("waited"),
            refills_ahead: refills("ahead"),
            suffix,
            by_tenant: RwLock::new(HashMap::new()),
            script: redis::Script::new(RATE_SCRIPT),
        }
    }

    /// The tenant's state for `cfg`: the one it had while its rate is
    /// unchanged (a reload does not refill buckets), else a new one.
    pub(crate) fn state(&self, tenant: &Arc<str>, cfg: RateConfig) -> Arc<TenantRate> {
        {
            let map = self.by_tenant.read().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = map.get(tenant).filter(|s| s.cfg == cfg) {
                return s.clone();
            }
        }
        let mut map = self.by_tenant.write().unwrap_or_else(|p| p.into_inner());
        let s = map
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(TenantRate::new(tenant, self.suffix, cfg)));
        if s.cfg != cfg {
            *s = Arc::new(TenantRate::new(tenant, self.suffix, cfg));
        }
        s.clone()
    }

    /// Forgets tenants no longer configured.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.by_tenant.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|name, _| keep(name));
    }

    /// Takes one request from the tenant's rate.
    pub(crate) async fn check(
        &self,
        tenant: &Arc<str>,
        cfg: RateConfig,
    ) -> Result<RateState, RateRefusal> {
        let state = self.state(tenant, cfg);
        if let Some(redis) = &self.redis {
            if let Some(answer) = state.take_leased() {
                self.top_up(redis, &state);
                return answer;
            }
            let answer = if lease_size(cfg) > 1 {
                // One refill at a time: a request that waited for another's
                // refill takes a token from it.
                let turn = state.refill.clone().lock_owned().await;
                if let Some(answer) = state.take_leased() {
                    self.top_up(redis, &state);
                    return answer;
                }
                self.refills_waited.inc();
                // In a task of its own, so a request cancelled meanwhile
                // loses no tokens: its token goes back to the shared bucket
                // with the next refill.
                let (tx, rx) = tokio::sync::oneshot::channel();
                let (redis, script, st) = (redis.clone(), self.script.clone(), state.clone());
                tokio::spawn(async move {
                    let want = lease_size(st.cfg);
                    let answer = check_shared(&redis, &script, &st, want, true).await;
                    if let Err(Some(Ok(_))) = tx.send(answer) {
                        st.give_back(1);
                    }
                    drop(turn);
                });
                rx.await.ok().flatten()
            } else {
                check_shared(redis, &self.script, &state, 1, true).await
            };
            if let Some(answer) = answer {
                return answer;
            }
            // Redis failed or is down: this process's limiter decides.
        }
        state
            .local
            .check()
            .map_err(|wait| RateRefusal::new(cfg, wait))
    }

    /// Starts a top-up of the tenant's lease in the background when it is
    /// due ([`TenantRate::top_up_due`]) and no refill is in flight (the
    /// refill turn is free; the top-up holds it until it is done); the
    /// request goes on with the token it took.
    fn top_up(&self, redis: &Arc<RedisStore>, state: &Arc<TenantRate>) {
        let Some(ask) = state.top_up_due(lease_size(state.cfg)) else {
            return;
        };
        let Ok(turn) = state.refill.clone().try_lock_owned() else {
            // A refill is in flight: its tokens come soon enough.
            return;
        };
        self.refills_ahead.inc();
        let (redis, script, st) = (redis.clone(), self.script.clone(), state.clone());
        tokio::spawn(async move {
            check_shared(&redis, &script, &st, ask, false).await;
            drop(turn);
        });
    }
}

/// Asks the shared bucket for `want` tokens (and gives back expired leased
/// tokens). For a caller (`for_caller`), takes one token for it and adds
/// the rest to the lease; a top-up adds them all. `None` when Redis did not
/// answer.
async fn check_shared(
    redis: &RedisStore,
    script: &redis::Script,
    state: &TenantRate,
    want: u64,
    for_caller: bool,
) -> Option<Result<RateState, RateRefusal>> {
    let cfg = state.cfg;
    let key = &state.key;
    let interval_us = (1_000_000.0 / cfg.per_second).max(1.0).round() as u64;
    let back = state.take_expired();
    let (granted, remaining, retry_us, reset_us) = redis
        .call("rate", false, |mut c| async move {
            script
                .key(key)
                .arg(interval_us)
                .arg(cfg.burst)
                .arg(want)
                .arg(back)
                .invoke_async::<(i64, i64, i64, i64)>(&mut c)
                .await
        })
        .await
        .ok()?;
    let reset = Duration::from_micros(reset_us.max(0) as u64);
    if granted < 1 {
        let retry_after = Duration::from_micros(retry_us.max(0) as u64);
        state.denied(Instant::now() + retry_after, reset);
        return Some(Err(RateRefusal::new(cfg, retry_after)));
    }
    let remaining = remaining.max(0) as u64;
    let spare = granted as u64 - u64::from(for_caller);
    if spare > 0 {
        state.add_tokens(spare, remaining, reset);
    }
    Some(Ok(RateState {
        limit: cfg.burst,
        remaining: remaining + spare,
        reset,
    }))
}

#[cfg(test)]
mod tests {
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
    fn extreme_rates_do_not_panic() {
        for per_second in [1e-300, 1e-9, 1e9, f64::MAX] {
            let l = LocalRate::with_clock(
                RateConfig {
                    per_second,
                    burst: 2,
                },
                FakeRelativeClock::default(),
            );
            assert!(l.check().is_ok(), "{per_second}");
        }
    }

    #[test]
    fn lease_sizes() {
        let size = |per_second, burst| lease_size(RateConfig { per_second, burst });
        assert_eq!(size(0.001, 5), 1);
        assert_eq!(size(20.0, 40), 1);
        assert_eq!(size(1000.0, 2000), 50);
        assert_eq!(size(1000.0, 80), 10);
        assert_eq!(size(1.0e6, 1_000_000), 1000);
        assert_eq!(size(4000.0, 1_000_000), 200);
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

    #[test]
    fn reload_keeps_unchanged_limiters() {
        let rates = Rates::new(None, "rate", &Metrics::new().unwrap());
        let a: Arc<str> = Arc::from("a");
        let cfg = RateConfig {
            per_second: 1.0,
            burst: 2,
        };
        let l1 = rates.state(&a, cfg);
        let l2 = rates.state(&a, cfg);
        assert!(Arc::ptr_eq(&l1, &l2));
        let changed = RateConfig { burst: 3, ..cfg };
        let l3 = rates.state(&a, changed);
        assert!(!Arc::ptr_eq(&l1, &l3));
        rates.retain(|n| n != "a");
        assert!(!Arc::ptr_eq(&l3, &rates.state(&a, changed)));
    }
}
