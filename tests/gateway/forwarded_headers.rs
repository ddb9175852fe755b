//! Forwarded headers: the allow-list, the ones that change the answer in
//! the cache (and coalescing) key, bounded values.

use super::*;

use std::sync::Arc;

/// The same body with and without `name: enable`: two upstream calls, each
/// answer cached on its own; the value is normalised (case, whitespace) in
/// the key and sent upstream as keyed.
async fn header_is_part_of_the_cache_key(name: &str) {
    let gw = one_tenant().start().await;
    let b = body(&[
        ("text", "keyed by a header"),
        ("image", "https://example.com/h.png"),
    ]);

    let r = gw.embed(K1, &b).await;
    assert_success(&r);
    assert_eq!(r.cache(), "MISS");
    let r = gw.embed_with(K1, &b, &[(name, "enable")]).await;
    assert_success(&r);
    assert_eq!(
        r.cache(),
        "MISS",
        "{name} was answered from the entry without it"
    );
    assert_eq!(gw.fake.calls(), 2);
    let sent = gw.fake.headers();
    assert!(!sent[0].contains_key(name));
    assert_eq!(sent[1][name.to_ascii_lowercase().as_str()], "enable");

    // Each is now cached on its own; case and whitespace do not matter.
    for (value, what) in [
        (Some("enable"), "with"),
        (Some(" ENABLE "), "with, another spelling"),
        (None, "without"),
        (Some(""), "blank"),
    ] {
        let headers: Vec<(&str, &str)> = value.map(|v| (name, v)).into_iter().collect();
        let r = gw.embed_with(K1, &b, &headers).await;
        assert_success(&r);
        assert_eq!(r.cache(), "HIT", "{name} {what}");
    }
    assert_eq!(gw.fake.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_inspection_is_part_of_the_cache_key() {
    header_is_part_of_the_cache_key("X-DashScope-DataInspection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oss_resource_resolve_is_part_of_the_cache_key() {
    header_is_part_of_the_cache_key("X-DashScope-OssResourceResolve").await;
}

/// Coalescing uses the cache key: a request asking for inspection does not
/// wait for, and is not answered by, an identical one in flight without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_differing_in_data_inspection_are_not_coalesced() {
    let gw = Arc::new(one_tenant().start().await);
    gw.fake.set_latency_ms(500);
    let b = Arc::new(text_body("in flight, inspected or not"));
    let mut tasks = Vec::new();
    for inspect in [false, true, false, true] {
        let (gw, b) = (gw.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let h: &[(&str, &str)] = if inspect {
                &[("X-DashScope-DataInspection", "enable")]
            } else {
                &[]
            };
            gw.embed_with(K1, &b, h).await
        }));
    }
    for t in tasks {
        assert_success(&t.await.unwrap());
    }
    assert_eq!(gw.fake.calls(), 2, "one upstream call per header value");
    let inspected = gw
        .fake
        .headers()
        .iter()
        .filter(|h| h.contains_key("x-dashscope-datainspection"))
        .count();
    assert_eq!(inspected, 1);
}

/// The SDK's identification headers and `accept-language` are forwarded
/// but do not change the answer: one upstream call for all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identification_headers_share_one_cache_entry() {
    let gw = one_tenant().start().await;
    let b = text_body("whoever asks");
    let variants: [&[(&str, &str)]; 5] = [
        &[
            (
                "user-agent",
                "dashscope/2.0.2; python/3.11.7; platform/Linux",
            ),
            ("x-dashscope-sdk-client", "python-sdk/2.0.2/embeddings"),
            (
                "x-dashscope-sdk-session-id",
                "ca0cbd9c802e41629a50e9f74d3a8371",
            ),
            ("accept-language", "zh-CN"),
        ],
        &[],
        &[("user-agent", "dashscope-v2-python/2.0.2")],
        &[
            ("x-dashscope-sdk-client", "python-sdk/2.0.2/embeddings2"),
            ("x-dashscope-sdk-session-id", "0000"),
        ],
        &[("accept-language", "en-US")],
    ];
    for (i, h) in variants.iter().enumerate() {
        let r = gw.embed_with(K1, &b, h).await;
        assert_success(&r);
        assert_eq!(r.cache(), if i == 0 { "MISS" } else { "HIT" }, "#{i}");
    }
    assert_eq!(gw.fake.calls(), 1);
    let sent = gw.fake.last_headers().unwrap();
    assert_eq!(
        sent["user-agent"],
        "dashscope/2.0.2; python/3.11.7; platform/Linux"
    );
    assert_eq!(
        sent["x-dashscope-sdk-session-id"],
        "ca0cbd9c802e41629a50e9f74d3a8371"
    );
    assert_eq!(sent["accept-language"], "zh-CN");
}

/// A forwarded header over 1 KB, or given twice, is refused naming it and
/// nothing goes upstream; a header that is not forwarded is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_header_values_are_bounded() {
    let gw = one_tenant().uploads_rate(1000.0, 1000).start().await;
    let b = text_body("bounded headers");
    let huge = "a".repeat(60 * 1024);
    for name in [
        "X-DashScope-DataInspection",
        "X-DashScope-OssResourceResolve",
        "x-dashscope-sdk-client",
        "user-agent",
    ] {
        let r = gw.embed_with(K1, &b, &[(name, &huge)]).await;
        let v = assert_error(&r, 400, "InvalidParameter");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains(&name.to_ascii_lowercase()), "{msg}");
        assert!(msg.contains("1024 bytes"), "{msg}");
        let r = gw
            .get_with(
                &format!("/api/v1/uploads?action=getPolicy&model={MODEL}"),
                Some(K1),
                &[(name, &huge)],
            )
            .await;
        assert_error(&r, 400, "InvalidParameter");
    }
    let r = gw
        .embed_with(
            K1,
            &b,
            &[
                ("X-DashScope-DataInspection", "enable"),
                ("X-DashScope-DataInspection", "disable"),
            ],
        )
        .await;
    let v = assert_error(&r, 400, "InvalidParameter");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("x-dashscope-datainspection"));
    assert_eq!(gw.fake.calls(), 0);
    assert_eq!(gw.fake.upload_policy_calls(), 0);

    // 1 KB exactly is accepted; an unlisted X-DashScope-* header of any
    // size is dropped, not forwarded.
    let kb = "s".repeat(1024);
    let r = gw
        .embed_with(
            K1,
            &b,
            &[
                ("x-dashscope-sdk-session-id", &kb),
                ("X-DashScope-Padding", &huge),
            ],
        )
        .await;
    assert_success(&r);
    let sent = gw.fake.last_headers().unwrap();
    assert_eq!(sent["x-dashscope-sdk-session-id"], kb.as_str());
    assert!(!sent.contains_key("x-dashscope-padding"));
    assert_eq!(gw.fake.calls(), 1);
}
