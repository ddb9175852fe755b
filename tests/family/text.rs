//! The native text API: per-text caching, partial hits, usage, limits.

use super::*;

fn texts_body(texts: &[&str], params: Value) -> Value {
    json!({"model": "text-embedding-v4", "input": {"texts": texts}, "parameters": params})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_texts_with_three_cached_forward_exactly_two() {
    let gw = two_tenants().start().await;
    let five = ["alpha", "beta", "gamma delta", "epsilon", "zeta eta theta"];
    let params = json!({"dimension": 512, "text_type": "query"});

    // Three of them first, in another order and batch.
    let r = post(
        &gw,
        TEXT_PATH,
        K1,
        &texts_body(&[five[3], five[0], five[2]], params.clone()),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(items(&gw), 3);

    let full = texts_body(&five, params.clone());
    let r = post(&gw, TEXT_PATH, K1, &full, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "PARTIAL");
    assert_eq!(items(&gw), 5, "only the two uncached texts go upstream");
    let last = gw.fake.last_body().unwrap();
    assert_eq!(last["input"]["texts"], json!([five[1], five[4]]));

    // The merged answer equals upstream's own answer to the full batch.
    let got = r.json();
    let want = upstream_answer(&gw, TEXT_PATH, &full).await;
    // (The direct call counts at the fake too.)
    assert_eq!(items(&gw), 10);
    assert_eq!(got["output"]["embeddings"], want["output"]["embeddings"]);
    for (i, e) in got["output"]["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(e["text_index"], i);
        assert_eq!(e["embedding"].as_array().unwrap().len(), 512);
        let expect =
            fake_dashscope::item_embedding("text-embedding-v4", "text", five[i], &params, 512);
        assert_eq!(f32s(&e["embedding"]), expect, "text {i}");
    }
    // Usage: what the whole answer costs; billed: the two forwarded texts.
    assert_eq!(got["usage"], want["usage"]);
    let tok = |t: &str| fake_dashscope::text_tokens(t);
    assert_eq!(
        r.header("x-usage-billed"),
        Some(&*(tok(five[1]) + tok(five[4])).to_string())
    );
    assert!(got.get("code").is_none());

    // All five again: a hit, nothing forwarded.
    let r = post(&gw, TEXT_PATH, K1, &full, &[]).await;
    assert_eq!(r.cache(), "HIT");
    assert_eq!(r.header("x-usage-billed"), Some("0"));
    assert_eq!(items(&gw), 10);
    assert_eq!(
        r.json()["output"]["embeddings"],
        want["output"]["embeddings"]
    );

    // Metering: hit and miss units by model; the sum of miss units is
    // what upstream billed.
    let m = gw.metrics().await;
    let billed: u64 = five.iter().map(|t| tok(t)).sum();
    assert_eq!(
        units(&m, "search", "text-embedding-v4", "text", "miss"),
        billed as f64
    );
    let hit_units = (tok(five[0]) + tok(five[2]) + tok(five[3])) + billed;
    assert_eq!(
        gw.fake.billed_units(),
        2 * billed,
        "the gateway's and the direct call"
    );
    assert_eq!(
        units(&m, "search", "text-embedding-v4", "text", "hit"),
        hit_units as f64
    );
    assert_eq!(
        metric(
            &m,
            "embedgate_requests_total",
            &[
                ("tenant", "search"),
                ("model", "text-embedding-v4"),
                ("cache", "partial"),
                ("code", "ok")
            ]
        ),
        1.0
    );

    // Another tenant does not share entries (scope = tenant).
    let r = post(&gw, TEXT_PATH, K2, &full, &[]).await;
    assert_eq!(r.cache(), "MISS");
    assert_eq!(items(&gw), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_that_change_vectors_are_keyed() {
    let gw = two_tenants().start().await;
    let send = |p: Value| texts_body(&["same text"], p);
    assert_eq!(
        post(&gw, TEXT_PATH, K1, &send(json!({})), &[])
            .await
            .cache(),
        "MISS"
    );
    // Absent text_type and dimension are their defaults: the same entry.
    let r = post(
        &gw,
        TEXT_PATH,
        K1,
        &send(json!({"text_type": "document", "dimension": 1024})),
        &[],
    )
    .await;
    assert_eq!(r.cache(), "HIT");
    for p in [
        json!({"text_type": "query"}),
        json!({"dimension": 256}),
        json!({"instruct": "find"}),
    ] {
        let r = post(&gw, TEXT_PATH, K1, &send(p.clone()), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.cache(), "MISS", "{p}");
    }
    assert_eq!(items(&gw), 4);
    // A repeated text in one request goes upstream once.
    let r = post(
        &gw,
        TEXT_PATH,
        K1,
        &texts_body(&["dup", "dup", "same text"], json!({})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "PARTIAL");
    assert_eq!(items(&gw), 5);
    let v = r.json();
    let e = v["output"]["embeddings"].as_array().unwrap();
    assert_eq!(e.len(), 3);
    assert_eq!(e[0]["embedding"], e[1]["embedding"]);
    assert_eq!(e[2]["text_index"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_text_requests_are_refused_unforwarded() {
    let gw = TestGateway::builder()
        .tenant("search", K1)
        .tenant_toml("models = [\"text-embedding-v3\"]")
        .tenant("ads", K2)
        .start()
        .await;
    let eleven: Vec<String> = (0..11).map(|i| format!("t{i}")).collect();
    for (key, body, status, names) in [
        (
            K2,
            json!({"model": "text-embedding-v9", "input": {"texts": ["a"]}}),
            400,
            "text-embedding-v9",
        ),
        (
            K2,
            json!({"model": "text-embedding-v4", "input": {"texts": eleven}}),
            400,
            "input.texts",
        ),
        (
            K2,
            json!({"model": "text-embedding-v4", "input": {"texts": [""]}}),
            400,
            "input.texts[0]",
        ),
        (
            K2,
            json!({"model": "text-embedding-v4", "input": {"texts": ["a"]}, "parameters": {"dimension": 100}}),
            400,
            "parameters.dimension",
        ),
        (
            K2,
            json!({"model": "text-embedding-v4", "input": {"texts": ["a"]}, "parameters": {"text_type": "x"}}),
            400,
            "parameters.text_type",
        ),
        (
            K2,
            json!({"model": "qwen3-vl-embedding", "input": {"texts": ["a"]}}),
            400,
            "multimodal",
        ),
        (
            K2,
            json!({"model": "text-embedding-async-v2", "input": {"texts": ["a"]}}),
            400,
            "batch",
        ),
        // A tenant limited to v3 asking for v4.
        (
            K1,
            json!({"model": "text-embedding-v4", "input": {"texts": ["a"]}}),
            403,
            "text-embedding-v4",
        ),
    ] {
        let r = post(&gw, TEXT_PATH, key, &body, &[]).await;
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert!(
            r.json()["message"].as_str().unwrap().contains(names),
            "{body}: {}",
            r.text
        );
        assert_eq!(r.header("x-should-retry"), Some("false"), "{body}");
    }
    assert_eq!(gw.fake.calls(), 0, "nothing forwarded");
    // The tenant's own model works.
    let r = post(
        &gw,
        TEXT_PATH,
        K1,
        &json!({"model": "text-embedding-v3", "input": {"texts": ["a"]}}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let m = gw.metrics().await;
    assert_eq!(
        metric_sum(&m, "embedgate_usage_units_total"),
        fake_dashscope::text_tokens("a") as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_items_in_flight_are_requested_once() {
    let gw = two_tenants().start().await;
    gw.fake.set_latency_ms(300);
    let a = texts_body(&["shared one", "only a", "shared two"], json!({}));
    let b = texts_body(&["shared two", "only b", "shared one"], json!({}));
    let (ra, rb) = tokio::join!(
        post(&gw, TEXT_PATH, K1, &a, &[]),
        post(&gw, TEXT_PATH, K1, &b, &[])
    );
    assert_eq!(
        (ra.status, rb.status),
        (200, 200),
        "{} {}",
        ra.text,
        rb.text
    );
    assert_eq!(items(&gw), 4, "four distinct texts, each requested once");
    // Whichever request claims a shared text first calls upstream for
    // it; the other waits for that call. One request may claim both (its
    // answer a MISS, the other's PARTIAL), or each one of them (both
    // PARTIAL): the two run at once on two workers.
    let mut caches = [ra.cache().to_string(), rb.cache().to_string()];
    caches.sort();
    assert!(
        caches == ["MISS", "PARTIAL"] || caches == ["PARTIAL", "PARTIAL"],
        "{caches:?}"
    );
    // Both answers carry the right vectors in their own order.
    for (r, texts) in [
        (&ra, ["shared one", "only a", "shared two"]),
        (&rb, ["shared two", "only b", "shared one"]),
    ] {
        let v = r.json();
        for (i, t) in texts.iter().enumerate() {
            let want =
                fake_dashscope::item_embedding("text-embedding-v4", "text", t, &json!({}), 1024);
            assert_eq!(f32s(&v["output"]["embeddings"][i]["embedding"]), want);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_reserves_a_bound_and_settles_to_the_bill() {
    let gw = TestGateway::builder()
        .tenant("search", K1)
        .quota(100, Per::Day)
        .start()
        .await;
    // 30 bytes: reserved 30, billed ceil(30/3) = 10.
    let text = "abcdefghijklmnopqrstuvwxyz0123";
    let r = post(&gw, TEXT_PATH, K1, &texts_body(&[text], json!({})), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-quota-remaining"), Some("90"));
    // A request whose bound exceeds what is left is refused before upstream.
    let big = "x".repeat(200);
    let r = post(&gw, TEXT_PATH, K1, &texts_body(&[&big], json!({})), &[]).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.code(), "Throttling.AllocationQuota");
    assert_eq!(gw.fake.calls(), 1);
}
