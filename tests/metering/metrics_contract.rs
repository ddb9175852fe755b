//! The metrics contract: names, labels and hygiene.

use super::*;

use std::collections::BTreeMap;

use serde_json::json;

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
        (
            "embedgate_requests_total",
            &["tenant", "model", "cache", "code"],
        ),
        (
            "embedgate_usage_units_total",
            &["tenant", "model", "modality", "cache"],
        ),
        (
            "embedgate_items_total",
            &["tenant", "model", "modality", "cache"],
        ),
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
        ("embedgate_usage_mismatch_total", &["tenant", "model"]),
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
    let requests = series(
        &m,
        "embedgate_requests_total",
        &["tenant", "model", "cache", "code"],
    );
    for k in requests.keys() {
        assert!(
            tenants.contains(&k[0].as_str()) || k[0] == "(none)",
            "{k:?}"
        );
        // The model the request named; `none` when refused before its
        // body was read (the unknown key).
        assert!([MODEL, "none"].contains(&k[1].as_str()), "{k:?}");
        assert!(["hit", "miss", "none"].contains(&k[2].as_str()), "{k:?}");
        assert!(code_re(&k[3]), "{k:?}");
    }
    assert!(
        requests.contains_key(
            ["(none)", "none", "none", "InvalidApiKey"]
                .map(String::from)
                .as_slice()
        ),
        "{requests:?}"
    );
    assert!(
        requests.contains_key(["alpha", MODEL, "hit", "ok"].map(String::from).as_slice()),
        "{requests:?}"
    );
    for name in ["embedgate_usage_units_total", "embedgate_items_total"] {
        for k in series(&m, name, &["tenant", "model", "modality", "cache"]).keys() {
            assert!(tenants.contains(&k[0].as_str()), "{name} {k:?}");
            assert_eq!(k[1], MODEL, "{name} {k:?}");
            assert!(MODALITIES.contains(&k[2].as_str()), "{name} {k:?}");
            assert!(["hit", "miss"].contains(&k[3].as_str()), "{name} {k:?}");
        }
    }
    for k in series(&m, "embedgate_request_duration_seconds_count", &["cache"]).keys() {
        assert!(["hit", "miss", "none"].contains(&k[0].as_str()), "{k:?}");
    }
    for k in series(&m, "embedgate_quota_remaining", &["tenant"]).keys() {
        assert!(tenants.contains(&k[0].as_str()), "{k:?}");
    }
    for k in series(&m, "embedgate_usage_mismatch_total", &["tenant", "model"]).keys() {
        assert!(tenants.contains(&k[0].as_str()), "{k:?}");
        assert_eq!(k[1], MODEL, "{k:?}");
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
    // Access lines carry the model as the metrics do: the one asked for,
    // `none` when the request was refused before its body was read.
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "embedgate::access" && v["message"] == "request")
        .collect();
    let answered: Vec<&serde_json::Value> = access
        .iter()
        .filter(|v| v["status"] == 200 && v["tenant"] != "(none)")
        .collect();
    assert!(!answered.is_empty(), "{logs}");
    for v in answered {
        assert_eq!(v["model"], MODEL, "{v}");
    }
    let unauthorized: Vec<&serde_json::Value> =
        access.iter().filter(|v| v["status"] == 401).collect();
    assert!(!unauthorized.is_empty(), "{logs}");
    for v in unauthorized {
        assert_eq!(v["model"], "none", "{v}");
    }
}
