//! One tenant cannot hurt the others with its input (issue 8): item count,
//! nesting, string lengths and body size are bounded, each refusal is
//! precise, nothing is forwarded or metered; and a refusal made before the
//! body was read still reaches a client that is busy sending it.

use super::*;

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The ledger's rows for today, all tenants.
async fn ledger_rows(gw: &TestGateway) -> Vec<serde_json::Value> {
    let d = today();
    let r = gw
        .get(&format!("/admin/usage?from={d}&to={d}"), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["rows"].as_array().unwrap().clone()
}

fn items(n: usize, item: &str) -> String {
    let contents = vec![item; n].join(",");
    format!(
        r#"{{"model":"{MODEL}","input":{{"contents":[{contents}]}},"parameters":{{"auto_truncation":true}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_inputs_get_a_precise_400_and_nothing_is_forwarded_or_metered() {
    let gw = one_tenant().start().await;
    let m = MODEL;
    let cases: Vec<(String, String)> = vec![
        // The reported attack: 65,000 one-letter items in 845 KB.
        (
            items(65_000, r#"{"text":"a"}"#),
            "input.contents has 65000 items, over the limit of 32".into(),
        ),
        (
            items(33, r#"{"image":"https://x/1.png"}"#),
            "input.contents has 33 items, over the limit of 32".into(),
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}}]}},"parameters":{{"x":{}1{}}}}}"#,
                "[".repeat(50_000),
                "]".repeat(50_000)
            ),
            "request body nests deeper than the limit of 32 levels (at byte ".into(),
        ),
        (
            items(1, &format!(r#"{{"text":"{}"}}"#, "x".repeat(20_000))),
            "input.contents[0].text is 20000 bytes, over the limit of 16384".into(),
        ),
        (
            items(
                2,
                &format!(r#"{{"audio":"https://x/{}"}}"#, "a".repeat(9_000)),
            ),
            "input.contents[0].audio is 9010 bytes, over the limit of 8192".into(),
        ),
        (
            format!(
                r#"{{"model":"{}","input":{{"contents":[{{"text":"a"}}]}}}}"#,
                "m".repeat(500_000)
            ),
            "model is 500000 bytes, over the limit of 128".into(),
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}}]}},"parameters":{{"p":"{}"}}}}"#,
                "p".repeat(100_000)
            ),
            "parameters is 100008 bytes of JSON, over the limit of 4096".into(),
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}}]}},"junk":[{}0]}}"#,
                "0,".repeat(100_000)
            ),
            "junk is 200003 bytes of JSON, over the limit of 4096".into(),
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"{}}}]}}}}"#,
                (0..50_000)
                    .map(|i| format!(r#","k{i}":1"#))
                    .collect::<String>()
            ),
            "input.contents[0] has 50001 fields, over the limit of 16".into(),
        ),
    ];
    for (body, want) in &cases {
        assert!(body.len() < 1024 * 1024, "{want}: {} bytes", body.len());
        let r = gw.embed(K1, body).await;
        let v = assert_error(&r, 400, "InvalidParameter");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.starts_with(want.as_str()),
            "message {msg:?}, want {want:?}"
        );
        assert!(msg.len() < 200, "a refusal stays small: {msg}");
        assert_eq!(r.header("x-should-retry"), Some("false"));
    }
    assert_eq!(gw.fake.calls(), 0, "nothing may be forwarded");
    let metrics = gw.metrics().await;
    assert_eq!(metric_sum(&metrics, "embedgate_usage_units_total"), 0.0);
    assert_eq!(metric_sum(&metrics, "embedgate_items_total"), 0.0);
    assert_eq!(
        metric(
            &metrics,
            "embedgate_requests_total",
            &[
                ("tenant", "search"),
                // Refused by the parser: no model was read.
                ("model", "none"),
                ("cache", "none"),
                ("code", "InvalidParameter")
            ]
        ),
        cases.len() as f64
    );
    assert_eq!(ledger_rows(&gw).await, Vec::<serde_json::Value>::new());

    // The limits themselves are fine: 32 items, each at its longest.
    let text = format!(r#"{{"text":"{}"}}"#, "t".repeat(16 * 1024));
    let url = format!(r#"{{"image":"https://x/{}"}}"#, "u".repeat(8 * 1024 - 10));
    let mut full: Vec<&str> = vec![&text; 16];
    full.extend(vec![url.as_str(); 16]);
    let body = format!(
        r#"{{"model":"{m}","input":{{"contents":[{}]}},"parameters":{{"auto_truncation":true}}}}"#,
        full.join(",")
    );
    assert_success(&gw.embed(K1, &body).await);
    assert_eq!(gw.fake.calls(), 1);
    assert_eq!(gw.fake.billed_units(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_item_limit_is_configurable() {
    let gw = one_tenant().set("upstream", "max_items = 2").start().await;
    let r = gw.embed(K1, &items(3, r#"{"text":"a"}"#)).await;
    let v = assert_error(&r, 400, "InvalidParameter");
    assert_eq!(
        v["message"],
        "input.contents has 3 items, over the limit of 2"
    );
    assert_success(&gw.embed(K1, &items(2, r#"{"text":"a"}"#)).await);
    assert_eq!(gw.fake.calls(), 1);
}

/// The head of a POST to the embedding path.
fn head(key: &str, framing: &str) -> String {
    format!(
        "POST {EMBED_PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n{framing}\r\n"
    )
}

/// Reads one HTTP/1.1 answer with a Content-Length body; None at EOF or on
/// a reset before a whole answer.
async fn read_answer<R: AsyncRead + Unpin>(s: &mut R) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(a) = parse_answer(&buf) {
            return Some(a);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes `total` body bytes in 32 KB pieces, pausing between them like a
/// client on a slow link, while `read_answer` runs; returns the bytes
/// written before any error, the error, and the answer.
async fn send_slowly(
    s: TcpStream,
    head: &str,
    total: usize,
    chunked: bool,
) -> (
    usize,
    Option<std::io::Error>,
    Option<(u16, String)>,
    TcpStream,
) {
    let (mut rd, mut wr) = s.into_split();
    let head = head.to_string();
    let writer = tokio::spawn(async move {
        if let Err(e) = wr.write_all(head.as_bytes()).await {
            return (0, Some(e), wr);
        }
        let piece = vec![b' '; 32 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = piece.len().min(total - sent);
            let r = if chunked {
                let mut framed = format!("{n:x}\r\n").into_bytes();
                framed.extend_from_slice(&piece[..n]);
                framed.extend_from_slice(b"\r\n");
                wr.write_all(&framed).await
            } else {
                wr.write_all(&piece[..n]).await
            };
            if let Err(e) = r {
                return (sent, Some(e), wr);
            }
            sent += n;
            // Pacing, not waiting for state: a slow link.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if chunked {
            if let Err(e) = wr.write_all(b"0\r\n\r\n").await {
                return (sent, Some(e), wr);
            }
        }
        (sent, None, wr)
    });
    let reader = tokio::spawn(async move {
        let answer = tokio::time::timeout(Duration::from_secs(30), read_answer(&mut rd))
            .await
            .ok()
            .flatten();
        (answer, rd)
    });
    let (sent, err, wr) = writer.await.unwrap();
    let (answer, rd) = reader.await.unwrap();
    (sent, err, answer, rd.reunite(wr).unwrap())
}

/// One complete answer at the start of `buf`, if there is one.
fn parse_answer(buf: &[u8]) -> Option<(u16, String)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    if buf.len() < end + 4 + len {
        return None;
    }
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((
        status,
        String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string(),
    ))
}

fn assert_dashscope_error(answer: &Option<(u16, String)>, status: u16, code: &str) {
    let (got, body) = answer.as_ref().expect("no answer read");
    assert_eq!(*got, status, "{body}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["code"], code, "{body}");
    assert!(v["request_id"].as_str().is_some_and(|r| !r.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_its_body_reads_the_refusal() {
    let gw = one_tenant().start().await;
    let over = 2 * 1024 * 1024;
    let under = 512 * 1024;
    // Over the limit by Content-Length (answered before any byte of the
    // body), over it while reading a chunked body, and refused for its key
    // before the body is read.
    let cases = [
        (
            head(K1, &format!("Content-Length: {over}\r\n")),
            over,
            false,
            413,
            "BadRequest.TooLarge",
        ),
        (
            head(K1, "Transfer-Encoding: chunked\r\n"),
            over,
            true,
            413,
            "BadRequest.TooLarge",
        ),
        (
            head("sk-wrong", &format!("Content-Length: {under}\r\n")),
            under,
            false,
            401,
            "InvalidApiKey",
        ),
    ];
    for (head, total, chunked, status, code) in cases {
        let s = TcpStream::connect(gw.addr).await.unwrap();
        let (sent, err, answer, mut s) = send_slowly(s, &head, total, chunked).await;
        assert!(
            err.is_none(),
            "{code}: writing failed after {sent} bytes: {err:?}"
        );
        assert_eq!(sent, total);
        assert_dashscope_error(&answer, status, code);
        // The body was read to its end, so the connection is still good.
        let body = text_body("same connection");
        let req = format!("{}{body}", head_with_length(K1, body.len()));
        s.write_all(req.as_bytes()).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut s))
            .await
            .unwrap();
        assert_eq!(next.as_ref().map(|a| a.0), Some(200), "{next:?}");
    }
    // Only the follow-up requests went upstream (one miss, then hits).
    assert_eq!(gw.fake.calls(), 1);
}

fn head_with_length(key: &str, len: usize) -> String {
    head(key, &format!("Content-Length: {len}\r\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_far_over_the_limit_is_not_read() {
    let gw = one_tenant().start().await;
    // 1 GiB announced: the 413 is sent and the connection closed without
    // reading on (beyond what is drained for a client merely over the limit).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(head_with_length(K1, 1 << 30).as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut s))
        .await
        .unwrap();
    assert_dashscope_error(&answer, 413, "BadRequest.TooLarge");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection must be closed, not drained");
    assert!(started.elapsed() < Duration::from_secs(10));
}
