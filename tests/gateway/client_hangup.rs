//! A client that hangs up during a miss.

use super::*;

/// The company pays for an upstream call whether or not the client waits for
/// it: the call finishes, its answer is cached and metered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_whose_client_hangs_up_is_still_cached_and_metered() {
    let gw = TestGateway::builder().tenant("search", "k1").start().await;
    gw.fake.set_latency_ms(800);
    let b = body(&[
        ("image", "https://x/hangup.png"),
        ("audio", "https://x/a.wav"),
    ]);
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_millis(200))
        .build()
        .unwrap();
    let gone = impatient
        .post(gw.url(EMBED_PATH))
        .header("authorization", "Bearer k1")
        .header("content-type", "application/json")
        .body(b.clone())
        .send()
        .await;
    assert!(gone.is_err(), "the client should have given up");
    // The upstream call completes and is metered as a miss: 1 image + 1 audio.
    eventually(10, "the abandoned miss to be metered", async || {
        let m = gw.metrics().await;
        let units = metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "search"),
                ("model", MODEL),
                ("modality", "audio"),
                ("cache", "miss"),
            ],
        );
        (units == 2.0).then_some(())
    })
    .await;
    assert_eq!(gw.fake.calls(), 1);
    assert_eq!(gw.fake.billed_units(), 3);
    // ...and cached: the next identical request makes no upstream call.
    gw.fake.set_latency_ms(0);
    let r = gw.embed("k1", &b).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 1);
}
