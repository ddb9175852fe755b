//! Unit quotas per tenant, per UTC day or month.
//!
//! A request's own units are reserved atomically before the upstream call
//! (a Lua check-and-add, so concurrent requests cannot overshoot), settled
//! to upstream's figure on success and released on failure. While Redis is
//! down, `quota_on_store_error` decides: `deny`, or `allow` with local
//! accounting that is added to Redis when it returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{QuotaConfig, QuotaPeriod, StoreErrorPolicy};
use crate::date::Day;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::redis_store::{tenant_tag, RedisStore};

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
pub(crate) struct Reservation {
    tenant: Arc<str>,
    period: String,
    units: u64,
    limit: u64,
    ttl: u64,
    /// Reserved in Redis (else in local accounting).
    in_redis: bool,
    pub(crate) remaining: u64,
    /// Set until settled or released: a reservation dropped while still
    /// open (its task panicked or was cancelled) releases itself.
    open: Option<Arc<Quotas>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(quotas) = self.open.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let r = Reservation {
            tenant: self.tenant.clone(),
            period: std::mem::take(&mut self.period),
            open: None,
            ..*self
        };
        tracing::warn!(tenant = %r.tenant, units = r.units, "a quota reservation was abandoned; releasing it");
        rt.spawn(async move { quotas.release(r).await });
    }
}

#[derive(Default, Clone, Copy)]
struct LocalQuota {
    /// Units used as far as this process knows (Redis's figure when seen).
    used: u64,
    /// Units taken locally while Redis was down, owed to Redis.
    owed: i64,
}
/// Every tenant's quota accounting in this process.
pub(crate) struct Quotas {
    redis: Option<Arc<RedisStore>>,
    policy: StoreErrorPolicy,
    local: Mutex<HashMap<(Arc<str>, String), LocalQuota>>,
    script: redis::Script,
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

impl Quotas {
    pub(crate) fn new(
        redis: Option<Arc<RedisStore>>,
        policy: StoreErrorPolicy,
        metrics: Arc<Metrics>,
    ) -> Quotas {
        Quotas {
            redis,
            policy,
            local: Mutex::new(HashMap::new()),
            script: redis::Script::new(QUOTA_SCRIPT),
            metrics,
        }
    }

    /// Reserves `units` of the tenant's quota.
    pub(crate) async fn reserve(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        quota: QuotaConfig,
        units: u64,
    ) -> Result<Reservation, GatewayError> {
        let QuotaConfig { units: limit, per } = quota;
        let (period, ttl) = period_key(per);
        if let Some(redis) = &self.redis {
            let key = format!("{}:quota:{period}", tenant_tag(tenant));
            let script = &self.script;
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
                    self.remember_used(tenant, &period, used);
                    let remaining = limit.saturating_sub(used);
                    self.publish_remaining(tenant, remaining);
                    return if granted == 1 {
                        Ok(Reservation {
                            tenant: tenant.clone(),
                            period,
                            units,
                            limit,
                            ttl,
                            in_redis: true,
                            remaining,
                            open: Some(self.clone()),
                        })
                    } else {
                        Err(GatewayError::QuotaExceeded)
                    };
                }
                Err(e) => {
                    if self.policy == StoreErrorPolicy::Deny {
                        tracing::warn!(tenant = %tenant, error = %e, "quota store unavailable; denying (quota_on_store_error = deny)");
                        return Err(GatewayError::StoreUnavailable);
                    }
                }
            }
        }
        // Local accounting: the whole quota without Redis, the fallback with it.
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let entry = local.entry((tenant.clone(), period.clone())).or_default();
        let used = entry.used;
        if used + units > limit {
            return Err(GatewayError::QuotaExceeded);
        }
        entry.used += units;
        if self.redis.is_some() {
            entry.owed += units as i64;
        }
        let remaining = limit - entry.used;
        drop(local);
        self.publish_remaining(tenant, remaining);
        Ok(Reservation {
            tenant: tenant.clone(),
            period,
            units,
            limit,
            ttl,
            in_redis: false,
            remaining,
            open: Some(self.clone()),
        })
    }

    /// The request succeeded and upstream billed `actual` units: adjust the
    /// reservation to upstream's figure.
    pub(crate) async fn settle(&self, mut r: Reservation, actual: u64) {
        r.open = None;
        let delta = actual as i64 - r.units as i64;
        if delta != 0 {
            self.adjust(&r, delta).await;
        }
    }

    /// The request failed: give the units back.
    pub(crate) async fn release(&self, mut r: Reservation) {
        r.open = None;
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
    pub(crate) fn remaining(self: &Arc<Self>, tenant: &Arc<str>, q: QuotaConfig) -> u64 {
        let (period, _) = period_key(q.per);
        let key = (tenant.clone(), period);
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
        q.units.saturating_sub(used)
    }

    /// Adds what was accounted locally during an outage to Redis.
    pub(crate) async fn repay_loop(self: Arc<Self>) {
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
