//! The durable usage ledger: per tenant, UTC day, modality and cache status,
//! the items and units of successful answers (and requests per cache status).
//!
//! Answers are aggregated in memory and written to Redis by one background
//! writer, each (tenant, day) group in one atomic Lua call carrying this
//! process's sequence number for that group: a write whose reply was lost is
//! retried with the same number and applied once, never twice, and a newer
//! batch of a group waits until the older one is confirmed. Redis keeps one
//! small "last applied" key per process, tenant and day. While Redis is down the aggregate keeps
//! growing (bounded by tenants × days × modalities, not by traffic) and is
//! written when Redis returns, and on shutdown. Without Redis the ledger is
//! this process's memory: readable, not durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::date::Day;
use crate::metering::{CacheStatus, Usage};
use crate::metrics::Metrics;
use crate::redis_store::{tenant_tag, RedisStore, StoreError};
use crate::request::Modality;

/// One report row, as `/admin/usage` answers it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Row {
    pub(crate) tenant: String,
    pub(crate) day: String,
    pub(crate) modality: &'static str,
    pub(crate) cache: &'static str,
    pub(crate) items: u64,
    pub(crate) units: u64,
}

/// Field deltas for one (tenant, day) hash.
type Fields = BTreeMap<String, i64>;

struct Batch {
    tenant: Arc<str>,
    day: Day,
    /// Increasing per (tenant, day) in this process; fixed for the life of
    /// the batch, so a retry is recognised.
    seq: u64,
    fields: Fields,
}

/// How long the writer gathers answers before a write.
const FLUSH_WINDOW: Duration = Duration::from_millis(50);
/// Registered tenants, so reports find tenants no longer in config.
const TENANTS_SET: &str = "eg:ledger:tenants";
/// How long the last applied sequence number is remembered (longer than
/// any outage we buffer through).
const SEQ_TTL_SECS: u64 = 40 * 86_400;

/// KEYS[1] the ledger hash, KEYS[2] this process's last applied sequence
/// for it; ARGV[1] the batch's sequence, ARGV[2] TTL, then field/delta pairs.
const APPLY_SCRIPT: &str = r#"
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) <= last then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"#;

fn ledger_key(tenant: &str, day: Day) -> String {
    format!("{}:ledger:{day}", tenant_tag(tenant))
}

fn field(modality: Modality, cache: CacheStatus, what: &str) -> String {
    format!("{}|{}|{what}", modality.as_str(), cache.as_str())
}

pub(crate) struct Ledger {
    redis: Option<Arc<RedisStore>>,
    /// Not yet handed to the writer.
    pending: Mutex<HashMap<(Arc<str>, Day), Fields>>,
    /// Handed to the writer, not yet confirmed by Redis.
    inflight: tokio::sync::Mutex<Vec<Batch>>,
    /// The whole ledger when there is no Redis.
    memory: Mutex<HashMap<(Arc<str>, Day), Fields>>,
    registered: Mutex<HashSet<Arc<str>>>,
    /// Next sequence number per (tenant, day).
    seqs: Mutex<HashMap<(Arc<str>, Day), u64>>,
    /// Names this process's sequence keys.
    instance: String,
    wake: Notify,
    script: redis::Script,
    metrics: Arc<Metrics>,
}

impl Ledger {
    pub(crate) fn new(redis: Option<Arc<RedisStore>>, metrics: Arc<Metrics>) -> Arc<Ledger> {
        let ledger = Arc::new(Ledger {
            redis,
            pending: Mutex::new(HashMap::new()),
            inflight: tokio::sync::Mutex::new(Vec::new()),
            memory: Mutex::new(HashMap::new()),
            registered: Mutex::new(HashSet::new()),
            seqs: Mutex::new(HashMap::new()),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            wake: Notify::new(),
            script: redis::Script::new(APPLY_SCRIPT),
            metrics,
        });
        if ledger.redis.is_some() {
            let l = ledger.clone();
            tokio::spawn(async move { l.writer().await });
        }
        ledger
    }

    /// Records one successful answer.
    pub(crate) fn record(&self, tenant: &Arc<str>, cache: CacheStatus, usage: &Usage) {
        let day = Day::today();
        let target = if self.redis.is_some() {
            &self.pending
        } else {
            &self.memory
        };
        {
            let mut map = target.lock().unwrap_or_else(|p| p.into_inner());
            let fields = map.entry((tenant.clone(), day)).or_default();
            for m in Modality::ALL {
                let n = usage.items.get(m);
                if n > 0 {
                    *fields.entry(field(m, cache, "items")).or_default() += n as i64;
                    *fields.entry(field(m, cache, "units")).or_default() +=
                        usage.units.get(m) as i64;
                }
            }
            *fields
                .entry(format!("requests|{}", cache.as_str()))
                .or_default() += 1;
            if self.redis.is_some() {
                self.metrics.ledger_buffered.set(map.len() as i64);
            }
        }
        self.wake.notify_one();
    }

    async fn writer(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(500), self.wake.notified()).await;
            // Let answers accumulate: one write per group per window, not
            // one per request.
            tokio::time::sleep(FLUSH_WINDOW).await;
            if let Some(redis) = &self.redis {
                if !redis.is_up() && !self.inflight.lock().await.is_empty() {
                    // Nothing will get through; wait for Redis (or the next tick).
                    let _ = tokio::time::timeout(Duration::from_secs(1), redis.wait_up()).await;
                }
            }
            let _ = self.flush_once().await;
        }
    }

    /// Moves pending rows into batches and writes every batch not yet
    /// confirmed. Returns true when nothing is left unwritten.
    pub(crate) async fn flush_once(&self) -> bool {
        let Some(redis) = &self.redis else {
            return true;
        };
        let mut inflight = self.inflight.lock().await;
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
            let waiting: Vec<(Arc<str>, Day)> = pending
                .keys()
                .filter(|k| !inflight.iter().any(|b| b.tenant == k.0 && b.day == k.1))
                .cloned()
                .collect();
            // A group with an unconfirmed batch keeps accumulating until that
            // batch is confirmed: sequence numbers must arrive in order.
            for key in waiting {
                if let Some(fields) = pending.remove(&key) {
                    let seq = seqs.entry(key.clone()).or_insert(0);
                    *seq += 1;
                    inflight.push(Batch {
                        tenant: key.0,
                        day: key.1,
                        seq: *seq,
                        fields,
                    });
                }
            }
        }
        let mut failed = Vec::new();
        for batch in inflight.drain(..) {
            match self.write(redis, &batch).await {
                Ok(()) => {}
                Err(e) => {
                    self.metrics.ledger_flush_errors.inc();
                    tracing::debug!(tenant = %batch.tenant, error = %e, "ledger write failed; kept for retry");
                    failed.push(batch);
                }
            }
        }
        *inflight = failed;
        let left = inflight.len() + self.pending.lock().map(|p| p.len()).unwrap_or(0);
        self.metrics.ledger_buffered.set(left as i64);
        left == 0
    }

    async fn write(&self, redis: &RedisStore, b: &Batch) -> Result<(), StoreError> {
        let tag = tenant_tag(&b.tenant);
        let key = ledger_key(&b.tenant, b.day);
        let marker = format!("{tag}:ledger-seq:{}:{}", b.day, self.instance);
        let script = &self.script;
        let fields = &b.fields;
        let seq = b.seq;
        redis
            .call("ledger", true, |mut c| async move {
                let mut inv = script.key(&key);
                inv.key(&marker).arg(seq).arg(SEQ_TTL_SECS);
                for (f, v) in fields {
                    inv.arg(f).arg(*v);
                }
                inv.invoke_async::<i64>(&mut c).await
            })
            .await?;
        let new = {
            let mut reg = self.registered.lock().unwrap_or_else(|p| p.into_inner());
            reg.insert(b.tenant.clone())
        };
        if new {
            let name = b.tenant.to_string();
            let r = redis
                .call("ledger", true, |mut c| async move {
                    redis::cmd("SADD")
                        .arg(TENANTS_SET)
                        .arg(&name)
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await;
            if r.is_err() {
                let mut reg = self.registered.lock().unwrap_or_else(|p| p.into_inner());
                reg.remove(&b.tenant);
            }
        }
        Ok(())
    }

    /// Writes everything buffered, retrying until `deadline` passes. Used on
    /// shutdown. Returns true when nothing is left unwritten.
    pub(crate) async fn flush(&self, deadline: Duration) -> bool {
        if self.redis.is_none() {
            return true;
        }
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if self.flush_once().await {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Rows for `from..=to`, for all tenants (or one), sorted.
    pub(crate) async fn report(
        &self,
        from: Day,
        to: Day,
        tenant: Option<&str>,
        known_tenants: &[String],
    ) -> Result<Vec<Row>, StoreError> {
        let mut rows = Vec::new();
        match &self.redis {
            None => {
                let memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
                for ((t, day), fields) in memory.iter() {
                    if *day < from || *day > to || tenant.is_some_and(|want| want != &**t) {
                        continue;
                    }
                    rows.extend(rows_from_fields(
                        t,
                        *day,
                        fields.iter().map(|(k, v)| (k.as_str(), *v)),
                    ));
                }
            }
            Some(redis) => {
                let tenants: Vec<String> = match tenant {
                    Some(t) => vec![t.to_string()],
                    None => {
                        let mut set: Vec<String> = redis
                            .call("ledger_read", true, |mut c| async move {
                                redis::cmd("SMEMBERS")
                                    .arg(TENANTS_SET)
                                    .query_async::<Vec<String>>(&mut c)
                                    .await
                            })
                            .await?;
                        set.extend(known_tenants.iter().cloned());
                        set.sort();
                        set.dedup();
                        set
                    }
                };
                for t in tenants {
                    let mut pipe = redis::pipe();
                    let mut days = Vec::new();
                    let mut d = from;
                    while d <= to {
                        pipe.cmd("HGETALL").arg(ledger_key(&t, d));
                        days.push(d);
                        d = d.next();
                    }
                    let maps: Vec<HashMap<String, i64>> = redis
                        .call("ledger_read", true, |mut c| async move {
                            pipe.query_async(&mut c).await
                        })
                        .await?;
                    for (day, fields) in days.into_iter().zip(maps) {
                        rows.extend(rows_from_fields(
                            &t,
                            day,
                            fields.iter().map(|(k, v)| (k.as_str(), *v)),
                        ));
                    }
                }
            }
        }
        rows.sort_by(|a, b| {
            (&a.tenant, &a.day, a.modality, a.cache).cmp(&(&b.tenant, &b.day, b.modality, b.cache))
        });
        Ok(rows)
    }
}

fn rows_from_fields<'a>(
    tenant: &str,
    day: Day,
    fields: impl Iterator<Item = (&'a str, i64)>,
) -> Vec<Row> {
    let mut acc: BTreeMap<(Modality, CacheStatus), (u64, u64)> = BTreeMap::new();
    for (k, v) in fields {
        let mut parts = k.split('|');
        let (Some(m), Some(c), Some(what), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Some(m), Some(c)) = (Modality::from_name(m), CacheStatus::from_name(c)) else {
            continue;
        };
        let e = acc.entry((m, c)).or_default();
        match what {
            "items" => e.0 += v.max(0) as u64,
            "units" => e.1 += v.max(0) as u64,
            _ => {}
        }
    }
    acc.into_iter()
        .map(|((m, c), (items, units))| Row {
            tenant: tenant.to_string(),
            day: day.to_string(),
            modality: m.as_str(),
            cache: c.as_str(),
            items,
            units,
        })
        .collect()
}

/// CSV with a header line; tenant names and days never need quoting.
pub(crate) fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from("tenant,day,modality,cache,items,units\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{}\n",
            r.tenant, r.day, r.modality, r.cache, r.items, r.units
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_ledger_aggregates_rows() {
        let l = Ledger::new(None, Arc::new(Metrics::new().unwrap()));
        let t: Arc<str> = Arc::from("search");
        let mut items = crate::request::Counts::default();
        items.set(Modality::Text, 2);
        items.set(Modality::Audio, 1);
        let weights = crate::config::Weights {
            text: 1,
            image: 1,
            audio: 2,
        };
        let usage = Usage::of(items, &weights);
        l.record(&t, CacheStatus::Miss, &usage);
        l.record(&t, CacheStatus::Miss, &usage);
        l.record(&t, CacheStatus::Hit, &usage);
        let today = Day::today();
        let rows = l.report(today, today, None, &[]).await.unwrap();
        let day = today.to_string();
        let row = |m, c, i, u| Row {
            tenant: "search".into(),
            day: day.clone(),
            modality: m,
            cache: c,
            items: i,
            units: u,
        };
        assert_eq!(
            rows,
            vec![
                row("audio", "hit", 1, 2),
                row("audio", "miss", 2, 4),
                row("text", "hit", 2, 2),
                row("text", "miss", 4, 4),
            ]
        );
        assert!(to_csv(&rows).starts_with("tenant,day,modality,cache,items,units\nsearch,"));
        assert!(l
            .report(today, today, Some("ads"), &[])
            .await
            .unwrap()
            .is_empty());
    }
}
