//! Graceful shutdown: SIGTERM finishes requests in flight.

use super::*;

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
