//! SSE answers for a miss, a hit and an error.

use super::*;

use serde_json::Value;

/// The JSON on the `data:` line of an SSE answer, and its event name.
fn sse_event(r: &Reply) -> (String, Value) {
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/event-stream"),
        "content-type {ct:?}: {}",
        r.text
    );
    let event = r
        .text
        .lines()
        .find_map(|l| l.strip_prefix("event:"))
        .unwrap_or_else(|| panic!("no event: line in {:?}", r.text))
        .trim()
        .to_string();
    let data = r
        .text
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .unwrap_or_else(|| panic!("no data: line in {:?}", r.text));
    let v: Value =
        serde_json::from_str(data.trim()).unwrap_or_else(|e| panic!("data not JSON ({e}): {data}"));
    (event, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_for_miss_hit_and_error() {
    let gw = one_tenant().start().await;
    for (i, header) in [
        ("X-DashScope-SSE", "enable"),
        ("Accept", "text/event-stream"),
    ]
    .into_iter()
    .enumerate()
    {
        let b = text_body(&format!("sse {i}"));
        let miss = gw.embed_with(K1, &b, &[header]).await;
        assert_eq!(miss.status, 200, "{header:?}: {}", miss.text);
        assert_eq!(miss.cache(), "MISS");
        let (event, v) = sse_event(&miss);
        assert_eq!(event, "result", "{header:?}");
        assert_eq!(embedding(&v).len(), 1536);
        assert!(v.get("code").is_none());

        let hit = gw.embed_with(K1, &b, &[header]).await;
        assert_eq!(hit.status, 200, "{header:?}: {}", hit.text);
        assert_eq!(hit.cache(), "HIT");
        let (event, vh) = sse_event(&hit);
        assert_eq!(event, "result");
        assert_eq!(vh["output"]["embedding"], v["output"]["embedding"]);
        assert_eq!(vh["usage"]["total_usage"], 1);
        assert_eq!(gw.fake.calls(), i as u64 + 1);
    }

    let r = gw
        .embed_with(
            "sk-wrong",
            &text_body("sse err"),
            &[("X-DashScope-SSE", "enable")],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text);
    let (event, v) = sse_event(&r);
    assert_eq!(event, "error");
    assert_eq!(v["code"], "InvalidApiKey");
    assert_eq!(gw.fake.calls(), 2);
}
