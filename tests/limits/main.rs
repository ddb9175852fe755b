//! Per-tenant rate limits and unit quotas (SPEC §3), across replicas on one
//! Redis, through a Redis outage (SPEC §5), and under hot reload.
//! (`embedgate check-config` is tested in cli.rs.)
//!
//! Rates use `per_second = 0.001` (one token per 1000 s) so admission counts
//! are exact without controlling time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;
use common::*;

use std::sync::Arc;

mod concurrent_misses;
mod quota;
mod quota_faults;
mod quota_hits;
mod quota_release;
mod rate;
mod rate_concurrency;
mod redis_outage;
mod reload;
mod replicas;

// ---------- local helpers ----------

/// A rate (tokens per second) that never refills within a test.
const SLOW: f64 = 0.001;

/// The Redis key holding the tenant's units used today.
fn quota_key(tenant: &str) -> String {
    format!("{{eg:{tenant}}}:quota:{}", today())
}

fn redis_get(redis: &Redis, key: &str) -> Option<i64> {
    redis::cmd("GET").arg(key).query(&mut redis.conn()).unwrap()
}

/// Polls until the Redis key holds `want`.
async fn redis_eventually(redis: &Redis, key: &str, want: i64) {
    let what = format!("redis {key} == {want}");
    eventually(15, &what, async || {
        (redis_get(redis, key) == Some(want)).then_some(())
    })
    .await;
}

/// Polls `/readyz` until it reports Redis as `state` ("up" or "down"); it
/// must answer 200 either way.
async fn wait_redis(gw: &TestGateway, state: &str) {
    let what = format!("/readyz redis == {state}");
    eventually(20, &what, async || {
        let r = gw.get("/readyz", None).await;
        assert_eq!(r.status, 200, "/readyz: {}", r.text);
        (r.json()["redis"] == state).then_some(())
    })
    .await;
}

fn num_header(r: &Reply, name: &str) -> Option<u64> {
    r.header(name).map(|v| {
        v.trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{name}: {v:?} is not an integer: {e}"))
    })
}

/// Asserts a rate-limit refusal: 429 `Throttling.RateQuota`, an integer
/// `Retry-After` of at least 1 s, `x-should-retry: true`.
fn assert_rate_refusal(r: &Reply) {
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.code(), "Throttling.RateQuota", "{}", r.text);
    let ra = num_header(r, "retry-after").expect("Retry-After on a rate refusal");
    assert!(ra >= 1, "Retry-After {ra}");
    assert_eq!(r.header("x-should-retry"), Some("true"));
}

/// Asserts a quota refusal: 429 `Throttling.AllocationQuota`, `x-should-retry: false`.
fn assert_quota_refusal(r: &Reply) {
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.code(), "Throttling.AllocationQuota", "{}", r.text);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    // Refused before any upstream call: neither a hit nor a miss.
    assert_eq!(r.header("x-cache"), None);
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
}

fn count(replies: &[Reply], status: u16) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

/// Sends `n` distinct one-text requests at once, round-robin over `gws`.
async fn concurrent(gws: &[Arc<TestGateway>], key: &str, prefix: &str, n: usize) -> Vec<Reply> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let gw = gws[i % gws.len()].clone();
        let key = key.to_string();
        let b = text_body(&format!("{prefix} {i}"));
        set.spawn(async move { gw.embed(&key, &b).await });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}
