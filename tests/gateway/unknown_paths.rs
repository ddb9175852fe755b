//! Unknown paths: 404, never forwarded.

use super::*;

use serde_json::Value;

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
        // (The text path is served since the family landed.)
        "/api/v1/services/embeddings/text-embedding/text-embedding/x",
        "/api/v1/services/aigc/text-generation/generation",
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
