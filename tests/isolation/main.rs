//! One tenant cannot hurt the others: fair share of the in-flight bound,
//! body, head and idle timeouts, the connection cap. Real binary, raw
//! sockets where the point is what a misbehaving client sends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "../common/mod.rs"]
mod common;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KA: &str = "sk-tenant-a";
const KB: &str = "sk-tenant-b";

/// Reads until the server closes (or `secs` pass: then panics); the text.
async fn read_to_close(s: &mut TcpStream, secs: u64) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(secs), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {secs} s"
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1 response (head and a `Content-Length` body), whether
/// or not the server then keeps the connection open (it may drain the
/// rest of an unread request body first).
async fn read_response(s: &mut TcpStream, secs: u64) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(secs), async {
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse::<usize>().ok());
                if len.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no complete response within {secs} s");
    String::from_utf8_lossy(&out).into_owned()
}

/// A POST whose head is complete and whose body stalls after `sent` of
/// `declared` bytes; returns the stream (still open on our side).
async fn stalled_body(addr: SocketAddr, key: &str, declared: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {EMBED_PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b' '; sent]).await.unwrap();
    s
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_stalling_bodies_gets_its_share_and_the_others_are_served() {
    // Global bound 8, so each tenant may hold 4 (the default share, 0.5).
    let gw = TestGateway::builder()
        .tenant("a", KA)
        .tenant("b", KB)
        .set("server", "max_in_flight = 8")
        .set("server", "body_read_timeout = \"3s\"")
        .set("server", "body_min_bytes_per_second = 1000")
        .start()
        .await;
    // Tenant a opens more slow-body requests than the whole global bound.
    let mut stalled = Vec::new();
    for _ in 0..12 {
        let mut s = stalled_body(gw.addr, KA, 1000, 10).await;
        stalled.push(tokio::spawn(async move { read_response(&mut s, 30).await }));
    }
    // Its excess is refused at once: 8 of 12 answered 429 while 4 stall.
    let refused = eventually(10, "a's excess refused", async || {
        let done = stalled.iter().filter(|h| h.is_finished()).count();
        (done >= 8).then_some(done)
    })
    .await;
    assert_eq!(refused, 8, "exactly a's share (4) is admitted");
    // Tenant b is served in full meanwhile.
    for i in 0..10 {
        assert_success(&gw.embed(KB, &text_body(&format!("b {i}"))).await);
    }
    assert!(
        stalled.iter().filter(|h| !h.is_finished()).count() == 4,
        "b was served while a's 4 bodies were still stalled"
    );
    // a's stalled requests end with a clear timeout, nothing reached upstream for them.
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    for h in stalled {
        let resp = h.await.unwrap();
        let status = status_of(&resp);
        *codes.entry(status).or_default() += 1;
        match status {
            429 => assert!(resp.contains("\"code\":\"Throttling\""), "{resp}"),
            408 => assert!(resp.contains("\"code\":\"RequestTimeOut\""), "{resp}"),
            other => panic!("unexpected {other}: {resp}"),
        }
    }
    assert_eq!(codes, [(408, 4), (429, 8)].into_iter().collect());
    assert_eq!(gw.fake.calls(), 10, "only b's requests went upstream");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_requests_total",
            &[
                ("tenant", "a"),
                ("model", "none"),
                ("cache", "none"),
                ("code", "Throttling")
            ]
        ),
        8.0
    );
    eventually(10, "in-flight gauge back to 0", async || {
        (metric(&gw.metrics().await, "embedgate_in_flight_requests", &[]) == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_ends_in_408_within_its_deadline() {
    let gw = TestGateway::builder()
        .tenant("a", KA)
        .set("server", "body_read_timeout = \"1s\"")
        .set("server", "body_min_bytes_per_second = 100")
        .start()
        .await;
    let mut s = stalled_body(gw.addr, KA, 100_000, 0).await;
    // One byte every 100 ms: 10 B/s, far under the minimum rate.
    let trickle = async {
        for _ in 0..200 {
            if s.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    let resp = read_to_close(&mut s, 10).await;
    assert_eq!(status_of(&resp), 408, "{resp}");
    assert!(resp.contains("RequestTimeOut"), "{resp}");
    assert_eq!(gw.fake.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_send_a_byte_are_closed() {
    let gw = TestGateway::builder()
        .tenant("a", KA)
        .set("server", "idle_timeout = \"500ms\"")
        .start()
        .await;
    let mut conns = Vec::new();
    for _ in 0..50 {
        conns.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    for mut c in conns {
        assert_eq!(
            read_to_close(&mut c, 10).await,
            "",
            "closed without an answer"
        );
    }
    // HTTP/2 with prior knowledge: the preface, then silence.
    let mut h2 = TcpStream::connect(gw.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    read_to_close(&mut h2, 10).await;
    // The gateway still serves.
    assert_success(&gw.embed(KA, &text_body("after")).await);
    eventually(10, "no idle connections left open", async || {
        // Our own metrics connection is the one open.
        (metric(&gw.metrics().await, "embedgate_connections_open", &[]) <= 1.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_cut_off() {
    let gw = TestGateway::builder()
        .tenant("a", KA)
        .set("server", "header_read_timeout = \"500ms\"")
        .set("server", "idle_timeout = \"60s\"")
        .start()
        .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(format!("POST {EMBED_PATH} HTTP/1.1\r\nHost: gw\r\n").as_bytes())
        .await
        .unwrap();
    // Bytes keep coming, a header line at a time, but the head never ends.
    let dribble = async {
        for i in 0..100 {
            if s.write_all(format!("X-Filler-{i}: x\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), dribble).await;
    let text = read_to_close(&mut s, 10).await;
    assert!(!text.contains("200 OK"), "{text}");
    assert_eq!(gw.fake.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once() {
    let gw = TestGateway::builder()
        .tenant("a", KA)
        .set("server", "max_connections = 3")
        .set("server", "idle_timeout = \"60s\"")
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let mut over = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(read_to_close(&mut over, 10).await, "", "closed at accept");
    // A slot comes back when a held connection goes.
    drop(held.pop());
    let reply = eventually(10, "a slot is free again", async || {
        let mut s = TcpStream::connect(gw.addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let text = read_to_close(&mut s, 10).await;
        text.starts_with("HTTP/1.1 200").then_some(text)
    })
    .await;
    assert!(
        metric(body_of(&reply), "embedgate_connections_refused_total", &[]) >= 1.0,
        "{reply}"
    );
}

fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_is_served_and_shares_the_same_bounds() {
    let gw = TestGateway::builder()
        .tenant("a", KA)
        .tenant_toml("max_in_flight = 1")
        .start()
        .await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let send = |text: &'static str| {
        h2.post(gw.url(EMBED_PATH))
            .header("authorization", format!("Bearer {KA}"))
            .header("content-type", "application/json")
            .body(text_body(text))
            .send()
    };
    let r = send("over h2").await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "MISS");
    // Streams of one connection are requests like any other: with the
    // upstream slow, a second concurrent stream is over the tenant's bound.
    gw.fake.set_latency_ms(1500);
    let slow = tokio::spawn(send("slow"));
    eventually(10, "the slow stream upstream", async || {
        (gw.fake.calls() == 2).then_some(())
    })
    .await;
    let r = send("second").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("\"code\":\"Throttling\""));
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_request_leaks_no_quota_no_coalescing_slot_and_no_slot() {
    // Debug builds only: a miss whose text is "boom" panics right after its
    // quota is reserved (src/fault.rs).
    let gw = TestGateway::builder()
        .tenant("a", KA)
        .quota(3, Per::Day)
        .tenant_toml("max_in_flight = 1")
        .env("EMBEDGATE_TEST_PANIC_ON_TEXT", "boom")
        .start()
        .await;
    for _ in 0..3 {
        let r = gw.embed(KA, &text_body("boom")).await;
        assert_error(&r, 500, "InternalError");
        assert!(!r.text.contains("injected"), "{}", r.text);
    }
    // Nothing reached upstream, and the gateway is whole: the quota (3 units)
    // was released each time, the tenant's one in-flight slot is free, and
    // the coalescing slot of "boom" did not stay taken (each answered).
    assert_eq!(gw.fake.calls(), 0);
    let remaining = eventually(10, "quota released after the panics", async || {
        let r = gw.embed(KA, &text_body("fine 0")).await;
        (r.status == 200).then(|| r.header("x-quota-remaining").map(str::to_string))
    })
    .await;
    assert_eq!(remaining.as_deref(), Some("2"));
    for i in 1..3 {
        assert_success(&gw.embed(KA, &text_body(&format!("fine {i}"))).await);
    }
    let over = gw.embed(KA, &text_body("fine 3")).await;
    assert_error(&over, 429, "Throttling.AllocationQuota");
    assert_eq!(gw.fake.calls(), 3);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "embedgate_in_flight_requests", &[]), 0.0);
    // Written by the log writer thread, which may lag under load.
    eventually(10, "the abandoned reservation in the log", async || {
        gw.logs()
            .contains("a quota reservation was abandoned")
            .then_some(())
    })
    .await;
}
