//! Concurrent misses cannot overshoot the quota.

use super::*;

use std::sync::Arc;

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
