//! Upstream attempts whose outcome is unknown (sent, then dropped or timed
//! out): counted, recorded in the ledger as `unknown`, spent from quota.

use super::*;

use fake_dashscope::Fault;

/// The `unknown` ledger cells of `tenant`, as (modality) -> (items, units).
async fn unknown_cells(gw: &TestGateway, tenant: &str) -> BTreeMap<String, (u64, u64)> {
    ledger(gw, Some(tenant))
        .await
        .into_iter()
        .filter(|((_, _, cache), _)| cache == "unknown")
        .map(|((_, m, _), v)| (m, v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_broken_off_is_recorded_as_unknown_and_spends_quota() {
    let gw = alpha().quota(100, Per::Day).start().await;
    // The first attempt is received and its answer broken off mid-body;
    // the retry succeeds.
    gw.fake.push_faults([Fault::CutBody]);
    let r = gw
        .embed(
            ALPHA_KEY,
            &items_body(&[
                ("text", "t".into(), None),
                ("audio", "https://a/x.flac".into(), None),
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(gw.fake.calls(), 2);
    // Billed 3 units (text 1 + audio 2) for the answer; the dropped attempt
    // may have cost 3 more: quota spends both.
    assert_eq!(r.header("x-quota-remaining"), Some("94"));
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_upstream_unknown_outcome_total",
            &[("tenant", "alpha")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "embedgate_unknown_outcome_units_total",
            &[("tenant", "alpha"), ("model", MODEL)]
        ),
        3.0
    );
    // The answer's own units stay what upstream billed.
    assert_eq!(
        metric(
            &m,
            "embedgate_usage_units_total",
            &[
                ("tenant", "alpha"),
                ("model", MODEL),
                ("modality", "audio"),
                ("cache", "miss")
            ]
        ),
        2.0
    );
    let want: BTreeMap<String, (u64, u64)> =
        [("audio".to_string(), (1, 2)), ("text".to_string(), (1, 1))]
            .into_iter()
            .collect();
    let got = eventually(10, "unknown rows in the ledger", async || {
        let cells = unknown_cells(&gw, "alpha").await;
        (cells == want).then_some(cells)
    })
    .await;
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_is_unknown_not_released() {
    let gw = alpha()
        .quota(100, Per::Day)
        .set("upstream", "timeout = \"500ms\"")
        .set("upstream", "max_retries = 0")
        .start()
        .await;
    gw.fake.push_faults([Fault::Delay(Duration::from_secs(3))]);
    let r = gw
        .embed(ALPHA_KEY, &items_body(&[("text", "slow".into(), None)]))
        .await;
    assert_error(&r, 504, "GatewayTimeout");
    // The unit is spent, not given back: upstream may have billed it.
    assert_eq!(r.header("x-quota-remaining"), Some("99"));
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "embedgate_upstream_unknown_outcome_total",
            &[("tenant", "alpha")]
        ),
        1.0
    );
    assert_eq!(metric_sum(&m, "embedgate_usage_units_total"), 0.0);
    let want: BTreeMap<String, (u64, u64)> = [("text".to_string(), (1, 1))].into_iter().collect();
    eventually(10, "the unknown row in the ledger", async || {
        (unknown_cells(&gw, "alpha").await == want).then_some(())
    })
    .await;
    // A refused request's quota still comes back (nothing was sent).
    gw.fake
        .push_faults([Fault::Status(400, "InvalidParameter")]);
    let r = gw
        .embed(ALPHA_KEY, &items_body(&[("text", "refused".into(), None)]))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-quota-remaining"), Some("99"));
}
