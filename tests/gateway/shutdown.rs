//! Graceful shutdown: SIGTERM finishes requests in flight.

use super::*;

use std::time::Duration;

use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight() {
    let fake = Fake::start().await;
    let gw = one_tenant().fake(&fake).start().await;
    fake.set_latency_ms(500);
    let client = gw.client.clone();
    let url = gw.url(EMBED_PATH);
    let task = tokio::spawn(async move {
        let resp = client
            .post(url)
            .header("authorization", format!("Bearer {K1}"))
            .header("content-type", "application/json")
            .body(text_body("in flight at shutdown"))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, text)
    });
    eventually(10, "the request reaches upstream", async || {
        (fake.calls() == 1).then_some(())
    })
    .await;
    let code = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    let (status, text) = task.await.unwrap();
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(embedding(&v).len(), 1536);
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    assert_eq!(fake.calls(), 1);
}

/// The budget of the shutdown tests below.
const BUDGET_SECS: u64 = 4;
/// Exit after the budget's end: the log writer's last lines, process exit.
const EXIT_MARGIN: Duration = Duration::from_millis(1500);

/// Sends a miss in the background; its answer (status) when it comes.
fn miss_in_background(gw: &TestGateway, key: &str, text: &str) -> tokio::task::JoinHandle<u16> {
    let req = gw
        .client
        .post(gw.url(EMBED_PATH))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(text_body(text));
    tokio::spawn(async move {
        match req.send().await {
            Ok(r) => r.status().as_u16(),
            // Dropped at exit.
            Err(_) => 0,
        }
    })
}

/// A 60 s upstream call in flight at SIGTERM does not hold the exit past the
/// budget: the drain ends at 3 s of 4 and cuts the call (504 to its
/// client), which records its possible cost (the ledger's `unknown`, spent
/// from the quota); that is flushed with the rest and the exit status is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_slow_upstream_exits_within_the_budget() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    let gw = one_tenant()
        .fake(&fake)
        .quota(1000, Per::Day)
        .redis(&redis)
        .set("server", format!("shutdown_grace = \"{BUDGET_SECS}s\""))
        .set("upstream", "timeout = \"90s\"")
        .start()
        .await;
    fake.set_latency_ms(60_000);
    let task = miss_in_background(&gw, K1, "slow at shutdown");
    eventually(10, "the request reaches upstream", async || {
        (fake.calls() == 1).then_some(())
    })
    .await;
    let budget = Duration::from_secs(BUDGET_SECS);
    let (code, elapsed, logs) =
        tokio::task::spawn_blocking(move || gw.terminate_within(budget + Duration::from_secs(20)))
            .await
            .unwrap();
    assert!(
        elapsed < budget + EXIT_MARGIN,
        "exited {elapsed:?} after SIGTERM, budget {budget:?}\n{logs}"
    );
    // It did wait for the call, until the drain time (3/4 of 4 s) was over.
    assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}\n{logs}");
    assert_eq!(code, Some(0), "exit status\n{logs}");
    assert!(logs.contains("are cut"), "{logs}");
    assert_eq!(task.await.unwrap(), 504, "the cut call's answer");
    // Its possible cost is on record: 1 unit of unknown outcome, spent.
    let unknown: Option<i64> = redis::cmd("HGET")
        .arg(format!("{{eg:search}}:ledger:{}", today()))
        .arg(format!("{MODEL}|text|unknown|units"))
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(unknown, Some(1), "{logs}");
    let quota: Option<i64> = redis::cmd("GET")
        .arg(format!("{{eg:search}}:quota:{}", today()))
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(quota, Some(1), "{logs}");
}

/// Redis gone at SIGTERM: the ledger rows and the quota units granted
/// without it cannot be shipped. The process still exits within the budget,
/// with status 3 and the reason in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_ledger_unshipped_exits_non_zero_within_the_budget() {
    let mut redis = Redis::start();
    let gw = one_tenant()
        .quota(1000, Per::Day)
        .redis(&redis)
        .set("server", format!("shutdown_grace = \"{BUDGET_SECS}s\""))
        .start()
        .await;
    assert_eq!(gw.embed(K1, &text_body("before")).await.status, 200);
    redis.kill();
    assert_eq!(gw.embed(K1, &text_body("during")).await.status, 200);
    eventually(10, "rows waiting for Redis", async || {
        let v = gw.get("/readyz", None).await.json();
        (v["ledger_buffered"].as_i64() > Some(0)).then_some(())
    })
    .await;
    let budget = Duration::from_secs(BUDGET_SECS);
    let (code, elapsed, logs) =
        tokio::task::spawn_blocking(move || gw.terminate_within(budget + Duration::from_secs(20)))
            .await
            .unwrap();
    assert!(
        elapsed < budget + EXIT_MARGIN,
        "exited {elapsed:?} after SIGTERM, budget {budget:?}\n{logs}"
    );
    assert_eq!(code, Some(3), "exit status\n{logs}");
    assert!(logs.contains("they stay in the journal"), "{logs}");
    assert!(
        logs.contains("quota transitions were not confirmed"),
        "{logs}"
    );
}

/// With Redis up and a short call in flight, the shutdown ships everything
/// and exits 0 as soon as it has, not at the end of the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_everything_shipped_exits_0_at_once() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    let gw = one_tenant()
        .fake(&fake)
        .quota(1000, Per::Day)
        .redis(&redis)
        .set("server", "shutdown_grace = \"30s\"")
        .start()
        .await;
    fake.set_latency_ms(300);
    let task = miss_in_background(&gw, K1, "short at shutdown");
    eventually(10, "the request reaches upstream", async || {
        (fake.calls() == 1).then_some(())
    })
    .await;
    let (code, elapsed, logs) =
        tokio::task::spawn_blocking(move || gw.terminate_within(Duration::from_secs(40)))
            .await
            .unwrap();
    assert_eq!(task.await.unwrap(), 200);
    assert_eq!(code, Some(0), "exit status\n{logs}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}\n{logs}");
    // The answer's row and its quota settlement are in Redis.
    let quota: Option<i64> = redis::cmd("GET")
        .arg(format!("{{eg:search}}:quota:{}", today()))
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(quota, Some(1));
    let units: Option<i64> = redis::cmd("HGET")
        .arg(format!("{{eg:search}}:ledger:{}", today()))
        .arg(format!("{MODEL}|text|miss|units"))
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(units, Some(1), "{logs}");
}
