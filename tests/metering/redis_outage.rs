//! Redis outage: the ledger is buffered and flushed.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_buffers_ledger_and_flushes_when_it_returns() {
    let mut redis = Redis::start();
    let gw = alpha_beta().redis(&redis).start().await;
    let mut tally = Tally::default();
    let old = misses_and_hits(&gw, &mut tally, "up", 4).await;
    ledger_settles(&gw, &tally.cells, "ledger before the outage").await;

    redis.kill();
    // Memory cache still serves old bodies; new ones go upstream; all 200.
    for (i, b) in old.iter().enumerate() {
        let tenant = if i % 2 == 0 { "alpha" } else { "beta" };
        let r = send(&gw, &mut tally, tenant, key_of(tenant), b).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    for i in 0..5 {
        for tenant in ["alpha", "beta"] {
            let b = mixed_body(&format!("down-{tenant}"), i);
            let r = send(&gw, &mut tally, tenant, key_of(tenant), &b).await;
            assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
            let r = send(&gw, &mut tally, tenant, key_of(tenant), &b).await;
            assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
        }
    }
    assert!(tally.requests.keys().all(|(_, _, code)| code == "ok"));
    eventually(10, "ledger rows buffered", async || {
        (gauge(&gw.metrics().await, "embedgate_ledger_buffered_entries") > 0.0).then_some(())
    })
    .await;
    assert_eq!(metric_cells(&gw.metrics().await), tally.cells);
    assert_eq!(tally.units("miss"), gw.fake.billed_units());

    redis.restart();
    ledger_settles(&gw, &tally.cells, "ledger after Redis returned").await;
    settle(20, "buffered gauge back to 0", &0.0, async || {
        gauge(&gw.metrics().await, "embedgate_ledger_buffered_entries")
    })
    .await;
    // Nothing was applied twice.
    assert_eq!(ledger(&gw, None).await, tally.cells);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_ledger_buffered_during_outage() {
    let mut redis = Redis::start();
    let fake = Fake::start().await;
    let cfg = alpha_beta().fake(&fake).redis(&redis);
    let gw = cfg.start().await;
    let mut tally = Tally::default();
    misses_and_hits(&gw, &mut tally, "up", 2).await;
    ledger_settles(&gw, &tally.cells, "ledger before the outage").await;

    redis.kill();
    misses_and_hits(&gw, &mut tally, "down", 4).await;
    eventually(10, "ledger rows buffered", async || {
        (gauge(&gw.metrics().await, "embedgate_ledger_buffered_entries") > 0.0).then_some(())
    })
    .await;
    redis.restart();
    assert_eq!(gw.terminate(), Some(0));

    // After exit the rows are in Redis: a new gateway reports them all.
    let gw = cfg.start().await;
    assert_eq!(ledger(&gw, None).await, tally.cells);
}
