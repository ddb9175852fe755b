//! Metering and billing: the Prometheus contract (SPEC §4), exact figures
//! under concurrent mixed traffic, the durable ledger (admin API and CLI)
//! across restarts and Redis outages (SPEC §5), and the deploy files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "../common/mod.rs"]
mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

mod coalescing;
mod deploy;
mod journal;
mod metrics_contract;
mod mixed_traffic;
mod reconciliation;
mod redis_outage;
mod restart;
mod unknown_outcomes;
mod usage_mismatch;

const ALPHA_KEY: &str = "sk-tenant-alpha-SECRET-0001";
const BETA_KEY: &str = "sk-tenant-beta-SECRET-0002";
const UNKNOWN_KEY: &str = "sk-unknown-\"evil-key-0003";
const MODALITIES: [&str; 3] = ["text", "image", "audio"];
/// The report's columns: the original six, then the ones added since.
const CSV_HEADER: &str =
    "tenant,day,modality,cache,items,units,computed_units,upstream_units,model,cost";
const ORIGINAL_COLUMNS: &str = "tenant,day,modality,cache,items,units";

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

/// usage_units_total and items_total as cells (zero series dropped); every
/// series is of the one model these tests call.
fn metric_cells(text: &str) -> Cells {
    let keys = ["tenant", "modality", "cache", "model"];
    let mut cells = Cells::new();
    for (name, units) in [
        ("embedgate_items_total", false),
        ("embedgate_usage_units_total", true),
    ] {
        for (k, v) in series(text, name, &keys) {
            assert_eq!(k[3], MODEL, "{name} {k:?}");
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

/// requests_total by (tenant, cache, code); the model of a successful
/// answer is the one these tests call, of others that or `none` (refused
/// before the body was read).
fn metric_requests(text: &str) -> BTreeMap<(String, String, String), u64> {
    series(
        text,
        "embedgate_requests_total",
        &["tenant", "cache", "code", "model"],
    )
    .into_iter()
    .filter(|(_, v)| *v > 0.0)
    .inspect(|(k, _)| {
        if k[2] == "ok" {
            assert_eq!(k[3], MODEL, "{k:?}");
        } else {
            assert!(k[3] == MODEL || k[3] == "none", "{k:?}");
        }
    })
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
        assert_eq!(row["model"], json!(MODEL), "{row}");
        // No price is configured: no cost.
        assert_eq!(row["cost"], Value::Null, "{row}");
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
    assert!(CSV_HEADER.starts_with(ORIGINAL_COLUMNS));
    let mut cells = Cells::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 10, "{line}");
        assert_eq!(f[1], d);
        assert_eq!((f[8], f[9]), (MODEL, ""), "{line}");
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

/// Polls the report until it equals `want`. A report that fails while
/// Redis is coming back (503) is one more poll, not a failure: only the
/// settled figures are asserted.
async fn ledger_settles(gw: &TestGateway, want: &Cells, what: &str) {
    settle(20, what, &Some(want.clone()), async || {
        let r = gw.get(&usage_path(None, false), Some(ADMIN_TOKEN)).await;
        (r.status == 200).then(|| rows_cells(&r.json()))
    })
    .await;
}

/// Runs `embedgate usage --config PATH --from D --to D ARGS…` in the
/// gateway's working directory; its stdout.
async fn cli_usage(gw: &TestGateway, args: &[&str]) -> String {
    let d = today();
    let mut all = vec!["--from", &d, "--to", &d];
    all.extend_from_slice(args);
    let (code, out, err) = cli(&gw.config_path, &gw.work_dir, &all).await;
    assert_eq!(code, Some(0), "embedgate usage {args:?} failed: {err}");
    out
}

/// Runs `embedgate usage --config PATH ARGS…` in `dir`: exit code, stdout,
/// stderr.
async fn cli(config: &Path, dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_embedgate"))
        .arg("usage")
        .arg("--config")
        .arg(config)
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
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
