//! Per-tenant rate limits and unit quotas (SPEC §3), across replicas on one
//! Redis, through a Redis outage (SPEC §5), and under hot reload.
//! (`embedgate check-config` is tested in cli.rs.)
//!
//! Rates use `per_second = 0.001` (one token per 1000 s) so admission counts
//! are exact without controlling time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::sync::Arc;

// ---------- local helpers ----------

/// A rate (tokens per second) that never refills within a test.
const SLOW: f64 = 0.001;

/// The Redis key holding the tenant's units used today.
fn quota_key(tenant: &str) -> String {
    format!("{{eg:{tenant}}}:quota:{}", today())
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
async fn wait_redis(gw: &TestGateway, state: &str) {
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
async fn concurrent(gws: &[Arc<TestGateway>], key: &str, prefix: &str, n: usize) -> Vec<Reply> {
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
    let gw = TestGateway::builder()
        .tenant("r", "kr")
        .rate(SLOW, 5)
        .redis(redis)
        .start()
        .await;
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
    assert_eq!(gw.fake.calls(), 5);
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
    let gw = TestGateway::builder()
        .tenant("r", "kr")
        .rate(SLOW, 1)
        .start()
        .await;
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
    let gw = TestGateway::builder()
        .tenant("q", "kq")
        .quota(10, Per::Day)
        .start()
        .await;
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
    assert_eq!(gw.fake.calls(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_counts_audio_at_its_weight() {
    let gw = TestGateway::builder()
        .tenant("a", "ka")
        .quota(5, Per::Day)
        .start()
        .await;
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
    assert_eq!(gw.fake.calls(), 3);
}

// ---------- 3. cache hits and quota ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_do_not_spend_quota_by_default() {
    let gw = TestGateway::builder()
        .tenant("q", "kq")
        .quota(3, Per::Day)
        .start()
        .await;
    for t in ["a", "b", "c"] {
        let r = gw.embed("kq", &text_body(t)).await;
        assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    }
    assert_quota_refusal(&gw.embed("kq", &text_body("d")).await);
    for t in ["a", "b", "c", "a"] {
        let r = gw.embed("kq", &text_body(t)).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    assert_eq!(gw.fake.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_spend_quota_with_quota_counts_hits() {
    let gw = TestGateway::builder()
        .tenant("q", "kq")
        .quota(3, Per::Day)
        .set("limits", "quota_counts_hits = true")
        .start()
        .await;
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
    assert_eq!(gw.fake.calls(), 2);
}

// ---------- 4. concurrent misses ----------

async fn concurrent_quota_is_exact(redis: Option<&Redis>) {
    let gw = TestGateway::builder()
        .tenant("q", "kq")
        .quota(10, Per::Day)
        .redis(redis)
        .start()
        .await;
    gw.fake.set_latency_ms(100);
    let gw = Arc::new(gw);
    if redis.is_some() {
        wait_redis(&gw, "up").await;
    }
    let replies = concurrent(std::slice::from_ref(&gw), "kq", "concurrent", 30).await;
    assert_eq!(count(&replies, 200), 10, "{:?}", statuses(&replies));
    assert_eq!(count(&replies, 429), 20, "{:?}", statuses(&replies));
    for r in replies.iter().filter(|r| r.status == 429) {
        assert_quota_refusal(r);
    }
    assert_eq!(gw.fake.calls(), 10);
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
    let gw = TestGateway::builder()
        .tenant("q", "kq")
        .quota(3, Per::Day)
        .start()
        .await;
    gw.fake.push_faults([
        Fault::Status(400, "InvalidURL"),
        Fault::Status(400, "InvalidURL"),
    ]);
    for i in 0..2 {
        let r = gw.embed("kq", &text_body(&format!("bad {i}"))).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.code(), "InvalidURL");
    }
    assert_eq!(gw.fake.calls(), 2);
    for i in 0..3 {
        let r = gw.embed("kq", &text_body(&format!("good {i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(num_header(&r, "x-quota-remaining"), Some(2 - i));
    }
    assert_quota_refusal(&gw.embed("kq", &text_body("over")).await);
    assert_eq!(gw.fake.calls(), 5);
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
    let cfg = TestGateway::builder()
        .fake(&fake)
        .redis(&redis)
        .tenant("busy", "k-busy")
        .rate(per_second, burst);
    let a = cfg.start().await;
    let b = cfg.start().await;
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
    let cfg = TestGateway::builder()
        .fake(&fake)
        .redis(&redis)
        .tenant("r6", "k-r6")
        .rate(SLOW, 6)
        .tenant("q8", "k-q8")
        .quota(8, Per::Day)
        .tenant("c8", "k-c8")
        .quota(8, Per::Day);
    let a = Arc::new(cfg.start().await);
    let b = Arc::new(cfg.start().await);
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
    fake.set_latency_ms(100);
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
    let gw = TestGateway::builder()
        .redis(&redis)
        .tenant("r", "kr")
        .rate(SLOW, 5)
        .tenant("q", "kq")
        .quota(6, Per::Day)
        .start()
        .await;
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
    assert_eq!(gw.fake.calls(), 5);

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
    assert_eq!(gw.fake.calls(), 5 + 3 + 5);

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
    let gw = TestGateway::builder()
        .redis(&redis)
        .tenant("q", "kq")
        .quota(100, Per::Day)
        .tenant("free", "kf")
        .set("limits", "quota_on_store_error = \"deny\"")
        .start()
        .await;
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
    assert_eq!(gw.fake.calls(), 2);
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

/// Tenants `a` and `b` with these keys.
fn two_tenants(a_key: &str, b_key: &str) -> GatewayBuilder {
    TestGateway::builder().tenant("a", a_key).tenant("b", b_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_by_file_watch_adds_and_revokes_keys() {
    let gw = two_tenants("ka", "kb").start().await;
    assert_eq!(gw.embed("ka", &text_body("x")).await.status, 200);
    assert_eq!(gw.embed("ka-new", &text_body("x")).await.status, 401);

    // Rotate a's key; add tenant c.
    gw.reconfigure(&two_tenants("ka-new", "kb").tenant("c", "kc"));
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
    let no_watch = |a_key: &str| two_tenants(a_key, "kb").set("server", "watch_config = false");
    let gw = no_watch("ka").start().await;
    assert_eq!(gw.embed("ka", &text_body("x")).await.status, 200);

    gw.reconfigure(&no_watch("ka-new"));
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
    let gw = two_tenants("ka", "kb").start().await;
    assert_eq!(gw.embed("ka", &text_body("x")).await.status, 200);

    // Tenant 0 gets a negative rate, and a new key that must not apply.
    let bad = TestGateway::builder()
        .fake(&gw.fake)
        .tenant("a", "ka-new")
        .rate(-1.0, 5)
        .tenant("b", "kb")
        .config();
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
    let cfg = |units: u64| {
        TestGateway::builder()
            .tenant("q", "kq")
            .quota(units, Per::Day)
    };
    let gw = cfg(3).start().await;
    for i in 0..3 {
        assert_eq!(
            gw.embed("kq", &text_body(&format!("a {i}"))).await.status,
            200
        );
    }
    assert_quota_refusal(&gw.embed("kq", &text_body("a 3")).await);

    gw.reconfigure(&cfg(5));
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
    assert_eq!(gw.fake.calls(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_survive_a_reload() {
    let gw = Arc::new(two_tenants("ka", "kb").start().await);
    // Long enough that the reload (SIGHUP, applied at once) lands inside it.
    gw.fake.set_latency_ms(3000);
    let g = gw.clone();
    let in_flight = tokio::spawn(async move { g.embed("ka", &text_body("slow")).await });
    eventually(10, "the request to reach upstream", async || {
        (gw.fake.calls() == 1).then_some(())
    })
    .await;

    // Revoke the in-flight request's key.
    gw.reconfigure(&two_tenants("ka-new", "kb"));
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

/// A replica that never reserved for a tenant still reports what the other
/// replicas spent (it reads the shared counter), also on cache hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_remaining_header_reflects_other_replicas() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    let cfg = TestGateway::builder()
        .fake(&fake)
        .redis(&redis)
        .tenant("q", "kq")
        .quota(10, Per::Day)
        .set("limits", "quota_counts_hits = false");
    let a = cfg.start().await;
    let b = cfg.start().await;
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
