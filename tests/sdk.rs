//! End to end with the official `dashscope` Python SDK (pinned in
//! scripts/sdk-venv.sh) pointed at the real gateway binary, which forwards
//! to the in-process fake DashScope. The venv is made once under the cargo
//! target dir. Without PyPI this test fails, unless `EMBEDGATE_SKIP_SDK=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::*;

use std::path::Path;

use serde_json::{json, Value};

const TENANT_KEY: &str = "sk-tenant-sdk-test";

/// Runs tests/sdk/drive_sdk.py with `cases`; returns its JSON lines by case.
async fn drive(py: &Path, gw: &TestGateway, tmp: &Path, cases: &[&str]) -> Vec<Value> {
    let mut cmd = sdk_command(py, "drive_sdk.py");
    cmd.args(cases)
        .env("GATEWAY", gw.url("/api/v1"))
        .env("DASHSCOPE_HTTP_BASE_URL", gw.url("/api/v1"))
        .env("TENANT_KEY", TENANT_KEY)
        .env("SDK_TMPDIR", tmp);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("cannot run the venv python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}")))
        .collect();
    for l in &lines {
        println!("sdk: {l}");
    }
    let ctx = || {
        format!(
            "stdout:\n{stdout}\nstderr:\n{stderr}\ngateway log:\n{}",
            gw.logs()
        )
    };
    assert!(out.status.success(), "drive_sdk.py failed\n{}", ctx());
    assert_eq!(
        lines.len(),
        cases.len(),
        "one line per case expected\n{}",
        ctx()
    );
    for (l, case) in lines.iter().zip(cases) {
        assert_eq!(l["case"], *case);
        assert_eq!(
            l["ok"],
            true,
            "case {case} raised:\n{}\n{}",
            l["error"].as_str().unwrap_or(""),
            ctx()
        );
    }
    lines
}

/// A 1.x or 2.x success: 200, a 1536-float embedding, `usage` as given.
fn assert_sdk_success(l: &Value, usage: &Value, cache: &str) {
    let case = &l["case"];
    assert_eq!(l["status_code"], 200, "case {case}: {l}");
    assert!(l["code"].is_null() || l["code"] == "", "case {case}: {l}");
    assert_eq!(l["embedding_len"], 1536, "case {case}: {l}");
    assert_eq!(&l["usage"], usage, "case {case}: usage");
    assert!(
        !l["request_id"].as_str().unwrap_or("").is_empty(),
        "case {case}: no request_id: {l}"
    );
    assert_eq!(l["headers"]["x-cache"], cache, "case {case}: X-Cache: {l}");
    let ct = l["headers"]["content-type"].as_str().unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "case {case}: content-type {ct:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdk_through_gateway() {
    let Some(py) = sdk_python_or_skip().await else {
        return;
    };
    let gw = TestGateway::builder()
        .tenant("sdk", TENANT_KEY)
        .start()
        .await;
    let fake = &gw.fake;
    let tmp = tempfile::tempdir().unwrap();
    let calls = || fake.calls();

    let image_only = json!({"image": {"measure": 1, "weight": 1}, "total_usage": 1});
    let image_audio = json!({"image": {"measure": 1, "weight": 1}, "audio": {"measure": 1, "weight": 2}, "total_usage": 3});
    let all_three = json!({"text": {"measure": 1, "weight": 1}, "image": {"measure": 1, "weight": 1}, "audio": {"measure": 1, "weight": 2}, "total_usage": 4});

    // (a) image, (b) image+audio, (c) text+audio+image with factors; then (c)
    // again as plain dicts with factors 1.0/"2"/"3": the same cache key.
    let r = drive(&py, &gw, tmp.path(), &["a", "b", "c", "c_mixed"]).await;
    assert_sdk_success(&r[0], &image_only, "MISS");
    assert_sdk_success(&r[1], &image_audio, "MISS");
    assert_sdk_success(&r[2], &all_three, "MISS");
    assert_sdk_success(&r[3], &all_three, "HIT");
    assert_eq!(calls(), 3, "c_mixed must be a cache hit");
    let bodies = fake.bodies();
    // The gateway may normalise the body (e.g. add the default factor).
    assert_eq!(bodies[0]["input"]["contents"].as_array().unwrap().len(), 1);
    assert_eq!(
        bodies[0]["input"]["contents"][0]["image"],
        "https://dashscope.oss-cn-beijing.aliyuncs.com/images/256_1.png"
    );
    assert_eq!(
        bodies[0]["parameters"]["auto_truncation"], true,
        "auto_truncation must reach upstream"
    );
    let factors: Vec<f64> = bodies[2]["input"]["contents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["factor"]
                .as_f64()
                .or_else(|| i["factor"].as_str()?.parse().ok())
                .unwrap()
        })
        .collect();
    assert_eq!(factors, [1.0, 2.0, 3.0], "factors upstream: {}", bodies[2]);

    // (d) file://: the SDK fetches the upload policy through the gateway,
    // uploads to the fake OSS itself, then sends oss:// with the resolve header.
    let r = drive(&py, &gw, tmp.path(), &["d"]).await;
    assert_sdk_success(&r[0], &image_only, "MISS");
    assert_eq!(fake.upload_policy_calls(), 1);
    assert_eq!(fake.oss_uploads(), 1);
    assert_eq!(calls(), 4);
    let sent = r[0]["sent"].as_str().unwrap();
    assert!(
        sent.starts_with("oss://dashscope-instant/fake/"),
        "SDK sent {sent}"
    );
    let body = fake.last_body().unwrap();
    assert_eq!(
        body["input"]["contents"][0]["image"], sent,
        "upstream got {body}"
    );
    let h = fake.last_headers().unwrap();
    assert_eq!(
        h.get("x-dashscope-ossresourceresolve")
            .map(|v| v.to_str().unwrap()),
        Some("enable"),
        "the resolve header must reach upstream: {h:?}"
    );

    // (e) (a) again from a fresh process: served from cache. (f) a bad key.
    let r = drive(&py, &gw, tmp.path(), &["e", "f"]).await;
    assert_sdk_success(&r[0], &image_only, "HIT");
    let f = &r[1];
    assert_eq!(f["status_code"], 401, "{f}");
    assert_eq!(f["code"], "InvalidApiKey", "{f}");
    assert!(!f["message"].as_str().unwrap_or("").is_empty(), "{f}");
    assert_eq!(calls(), 4, "neither a hit nor a bad key may reach upstream");

    // (g) the 2.x client: success, the (c) request again (hit across SDK
    // generations), a factor of 0 and a bad key raising the right classes.
    let r = drive(
        &py,
        &gw,
        tmp.path(),
        &["g_text", "g_c", "g_factor0", "g_badkey"],
    )
    .await;
    assert_sdk_success(
        &r[0],
        &json!({"text": {"measure": 1, "weight": 1}, "total_usage": 1}),
        "MISS",
    );
    assert_eq!(r[0]["embeddings"], 1);
    assert_sdk_success(&r[1], &all_three, "HIT");
    let e = &r[2];
    assert_eq!(e["exception"], "BadRequestError", "{e}");
    assert_eq!(e["status_code"], 400, "{e}");
    assert_eq!(e["code"], "InvalidParameter", "{e}");
    assert!(
        e["message"].as_str().unwrap_or("").contains("factor"),
        "message should name the field: {e}"
    );
    assert_eq!(e["headers"]["x-should-retry"], "false", "{e}");
    let e = &r[3];
    assert_eq!(e["exception"], "AuthenticationError", "{e}");
    assert_eq!(e["status_code"], 401, "{e}");
    assert_eq!(e["code"], "InvalidApiKey", "{e}");
    assert_eq!(e["headers"]["x-should-retry"], "false", "{e}");
    assert_eq!(calls(), 5, "only g_text may reach upstream");
    assert_eq!(
        fake.last_body().unwrap()["input"]["contents"][0]["text"],
        "hi"
    );

    // (g) 2.x file:// upload: certificate from the client's base_url.
    let r = drive(&py, &gw, tmp.path(), &["g_file"]).await;
    assert_sdk_success(&r[0], &image_only, "MISS");
    assert_eq!(fake.upload_policy_calls(), 2);
    assert_eq!(fake.oss_uploads(), 2);
    assert_eq!(calls(), 6);
    let h = fake.last_headers().unwrap();
    assert_eq!(
        h.get("x-dashscope-ossresourceresolve")
            .map(|v| v.to_str().unwrap()),
        Some("enable")
    );

    // (h) the aiohttp client (needs Content-Type: application/json).
    let r = drive(&py, &gw, tmp.path(), &["h"]).await;
    assert_sdk_success(
        &r[0],
        &json!({"text": {"measure": 1, "weight": 1}, "total_usage": 1}),
        "MISS",
    );
    assert_eq!(calls(), 7);

    // Upstream only ever saw the company key, never a tenant's.
    for h in fake.headers().iter() {
        let auth = h
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(
            auth.as_deref(),
            Some(&*format!("Bearer {UPSTREAM_KEY}")),
            "{h:?}"
        );
    }
    // Every upstream body with an oss:// content carried the resolve header.
    let bodies = fake.bodies();
    let headers = fake.headers();
    let mut oss = 0;
    for (b, h) in bodies.iter().zip(&headers) {
        if b.to_string().contains("oss://") {
            oss += 1;
            assert_eq!(
                h.get("x-dashscope-ossresourceresolve").unwrap(),
                "enable",
                "{b}"
            );
        }
    }
    assert_eq!(oss, 2);
}

/// A body over `server.max_body_bytes` is answered 413 while the client is
/// still sending it; real Python clients must read that answer, not a broken
/// pipe or a connection reset (the gateway drains the rest of the body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_read_the_413_while_still_sending() {
    let Some(py) = sdk_python_or_skip().await else {
        return;
    };
    let gw = TestGateway::builder()
        .tenant("sdk", TENANT_KEY)
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        "too_large_requests",
        "too_large_http_client",
        "too_large_sdk",
    ];
    let lines = drive(&py, &gw, tmp.path(), &cases).await;
    for l in &lines {
        assert_eq!(l["errors"], json!([]), "{l}");
        assert_eq!(l["got_413"], l["tries"], "{l}");
    }
    assert_eq!(gw.fake.calls(), 0);
}
