//! Leased rate tokens under concurrency: a burst of concurrent requests from
//! one replica is admitted whole (leases are refilled one at a time and
//! never thrown away), and two replicas together stay within the shared
//! bucket plus its refill plus one lease each.

use super::*;

use std::sync::Arc;
use std::time::Instant;

/// B concurrent requests from one replica, with leasing on, are all
/// admitted: the bucket holds B tokens and none may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_burst_on_one_replica_is_admitted_whole() {
    let redis = Redis::start();
    // lease_size = min(1000 * 5 %, 160 / 8, 100) = 20 tokens per Redis call.
    let (per_second, burst) = (1000.0_f64, 160usize);
    let gw = TestGateway::builder()
        .redis(&redis)
        .tenant("busy", "k-busy")
        .rate(per_second, burst as u64)
        .start()
        .await;
    wait_redis(&gw, "up").await;
    let gw = Arc::new(gw);
    let replies = concurrent(std::slice::from_ref(&gw), "k-busy", "burst", burst).await;
    let admitted = count(&replies, 200);
    assert_eq!(
        admitted,
        burst,
        "{admitted} of {burst} concurrent requests admitted: {:?}",
        statuses(&replies)
    );
    eprintln!("one replica: {admitted} of {burst} concurrent requests admitted");
}

/// Two replicas, many more concurrent requests than the bucket holds: both
/// together admit at most burst + refill over the elapsed time + one lease
/// per replica, and at least the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_under_concurrency_stay_within_bucket_refill_and_leases() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    // lease_size = min(200 * 5 %, 160 / 8, 100) = 10 tokens per Redis call.
    let (per_second, burst, lease) = (200.0_f64, 160u64, 10u64);
    let cfg = TestGateway::builder()
        .fake(&fake)
        .redis(&redis)
        .tenant("busy", "k-busy")
        .rate(per_second, burst);
    let a = Arc::new(cfg.start().await);
    let b = Arc::new(cfg.start().await);
    wait_redis(&a, "up").await;
    wait_redis(&b, "up").await;
    let started = Instant::now();
    let replies = concurrent(&[a, b], "k-busy", "two", 600).await;
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = count(&replies, 200) as u64;
    let refused = count(&replies, 429) as u64;
    assert_eq!(admitted + refused, 600, "{:?}", statuses(&replies));
    for r in replies.iter().filter(|r| r.status == 429) {
        assert_rate_refusal(r);
    }
    let ceiling = burst + (elapsed * per_second).ceil() as u64 + 2 * lease;
    eprintln!(
        "two replicas: {admitted} admitted, {refused} refused in {elapsed:.3}s (bound {ceiling})"
    );
    assert!(
        admitted <= ceiling,
        "admitted {admitted} > bound {ceiling} over {elapsed:.3}s"
    );
    assert!(
        admitted >= burst,
        "admitted only {admitted} of a {burst} burst"
    );
}
