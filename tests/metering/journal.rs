//! The journal (SPEC §4–5): every metered answer is on disk before its
//! response is sent, so `kill -9` loses nothing, with Redis and without;
//! a restart on the same journal ships it exactly once. A journal directory
//! belongs to one process; reports read their own writes.

use super::*;

use std::collections::BTreeMap;
use std::sync::Arc;

/// `n` answers of both tenants, 16 at a time: misses, and hits of them.
/// Every one must be a 200; the tally gets them all.
async fn burst(gw: TestGateway, tally: &mut Tally, tag: &str, n: usize) -> TestGateway {
    let gw = Arc::new(gw);
    let mut sent = 0;
    while sent < n {
        let mut set = tokio::task::JoinSet::new();
        for i in sent..(sent + 16).min(n) {
            let tenant = if i % 2 == 0 { "alpha" } else { "beta" };
            // Every third request repeats an earlier body: a hit (or a
            // coalesced miss).
            let b = mixed_body(
                &format!("{tag}-{tenant}"),
                if i % 3 == 2 { i / 2 } else { i },
            );
            let gw = gw.clone();
            set.spawn(async move { (tenant, gw.embed(key_of(tenant), &b).await) });
        }
        while let Some(r) = set.join_next().await {
            let (tenant, r) = r.unwrap();
            assert_eq!(r.status, 200, "{}", r.text);
            tally.add(tenant, &r);
        }
        sent = (sent + 16).min(n);
    }
    Arc::try_unwrap(gw).ok().unwrap()
}

/// The `.jnl` segments in a journal directory.
fn segments(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jnl"))
        .collect()
}

fn total_units(cells: &Cells) -> u64 {
    cells.values().map(|(_, u)| u).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_without_redis() {
    let data = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    let cfg = alpha_beta().fake(&fake).data_dir(data.path());
    let config = data.path().join("embedgate.toml");
    std::fs::write(&config, cfg.config()).unwrap();

    let gw = cfg.start().await;
    let mut tally = Tally::default();
    let gw = burst(gw, &mut tally, "k9", 200).await;
    // Straight after the last answer: no shutdown, nothing flushed.
    gw.kill();
    assert!(!segments(&data.path().join("journal")).is_empty());

    // Before the restart the CLI reads SQLite and says that a journal is
    // waiting.
    let d = today();
    let (code, out, err) = cli(&config, data.path(), &["--from", &d, "--to", &d]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("journal segment"), "{err}");
    let before = total_units(&rows_cells(&serde_json::from_str(&out).unwrap()));
    assert!(before <= total_units(&tally.cells), "{before}");

    // The restart ships what the crash left, exactly once.
    let gw = cfg.start().await;
    assert_eq!(ledger(&gw, None).await, tally.cells, "ledger after kill -9");
    assert_eq!(tally.units("miss"), gw.fake.billed_units());
    assert_eq!(
        tally.requests.values().sum::<u64>(),
        200,
        "{:?}",
        tally.requests
    );
    // Shipped: the old run's segments are gone; only the new one's is left.
    assert_eq!(segments(&data.path().join("journal")).len(), 1);
    let (code, out, err) = cli(&config, data.path(), &["--from", &d, "--to", &d]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("journal segment"), "{err}");
    assert_eq!(
        rows_cells(&serde_json::from_str(&out).unwrap()),
        tally.cells
    );

    // A clean stop ships everything and leaves no segment behind; the next
    // start reports the same from SQLite.
    assert_eq!(gw.terminate(), Some(0));
    assert!(segments(&data.path().join("journal")).is_empty());
    let gw = cfg.start().await;
    assert_eq!(
        ledger(&gw, None).await,
        tally.cells,
        "ledger after a clean stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_with_redis() {
    let redis = Redis::start();
    let data = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    let cfg = alpha_beta().fake(&fake).redis(&redis).data_dir(data.path());
    let gw = cfg.start().await;
    let mut tally = Tally::default();
    let gw = burst(gw, &mut tally, "k9r", 200).await;
    // Part of it is in Redis already (shipped every 50 ms), the rest only in
    // the journal: the restart must add the rest and nothing twice.
    gw.kill();
    // What reached Redis before the kill (for the log: the split varies).
    let mut conn = redis.conn();
    let shipped: u64 = ["alpha", "beta"]
        .iter()
        .map(|t| {
            let h: BTreeMap<String, u64> = redis::cmd("HGETALL")
                .arg(format!("{{eg:{t}}}:ledger:{}", today()))
                .query(&mut conn)
                .unwrap();
            h.iter()
                .filter(|(k, _)| k.ends_with("|units"))
                .map(|(_, v)| v)
                .sum::<u64>()
        })
        .sum();
    println!(
        "in Redis before the restart: {shipped} of {} units",
        total_units(&tally.cells)
    );
    let gw = cfg.start().await;
    assert_eq!(ledger(&gw, None).await, tally.cells, "ledger after kill -9");
    assert_eq!(tally.units("miss"), gw.fake.billed_units());
    assert_eq!(tally.requests.values().sum::<u64>(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_redis_is_down_loses_nothing() {
    let mut redis = Redis::start();
    let data = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    let cfg = alpha_beta().fake(&fake).redis(&redis).data_dir(data.path());
    let gw = cfg.start().await;
    let mut tally = Tally::default();
    let gw = burst(gw, &mut tally, "up", 40).await;
    ledger_settles(&gw, &tally.cells, "ledger before the outage").await;

    // Nothing of these can reach Redis before the crash.
    redis.kill();
    let gw = burst(gw, &mut tally, "down", 100).await;
    gw.kill();
    redis.restart();
    let gw = cfg.start().await;
    ledger_settles(&gw, &tally.cells, "ledger after kill -9 and Redis back").await;
    assert_eq!(tally.units("miss"), gw.fake.billed_units());
    assert_eq!(tally.requests.values().sum::<u64>(), 140);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_directory_belongs_to_one_process() {
    let data = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    let cfg = alpha_beta().fake(&fake).data_dir(data.path());
    let first = cfg.start().await;
    let err = cfg.try_start().await.err().unwrap();
    assert!(
        err.contains("is in use by another embedgate process")
            && err.contains(&format!("pid {}", first.child.id())),
        "{err}"
    );
    // The lock goes with the process, also when it is killed.
    first.kill();
    let gw = cfg.start().await;
    assert_eq!(gw.embed(ALPHA_KEY, &text_body("mine")).await.status, 200);
    let r = gw.get("/readyz", None).await.json();
    assert_eq!(r["journal"], "ok", "{r}");
}

/// A report right after a burst has every answer the replica gave, with
/// Redis and without; also with the journal switched off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_read_their_own_writes() {
    let redis = Redis::start();
    for (what, cfg) in [
        ("sqlite", alpha_beta()),
        ("redis", alpha_beta().redis(&redis)),
        ("no journal", alpha_beta().set("ledger", "journal = false")),
    ] {
        let gw = cfg.start().await;
        let mut tally = Tally::default();
        let gw = burst(gw, &mut tally, what, 48).await;
        // No polling: the first report after the last answer.
        assert_eq!(ledger(&gw, None).await, tally.cells, "{what}");
        assert_eq!(
            csv_cells(&ledger_csv(&gw, None).await),
            tally.cells,
            "{what}"
        );
        let journal = gw.get("/readyz", None).await.json()["journal"].clone();
        let want = if what == "no journal" { "off" } else { "ok" };
        assert_eq!(journal, want, "{what}");
    }
}
