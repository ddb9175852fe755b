//! The fake's embedding-family routes, on a real socket (port 0), called
//! with a minimal HTTP/1.1 client (std TcpStream, `Connection: close`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fake_dashscope::{
    batch_tokens, fusion_embedding, item_embedding, FakeState, Fault, COMPAT_PATH, MULTIMODAL_PATH,
    TEXT_PATH,
};
use serde_json::{json, Value};

const KEY: &str = "sk-fake-family";

struct Reply {
    status: u16,
    raw: String,
    json: Value,
}

async fn fake(key: Option<&str>) -> (Arc<FakeState>, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (fake_dashscope::start(l, key.map(str::to_string)), addr)
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Reply {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    if method == "POST" {
        req.push_str("Content-Type: application/json\r\n");
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let out = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    })
    .await
    .unwrap();
    let (head, raw) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let json = serde_json::from_str(raw).unwrap_or(Value::Null);
    Reply {
        status,
        raw: raw.to_string(),
        json,
    }
}

const AUTH: (&str, &str) = ("Authorization", "Bearer sk-fake-family");
const ASYNC: (&str, &str) = ("X-DashScope-Async", "enable");

async fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    call(addr, "POST", path, &[AUTH], Some(&body)).await
}

fn vec_of(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_answers_per_text_vectors_and_counts_tokens() {
    let (s, addr) = fake(Some(KEY)).await;
    let texts = ["alpha", "beta gamma", "δέλτα", "e", "a longer sixth text"];
    let params = json!({"text_type": "query", "dimension": 512});
    let r = post(
        addr,
        TEXT_PATH,
        json!({"model": "text-embedding-v4", "input": {"texts": texts}, "parameters": params}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(
        r.raw
            .starts_with(r#"{"output":{"embeddings":[{"embedding":["#),
        "{}",
        &r.raw[..60]
    );
    let embs = r.json["output"]["embeddings"].as_array().unwrap();
    assert_eq!(embs.len(), 5);
    let mut tokens = 0;
    for (i, (e, t)) in embs.iter().zip(texts).enumerate() {
        assert_eq!(e["text_index"], i);
        let v = vec_of(&e["embedding"]);
        assert_eq!(v.len(), 512);
        assert_eq!(
            v,
            item_embedding("text-embedding-v4", "text", t, &params, 512)
        );
        tokens += (t.len() as u64).div_ceil(3);
    }
    assert_eq!(r.json["usage"], json!({"total_tokens": tokens}));
    assert!(!r.json["request_id"].as_str().unwrap().is_empty());
    assert_eq!(count(&s.billed_units), tokens);

    // Per-text independence: one text alone gets the vector it had in the batch.
    let alone = post(
        addr,
        TEXT_PATH,
        json!({"model": "text-embedding-v4", "input": {"texts": "δέλτα"}, "parameters": params}),
    )
    .await;
    assert_eq!(alone.status, 200, "{}", alone.raw);
    assert_eq!(
        alone.json["output"]["embeddings"][0]["embedding"],
        embs[2]["embedding"]
    );
    assert_eq!(alone.json["output"]["embeddings"][0]["text_index"], 0);
    // Defaults: document, 1024 for v4; 1536 for v2.
    let d = post(
        addr,
        TEXT_PATH,
        json!({"model": "text-embedding-v4", "input": {"texts": ["alpha"]}}),
    )
    .await;
    let v = vec_of(&d.json["output"]["embeddings"][0]["embedding"]);
    assert_eq!(
        v,
        item_embedding(
            "text-embedding-v4",
            "text",
            "alpha",
            &json!({"text_type": "document"}),
            1024
        )
    );
    let d = post(
        addr,
        TEXT_PATH,
        json!({"model": "text-embedding-v2", "input": {"texts": ["alpha"]}, "parameters": {}}),
    )
    .await;
    assert_eq!(
        d.json["output"]["embeddings"][0]["embedding"]
            .as_array()
            .unwrap()
            .len(),
        1536
    );
    assert_eq!(count(&s.embedding_calls), 4);
    assert_eq!(count(&s.text_calls), 4);
    assert_eq!(count(&s.items), 8);
    assert_eq!(s.bodies.lock().unwrap().len(), 4);
    assert_eq!(s.paths().len(), 4);
    assert!(s.paths().iter().all(|p| p == TEXT_PATH));

    // Sparse output.
    let sp = post(
        addr,
        TEXT_PATH,
        json!({"model": "text-embedding-v3", "input": {"texts": ["a b a"]}, "parameters": {"output_type": "sparse"}}),
    )
    .await;
    assert_eq!(sp.status, 200, "{}", sp.raw);
    let e = &sp.json["output"]["embeddings"][0];
    assert!(e.get("embedding").is_none(), "{e}");
    let sparse = e["sparse_embedding"].as_array().unwrap();
    assert_eq!(sparse.len(), 2, "distinct tokens: {e}");
    assert!(sparse
        .iter()
        .all(|x| x["index"].is_u64() && x["value"].is_f64() && x["token"].is_string()));
    let both = post(
        addr,
        TEXT_PATH,
        json!({"model": "text-embedding-v3", "input": {"texts": ["a b a"]}, "parameters": {"output_type": "dense&sparse"}}),
    )
    .await;
    let e2 = &both.json["output"]["embeddings"][0];
    assert_eq!(e2["sparse_embedding"], e["sparse_embedding"]);
    assert_eq!(e2["embedding"].as_array().unwrap().len(), 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_refusals() {
    let (s, addr) = fake(Some(KEY)).await;
    let cases = [
        (
            json!({"model": "text-embedding-v9", "input": {"texts": ["a"]}}),
            "Model not exist.",
        ),
        (
            json!({"model": "text-embedding-v4", "input": {"texts": vec!["a"; 11]}}),
            "batch size is invalid, it should not be larger than 10.",
        ),
        (
            json!({"model": "text-embedding-v2", "input": {"texts": vec!["a"; 26]}}),
            "batch size is invalid, it should not be larger than 25.",
        ),
        (
            json!({"model": "text-embedding-v4", "input": {"texts": ["a", ""]}}),
            "Range of input length should be [1, 8192]",
        ),
        (
            json!({"model": "text-embedding-v1", "input": {"texts": ["x".repeat(3 * 2048 + 1)]}}),
            "Range of input length should be [1, 2048]",
        ),
        (
            json!({"model": "text-embedding-v2", "input": {"texts": ["a"]}, "parameters": {"dimension": 1024}}),
            "dimension",
        ),
        (
            json!({"model": "text-embedding-v3", "input": {"texts": ["a"]}, "parameters": {"dimension": 2048}}),
            "dimension",
        ),
        (
            json!({"model": "text-embedding-v4", "input": {"texts": ["a"]}, "parameters": {"text_type": "passage"}}),
            "text_type",
        ),
        (
            json!({"model": "text-embedding-v2", "input": {"texts": ["a"]}, "parameters": {"output_type": "sparse"}}),
            "output_type",
        ),
    ];
    for (body, msg) in &cases {
        let r = post(addr, TEXT_PATH, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.raw);
        assert_eq!(r.json["code"], "InvalidParameter", "{}", r.raw);
        assert!(
            r.json["message"].as_str().unwrap().contains(msg),
            "{body}: {}",
            r.raw
        );
    }
    // Async model without the header, sync model with it.
    let r = post(
        addr,
        TEXT_PATH,
        json!({"model": "text-embedding-async-v2", "input": {"url": "https://x/f.txt"}}),
    )
    .await;
    assert_eq!(
        (r.status, r.json["code"].as_str()),
        (403, Some("AccessDenied"))
    );
    let r = call(
        addr,
        "POST",
        TEXT_PATH,
        &[AUTH, ASYNC],
        Some(&json!({"model": "text-embedding-v4", "input": {"texts": ["a"]}})),
    )
    .await;
    assert_eq!(
        (r.status, r.json["code"].as_str()),
        (403, Some("AccessDenied"))
    );
    assert_eq!(count(&s.task_submits), 1);
    assert_eq!(count(&s.text_calls), cases.len() as u64 + 1);
    assert_eq!(count(&s.billed_units), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multimodal_family_per_item_vectors_usage_and_fusion() {
    let (s, addr) = fake(Some(KEY)).await;
    let m = "tongyi-embedding-vision-plus";
    let params = json!({"fps": 0.5});
    let contents = json!([
        {"text": "a red bicycle"},
        {"image": "https://x/bike.png"},
        {"video": "https://x/clip.mp4"},
        {"multi_images": ["https://x/1.jpg", "data:image/png;base64,AAAA"]}
    ]);
    let r = post(
        addr,
        MULTIMODAL_PATH,
        json!({"model": m, "input": {"contents": contents}, "parameters": params}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(
        r.raw
            .starts_with(r#"{"output":{"embeddings":[{"index":0,"embedding":["#),
        "{}",
        &r.raw[..60]
    );
    let embs = r.json["output"]["embeddings"].as_array().unwrap();
    let kinds = ["text", "image", "video", "multi_images"];
    let values = [
        "a red bicycle".to_string(),
        "https://x/bike.png".to_string(),
        "https://x/clip.mp4".to_string(),
        serde_json::to_string(&contents[3]["multi_images"]).unwrap(),
    ];
    for (i, e) in embs.iter().enumerate() {
        assert_eq!(e["index"], i);
        assert_eq!(e["type"], kinds[i]);
        assert_eq!(
            vec_of(&e["embedding"]),
            item_embedding(m, kinds[i], &values[i], &params, 1152)
        );
    }
    // text 5 tokens; image 256; video 2 frames (fps 0.5) 512; multi 2 x 256.
    let visual = 256 + 512 + 512;
    assert_eq!(
        r.json["usage"],
        json!({"input_tokens": 5 + visual, "image_tokens": visual, "image_count": 3})
    );
    assert_eq!(count(&s.billed_units), 5 + visual);

    // One item alone: the same vector (per-item independence); no
    // image_count without images.
    let one = post(
        addr,
        MULTIMODAL_PATH,
        json!({"model": m, "input": {"contents": [{"text": "a red bicycle"}]}, "parameters": params}),
    )
    .await;
    assert_eq!(
        one.json["output"]["embeddings"][0]["embedding"],
        embs[0]["embedding"]
    );
    assert_eq!(
        one.json["usage"],
        json!({"input_tokens": 5, "image_tokens": 0})
    );

    // Dimension: default per model, checked.
    let r = post(
        addr,
        MULTIMODAL_PATH,
        json!({"model": "tongyi-embedding-vision-flash", "input": {"contents": [{"image": "oss://b/k.png"}]}, "parameters": {"dimension": 256}}),
    )
    .await;
    assert_eq!(
        r.status, 400,
        "oss:// without the resolve header: {}",
        r.raw
    );
    let r = call(
        addr,
        "POST",
        MULTIMODAL_PATH,
        &[AUTH, ("X-DashScope-OssResourceResolve", "enable")],
        Some(&json!({"model": "tongyi-embedding-vision-flash", "input": {"contents": [{"image": "oss://b/k.png"}]}, "parameters": {"dimension": 256}})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        vec_of(&r.json["output"]["embeddings"][0]["embedding"]),
        item_embedding(
            "tongyi-embedding-vision-flash",
            "image",
            "oss://b/k.png",
            &json!({}),
            256
        )
    );
    for (model, dim) in [
        ("multimodal-embedding-v1", 1024),
        ("qwen3-vl-embedding", 2560),
        ("qwen2.5-vl-embedding", 1024),
    ] {
        let r = post(
            addr,
            MULTIMODAL_PATH,
            json!({"model": model, "input": {"contents": [{"text": "hi"}, {"image": "https://x/i.png"}]}}),
        )
        .await;
        assert_eq!(r.status, 200, "{model}: {}", r.raw);
        let e = &r.json["output"]["embeddings"];
        assert_eq!(e.as_array().unwrap().len(), 2);
        assert_eq!(
            vec_of(&e[1]["embedding"]),
            item_embedding(model, "image", "https://x/i.png", &json!({}), dim)
        );
        assert_eq!(r.json["usage"]["image_count"], 1);
    }

    // Fusion: one vector for the request, depending on every item in order.
    let fused = json!([{"text": "hi"}, {"image": "https://x/i.png"}]);
    let fp = json!({"enable_fusion": true, "dimension": 512});
    let r = post(
        addr,
        MULTIMODAL_PATH,
        json!({"model": "qwen3-vl-embedding", "input": {"contents": fused}, "parameters": fp}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let e = r.json["output"]["embeddings"].as_array().unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(
        (e[0]["index"].as_u64(), e[0]["type"].as_str()),
        (Some(0), Some("fusion"))
    );
    let v = vec_of(&e[0]["embedding"]);
    assert_eq!(v, fusion_embedding("qwen3-vl-embedding", &fused, &fp, 512));
    let swapped = json!([{"image": "https://x/i.png"}, {"text": "hi"}]);
    assert_ne!(
        v,
        fusion_embedding("qwen3-vl-embedding", &swapped, &fp, 512)
    );
    assert_eq!(
        r.json["usage"],
        json!({"input_tokens": 257, "image_tokens": 256, "image_count": 1})
    );

    // Refusals, each naming the field.
    let too_many: Vec<Value> = (0..21).map(|i| json!({"text": format!("t{i}")})).collect();
    let cases = [
        (
            json!({"model": "multimodal-embedding-v1", "input": {"contents": [{"text": "a"}]}, "parameters": {"dimension": 512}}),
            "dimension",
        ),
        (
            json!({"model": "multimodal-embedding-v1", "input": {"contents": [{"multi_images": ["https://x/1.png"]}]}}),
            "input.contents[0].multi_images",
        ),
        (
            json!({"model": m, "input": {"contents": [{"text": "a"}, {"video": "data:video/mp4;base64,AAAA"}]}}),
            "input.contents[1].video",
        ),
        (
            json!({"model": m, "input": {"contents": [{"text": "a"}, {"image": "ftp://x/i.png"}]}}),
            "input.contents[1].image",
        ),
        (json!({"model": m, "input": {"contents": too_many}}), "20"),
        (
            json!({"model": m, "input": {"contents": [{"text": "a", "image": "https://x/i.png"}]}}),
            "input.contents[0]",
        ),
        (
            json!({"model": "qwen-nope", "input": {"contents": [{"text": "a"}]}}),
            "Model not exist.",
        ),
    ];
    let billed = count(&s.billed_units);
    for (body, msg) in &cases {
        let r = post(addr, MULTIMODAL_PATH, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.raw);
        assert_eq!(r.json["code"], "InvalidParameter", "{}", r.raw);
        assert!(
            r.json["message"].as_str().unwrap().contains(msg),
            "{msg}: {}",
            r.raw
        );
    }
    assert_eq!(count(&s.billed_units), billed);

    // ONE-PEACE still answers as before, on the same path and counters.
    let calls = count(&s.multimodal_calls);
    let r = post(
        addr,
        MULTIMODAL_PATH,
        json!({"model": "multimodal-embedding-one-peace-v1", "input": {"contents": [{"text": "hi"}]}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        r.json["output"]["embedding"].as_array().unwrap().len(),
        1536
    );
    assert_eq!(r.json["usage"]["total_usage"], 1);
    assert_eq!(count(&s.multimodal_calls), calls + 1);
    assert_eq!(count(&s.embedding_calls), calls + 1);
    assert_eq!(count(&s.text_calls), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatible_mode_float_base64_and_errors() {
    let (s, addr) = fake(Some(KEY)).await;
    let r = post(
        addr,
        COMPAT_PATH,
        json!({"model": "text-embedding-v4", "input": ["a", "bcdef"], "dimensions": 256}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(
        r.raw.starts_with(r#"{"data":[{"embedding":["#),
        "{}",
        &r.raw[..40]
    );
    let data = r.json["data"].as_array().unwrap();
    for (i, (d, t)) in data.iter().zip(["a", "bcdef"]).enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "embedding");
        assert_eq!(
            vec_of(&d["embedding"]),
            item_embedding("text-embedding-v4", "text", t, &json!({}), 256)
        );
    }
    assert_eq!(r.json["model"], "text-embedding-v4");
    assert_eq!(r.json["object"], "list");
    assert_eq!(
        r.json["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    assert!(!r.json["id"].as_str().unwrap().is_empty());

    // The native text_type=document vector is the same.
    let n = post(
        addr,
        TEXT_PATH,
        json!({"model": "text-embedding-v4", "input": {"texts": ["bcdef"]}, "parameters": {"dimension": 256, "text_type": "document"}}),
    )
    .await;
    assert_eq!(
        n.json["output"]["embeddings"][0]["embedding"],
        data[1]["embedding"]
    );

    // base64: little-endian float32, the same numbers.
    let b = post(
        addr,
        COMPAT_PATH,
        json!({"model": "text-embedding-v3", "input": "a", "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.raw);
    let want = item_embedding("text-embedding-v3", "text", "a", &json!({}), 1024);
    assert_eq!(
        b.json["data"][0]["embedding"],
        fake_dashscope::base64_f32_le(&want)
    );

    let err = |r: &Reply, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", r.raw);
        assert_eq!(r.json["error"]["code"], code, "{}", r.raw);
        assert_eq!(
            r.json["error"]["type"], "invalid_request_error",
            "{}",
            r.raw
        );
        assert!(r.json["error"]["param"].is_null(), "{}", r.raw);
        assert!(!r.json["error"]["message"].as_str().unwrap().is_empty());
        assert!(r.json["request_id"].is_string());
    };
    let r = post(
        addr,
        COMPAT_PATH,
        json!({"model": "multimodal-embedding-v1", "input": "a"}),
    )
    .await;
    err(&r, 404, "model_not_found");
    let r = post(
        addr,
        COMPAT_PATH,
        json!({"model": "text-embedding-v4", "input": vec!["a"; 11]}),
    )
    .await;
    err(&r, 400, "invalid_parameter_error");
    let r = post(
        addr,
        COMPAT_PATH,
        json!({"model": "text-embedding-v3", "input": "a", "dimensions": 2048}),
    )
    .await;
    err(&r, 400, "invalid_parameter_error");
    let r = call(
        addr,
        "POST",
        COMPAT_PATH,
        &[("Authorization", "Bearer wrong")],
        Some(&json!({"model": "text-embedding-v4", "input": "a"})),
    )
    .await;
    err(&r, 401, "invalid_api_key");
    s.push_faults([
        Fault::Status(429, "Throttling"),
        Fault::Status(500, "InternalError"),
    ]);
    let body = json!({"model": "text-embedding-v4", "input": "a"});
    err(
        &post(addr, COMPAT_PATH, body.clone()).await,
        429,
        "limit_requests",
    );
    err(
        &post(addr, COMPAT_PATH, body.clone()).await,
        500,
        "internal_error",
    );
    assert_eq!(count(&s.compat_calls), 8);
    assert_eq!(count(&s.embedding_calls), 9);
    assert_eq!(s.headers.lock().unwrap().len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_task_flow() {
    let (s, addr) = fake(Some(KEY)).await;
    let url = "https://example.com/texts.txt";
    let submit = |model: &'static str| async move {
        call(
            addr,
            "POST",
            TEXT_PATH,
            &[AUTH, ASYNC],
            Some(&json!({"model": model, "parameters": {"text_type": "query"}, "input": {"url": url}})),
        )
        .await
    };
    let r = submit("text-embedding-async-v2").await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.json["output"]["task_status"], "PENDING");
    let id = r.json["output"]["task_id"].as_str().unwrap().to_string();
    assert!(r.json.get("usage").is_none());
    let task = format!("/api/v1/tasks/{id}");
    let get = |p: String| async move { call(addr, "GET", &p, &[AUTH], None).await };

    // A second task, canceled while PENDING; canceling again is refused.
    let other = submit("text-embedding-async-v1").await;
    let oid = other.json["output"]["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let c = call(
        addr,
        "POST",
        &format!("/api/v1/tasks/{oid}/cancel"),
        &[AUTH],
        None,
    )
    .await;
    assert_eq!(c.status, 200, "{}", c.raw);
    assert!(c.json["request_id"].is_string());
    let c = call(
        addr,
        "POST",
        &format!("/api/v1/tasks/{oid}/cancel"),
        &[AUTH],
        None,
    )
    .await;
    assert_eq!(
        (c.status, c.json["code"].as_str()),
        (400, Some("UnsupportedOperation"))
    );
    assert_eq!(
        get(format!("/api/v1/tasks/{oid}")).await.json["output"]["task_status"],
        "CANCELED"
    );

    // Poll 1: RUNNING with metrics; poll 2: SUCCEEDED, billed once.
    let p1 = get(task.clone()).await;
    assert_eq!(p1.status, 200);
    assert_eq!(p1.json["output"]["task_status"], "RUNNING", "{}", p1.raw);
    assert!(p1.json["output"]["task_metrics"]["TOTAL"].as_u64().unwrap() >= 1);
    assert!(p1.json.get("usage").is_none());
    assert_eq!(count(&s.billed_units), 0);
    let c = call(addr, "POST", &format!("{task}/cancel"), &[AUTH], None).await;
    assert_eq!(c.status, 400, "RUNNING cannot be canceled");
    let p2 = get(task.clone()).await;
    let o = &p2.json["output"];
    assert_eq!(o["task_status"], "SUCCEEDED", "{}", p2.raw);
    for k in ["submit_time", "scheduled_time", "end_time", "url"] {
        assert!(o[k].is_string(), "{k}: {}", p2.raw);
    }
    let tokens = batch_tokens(url);
    assert_eq!(tokens, 10 + url.len() as u64);
    assert_eq!(p2.json["usage"], json!({"total_tokens": tokens}));
    assert_eq!(count(&s.billed_units), tokens);
    let p3 = get(task.clone()).await;
    assert_eq!(p3.json["output"]["task_status"], "SUCCEEDED");
    assert_eq!(p3.json["usage"], p2.json["usage"]);
    assert_eq!(count(&s.billed_units), tokens, "billed once");

    // The result file: one JSON line per row.
    let rurl = o["url"].as_str().unwrap();
    let path = rurl.strip_prefix(&format!("http://{addr}")).unwrap();
    let f = call(addr, "GET", path, &[], None).await;
    assert_eq!(f.status, 200);
    let lines: Vec<Value> = f
        .raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    let sum: u64 = lines
        .iter()
        .map(|l| l["usage"]["total_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, tokens);
    assert_eq!(
        vec_of(&lines[0]["output"]["embedding"]),
        item_embedding(
            "text-embedding-async-v2",
            "text",
            &format!("{url}#0"),
            &json!({"text_type": "query"}),
            1536
        )
    );

    // Unknown id: 200 UNKNOWN.
    let u = get("/api/v1/tasks/no-such-task".into()).await;
    assert_eq!(u.status, 200);
    assert_eq!(
        u.json["output"],
        json!({"task_id": "no-such-task", "task_status": "UNKNOWN"})
    );

    // List: both tasks, newest first; filters.
    let l = get("/api/v1/tasks?page_no=1&page_size=10".into()).await;
    assert_eq!(l.status, 200, "{}", l.raw);
    assert_eq!(l.json["total"], 2);
    assert_eq!(l.json["total_page"], 1);
    assert_eq!(l.json["page_no"], 1);
    assert_eq!(l.json["page_size"], 10);
    let data = l.json["data"].as_array().unwrap();
    assert_eq!(data[0]["task_id"], oid.as_str());
    assert_eq!(data[0]["task_status"], "CANCELED");
    assert_eq!(data[1]["task_id"], id.as_str());
    assert_eq!(data[1]["model_name"], "text-embedding-async-v2");
    assert!(data[1]["submit_time"].is_string());
    let l = get("/api/v1/tasks?status=SUCCEEDED".into()).await;
    assert_eq!(l.json["total"], 1);
    let l = get("/api/v1/tasks?page_no=2&page_size=1".into()).await;
    assert_eq!(l.json["data"][0]["task_id"], id.as_str());
    assert_eq!(l.json["total_page"], 2);

    // A task told to fail; a fault on a submit.
    s.fail_next_task();
    let f = submit("text-embedding-async-v1").await;
    let fid = f.json["output"]["task_id"].as_str().unwrap().to_string();
    let _ = get(format!("/api/v1/tasks/{fid}")).await;
    let f2 = get(format!("/api/v1/tasks/{fid}")).await;
    assert_eq!(f2.json["output"]["task_status"], "FAILED", "{}", f2.raw);
    assert!(f2.json["output"]["code"].is_string());
    assert!(f2.json["output"]["message"].is_string());
    assert_eq!(count(&s.billed_units), tokens);
    s.push_faults([Fault::Status(500, "InternalError")]);
    let r = submit("text-embedding-async-v2").await;
    assert_eq!(r.status, 500);
    let r = call(
        addr,
        "POST",
        TEXT_PATH,
        &[AUTH, ASYNC],
        Some(&json!({"model": "text-embedding-async-v2", "input": {}})),
    )
    .await;
    assert_eq!(
        (r.status, r.json["code"].as_str()),
        (400, Some("InvalidParameter"))
    );

    // Polling faster: succeeded on the first poll.
    s.task_polls_to_succeed.store(1, Ordering::SeqCst);
    let q = submit("text-embedding-async-v2").await;
    let qid = q.json["output"]["task_id"].as_str().unwrap().to_string();
    assert_eq!(
        get(format!("/api/v1/tasks/{qid}")).await.json["output"]["task_status"],
        "SUCCEEDED"
    );

    assert_eq!(count(&s.task_submits), 6);
    assert_eq!(count(&s.task_cancels), 3);
    assert_eq!(count(&s.task_lists), 3);
    assert_eq!(
        count(&s.embedding_calls),
        0,
        "tasks are not sync embedding calls"
    );
    assert_eq!(s.task_bodies.lock().unwrap().len(), 6);
    assert!(s
        .paths()
        .iter()
        .any(|p| p == "/api/v1/tasks?status=SUCCEEDED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_scoped_to_the_key_that_made_them() {
    // A fake accepting any key: tasks still belong to the key that made them.
    let (_s, addr) = fake(None).await;
    let a = ("Authorization", "Bearer key-a");
    let b = ("Authorization", "Bearer key-b");
    let r = call(
        addr,
        "POST",
        TEXT_PATH,
        &[a, ASYNC],
        Some(&json!({"model": "text-embedding-async-v1", "input": {"url": "https://x/a.txt"}})),
    )
    .await;
    let id = r.json["output"]["task_id"].as_str().unwrap().to_string();
    let p = call(addr, "GET", &format!("/api/v1/tasks/{id}"), &[b], None).await;
    assert_eq!(p.json["output"]["task_status"], "UNKNOWN");
    let c = call(
        addr,
        "POST",
        &format!("/api/v1/tasks/{id}/cancel"),
        &[b],
        None,
    )
    .await;
    assert_eq!(c.status, 400);
    let l = call(addr, "GET", "/api/v1/tasks", &[b], None).await;
    assert_eq!(l.json["total"], 0);
    let p = call(addr, "GET", &format!("/api/v1/tasks/{id}"), &[a], None).await;
    assert_eq!(p.json["output"]["task_status"], "RUNNING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_gets_401_on_every_route() {
    let (s, addr) = fake(Some(KEY)).await;
    let bad = [("Authorization", "Bearer nope"), ASYNC];
    type Route<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<Value>);
    let routes: [Route; 7] = [
        (
            "POST",
            MULTIMODAL_PATH,
            &bad[..1],
            Some(json!({"model": "qwen3-vl-embedding", "input": {"contents": [{"text": "a"}]}})),
        ),
        (
            "POST",
            TEXT_PATH,
            &bad[..1],
            Some(json!({"model": "text-embedding-v4", "input": {"texts": ["a"]}})),
        ),
        (
            "POST",
            TEXT_PATH,
            &bad,
            Some(json!({"model": "text-embedding-async-v1", "input": {"url": "https://x"}})),
        ),
        (
            "POST",
            COMPAT_PATH,
            &bad[..1],
            Some(json!({"model": "text-embedding-v4", "input": "a"})),
        ),
        ("GET", "/api/v1/tasks/x", &bad[..1], None),
        ("POST", "/api/v1/tasks/x/cancel", &bad[..1], None),
        ("GET", "/api/v1/tasks", &bad[..1], None),
    ];
    for (m, p, h, b) in &routes {
        let r = call(addr, m, p, h, b.as_ref()).await;
        assert_eq!(r.status, 401, "{m} {p}: {}", r.raw);
    }
    assert_eq!(count(&s.billed_units), 0);
    assert_eq!(s.paths().len(), routes.len());
}
