//! Cache-Control: no-cache and no-store.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_control_no_cache_and_no_store() {
    let gw = one_tenant().start().await;

    // no-cache on a cached entry: a fresh call.
    let a = text_body("cc-a");
    assert_eq!(gw.embed(K1, &a).await.cache(), "MISS");
    assert_eq!(gw.embed(K1, &a).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 1);
    let r = gw
        .embed_with(K1, &a, &[("cache-control", "no-cache")])
        .await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 2);
    assert_eq!(gw.embed(K1, &a).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 2);

    // no-cache on a new entry stores the result.
    let b = text_body("cc-b");
    let r = gw
        .embed_with(K1, &b, &[("Cache-Control", "no-cache")])
        .await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 3);
    assert_eq!(gw.embed(K1, &b).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 3);

    // no-store keeps the result out.
    let c = text_body("cc-c");
    let r = gw
        .embed_with(K1, &c, &[("cache-control", "no-store")])
        .await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(gw.fake.calls(), 4);
    let r = gw.embed(K1, &c).await;
    assert_eq!(r.cache(), "MISS", "no-store result was cached");
    assert_eq!(gw.fake.calls(), 5);
    assert_eq!(gw.embed(K1, &c).await.cache(), "HIT");
    assert_eq!(gw.fake.calls(), 5);
}
