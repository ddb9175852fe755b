//! Durability across a restart; the CLI report.

use super::*;

use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_survives_restart_and_cli_reports_it() {
    let redis = Redis::start();
    let fake = Fake::start().await;
    let cfg = alpha_beta().fake(&fake).redis(&redis);
    let gw = cfg.start().await;
    let mut tally = Tally::default();
    let old = misses_and_hits(&gw, &mut tally, "before", 7).await;
    // Stop right away: what is still buffered must be flushed on exit.
    assert_eq!(gw.terminate(), Some(0));

    let gw = cfg.start().await;
    assert_eq!(ledger(&gw, None).await, tally.cells, "ledger after restart");

    // More traffic adds to the same rows; old bodies are hits from Redis.
    for (i, b) in old.iter().enumerate() {
        let tenant = if i % 2 == 0 { "alpha" } else { "beta" };
        let r = send(&gw, &mut tally, tenant, key_of(tenant), b).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    misses_and_hits(&gw, &mut tally, "after", 4).await;
    ledger_settles(&gw, &tally.cells, "ledger == all responses").await;

    // The CLI reads the same rows from Redis.
    let admin: Value = gw
        .get(&usage_path(None, false), Some(ADMIN_TOKEN))
        .await
        .json();
    let cli: Value = serde_json::from_str(&cli_usage(&gw, &[]).await).unwrap();
    assert_eq!(cli, admin);
    assert_eq!(rows_cells(&cli), tally.cells);
    let csv = cli_usage(&gw, &["--format", "csv"]).await;
    assert_eq!(csv, ledger_csv(&gw, None).await);
    assert_eq!(csv_cells(&csv), tally.cells);
    let cli: Value = serde_json::from_str(&cli_usage(&gw, &["--tenant", "alpha"]).await).unwrap();
    assert_eq!(rows_cells(&cli), tally.only("alpha"));
    let csv = cli_usage(&gw, &["--tenant", "beta", "--format", "csv"]).await;
    assert_eq!(csv_cells(&csv), tally.only("beta"));
    assert_eq!(csv, ledger_csv(&gw, Some("beta")).await);
}
