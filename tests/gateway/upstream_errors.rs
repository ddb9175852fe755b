//! Upstream errors: passed through, not cached, not metered.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_uncached() {
    let gw = one_tenant().start().await;

    // Scripted.
    let b = text_body("scripted error");
    gw.fake.push_faults([Fault::Status(400, "InvalidURL")]);
    let r = gw.embed(K1, &b).await;
    let v = assert_error(&r, 400, "InvalidURL");
    assert_eq!(v["message"], "injected by the fake");
    assert_eq!(gw.fake.calls(), 1, "a 400 is not retried");
    // Not cached: the next one calls again and succeeds.
    let r = gw.embed(K1, &b).await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 2);

    // An unreachable URL, as upstream reports it.
    let bad = body(&[("image", "https://unreachable.example.com/x.png")]);
    let r = gw.embed(K1, &bad).await;
    let v = assert_error(&r, 400, "InvalidURL");
    assert_eq!(v["message"], "Invalid URL provided in your request.");
    assert_eq!(gw.fake.calls(), 3);
    let r = gw.embed(K1, &bad).await;
    assert_error(&r, 400, "InvalidURL");
    assert_eq!(gw.fake.calls(), 4, "errors are never cached");

    // Other statuses keep theirs.
    gw.fake.push_faults([Fault::Status(403, "AccessDenied")]);
    let r = gw.embed(K1, &text_body("forbidden")).await;
    assert_error(&r, 403, "AccessDenied");
    assert_eq!(gw.fake.calls(), 5);

    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("model", MODEL),
                ("modality", "image"),
                ("cache", "miss")
            ]
        ),
        0.0,
        "failed answers are not metered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_200s_are_errors_not_cached_not_metered() {
    let gw = one_tenant().start().await;
    for (i, fault) in [Fault::CodeOn200, Fault::BadEmbedding]
        .into_iter()
        .enumerate()
    {
        let b = text_body(&format!("bad 200 #{i}"));
        let before = gw.metrics().await;
        gw.fake.push_faults([fault.clone()]);
        let r = gw.embed(K1, &b).await;
        assert_ne!(r.status, 200, "{fault:?}: {}", r.text);
        let v = r.json();
        assert!(
            v["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{fault:?}: {}",
            r.text
        );
        assert!(v.get("output").is_none(), "{fault:?}: {}", r.text);
        assert_eq!(gw.fake.calls(), 2 * i as u64 + 1);

        let after = gw.metrics().await;
        for name in ["embedgate_usage_units_total", "embedgate_items_total"] {
            assert_eq!(
                metric_sum(&after, name),
                metric_sum(&before, name),
                "{fault:?} was metered in {name}"
            );
        }

        // Not cached: the repeat goes upstream and gets a real answer.
        let r = gw.embed(K1, &b).await;
        assert_success(&r);
        assert_eq!(r.cache(), "MISS", "{fault:?}");
        assert_eq!(gw.fake.calls(), 2 * i as u64 + 2);
        assert_eq!(gw.embed(K1, &b).await.cache(), "HIT");
    }
    // Only the real successes counted: per round one miss and one hit of 1 unit.
    let m = gw.metrics().await;
    assert_eq!(metric_sum(&m, "embedgate_usage_units_total"), 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_on_200_counts_nothing() {
    let gw = one_tenant().start().await;
    gw.fake.push_faults([Fault::CodeOn200, Fault::BadEmbedding]);
    let r = gw.embed(K1, &text_body("one")).await;
    assert_ne!(r.status, 200);
    let r = gw.embed(K1, &text_body("two")).await;
    assert_ne!(r.status, 200);
    assert_eq!(gw.fake.calls(), 2);
    let m = gw.metrics().await;
    assert_eq!(metric_sum(&m, "embedgate_usage_units_total"), 0.0);
    assert_eq!(metric_sum(&m, "embedgate_items_total"), 0.0);
}
