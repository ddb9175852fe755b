#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_after_miss_in_memory() {
    let fake = Fake::start().await;
    let gw = Gateway::start(&config(
        &fake,
        None,
        &[Tenant {
            name: "search",
            key: "k1",
            extra: "",
        }],
        "",
    ));
    let b = text_body("hello");
    let r1 = gw.embed("k1", &b).await;
    assert_eq!(r1.status, 200, "{}", r1.text);
    assert_eq!(r1.cache(), "MISS");
    let r2 = gw.embed("k1", &b).await;
    assert_eq!(r2.cache(), "HIT");
    assert_eq!(fake.calls(), 1);
    assert_eq!(
        r1.json()["output"]["embedding"],
        r2.json()["output"]["embedding"]
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("modality", "text"),
                ("cache", "miss")
            ]
        ),
        1.0
    );
}
