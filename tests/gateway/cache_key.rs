//! Cache keys: equivalent bodies share one entry, distinct requests and
//! tenants do not (unless the cache is shared).

use super::*;

use serde_json::Value;

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
            &[
                ("tenant", "ads"),
                ("model", MODEL),
                ("modality", "text"),
                ("cache", "hit")
            ]
        ),
        1.0
    );
}
