//! Rate limits: exact bursts, in memory and on Redis; refusal headers.

use super::*;

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

/// The uploads rate is a bucket of its own in Redis, shared by replicas
/// like the embedding rate, under the tenant's hash tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_rate_is_shared_by_replicas_on_redis() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    let cfg = TestGateway::builder()
        .fake(&fake)
        .redis(&redis)
        .tenant("up", "k-up")
        .rate(SLOW, 1)
        .uploads_rate(SLOW, 3);
    let a = cfg.start().await;
    let b = cfg.start().await;
    wait_redis(&a, "up").await;
    wait_redis(&b, "up").await;
    let path = format!("/api/v1/uploads?action=getPolicy&model={MODEL}");
    let mut replies = Vec::new();
    for gw in [&a, &b, &a, &b, &a] {
        replies.push(gw.get(&path, Some("k-up")).await);
    }
    assert_eq!(statuses(&replies), vec![200, 200, 200, 429, 429]);
    for r in &replies[3..] {
        assert_rate_refusal(r);
    }
    assert_eq!(fake.upload_policy_calls(), 3);
    assert!(redis_get(&redis, "{eg:up}:uploads-rate").is_some());
    // The embedding bucket is another key, untouched by the uploads.
    assert_eq!(redis_get(&redis, "{eg:up}:rate"), None);
    assert_eq!(
        b.embed("k-up", &text_body("after uploads")).await.status,
        200
    );
    assert_rate_refusal(&a.embed("k-up", &text_body("after uploads 2")).await);
}
