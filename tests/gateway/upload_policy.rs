//! The upload policy route: only `getPolicy` for a served model goes
//! upstream, with a query the gateway rebuilds, at the tenant's own uploads
//! rate.

use super::*;

/// A rate that never refills within a test.
const SLOW: f64 = 0.001;

fn policy_path() -> String {
    format!("/api/v1/uploads?action=getPolicy&model={MODEL}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_policy_passes_through() {
    let gw = one_tenant().start().await;
    let path = policy_path();
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

/// Upstream gets a query built from the parsed values, not the client's
/// string, and only the allow-listed headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_policy_query_is_rebuilt_not_passed_through() {
    let gw = one_tenant().start().await;
    let encoded = MODEL.replace('-', "%2D");
    let r = gw
        .get_with(
            &format!("/api/v1/uploads?model={encoded}&action=get%50olicy&"),
            Some(K1),
            &[
                ("user-agent", "dashscope/2.0.2; python/3.11.7"),
                ("x-dashscope-sdk-client", "python-sdk/2.0.2/utils"),
                ("X-DashScope-Async", "enable"),
                ("cookie", "session=secret"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        gw.fake.upload_queries(),
        vec![format!("action=getPolicy&model={MODEL}")]
    );
    let h = &gw.fake.upload_headers()[0];
    assert_eq!(h["authorization"], format!("Bearer {UPSTREAM_KEY}"));
    assert_eq!(h["user-agent"], "dashscope/2.0.2; python/3.11.7");
    assert_eq!(h["x-dashscope-sdk-client"], "python-sdk/2.0.2/utils");
    assert!(!h.contains_key("x-dashscope-async"), "{h:?}");
    assert!(!h.contains_key("cookie"), "{h:?}");
}

/// Any other action, model or parameter is refused with 400 naming the
/// parameter, and never reaches upstream (whose certificate rate is the
/// whole company account's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_policy_refuses_everything_but_get_policy_for_a_served_model() {
    let gw = one_tenant().uploads_rate(1000.0, 1000).start().await;
    let m = MODEL;
    let refused = [
        ("".to_string(), "`action` is required"),
        (format!("?model={m}"), "`action` is required"),
        ("?action=getPolicy".to_string(), "`model` is required"),
        (
            format!("?action=getUploadUrl&model={m}"),
            "`action` must be `getPolicy`",
        ),
        (
            "?action=getPolicy&model=qwen-vl-max".to_string(),
            "`model`: `qwen-vl-max` is not a model this gateway serves",
        ),
        (
            // Text models take no files (multimodal ones are served since the family landed).
            "?action=getPolicy&model=text-embedding-v4".to_string(),
            "`model`: `text-embedding-v4` is not",
        ),
        (
            format!("?action=getPolicy&model={m}&model=qwen-vl-max"),
            "`model` must be given at most once",
        ),
        (
            format!("?action=getPolicy&model={m}&action=getPolicy"),
            "`action` must be given at most once",
        ),
        (
            format!("?action=getPolicy&model={m}&expire=86400"),
            "`expire` is not accepted",
        ),
    ];
    for (query, named) in &refused {
        let r = gw.get(&format!("/api/v1/uploads{query}"), Some(K1)).await;
        let v = assert_error(&r, 400, "InvalidParameter");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains(named), "{query:?}: {msg}");
        assert_eq!(r.header("x-should-retry"), Some("false"), "{query:?}");
    }
    assert_eq!(gw.fake.upload_policy_calls(), 0, "nothing was forwarded");
    assert_eq!(gw.fake.calls(), 0);
}

/// Upload policies have a bucket of their own (`uploads_rate`): they do not
/// spend the embedding rate, embeddings do not spend theirs, and every
/// tenant has one by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_policy_has_its_own_rate_per_tenant() {
    let gw = one_tenant()
        .rate(SLOW, 2)
        .uploads_rate(SLOW, 3)
        .tenant("ads", K2)
        .start()
        .await;
    let path = policy_path();

    let r = gw.embed(K1, &text_body("own rate 1")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("ratelimit-limit"), Some("2"));
    // One embedding spent: all three upload tokens are still there.
    for want_remaining in ["2", "1", "0"] {
        let r = gw.get(&path, Some(K1)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.header("ratelimit-limit"), Some("3"));
        assert_eq!(r.header("ratelimit-remaining"), Some(want_remaining));
    }
    let r = gw.get(&path, Some(K1)).await;
    assert_error(&r, 429, "Throttling.RateQuota");
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("ratelimit-limit"), Some("3"));
    assert_eq!(gw.fake.upload_policy_calls(), 3);
    // Uploads spent: the embedding token left is still there.
    let r = gw.embed(K1, &text_body("own rate 2")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = gw.embed(K1, &text_body("own rate 3")).await;
    assert_error(&r, 429, "Throttling.RateQuota");

    // Another tenant, with no rate configured: unlimited embeddings, the
    // default uploads rate, and a bucket of its own.
    let r = gw.get(&path, Some(K2)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("ratelimit-limit"), Some("5"));
    assert_eq!(r.header("ratelimit-remaining"), Some("4"));
    let r = gw.embed(K2, &text_body("own rate ads")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("ratelimit-limit"), None);
    assert_eq!(gw.fake.upload_policy_calls(), 4);
}
