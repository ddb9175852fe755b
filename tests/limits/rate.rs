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
