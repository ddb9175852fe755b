//! The Grafana dashboard and the alert rules on a real Prometheus: the
//! real gateway serves traffic that makes hits, misses, refusals (401,
//! 400, 429 rate, quota and in-flight, 503 shed) and upstream errors
//! (500, 401, a cut body, a wrong usage block); a `prometheus` server
//! scrapes it every second and evaluates deploy/prometheus/alerts.yml;
//! then every query of every dashboard panel and variable is evaluated
//! the way Grafana would send it, and must parse and return data.

use super::*;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::prometheus::Prometheus;

const SEARCH_KEY: &str = "sk-ops-search";
const ADS_KEY: &str = "sk-ops-ads";
const TINY_KEY: &str = "sk-ops-tiny";
const BUSY_KEY: &str = "sk-ops-busy";
/// Quota of `ads`, spent in the first round.
const ADS_QUOTA: u64 = 30;
const PRICE: &str = "0.0007";

/// Queries that may return nothing for this traffic, with the reason:
/// (panel title, refId).
const EXPECTED_EMPTY: &[(&str, &str, &str)] = &[(
    "Journal and log health (1h)",
    "A",
    "embedgate_journal_errors_total has series only after a journal operation failed (a full or read-only disk)",
)];

/// Template variables that may have no values yet, with the reason.
const EXPECTED_EMPTY_VARIABLES: &[(&str, &str)] = &[];

/// Every `targets[].expr` of every panel (rows' nested panels too) of
/// every dashboard: (dashboard file, panel title, refId, expr).
fn panel_queries() -> Vec<(String, String, String, String)> {
    fn walk(file: &str, panels: &Value, out: &mut Vec<(String, String, String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            walk(file, &p["panels"], out);
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((
                        file.to_string(),
                        p["title"].as_str().unwrap_or("").to_string(),
                        t["refId"].as_str().unwrap_or("").to_string(),
                        expr.to_string(),
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (file, dash) in dashboards() {
        walk(&file, &dash["panels"], &mut out);
    }
    out
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo().join("deploy/grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect()
}

/// The expression as Grafana sends it: `$__rate_interval` and `$__range`
/// as durations, the multi-value variables at "All" (their `allValue`
/// `.*`), the price textbox at its default.
fn substitute(expr: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "15s")
        .replace("$__range", "1h")
        .replace("$tenant", ".*")
        .replace("$model", ".*")
        .replace("$price", PRICE);
    assert!(
        !e.contains('$'),
        "a variable the test does not know in {expr:?} (add it to substitute)"
    );
    e
}

/// One embedding request with a client of its own (for concurrent use).
async fn embed(client: &reqwest::Client, url: &str, key: &str, body: String) -> Reply {
    let r = client
        .post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.unwrap();
    Reply {
        status,
        headers,
        text,
    }
}

/// `n` concurrent requests of distinct bodies while upstream answers in
/// 400 ms: the codes answered.
async fn concurrent(gw: &TestGateway, key: &str, tag: &str, n: usize) -> Vec<String> {
    gw.fake.set_latency_ms(400);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, url) = (gw.client.clone(), gw.url(EMBED_PATH));
        let (key, body) = (key.to_string(), text_body(&format!("{tag} {i}")));
        set.spawn(async move { embed(&client, &url, &key, body).await });
    }
    let mut codes = Vec::new();
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        codes.push(if r.status == 200 {
            "ok".into()
        } else {
            r.code()
        });
    }
    gw.fake.set_latency_ms(0);
    codes
}

/// One round of traffic of every kind the dashboard shows. Run twice, so
/// that every counter is scraped before and after it grows.
async fn round(gw: &TestGateway, prom: &Prometheus, n: usize) {
    // Misses and hits over three modalities.
    for i in 0..4 {
        let b = body(&[
            ("text", &format!("round {n} text {i}")),
            ("image", &format!("https://img.example/{n}/{i}.png")),
            ("audio", &format!("https://snd.example/{n}/{i}.flac")),
        ]);
        let r = gw.embed(SEARCH_KEY, &b).await;
        assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
        let r = gw.embed(SEARCH_KEY, &b).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    // A partial hit of a per-item model: two texts, then three.
    let text_path = "/api/v1/services/embeddings/text-embedding/text-embedding";
    for (texts, want) in [
        (vec![format!("a {n}"), format!("b {n}")], "MISS"),
        (
            vec![format!("a {n}"), format!("b {n}"), format!("c {n}")],
            "PARTIAL",
        ),
    ] {
        let body = json!({"model": "text-embedding-v4", "input": {"texts": texts}});
        let r = gw
            .client
            .post(gw.url(text_path))
            .header("authorization", format!("Bearer {SEARCH_KEY}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-cache"], want);
    }
    // 401: a key nobody has.
    let r = gw.embed("sk-nobody", &text_body("x")).await;
    assert_error(&r, 401, "InvalidApiKey");
    // 400: refused before anything goes upstream.
    let bad = json!({"model": MODEL, "input": {"contents": [{"text": "x", "factor": 0}]}});
    let r = gw.embed(SEARCH_KEY, &bad.to_string()).await;
    assert_error(&r, 400, "InvalidParameter");
    // 429 rate: `tiny` has 1 request a second, burst 1.
    let mut codes = Vec::new();
    for i in 0..3 {
        let r = gw
            .embed(TINY_KEY, &text_body(&format!("tiny {n} {i}")))
            .await;
        codes.push(r.code());
    }
    assert!(
        codes.iter().any(|c| c == "Throttling.RateQuota"),
        "{codes:?}"
    );
    // 429 quota: `ads` spends its quota (first round), then is refused.
    let mut refused = false;
    for i in 0..ADS_QUOTA * 2 {
        let r = gw.embed(ADS_KEY, &text_body(&format!("ads {n} {i}"))).await;
        if r.status == 429 {
            assert_error(&r, 429, "Throttling.AllocationQuota");
            refused = true;
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text);
        if n == 1 && i == 0 {
            // The quota alert takes the highest remaining figure seen as
            // the quota (there is no gauge of the quota itself): let
            // Prometheus see the period's start.
            eventually(30, "ads' quota_remaining scraped", async || {
                let v = prom
                    .scalar("embedgate_quota_remaining{tenant=\"ads\"}")
                    .await?;
                (v == (ADS_QUOTA - 1) as f64).then_some(())
            })
            .await;
        }
    }
    assert!(refused, "ads was never refused its quota");
    // Upstream 500 on both attempts (max_retries = 1): the client gets an error.
    gw.fake.push_faults([
        Fault::Status(500, "InternalError"),
        Fault::Status(500, "InternalError"),
    ]);
    let r = gw.embed(SEARCH_KEY, &text_body(&format!("500 {n}"))).await;
    assert!(r.status >= 500, "{} {}", r.status, r.text);
    // Upstream refuses the company key.
    gw.fake.push_faults([Fault::Status(401, "InvalidApiKey")]);
    let r = gw.embed(SEARCH_KEY, &text_body(&format!("401 {n}"))).await;
    assert_eq!(r.status, 401, "{}", r.text);
    // Upstream's usage block disagrees with the gateway's count.
    gw.fake.push_faults([Fault::WrongUsage]);
    let r = gw
        .embed(SEARCH_KEY, &text_body(&format!("mismatch {n}")))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // An answer cut mid-body: an upstream call of unknown outcome.
    let before = metric(
        &gw.metrics().await,
        "embedgate_upstream_unknown_outcome_total",
        &[("tenant", "search")],
    );
    gw.fake.push_faults([Fault::CutBody, Fault::CutBody]);
    gw.embed(SEARCH_KEY, &text_body(&format!("cut {n}"))).await;
    let after = metric(
        &gw.metrics().await,
        "embedgate_upstream_unknown_outcome_total",
        &[("tenant", "search")],
    );
    assert!(
        after > before,
        "no unknown outcome counted ({before} → {after})"
    );
    // Load shedding: 10 at once against max_in_flight = 4 (503), and 3 at
    // once for `busy`, whose own bound is 1 (429 Throttling).
    let codes = concurrent(gw, SEARCH_KEY, &format!("shed {n}"), 10).await;
    assert!(codes.iter().any(|c| c == "ServiceUnavailable"), "{codes:?}");
    let codes = concurrent(gw, BUSY_KEY, &format!("busy {n}"), 3).await;
    assert!(codes.iter().any(|c| c == "Throttling"), "{codes:?}");
    // A config reload.
    gw.signal("HUP");
    eventually(20, "the reload counted", async || {
        let m = gw.metrics().await;
        (metric(&m, "embedgate_config_reloads_total", &[("result", "ok")]) >= n as f64)
            .then_some(())
    })
    .await;
}

/// Waits until Prometheus has scraped the gateway's current figures.
async fn scraped(gw: &TestGateway, prom: &Prometheus) {
    let m = gw.metrics().await;
    let requests = metric_sum(&m, "embedgate_requests_total");
    let units = metric_sum(&m, "embedgate_usage_units_total");
    eventually(60, "prometheus has scraped the gateway", async || {
        let r = prom.scalar("sum(embedgate_requests_total)").await?;
        let u = prom.scalar("sum(embedgate_usage_units_total)").await?;
        (r == requests && u == units).then_some(())
    })
    .await;
    // Two more scrapes, so that every series (also those that appeared
    // in the last scrape) has the two samples a rate needs.
    let seen = prom
        .scalar("timestamp(embedgate_build_info)")
        .await
        .unwrap();
    eventually(30, "two more scrapes", async || {
        let t = prom.scalar("timestamp(embedgate_build_info)").await?;
        (t >= seen + 2.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_queries_return_data_on_a_real_prometheus() {
    let Some(bin) = tool("prometheus") else {
        return;
    };
    let mut cache = Redis::start();
    let state = Redis::start();
    let gw = TestGateway::builder()
        .redis(&cache)
        .state_redis(&state)
        .set("server", "max_in_flight = 4")
        .set("upstream", "max_retries = 1")
        .tenant("search", SEARCH_KEY)
        .tenant_toml("max_in_flight = 4")
        .quota(1_000_000, Per::Day)
        .tenant("ads", ADS_KEY)
        .quota(ADS_QUOTA, Per::Day)
        .tenant("tiny", TINY_KEY)
        .rate(1.0, 1)
        .tenant("busy", BUSY_KEY)
        .tenant_toml("max_in_flight = 1")
        .start()
        .await;
    let prom = Prometheus::start(&bin, gw.addr).await;
    eventually(60, "the first scrape", async || {
        let up = prom.scalar("up{job=\"embedgate\"}").await?;
        (up == 1.0).then_some(())
    })
    .await;

    round(&gw, &prom, 1).await;
    scraped(&gw, &prom).await;
    round(&gw, &prom, 2).await;
    // The cache Redis goes away: cache errors, redis_up{store="cache"} 0.
    cache.kill();
    let r = gw.embed(SEARCH_KEY, &text_body("redis gone")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    eventually(20, "redis_up{store=cache} 0", async || {
        let m = gw.metrics().await;
        (metric(&m, "embedgate_redis_up", &[("store", "cache")]) == 0.0).then_some(())
    })
    .await;
    scraped(&gw, &prom).await;

    // The alert rules: loaded, every one evaluated without error, and
    // those this traffic breaks are pending (their `for:` is minutes).
    let rule_queries = eventually(60, "every rule evaluated", async || {
        let data = prom.api("rules", &[]).await.ok()?;
        let mut queries = BTreeMap::new();
        for g in data["groups"].as_array()? {
            for r in g["rules"].as_array()? {
                if r["health"] != "ok" {
                    assert_ne!(r["health"], "err", "rule failed: {r}");
                    return None;
                }
                queries.insert(r["name"].as_str()?.to_string(), r["query"].to_string());
            }
        }
        (!queries.is_empty()).then_some(queries)
    })
    .await;
    assert!(rule_queries.len() >= 10, "{rule_queries:?}");
    for (name, query) in &rule_queries {
        let query: String = serde_json::from_str(query).unwrap();
        if let Err(e) = prom.query(&query).await {
            panic!("rule {name}: {query}: {e}");
        }
    }
    let want: BTreeSet<&str> = [
        "EmbedgateUpstreamKeyRefused",
        "EmbedgateUsageMismatch",
        "EmbedgateUnknownOutcomeUnits",
        "EmbedgateTenantQuotaNearlySpent",
        "EmbedgateCacheRedisDown",
        "EmbedgateLoadShedding",
    ]
    .into();
    let mut active = BTreeSet::new();
    let done = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        eventually(120, "alerts pending", async || {
            active = prom
                .query("ALERTS{alertname=~\"Embedgate.*\"}")
                .await
                .ok()?
                .iter()
                .filter_map(|a| a["metric"]["alertname"].as_str().map(str::to_string))
                .collect();
            want.iter().all(|w| active.contains(*w)).then_some(())
        }),
    )
    .await;
    assert!(
        done.is_ok(),
        "alerts pending or firing: {active:?}, want at least {want:?}"
    );
    let quota_alert = prom
        .query("ALERTS{alertname=\"EmbedgateTenantQuotaNearlySpent\"}")
        .await
        .unwrap();
    let tenants: BTreeSet<&str> = quota_alert
        .iter()
        .filter_map(|a| a["metric"]["tenant"].as_str())
        .collect();
    assert_eq!(tenants, BTreeSet::from(["ads"]), "{quota_alert:?}");

    // Template variables: label_values(metric, label).
    for (file, dash) in dashboards() {
        for var in dash["templating"]["list"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap();
            let is_query = var["type"] == "query";
            if !is_query {
                continue;
            }
            let q = var["query"]["query"]
                .as_str()
                .or(var["query"].as_str())
                .unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{file} ${name}: not label_values(…): {q}"));
            let (metric_name, label) = inner.split_once(',').unwrap();
            let values = prom
                .api(
                    &format!("label/{}/values", label.trim()),
                    &[("match[]", metric_name.trim())],
                )
                .await
                .unwrap_or_else(|e| panic!("{file} ${name}: {q}: {e}"));
            let values: BTreeSet<&str> = values
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            if name == "tenant" {
                for t in ["search", "ads", "tiny", "busy"] {
                    assert!(values.contains(t), "${name} lacks {t}: {values:?}");
                }
            }
            let may_be_empty = EXPECTED_EMPTY_VARIABLES.iter().any(|(v, _)| *v == name);
            assert!(
                may_be_empty || !values.is_empty(),
                "{file} ${name}: {q} has no values"
            );
            assert!(
                var["multi"] == true && var["includeAll"] == true && var["allValue"] == ".*",
                "{file} ${name} must be multi-select with All = .*"
            );
        }
    }

    // Every panel query.
    let queries = panel_queries();
    assert!(queries.len() >= 30, "only {} queries", queries.len());
    let mut failures = Vec::new();
    let mut unexpectedly_full = Vec::new();
    for (file, title, ref_id, expr) in &queries {
        assert!(
            !expr.contains("[5m]") && !expr.contains("[1m]"),
            "{file} {title:?} {ref_id}: use $__rate_interval, not a fixed window: {expr}"
        );
        let q = substitute(expr);
        let expected_empty = EXPECTED_EMPTY
            .iter()
            .any(|(t, r, _)| t == title && r == ref_id);
        match prom.query(&q).await {
            Err(e) => failures.push(format!("{file} {title:?} {ref_id}: {q}: {e}")),
            Ok(result) if result.is_empty() && !expected_empty => {
                failures.push(format!("{file} {title:?} {ref_id}: no data: {q}"))
            }
            Ok(result) if !result.is_empty() && expected_empty => {
                unexpectedly_full.push(format!("{title:?} {ref_id}"))
            }
            Ok(_) => {}
        }
    }
    if !unexpectedly_full.is_empty() {
        println!("note: expected empty but returned data (drop them from EXPECTED_EMPTY): {unexpectedly_full:?}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries failed:\n{}\nprometheus log:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n"),
        prom.log()
    );
    // Every EXPECTED_EMPTY entry names a query that exists.
    for (title, ref_id, _) in EXPECTED_EMPTY {
        assert!(
            queries.iter().any(|(_, t, r, _)| t == title && r == ref_id),
            "EXPECTED_EMPTY names no query: {title:?} {ref_id}"
        );
    }

    // For deploy/render_dashboard.py: keep Prometheus running when asked.
    if let Ok(path) = std::env::var("EMBEDGATE_KEEP_PROMETHEUS") {
        std::fs::write(&path, &prom.url).unwrap();
        let pidfile = format!("{path}.done");
        eventually(1800, "the render to finish", async || {
            std::path::Path::new(&pidfile).exists().then_some(())
        })
        .await;
    }
}
