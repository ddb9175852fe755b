//! Unit quotas: exact sequential spending, audio at its weight.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_sequential_text_is_exact() {
    let gw = TestGateway::builder()
        .tenant("q", "kq")
        .quota(10, Per::Day)
        .start()
        .await;
    let mut replies = Vec::new();
    for i in 0..12 {
        replies.push(gw.embed("kq", &text_body(&format!("quota {i}"))).await);
    }
    let mut want = vec![200; 10];
    want.extend([429; 2]);
    assert_eq!(statuses(&replies), want);
    let remaining: Vec<u64> = replies[..10]
        .iter()
        .map(|r| {
            assert_eq!(r.cache(), "MISS");
            num_header(r, "x-quota-remaining").expect("X-Quota-Remaining")
        })
        .collect();
    assert_eq!(remaining, (0..10).rev().collect::<Vec<u64>>());
    for r in &replies[10..] {
        assert_quota_refusal(r);
    }
    assert_eq!(gw.fake.calls(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_counts_audio_at_its_weight() {
    let gw = TestGateway::builder()
        .tenant("a", "ka")
        .quota(5, Per::Day)
        .start()
        .await;
    let audio = |n: u32| body(&[("audio", &format!("https://example.com/a{n}.flac"))]);
    let r1 = gw.embed("ka", &audio(1)).await;
    assert_eq!(r1.status, 200, "{}", r1.text);
    assert_eq!(r1.json()["usage"]["total_usage"], 2);
    assert_eq!(num_header(&r1, "x-quota-remaining"), Some(3));
    let r2 = gw.embed("ka", &audio(2)).await;
    assert_eq!(r2.status, 200, "{}", r2.text);
    assert_eq!(num_header(&r2, "x-quota-remaining"), Some(1));
    // Needs 2, 1 left.
    let r3 = gw.embed("ka", &audio(3)).await;
    assert_quota_refusal(&r3);
    // One text unit still fits.
    let r4 = gw.embed("ka", &text_body("fits")).await;
    assert_eq!(r4.status, 200, "{}", r4.text);
    assert_eq!(num_header(&r4, "x-quota-remaining"), Some(0));
    assert_quota_refusal(&gw.embed("ka", &text_body("does not fit")).await);
    assert_eq!(gw.fake.calls(), 3);
}
