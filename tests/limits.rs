//! Per-tenant rate limits and unit quotas (SPEC §3), across replicas on one
//! Redis, through a Redis outage (SPEC §5), and under hot reload; plus
//! `embedgate check-config`.
//!
//! Rates use `per_second = 0.001` (one token per 1000 s) so admission counts
//! are exact without controlling time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use embedgate::fake_dashscope::Fault;

// ---------- local helpers ----------

/// A rate limit of `burst` that never refills within a test.
fn rate(burst: u32) -> String {
    format!("rate = {{ per_second = 0.001, burst = {burst} }}")
}

fn quota(units: u64) -> String {
    format!("quota = {{ units = {units}, per = \"day\" }}")
}

/// Today's date in UTC, `YYYY-MM-DD` (computed here, independently of the
/// gateway's own date code).
fn today_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Howard Hinnant's civil_from_days.
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The Redis key holding the tenant's units used today.
fn quota_key(tenant: &str) -> String {
    format!("{{eg:{tenant}}}:quota:{}", today_utc())
}

fn redis_get(redis: &Redis, key: &str) -> Option<i64> {
    redis::cmd("GET").arg(key).query(&mut redis.conn()).unwrap()
}

/// Polls until the Redis key holds `want`.
async fn redis_eventually(redis: &Redis, key: &str, want: i64) {
    let what = format!("redis {key} == {want}");
    eventually(15, &what, async || {
        (redis_get(redis, key) == Some(want)).then_some(())
    })
    .await;
}

/// Polls `/readyz` until it reports Redis as `state` ("up" or "down"); it
/// must answer 200 either way.
async fn wait_redis(gw: &Gateway, state: &str) {
    let what = format!("/readyz redis == {state}");
    eventually(20, &what, async || {
        let r = gw.get("/readyz", None).await;
        assert_eq!(r.status, 200, "/readyz: {}", r.text);
        (r.json()["redis"] == state).then_some(())
    })
    .await;
}

fn num_header(r: &Reply, name: &str) -> Option<u64> {
    r.header(name).map(|v| {
        v.trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{name}: {v:?} is not an integer: {e}"))
    })
}

/// Asserts a rate-limit refusal: 429 `Throttling.RateQuota`, an integer
/// `Retry-After` of at least 1 s, `x-should-retry: true`.
fn assert_rate_refusal(r: &Reply) {
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.code(), "Throttling.RateQuota", "{}", r.text);
    let ra = num_header(r, "retry-after").expect("Retry-After on a rate refusal");
    assert!(ra >= 1, "Retry-After {ra}");
    assert_eq!(r.header("x-should-retry"), Some("true"));
}

/// Asserts a quota refusal: 429 `Throttling.AllocationQuota`, `x-should-retry: false`.
fn assert_quota_refusal(r: &Reply) {
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.code(), "Throttling.AllocationQuota", "{}", r.text);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    // Refused before any upstream call: neither a hit nor a miss.
    assert_eq!(r.header("x-cache"), None);
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
}

fn count(replies: &[Reply], status: u16) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

/// Sends `n` distinct one-text requests at once, round-robin over `gws`.
async fn concurrent(gws: &[Arc<Gateway>], key: &str, prefix: &str, n: usize) -> Vec<Reply> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let gw = gws[i % gws.len()].clone();
        let key = key.to_string();
        let b = text_body(&format!("{prefix} {i}"));
        set.spawn(async move { gw.embed(&key, &b).await });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

// ---------- 1. rate limit ----------

async fn rate_burst_is_exact(redis: Option<&Redis>) {
    let fake = Fake::start().await;
    let extra = rate(5);
    let gw = Gateway::start(&config(
        &fake,
        redis,
        &[Tenant {
            name: "r",
            key: "kr",
            extra: &extra,
        }],
        "",
    ));
    if redis.is_some() {
        wait_redis(&gw, "up").await;
    }
    let mut replies = Vec::new();
    for i in 0..12 {
        replies.push(gw.embed("kr", &text_body(&format!("rate {i}"))).await);
    }
    let mut want = vec![200; 5];
    want.extend([429; 7]);
    assert_eq!(statuses(&replies), want);
    let remaining: Vec<u64> = replies[..5]
        .iter()
        .map(|r| {
            assert_eq!(r.header("ratelimit-limit"), Some("5"), "{:?}", r.headers);
            num_header(r, "ratelimit-remaining").expect("RateLimit-Remaining")
        })
        .collect();
    assert_eq!(remaining, vec![4, 3, 2, 1, 0]);
    for r in &replies[5..] {
        assert_rate_refusal(r);
    }
    assert_eq!(fake.calls(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_burst_in_memory() {
    rate_burst_is_exact(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_burst_with_redis() {
    let redis = Redis::start();
    rate_burst_is_exact(Some(&redis)).await;
}

/// SPEC §1: rate state is on every authenticated response, refusals included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_refusal_carries_rate_headers() {
    let fake = Fake::start().await;
    let extra = rate(1);
    let gw = Gateway::start(&config(
        &fake,
        None,
        &[Tenant {
            name: "r",
            key: "kr",
            extra: &extra,
        }],
        "",
    ));
    assert_eq!(gw.embed("kr", &text_body("one")).await.status, 200);
    let r = gw.embed("kr", &text_body("two")).await;
    assert_rate_refusal(&r);
    assert_eq!(r.header("ratelimit-limit"), Some("1"), "{:?}", r.headers);
    assert_eq!(
        r.header("ratelimit-remaining"),
        Some("0"),
        "{:?}",
        r.headers
    );
}

// ---------- 2. quota ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_sequential_text_is_exact() {
    let fake = Fake::start().await;
    let extra = quota(10);
    let gw = Gateway::start(&config(
        &fake,
        None,
        &[Tenant {
            name: "q",
            key: "kq",
            extra: &extra,
        }],
        "",
    ));
    let mut replies = Vec::new();
    for i in 0..12 {
        replies.push(gw.embed("kq", &text_body(&format!("quota {i}"))).await);
    }
    let mut want = vec![200; 10];
    want.extend([429; 2]);
    assert_eq!(statuses(&replies), want);
    let remaining: Vec<u64> = replies[..10]
        .iter()
        .map(|r| {
            assert_eq!(r.cache(), "MISS");
            num_header(r, "x-quota-remaining").expect("X-Quota-Remaining")
        })
        .collect();
    assert_eq!(remaining, (0..10).rev().collect::<Vec<u64>>());
    for r in &replies[10..] {
        assert_quota_refusal(r);
    }
    assert_eq!(fake.calls(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_counts_audio_at_its_weight() {
    let fake = Fake::start().await;
    let extra = quota(5);
    let gw = Gateway::start(&config(
        &fake,
        None,
        &[Tenant {
            name: "a",
            key: "ka",
            extra: &extra,
        }],
        "",
    ));
    let audio = |n: u32| body(&[("audio", &format!("https://example.com/a{n}.flac"))]);
    let r1 = gw.embed("ka", &audio(1)).await;
    assert_eq!(r1.status, 200, "{}", r1.text);
    assert_eq!(r1.json()["usage"]["total_usage"], 2);
    assert_eq!(num_header(&r1, "x-quota-remaining"), Some(3));
    let r2 = gw.embed("ka", &audio(2)).await;
    assert_eq!(r2.status, 200, "{}", r2.text);
    assert_eq!(num_header(&r2, "x-quota-remaining"), Some(1));
    // Needs 2, 1 left.
    let r3 = gw.embed("ka", &audio(3)).await;
    assert_quota_refusal(&r3);
    // One text unit still fits.
    let r4 = gw.embed("ka", &text_body("fits")).await;
    assert_eq!(r4.status, 200, "{}", r4.text);
    assert_eq!(num_header(&r4, "x-quota-remaining"), Some(0));
    assert_quota_refusal(&gw.embed("ka", &text_body("does not fit")).await);
    assert_eq!(fake.calls(), 3);
}

// ---------- 3. cache hits and quota ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_do_not_spend_quota_by_default() {
    let fake = Fake::start().await;
    let extra = quota(3);
    let gw = Gateway::start(&config(
        &fake,
        None,
        &[Tenant {
            name: "q",
            key: "kq",
            extra: &extra,
        }],
        "",
    ));
    for t in ["a", "b", "c"] {
        let r = gw.embed("kq", &text_body(t)).await;
        assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    }
    assert_quota_refusal(&gw.embed("kq", &text_body("d")).await);
    for t in ["a", "b", "c", "a"] {
        let r = gw.embed("kq", &text_body(t)).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    assert_eq!(fake.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_spend_quota_with_quota_counts_hits() {
    let fake = Fake::start().await;
    let extra = quota(3);
    let gw = Gateway::start(&config(
        &fake,
        None,
        &[Tenant {
            name: "q",
            key: "kq",
            extra: &extra,
        }],
        "[limits]\nquota_counts_hits = true\n",
    ));
    let r = gw.embed("kq", &text_body("a")).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    assert_eq!(num_header(&r, "x-quota-remaining"), Some(2));
    let r = gw.embed("kq", &text_body("a")).await;
    assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    assert_eq!(num_header(&r, "x-quota-remaining"), Some(1));
    let r = gw.embed("kq", &text_body("b")).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    assert_eq!(num_header(&r, "x-quota-remaining"), Some(0));
    // Quota spent: a hit is refused too.
    assert_quota_refusal(&gw.embed("kq", &text_body("a")).await);
    assert_quota_refusal(&gw.embed("kq", &text_body("c")).await);
    assert_eq!(fake.calls(), 2);
}

// ---------- 4. concurrent misses ----------

async fn concurrent_quota_is_exact(redis: Option<&Redis>) {
    let fake = Fake::start().await;
    fake.state.latency_ms.store(100, Ordering::SeqCst);
    let extra = quota(10);
    let gw = Arc::new(Gateway::start(&config(
        &fake,
        redis,
        &[Tenant {
            name: "q",
            key: "kq",
            extra: &extra,
        }],
        "",
    )));
    if redis.is_some() {
        wait_redis(&gw, "up").await;
    }
    let replies = concurrent(std::slice::from_ref(&gw), "kq", "concurrent", 30).await;
    assert_eq!(count(&replies, 200), 10, "{:?}", statuses(&replies));
    assert_eq!(count(&replies, 429), 20, "{:?}", statuses(&replies));
    for r in replies.iter().filter(|r| r.status == 429) {
        assert_quota_refusal(r);
    }
    assert_eq!(fake.calls(), 10);
    if let Some(redis) = redis {
        assert_eq!(redis_get(redis, &quota_key("q")), Some(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_cannot_overshoot_quota_in_memory() {
    concurrent_quota_is_exact(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_cannot_overshoot_quota_with_redis() {
    let redis = Redis::start();
    concurrent_quota_is_exact(Some(&redis)).await;
}

// ---------- 5. failed upstream calls release quota ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upstream_calls_release_quota() {
    let fake = Fake::start().await;
    let extra = quota(3);
    let gw = Gateway::start(&config(
        &fake,
        None,
        &[Tenant {
            name: "q",
            key: "kq",
            extra: &extra,
        }],
        "",
    ));
    fake.state.push_faults([
        Fault::Status(400, "InvalidURL"),
        Fault::Status(400, "InvalidURL"),
    ]);
    for i in 0..2 {
        let r = gw.embed("kq", &text_body(&format!("bad {i}"))).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.code(), "InvalidURL");
    }
    assert_eq!(fake.calls(), 2);
    for i in 0..3 {
        let r = gw.embed("kq", &text_body(&format!("good {i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(num_header(&r, "x-quota-remaining"), Some(2 - i));
    }
    assert_quota_refusal(&gw.embed("kq", &text_body("over")).await);
    assert_eq!(fake.calls(), 5);
}

// ---------- 6. two replicas on one Redis ----------

/// A busy tenant's replicas lease tokens in batches: far fewer Redis calls
/// than requests, and the shared bucket still bounds what both admit
/// together (burst + refill + each replica's unused lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_tokens_keep_replicas_within_the_shared_rate() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    // lease_size = min(400 * 5 %, 160 / 8, 100) = 20 tokens per Redis call.
    let (per_second, burst, lease) = (400.0_f64, 160u64, 20u64);
    let cfg = config(
        &fake,
        Some(&redis),
        &[Tenant {
            name: "busy",
            key: "k-busy",
            extra: "rate = { per_second = 400, burst = 160 }",
        }],
        "",
    );
    let a = Gateway::start(&cfg);
    let b = Gateway::start(&cfg);
    let body = text_body("lease me");
    let started = std::time::Instant::now();
    // Within the burst everything is admitted, with few Redis calls.
    let evals_before = evalsha_calls(&redis);
    for i in 0..140 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = gw.embed("k-busy", &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let calls = evalsha_calls(&redis) - evals_before;
    // 140 requests in leases of 20, plus ledger writes (EVALSHA too).
    assert!(
        calls < 60,
        "{calls} EVALSHA calls for 140 requests: no leasing?"
    );
    // Past the burst, both replicas together stay within the shared rate.
    let mut admitted = 140u64;
    for i in 0..600 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = gw.embed("k-busy", &body).await;
        match r.status {
            200 => admitted += 1,
            429 => assert_eq!(r.code(), "Throttling.RateQuota"),
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ceiling = burst + (elapsed * per_second).ceil() as u64 + 2 * (lease - 1);
    assert!(
        admitted <= ceiling,
        "admitted {admitted} > bound {ceiling} over {elapsed:.3}s"
    );
    assert!(admitted >= burst, "admitted only {admitted}");
}

fn evalsha_calls(redis: &Redis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())
        .unwrap();
    info.lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_rate_and_quota() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    let (r6, q8, c8) = (rate(6), quota(8), quota(8));
    let cfg = config(
        &fake,
        Some(&redis),
        &[
            Tenant {
                name: "r6",
                key: "k-r6",
                extra: &r6,
            },
            Tenant {
                name: "q8",
                key: "k-q8",
                extra: &q8,
            },
            Tenant {
                name: "c8",
                key: "k-c8",
                extra: &c8,
            },
        ],
        "",
    );
    let a = Arc::new(Gateway::start(&cfg));
    let b = Arc::new(Gateway::start(&cfg));
    wait_redis(&a, "up").await;
    wait_redis(&b, "up").await;
    let gws = [a.clone(), b.clone()];

    // Rate: burst 6 in total, alternating replicas.
    let mut replies = Vec::new();
    for i in 0..12 {
        replies.push(
            gws[i % 2]
                .embed("k-r6", &text_body(&format!("r {i}")))
                .await,
        );
    }
    let mut want = vec![200; 6];
    want.extend([429; 6]);
    assert_eq!(statuses(&replies), want);
    for r in &replies[6..] {
        assert_rate_refusal(r);
    }

    // Quota: 8 units in total, alternating replicas.
    let mut replies = Vec::new();
    for i in 0..12 {
        replies.push(
            gws[i % 2]
                .embed("k-q8", &text_body(&format!("q {i}")))
                .await,
        );
    }
    let mut want = vec![200; 8];
    want.extend([429; 4]);
    assert_eq!(statuses(&replies), want);
    for r in &replies[8..] {
        assert_quota_refusal(r);
    }
    assert_eq!(redis_get(&redis, &quota_key("q8")), Some(8));
    assert_eq!(fake.calls(), 6 + 8);

    // Quota, concurrently across both replicas.
    fake.state.latency_ms.store(100, Ordering::SeqCst);
    let replies = concurrent(&gws, "k-c8", "c", 24).await;
    assert_eq!(count(&replies, 200), 8, "{:?}", statuses(&replies));
    assert_eq!(count(&replies, 429), 16, "{:?}", statuses(&replies));
    assert_eq!(redis_get(&redis, &quota_key("c8")), Some(8));
    assert_eq!(fake.calls(), 6 + 8 + 8);
}

// ---------- 7. Redis outage ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_allow_falls_back_to_local_limits_and_reconciles() {
    let mut redis = Redis::start();
    let fake = Fake::start().await;
    let (r5, q6) = (rate(5), quota(6));
    let gw = Gateway::start(&config(
        &fake,
        Some(&redis),
        &[
            Tenant {
                name: "r",
                key: "kr",
                extra: &r5,
            },
            Tenant {
                name: "q",
                key: "kq",
                extra: &q6,
            },
        ],
        "",
    ));
    wait_redis(&gw, "up").await;

    // Before the outage: Redis holds the state.
    for i in 0..2 {
        let r = gw.embed("kr", &text_body(&format!("r before {i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    for i in 0..3 {
        let r = gw.embed("kq", &text_body(&format!("q before {i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(redis_get(&redis, &quota_key("q")), Some(3));
    assert_eq!(fake.calls(), 5);

    redis.kill();

    // Quota: local accounting continues from Redis's last figure (3 of 6).
    let mut replies = Vec::new();
    for i in 0..5 {
        replies.push(gw.embed("kq", &text_body(&format!("q during {i}"))).await);
    }
    assert_eq!(statuses(&replies), vec![200, 200, 200, 429, 429]);
    for r in &replies[..3] {
        assert_eq!(r.cache(), "MISS");
    }
    for r in &replies[3..] {
        assert_quota_refusal(r);
    }

    // Rate: this replica's own limiter enforces the burst.
    let mut replies = Vec::new();
    for i in 0..8 {
        replies.push(gw.embed("kr", &text_body(&format!("r during {i}"))).await);
    }
    let mut want = vec![200; 5];
    want.extend([429; 3]);
    assert_eq!(statuses(&replies), want);
    for r in &replies[5..] {
        assert_rate_refusal(r);
    }
    assert_eq!(fake.calls(), 5 + 3 + 5);

    wait_redis(&gw, "down").await;

    redis.restart();
    wait_redis(&gw, "up").await;
    // The 3 units used during the outage are added to Redis.
    redis_eventually(&redis, &quota_key("q"), 6).await;
    assert_quota_refusal(&gw.embed("kq", &text_body("q after")).await);
    assert_eq!(redis_get(&redis, &quota_key("q")), Some(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_deny_refuses_quota_misses_with_503() {
    let mut redis = Redis::start();
    let fake = Fake::start().await;
    let q = quota(100);
    let gw = Gateway::start(&config(
        &fake,
        Some(&redis),
        &[
            Tenant {
                name: "q",
                key: "kq",
                extra: &q,
            },
            Tenant {
                name: "free",
                key: "kf",
                extra: "",
            },
        ],
        "[limits]\nquota_on_store_error = \"deny\"\n",
    ));
    wait_redis(&gw, "up").await;
    assert_eq!(gw.embed("kq", &text_body("before")).await.status, 200);

    redis.kill();
    for i in 0..3 {
        let r = gw.embed("kq", &text_body(&format!("during {i}"))).await;
        assert_eq!(r.status, 503, "{}", r.text);
        assert_eq!(r.code(), "ServiceUnavailable");
    }
    // A tenant without a quota is still served.
    let r = gw.embed("kf", &text_body("free during")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(fake.calls(), 2);
    wait_redis(&gw, "down").await;

    redis.restart();
    wait_redis(&gw, "up").await;
    let mut n = 0;
    eventually(
        15,
        "quota misses served again after Redis returns",
        async || {
            n += 1;
            let r = gw.embed("kq", &text_body(&format!("after {n}"))).await;
            (r.status == 200).then_some(())
        },
    )
    .await;
    assert_eq!(redis_get(&redis, &quota_key("q")), Some(2));
}

// ---------- 8. hot reload ----------

fn two_tenants(fake: &Fake, a_key: &str, b_key: &str) -> String {
    config(
        fake,
        None,
        &[
            Tenant {
                name: "a",
                key: a_key,
                extra: "",
            },
            Tenant {
                name: "b",
                key: b_key,
                extra: "",
            },
        ],
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_by_file_watch_adds_and_revokes_keys() {
    let fake = Fake::start().await;
    let gw = Gateway::start(&two_tenants(&fake, "ka", "kb"));
    assert_eq!(gw.embed("ka", &text_body("x")).await.status, 200);
    assert_eq!(gw.embed("ka-new", &text_body("x")).await.status, 401);

    // Rotate a's key; add tenant c.
    let mut new = two_tenants(&fake, "ka-new", "kb");
    new.push_str(&format!(
        "\n[[tenants]]\nname = \"c\"\nkey_sha256 = [\"{}\"]\n",
        digest("kc")
    ));
    gw.rewrite_config(&new);
    eventually(15, "new key accepted after the file changed", async || {
        (gw.embed("ka-new", &text_body("y")).await.status == 200).then_some(())
    })
    .await;
    let r = gw.embed("ka", &text_body("y")).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.code(), "InvalidApiKey");
    assert_eq!(gw.embed("kc", &text_body("y")).await.status, 200);
    assert_eq!(gw.embed("kb", &text_body("y")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_by_sighup_without_file_watch() {
    let fake = Fake::start().await;
    let no_watch = |c: String| {
        let out = c.replace(
            "shutdown_grace = \"10s\"",
            "shutdown_grace = \"10s\"\nwatch_config = false",
        );
        assert_ne!(out, c, "config() no longer writes shutdown_grace");
        out
    };
    let gw = Gateway::start(&no_watch(two_tenants(&fake, "ka", "kb")));
    assert_eq!(gw.embed("ka", &text_body("x")).await.status, 200);

    gw.rewrite_config(&no_watch(two_tenants(&fake, "ka-new", "kb")));
    gw.signal("HUP");
    eventually(15, "new key accepted after SIGHUP", async || {
        (gw.embed("ka-new", &text_body("y")).await.status == 200).then_some(())
    })
    .await;
    assert_eq!(gw.embed("ka", &text_body("y")).await.status, 401);
    assert_eq!(gw.embed("kb", &text_body("y")).await.status, 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "embedgate_config_reloads_total", &[("result", "ok")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_is_rejected_and_old_config_stays() {
    let fake = Fake::start().await;
    let gw = Gateway::start(&two_tenants(&fake, "ka", "kb"));
    assert_eq!(gw.embed("ka", &text_body("x")).await.status, 200);

    // Tenant 0 gets a negative rate, and a new key that must not apply.
    let bad = config(
        &fake,
        None,
        &[
            Tenant {
                name: "a",
                key: "ka-new",
                extra: "rate = { per_second = -1, burst = 5 }",
            },
            Tenant {
                name: "b",
                key: "kb",
                extra: "",
            },
        ],
        "",
    );
    let line = bad
        .lines()
        .position(|l| l.contains("per_second = -1"))
        .unwrap()
        + 1;
    gw.rewrite_config(&bad);
    eventually(15, "the reload to be rejected", async || {
        let m = gw.metrics().await;
        (metric(&m, "embedgate_config_reloads_total", &[("result", "error")]) >= 1.0).then_some(())
    })
    .await;
    let logs = eventually(10, "the rejection in the log", async || {
        let logs = gw.logs();
        logs.contains("tenants[0].rate.per_second").then_some(logs)
    })
    .await;
    let err = logs
        .lines()
        .find(|l| l.contains("tenants[0].rate.per_second"))
        .unwrap();
    assert!(
        err.contains(&format!("\"line\":{line}")) || err.contains(&format!("line {line}")),
        "line {line} not in: {err}"
    );
    assert_eq!(gw.embed("ka", &text_body("y")).await.status, 200);
    assert_eq!(gw.embed("kb", &text_body("y")).await.status, 200);
    assert_eq!(gw.embed("ka-new", &text_body("y")).await.status, 401);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "embedgate_config_reloads_total", &[("result", "ok")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_raises_quota_without_restart() {
    let fake = Fake::start().await;
    let (q3, q5) = (quota(3), quota(5));
    let cfg = |extra: &str| {
        config(
            &fake,
            None,
            &[Tenant {
                name: "q",
                key: "kq",
                extra,
            }],
            "",
        )
    };
    let gw = Gateway::start(&cfg(&q3));
    for i in 0..3 {
        assert_eq!(
            gw.embed("kq", &text_body(&format!("a {i}"))).await.status,
            200
        );
    }
    assert_quota_refusal(&gw.embed("kq", &text_body("a 3")).await);

    gw.rewrite_config(&cfg(&q5));
    let mut n = 0;
    let first = eventually(15, "the raised quota to apply", async || {
        n += 1;
        let r = gw.embed("kq", &text_body(&format!("b {n}"))).await;
        match r.status {
            200 => Some(r),
            429 => {
                assert_quota_refusal(&r);
                None
            }
            s => panic!("unexpected {s}: {}", r.text),
        }
    })
    .await;
    // Usage so far is kept: 4 of 5 used.
    assert_eq!(num_header(&first, "x-quota-remaining"), Some(1));
    let r = gw.embed("kq", &text_body("c 1")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(num_header(&r, "x-quota-remaining"), Some(0));
    assert_quota_refusal(&gw.embed("kq", &text_body("c 2")).await);
    assert_eq!(fake.calls(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_survive_a_reload() {
    let fake = Fake::start().await;
    let gw = Arc::new(Gateway::start(&two_tenants(&fake, "ka", "kb")));
    // Long enough that the reload (SIGHUP, applied at once) lands inside it.
    fake.state.latency_ms.store(3000, Ordering::SeqCst);
    let g = gw.clone();
    let in_flight = tokio::spawn(async move { g.embed("ka", &text_body("slow")).await });
    eventually(10, "the request to reach upstream", async || {
        (fake.calls() == 1).then_some(())
    })
    .await;

    // Revoke the in-flight request's key.
    gw.rewrite_config(&two_tenants(&fake, "ka-new", "kb"));
    gw.signal("HUP");
    eventually(10, "the old key to be revoked", async || {
        (gw.embed("ka", &text_body("probe")).await.status == 401).then_some(())
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "the request finished before the reload; the test proves nothing"
    );
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(
        r.json()["output"]["embedding"].as_array().unwrap().len(),
        1536
    );
}

// ---------- 9. check-config ----------

fn check_config(src: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("embedgate.toml");
    std::fs::write(&path, src).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_embedgate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The stderr line naming `line N: key:`.
fn error_line<'a>(stderr: &'a str, line: usize, key: &str) -> &'a str {
    let want = format!("line {line}: {key}:");
    stderr
        .lines()
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no `{want}` in stderr:\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_a_valid_file() {
    let fake = Fake::start().await;
    let extra = format!("{}\n{}", rate(5), quota(10));
    let src = config(
        &fake,
        None,
        &[Tenant {
            name: "a",
            key: "ka",
            extra: &extra,
        }],
        "[limits]\nquota_on_store_error = \"deny\"\nquota_counts_hits = true\n",
    );
    let (code, out, err) = check_config(&src);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
}

/// Bad values only: every one is listed.
#[test]
fn check_config_lists_every_bad_value() {
    let src = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"soon\"\n\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"xyz\"]\nrate = {{ per_second = -1, burst = 5 }}\n\n[[tenants]]\nname = \"b\"\nkey_sha256 = [\"{}\"]\n",
        digest("kb")
    );
    let (code, _, err) = check_config(&src);
    assert_eq!(code, Some(2), "stderr: {err}");
    error_line(&err, 3, "server.shutdown_grace");
    error_line(&err, 7, "tenants[0].key_sha256[0]");
    error_line(&err, 8, "tenants[0].rate.per_second");
}

/// An unknown key together with bad values: all of them are listed.
#[test]
fn check_config_lists_unknown_key_with_the_other_errors() {
    let src = "[server]\nlisten = \"127.0.0.1:0\"\nlisen = \"127.0.0.1:1\"\nshutdown_grace = \"soon\"\n\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"xyz\"]\n";
    let (code, _, err) = check_config(src);
    assert_eq!(code, Some(2), "stderr: {err}");
    let unknown = err
        .lines()
        .find(|l| l.contains("line 3:"))
        .unwrap_or_else(|| panic!("no `line 3:` in stderr:\n{err}"));
    assert!(unknown.contains("lisen"), "{unknown}");
    error_line(&err, 4, "server.shutdown_grace");
    error_line(&err, 8, "tenants[0].key_sha256[0]");
}

/// A replica that never reserved for a tenant still reports what the other
/// replicas spent (it reads the shared counter), also on cache hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_remaining_header_reflects_other_replicas() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    let q = quota(10);
    let cfg = config(
        &fake,
        Some(&redis),
        &[Tenant {
            name: "q",
            key: "kq",
            extra: &q,
        }],
        "[limits]\nquota_counts_hits = false\n",
    );
    let a = Gateway::start(&cfg);
    let b = Gateway::start(&cfg);
    for i in 0..4 {
        let r = a.embed("kq", &text_body(&format!("spent {i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(
        num_header(
            &a.embed("kq", &text_body("spent 0")).await,
            "x-quota-remaining"
        ),
        Some(6)
    );
    // b has not reserved anything itself; its hits report the shared figure.
    eventually(10, "replica b to report 6 units left", async || {
        let r = b.embed("kq", &text_body("spent 1")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        (num_header(&r, "x-quota-remaining") == Some(6)).then_some(())
    })
    .await;
}
