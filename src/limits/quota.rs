//! Unit quotas per tenant, per UTC day or month.
//!
//! A request's own units are reserved atomically before the upstream call
//! (a Lua check-and-add, so concurrent requests cannot overshoot), settled
//! to upstream's figure on success and released on failure. While Redis is
//! down, `quota_on_store_error` decides: `deny`, or `allow` with local
//! accounting that is applied to Redis when it returns.
//!
//! Exactly once, like the ledger: every reservation has an id unique to
//! this process (`<instance>:<n>`), and Redis keeps, next to the tenant's
//! counter, a small per-period hash of reservation records (`r<units>`
//! while reserved). Reserve, settle and release are Lua scripts that look
//! the id up and apply each transition at most once, so a script that
//! timed out at the gateway but ran in Redis is never applied twice: a
//! transition whose answer was lost is queued and sent again with the same
//! id until Redis answers, and a repeat is a no-op. A reserve that went
//! unanswered is never guessed at: the request is refused (`deny`) or
//! admitted on local accounting (`allow`), and the id is then resolved in
//! Redis by its final transition, which applies the reservation if it did
//! not run (a settled local admission) or undoes it if it did (a release).
//! Records of reservations Redis confirmed are deleted when they are
//! settled or released; the others stay as tombstones (`s`, `x`) until the
//! period's keys expire, so a late or repeated script still finds them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{QuotaConfig, QuotaPeriod, StoreErrorPolicy};
use crate::date::Day;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::redis_store::{tenant_tag, RedisStore, StoreError};

/// Check-and-add for one reservation id. KEYS[1] the tenant's counter for
/// the period, KEYS[2] its reservation records; ARGV[1] id, ARGV[2] units,
/// ARGV[3] limit, ARGV[4] TTL in s, ARGV[5] units this replica granted or
/// settled that Redis has not seen yet (counted as used). An id already
/// recorded gets the answer it got before and changes nothing; a released
/// one (`x`) is refused.
/// Returns {granted, used, version}; the version (record `#`) counts
/// changes, so answers that arrive out of order can be told apart.
const RESERVE_SCRIPT: &str = r#"
local rec = redis.call('HGET', KEYS[2], ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local version = tonumber(redis.call('HGET', KEYS[2], '#') or '0')
if rec then
  local granted = 1
  if string.sub(rec, 1, 1) == 'x' then granted = 0 end
  return {granted, used, version}
end
local units = tonumber(ARGV[2])
if used + tonumber(ARGV[5]) + units > tonumber(ARGV[3]) then
  return {0, used, version}
end
used = redis.call('INCRBY', KEYS[1], units)
redis.call('HSET', KEYS[2], ARGV[1], 'r' .. units)
version = redis.call('HINCRBY', KEYS[2], '#', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1, used, version}
"#;

/// Settles or releases reservations, each at most once. KEYS as above;
/// ARGV[1] TTL in s, then five values per reservation: id, units reserved,
/// `s` (settle) or `x` (release), units billed (settle), and `1` when Redis
/// confirmed the reservation (else its reserve went unanswered: a settle
/// then applies it if it did not run, a release blocks it if it runs late).
/// Returns {used, version}.
const FINISH_SCRIPT: &str = r#"
local changed = false
for i = 2, #ARGV, 5 do
  local id = ARGV[i]
  local target = ARGV[i + 2]
  local confirmed = ARGV[i + 4] == '1'
  local rec = redis.call('HGET', KEYS[2], id)
  if not rec and not confirmed then
    if target == 's' then
      redis.call('INCRBY', KEYS[1], ARGV[i + 1])
      rec = 'r' .. ARGV[i + 1]
    else
      redis.call('HSET', KEYS[2], id, 'x')
      changed = true
    end
  end
  if rec and string.sub(rec, 1, 1) == 'r' then
    local held = tonumber(string.sub(rec, 2))
    local delta = -held
    if target == 's' then delta = tonumber(ARGV[i + 3]) - held end
    if delta ~= 0 then redis.call('INCRBY', KEYS[1], delta) end
    if confirmed then
      redis.call('HDEL', KEYS[2], id)
    else
      redis.call('HSET', KEYS[2], id, target)
    end
    changed = true
  end
end
if changed then
  redis.call('HINCRBY', KEYS[2], '#', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local version = tonumber(redis.call('HGET', KEYS[2], '#') or '0')
return {used, version}
"#;

/// Transitions sent in one call when catching up after an outage.
const SYNC_BATCH: usize = 100;

/// Where a reservation's units are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Granted by Redis: in the shared counter, recorded under its id.
    Redis,
    /// Granted here while Redis did not answer. `sent`: the reserve
    /// script was sent and may have run (it failed or timed out rather
    /// than being skipped while Redis was known down).
    Fallback { sent: bool },
    /// No Redis: this process's accounting is the whole quota.
    Memory,
}

/// Units reserved for one request; settle or release it exactly once.
pub(crate) struct Reservation {
    tenant: Arc<str>,
    period: String,
    id: String,
    units: u64,
    limit: u64,
    ttl: u64,
    held: Held,
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
            id: std::mem::take(&mut self.id),
            open: None,
            ..*self
        };
        tracing::warn!(tenant = %r.tenant, units = r.units, "a quota reservation was abandoned; releasing it");
        rt.spawn(async move { quotas.release(r).await });
    }
}

/// How a reservation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Succeeded; upstream billed this many units.
    Settle(u64),
    Release,
}

/// A settle or release (or the release of a reserve that went unanswered)
/// that Redis has not confirmed yet: sent again, with the same id, until it
/// answers.
struct Transition {
    tenant: Arc<str>,
    period: String,
    units: u64,
    target: Target,
    /// Redis confirmed the reservation.
    confirmed: bool,
    ttl: u64,
    /// What this process counts as used for it until Redis confirms it
    /// ([`LocalQuota::unsynced`]): never less than it may already have
    /// changed Redis's figure by, so the count errs on the safe side.
    delta: u64,
}

/// Transitions Redis has not confirmed, by id.
#[derive(Default)]
struct Unsynced {
    by_id: HashMap<String, Transition>,
    /// Per tenant period, the batch that units granted here without
    /// reaching Redis are added to, until it is first sent: such grants
    /// have no record in Redis, so they need no id of their own, and an
    /// outage costs memory per tenant, not per request. Once sent, a
    /// batch never changes (a repeat must be the same transition).
    owed: HashMap<(Arc<str>, String), String>,
}

/// One tenant's quota period as this process sees it.
#[derive(Default, Clone, Copy)]
struct LocalQuota {
    /// Units used per Redis's latest answer (without Redis: all units).
    base: u64,
    /// The version of that answer; older answers are ignored.
    version: i64,
    /// Units granted here while Redis did not answer, still open.
    open: u64,
    /// Units the transitions waiting for Redis may add to its figure
    /// (units they give back are not counted until Redis confirms them).
    unsynced: u64,
    /// Units of reserves sent to Redis and not answered yet.
    asking: u64,
}

impl LocalQuota {
    fn used(&self) -> u64 {
        self.base
            .saturating_add(self.open)
            .saturating_add(self.unsynced)
    }

    /// Units granted or settled here that Redis has not seen yet, at most:
    /// a reserve in Redis counts them as used, so a replica does not spend
    /// them twice.
    fn unseen(&self) -> u64 {
        self.open.saturating_add(self.unsynced)
    }

    /// Takes Redis's figure unless an answer with a newer version was seen.
    fn note(&mut self, used: i64, version: i64) {
        if version >= self.version {
            self.version = version;
            self.base = used.max(0) as u64;
        }
    }
}

/// A reserve in flight to Redis, counted in [`LocalQuota::asking`] until it
/// ends (also when the request is dropped meanwhile).
struct Asking<'a> {
    quotas: &'a Quotas,
    tenant: &'a Arc<str>,
    period: &'a str,
    units: u64,
    ended: bool,
}

impl<'a> Asking<'a> {
    /// Counts the reserve as in flight; also returns the units this
    /// replica holds that Redis has not seen ([`LocalQuota::unseen`]).
    fn start(
        quotas: &'a Quotas,
        tenant: &'a Arc<str>,
        period: &'a str,
        units: u64,
    ) -> (Asking<'a>, u64) {
        let unseen = quotas.with_local(tenant, period, |q| {
            q.asking += units;
            q.unseen()
        });
        let asking = Asking {
            quotas,
            tenant,
            period,
            units,
            ended: false,
        };
        (asking, unseen)
    }

    /// Ends it and runs `f`, atomically.
    fn end<T>(mut self, f: impl FnOnce(&mut LocalQuota) -> T) -> T {
        self.ended = true;
        let units = self.units;
        self.quotas.with_local(self.tenant, self.period, |q| {
            q.asking = q.asking.saturating_sub(units);
            f(q)
        })
    }

    /// The caller takes its units out of `asking` itself.
    fn forget(mut self) {
        self.ended = true;
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let units = self.units;
            self.quotas.with_local(self.tenant, self.period, |q| {
                q.asking = q.asking.saturating_sub(units)
            });
        }
    }
}

/// Runs a closure when dropped, unless disarmed first.
struct Defer<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Defer<F> {
    fn new(f: F) -> Defer<F> {
        Defer(Some(f))
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for Defer<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Every tenant's quota accounting in this process.
pub(crate) struct Quotas {
    redis: Option<Arc<RedisStore>>,
    policy: StoreErrorPolicy,
    local: Mutex<HashMap<(Arc<str>, String), LocalQuota>>,
    /// Transitions Redis has not confirmed.
    unsynced: Mutex<Unsynced>,
    /// Names this process's reservation ids.
    instance: String,
    next_id: AtomicU64,
    reserve_script: redis::Script,
    finish_script: redis::Script,
    metrics: Arc<Metrics>,
}

fn period_key(per: QuotaPeriod) -> (String, u64) {
    let today = Day::today();
    // The name of today's period, formatted once a day per thread (this
    // runs for every request of a tenant with a quota).
    thread_local! {
        static NAMES: std::cell::RefCell<Option<(Day, String, String)>> =
            const { std::cell::RefCell::new(None) };
    }
    let name = NAMES.with(|cell| {
        let mut names = cell.borrow_mut();
        if names.as_ref().is_none_or(|(day, _, _)| *day != today) {
            *names = Some((today, today.to_string(), today.month_key()));
        }
        match (&*names, per) {
            (Some((_, day, _)), QuotaPeriod::Day) => day.clone(),
            (Some((_, _, month)), QuotaPeriod::Month) => month.clone(),
            (None, QuotaPeriod::Day) => today.to_string(),
            (None, QuotaPeriod::Month) => today.month_key(),
        }
    });
    match per {
        // Kept a day past the period so late settlements still find it.
        QuotaPeriod::Day => (name, today.seconds_left() + 86_400),
        QuotaPeriod::Month => {
            let end = today.next_month_start();
            let secs = (end.days() - today.days() - 1).max(0) as u64 * 86_400
                + today.seconds_left()
                + 86_400;
            (name, secs)
        }
    }
}

/// The tenant's counter and reservation records for the period, in its
/// Cluster slot.
fn keys(tenant: &str, period: &str) -> (String, String) {
    let tag = tenant_tag(tenant);
    (
        format!("{tag}:quota:{period}"),
        format!("{tag}:quota-ops:{period}"),
    )
}

impl Quotas {
    pub(crate) fn new(
        redis: Option<Arc<RedisStore>>,
        policy: StoreErrorPolicy,
        metrics: Arc<Metrics>,
    ) -> Quotas {
        let mut instance = uuid::Uuid::new_v4().simple().to_string();
        instance.truncate(16);
        Quotas {
            redis,
            policy,
            local: Mutex::new(HashMap::new()),
            unsynced: Mutex::new(Unsynced::default()),
            instance,
            next_id: AtomicU64::new(1),
            reserve_script: redis::Script::new(RESERVE_SCRIPT),
            finish_script: redis::Script::new(FINISH_SCRIPT),
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
        let id = format!(
            "{}:{}",
            self.instance,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let mut r = Reservation {
            tenant: tenant.clone(),
            period,
            id,
            units,
            limit,
            ttl,
            held: Held::Memory,
            remaining: 0,
            open: None,
        };
        let Some(redis) = &self.redis else {
            return self
                .reserve_here(r)
                .map_err(|_| GatewayError::QuotaExceeded);
        };
        let (counter, records) = keys(tenant, &r.period);
        let script = &self.reserve_script;
        let id = &r.id;
        let (asking, unseen) = Asking::start(self, tenant, &r.period, units);
        // A request dropped while its reserve is in flight (the client went
        // away) may still get it applied: resolved by its id like any
        // unanswered reserve.
        let unanswered = Defer::new(|| self.queue(&r, Target::Release, false, 0));
        let answer = redis
            .call("quota", false, |mut c| async move {
                script
                    .key(&counter)
                    .key(&records)
                    .arg(id)
                    .arg(units)
                    .arg(limit)
                    .arg(ttl)
                    .arg(unseen)
                    .invoke_async::<(i64, i64, i64)>(&mut c)
                    .await
            })
            .await;
        unanswered.disarm();
        match answer {
            Ok((granted, used, version)) => {
                let seen = asking.end(|q| {
                    q.note(used, version);
                    q.used()
                });
                r.remaining = limit.saturating_sub(seen);
                self.publish_remaining(tenant, r.remaining);
                if granted != 1 {
                    return Err(GatewayError::QuotaExceeded);
                }
                r.held = Held::Redis;
                r.open = Some(self.clone());
                Ok(r)
            }
            Err(e) => {
                // Skipped while Redis is known down: it never ran. Otherwise
                // it may have: its id is resolved in Redis later, never guessed.
                let sent = !matches!(e, StoreError::Down);
                if sent {
                    tracing::warn!(tenant = %tenant, id = %r.id, error = %e, "quota reservation unanswered; resolved by its id once Redis answers");
                }
                if self.policy == StoreErrorPolicy::Deny {
                    asking.end(|_| ());
                    tracing::warn!(tenant = %tenant, error = %e, "quota store unavailable; denying (quota_on_store_error = deny)");
                    if sent {
                        self.queue(&r, Target::Release, false, 0);
                    }
                    return Err(GatewayError::StoreUnavailable);
                }
                r.held = Held::Fallback { sent };
                asking.forget();
                self.reserve_here(r).map_err(|r| {
                    if sent {
                        self.queue(&r, Target::Release, false, 0);
                    }
                    GatewayError::QuotaExceeded
                })
            }
        }
    }

    /// Grants `r` from this process's accounting (`r.held` says whether it
    /// is the whole quota or the fallback while Redis does not answer);
    /// gives it back when it does not fit.
    fn reserve_here(self: &Arc<Self>, mut r: Reservation) -> Result<Reservation, Reservation> {
        let memory = r.held == Held::Memory;
        let (units, limit) = (r.units, r.limit);
        let used = self.with_local(&r.tenant, &r.period, |q| {
            if !memory {
                // This reserve's own units, no longer being asked for.
                q.asking = q.asking.saturating_sub(units);
            }
            // Reserves other requests have in flight may be granted: count them.
            if q.used().saturating_add(q.asking).saturating_add(units) > limit {
                return None;
            }
            if memory {
                q.base += units;
            } else {
                q.open += units;
            }
            Some(q.used())
        });
        let Some(used) = used else {
            return Err(r);
        };
        r.remaining = limit.saturating_sub(used);
        self.publish_remaining(&r.tenant, r.remaining);
        r.open = Some(self.clone());
        Ok(r)
    }

    /// The request succeeded and upstream billed `actual` units: adjust the
    /// reservation to upstream's figure.
    pub(crate) async fn settle(&self, r: Reservation, actual: u64) {
        self.finish(r, Target::Settle(actual)).await
    }

    /// The request failed: give the units back.
    pub(crate) async fn release(&self, r: Reservation) {
        self.finish(r, Target::Release).await
    }

    async fn finish(&self, mut r: Reservation, target: Target) {
        r.open = None;
        let billed = match target {
            Target::Settle(n) => n,
            Target::Release => 0,
        };
        match r.held {
            Held::Memory => {
                let used = self.with_local(&r.tenant, &r.period, |q| {
                    q.base = (q.base + billed).saturating_sub(r.units);
                    q.used()
                });
                self.publish_remaining(&r.tenant, r.limit.saturating_sub(used));
            }
            Held::Fallback { sent } => {
                let used = self.with_local(&r.tenant, &r.period, |q| {
                    q.open = q.open.saturating_sub(r.units);
                    q.used()
                });
                self.publish_remaining(&r.tenant, r.limit.saturating_sub(used));
                // One whose reserve may have run is resolved by its own id; a
                // settled one that never reached Redis is added to the
                // tenant's owed batch; a released one is done.
                if sent {
                    self.queue(&r, target, false, billed);
                } else if billed > 0 {
                    self.owe(&r, billed);
                }
            }
            Held::Redis => {
                let Some(redis) = &self.redis else {
                    return;
                };
                // Units it gives back count only once Redis confirms (it may
                // have run already: counting them now could count them
                // twice); units it adds count at once.
                let delta = billed.saturating_sub(r.units);
                // Also sent again if this request is dropped meanwhile.
                let unanswered = Defer::new(|| self.queue(&r, target, true, delta));
                let t = [(r.id.as_str(), r.units, target, true)];
                let answer = self
                    .send_finish(redis, &r.tenant, &r.period, r.ttl, &t)
                    .await;
                match answer {
                    Ok((used, version)) => {
                        unanswered.disarm();
                        let seen = self.with_local(&r.tenant, &r.period, |q| {
                            q.note(used, version);
                            q.used()
                        });
                        self.publish_remaining(&r.tenant, r.limit.saturating_sub(seen));
                    }
                    Err(e) => {
                        tracing::debug!(tenant = %r.tenant, id = %r.id, error = %e, "quota settlement unanswered; sent again by id once Redis answers");
                        drop(unanswered);
                    }
                }
            }
        }
    }

    /// Queues `r`'s final transition for Redis; `delta` is its effect on
    /// Redis's figure, counted meanwhile in what this process sees.
    fn queue(&self, r: &Reservation, target: Target, confirmed: bool, delta: u64) {
        let used = self.with_local(&r.tenant, &r.period, |q| {
            q.unsynced = q.unsynced.saturating_add(delta);
            q.used()
        });
        self.publish_remaining(&r.tenant, r.limit.saturating_sub(used));
        let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        unsynced.by_id.insert(
            r.id.clone(),
            Transition {
                tenant: r.tenant.clone(),
                period: r.period.clone(),
                units: r.units,
                target,
                confirmed,
                ttl: r.ttl,
                delta,
            },
        );
        self.metrics.quota_unsynced.set(unsynced.by_id.len() as i64);
    }

    /// Adds `billed` units, granted and settled here without ever reaching
    /// Redis, to the tenant's owed batch (applied once, under its id).
    fn owe(&self, r: &Reservation, billed: u64) {
        let used = self.with_local(&r.tenant, &r.period, |q| {
            q.unsynced = q.unsynced.saturating_add(billed);
            q.used()
        });
        self.publish_remaining(&r.tenant, r.limit.saturating_sub(used));
        let mut guard = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        let unsynced = &mut *guard;
        let key = (r.tenant.clone(), r.period.clone());
        let batch = unsynced
            .owed
            .get(&key)
            .and_then(|id| unsynced.by_id.get_mut(id));
        if let Some(t) = batch {
            t.units += billed;
            t.target = Target::Settle(t.units);
            t.delta += billed;
            return;
        }
        // A new batch, named by this reservation's id.
        unsynced.owed.insert(key, r.id.clone());
        unsynced.by_id.insert(
            r.id.clone(),
            Transition {
                tenant: r.tenant.clone(),
                period: r.period.clone(),
                units: billed,
                target: Target::Settle(billed),
                confirmed: false,
                ttl: r.ttl,
                delta: billed,
            },
        );
        self.metrics.quota_unsynced.set(unsynced.by_id.len() as i64);
    }

    /// Sends settles and releases of one tenant's period in one call.
    async fn send_finish(
        &self,
        redis: &RedisStore,
        tenant: &str,
        period: &str,
        ttl: u64,
        transitions: &[(&str, u64, Target, bool)],
    ) -> Result<(i64, i64), StoreError> {
        let (counter, records) = keys(tenant, period);
        let script = &self.finish_script;
        redis
            .call("quota_finish", false, |mut c| async move {
                let mut inv = script.key(&counter);
                inv.key(&records).arg(ttl);
                for (id, units, target, confirmed) in transitions {
                    let (t, billed) = match target {
                        Target::Settle(n) => ("s", *n),
                        Target::Release => ("x", 0),
                    };
                    inv.arg(*id)
                        .arg(*units)
                        .arg(t)
                        .arg(billed)
                        .arg(if *confirmed { "1" } else { "0" });
                }
                inv.invoke_async::<(i64, i64)>(&mut c).await
            })
            .await
    }

    /// Runs `f` on the tenant's period as this process sees it.
    fn with_local<T>(
        &self,
        tenant: &Arc<str>,
        period: &str,
        f: impl FnOnce(&mut LocalQuota) -> T,
    ) -> T {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let entry = local
            .entry((tenant.clone(), period.to_string()))
            .or_default();
        f(entry)
    }

    fn publish_remaining(&self, tenant: &str, remaining: u64) {
        self.metrics
            .quota_remaining
            .with_label_values(&[tenant])
            .set(remaining.min(i64::MAX as u64) as i64);
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
                Some(e) => e.used(),
                None => {
                    // Placeholder until the fetch answers; fetched once.
                    local.insert(key.clone(), LocalQuota::default());
                    if let Some(redis) = self.redis.clone() {
                        let me = self.clone();
                        tokio::spawn(async move {
                            let (counter, records) = keys(&key.0, &key.1);
                            let got = redis
                                .call("quota_read", false, |mut c| async move {
                                    redis::pipe()
                                        .cmd("GET")
                                        .arg(&counter)
                                        .cmd("HGET")
                                        .arg(&records)
                                        .arg("#")
                                        .query_async::<(Option<i64>, Option<i64>)>(&mut c)
                                        .await
                                })
                                .await;
                            if let Ok((used, version)) = got {
                                me.with_local(&key.0, &key.1, |q| {
                                    q.note(used.unwrap_or(0), version.unwrap_or(0))
                                });
                            }
                        });
                    }
                    0
                }
            }
        };
        q.units.saturating_sub(used)
    }

    /// Sends every queued transition to Redis, a batch per tenant period.
    /// Returns true when none is left.
    pub(crate) async fn sync_once(&self) -> bool {
        let Some(redis) = &self.redis else {
            return true;
        };
        // Snapshot: (tenant, period) → TTL, [(id, units, target, confirmed)].
        type Group = (u64, Vec<(String, u64, Target, bool)>);
        let mut groups: HashMap<(Arc<str>, String), Group> = HashMap::new();
        {
            let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
            if unsynced.by_id.is_empty() {
                return true;
            }
            // Owed batches are sent from now on: later units go to new ones.
            unsynced.owed.clear();
            for (id, t) in unsynced.by_id.iter() {
                let g = groups
                    .entry((t.tenant.clone(), t.period.clone()))
                    .or_insert((t.ttl, Vec::new()));
                g.0 = g.0.max(t.ttl);
                g.1.push((id.clone(), t.units, t.target, t.confirmed));
            }
        }
        for ((tenant, period), (ttl, all)) in groups {
            for chunk in all.chunks(SYNC_BATCH) {
                let batch: Vec<(&str, u64, Target, bool)> = chunk
                    .iter()
                    .map(|(id, u, t, c)| (id.as_str(), *u, *t, *c))
                    .collect();
                match self.send_finish(redis, &tenant, &period, ttl, &batch).await {
                    Ok((used, version)) => {
                        let mut done = 0u64;
                        {
                            let mut unsynced =
                                self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
                            for (id, ..) in &batch {
                                if let Some(t) = unsynced.by_id.remove(*id) {
                                    done += t.delta;
                                }
                            }
                            self.metrics.quota_unsynced.set(unsynced.by_id.len() as i64);
                        }
                        self.with_local(&tenant, &period, |q| {
                            q.unsynced = q.unsynced.saturating_sub(done);
                            q.note(used, version);
                        });
                        tracing::info!(tenant = %tenant, transitions = batch.len(), "quota transitions from while Redis did not answer applied");
                    }
                    Err(e) => {
                        tracing::debug!(tenant = %tenant, error = %e, "quota transitions still unanswered; kept for retry");
                        return false;
                    }
                }
            }
        }
        self.unsynced
            .lock()
            .map(|u| u.by_id.is_empty())
            .unwrap_or(false)
    }

    /// Applies what was accounted locally while Redis did not answer, once
    /// it answers again.
    pub(crate) async fn sync_loop(self: Arc<Self>) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if redis.is_up() {
                self.sync_once().await;
            }
        }
    }

    /// Sends queued transitions until none is left or `deadline` passes.
    /// Used on shutdown. Returns true when none is left.
    pub(crate) async fn flush(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if self.sync_once().await {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(units: u64) -> QuotaConfig {
        QuotaConfig {
            units,
            per: QuotaPeriod::Day,
        }
    }

    #[tokio::test]
    async fn memory_quota_reserves_settles_and_releases() {
        let q = Arc::new(Quotas::new(
            None,
            StoreErrorPolicy::Allow,
            Arc::new(Metrics::new().unwrap()),
        ));
        let t: Arc<str> = Arc::from("t");
        let a = q.reserve(&t, quota(5), 3).await.unwrap();
        assert_eq!(a.remaining, 2);
        assert!(q.reserve(&t, quota(5), 3).await.is_err());
        let b = q.reserve(&t, quota(5), 2).await.unwrap();
        assert_eq!(b.remaining, 0);
        q.release(b).await;
        assert_eq!(q.remaining(&t, quota(5)), 2);
        q.settle(a, 1).await;
        assert_eq!(q.remaining(&t, quota(5)), 4);
        // Ids are unique.
        let c = q.reserve(&t, quota(5), 1).await.unwrap();
        let d = q.reserve(&t, quota(5), 1).await.unwrap();
        assert_ne!(c.id, d.id);
        drop((c, d));
    }

    #[test]
    fn older_answers_do_not_overwrite_newer_ones() {
        let mut l = LocalQuota::default();
        l.note(6, 7);
        l.note(5, 6);
        assert_eq!(l.used(), 6);
        l.note(4, 8);
        assert_eq!(l.used(), 4);
        l.open = 2;
        l.unsynced = 1;
        assert_eq!(l.used(), 7);
        assert_eq!(l.unseen(), 3);
    }
}
