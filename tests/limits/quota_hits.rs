//! Cache hits and quota: free by default, spent with `quota_counts_hits`.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_do_not_spend_quota_by_default() {
    let gw = TestGateway::builder()
        .tenant("q", "kq")
        .quota(3, Per::Day)
        .start()
        .await;
    for t in ["a", "b", "c"] {
        let r = gw.embed("kq", &text_body(t)).await;
        assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    }
    assert_quota_refusal(&gw.embed("kq", &text_body("d")).await);
    for t in ["a", "b", "c", "a"] {
        let r = gw.embed("kq", &text_body(t)).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    }
    assert_eq!(gw.fake.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_spend_quota_with_quota_counts_hits() {
    let gw = TestGateway::builder()
        .tenant("q", "kq")
        .quota(3, Per::Day)
        .set("limits", "quota_counts_hits = true")
        .start()
        .await;
    let r = gw.embed("kq", &text_body("a")).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    assert_eq!(num_header(&r, "x-quota-remaining"), Some(2));
    let r = gw.embed("kq", &text_body("a")).await;
    assert_eq!((r.status, r.cache()), (200, "HIT"), "{}", r.text);
    assert_eq!(num_header(&r, "x-quota-remaining"), Some(1));
    let r = gw.embed("kq", &text_body("b")).await;
    assert_eq!((r.status, r.cache()), (200, "MISS"), "{}", r.text);
    assert_eq!(num_header(&r, "x-quota-remaining"), Some(0));
    // Quota spent: a hit is refused too.
    assert_quota_refusal(&gw.embed("kq", &text_body("a")).await);
    assert_quota_refusal(&gw.embed("kq", &text_body("c")).await);
    assert_eq!(gw.fake.calls(), 2);
}
