//! What one cached embedding costs in the cache Redis, measured: real
//! entries written through the gateway (1536-float answers from the fake),
//! read back with `MEMORY USAGE` and `INFO memory`. The figures go to
//! stdout (`cargo test --test stores sizing -- --nocapture`) and into the
//! sizing section of docs/operating.md.

use super::*;

use std::collections::BTreeSet;
use std::sync::Arc;

/// Entries per measurement: enough that hash-table growth steps are a
/// small part of the average.
const N: usize = 1000;
const GIB: f64 = (1u64 << 30) as f64;

fn used_memory(redis: &Redis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut redis.conn())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Sends `n` distinct one-text misses, 8 at a time; every one must be a 200 MISS.
async fn fill(gw: &Arc<TestGateway>, tag: &str, n: usize) {
    let mut set = tokio::task::JoinSet::new();
    let mut sent = 0;
    while sent < n || !set.is_empty() {
        while sent < n && set.len() < 8 {
            let gw = gw.clone();
            let body = text_body(&format!("{tag} {sent}"));
            set.spawn(async move { gw.embed("kt", &body).await });
            sent += 1;
        }
        let r = set.join_next().await.unwrap().unwrap();
        assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    }
}

/// Hits each of the `n` entries of `fill(tag)` once (which has it
/// compacted), then waits until every value is the compact form (`eg2:`).
async fn hit_all(gw: &Arc<TestGateway>, cache: &Redis, tag: &str, keys: &[String]) {
    let mut set = tokio::task::JoinSet::new();
    let mut sent = 0;
    while sent < keys.len() || !set.is_empty() {
        while sent < keys.len() && set.len() < 8 {
            let gw = gw.clone();
            let body = text_body(&format!("{tag} {sent}"));
            set.spawn(async move { gw.embed("kt", &body).await });
            sent += 1;
        }
        let r = set.join_next().await.unwrap().unwrap();
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    eventually(60, "every value compacted", async || {
        let mut c = cache.conn();
        let mut left = 0;
        for k in keys {
            let head: Vec<u8> = redis::cmd("GETRANGE")
                .arg(k)
                .arg(0)
                .arg(3)
                .query(&mut c)
                .unwrap();
            left += usize::from(!matches!(&head[..], b"eg2:" | b"eg3:" | b"eg4:"));
        }
        (left == 0).then_some(())
    })
    .await;
}

struct Figures {
    /// Mean bytes of the stored value (`eg1:` + the embedding's JSON text,
    /// or `eg2:`/`eg3:`/`eg4:` + its compact form).
    value: f64,
    /// Mean `MEMORY USAGE key SAMPLES 0`: key, value, allocator rounding.
    memory_usage: f64,
    /// Growth of `used_memory` per entry: everything Redis spends.
    used_memory: f64,
}

/// Writes `N` entries through the gateway (and with `compacted` hits each
/// once, so its value becomes the compact form) and measures them.
async fn measure(gw: &Arc<TestGateway>, cache: &Redis, tag: &str, compacted: bool) -> Figures {
    let before_keys: BTreeSet<String> = cache.keys().into_iter().collect();
    let before = used_memory(cache);
    fill(gw, tag, N).await;
    // Without a memory L1, each miss waits for its Redis write.
    let keys: Vec<String> = cache
        .keys()
        .into_iter()
        .filter(|k| !before_keys.contains(k))
        .collect();
    assert_eq!(keys.len(), N);
    if compacted {
        hit_all(gw, cache, tag, &keys).await;
    }
    let after = used_memory(cache);
    let mut c = cache.conn();
    let (mut value, mut usage) = (0u64, 0u64);
    for k in &keys {
        let len: u64 = redis::cmd("STRLEN").arg(k).query(&mut c).unwrap();
        let mem: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(k)
            .arg("SAMPLES")
            .arg(0)
            .query(&mut c)
            .unwrap();
        value += len;
        usage += mem;
    }
    Figures {
        value: value as f64 / N as f64,
        memory_usage: usage as f64 / N as f64,
        used_memory: after.saturating_sub(before) as f64 / N as f64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_embedding_in_redis_measured() {
    let cache = Redis::start();
    // As the shipped cache Redis runs: no persistence.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("no")
        .query(&mut cache.conn())
        .unwrap();
    let state = Redis::start();
    let gw = Arc::new(
        split(&cache, &state)
            .tenant("kt-tenant", "kt")
            .start()
            .await,
    );
    wait_store(&gw, "redis_cache", "up").await;

    gw.fake.set_full_precision(false);
    let short = measure(&gw, &cache, "short", false).await;
    gw.fake.set_full_precision(true);
    let full = measure(&gw, &cache, "full", false).await;
    let compact = measure(&gw, &cache, "compact", true).await;

    for (what, f) in [
        ("fake's short floats", &short),
        ("full-precision floats, like DashScope's", &full),
        ("full-precision floats, compacted (hit once)", &compact),
    ] {
        println!(
            "cache sizing, {N} entries of 1536 {what}: value {:.0} B, MEMORY USAGE {:.0} B/entry, \
             used_memory +{:.0} B/entry, {:.0} entries per GiB of used_memory",
            f.value,
            f.memory_usage,
            f.used_memory,
            GIB / f.used_memory
        );
        // What the docs' sizing rule assumes: an entry costs its value
        // plus at most a quarter for key, headers and allocator rounding.
        assert!(f.memory_usage >= f.value, "{what}");
        assert!(f.used_memory >= f.value, "{what}");
        assert!(f.used_memory <= f.value * 1.25 + 512.0, "{what}");
    }
    // The two widths the docs name: about 16 KB and about 30 KB of JSON.
    assert!(
        (14_000.0..18_000.0).contains(&short.value),
        "{}",
        short.value
    );
    assert!((27_000.0..33_000.0).contains(&full.value), "{}", full.value);
    // Compacted: the goal is at most 14 KB of value per DashScope answer.
    assert!(compact.value <= 14_000.0, "{}", compact.value);
}
