//! Hostile input: each case gets a precise error or is served correctly;
//! none crashes the gateway, hangs, reaches upstream when refused, or is
//! metered. Real binary, raw sockets where the bytes matter.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "../common/mod.rs"]
mod common;
use common::*;

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const K: &str = "sk-hostile";

async fn gateway() -> TestGateway {
    TestGateway::builder().tenant("h", K).start().await
}

fn with_items(items: Value) -> String {
    json!({"model": MODEL, "input": {"contents": items}}).to_string()
}

/// Units metered so far, over every series.
async fn metered(gw: &TestGateway) -> f64 {
    metric_sum(&gw.metrics().await, "embedgate_usage_units_total")
}

/// The gateway is still whole: health answers, a normal request works.
async fn still_serving(gw: &TestGateway) {
    assert_eq!(gw.get("/healthz", None).await.status, 200);
    assert_success(&gw.embed(K, &text_body("still here")).await);
}

/// Sends raw bytes on a fresh connection; what came back before the close.
async fn raw(gw: &TestGateway, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_numbers_are_refused_naming_the_factor() {
    let gw = gateway().await;
    for factor in [
        json!("NaN"),
        json!("inf"),
        json!("-inf"),
        json!("1e999"),
        json!(-0.0),
        json!("-0"),
        json!(0),
        json!(-1e308),
        json!(true),
        json!([1]),
        json!({"n": 1}),
    ] {
        let r = gw
            .embed(K, &with_items(json!([{"text": "a", "factor": factor}])))
            .await;
        assert_error(&r, 400, "InvalidParameter");
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .starts_with("input.contents[0].factor"),
            "{factor}: {}",
            r.text
        );
    }
    // Extreme but valid factors are served (a factor is a weight, not a count).
    for factor in [json!(1e308), json!(1e-308), json!("1e-300")] {
        let r = gw
            .embed(
                K,
                &with_items(json!([{"text": format!("f {factor}"), "factor": factor}])),
            )
            .await;
        assert_success(&r);
    }
    assert_eq!(gw.fake.calls(), 3);
    still_serving(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_precise_errors_and_nothing_is_forwarded_or_metered() {
    let gw = gateway().await;
    let deep = format!(
        "{{\"model\":\"{MODEL}\",\"input\":{{\"contents\":[{{\"text\":\"a\"}}]}},\"parameters\":{{\"x\":{}{}}}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let cases: Vec<(String, &str)> = vec![
        (deep, ""),
        (
            String::from_utf8_lossy(b"{\"model\":\"\xff\xfe\"}").into_owned(),
            "model",
        ),
        ("{".repeat(10), "not valid JSON"),
        ("null".into(), "must be a JSON object"),
        ("[]".into(), "must be a JSON object"),
        ("\"string\"".into(), "must be a JSON object"),
        ("{}".into(), "model is required"),
        (
            with_items(json!([{"text": 5}])),
            "input.contents[0].text must be a string",
        ),
        (
            with_items(json!([{"image": ["a"]}])),
            "input.contents[0].image must be a string",
        ),
        (
            with_items(json!([{"audio": null}])),
            "input.contents[0].audio must be a string",
        ),
        (
            with_items(json!([{"text": ""}])),
            "input.contents[0].text must not be empty",
        ),
        (
            with_items(json!([{"video": "v"}])),
            "input.contents[0].video is not supported",
        ),
        (with_items(json!([])), "input.contents must not be empty"),
        (with_items(json!("text")), "input.contents must be a list"),
        (
            json!({"model": MODEL, "input": {"contents": [{"text": "a"}]}, "parameters": "p"})
                .to_string(),
            "parameters must be an object",
        ),
        (
            json!({"model": "gpt-4", "input": {"contents": [{"text": "a"}]}}).to_string(),
            "Model not exist",
        ),
    ];
    for (body, want) in &cases {
        let r = gw.embed(K, body).await;
        assert_error(&r, 400, "InvalidParameter");
        assert!(
            r.json()["message"].as_str().unwrap().contains(want),
            "{}: {}",
            &body[..body.len().min(80)],
            r.text
        );
    }
    // Invalid UTF-8 bytes as such (not lossily replaced).
    let mut invalid =
        format!("{{\"model\":\"{MODEL}\",\"input\":{{\"contents\":[{{\"text\":\"").into_bytes();
    invalid.extend_from_slice(b"\xc3\x28\xa0\xa1");
    invalid.extend_from_slice(b"\"}]}}");
    let head = format!(
        "POST {EMBED_PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {K}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        invalid.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(&invalid);
    let resp = raw(&gw, &req).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("InvalidParameter"), "{resp}");

    assert_eq!(gw.fake.calls(), 0, "nothing refused reaches upstream");
    assert_eq!(metered(&gw).await, 0.0, "nothing refused is metered");
    still_serving(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_are_served_as_the_one_request_upstream_sees() {
    let gw = gateway().await;
    // JSON objects with a repeated key: the last one counts, for the cache
    // key and for the body forwarded upstream alike.
    let body = format!(
        "{{\"model\":\"gpt-4\",\"model\":\"{MODEL}\",\"input\":{{\"contents\":[{{\"text\":\"first\",\"text\":\"second\"}}]}}}}"
    );
    let r = gw.embed(K, &body).await;
    assert_success(&r);
    let up = gw.fake.last_body().unwrap();
    assert_eq!(up["model"], MODEL);
    assert_eq!(up["input"]["contents"][0]["text"], "second");
    // The same request written plainly is a hit.
    assert_eq!(gw.embed(K, &text_body("second")).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enormous_headers_are_refused_without_reaching_upstream() {
    let gw = gateway().await;
    let huge = "x".repeat(100 * 1024);
    let req = format!(
        "POST {EMBED_PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {K}\r\nX-Big: {huge}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let resp = raw(&gw, req.as_bytes()).await;
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 431") || resp.starts_with("HTTP/1.1 400"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    // A huge forwarded header within the head limit is refused by name.
    let r = gw
        .embed_with(
            K,
            &text_body("h"),
            &[("x-dashscope-datainspection", &"y".repeat(8 * 1024))],
        )
        .await;
    assert_error(&r, 400, "InvalidParameter");
    assert_eq!(gw.fake.calls(), 0);
    still_serving(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let gw = gateway().await;
    let one = |text: &str, close: bool| {
        let body = text_body(text);
        format!(
            "POST {EMBED_PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {K}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    let mut all = String::new();
    all.push_str(&one("p1", false));
    all.push_str(&format!(
        "GET /api/v1/nowhere HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {K}\r\n\r\n"
    ));
    all.push_str(&one("p1", true));
    let resp = raw(&gw, all.as_bytes()).await;
    let statuses: Vec<&str> = resp
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &resp[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "404", "200"], "{resp}");
    let caches: Vec<&str> = resp
        .lines()
        .filter_map(|l| l.strip_prefix("x-cache: "))
        .collect();
    assert_eq!(caches, ["MISS", "HIT"], "{resp}");
    assert_eq!(gw.fake.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_items_are_refused_unread_and_unmetered() {
    let gw = TestGateway::builder()
        .tenant("h", K)
        .set("server", "max_body_bytes = 4194304")
        .start()
        .await;
    let items: Vec<Value> = (0..100_000).map(|_| json!({"text": "a"})).collect();
    let r = gw.embed(K, &with_items(Value::Array(items))).await;
    assert_error(&r, 400, "InvalidParameter");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("input.contents has 100000 items, over the limit of 32"),
        "{}",
        r.text
    );
    assert_eq!(gw.fake.calls(), 0);
    assert_eq!(metered(&gw).await, 0.0);
    still_serving(&gw).await;
}
