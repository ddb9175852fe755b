//! Metering and billing: the Prometheus contract (SPEC §4), exact figures
//! under concurrent mixed traffic, the durable ledger (admin API and CLI)
//! across restarts and Redis outages (SPEC §5), and the deploy files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

const ALPHA_KEY: &str = "sk-tenant-alpha-SECRET-0001";
const BETA_KEY: &str = "sk-tenant-beta-SECRET-0002";
const UNKNOWN_KEY: &str = "sk-unknown-\"evil-key-0003";
const MODALITIES: [&str; 3] = ["text", "image", "audio"];
const CSV_HEADER: &str = "tenant,day,modality,cache,items,units";

/// Tenant `alpha` (key `ALPHA_KEY`).
fn alpha() -> GatewayBuilder {
    TestGateway::builder().tenant("alpha", ALPHA_KEY)
}

/// Tenants `alpha` and `beta` (keys `ALPHA_KEY`, `BETA_KEY`).
fn alpha_beta() -> GatewayBuilder {
    alpha().tenant("beta", BETA_KEY)
}

// ---------- request bodies ----------

/// A body from (modality, content, factor) triples.
fn items_body(items: &[(&str, String, Option<Value>)]) -> String {
    let contents: Vec<Value> = items
        .iter()
        .map(|(m, c, f)| {
            let mut o = serde_json::Map::new();
            o.insert((*m).to_string(), json!(c));
            if let Some(f) = f {
                o.insert("factor".into(), f.clone());
            }
            Value::Object(o)
        })
        .collect();
    json!({"model": MODEL, "input": {"contents": contents}, "parameters": {"auto_truncation": true}})
        .to_string()
}

/// The i-th of a family of distinct bodies mixing modalities and factors.
fn mixed_body(tag: &str, i: usize) -> String {
    let t = |n: usize| ("text", format!("{tag} text {i}.{n}"), None);
    let img = |f: Option<Value>| ("image", format!("https://img.example/{tag}/{i}.png"), f);
    let aud = |n: usize, f: Option<Value>| {
        (
            "audio",
            format!("https://snd.example/{tag}/{i}-{n}.flac"),
            f,
        )
    };
    let items = match i % 7 {
        0 => vec![t(0)],
        1 => vec![img(Some(json!(2)))],
        2 => vec![aud(0, Some(json!("3")))],
        3 => vec![t(0), img(None)],
        4 => vec![t(0), aud(0, Some(json!(0.5))), img(Some(json!("2")))],
        5 => vec![t(0), t(1), aud(0, None)],
        _ => vec![
            img(Some(json!(1.0))),
            aud(0, None),
            aud(1, Some(json!("1.5"))),
        ],
    };
    items_body(&items)
}

/// A body that the fake refuses with 400 InvalidURL.
fn unreachable_body(tag: &str, i: usize) -> String {
    items_body(&[
        ("text", format!("{tag} u {i}"), None),
        (
            "image",
            format!("https://unreachable.example/{tag}/{i}.png"),
            None,
        ),
    ])
}

/// Bodies the gateway must refuse with 400 before anything goes upstream.
fn bad_bodies(tag: &str) -> Vec<String> {
    vec![
        items_body(&[("text", format!("{tag} b0"), Some(json!(0)))]),
        items_body(&[("image", format!("{tag} b1"), Some(json!("abc")))]),
        items_body(&[("audio", format!("{tag} b2"), Some(json!(-1)))]),
        json!({"model": MODEL, "input": {}}).to_string(),
        json!({"model": MODEL, "input": {"contents": [{"text": "a", "image": "b"}]}}).to_string(),
        json!({"model": "text-embedding-v1", "input": {"contents": [{"text": tag}]}}).to_string(),
        "{not json".to_string(),
        json!({"model": MODEL, "input": {"contents": [{"text": "x".repeat(500)}]}}).to_string(),
    ]
}

// ---------- what the clients saw ----------

/// (tenant, modality, cache)
type Cell = (String, String, String);
/// (items, units) per cell.
type Cells = BTreeMap<Cell, (u64, u64)>;

fn cache_label(r: &Reply) -> &'static str {
    match r.header("x-cache") {
        Some("HIT") => "hit",
        Some("MISS") => "miss",
        None => "none",
        Some(other) => panic!("unexpected X-Cache {other:?}"),
    }
}

fn code_label(r: &Reply) -> String {
    if r.status == 200 {
        "ok".into()
    } else {
        let code = r.code();
        assert!(
            !code.is_empty(),
            "error without a code: {} {}",
            r.status,
            r.text
        );
        code
    }
}

/// Sums of the `usage` blocks of 200 answers, by tenant, modality, X-Cache.
#[derive(Default, Debug, Clone, PartialEq)]
struct Tally {
    cells: Cells,
    /// (tenant, cache, code) → requests.
    requests: BTreeMap<(String, String, String), u64>,
}

impl Tally {
    fn add(&mut self, tenant: &str, r: &Reply) {
        *self
            .requests
            .entry((tenant.into(), cache_label(r).into(), code_label(r)))
            .or_default() += 1;
        if r.status != 200 {
            return;
        }
        let cache = cache_label(r);
        assert!(
            cache == "hit" || cache == "miss",
            "200 without X-Cache: {:?}",
            r.headers
        );
        let v = r.json();
        assert!(v.get("code").is_none(), "a 200 with a code: {}", r.text);
        let usage = v["usage"]
            .as_object()
            .unwrap_or_else(|| panic!("no usage: {}", r.text));
        let mut total = 0;
        for m in MODALITIES {
            if let Some(u) = usage.get(m) {
                let measure = u["measure"].as_u64().unwrap();
                let weight = u["weight"].as_u64().unwrap();
                let e = self
                    .cells
                    .entry((tenant.into(), m.into(), cache.into()))
                    .or_default();
                e.0 += measure;
                e.1 += measure * weight;
                total += measure * weight;
            }
        }
        assert_eq!(usage["total_usage"].as_u64(), Some(total), "{}", r.text);
    }

    fn units(&self, cache: &str) -> u64 {
        self.cells
            .iter()
            .filter(|((_, _, c), _)| c == cache)
            .map(|(_, (_, u))| u)
            .sum()
    }

    fn only(&self, tenant: &str) -> Cells {
        self.cells
            .iter()
            .filter(|((t, _, _), _)| t == tenant)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    fn by_cache(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for ((_, c, _), n) in &self.requests {
            *m.entry(c.clone()).or_default() += n;
        }
        m
    }
}

// ---------- Prometheus text ----------

/// usage_units_total and items_total as cells (zero series dropped).
fn metric_cells(text: &str) -> Cells {
    let keys = ["tenant", "modality", "cache"];
    let mut cells = Cells::new();
    for (name, units) in [
        ("embedgate_items_total", false),
        ("embedgate_usage_units_total", true),
    ] {
        for (k, v) in series(text, name, &keys) {
            if v == 0.0 {
                continue;
            }
            let e = cells
                .entry((k[0].clone(), k[1].clone(), k[2].clone()))
                .or_default();
            if units {
                e.1 = v as u64;
            } else {
                e.0 = v as u64;
            }
        }
    }
    cells
}

fn metric_requests(text: &str) -> BTreeMap<(String, String, String), u64> {
    series(
        text,
        "embedgate_requests_total",
        &["tenant", "cache", "code"],
    )
    .into_iter()
    .filter(|(_, v)| *v > 0.0)
    .map(|(k, v)| ((k[0].clone(), k[1].clone(), k[2].clone()), v as u64))
    .collect()
}

fn gauge(text: &str, name: &str) -> f64 {
    metric(text, name, &[])
}

// ---------- ledger ----------

fn usage_path(tenant: Option<&str>, csv: bool) -> String {
    let d = today();
    let mut p = format!("/admin/usage?from={d}&to={d}");
    if let Some(t) = tenant {
        p.push_str(&format!("&tenant={t}"));
    }
    if csv {
        p.push_str("&format=csv");
    }
    p
}

fn rows_cells(v: &Value) -> Cells {
    let d = today();
    assert_eq!(v["from"], json!(d), "{v}");
    assert_eq!(v["to"], json!(d), "{v}");
    let want_keys: BTreeSet<&str> = CSV_HEADER.split(',').collect();
    let mut cells = Cells::new();
    for row in v["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows: {v}"))
    {
        let o = row.as_object().unwrap();
        let keys: BTreeSet<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(keys, want_keys, "row {row}");
        assert_eq!(row["day"], json!(d));
        let cell = (
            row["tenant"].as_str().unwrap().to_string(),
            row["modality"].as_str().unwrap().to_string(),
            row["cache"].as_str().unwrap().to_string(),
        );
        let val = (
            row["items"].as_u64().unwrap(),
            row["units"].as_u64().unwrap(),
        );
        assert!(cells.insert(cell, val).is_none(), "duplicate row {row}");
    }
    cells
}

fn csv_cells(text: &str) -> Cells {
    let d = today();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(CSV_HEADER), "{text}");
    let mut cells = Cells::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 6, "{line}");
        assert_eq!(f[1], d);
        let cell = (f[0].to_string(), f[2].to_string(), f[3].to_string());
        let val = (f[4].parse().unwrap(), f[5].parse().unwrap());
        assert!(cells.insert(cell, val).is_none(), "duplicate row {line}");
    }
    cells
}

async fn ledger(gw: &TestGateway, tenant: Option<&str>) -> Cells {
    let r = gw.get(&usage_path(tenant, false), Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "{:?}",
        r.headers
    );
    rows_cells(&r.json())
}

async fn ledger_csv(gw: &TestGateway, tenant: Option<&str>) -> String {
    let r = gw.get(&usage_path(tenant, true), Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.text
}

/// Polls `f` until it returns `want`; on timeout, fails showing the last value.
async fn settle<T: PartialEq + std::fmt::Debug>(
    secs: u64,
    what: &str,
    want: &T,
    mut f: impl AsyncFnMut() -> T,
) {
    let mut last: Option<T> = None;
    let done = tokio::time::timeout(
        Duration::from_secs(secs),
        eventually(secs + 60, what, async || {
            let v = f().await;
            let ok = v == *want;
            last = Some(v);
            ok.then_some(())
        }),
    )
    .await;
    if done.is_err() {
        assert_eq!(last.as_ref(), Some(want), "timed out waiting for {what}");
    }
}

async fn ledger_settles(gw: &TestGateway, want: &Cells, what: &str) {
    settle(20, what, want, async || ledger(gw, None).await).await;
}

/// Runs `embedgate usage --config PATH --from D --to D ARGS…`; its stdout.
async fn cli_usage(config: &Path, args: &[&str]) -> String {
    let d = today();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_embedgate"))
        .arg("usage")
        .arg("--config")
        .arg(config)
        .args(["--from", &d, "--to", &d])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "embedgate usage {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// ---------- traffic ----------

/// The JSON answer inside a DashScope SSE reply, as a plain reply.
fn sse_data(r: &Reply) -> Reply {
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/event-stream"),
        "{:?}",
        r.headers
    );
    let data = r
        .text
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .unwrap_or_else(|| panic!("no data line: {}", r.text));
    Reply {
        status: r.status,
        headers: r.headers.clone(),
        text: data.to_string(),
    }
}

/// Sends `body` as `tenant` (a configured name, or `(none)` for bad keys).
async fn send(gw: &TestGateway, tally: &mut Tally, tenant: &str, key: &str, body: &str) -> Reply {
    let r = gw.embed(key, body).await;
    tally.add(tenant, &r);
    r
}

fn key_of(tenant: &str) -> &'static str {
    match tenant {
        "alpha" => ALPHA_KEY,
        "beta" => BETA_KEY,
        _ => UNKNOWN_KEY,
    }
}

/// A miss, then its hit, for each of `n` mixed bodies of both tenants.
async fn misses_and_hits(gw: &TestGateway, tally: &mut Tally, tag: &str, n: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    for i in 0..n {
        for tenant in ["alpha", "beta"] {
            let b = mixed_body(&format!("{tag}-{tenant}"), i);
            let r = send(gw, tally, tenant, key_of(tenant), &b).await;
            assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
            let r = send(gw, tally, tenant, key_of(tenant), &b).await;
            assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
            bodies.push(b);
        }
    }
    bodies
}

// =====================================================================
// 1. The metrics contract
// =====================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_contract_names_labels_and_hygiene() {
    let gw = alpha()
        .quota(100_000, Per::Day)
        .tenant("beta", BETA_KEY)
        .start()
        .await;
    let mut tally = Tally::default();
    let mut x_cache: BTreeMap<String, u64> = BTreeMap::new();
    let mut sent = 0usize;
    let mut note = |r: &Reply| {
        *x_cache.entry(cache_label(r).into()).or_default() += 1;
    };

    // Misses and hits for both tenants.
    for (tenant, i) in [("alpha", 0), ("alpha", 4), ("beta", 6), ("beta", 2)] {
        let b = mixed_body(tenant, i);
        for want in ["MISS", "HIT"] {
            let r = send(&gw, &mut tally, tenant, key_of(tenant), &b).await;
            assert_eq!((r.status, r.cache()), (200, want), "{}", r.text);
            note(&r);
            sent += 1;
        }
    }
    // A hit over SSE carries X-Cache too.
    let r = gw
        .embed_with(
            ALPHA_KEY,
            &mixed_body("alpha", 0),
            &[("X-DashScope-SSE", "enable")],
        )
        .await;
    assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    note(&r);
    tally.add("alpha", &sse_data(&r));
    sent += 1;
    // Request data that must never become a label value.
    let evil = "evil\"label\\{x=\"1\"} 9";
    for (tenant, body, status) in [
        ("(none)", text_body(evil), 401),
        (
            "alpha",
            json!({"model": MODEL, "input": {"contents": [{"text": "a", "evil\"field": 1}]}})
                .to_string(),
            400,
        ),
        (
            "alpha",
            json!({"model": "evil\"model", "input": {"contents": [{"text": "a"}]}}).to_string(),
            400,
        ),
        ("alpha", text_body("evil\"label one"), 200),
        (
            "beta",
            items_body(&[("image", "https://evil\"label/x.png".into(), None)]),
            200,
        ),
        ("alpha", unreachable_body("evil\"label", 0), 400),
    ] {
        let r = send(&gw, &mut tally, tenant, key_of(tenant), &body).await;
        assert_eq!(r.status, status, "{}", r.text);
        note(&r);
        sent += 1;
    }
    // A miss whose upstream usage disagrees (creates the mismatch series).
    gw.fake.push_faults([Fault::WrongUsage]);
    let r = send(&gw, &mut tally, "beta", BETA_KEY, &text_body("mismatch")).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    note(&r);
    sent += 1;
    let tally = tally;

    let m = gw.metrics().await;

    // Exactly these label sets (and each contract series is present).
    let contract: &[(&str, &[&str])] = &[
        ("embedgate_requests_total", &["tenant", "cache", "code"]),
        (
            "embedgate_usage_units_total",
            &["tenant", "modality", "cache"],
        ),
        ("embedgate_items_total", &["tenant", "modality", "cache"]),
        (
            "embedgate_request_duration_seconds_bucket",
            &["cache", "le"],
        ),
        ("embedgate_request_duration_seconds_sum", &["cache"]),
        ("embedgate_request_duration_seconds_count", &["cache"]),
        ("embedgate_upstream_duration_seconds_bucket", &["le"]),
        ("embedgate_upstream_duration_seconds_sum", &[]),
        ("embedgate_upstream_duration_seconds_count", &[]),
        ("embedgate_upstream_responses_total", &["status"]),
        ("embedgate_coalesced_requests_total", &[]),
        ("embedgate_quota_remaining", &["tenant"]),
        ("embedgate_usage_mismatch_total", &["tenant"]),
        ("embedgate_ledger_buffered_entries", &[]),
        ("embedgate_build_info", &["version"]),
    ];
    for (name, keys) in contract {
        let s = series(&m, name, keys);
        assert!(!s.is_empty(), "{name} missing from /metrics:\n{m}");
    }
    for (name, kind) in [
        ("embedgate_requests_total", "counter"),
        ("embedgate_usage_units_total", "counter"),
        ("embedgate_items_total", "counter"),
        ("embedgate_request_duration_seconds", "histogram"),
        ("embedgate_upstream_duration_seconds", "histogram"),
        ("embedgate_upstream_responses_total", "counter"),
        ("embedgate_coalesced_requests_total", "counter"),
        ("embedgate_quota_remaining", "gauge"),
        ("embedgate_usage_mismatch_total", "counter"),
        ("embedgate_ledger_buffered_entries", "gauge"),
        ("embedgate_build_info", "gauge"),
    ] {
        assert!(
            m.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "{name} is not a {kind}"
        );
    }

    // Closed label value sets.
    let tenants = ["alpha", "beta"];
    let code_re = |c: &str| {
        c == "ok"
            || (c.chars().next().is_some_and(|f| f.is_ascii_uppercase())
                && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '.'))
    };
    for k in series(&m, "embedgate_requests_total", &["tenant", "cache", "code"]).keys() {
        assert!(
            tenants.contains(&k[0].as_str()) || k[0] == "(none)",
            "{k:?}"
        );
        assert!(["hit", "miss", "none"].contains(&k[1].as_str()), "{k:?}");
        assert!(code_re(&k[2]), "{k:?}");
    }
    for name in ["embedgate_usage_units_total", "embedgate_items_total"] {
        for k in series(&m, name, &["tenant", "modality", "cache"]).keys() {
            assert!(tenants.contains(&k[0].as_str()), "{name} {k:?}");
            assert!(MODALITIES.contains(&k[1].as_str()), "{name} {k:?}");
            assert!(["hit", "miss"].contains(&k[2].as_str()), "{name} {k:?}");
        }
    }
    for k in series(&m, "embedgate_request_duration_seconds_count", &["cache"]).keys() {
        assert!(["hit", "miss", "none"].contains(&k[0].as_str()), "{k:?}");
    }
    for name in [
        "embedgate_quota_remaining",
        "embedgate_usage_mismatch_total",
    ] {
        for k in series(&m, name, &["tenant"]).keys() {
            assert!(tenants.contains(&k[0].as_str()), "{name} {k:?}");
        }
    }
    assert!(metric(&m, "embedgate_quota_remaining", &[("tenant", "alpha")]) > 0.0);
    for k in series(&m, "embedgate_upstream_responses_total", &["status"]).keys() {
        assert!(
            k[0].parse::<u16>().is_ok() || k[0] == "connect_error" || k[0] == "timeout",
            "{k:?}"
        );
    }
    assert_eq!(
        series(&m, "embedgate_build_info", &["version"]),
        BTreeMap::from([(vec![env!("CARGO_PKG_VERSION").to_string()], 1.0)])
    );

    // X-Cache agrees with the cache label, per request and per duration.
    let total: u64 = x_cache.values().sum();
    assert_eq!(total as usize, sent);
    let mut by_cache_metric: BTreeMap<String, u64> = BTreeMap::new();
    for ((_, c, _), n) in metric_requests(&m) {
        *by_cache_metric.entry(c).or_default() += n;
    }
    assert_eq!(
        by_cache_metric, x_cache,
        "requests_total by cache vs X-Cache"
    );
    let durations: BTreeMap<String, u64> =
        series(&m, "embedgate_request_duration_seconds_count", &["cache"])
            .into_iter()
            .map(|(k, v)| (k[0].clone(), v as u64))
            .collect();
    assert_eq!(
        durations, x_cache,
        "request_duration_seconds_count vs X-Cache"
    );
    assert_eq!(metric_requests(&m), tally.requests);
    assert_eq!(metric_cells(&m), tally.cells);

    // No request data, tenant key or upstream key in the metrics.
    for line in m.lines() {
        for bad in [
            "evil",
            ALPHA_KEY,
            BETA_KEY,
            UNKNOWN_KEY,
            "SECRET",
            UPSTREAM_KEY,
        ] {
            assert!(!line.contains(bad), "{bad:?} leaked into /metrics: {line}");
        }
    }
    // Nor a key in the logs (once the access lines for all requests are out).
    let logs = eventually(10, "access log lines", async || {
        let l = gw.logs();
        (l.lines()
            .filter(|l| l.contains("embedgate::access"))
            .count()
            >= sent)
            .then_some(l)
    })
    .await;
    for bad in [ALPHA_KEY, BETA_KEY, UNKNOWN_KEY, "SECRET", UPSTREAM_KEY] {
        assert!(!logs.contains(bad), "{bad:?} leaked into the gateway log");
    }
}

// =====================================================================
// 2. Exact figures under concurrent mixed traffic
// =====================================================================

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Good,
    Unreachable,
    Bad,
    BadKey,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_traffic_is_metered_exactly() {
    let redis = Redis::start();
    let gw = alpha_beta()
        .redis(&redis)
        .set("upstream", "max_retries = 0")
        .start()
        .await;
    let gw = Arc::new(gw);

    let mut jobs: Vec<(&'static str, Kind, String)> = Vec::new();
    for tenant in ["alpha", "beta"] {
        for i in 0..25 {
            jobs.push((tenant, Kind::Good, mixed_body(tenant, i)));
        }
        for i in 0..15 {
            for _ in 0..2 {
                jobs.push((tenant, Kind::Good, mixed_body(tenant, i)));
            }
        }
        for i in 0..8 {
            jobs.push((tenant, Kind::Unreachable, unreachable_body(tenant, i)));
        }
        for b in bad_bodies(tenant) {
            jobs.push((tenant, Kind::Bad, b));
        }
    }
    for i in 0..4 {
        jobs.push(("(none)", Kind::BadKey, mixed_body("alpha", i)));
    }
    // Deterministic shuffle so hits, misses and errors interleave.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..jobs.len()).rev() {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        jobs.swap(i, (seed >> 33) as usize % (i + 1));
    }
    assert!(jobs.len() >= 140, "{}", jobs.len());

    // The first five upstream calls fail with 500 (no retries).
    gw.fake
        .push_faults((0..5).map(|_| Fault::Status(500, "InternalError")));

    let mut set = tokio::task::JoinSet::new();
    for (tenant, kind, body) in jobs {
        let gw = gw.clone();
        set.spawn(async move {
            let r = gw.embed(key_of(tenant), &body).await;
            (tenant, kind, r)
        });
    }
    let mut tally = Tally::default();
    let mut server_errors = 0;
    while let Some(res) = set.join_next().await {
        let (tenant, kind, r) = res.unwrap();
        tally.add(tenant, &r);
        if r.status >= 500 {
            server_errors += 1;
            assert_eq!(r.code(), "InternalError", "{}", r.text);
            assert_eq!(r.cache(), "MISS", "{:?}", r.headers);
        }
        match kind {
            Kind::Good => assert!(
                r.status == 200 || r.status >= 500,
                "{} {}",
                r.status,
                r.text
            ),
            Kind::Unreachable => {
                assert!(r.status != 200, "{}", r.text);
                if r.status == 400 {
                    assert_eq!(r.code(), "InvalidURL", "{}", r.text);
                    assert_eq!(r.cache(), "MISS");
                }
            }
            Kind::Bad => {
                assert_eq!(r.status, 400, "{}", r.text);
                assert_eq!(cache_label(&r), "none");
            }
            Kind::BadKey => {
                assert_eq!(r.status, 401, "{}", r.text);
                assert_eq!(cache_label(&r), "none");
            }
        }
    }
    assert!(server_errors >= 5, "{server_errors} upstream failures seen");
    println!(
        "requests by (tenant, cache, code): {:?}; upstream calls: {}",
        tally.requests,
        gw.fake.calls()
    );
    assert!(
        tally.units("hit") > 0 && tally.units("miss") > 0,
        "{tally:?}"
    );

    // Metrics: exactly the sums of what clients were told, errors add nothing.
    let m = gw.metrics().await;
    assert_eq!(
        metric_cells(&m),
        tally.cells,
        "usage/items metrics vs responses"
    );
    assert_eq!(
        tally.units("miss"),
        gw.fake.billed_units(),
        "miss units vs what upstream billed"
    );
    assert_eq!(
        metric_requests(&m),
        tally.requests,
        "requests_total vs responses"
    );
    let durations: BTreeMap<String, u64> =
        series(&m, "embedgate_request_duration_seconds_count", &["cache"])
            .into_iter()
            .map(|(k, v)| (k[0].clone(), v as u64))
            .collect();
    assert_eq!(durations, tally.by_cache());

    // The ledger catches up to the same figures.
    ledger_settles(&gw, &tally.cells, "ledger == responses").await;
    let csv = ledger_csv(&gw, None).await;
    assert_eq!(csv.lines().next(), Some(CSV_HEADER));
    assert_eq!(csv_cells(&csv), tally.cells);
    for tenant in ["alpha", "beta"] {
        assert_eq!(
            ledger(&gw, Some(tenant)).await,
            tally.only(tenant),
            "{tenant}"
        );
        assert_eq!(
            csv_cells(&ledger_csv(&gw, Some(tenant)).await),
            tally.only(tenant)
        );
    }
    assert!(ledger(&gw, Some("nobody")).await.is_empty());

    // Admin auth.
    let path = usage_path(None, false);
    for key in [None, Some("wrong-token"), Some(ALPHA_KEY)] {
        let r = gw.get(&path, key).await;
        assert_eq!(r.status, 401, "{key:?}: {}", r.text);
        assert_eq!(r.code(), "InvalidApiKey");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_are_off_without_admin_section() {
    let gw = alpha().no_admin().start().await;
    let r = gw.embed(ALPHA_KEY, &text_body("x")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    for key in [None, Some(ADMIN_TOKEN), Some(ALPHA_KEY)] {
        let r = gw.get(&usage_path(None, false), key).await;
        assert_eq!(r.status, 404, "{key:?}: {}", r.text);
    }
}

// =====================================================================
// 3. Upstream usage disagrees with the gateway
// =====================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_mismatch_is_counted_and_upstream_figure_recorded() {
    let gw = alpha_beta().start().await;
    let mut tally = Tally::default();
    let b = items_body(&[
        ("text", "one text".into(), None),
        ("image", "https://img.example/m.png".into(), Some(json!(2))),
    ]);
    gw.fake.push_faults([Fault::WrongUsage]);
    let r = send(&gw, &mut tally, "alpha", ALPHA_KEY, &b).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    assert_eq!(r.json()["usage"]["text"]["measure"], 2, "{}", r.text);
    assert_eq!(gw.fake.billed_units(), 3);

    let m = gw.metrics().await;
    assert_eq!(
        series(&m, "embedgate_usage_mismatch_total", &["tenant"]),
        BTreeMap::from([(vec!["alpha".to_string()], 1.0)])
    );
    fn cell<'a>(modality: &'a str, c: &'a str) -> [(&'a str, &'a str); 3] {
        [("tenant", "alpha"), ("modality", modality), ("cache", c)]
    }
    // Upstream's figure is the record: 2 text items, 2 units.
    assert_eq!(
        metric(&m, "embedgate_usage_units_total", &cell("text", "miss")),
        2.0
    );
    assert_eq!(
        metric(&m, "embedgate_items_total", &cell("text", "miss")),
        2.0
    );
    assert_eq!(
        metric(&m, "embedgate_usage_units_total", &cell("image", "miss")),
        1.0
    );

    // A hit and a normal miss do not add mismatches.
    let r = send(&gw, &mut tally, "alpha", ALPHA_KEY, &b).await;
    assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    let r = send(&gw, &mut tally, "beta", BETA_KEY, &b).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "embedgate_usage_mismatch_total", &[("tenant", "alpha")]),
        1.0
    );
    assert_eq!(
        metric(&m, "embedgate_usage_mismatch_total", &[("tenant", "beta")]),
        0.0
    );
    assert_eq!(metric_cells(&m), tally.cells);
    assert_eq!(tally.units("miss"), gw.fake.billed_units());
    // The (in-memory) ledger records upstream's figure too.
    ledger_settles(&gw, &tally.cells, "ledger == responses").await;
    assert_eq!(
        ledger(&gw, Some("alpha")).await[&("alpha".into(), "text".into(), "miss".into())],
        (2, 2)
    );
}

// =====================================================================
// 4. Durability across a restart; the CLI report
// =====================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_survives_restart_and_cli_reports_it() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    let cfg = alpha_beta().fake(&fake).redis(&redis);
    let gw = cfg.start().await;
    let mut tally = Tally::default();
    let old = misses_and_hits(&gw, &mut tally, "before", 7).await;
    // Stop right away: what is still buffered must be flushed on exit.
    assert_eq!(gw.terminate(), Some(0));

    let gw = cfg.start().await;
    assert_eq!(ledger(&gw, None).await, tally.cells, "ledger after restart");

    // More traffic adds to the same rows; old bodies are hits from Redis.
    for (i, b) in old.iter().enumerate() {
        let tenant = if i % 2 == 0 { "alpha" } else { "beta" };
        let r = send(&gw, &mut tally, tenant, key_of(tenant), b).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    misses_and_hits(&gw, &mut tally, "after", 4).await;
    ledger_settles(&gw, &tally.cells, "ledger == all responses").await;

    // The CLI reads the same rows from Redis.
    let admin: Value = gw
        .get(&usage_path(None, false), Some(ADMIN_TOKEN))
        .await
        .json();
    let cli: Value = serde_json::from_str(&cli_usage(&gw.config_path, &[]).await).unwrap();
    assert_eq!(cli, admin);
    assert_eq!(rows_cells(&cli), tally.cells);
    let csv = cli_usage(&gw.config_path, &["--format", "csv"]).await;
    assert_eq!(csv, ledger_csv(&gw, None).await);
    assert_eq!(csv_cells(&csv), tally.cells);
    let cli: Value =
        serde_json::from_str(&cli_usage(&gw.config_path, &["--tenant", "alpha"]).await).unwrap();
    assert_eq!(rows_cells(&cli), tally.only("alpha"));
    let csv = cli_usage(&gw.config_path, &["--tenant", "beta", "--format", "csv"]).await;
    assert_eq!(csv_cells(&csv), tally.only("beta"));
    assert_eq!(csv, ledger_csv(&gw, Some("beta")).await);
}

// =====================================================================
// 5. Redis outage
// =====================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_buffers_ledger_and_flushes_when_it_returns() {
    let mut redis = Redis::start();
    let gw = alpha_beta().redis(&redis).start().await;
    let mut tally = Tally::default();
    let old = misses_and_hits(&gw, &mut tally, "up", 4).await;
    ledger_settles(&gw, &tally.cells, "ledger before the outage").await;

    redis.kill();
    // Memory cache still serves old bodies; new ones go upstream; all 200.
    for (i, b) in old.iter().enumerate() {
        let tenant = if i % 2 == 0 { "alpha" } else { "beta" };
        let r = send(&gw, &mut tally, tenant, key_of(tenant), b).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    for i in 0..5 {
        for tenant in ["alpha", "beta"] {
            let b = mixed_body(&format!("down-{tenant}"), i);
            let r = send(&gw, &mut tally, tenant, key_of(tenant), &b).await;
            assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
            let r = send(&gw, &mut tally, tenant, key_of(tenant), &b).await;
            assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
        }
    }
    assert!(tally.requests.keys().all(|(_, _, code)| code == "ok"));
    eventually(10, "ledger rows buffered", async || {
        (gauge(&gw.metrics().await, "embedgate_ledger_buffered_entries") > 0.0).then_some(())
    })
    .await;
    assert_eq!(metric_cells(&gw.metrics().await), tally.cells);
    assert_eq!(tally.units("miss"), gw.fake.billed_units());

    redis.restart();
    ledger_settles(&gw, &tally.cells, "ledger after Redis returned").await;
    settle(20, "buffered gauge back to 0", &0.0, async || {
        gauge(&gw.metrics().await, "embedgate_ledger_buffered_entries")
    })
    .await;
    // Nothing was applied twice.
    assert_eq!(ledger(&gw, None).await, tally.cells);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_ledger_buffered_during_outage() {
    let mut redis = Redis::start();
    let fake = Fake::start().await;
    let cfg = alpha_beta().fake(&fake).redis(&redis);
    let gw = cfg.start().await;
    let mut tally = Tally::default();
    misses_and_hits(&gw, &mut tally, "up", 2).await;
    ledger_settles(&gw, &tally.cells, "ledger before the outage").await;

    redis.kill();
    misses_and_hits(&gw, &mut tally, "down", 4).await;
    eventually(10, "ledger rows buffered", async || {
        (gauge(&gw.metrics().await, "embedgate_ledger_buffered_entries") > 0.0).then_some(())
    })
    .await;
    redis.restart();
    assert_eq!(gw.terminate(), Some(0));

    // After exit the rows are in Redis: a new gateway reports them all.
    let gw = cfg.start().await;
    assert_eq!(ledger(&gw, None).await, tally.cells);
}

// =====================================================================
// 6. Deploy files
// =====================================================================

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_metrics_exist_and_compose_config_is_valid() {
    let dash_path = repo().join("deploy/grafana/dashboards/embedgate.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&dash_path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", dash_path.display()));
    assert!(dash.is_object(), "dashboard is not a JSON object");

    let out = std::process::Command::new("python3")
        .arg(repo().join("deploy/check_dashboard.py"))
        .arg(&dash_path)
        .output()
        .expect("python3 is needed for deploy/check_dashboard.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    for needed in [
        "embedgate_usage_units_total",
        "embedgate_requests_total",
        "embedgate_request_duration_seconds",
    ] {
        assert!(
            names.iter().any(|n| n == needed),
            "dashboard does not use {needed}"
        );
    }

    // Traffic that creates every series the dashboard can ask for.
    let mut redis = Redis::start();
    let gw = alpha()
        .quota(100_000, Per::Day)
        .tenant("beta", BETA_KEY)
        .redis(&redis)
        .start()
        .await;
    let mut tally = Tally::default();
    misses_and_hits(&gw, &mut tally, "dash", 2).await;
    let r = gw.embed(ALPHA_KEY, &bad_bodies("dash")[0]).await;
    assert_eq!(r.status, 400);
    gw.fake.push_faults([Fault::WrongUsage]);
    let r = gw.embed(BETA_KEY, &text_body("dash mismatch")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // A coalesced pair: identical requests while upstream is slow.
    gw.fake.set_latency_ms(300);
    let mut n = 0;
    eventually(30, "a coalesced request", async || {
        n += 1;
        let b = text_body(&format!("dash coalesce {n}"));
        let (r1, r2) = tokio::join!(gw.embed(ALPHA_KEY, &b), gw.embed(ALPHA_KEY, &b));
        assert_eq!((r1.status, r2.status), (200, 200));
        let m = gw.metrics().await;
        (gauge(&m, "embedgate_coalesced_requests_total") > 0.0).then_some(())
    })
    .await;
    gw.fake.set_latency_ms(0);
    // A Redis failure.
    redis.kill();
    let r = gw.embed(ALPHA_KEY, &text_body("dash redis down")).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let m = gw.metrics().await;
    let sample_names: BTreeSet<String> = samples(&m).into_iter().map(|s| s.name).collect();
    for name in &names {
        assert!(
            m.lines().any(|l| l.starts_with(&format!("# HELP {name} "))),
            "dashboard metric {name} has no HELP line in /metrics:\n{m}"
        );
        let present = [
            name.clone(),
            format!("{name}_bucket"),
            format!("{name}_count"),
        ]
        .iter()
        .any(|n| sample_names.contains(n));
        assert!(
            present,
            "dashboard metric {name} has no series in /metrics:\n{m}"
        );
    }

    // docker compose config, when a compose tool is installed.
    let tools: [&[&str]; 2] = [&["docker", "compose"], &["docker-compose"]];
    let tool = tools.into_iter().find(|t| {
        std::process::Command::new(t[0])
            .args(&t[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    match tool {
        None => println!(
            "note: neither `docker compose` nor `docker-compose` works; compose check skipped"
        ),
        Some(t) => {
            let out = std::process::Command::new(t[0])
                .args(&t[1..])
                .args(["-f", "deploy/compose.yaml", "config"])
                .current_dir(repo())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{} config failed: {}",
                t.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

// =====================================================================
// Coalescing, as billed: identical concurrent misses are one upstream call
// =====================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_misses_are_billed_once() {
    let redis = Redis::start();
    let gw = Arc::new(alpha().redis(&redis).start().await);
    let distinct = 30;
    let copies = 5;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..distinct {
        for _ in 0..copies {
            let gw = gw.clone();
            set.spawn(async move { gw.embed(ALPHA_KEY, &mixed_body("same", i)).await });
        }
    }
    let mut tally = Tally::default();
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        tally.add("alpha", &r);
    }
    let misses = tally.requests[&("alpha".to_string(), "miss".to_string(), "ok".to_string())];
    assert_eq!(metric_cells(&gw.metrics().await), tally.cells);
    assert_eq!(tally.units("miss"), gw.fake.billed_units());
    assert_eq!(
        (gw.fake.calls(), misses),
        (distinct as u64, distinct as u64),
        "upstream calls and MISS answers for {distinct} distinct bodies sent {copies} times at once"
    );
}
