//! Operational routes: health, readiness, metrics.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics() {
    let gw = one_tenant().start().await;
    let h = gw.get("/healthz", None).await;
    assert_eq!(h.status, 200);
    let r = gw.get("/readyz", None).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .starts_with("application/json"));
    let v = r.json();
    assert!(v.get("redis").is_some(), "{v}");
    let m = gw.get("/metrics", None).await;
    assert_eq!(m.status, 200);
    assert!(m.text.contains("embedgate_build_info"), "{}", m.text);
    assert_eq!(metric_sum(&m.text, "embedgate_build_info"), 1.0);
    // None of them needed a key, and none went upstream.
    assert_eq!(gw.fake.calls(), 0);
}
