//! Overload: excess work is shed fast with 503.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_work_is_shed_fast_with_503() {
    let gw = TestGateway::builder()
        .tenant("search", "k1")
        // One tenant may fill the whole bound here: this is about the
        // global bound, not the fair share (tests/isolation).
        .tenant_toml("max_in_flight = 2")
        .set("server", "max_in_flight = 2")
        .start()
        .await;
    let gw = std::sync::Arc::new(gw);
    gw.fake.set_latency_ms(3000);
    // Two slow misses fill the gateway...
    let mut slow = Vec::new();
    for i in 0..2 {
        let gw = gw.clone();
        slow.push(tokio::spawn(async move {
            gw.embed("k1", &text_body(&format!("slow {i}"))).await
        }));
    }
    eventually(10, "both slow requests upstream", async || {
        (gw.fake.calls() == 2).then_some(())
    })
    .await;
    // ...so the next ones are refused at once, not queued: every refusal
    // arrives while both slow requests are still in flight.
    for i in 0..4 {
        let r = gw.embed("k1", &text_body(&format!("shed {i}"))).await;
        assert_error(&r, 503, "ServiceUnavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert!(
        slow.iter().all(|h| !h.is_finished()),
        "refusals waited for the slow requests"
    );
    assert_eq!(gw.fake.calls(), 2, "shed requests must not reach upstream");
    for h in slow {
        assert_eq!(h.await.unwrap().status, 200);
    }
    // Capacity is back once they finish.
    gw.fake.set_latency_ms(0);
    assert_eq!(gw.embed("k1", &text_body("after")).await.status, 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_requests_total",
            &[
                ("tenant", "search"),
                // Shed before the body (and its model) was read.
                ("model", "none"),
                ("cache", "none"),
                ("code", "ServiceUnavailable")
            ]
        ),
        4.0
    );
}
