//! Two replicas on one Redis: shared rate and quota, leased tokens, the
//! remaining-quota header.

use super::*;

use std::sync::Arc;

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

/// A busy tenant's lease is topped up before it runs out: after the first
/// refill (which the first request waits for), refills start in the
/// background when the lease is down to a quarter, so requests find tokens
/// and no further request waits for Redis. Every request is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_tenants_lease_is_topped_up_ahead_of_need() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    // lease_size = min(400 * 5 %, 160 / 8, 100) = 20: a top-up starts at 5
    // tokens left and asks for 14 (back to 19).
    let gw = TestGateway::builder()
        .fake(&fake)
        .redis(&redis)
        .tenant("busy", "k-busy")
        .rate(400.0, 160)
        .start()
        .await;
    wait_redis(&gw, "up").await;
    let body = text_body("top me up");
    for _ in 0..120 {
        let r = gw.embed("k-busy", &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let m = gw.metrics().await;
    let waited = metric(
        &m,
        "embedgate_rate_lease_refills_total",
        &[("when", "waited")],
    );
    let ahead = metric(
        &m,
        "embedgate_rate_lease_refills_total",
        &[("when", "ahead")],
    );
    eprintln!("120 requests: {waited} refills waited for, {ahead} ahead of need");
    // Without topping up: ~120 / 20 = 6 waited refills and none ahead.
    assert!(
        ahead >= 4.0,
        "{ahead} refills ahead of need for 120 requests"
    );
    assert!(
        waited <= 2.0,
        "{waited} refills that a request waited for (only the first should be)"
    );
}
