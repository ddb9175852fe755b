//! Hit / miss: a miss goes upstream once, its repeat is a hit.

use super::*;

use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_then_hit_with_usage_and_fresh_request_id() {
    let gw = one_tenant().start().await;
    let b = mixed_body();

    let r1 = gw.embed(K1, &b).await;
    let v1 = assert_success(&r1);
    assert_eq!(r1.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 1);

    let r2 = gw.embed(K1, &b).await;
    let v2 = assert_success(&r2);
    assert_eq!(r2.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 1, "a hit must not call upstream");

    assert_eq!(v1["output"]["embedding"], v2["output"]["embedding"]);
    let want_usage = json!({
        "text": {"measure": 1, "weight": 1},
        "image": {"measure": 1, "weight": 1},
        "audio": {"measure": 2, "weight": 2},
        "total_usage": 6
    });
    assert_eq!(v1["usage"], want_usage, "miss usage");
    assert_eq!(
        v2["usage"], want_usage,
        "hit usage computed from the request"
    );
    let id1 = v1["request_id"].as_str().unwrap();
    let id2 = v2["request_id"].as_str().unwrap();
    assert!(!id2.is_empty());
    assert_ne!(id1, id2, "a hit needs its own request_id");

    // A third one: another fresh id, still no upstream call.
    let r3 = gw.embed(K1, &b).await;
    let v3 = assert_success(&r3);
    assert_eq!(r3.cache(), "HIT");
    assert_ne!(v3["request_id"], v2["request_id"]);
    assert_eq!(gw.fake.calls(), 1);

    let m = gw.metrics().await;
    let units = |modality: &str, cache: &str| {
        metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("model", MODEL),
                ("modality", modality),
                ("cache", cache),
            ],
        )
    };
    assert_eq!(units("audio", "miss"), 4.0);
    assert_eq!(units("text", "miss"), 1.0);
    assert_eq!(units("image", "miss"), 1.0);
    assert_eq!(units("audio", "hit"), 8.0);
    assert_eq!(units("text", "hit"), 2.0);
    assert_eq!(
        metric(
            &m,
            "embedgate_requests_total",
            &[
                ("tenant", "search"),
                ("model", MODEL),
                ("cache", "hit"),
                ("code", "ok")
            ]
        ),
        2.0
    );
}
