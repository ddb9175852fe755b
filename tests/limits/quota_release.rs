//! Failed upstream calls release their quota.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upstream_calls_release_quota() {
    let gw = TestGateway::builder()
        .tenant("q", "kq")
        .quota(3, Per::Day)
        .start()
        .await;
    gw.fake.push_faults([
        Fault::Status(400, "InvalidURL"),
        Fault::Status(400, "InvalidURL"),
    ]);
    for i in 0..2 {
        let r = gw.embed("kq", &text_body(&format!("bad {i}"))).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.code(), "InvalidURL");
    }
    assert_eq!(gw.fake.calls(), 2);
    for i in 0..3 {
        let r = gw.embed("kq", &text_body(&format!("good {i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(num_header(&r, "x-quota-remaining"), Some(2 - i));
    }
    assert_quota_refusal(&gw.embed("kq", &text_body("over")).await);
    assert_eq!(gw.fake.calls(), 5);
}
