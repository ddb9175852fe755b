//! One tenant cannot hurt the others with its input (issue 8): item count,
//! nesting, string lengths and body size are bounded, each refusal is
//! precise, nothing is forwarded or metered.

use super::*;

/// The ledger's rows for today, all tenants.
async fn ledger_rows(gw: &TestGateway) -> Vec<serde_json::Value> {
    let d = today();
    let r = gw
        .get(&format!("/admin/usage?from={d}&to={d}"), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["rows"].as_array().unwrap().clone()
}

fn items(n: usize, item: &str) -> String {
    let contents = vec![item; n].join(",");
    format!(
        r#"{{"model":"{MODEL}","input":{{"contents":[{contents}]}},"parameters":{{"auto_truncation":true}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_inputs_get_a_precise_400_and_nothing_is_forwarded_or_metered() {
    let gw = one_tenant().start().await;
    let m = MODEL;
    let cases: Vec<(String, String)> = vec![
        // The reported attack: 65,000 one-letter items in 845 KB.
        (
            items(65_000, r#"{"text":"a"}"#),
            "input.contents has 65000 items, over the limit of 32".into(),
        ),
        (
            items(33, r#"{"image":"https://x/1.png"}"#),
            "input.contents has 33 items, over the limit of 32".into(),
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}}]}},"parameters":{{"x":{}1{}}}}}"#,
                "[".repeat(50_000),
                "]".repeat(50_000)
            ),
            "request body nests deeper than the limit of 32 levels (at byte ".into(),
        ),
        (
            items(1, &format!(r#"{{"text":"{}"}}"#, "x".repeat(20_000))),
            "input.contents[0].text is 20000 bytes, over the limit of 16384".into(),
        ),
        (
            items(
                2,
                &format!(r#"{{"audio":"https://x/{}"}}"#, "a".repeat(9_000)),
            ),
            "input.contents[0].audio is 9010 bytes, over the limit of 8192".into(),
        ),
        (
            format!(
                r#"{{"model":"{}","input":{{"contents":[{{"text":"a"}}]}}}}"#,
                "m".repeat(500_000)
            ),
            "model is 500000 bytes, over the limit of 128".into(),
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}}]}},"parameters":{{"p":"{}"}}}}"#,
                "p".repeat(100_000)
            ),
            "parameters is 100008 bytes of JSON, over the limit of 4096".into(),
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"}}]}},"junk":[{}0]}}"#,
                "0,".repeat(100_000)
            ),
            "junk is 200003 bytes of JSON, over the limit of 4096".into(),
        ),
        (
            format!(
                r#"{{"model":"{m}","input":{{"contents":[{{"text":"a"{}}}]}}}}"#,
                (0..50_000)
                    .map(|i| format!(r#","k{i}":1"#))
                    .collect::<String>()
            ),
            "input.contents[0] has 50001 fields, over the limit of 16".into(),
        ),
    ];
    for (body, want) in &cases {
        assert!(body.len() < 1024 * 1024, "{want}: {} bytes", body.len());
        let r = gw.embed(K1, body).await;
        let v = assert_error(&r, 400, "InvalidParameter");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.starts_with(want.as_str()),
            "message {msg:?}, want {want:?}"
        );
        assert!(msg.len() < 200, "a refusal stays small: {msg}");
        assert_eq!(r.header("x-should-retry"), Some("false"));
    }
    assert_eq!(gw.fake.calls(), 0, "nothing may be forwarded");
    let metrics = gw.metrics().await;
    assert_eq!(metric_sum(&metrics, "embedgate_usage_units_total"), 0.0);
    assert_eq!(metric_sum(&metrics, "embedgate_items_total"), 0.0);
    assert_eq!(
        metric(
            &metrics,
            "embedgate_requests_total",
            &[
                ("tenant", "search"),
                ("cache", "none"),
                ("code", "InvalidParameter")
            ]
        ),
        cases.len() as f64
    );
    assert_eq!(ledger_rows(&gw).await, Vec::<serde_json::Value>::new());

    // The limits themselves are fine: 32 items, each at its longest.
    let text = format!(r#"{{"text":"{}"}}"#, "t".repeat(16 * 1024));
    let url = format!(r#"{{"image":"https://x/{}"}}"#, "u".repeat(8 * 1024 - 10));
    let mut full: Vec<&str> = vec![&text; 16];
    full.extend(vec![url.as_str(); 16]);
    let body = format!(
        r#"{{"model":"{m}","input":{{"contents":[{}]}},"parameters":{{"auto_truncation":true}}}}"#,
        full.join(",")
    );
    assert_success(&gw.embed(K1, &body).await);
    assert_eq!(gw.fake.calls(), 1);
    assert_eq!(gw.fake.billed_units(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_item_limit_is_configurable() {
    let gw = one_tenant().set("upstream", "max_items = 2").start().await;
    let r = gw.embed(K1, &items(3, r#"{"text":"a"}"#)).await;
    let v = assert_error(&r, 400, "InvalidParameter");
    assert_eq!(
        v["message"],
        "input.contents has 3 items, over the limit of 2"
    );
    assert_success(&gw.embed(K1, &items(2, r#"{"text":"a"}"#)).await);
    assert_eq!(gw.fake.calls(), 1);
}
