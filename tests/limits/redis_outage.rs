//! Redis outage: `allow` falls back to local limits, `deny` refuses.

use super::*;

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
