//! Coalescing, as billed: identical concurrent misses are one upstream call.

use super::*;

use std::sync::Arc;

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
