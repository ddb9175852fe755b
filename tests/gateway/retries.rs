//! Retries, connect failure, timeout.

use super::*;

use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_429_and_5xx_then_succeeds() {
    let gw = one_tenant().start().await;
    gw.fake.push_faults([
        Fault::Status(429, "Throttling"),
        Fault::Status(500, "InternalError"),
    ]);
    let r = gw.embed(K1, &text_body("retry me")).await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 3);
    // Billed once.
    let m = gw.metrics().await;
    assert_eq!(metric_sum(&m, "embedgate_usage_units_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded() {
    let gw = one_tenant().start().await;
    gw.fake.push_faults([
        Fault::Status(503, "ServiceUnavailable"),
        Fault::Status(503, "ServiceUnavailable"),
        Fault::Status(503, "ServiceUnavailable"),
        Fault::Status(503, "ServiceUnavailable"),
    ]);
    let r = gw.embed(K1, &text_body("always down")).await;
    assert_error(&r, 503, "ServiceUnavailable");
    // Default max_retries = 2: three attempts, not four.
    assert_eq!(gw.fake.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retries_when_max_retries_is_zero() {
    let gw = one_tenant()
        .set("upstream", "max_retries = 0")
        .start()
        .await;
    gw.fake
        .push_faults([Fault::Status(503, "ServiceUnavailable")]);
    let r = gw.embed(K1, &text_body("once")).await;
    let v = assert_error(&r, 503, "ServiceUnavailable");
    assert_eq!(v["message"], "injected by the fake");
    assert_eq!(gw.fake.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_502() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let gw = one_tenant().upstream_url(&closed).start().await;
    let r = gw.embed(K1, &text_body("nobody home")).await;
    let v = assert_error(&r, 502, "BadGateway");
    assert!(
        !v["message"].as_str().unwrap().contains("127.0.0.1"),
        "internal details leaked"
    );
    assert_eq!(r.cache(), "MISS");
    let m = gw.metrics().await;
    assert_eq!(metric_sum(&m, "embedgate_usage_units_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_upstream_is_504() {
    let gw = one_tenant()
        .set("upstream", "timeout = \"500ms\"")
        .start()
        .await;
    gw.fake.push_faults([Fault::Drop]);
    let started = Instant::now();
    let r = gw.embed(K1, &text_body("hang")).await;
    assert_error(&r, 504, "GatewayTimeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(gw.fake.calls(), 1);
    // The gateway is fine afterwards, and nothing was cached.
    let r = gw.embed(K1, &text_body("hang")).await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 2);
}
