//! Integration tests of the core gateway: HTTP against the real binary, a
//! fake DashScope that counts calls, and a real Redis where needed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::*;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const K1: &str = "sk-tenant-search-1";
const K2: &str = "sk-tenant-ads-2";

/// One tenant `search` (key `K1`), memory cache.
fn one_tenant() -> GatewayBuilder {
    TestGateway::builder().tenant("search", K1)
}

/// Tenants `search` (key `K1`) and `ads` (key `K2`).
fn two_tenants() -> GatewayBuilder {
    one_tenant().tenant("ads", K2)
}

/// The JSON on the `data:` line of an SSE answer, and its event name.
fn sse_event(r: &Reply) -> (String, Value) {
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/event-stream"),
        "content-type {ct:?}: {}",
        r.text
    );
    let event = r
        .text
        .lines()
        .find_map(|l| l.strip_prefix("event:"))
        .unwrap_or_else(|| panic!("no event: line in {:?}", r.text))
        .trim()
        .to_string();
    let data = r
        .text
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .unwrap_or_else(|| panic!("no data: line in {:?}", r.text));
    let v: Value =
        serde_json::from_str(data.trim()).unwrap_or_else(|e| panic!("data not JSON ({e}): {data}"));
    (event, v)
}

fn mixed_body() -> String {
    json!({
        "model": MODEL,
        "input": {"contents": [
            {"text": "你好", "factor": 1},
            {"audio": "https://example.com/cow.flac", "factor": 2},
            {"image": "https://example.com/256_1.png", "factor": "3"},
            {"audio": "https://example.com/dog.flac"}
        ]},
        "parameters": {"auto_truncation": true}
    })
    .to_string()
}

// ---------- 1. hit / miss ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_then_hit_with_usage_and_fresh_request_id() {
    let gw = one_tenant().start().await;
    let b = mixed_body();

    let r1 = gw.embed(K1, &b).await;
    let v1 = assert_success(&r1);
    assert_eq!(r1.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 1);

    let r2 = gw.embed(K1, &b).await;
    let v2 = assert_success(&r2);
    assert_eq!(r2.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 1, "a hit must not call upstream");

    assert_eq!(v1["output"]["embedding"], v2["output"]["embedding"]);
    let want_usage = json!({
        "text": {"measure": 1, "weight": 1},
        "image": {"measure": 1, "weight": 1},
        "audio": {"measure": 2, "weight": 2},
        "total_usage": 6
    });
    assert_eq!(v1["usage"], want_usage, "miss usage");
    assert_eq!(
        v2["usage"], want_usage,
        "hit usage computed from the request"
    );
    let id1 = v1["request_id"].as_str().unwrap();
    let id2 = v2["request_id"].as_str().unwrap();
    assert!(!id2.is_empty());
    assert_ne!(id1, id2, "a hit needs its own request_id");

    // A third one: another fresh id, still no upstream call.
    let r3 = gw.embed(K1, &b).await;
    let v3 = assert_success(&r3);
    assert_eq!(r3.cache(), "HIT");
    assert_ne!(v3["request_id"], v2["request_id"]);
    assert_eq!(gw.fake.calls(), 1);

    let m = gw.metrics().await;
    let units = |modality: &str, cache: &str| {
        metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("modality", modality),
                ("cache", cache),
            ],
        )
    };
    assert_eq!(units("audio", "miss"), 4.0);
    assert_eq!(units("text", "miss"), 1.0);
    assert_eq!(units("image", "miss"), 1.0);
    assert_eq!(units("audio", "hit"), 8.0);
    assert_eq!(units("text", "hit"), 2.0);
    assert_eq!(
        metric(
            &m,
            "embedgate_requests_total",
            &[("tenant", "search"), ("cache", "hit"), ("code", "ok")]
        ),
        2.0
    );
}

// ---------- 2. cache-key equivalences ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equivalent_bodies_share_one_entry() {
    let gw = one_tenant().start().await;
    let m = MODEL;
    let bodies = [
        // The reference: compact, factor 1 as an integer.
        format!(r#"{{"model":"{m}","input":{{"contents":[{{"text":"你好","factor":1}},{{"image":"https://x/a.png","factor":1}}]}},"parameters":{{}}}}"#),
        // factor 1.0
        format!(r#"{{"model":"{m}","input":{{"contents":[{{"text":"你好","factor":1.0}},{{"image":"https://x/a.png","factor":1.0}}]}},"parameters":{{}}}}"#),
        // factor "1"
        format!(r#"{{"model":"{m}","input":{{"contents":[{{"text":"你好","factor":"1"}},{{"image":"https://x/a.png","factor":"1"}}]}},"parameters":{{}}}}"#),
        // factor absent
        format!(r#"{{"model":"{m}","input":{{"contents":[{{"text":"你好"}},{{"image":"https://x/a.png"}}]}},"parameters":{{}}}}"#),
        // factor "1.0" and 1e0
        format!(r#"{{"model":"{m}","input":{{"contents":[{{"text":"你好","factor":"1.0"}},{{"image":"https://x/a.png","factor":1e0}}]}},"parameters":{{}}}}"#),
        // key order everywhere
        format!(r#"{{"parameters":{{}},"input":{{"contents":[{{"factor":1,"text":"你好"}},{{"factor":1,"image":"https://x/a.png"}}]}},"model":"{m}"}}"#),
        // whitespace
        format!("{{\n  \"model\" : \"{m}\",\n\t\"input\": {{ \"contents\" : [ {{ \"text\" : \"你好\" , \"factor\" : 1 }} ,\n {{ \"image\":\"https://x/a.png\" }} ] }} ,\r\n \"parameters\" : {{ }} }}\n"),
        // ASCII-escaped UTF-8 (dashscope 1.20.x, requests' json=)
        format!(r#"{{"model": "{m}", "input": {{"contents": [{{"text": "\u4f60\u597d", "factor": 1}}, {{"image": "https:\/\/x\/a.png", "factor": 1}}]}}, "parameters": {{}}}}"#),
        // SDK 1.x API: ", " / ": " separators, model, parameters, input; factor first
        format!(r#"{{"model": "{m}", "parameters": {{}}, "input": {{"contents": [{{"factor": 1, "text": "你好"}}, {{"factor": 1, "image": "https://x/a.png"}}]}}}}"#),
        // SDK 2.x: compact, model, input, parameters
        format!(r#"{{"model":"{m}","input":{{"contents":[{{"text":"你好","factor":1}},{{"image":"https://x/a.png","factor":1}}]}},"parameters":{{}}}}"#),
        // auto_truncation true vs absent
        format!(r#"{{"model":"{m}","input":{{"contents":[{{"text":"你好","factor":1}},{{"image":"https://x/a.png","factor":1}}]}},"parameters":{{"auto_truncation":true}}}}"#),
        format!(r#"{{"model": "{m}", "parameters": {{"auto_truncation": false}}, "input": {{"contents": [{{"factor": "1", "text": "\u4f60\u597d"}}, {{"image": "https://x/a.png"}}]}}}}"#),
    ];
    let mut first: Option<Value> = None;
    for (i, b) in bodies.iter().enumerate() {
        let r = gw.embed(K1, b).await;
        let v = assert_success(&r);
        let want = if i == 0 { "MISS" } else { "HIT" };
        assert_eq!(r.cache(), want, "body #{i}: {b}");
        assert_eq!(gw.fake.calls(), 1, "body #{i} made an upstream call: {b}");
        match &first {
            None => first = Some(v["output"]["embedding"].clone()),
            Some(e) => assert_eq!(&v["output"]["embedding"], e, "body #{i}"),
        }
    }
    assert_eq!(gw.fake.calls(), 1);
}

// ---------- 3. cache-key distinctions ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_requests_get_distinct_entries() {
    let gw = one_tenant().start().await;
    let m = MODEL;
    let bodies = [
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}},{{"image":"https://x/b.png"}}]}},"parameters":{{}}}}"#
        ),
        // factor value
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"text":"a","factor":2}},{{"image":"https://x/b.png"}}]}},"parameters":{{}}}}"#
        ),
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"text":"a","factor":"0.5"}},{{"image":"https://x/b.png"}}]}},"parameters":{{}}}}"#
        ),
        // item order
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"image":"https://x/b.png"}},{{"text":"a"}}]}},"parameters":{{}}}}"#
        ),
        // parameters
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}},{{"image":"https://x/b.png"}}]}},"parameters":{{"foo":1}}}}"#
        ),
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}},{{"image":"https://x/b.png"}}]}},"parameters":{{"foo":2}}}}"#
        ),
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}},{{"image":"https://x/b.png"}}]}},"parameters":{{"parameters":{{"foo":1}}}}}}"#
        ),
        // modality (same content string)
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}},{{"audio":"https://x/b.png"}}]}},"parameters":{{}}}}"#
        ),
        // exact content
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"text":"a "}},{{"image":"https://x/b.png"}}]}},"parameters":{{}}}}"#
        ),
        format!(
            r#"{{"model":"{m}","input":{{"contents":[{{"text":"A"}},{{"image":"https://x/b.png"}}]}},"parameters":{{}}}}"#
        ),
        // one item fewer
        format!(r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}}]}},"parameters":{{}}}}"#),
    ];
    for (i, b) in bodies.iter().enumerate() {
        let r = gw.embed(K1, b).await;
        assert_success(&r);
        assert_eq!(
            r.cache(),
            "MISS",
            "body #{i} was served from another's entry: {b}"
        );
        assert_eq!(gw.fake.calls(), i as u64 + 1, "body #{i}: {b}");
    }
    // Each is now cached on its own.
    for (i, b) in bodies.iter().enumerate() {
        let r = gw.embed(K1, b).await;
        assert_eq!(r.cache(), "HIT", "body #{i}: {b}");
    }
    assert_eq!(gw.fake.calls(), bodies.len() as u64);
    // What went upstream carries the parameters and the normalised factor.
    let sent = gw.fake.bodies();
    assert_eq!(sent[4]["parameters"]["foo"], 1);
    assert_eq!(
        sent[1]["input"]["contents"][0]["factor"].as_f64(),
        Some(2.0)
    );
    assert_eq!(
        sent[2]["input"]["contents"][0]["factor"].as_f64(),
        Some(0.5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_scope_separates_tenants() {
    let gw = two_tenants().start().await;
    let b = text_body("scoped");
    let r1 = gw.embed(K1, &b).await;
    assert_success(&r1);
    assert_eq!(r1.cache(), "MISS");
    let r2 = gw.embed(K2, &b).await;
    assert_success(&r2);
    assert_eq!(r2.cache(), "MISS", "default scope is per tenant");
    assert_eq!(gw.fake.calls(), 2);
    assert_eq!(gw.embed(K1, &b).await.cache(), "HIT");
    assert_eq!(gw.embed(K2, &b).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_scope_shares_between_tenants() {
    let gw = two_tenants()
        .set("cache", "scope = \"shared\"")
        .start()
        .await;
    let b = text_body("shared");
    let r1 = gw.embed(K1, &b).await;
    let v1 = assert_success(&r1);
    assert_eq!(r1.cache(), "MISS");
    let r2 = gw.embed(K2, &b).await;
    let v2 = assert_success(&r2);
    assert_eq!(r2.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 1);
    assert_eq!(v1["output"]["embedding"], v2["output"]["embedding"]);
    // The hit is metered to the tenant that asked.
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_units_total",
            &[("tenant", "ads"), ("modality", "text"), ("cache", "hit")]
        ),
        1.0
    );
}

// ---------- 4. bad inputs ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_locally() {
    let gw = one_tenant().start().await;
    let m = MODEL;
    let long = "字".repeat(71);
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}},{{"text":"b"}},{{"image":"c","factor":0}}]}},"parameters":{{}}}}"#
            ),
            "input.contents[2].factor must be > 0",
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"image":"c","factor":-1}}]}},"parameters":{{}}}}"#
            ),
            "input.contents[0].factor",
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"image":"c","factor":"abc"}}]}},"parameters":{{}}}}"#
            ),
            "input.contents[0].factor",
        ),
        (
            r#"{"model":"text-embedding-v3","input":{"contents":[{"text":"a"}]},"parameters":{}}"#
                .to_string(),
            "text-embedding-v3",
        ),
        (
            format!(r#"{{"model":"{m}","input":{{"contents":[]}},"parameters":{{}}}}"#),
            "input.contents",
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"{long}"}}]}},"parameters":{{}}}}"#
            ),
            "input.contents[0].text",
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"{long}"}}]}},"parameters":{{"auto_truncation":false}}}}"#
            ),
            "input.contents[0].text",
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a","image":"b"}}]}},"parameters":{{}}}}"#
            ),
            "input.contents[0]",
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"video":"a"}}]}},"parameters":{{}}}}"#
            ),
            "input.contents[0].video",
        ),
        (format!(r#"{{"model":"{m}","parameters":{{}}}}"#), "input"),
        (
            r#"{"input":{"contents":[{"text":"a"}]}}"#.to_string(),
            "model",
        ),
        (
            format!(r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}}"#),
            "JSON",
        ),
        ("not json at all".to_string(), "JSON"),
        (String::new(), "JSON"),
    ];
    for (body, want) in &cases {
        let r = gw.embed(K1, body).await;
        let v = assert_error(&r, 400, "InvalidParameter");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains(want),
            "body {body:?}: message {msg:?} should name {want:?}"
        );
        assert_eq!(r.header("x-should-retry"), Some("false"), "body {body:?}");
    }
    assert_eq!(gw.fake.calls(), 0, "bad input must never be forwarded");
    let metrics = gw.metrics().await;
    assert_eq!(metric_sum(&metrics, "embedgate_usage_units_total"), 0.0);

    // The same long text is fine with auto_truncation.
    let ok = format!(
        r#"{{"model":"{m}","input":{{"contents":[{{"text":"{long}"}}]}},"parameters":{{"auto_truncation":true}}}}"#
    );
    let r = gw.embed(K1, &ok).await;
    assert_success(&r);
    assert_eq!(gw.fake.calls(), 1);
    // And 70 characters are fine without it.
    let seventy = format!(
        r#"{{"model":"{m}","input":{{"contents":[{{"text":"{}"}}]}},"parameters":{{}}}}"#,
        "字".repeat(70)
    );
    assert_success(&gw.embed(K1, &seventy).await);
    assert_eq!(gw.fake.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    let gw = one_tenant()
        .set("server", "max_body_bytes = 512")
        .start()
        .await;
    let big = text_body(&"x".repeat(600));
    let r = gw.embed(K1, &big).await;
    assert_error(&r, 413, "BadRequest.TooLarge");
    assert_eq!(r.header("x-should-retry"), Some("false"));

    // Without a Content-Length (chunked), the limit still holds.
    let mut chunked = String::new();
    for c in big.as_bytes().chunks(100) {
        chunked.push_str(&format!(
            "{:x}\r\n{}\r\n",
            c.len(),
            std::str::from_utf8(c).unwrap()
        ));
    }
    chunked.push_str("0\r\n\r\n");
    let req = format!(
        "POST {EMBED_PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {K1}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunked}"
    );
    let resp = raw_http(&gw, &req).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("BadRequest.TooLarge"), "{resp}");

    assert_eq!(gw.fake.calls(), 0);
    // A small body still works.
    assert_success(&gw.embed(K1, &text_body("small")).await);
    assert_eq!(gw.fake.calls(), 1);
}

/// Sends raw bytes on a fresh connection and reads until the server closes.
async fn raw_http(gw: &TestGateway, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ---------- 5. auth and headers ----------

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

// ---------- 6. unknown paths ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_and_never_forwarded() {
    let gw = one_tenant().start().await;

    let r = gw.get("/api/v1/foo", Some(K1)).await;
    assert_error(&r, 404, "NotFound");
    let r = gw.get("/api/v1/foo", None).await;
    assert_error(&r, 404, "NotFound");

    let resp = gw
        .client
        .post(gw.url("/api/v1/services/aigc/text-generation/generation"))
        .header("authorization", format!("Bearer {K1}"))
        .header("content-type", "application/json")
        .body(r#"{"model":"qwen-turbo","input":{"prompt":"hi"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(v["code"], "NotFound");

    // Near misses of the real path.
    for p in [
        "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding/",
        "/api/v1/services/embeddings/text-embedding/text-embedding",
        "/api/v2/services/embeddings/multimodal-embedding/multimodal-embedding",
    ] {
        let resp = gw
            .client
            .post(gw.url(p))
            .header("authorization", format!("Bearer {K1}"))
            .body(text_body("x"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 404, "{p}");
    }

    let r = gw.get(EMBED_PATH, Some(K1)).await;
    assert_eq!(r.status, 405, "{}", r.text);
    assert!(r.json()["code"].as_str().is_some_and(|c| !c.is_empty()));

    assert_eq!(gw.fake.calls(), 0);
    assert_eq!(gw.fake.upload_policy_calls(), 0);
}

// ---------- 7. upstream errors ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_uncached() {
    let gw = one_tenant().start().await;

    // Scripted.
    let b = text_body("scripted error");
    gw.fake.push_faults([Fault::Status(400, "InvalidURL")]);
    let r = gw.embed(K1, &b).await;
    let v = assert_error(&r, 400, "InvalidURL");
    assert_eq!(v["message"], "injected by the fake");
    assert_eq!(gw.fake.calls(), 1, "a 400 is not retried");
    // Not cached: the next one calls again and succeeds.
    let r = gw.embed(K1, &b).await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 2);

    // An unreachable URL, as upstream reports it.
    let bad = body(&[("image", "https://unreachable.example.com/x.png")]);
    let r = gw.embed(K1, &bad).await;
    let v = assert_error(&r, 400, "InvalidURL");
    assert_eq!(v["message"], "Invalid URL provided in your request.");
    assert_eq!(gw.fake.calls(), 3);
    let r = gw.embed(K1, &bad).await;
    assert_error(&r, 400, "InvalidURL");
    assert_eq!(gw.fake.calls(), 4, "errors are never cached");

    // Other statuses keep theirs.
    gw.fake.push_faults([Fault::Status(403, "AccessDenied")]);
    let r = gw.embed(K1, &text_body("forbidden")).await;
    assert_error(&r, 403, "AccessDenied");
    assert_eq!(gw.fake.calls(), 5);

    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("modality", "image"),
                ("cache", "miss")
            ]
        ),
        0.0,
        "failed answers are not metered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_200s_are_errors_not_cached_not_metered() {
    let gw = one_tenant().start().await;
    for (i, fault) in [Fault::CodeOn200, Fault::BadEmbedding]
        .into_iter()
        .enumerate()
    {
        let b = text_body(&format!("bad 200 #{i}"));
        let before = gw.metrics().await;
        gw.fake.push_faults([fault.clone()]);
        let r = gw.embed(K1, &b).await;
        assert_ne!(r.status, 200, "{fault:?}: {}", r.text);
        let v = r.json();
        assert!(
            v["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{fault:?}: {}",
            r.text
        );
        assert!(v.get("output").is_none(), "{fault:?}: {}", r.text);
        assert_eq!(gw.fake.calls(), 2 * i as u64 + 1);

        let after = gw.metrics().await;
        for name in ["embedgate_usage_units_total", "embedgate_items_total"] {
            assert_eq!(
                metric_sum(&after, name),
                metric_sum(&before, name),
                "{fault:?} was metered in {name}"
            );
        }

        // Not cached: the repeat goes upstream and gets a real answer.
        let r = gw.embed(K1, &b).await;
        assert_success(&r);
        assert_eq!(r.cache(), "MISS", "{fault:?}");
        assert_eq!(gw.fake.calls(), 2 * i as u64 + 2);
        assert_eq!(gw.embed(K1, &b).await.cache(), "HIT");
    }
    // Only the real successes counted: per round one miss and one hit of 1 unit.
    let m = gw.metrics().await;
    assert_eq!(metric_sum(&m, "embedgate_usage_units_total"), 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_on_200_counts_nothing() {
    let gw = one_tenant().start().await;
    gw.fake.push_faults([Fault::CodeOn200, Fault::BadEmbedding]);
    let r = gw.embed(K1, &text_body("one")).await;
    assert_ne!(r.status, 200);
    let r = gw.embed(K1, &text_body("two")).await;
    assert_ne!(r.status, 200);
    assert_eq!(gw.fake.calls(), 2);
    let m = gw.metrics().await;
    assert_eq!(metric_sum(&m, "embedgate_usage_units_total"), 0.0);
    assert_eq!(metric_sum(&m, "embedgate_items_total"), 0.0);
}

// ---------- 8. retries, connect failure, timeout ----------

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

// ---------- 9. Cache-Control ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_control_no_cache_and_no_store() {
    let gw = one_tenant().start().await;

    // no-cache on a cached entry: a fresh call.
    let a = text_body("cc-a");
    assert_eq!(gw.embed(K1, &a).await.cache(), "MISS");
    assert_eq!(gw.embed(K1, &a).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 1);
    let r = gw
        .embed_with(K1, &a, &[("cache-control", "no-cache")])
        .await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 2);
    assert_eq!(gw.embed(K1, &a).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 2);

    // no-cache on a new entry stores the result.
    let b = text_body("cc-b");
    let r = gw
        .embed_with(K1, &b, &[("Cache-Control", "no-cache")])
        .await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 3);
    assert_eq!(gw.embed(K1, &b).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 3);

    // no-store keeps the result out.
    let c = text_body("cc-c");
    let r = gw
        .embed_with(K1, &c, &[("cache-control", "no-store")])
        .await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 4);
    let r = gw.embed(K1, &c).await;
    assert_eq!(r.cache(), "MISS", "no-store result was cached");
    assert_eq!(gw.fake.calls(), 5);
    assert_eq!(gw.embed(K1, &c).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 5);
}

// ---------- 10. coalescing ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_misses_make_one_call() {
    let gw = Arc::new(one_tenant().start().await);
    gw.fake.set_latency_ms(1000);
    let b = Arc::new(text_body("together"));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let gw = gw.clone();
        let b = b.clone();
        tasks.push(tokio::spawn(async move { gw.embed(K1, &b).await }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert_eq!(gw.fake.calls(), 1);
    let mut embeddings = Vec::new();
    for r in &replies {
        let v = assert_success(r);
        embeddings.push(v["output"]["embedding"].clone());
    }
    assert!(embeddings.windows(2).all(|w| w[0] == w[1]));
    let misses = replies.iter().filter(|r| r.cache() == "MISS").count();
    let hits = replies.iter().filter(|r| r.cache() == "HIT").count();
    assert_eq!((misses, hits), (1, 9));
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "embedgate_coalesced_requests_total", &[]), 9.0);
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_units_total",
            &[("tenant", "search"), ("modality", "text"), ("cache", "hit")]
        ),
        9.0
    );
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("modality", "text"),
                ("cache", "miss")
            ]
        ),
        1.0
    );
}

// ---------- 11. SSE ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_for_miss_hit_and_error() {
    let gw = one_tenant().start().await;
    for (i, header) in [
        ("X-DashScope-SSE", "enable"),
        ("Accept", "text/event-stream"),
    ]
    .into_iter()
    .enumerate()
    {
        let b = text_body(&format!("sse {i}"));
        let miss = gw.embed_with(K1, &b, &[header]).await;
        assert_eq!(miss.status, 200, "{header:?}: {}", miss.text);
        assert_eq!(miss.cache(), "MISS");
        let (event, v) = sse_event(&miss);
        assert_eq!(event, "result", "{header:?}");
        assert_eq!(embedding(&v).len(), 1536);
        assert!(v.get("code").is_none());

        let hit = gw.embed_with(K1, &b, &[header]).await;
        assert_eq!(hit.status, 200, "{header:?}: {}", hit.text);
        assert_eq!(hit.cache(), "HIT");
        let (event, vh) = sse_event(&hit);
        assert_eq!(event, "result");
        assert_eq!(vh["output"]["embedding"], v["output"]["embedding"]);
        assert_eq!(vh["usage"]["total_usage"], 1);
        assert_eq!(gw.fake.calls(), i as u64 + 1);
    }

    let r = gw
        .embed_with(
            "sk-wrong",
            &text_body("sse err"),
            &[("X-DashScope-SSE", "enable")],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text);
    let (event, v) = sse_event(&r);
    assert_eq!(event, "error");
    assert_eq!(v["code"], "InvalidApiKey");
    assert_eq!(gw.fake.calls(), 2);
}

// ---------- 12. persistence across restarts ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_survives_a_restart() {
    let fake = Fake::start().await;
    let redis = Redis::start();
    let cfg = one_tenant().fake(&fake).redis(&redis);
    let b = mixed_body();
    let first = {
        let gw = cfg.start().await;
        let r = gw.embed(K1, &b).await;
        let v = assert_success(&r);
        assert_eq!(r.cache(), "MISS");
        // The Redis write is in the background: wait for it.
        let mut conn = redis.conn();
        eventually(10, "cache entry in Redis", async || {
            // Whatever the key layout: some string value holding the vector.
            let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).ok()?;
            keys.iter()
                .any(|k| {
                    redis::cmd("GET")
                        .arg(k)
                        .query::<Option<Vec<u8>>>(&mut conn)
                        .ok()
                        .flatten()
                        .is_some_and(|v| v.len() > 1536)
                })
                .then_some(())
        })
        .await;
        v
    };
    assert_eq!(fake.calls(), 1);
    let gw = cfg.start().await;
    let r = gw.embed(K1, &b).await;
    let v = assert_success(&r);
    assert_eq!(
        r.cache(),
        "HIT",
        "the Redis entry should survive a gateway restart"
    );
    assert_eq!(fake.calls(), 1);
    assert_eq!(v["output"]["embedding"], first["output"]["embedding"]);
    assert_eq!(v["usage"]["total_usage"], 6);
    let ready = gw.get("/readyz", None).await;
    assert_eq!(ready.json()["redis"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cache_is_lost_on_restart() {
    let fake = Fake::start().await;
    let cfg = one_tenant().fake(&fake);
    let b = text_body("ephemeral");
    {
        let gw = cfg.start().await;
        assert_eq!(gw.embed(K1, &b).await.cache(), "MISS");
        assert_eq!(gw.embed(K1, &b).await.cache(), "HIT");
    }
    assert_eq!(fake.calls(), 1);
    let gw = cfg.start().await;
    let r = gw.embed(K1, &b).await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(fake.calls(), 2);
    let ready = gw.get("/readyz", None).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["redis"], "not_configured");
}

// ---------- 13. upload policy ----------

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

// ---------- 14. operational routes ----------

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

// ---------- 15. graceful shutdown ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight() {
    let fake = Fake::start().await;
    let gw = one_tenant().fake(&fake).start().await;
    fake.set_latency_ms(500);
    let client = gw.client.clone();
    let url = gw.url(EMBED_PATH);
    let task = tokio::spawn(async move {
        let resp = client
            .post(url)
            .header("authorization", format!("Bearer {K1}"))
            .header("content-type", "application/json")
            .body(text_body("in flight at shutdown"))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, text)
    });
    eventually(10, "the request reaches upstream", async || {
        (fake.calls() == 1).then_some(())
    })
    .await;
    let code = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    let (status, text) = task.await.unwrap();
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(embedding(&v).len(), 1536);
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    assert_eq!(fake.calls(), 1);
}

// ---------- overload ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_work_is_shed_fast_with_503() {
    let gw = TestGateway::builder()
        .tenant("search", "k1")
        .set("server", "max_in_flight = 2")
        .start()
        .await;
    let gw = std::sync::Arc::new(gw);
    gw.fake.set_latency_ms(3000);
    // Two slow misses fill the gateway...
    let mut slow = Vec::new();
    for i in 0..2 {
        let gw = gw.clone();
        slow.push(tokio::spawn(async move {
            gw.embed("k1", &text_body(&format!("slow {i}"))).await
        }));
    }
    eventually(10, "both slow requests upstream", async || {
        (gw.fake.calls() == 2).then_some(())
    })
    .await;
    // ...so the next ones are refused at once, not queued: every refusal
    // arrives while both slow requests are still in flight.
    for i in 0..4 {
        let r = gw.embed("k1", &text_body(&format!("shed {i}"))).await;
        assert_error(&r, 503, "ServiceUnavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert!(
        slow.iter().all(|h| !h.is_finished()),
        "refusals waited for the slow requests"
    );
    assert_eq!(gw.fake.calls(), 2, "shed requests must not reach upstream");
    for h in slow {
        assert_eq!(h.await.unwrap().status, 200);
    }
    // Capacity is back once they finish.
    gw.fake.set_latency_ms(0);
    assert_eq!(gw.embed("k1", &text_body("after")).await.status, 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_requests_total",
            &[
                ("tenant", "search"),
                ("cache", "none"),
                ("code", "ServiceUnavailable")
            ]
        ),
        4.0
    );
}

// ---------- a client that hangs up during a miss ----------

/// The company pays for an upstream call whether or not the client waits for
/// it: the call finishes, its answer is cached and metered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_whose_client_hangs_up_is_still_cached_and_metered() {
    let gw = TestGateway::builder().tenant("search", "k1").start().await;
    gw.fake.set_latency_ms(800);
    let b = body(&[
        ("image", "https://x/hangup.png"),
        ("audio", "https://x/a.wav"),
    ]);
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_millis(200))
        .build()
        .unwrap();
    let gone = impatient
        .post(gw.url(EMBED_PATH))
        .header("authorization", "Bearer k1")
        .header("content-type", "application/json")
        .body(b.clone())
        .send()
        .await;
    assert!(gone.is_err(), "the client should have given up");
    // The upstream call completes and is metered as a miss: 1 image + 1 audio.
    eventually(10, "the abandoned miss to be metered", async || {
        let m = gw.metrics().await;
        let units = metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("modality", "audio"),
                ("cache", "miss"),
            ],
        );
        (units == 2.0).then_some(())
    })
    .await;
    assert_eq!(gw.fake.calls(), 1);
    assert_eq!(gw.fake.billed_units(), 3);
    // ...and cached: the next identical request makes no upstream call.
    gw.fake.set_latency_ms(0);
    let r = gw.embed("k1", &b).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 1);
}
