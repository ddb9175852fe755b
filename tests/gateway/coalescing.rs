//! Coalescing: identical concurrent misses make one upstream call.

use super::*;

use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_misses_make_one_call() {
    let gw = Arc::new(one_tenant().start().await);
    gw.fake.set_latency_ms(1000);
    let b = Arc::new(text_body("together"));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let gw = gw.clone();
        let b = b.clone();
        tasks.push(tokio::spawn(async move { gw.embed(K1, &b).await }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert_eq!(gw.fake.calls(), 1);
    let mut embeddings = Vec::new();
    for r in &replies {
        let v = assert_success(r);
        embeddings.push(v["output"]["embedding"].clone());
    }
    assert!(embeddings.windows(2).all(|w| w[0] == w[1]));
    let misses = replies.iter().filter(|r| r.cache() == "MISS").count();
    let hits = replies.iter().filter(|r| r.cache() == "HIT").count();
    assert_eq!((misses, hits), (1, 9));
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "embedgate_coalesced_requests_total", &[]), 9.0);
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("model", MODEL),
                ("modality", "text"),
                ("cache", "hit")
            ]
        ),
        9.0
    );
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("model", MODEL),
                ("modality", "text"),
                ("cache", "miss")
            ]
        ),
        1.0
    );
}
