//! Exact figures under concurrent mixed traffic; admin routes.

use super::*;

use std::collections::BTreeMap;
use std::sync::Arc;

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
