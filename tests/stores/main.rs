//! Cache and state in separate Redis servers (`cache.redis_url`,
//! `state.redis_url`): which keys land where, each one failing alone, the
//! `embedgate usage` report, the cache's value formats, and what a cached
//! embedding costs in Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;
use common::*;

use std::path::Path;

use serde_json::Value;

mod formats;
mod sizing;

/// A gateway on a cache Redis and a state Redis; no memory L1, so every
/// hit is read from the cache Redis.
fn split(cache: &Redis, state: &Redis) -> GatewayBuilder {
    TestGateway::builder()
        .redis(cache)
        .state_redis(state)
        .set("cache", "memory_max_bytes = 0")
}

/// Polls `/readyz` until `field` (`redis_cache`, `redis_state`) is `want`.
async fn wait_store(gw: &TestGateway, field: &str, want: &str) -> Value {
    let what = format!("/readyz {field} == {want}");
    eventually(20, &what, async || {
        let r = gw.get("/readyz", None).await;
        assert_eq!(r.status, 200, "/readyz: {}", r.text);
        let v = r.json();
        (v[field] == want).then_some(v)
    })
    .await
}

fn get_int(redis: &Redis, key: &str) -> Option<i64> {
    redis::cmd("GET").arg(key).query(&mut redis.conn()).unwrap()
}

fn quota_key(tenant: &str) -> String {
    format!("{{eg:{tenant}}}:quota:{}", today())
}

fn ledger_key(tenant: &str) -> String {
    format!("{{eg:{tenant}}}:ledger:{}", today())
}

/// `embedgate_redis_up{store}`.
async fn redis_up(gw: &TestGateway, store: &str) -> f64 {
    metric(
        &gw.metrics().await,
        "embedgate_redis_up",
        &[("store", store)],
    )
}

/// Σ units of today's ledger rows of `tenant` with cache status `cache`,
/// through the admin API.
async fn ledger_units(gw: &TestGateway, tenant: &str, cache: &str) -> u64 {
    let day = today();
    let r = gw
        .get(
            &format!("/admin/usage?from={day}&to={day}&tenant={tenant}"),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    units_of(&r.json(), cache)
}

fn units_of(report: &Value, cache: &str) -> u64 {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["cache"] == cache)
        .map(|row| row["units"].as_u64().unwrap())
        .sum()
}

/// `embedgate usage` for today, as JSON.
async fn cli_usage(config: &Path) -> Value {
    let day = today();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_embedgate"))
        .arg("usage")
        .arg("--config")
        .arg(config)
        .args(["--from", &day, "--to", &day])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "embedgate usage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_entries_and_state_keys_land_in_their_own_redis() {
    let cache = Redis::start();
    let state = Redis::start();
    let gw = split(&cache, &state)
        .tenant("t", "kt")
        .rate(1000.0, 1000)
        .quota(1000, Per::Day)
        .start()
        .await;
    // Both connect in the background, each at its own pace.
    wait_store(&gw, "redis_cache", "up").await;
    let ready = wait_store(&gw, "redis_state", "up").await;
    assert_eq!(ready["redis_cache"], "up", "{ready}");
    assert_eq!(ready["redis"], "up", "{ready}");
    assert_eq!(ready["cache"], "redis", "{ready}");

    for i in 0..3 {
        let r = gw.embed("kt", &text_body(&format!("split {i}"))).await;
        assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
        let r = gw.embed("kt", &text_body(&format!("split {i}"))).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    assert_eq!(gw.fake.calls(), 3);
    eventually(
        10,
        "the ledger row and tenant index in the state Redis",
        async || {
            let keys = state.keys();
            (keys.contains(&ledger_key("t")) && keys.iter().any(|k| k == "eg:ledger:tenants"))
                .then_some(())
        },
    )
    .await;

    let cache_keys = cache.keys();
    assert_eq!(cache_keys.len(), 3, "{cache_keys:?}");
    assert!(
        cache_keys.iter().all(|k| k.starts_with("eg:c:")),
        "only cache entries in the cache Redis: {cache_keys:?}"
    );
    let state_keys = state.keys();
    assert!(
        !state_keys.iter().any(|k| k.starts_with("eg:c:")),
        "no cache entry in the state Redis: {state_keys:?}"
    );
    for want in [
        quota_key("t"),
        format!("{{eg:t}}:quota-ops:{}", today()),
        "{eg:t}:rate".to_string(),
        ledger_key("t"),
        "eg:ledger:tenants".to_string(),
    ] {
        assert!(state_keys.contains(&want), "{want} in {state_keys:?}");
    }
    assert_eq!(get_int(&state, &quota_key("t")), Some(3));
    // For the docs' state sizing: what one tenant's day costs.
    for k in &state_keys {
        let bytes: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(k)
            .query(&mut state.conn())
            .unwrap();
        println!("state key {k}: {bytes:?} bytes");
    }

    assert_eq!(redis_up(&gw, "cache").await, 1.0);
    assert_eq!(redis_up(&gw, "state").await, 1.0);
    // The report reads the state Redis, through the gateway and the CLI.
    assert_eq!(ledger_units(&gw, "t", "miss").await, 3);
    assert_eq!(ledger_units(&gw, "t", "hit").await, 3);
    let cli = cli_usage(&gw.config_path).await;
    assert_eq!(
        (units_of(&cli, "miss"), units_of(&cli, "hit")),
        (3, 3),
        "{cli}"
    );
}

/// One Redis for both (no `[state]`): one store, reported under both labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_holds_both_when_state_is_not_set() {
    let mut redis = Redis::start();
    let gw = TestGateway::builder()
        .redis(&redis)
        .tenant("t", "kt")
        .quota(100, Per::Day)
        .start()
        .await;
    wait_store(&gw, "redis_state", "up").await;
    assert_eq!(gw.embed("kt", &text_body("one")).await.status, 200);
    eventually(10, "cache entry and quota in the one Redis", async || {
        let keys = redis.keys();
        (keys.iter().any(|k| k.starts_with("eg:c:")) && keys.contains(&quota_key("t")))
            .then_some(())
    })
    .await;
    assert_eq!(redis_up(&gw, "cache").await, 1.0);
    assert_eq!(redis_up(&gw, "state").await, 1.0);
    redis.kill();
    assert_eq!(gw.embed("kt", &text_body("two")).await.status, 200);
    let v = wait_store(&gw, "redis_cache", "down").await;
    assert_eq!(
        (&v["redis_state"], &v["redis"]),
        (&"down".into(), &"down".into())
    );
    assert_eq!(redis_up(&gw, "cache").await, 0.0);
    assert_eq!(redis_up(&gw, "state").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_cache_redis_quotas_stay_exact_and_the_ledger_flows() {
    let mut cache = Redis::start();
    let state = Redis::start();
    let gw = split(&cache, &state)
        .tenant("q", "kq")
        .quota(10, Per::Day)
        .start()
        .await;
    wait_store(&gw, "redis_cache", "up").await;
    for i in 0..2 {
        let r = gw.embed("kq", &text_body(&format!("before {i}"))).await;
        assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    }
    assert_eq!(cache.keys().len(), 2);

    cache.kill();
    // A cached input is a miss now: upstream answers it, and it is billed.
    let r = gw.embed("kq", &text_body("before 0")).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    let v = wait_store(&gw, "redis_cache", "down").await;
    assert_eq!(v["redis_state"], "up", "{v}");
    assert_eq!(v["redis"], "down", "{v}");
    assert_eq!(redis_up(&gw, "cache").await, 0.0);
    assert_eq!(redis_up(&gw, "state").await, 1.0);

    // Exactly the rest of the quota (10 - 3 units) is admitted.
    let mut admitted = 3;
    for i in 0..10 {
        let r = gw.embed("kq", &text_body(&format!("during {i}"))).await;
        match r.status {
            200 => admitted += 1,
            429 => assert_eq!(r.code(), "Throttling.AllocationQuota", "{}", r.text),
            s => panic!("status {s}: {}", r.text),
        }
    }
    assert_eq!(admitted, 10);
    assert_eq!(gw.fake.calls(), 10);
    assert_eq!(get_int(&state, &quota_key("q")), Some(10));
    // The ledger keeps flowing into the state Redis.
    eventually(10, "10 miss units in the ledger", async || {
        (ledger_units(&gw, "q", "miss").await == 10).then_some(())
    })
    .await;
    assert_eq!(gw.get("/readyz", None).await.json()["ledger_buffered"], 0);
}

/// The state Redis down: quotas follow `quota_on_store_error`, the cache
/// Redis still serves hits, the ledger buffers and ships when it returns.
async fn without_the_state_redis(policy: &str) {
    let cache = Redis::start();
    let mut state = Redis::start();
    let gw = split(&cache, &state)
        .set("limits", format!("quota_on_store_error = \"{policy}\""))
        .tenant("q", "kq")
        .quota(100, Per::Day)
        .tenant("free", "kf")
        .start()
        .await;
    wait_store(&gw, "redis_state", "up").await;
    let r = gw.embed("kq", &text_body("cached")).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    assert_eq!(get_int(&state, &quota_key("q")), Some(1));
    eventually(10, "the first miss in the ledger", async || {
        (ledger_units(&gw, "q", "miss").await == 1).then_some(())
    })
    .await;

    state.kill();
    // Hits come from the cache Redis and need no quota.
    for _ in 0..3 {
        let r = gw.embed("kq", &text_body("cached")).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{policy}: {}", r.text);
    }
    assert_eq!(gw.fake.calls(), 1);
    // A miss that needs quota follows the policy.
    let r = gw.embed("kq", &text_body("new")).await;
    match policy {
        "deny" => assert_error(&r, 503, "ServiceUnavailable"),
        _ => {
            assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
            Value::Null
        }
    };
    // A tenant without a quota is served either way.
    let r = gw.embed("kf", &text_body("free")).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    let v = wait_store(&gw, "redis_state", "down").await;
    assert_eq!(v["redis_cache"], "up", "{v}");
    assert_eq!(redis_up(&gw, "state").await, 0.0);
    assert_eq!(redis_up(&gw, "cache").await, 1.0);
    // Rows wait for the state Redis (the journal's shipper updates the
    // figure on its next round).
    eventually(10, "rows waiting for the state Redis", async || {
        let v = gw.get("/readyz", None).await.json();
        (v["ledger_buffered"].as_i64() > Some(0)).then_some(())
    })
    .await;

    state.restart();
    wait_store(&gw, "redis_state", "up").await;
    let misses = if policy == "deny" { 1 } else { 2 };
    eventually(15, "the buffered rows shipped", async || {
        let (m, h) = (
            ledger_units(&gw, "q", "miss").await,
            ledger_units(&gw, "q", "hit").await,
        );
        (m == misses && h == 3).then_some(())
    })
    .await;
    // With allow, the unit granted during the outage reaches the counter.
    eventually(15, "the quota counter", async || {
        (get_int(&state, &quota_key("q")) == Some(misses as i64)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_state_redis_deny_refuses_quota_misses_and_hits_are_served() {
    without_the_state_redis("deny").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_state_redis_allow_serves_quota_misses_and_hits() {
    without_the_state_redis("allow").await;
}

/// The ledger in Redis names the model in each field; fields written before
/// the ledger had a model are read as ONE-PEACE's and add up with new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_ledger_keeps_the_model_and_reads_fields_from_before_models() {
    let cache = Redis::start();
    let state = Redis::start();
    // A day's hash as the version before models left it.
    redis::cmd("HSET")
        .arg(ledger_key("t"))
        .arg(&[
            "text|miss|units",
            "7",
            "text|miss|items",
            "7",
            "requests|miss",
            "2",
        ])
        .query::<i64>(&mut state.conn())
        .unwrap();
    let gw = split(&cache, &state).tenant("t", "kt").start().await;
    wait_store(&gw, "redis_state", "up").await;
    let r = gw.embed("kt", &text_body("model one")).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    let r = gw.embed("kt", &text_body("model one")).await;
    assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    let new_field = format!("{MODEL}|text|miss|units");
    let fields: std::collections::HashMap<String, i64> =
        eventually(10, "the new row", async || {
            let f: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
                .arg(ledger_key("t"))
                .query(&mut state.conn())
                .unwrap();
            f.contains_key(&format!("{MODEL}|text|hit|units"))
                .then_some(f)
        })
        .await;
    assert_eq!(fields.get(&new_field), Some(&1), "{fields:?}");
    assert_eq!(
        fields.get(&format!("requests|{MODEL}|miss")),
        Some(&1),
        "{fields:?}"
    );
    assert_eq!(
        fields.get("text|miss|units"),
        Some(&7),
        "old fields stay: {fields:?}"
    );

    // One row per (model, modality, cache): old and new fields together.
    let day = today();
    let v = gw
        .get(
            &format!("/admin/usage?from={day}&to={day}&tenant=t&model={MODEL}"),
            Some(ADMIN_TOKEN),
        )
        .await
        .json();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    assert!(rows.iter().all(|r| r["model"] == MODEL), "{v}");
    assert_eq!(units_of(&v, "miss"), 8, "{v}");
    assert_eq!(v["reconciliation"][0]["requests"], 4, "{v}");
    assert_eq!(v["totals"][0]["units"], 9, "{v}");
    assert_eq!(v["totals"][0]["cost"], Value::Null, "no price: {v}");
    // Another model has nothing; the CLI filters and totals the same way.
    let other = gw
        .get(
            &format!("/admin/usage?from={day}&to={day}&model=text-embedding-v4"),
            Some(ADMIN_TOKEN),
        )
        .await
        .json();
    assert_eq!(other["rows"], serde_json::json!([]), "{other}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_embedgate"))
        .arg("usage")
        .arg("--config")
        .arg(&gw.config_path)
        .args(["--from", &day, "--to", &day, "--model", MODEL])
        .args(["--view", "totals", "--format", "csv"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "tenant,model,requests,items,units,hit_units,miss_units,unknown_units,cost,miss_cost\nt,{MODEL},4,9,9,1,8,0,,\n"
        )
    );
}
