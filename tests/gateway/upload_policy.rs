//! The upload policy route passes through.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_policy_passes_through() {
    let gw = one_tenant().start().await;
    let path = format!("/api/v1/uploads?action=getPolicy&model={MODEL}");
    let policy_calls = || gw.fake.upload_policy_calls();

    let r = gw.get(&path, None).await;
    assert_error(&r, 401, "InvalidApiKey");
    let r = gw.get(&path, Some("sk-wrong")).await;
    assert_error(&r, 401, "InvalidApiKey");
    assert_eq!(policy_calls(), 0);

    let r = gw.get(&path, Some(K1)).await;
    // The fake answers 401 unless it sees the company key.
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let host = v["data"]["upload_host"].as_str().unwrap();
    assert_eq!(host, format!("{}/oss", gw.fake.url()));
    assert_eq!(
        v["data"]["upload_dir"],
        "dashscope-instant/fake/2026-11-24/abc"
    );
    assert_eq!(v["data"]["policy"], "ZmFrZS1wb2xpY3k=");
    assert_eq!(policy_calls(), 1);
    assert_ne!(r.cache(), "HIT");

    let r2 = gw.get(&path, Some(K1)).await;
    assert_eq!(r2.status, 200, "{}", r2.text);
    assert_ne!(r2.cache(), "HIT");
    assert_eq!(policy_calls(), 2, "the upload policy is not cached");
    assert_eq!(gw.fake.calls(), 0);

    let m = gw.metrics().await;
    assert_eq!(metric_sum(&m, "embedgate_usage_units_total"), 0.0);
    assert_eq!(metric_sum(&m, "embedgate_items_total"), 0.0);
}
