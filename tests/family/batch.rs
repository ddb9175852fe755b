//! Batch tasks: ownership per tenant, usage metered once.

use super::*;

const ASYNC: [(&str, &str); 1] = [("x-dashscope-async", "enable")];

async fn submit(gw: &TestGateway, key: &str, url: &str) -> String {
    let body = json!({"model": "text-embedding-async-v2", "input": {"url": url}, "parameters": {"text_type": "document"}});
    let r = post(gw, TEXT_PATH, key, &body, &ASYNC).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        gw.fake.state.task_headers.lock().unwrap().last().unwrap()["x-dashscope-async"],
        "enable"
    );
    r.json()["output"]["task_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_belong_to_their_tenant_and_are_metered_once() {
    let gw = two_tenants().start().await;
    let url = "https://example.com/texts.txt";
    let id = submit(&gw, K1, url).await;
    let poll = |key: &'static str| {
        let gw = &gw;
        let id = id.clone();
        async move { gw.get(&format!("/api/v1/tasks/{id}"), Some(key)).await }
    };
    // Another tenant cannot see it, and its poll never reaches upstream.
    let polls_before = gw.fake.state.task_polls.load(Ordering::SeqCst);
    let r = poll(K2).await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(
        gw.fake.state.task_polls.load(Ordering::SeqCst),
        polls_before
    );

    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = poll(K1).await;
        assert_eq!(r.status, 200, "{}", r.text);
        statuses.push(
            r.json()["output"]["task_status"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(statuses, ["RUNNING", "SUCCEEDED", "SUCCEEDED", "SUCCEEDED"]);
    let tokens = fake_dashscope::batch_tokens(url) as f64;
    let m = gw.metrics().await;
    assert_eq!(
        units(&m, "search", "text-embedding-async-v2", "text", "miss"),
        tokens,
        "metered once"
    );
    assert_eq!(
        units(&m, "ads", "text-embedding-async-v2", "text", "miss"),
        0.0
    );

    // The list shows each tenant its own tasks only.
    let other = submit(&gw, K2, "https://example.com/other.txt").await;
    let mine = gw
        .get("/api/v1/tasks?page_no=1&page_size=10", Some(K1))
        .await;
    assert_eq!(mine.status, 200, "{}", mine.text);
    let ids: Vec<String> = mine.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&id));
    // Cancel: only the owner; upstream decides the rest.
    let cancel = |key: &'static str, id: String| {
        let gw = &gw;
        async move {
            let r = gw
                .client
                .post(gw.url(&format!("/api/v1/tasks/{id}/cancel")))
                .header("authorization", format!("Bearer {key}"))
                .send()
                .await
                .unwrap();
            Reply::from_response(r).await
        }
    };
    assert_eq!(cancel(K1, other.clone()).await.status, 404);
    let r = cancel(K2, other).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // A sync model with the async header is refused before upstream.
    let r = post(
        &gw,
        TEXT_PATH,
        K1,
        &json!({"model": "text-embedding-v4", "input": {"url": url}}),
        &ASYNC,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_usage_is_metered_once_across_a_restart() {
    let redis = Redis::start();
    let builder = two_tenants().redis(&redis);
    let gw = builder.start().await;
    let id = submit(&gw, K1, "https://example.com/restart.txt").await;
    for _ in 0..2 {
        assert_eq!(
            gw.get(&format!("/api/v1/tasks/{id}"), Some(K1))
                .await
                .status,
            200
        );
    }
    let fake = gw.fake.clone();
    gw.terminate();
    let gw = builder.clone().fake(&fake).start().await;
    for _ in 0..2 {
        let r = gw.get(&format!("/api/v1/tasks/{id}"), Some(K1)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["output"]["task_status"], "SUCCEEDED");
    }
    let m = gw.metrics().await;
    assert_eq!(
        units(&m, "search", "text-embedding-async-v2", "text", "miss"),
        0.0,
        "not metered again after the restart"
    );
    // The ledger holds it once.
    let report = eventually(10, "ledger", async || {
        let r = gw
            .get(
                &format!("/admin/usage?from={0}&to={0}&format=json", today()),
                Some(ADMIN_TOKEN),
            )
            .await;
        (r.status == 200).then_some(r.text)
    })
    .await;
    let tokens = fake_dashscope::batch_tokens("https://example.com/restart.txt");
    assert!(report.contains(&tokens.to_string()), "{report}");
}
