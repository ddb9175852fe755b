//! Answers compressed for clients that accept gzip; identity clients get
//! the same bytes as before, also once an entry is kept compacted.

use std::io::Read;

use super::*;

fn gunzip(b: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(b)
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// A hit asked for with `accept_encoding`: its status, its headers and,
/// when it came as gzip, its request id and the bytes on the wire.
async fn gzip_hit(
    gw: &TestGateway,
    b: &str,
    accept_encoding: &str,
) -> (
    reqwest::StatusCode,
    reqwest::header::HeaderMap,
    Option<(String, bytes::Bytes)>,
) {
    let r = gw
        .client
        .post(gw.url(EMBED_PATH))
        .header("authorization", format!("Bearer {K1}"))
        .header("accept-encoding", accept_encoding)
        .body(b.to_string())
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    assert_eq!(headers["x-cache"], "HIT");
    let gzipped = headers.get("content-encoding").is_some_and(|v| v == "gzip");
    let rid = headers["x-request-id"].to_str().unwrap().to_string();
    let wire = r.bytes().await.unwrap();
    (status, headers, gzipped.then_some((rid, wire)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_hits_decode_to_the_identity_answer_in_fewer_bytes() {
    let gw = one_tenant().start().await;
    gw.fake.set_full_precision(true);
    let b = text_body("compress me");
    let gz = [("accept-encoding", "gzip, deflate")];
    let miss = gw.embed_with(K1, &b, &gz).await;
    assert_eq!(miss.status, 200, "{}", miss.text);
    assert_eq!(miss.cache(), "MISS");

    let plain = gw.embed(K1, &b).await;
    assert_eq!(plain.cache(), "HIT");
    assert_eq!(
        plain.header("content-encoding"),
        None,
        "identity clients get identity"
    );
    let plain_v = assert_success(&plain);

    // The entry's gzip form is made once, off the request path: a gzip hit
    // waits a bounded time for it (answered uncompressed after that, which
    // a slow debug build can reach), so look until one is gzip.
    let (rid, wire) = eventually(20, "a gzip hit", async || {
        let (status, headers, zipped) = gzip_hit(&gw, &b, "gzip, deflate").await;
        assert_eq!(status, 200);
        assert_eq!(headers["vary"], "accept-encoding");
        zipped
    })
    .await;
    let text = gunzip(&wire);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["output"]["embedding"], plain_v["output"]["embedding"]);
    assert_eq!(v["usage"], plain_v["usage"]);
    assert_eq!(v["request_id"], rid.as_str());
    // The same bytes as the identity answer, but for the request id.
    assert_eq!(
        text.replace(&rid, "ID"),
        plain
            .text
            .replace(plain_v["request_id"].as_str().unwrap(), "ID")
    );
    // Full-precision floats are mostly random digits: DEFLATE (filtered,
    // level 7) gets them to about 42%.
    assert!(
        wire.len() * 100 <= text.len() * 45,
        "{} bytes on the wire for {} of JSON",
        wire.len(),
        text.len()
    );
    // `gzip;q=0` is a refusal of gzip.
    let r = gw
        .embed_with(K1, &b, &[("accept-encoding", "gzip;q=0, identity")])
        .await;
    assert_eq!(r.header("content-encoding"), None);
    assert_success(&r);
}

/// The raw text of an answer's `output.embedding`, as sent.
fn raw_vector(answer: &str) -> &str {
    let start = answer.find("\"embedding\":").unwrap() + "\"embedding\":".len();
    let end = start + answer[start..].find(']').unwrap() + 1;
    &answer[start..end]
}

/// An entry compacted after its first hit answers identity clients with
/// upstream's very bytes, inflated on every hit (no hot tier here), and
/// gzip clients with its compact form, which decodes to the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_entries_answer_byte_for_byte() {
    let gw = one_tenant().set("cache", "hot_max_bytes = 0").start().await;
    gw.fake.set_full_precision(true);
    let b = text_body("compact me");
    let gz = [("accept-encoding", "gzip")];
    let miss = gw.embed(K1, &b).await;
    assert_eq!(miss.cache(), "MISS", "{}", miss.text);
    let upstream_vector = raw_vector(&miss.text).to_string();
    assert!(upstream_vector.len() > 25_000, "{}", upstream_vector.len());
    // The first hit: the text as stored; it asks for compaction.
    let first = gw.embed(K1, &b).await;
    assert_eq!(first.cache(), "HIT");
    assert_eq!(raw_vector(&first.text), upstream_vector);
    let first_rid = assert_success(&first)["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    // A gzip hit is built around the compact form, so once one is gzip the
    // entry is compacted (the first gzip hit waits a bounded time for it).
    let zipped = eventually(20, "a gzip hit", async || {
        let (_, _, zipped) = gzip_hit(&gw, &b, "gzip").await;
        zipped.map(|(rid, wire)| (wire, rid))
    })
    .await;
    let (wire, zipped_rid) = zipped;
    let text = gunzip(&wire);
    assert_eq!(
        text.replace(&zipped_rid, "ID"),
        first.text.replace(&first_rid, "ID")
    );
    assert!(
        wire.len() * 100 <= text.len() * 45,
        "{} of {}",
        wire.len(),
        text.len()
    );
    // Identity hits of the compacted entry: byte for byte the first hit's
    // answer (but for the request id), the vector exactly upstream's.
    for _ in 0..3 {
        let r = gw.embed(K1, &b).await;
        assert_eq!(r.cache(), "HIT");
        assert_eq!(r.header("content-encoding"), None);
        let rid = assert_success(&r)["request_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            r.text.replace(&rid, "ID"),
            first.text.replace(&first_rid, "ID")
        );
        assert_eq!(raw_vector(&r.text), upstream_vector);
    }
    // gzip and identity hits alike never called upstream again.
    assert_eq!(gw.fake.calls(), 1);
    let again = gw.embed_with(K1, &b, &gz).await;
    assert_eq!(again.header("content-encoding"), Some("gzip"));
}
