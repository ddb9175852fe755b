//! Persistence across restarts: Redis keeps the cache, memory does not.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_survives_a_restart() {
    let fake = Fake::start().await;
    let redis = Redis::start();
    let cfg = one_tenant().fake(&fake).redis(&redis);
    let b = mixed_body();
    let first = {
        let gw = cfg.start().await;
        let r = gw.embed(K1, &b).await;
        let v = assert_success(&r);
        assert_eq!(r.cache(), "MISS");
        // The Redis write is in the background: wait for it.
        let mut conn = redis.conn();
        eventually(10, "cache entry in Redis", async || {
            // Whatever the key layout: some string value holding the vector.
            let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).ok()?;
            keys.iter()
                .any(|k| {
                    redis::cmd("GET")
                        .arg(k)
                        .query::<Option<Vec<u8>>>(&mut conn)
                        .ok()
                        .flatten()
                        .is_some_and(|v| v.len() > 1536)
                })
                .then_some(())
        })
        .await;
        v
    };
    assert_eq!(fake.calls(), 1);
    let gw = cfg.start().await;
    let r = gw.embed(K1, &b).await;
    let v = assert_success(&r);
    assert_eq!(
        r.cache(),
        "HIT",
        "the Redis entry should survive a gateway restart"
    );
    assert_eq!(fake.calls(), 1);
    assert_eq!(v["output"]["embedding"], first["output"]["embedding"]);
    assert_eq!(v["usage"]["total_usage"], 6);
    let ready = gw.get("/readyz", None).await;
    assert_eq!(ready.json()["redis"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cache_is_lost_on_restart() {
    let fake = Fake::start().await;
    let cfg = one_tenant().fake(&fake);
    let b = text_body("ephemeral");
    {
        let gw = cfg.start().await;
        assert_eq!(gw.embed(K1, &b).await.cache(), "MISS");
        assert_eq!(gw.embed(K1, &b).await.cache(), "HIT");
    }
    assert_eq!(fake.calls(), 1);
    let gw = cfg.start().await;
    let r = gw.embed(K1, &b).await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    assert_eq!(fake.calls(), 2);
    let ready = gw.get("/readyz", None).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["redis"], "not_configured");
}
