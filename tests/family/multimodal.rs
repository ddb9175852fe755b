//! The multimodal family: per-item models, fusion, whole-request models.

use super::*;

const PLUS: &str = "tongyi-embedding-vision-plus";

fn contents_body(model: &str, contents: Value, params: Value) -> Value {
    json!({"model": model, "input": {"contents": contents}, "parameters": params})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_item_models_cache_each_content_and_keep_types() {
    let gw = two_tenants().start().await;
    let text = json!({"text": "a red bicycle"});
    let image = json!({"image": "https://example.com/bike.png"});
    let video = json!({"video": "https://example.com/clip.mp4"});
    let params = json!({"dimension": 512});

    let r = post(
        &gw,
        EMBED_PATH,
        K1,
        &contents_body(PLUS, json!([image]), params.clone()),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "MISS");
    let full = contents_body(PLUS, json!([text, image, video]), params.clone());
    let r = post(&gw, EMBED_PATH, K1, &full, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "PARTIAL");
    assert_eq!(items(&gw), 3, "the image was cached: text and video only");
    let got = r.json();
    let billed = gw.fake.billed_units() as f64;
    let want = upstream_answer(&gw, EMBED_PATH, &full).await;
    assert_eq!(got["output"]["embeddings"], want["output"]["embeddings"]);
    let types: Vec<&str> = got["output"]["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["text", "image", "video"]);
    // Served usage = the full answer's: text + visual tokens, image count.
    assert_eq!(got["usage"]["input_tokens"], want["usage"]["input_tokens"]);
    assert_eq!(got["usage"]["image_tokens"], want["usage"]["image_tokens"]);
    assert_eq!(got["usage"]["image_count"], want["usage"]["image_count"]);
    let r = post(&gw, EMBED_PATH, K1, &full, &[]).await;
    assert_eq!(r.cache(), "HIT");
    assert_eq!(items(&gw), 6, "3 by the gateway, 3 by the direct call");

    // Metered per modality under the model, miss units = what was billed.
    let m = gw.metrics().await;
    let miss: f64 = ["text", "image", "video"]
        .iter()
        .map(|md| units(&m, "search", PLUS, md, "miss"))
        .sum();
    assert_eq!(miss, billed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fusion_and_whole_request_models_are_cached_whole() {
    let gw = two_tenants().start().await;
    let two = json!([{"text": "a dog"}, {"image": "https://example.com/dog.png"}]);
    let fused = contents_body(
        "qwen3-vl-embedding",
        two.clone(),
        json!({"enable_fusion": true}),
    );
    let r = post(&gw, EMBED_PATH, K1, &fused, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "MISS");
    let v = r.json();
    let e = v["output"]["embeddings"].as_array().unwrap();
    assert_eq!(e.len(), 1, "one fused vector");
    let want = fake_dashscope::fusion_embedding(
        "qwen3-vl-embedding",
        &two,
        &json!({"enable_fusion": true}),
        2560,
    );
    assert_eq!(f32s(&e[0]["embedding"]), want);
    assert_eq!(post(&gw, EMBED_PATH, K1, &fused, &[]).await.cache(), "HIT");
    // Order matters for a fused vector: a different request.
    let swapped = contents_body(
        "qwen3-vl-embedding",
        json!([{"image": "https://example.com/dog.png"}, {"text": "a dog"}]),
        json!({"enable_fusion": true}),
    );
    assert_eq!(
        post(&gw, EMBED_PATH, K1, &swapped, &[]).await.cache(),
        "MISS"
    );
    // Without fusion the same model is per item: one of the two is new.
    let per_item = contents_body("qwen3-vl-embedding", two.clone(), json!({}));
    assert_eq!(
        post(&gw, EMBED_PATH, K1, &per_item, &[]).await.cache(),
        "MISS"
    );
    let one = contents_body("qwen3-vl-embedding", json!([{"text": "a dog"}]), json!({}));
    assert_eq!(post(&gw, EMBED_PATH, K1, &one, &[]).await.cache(), "HIT");
    // qwen2.5-vl: whole request (its independence is not documented).
    let q25 = contents_body("qwen2.5-vl-embedding", two.clone(), json!({}));
    assert_eq!(post(&gw, EMBED_PATH, K1, &q25, &[]).await.cache(), "MISS");
    let q25_one = contents_body(
        "qwen2.5-vl-embedding",
        json!([{"text": "a dog"}]),
        json!({}),
    );
    assert_eq!(
        post(&gw, EMBED_PATH, K1, &q25_one, &[]).await.cache(),
        "MISS"
    );
    assert_eq!(post(&gw, EMBED_PATH, K1, &q25, &[]).await.cache(), "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_multimodal_requests_are_refused_unforwarded() {
    let gw = two_tenants().start().await;
    for (body, names) in [
        (
            contents_body("multimodal-embedding-v2", json!([{"text": "a"}]), json!({})),
            "multimodal-embedding-v2",
        ),
        (
            contents_body(
                PLUS,
                json!([{"video": "data:video/mp4;base64,AAAA"}]),
                json!({}),
            ),
            "input.contents[0].video",
        ),
        (
            contents_body(PLUS, json!([{"image": "file:///etc/passwd"}]), json!({})),
            "input.contents[0].image",
        ),
        (
            contents_body(PLUS, json!([{"text": "a"}]), json!({"dimension": 100})),
            "parameters.dimension",
        ),
        (
            contents_body("text-embedding-v4", json!([{"text": "a"}]), json!({})),
            "text-embedding-v4",
        ),
    ] {
        let r = post(&gw, EMBED_PATH, K1, &body, &[]).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert!(
            r.json()["message"].as_str().unwrap().contains(names),
            "{body}: {}",
            r.text
        );
    }
    assert_eq!(gw.fake.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_and_nothing_is_cached() {
    let gw = two_tenants().start().await;
    gw.fake
        .push_faults([Fault::Status(400, "InvalidParameter")]);
    let body = contents_body(PLUS, json!([{"text": "x"}]), json!({}));
    let r = post(&gw, EMBED_PATH, K1, &body, &[]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.cache(), "MISS");
    let r = post(&gw, EMBED_PATH, K1, &body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "MISS", "the error was not cached");
}
