//! Bad inputs, refused locally; the body size limit.

use super::*;

use std::time::Duration;

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
