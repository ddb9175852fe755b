//! The cache's values in Redis: `eg1:` (an entry's text, as a miss stores
//! it) and `eg2:` (its compact form, which replaces the text once the entry
//! is hit). Every replica reads both; a value that does not check out is a
//! miss.

use super::*;

use std::io::Read;

fn gunzip(b: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(b)
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// The raw text of an answer's `output.embedding`, as sent.
fn raw_vector(answer: &str) -> &str {
    let start = answer.find("\"embedding\":").unwrap() + "\"embedding\":".len();
    let end = start + answer[start..].find(']').unwrap() + 1;
    &answer[start..end]
}

fn get_raw(redis: &Redis, key: &str) -> Vec<u8> {
    redis::cmd("GET")
        .arg(key)
        .query::<Option<Vec<u8>>>(&mut redis.conn())
        .unwrap()
        .unwrap_or_default()
}

fn set_raw(redis: &Redis, key: &str, value: &[u8]) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("KEEPTTL")
        .query(&mut redis.conn())
        .unwrap();
}

fn memory_usage(redis: &Redis, key: &str) -> u64 {
    redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query(&mut redis.conn())
        .unwrap()
}

/// Polls until `key`'s value starts with `prefix`; returns the value.
async fn value_with(redis: &Redis, key: &str, prefix: &[u8]) -> Vec<u8> {
    let what = format!("{key} starting with {}", String::from_utf8_lossy(prefix));
    eventually(20, &what, async || {
        let v = get_raw(redis, key);
        v.starts_with(prefix).then_some(v)
    })
    .await
}

/// An identity hit whose vector is exactly `want`.
async fn identity_hit(gw: &TestGateway, body: &str, want: &str) {
    let r = gw.embed("kt", body).await;
    assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(raw_vector(&r.text), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_then_compact_values_and_old_ones_still_read() {
    let cache = Redis::start();
    let state = Redis::start();
    // No memory L1: every hit reads Redis.
    let gw = split(&cache, &state)
        .tenant("kt-tenant", "kt")
        .start()
        .await;
    wait_store(&gw, "redis_cache", "up").await;
    gw.fake.set_full_precision(true);
    let body = text_body("formats");

    // A miss stores the text.
    let miss = gw.embed("kt", &body).await;
    assert_eq!((miss.status, miss.cache()), (200, "MISS"), "{}", miss.text);
    let vector = raw_vector(&miss.text).to_string();
    let keys = cache.keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = keys[0].clone();
    let text_value = get_raw(&cache, &key);
    assert_eq!(text_value, [b"eg1:", vector.as_bytes()].concat());
    let text_bytes = memory_usage(&cache, &key);

    // Its first hit (an identity client's) is served the text and has it
    // compacted: the value becomes the digits form with float32 words (a
    // DashScope answer's numbers are float32 values), keeping its TTL.
    identity_hit(&gw, &body, &vector).await;
    let compact = value_with(&cache, &key, b"eg4:").await;
    let compact_bytes = memory_usage(&cache, &key);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query(&mut cache.conn())
        .unwrap();
    assert!(ttl > 29 * 24 * 3600 * 1000, "{ttl}");
    println!(
        "redis value of a {}-byte vector: eg1 {} B (MEMORY USAGE {text_bytes}), eg4 {} B (MEMORY USAGE {compact_bytes})",
        vector.len(),
        text_value.len(),
        compact.len()
    );
    // 4 bytes a float and a few more.
    assert!(compact.len() <= 4 + 1536 * 4 + 64, "{}", compact.len());
    assert!(compact.len() * 100 <= text_value.len() * 25);
    assert!(
        compact_bytes < text_bytes / 4 + 1024,
        "{compact_bytes} of {text_bytes}"
    );

    // Read back: identity clients get upstream's bytes. A gzip client's
    // hit has the value made the DEFLATE form (waiting a bounded time for
    // it: on a slow machine the first answers may be uncompressed), which
    // gzip answers are built around.
    identity_hit(&gw, &body, &vector).await;
    let (wire, text) = eventually(20, "a gzip answer", async || {
        let r = gw
            .client
            .post(gw.url(EMBED_PATH))
            .header("authorization", "Bearer kt")
            .header("accept-encoding", "gzip")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-cache"], "HIT");
        let gzip = r
            .headers()
            .get("content-encoding")
            .is_some_and(|v| v == "gzip");
        let wire = r.bytes().await.unwrap();
        let text = if gzip {
            gunzip(&wire)
        } else {
            String::from_utf8(wire.to_vec()).unwrap()
        };
        assert_eq!(raw_vector(&text), vector);
        gzip.then_some((wire, text))
    })
    .await;
    assert!(
        wire.len() * 100 <= text.len() * 45,
        "{} of {}",
        wire.len(),
        text.len()
    );
    let deflate = value_with(&cache, &key, b"eg2:").await;
    assert!(deflate.len() * 100 <= text_value.len() * 45);
    identity_hit(&gw, &body, &vector).await;

    // A value an older gateway wrote (text) still reads, and is compacted.
    set_raw(&cache, &key, &text_value);
    identity_hit(&gw, &body, &vector).await;
    let again = value_with(&cache, &key, b"eg4:").await;
    assert_eq!(again, compact);
    assert_eq!(gw.fake.calls(), 1);

    // A damaged compact value is a miss, and the miss stores the text anew.
    let mut damaged = compact.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x10;
    set_raw(&cache, &key, &damaged);
    let r = gw.embed("kt", &body).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    assert_eq!(raw_vector(&r.text), vector);
    assert_eq!(gw.fake.calls(), 2);
    assert_eq!(get_raw(&cache, &key), text_value);
    // So is one in an unknown format.
    set_raw(&cache, &key, b"eg9:[1,2,3]");
    let r = gw.embed("kt", &body).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    assert_eq!(gw.fake.calls(), 3);
}

/// With a memory L1, the L1's compaction rewrites Redis too, and another
/// replica (a new process on the same Redis) reads the compact value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reads_the_compact_value_another_wrote() {
    let cache = Redis::start();
    let state = Redis::start();
    let replica = || {
        TestGateway::builder()
            .redis(&cache)
            .state_redis(&state)
            .tenant("kt-tenant", "kt")
    };
    let a = replica().start().await;
    wait_store(&a, "redis_cache", "up").await;
    a.fake.set_full_precision(true);
    let body = text_body("replicas");
    let miss = a.embed("kt", &body).await;
    assert_eq!((miss.status, miss.cache()), (200, "MISS"), "{}", miss.text);
    let vector = raw_vector(&miss.text).to_string();
    // The Redis write of a miss is in the background with an L1.
    let key = eventually(20, "the entry in Redis", async || {
        cache.keys().into_iter().find(|k| k.starts_with("eg:c:"))
    })
    .await;
    value_with(&cache, &key, b"eg1:").await;
    identity_hit(&a, &body, &vector).await;
    value_with(&cache, &key, b"eg4:").await;

    let b = replica().start().await;
    wait_store(&b, "redis_cache", "up").await;
    identity_hit(&b, &body, &vector).await;
    // From b's L1 now (compact), through its hot tier.
    identity_hit(&b, &body, &vector).await;
    assert_eq!(a.fake.calls(), 1);
    assert_eq!(b.fake.calls(), 0);
}

/// `cache.compact_form = "digits"` keeps 8 bytes a float (`eg3:`), and a
/// replica of either setting reads the other's values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_digits_form_is_chosen_by_config_and_both_forms_read_everywhere() {
    let cache = Redis::start();
    let state = Redis::start();
    let replica = |form: &str| {
        split(&cache, &state)
            .tenant("kt-tenant", "kt")
            .set("cache", format!("compact_form = \"{form}\""))
    };
    let digits = replica("digits").start().await;
    let float32 = replica("float32").start().await;
    wait_store(&digits, "redis_cache", "up").await;
    wait_store(&float32, "redis_cache", "up").await;
    for gw in [&digits, &float32] {
        gw.fake.set_full_precision(true);
    }
    let (one, two) = (text_body("digits one"), text_body("digits two"));
    let miss = digits.embed("kt", &one).await;
    assert_eq!((miss.status, miss.cache()), (200, "MISS"), "{}", miss.text);
    let v1 = raw_vector(&miss.text).to_string();
    let miss = float32.embed("kt", &two).await;
    assert_eq!((miss.status, miss.cache()), (200, "MISS"), "{}", miss.text);
    let v2 = raw_vector(&miss.text).to_string();
    let key_of = |vector_text: &str| {
        cache
            .keys()
            .into_iter()
            .find(|k| get_raw(&cache, k).ends_with(vector_text.as_bytes()))
            .expect("the entry in Redis")
    };
    let (k1, k2) = (key_of(&v1), key_of(&v2));
    // Each compacts what it hits in its own form: 8 and 4 bytes a float.
    identity_hit(&digits, &one, &v1).await;
    let d = value_with(&cache, &k1, b"eg3:").await;
    assert!((1536 * 8..1536 * 8 + 128).contains(&d.len()), "{}", d.len());
    identity_hit(&float32, &two, &v2).await;
    let f = value_with(&cache, &k2, b"eg4:").await;
    assert!((1536 * 4..1536 * 4 + 128).contains(&f.len()), "{}", f.len());
    // And reads the other's exactly.
    identity_hit(&float32, &one, &v1).await;
    identity_hit(&digits, &two, &v2).await;
    assert_eq!(get_raw(&cache, &k1)[..4], *b"eg3:");
    assert_eq!(get_raw(&cache, &k2)[..4], *b"eg4:");
    assert_eq!(digits.fake.calls() + float32.fake.calls(), 2);
}
