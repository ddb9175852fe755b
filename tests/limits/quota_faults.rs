//! Quota under a slow Redis: scripts that time out at the gateway (250 ms)
//! but still run in Redis must be applied once, never twice, and never
//! leak: the counter in Redis ends equal to the units of the answers
//! admitted, under both `quota_on_store_error` policies.

use super::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const QUOTA: u64 = 200;
/// Requests sent at once per wave.
const WAVE: usize = 8;

/// Makes Redis slower than the gateway's timeout, in bursts: `DEBUG SLEEP`
/// from a side connection blocks Redis, and every command that arrives
/// meanwhile (quota scripts included) runs when the sleep ends, after the
/// gateway gave up waiting for it.
struct SlowRedis {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl SlowRedis {
    fn start(redis: &Redis) -> SlowRedis {
        let mut conn = redis.conn();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            // Pauses between sleeps (load shaping, not waiting for state).
            let pauses = [40u64, 150, 260, 90, 200];
            let mut n = 0u32;
            while !s.load(Ordering::SeqCst) {
                let _: () = redis::cmd("DEBUG")
                    .arg("SLEEP")
                    .arg("0.4")
                    .query(&mut conn)
                    .unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(pauses[n as usize % pauses.len()]));
            }
            n
        });
        SlowRedis {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the sleeps; returns how many there were.
    fn stop(mut self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for SlowRedis {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[derive(Default, Debug)]
struct Tally {
    /// 200 answers and their units.
    admitted: u64,
    units: u64,
    /// 429 Throttling.AllocationQuota.
    quota_refused: u64,
    /// 503 (quota store unavailable, `deny`).
    unavailable: u64,
    /// Upstream failures (their reservations are released).
    failed: u64,
}

impl Tally {
    fn add(&mut self, r: &Reply) {
        match r.status {
            200 => {
                self.admitted += 1;
                self.units += r.json()["usage"]["total_usage"].as_u64().unwrap();
            }
            429 => {
                assert_quota_refusal(r);
                self.quota_refused += 1;
            }
            503 => {
                assert_eq!(r.code(), "ServiceUnavailable", "{}", r.text);
                self.unavailable += 1;
            }
            400 => {
                assert_eq!(r.code(), "InvalidURL", "{}", r.text);
                self.failed += 1;
            }
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
}

/// One wave of concurrent requests: new texts (1 unit) and audio (2 units),
/// which go upstream, and repeats of the previous wave's, which are cache
/// hits from memory (no Redis call for the cache, only for the quota).
async fn wave(gw: &Arc<TestGateway>, n: usize) -> Vec<Reply> {
    let item = |n: usize, i: usize| {
        if i % 3 == 2 {
            body(&[("audio", &format!("https://example.com/w{n}-{i}.flac"))])
        } else {
            text_body(&format!("wave {n} item {i}"))
        }
    };
    let mut set = tokio::task::JoinSet::new();
    for i in 0..WAVE {
        let gw = gw.clone();
        let b = if i % 2 == 1 && n > 0 {
            item(n - 1, i - 1)
        } else {
            item(n, i)
        };
        set.spawn(async move { gw.embed("kq", &b).await });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

/// Reservation records still open (reserved, never settled or released)
/// in the tenant's per-period record hash.
fn open_reservations(redis: &Redis, tenant: &str) -> Vec<(String, String)> {
    let key = format!("{{eg:{tenant}}}:quota-ops:{}", today());
    let all: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    all.into_iter()
        .filter(|(id, state)| !id.starts_with('#') && state.starts_with('r'))
        .collect()
}

async fn quota_is_exact_under_a_slow_redis(policy: &str) {
    let redis = Redis::start();
    let gw = TestGateway::builder()
        .redis(&redis)
        .tenant("q", "kq")
        .quota(QUOTA, Per::Day)
        .set("limits", format!("quota_on_store_error = \"{policy}\""))
        .set("limits", "quota_counts_hits = true")
        .start()
        .await;
    wait_redis(&gw, "up").await;
    gw.fake.set_latency_ms(20);
    let gw = Arc::new(gw);

    // Waves of concurrent requests while Redis keeps stalling, for a few
    // seconds and until the quota refuses.
    let slow = SlowRedis::start(&redis);
    let mut during = Tally::default();
    let started = std::time::Instant::now();
    // Load shaping: at most one wave per 100 ms.
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    for n in 0.. {
        pace.tick().await;
        if n % 4 == 1 {
            // Some upstream failures: their reservations are released.
            gw.fake.push_faults([Fault::Status(400, "InvalidURL")]);
        }
        let replies = wave(&gw, n).await;
        for r in &replies {
            during.add(r);
        }
        let elapsed = started.elapsed();
        // Go on until the stalls have caught quota scripts (asserted below),
        // which on a loaded machine can take more than a few waves.
        let logs = gw.logs();
        let caught = logs.contains("quota reservation unanswered")
            && logs.contains("quota transitions from while Redis did not answer applied");
        if (elapsed > Duration::from_secs(4) && during.quota_refused >= 2 * WAVE as u64 && caught)
            || elapsed > Duration::from_secs(40)
        {
            break;
        }
    }
    let sleeps = slow.stop();
    eprintln!("{policy}: during {sleeps} Redis stalls: {during:?}");
    if policy == "allow" {
        assert_eq!(during.unavailable, 0, "{during:?}");
    }
    assert!(
        during.units <= QUOTA,
        "{policy}: {} units admitted of a {QUOTA}-unit quota",
        during.units
    );

    // Once Redis answers again, every transition has reached it, once.
    wait_redis(&gw, "up").await;
    let key = quota_key("q");
    let want = during.units as i64;
    let settled = {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = redis_get(&redis, &key).unwrap_or(0);
            let unsynced = metric(&gw.metrics().await, "embedgate_quota_unsynced", &[]);
            if got == want && unsynced == 0.0 && open_reservations(&redis, "q").is_empty() {
                break got;
            }
            if std::time::Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    eprintln!("{policy}: counter {settled} for {want} units admitted");
    assert_eq!(
        settled, want,
        "{policy}: the Redis counter says {settled} units for {want} admitted"
    );
    assert_eq!(open_reservations(&redis, "q"), vec![]);

    // The rest of the quota is still there, exactly: one-unit requests are
    // admitted until the counter reaches the quota, then refused.
    let mut after = Tally::default();
    // (Upstream failures left over from above may come first.)
    for i in 0..QUOTA + 50 {
        let r = gw.embed("kq", &text_body(&format!("after {i}"))).await;
        after.add(&r);
        if r.status == 429 {
            break;
        }
    }
    eprintln!("{policy}: after the stalls: {after:?}");
    assert_eq!(after.quota_refused, 1, "{policy}: {after:?}");
    assert_eq!(
        during.units + after.units,
        QUOTA,
        "{policy}: {} + {} units admitted of a {QUOTA}-unit quota",
        during.units,
        after.units
    );
    assert_eq!(redis_get(&redis, &key), Some(QUOTA as i64));

    // The stalls did hit quota scripts: reserves went unanswered (and were
    // resolved by id), and transitions were sent again.
    let logs = gw.logs();
    let unanswered = logs.matches("quota reservation unanswered").count();
    let resent = logs
        .matches("quota transitions from while Redis did not answer applied")
        .count();
    eprintln!("{policy}: {unanswered} reserves unanswered, {resent} batches sent again");
    assert!(
        unanswered > 0 && resent > 0,
        "{policy}: no quota script was caught by a stall"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_is_exact_under_a_slow_redis_with_allow() {
    quota_is_exact_under_a_slow_redis("allow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_is_exact_under_a_slow_redis_with_deny() {
    quota_is_exact_under_a_slow_redis("deny").await;
}
