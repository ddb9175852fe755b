//! Hot reload by file watch and SIGHUP; invalid reloads are rejected.

use super::*;

use std::sync::Arc;

/// Tenants `a` and `b` with these keys.
fn two_tenants(a_key: &str, b_key: &str) -> GatewayBuilder {
    TestGateway::builder().tenant("a", a_key).tenant("b", b_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_by_file_watch_adds_and_revokes_keys() {
    let gw = two_tenants("ka", "kb").start().await;
    assert_eq!(gw.embed("ka", &text_body("x")).await.status, 200);
    assert_eq!(gw.embed("ka-new", &text_body("x")).await.status, 401);

    // Rotate a's key; add tenant c.
    gw.reconfigure(&two_tenants("ka-new", "kb").tenant("c", "kc"));
    eventually(15, "new key accepted after the file changed", async || {
        (gw.embed("ka-new", &text_body("y")).await.status == 200).then_some(())
    })
    .await;
    let r = gw.embed("ka", &text_body("y")).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.code(), "InvalidApiKey");
    assert_eq!(gw.embed("kc", &text_body("y")).await.status, 200);
    assert_eq!(gw.embed("kb", &text_body("y")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_by_sighup_without_file_watch() {
    let no_watch = |a_key: &str| two_tenants(a_key, "kb").set("server", "watch_config = false");
    let gw = no_watch("ka").start().await;
    assert_eq!(gw.embed("ka", &text_body("x")).await.status, 200);

    gw.reconfigure(&no_watch("ka-new"));
    gw.signal("HUP");
    eventually(15, "new key accepted after SIGHUP", async || {
        (gw.embed("ka-new", &text_body("y")).await.status == 200).then_some(())
    })
    .await;
    assert_eq!(gw.embed("ka", &text_body("y")).await.status, 401);
    assert_eq!(gw.embed("kb", &text_body("y")).await.status, 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "embedgate_config_reloads_total", &[("result", "ok")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_is_rejected_and_old_config_stays() {
    let gw = two_tenants("ka", "kb").start().await;
    assert_eq!(gw.embed("ka", &text_body("x")).await.status, 200);

    // Tenant 0 gets a negative rate, and a new key that must not apply.
    let bad = TestGateway::builder()
        .fake(&gw.fake)
        .tenant("a", "ka-new")
        .rate(-1.0, 5)
        .tenant("b", "kb")
        .config();
    let line = bad
        .lines()
        .position(|l| l.contains("per_second = -1"))
        .unwrap()
        + 1;
    gw.rewrite_config(&bad);
    eventually(15, "the reload to be rejected", async || {
        let m = gw.metrics().await;
        (metric(&m, "embedgate_config_reloads_total", &[("result", "error")]) >= 1.0).then_some(())
    })
    .await;
    let logs = eventually(10, "the rejection in the log", async || {
        let logs = gw.logs();
        logs.contains("tenants[0].rate.per_second").then_some(logs)
    })
    .await;
    let err = logs
        .lines()
        .find(|l| l.contains("tenants[0].rate.per_second"))
        .unwrap();
    assert!(
        err.contains(&format!("\"line\":{line}")) || err.contains(&format!("line {line}")),
        "line {line} not in: {err}"
    );
    assert_eq!(gw.embed("ka", &text_body("y")).await.status, 200);
    assert_eq!(gw.embed("kb", &text_body("y")).await.status, 200);
    assert_eq!(gw.embed("ka-new", &text_body("y")).await.status, 401);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "embedgate_config_reloads_total", &[("result", "ok")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_raises_quota_without_restart() {
    let cfg = |units: u64| {
        TestGateway::builder()
            .tenant("q", "kq")
            .quota(units, Per::Day)
    };
    let gw = cfg(3).start().await;
    for i in 0..3 {
        assert_eq!(
            gw.embed("kq", &text_body(&format!("a {i}"))).await.status,
            200
        );
    }
    assert_quota_refusal(&gw.embed("kq", &text_body("a 3")).await);

    gw.reconfigure(&cfg(5));
    let mut n = 0;
    let first = eventually(15, "the raised quota to apply", async || {
        n += 1;
        let r = gw.embed("kq", &text_body(&format!("b {n}"))).await;
        match r.status {
            200 => Some(r),
            429 => {
                assert_quota_refusal(&r);
                None
            }
            s => panic!("unexpected {s}: {}", r.text),
        }
    })
    .await;
    // Usage so far is kept: 4 of 5 used.
    assert_eq!(num_header(&first, "x-quota-remaining"), Some(1));
    let r = gw.embed("kq", &text_body("c 1")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(num_header(&r, "x-quota-remaining"), Some(0));
    assert_quota_refusal(&gw.embed("kq", &text_body("c 2")).await);
    assert_eq!(gw.fake.calls(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_survive_a_reload() {
    let gw = Arc::new(two_tenants("ka", "kb").start().await);
    // Long enough that the reload (SIGHUP, applied at once) lands inside it.
    gw.fake.set_latency_ms(3000);
    let g = gw.clone();
    let in_flight = tokio::spawn(async move { g.embed("ka", &text_body("slow")).await });
    eventually(10, "the request to reach upstream", async || {
        (gw.fake.calls() == 1).then_some(())
    })
    .await;

    // Revoke the in-flight request's key.
    gw.reconfigure(&two_tenants("ka-new", "kb"));
    gw.signal("HUP");
    eventually(10, "the old key to be revoked", async || {
        (gw.embed("ka", &text_body("probe")).await.status == 401).then_some(())
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "the request finished before the reload; the test proves nothing"
    );
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(
        r.json()["output"]["embedding"].as_array().unwrap().len(),
        1536
    );
}

/// Cache settings are not applied by a reload (the caches are built once):
/// a change is reported as needing a restart, and the rest applies. The
/// first change is made right after the start: the file watch compares
/// with what was loaded, so a change before it starts is seen too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_settings_changed_by_a_reload_are_reported_as_needing_a_restart() {
    let gw = two_tenants("ka", "kb").start().await;
    for (i, line) in [
        "compact_form = \"digits\"",
        "memory_max_bytes = 1000000",
        "hot_max_bytes = 0",
    ]
    .into_iter()
    .enumerate()
    {
        let new_key = format!("ka-{i}");
        gw.reconfigure(&two_tenants(&new_key, "kb").set("cache", line));
        eventually(15, "the new key accepted", async || {
            (gw.embed(&new_key, &text_body("y")).await.status == 200).then_some(())
        })
        .await;
        // Logged after the swap, through the log's queue.
        eventually(
            15,
            &format!("restart warning {} for {line}", i + 1),
            async || {
                let warnings = gw
                    .logs()
                    .lines()
                    .filter(|l| l.contains("need a restart") && l.contains("cache"))
                    .count();
                assert!(warnings <= i + 1, "{}", gw.logs());
                (warnings == i + 1).then_some(())
            },
        )
        .await;
    }
}
