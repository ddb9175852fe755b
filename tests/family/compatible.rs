//! The OpenAI-compatible endpoint.

use base64::Engine as _;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_and_float_clients_share_entries_and_get_their_format() {
    let gw = two_tenants().start().await;
    let float = json!({"model": "text-embedding-v4", "input": ["a", "b"], "dimensions": 256, "encoding_format": "float"});
    let r = post(&gw, COMPAT_PATH, K1, &float, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.last_body().unwrap()["encoding_format"], "float");
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-v4");
    assert_eq!(v["usage"]["prompt_tokens"], v["usage"]["total_tokens"]);
    let want_b = fake_dashscope::item_embedding("text-embedding-v4", "text", "b", &json!({}), 256);
    assert_eq!(f32s(&v["data"][1]["embedding"]), want_b);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][1]["object"], "embedding");

    // What the openai SDK sends by default: base64, answered from cache.
    let b64 = json!({"model": "text-embedding-v4", "input": ["b", "c"], "dimensions": 256, "encoding_format": "base64"});
    let r = post(&gw, COMPAT_PATH, K1, &b64, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "PARTIAL");
    assert_eq!(
        gw.fake.last_body().unwrap()["encoding_format"],
        "float",
        "upstream is asked for floats"
    );
    let v = r.json();
    let s = v["data"][0]["embedding"].as_str().expect("a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, want_b);
    assert_eq!(v["data"][1]["index"], 1);

    // Compatible-mode and native entries are not shared.
    let native = json!({"model": "text-embedding-v4", "input": {"texts": ["a"]}, "parameters": {"dimension": 256}});
    assert_eq!(post(&gw, TEXT_PATH, K1, &native, &[]).await.cache(), "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_openai_shaped() {
    let gw = two_tenants().start().await;
    let r = post(
        &gw,
        COMPAT_PATH,
        K1,
        &json!({"model": "qwen3-vl-embedding", "input": "a"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("qwen3-vl-embedding"));
    let r = post(
        &gw,
        COMPAT_PATH,
        K1,
        &json!({"model": "text-embedding-v4", "input": [1, 2]}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "invalid_parameter_error");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    // The gateway's own layers answer in the same shape (auth here).
    let r = post(
        &gw,
        COMPAT_PATH,
        "sk-wrong",
        &json!({"model": "text-embedding-v4", "input": "a"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(gw.fake.calls(), 0);
}
