//! Auth and headers: 401s, what goes to and comes back from upstream.

use super::*;

use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_key_is_401() {
    let gw = one_tenant().start().await;
    let b = text_body("auth");

    let r = gw.embed("sk-not-a-tenant", &b).await;
    assert_error(&r, 401, "InvalidApiKey");
    assert_eq!(r.header("x-should-retry"), Some("false"));

    let resp = gw
        .client
        .post(gw.url(EMBED_PATH))
        .header("content-type", "application/json")
        .body(b.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(v["code"], "InvalidApiKey");

    // The upstream key is not a tenant key either.
    let r = gw.embed(UPSTREAM_KEY, &b).await;
    assert_error(&r, 401, "InvalidApiKey");

    assert_eq!(gw.fake.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_to_and_from_upstream() {
    let gw = one_tenant()
        .tenant_toml("workspace = \"ws-9\"")
        .start()
        .await;
    let b = body(&[(
        "image",
        "oss://dashscope-instant/fake/2026-11-24/abc/cat.png",
    )]);
    let r = gw
        .embed_with(
            K1,
            &b,
            &[
                ("X-DashScope-OssResourceResolve", "enable"),
                ("X-DashScope-DataInspection", "enable"),
                ("x-dashscope-sdk-client", "python-sdk/2.0.2/embeddings"),
                ("X-DashScope-SSE", "enable"),
                ("X-DashScope-WorkSpace", "ws-client-chosen"),
                ("X-DashScope-Async", "enable"),
                ("X-DashScope-Plugin", "{\"x\":1}"),
                ("accept-language", "zh-CN"),
                ("cookie", "session=secret-cookie"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(gw.fake.calls(), 1);
    let h = gw.fake.last_headers().unwrap();
    let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(
        get("authorization").as_deref(),
        Some("Bearer sk-company-upstream-key")
    );
    assert_eq!(get("x-dashscope-workspace").as_deref(), Some("ws-9"));
    assert_eq!(
        get("x-dashscope-ossresourceresolve").as_deref(),
        Some("enable")
    );
    assert_eq!(get("x-dashscope-datainspection").as_deref(), Some("enable"));
    assert_eq!(
        get("x-dashscope-sdk-client").as_deref(),
        Some("python-sdk/2.0.2/embeddings")
    );
    assert_eq!(
        get("x-dashscope-sse"),
        None,
        "SSE is the gateway's business"
    );
    assert_eq!(get("cookie"), None, "cookies never go upstream");
    assert_eq!(get("accept-language").as_deref(), Some("zh-CN"));
    assert_eq!(
        get("x-dashscope-async"),
        None,
        "only allow-listed X-DashScope-* headers go upstream"
    );
    assert_eq!(get("x-dashscope-plugin"), None);
    for (name, value) in &h {
        let v = value.to_str().unwrap_or("");
        assert!(!v.contains(K1), "tenant key leaked upstream in {name}");
    }
    assert_eq!(h.get_all("x-dashscope-workspace").iter().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oss_content_without_resolve_header_is_upstreams_error() {
    let gw = one_tenant().start().await;
    let b = body(&[("image", "oss://dashscope-instant/x/y.png")]);
    let r = gw.embed(K1, &b).await;
    // The fake refuses it; the gateway passes the refusal through.
    assert_error(&r, 400, "InvalidParameter");
    assert_eq!(gw.fake.calls(), 1);
}
