//! Upstream usage disagrees with the gateway.

use super::*;

use std::collections::BTreeMap;

use serde_json::json;

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
        series(&m, "embedgate_usage_mismatch_total", &["tenant", "model"]),
        BTreeMap::from([(vec!["alpha".to_string(), MODEL.to_string()], 1.0)])
    );
    fn cell<'a>(modality: &'a str, c: &'a str) -> [(&'a str, &'a str); 4] {
        [
            ("tenant", "alpha"),
            ("model", MODEL),
            ("modality", modality),
            ("cache", c),
        ]
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
        metric(
            &m,
            "embedgate_usage_mismatch_total",
            &[("tenant", "alpha"), ("model", MODEL)]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_mismatch_total",
            &[("tenant", "beta"), ("model", MODEL)]
        ),
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
