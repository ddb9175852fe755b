//! The embedding family end to end: text, multimodal, compatible-mode and
//! batch routes against the real binary and the fake DashScope, with exact
//! upstream item counts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "../common/mod.rs"]
mod common;
use common::*;

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

mod batch;
mod compatible;
mod multimodal;
mod text;

const K1: &str = "sk-family-search-1";
const K2: &str = "sk-family-ads-2";
const TEXT_PATH: &str = "/api/v1/services/embeddings/text-embedding/text-embedding";
const COMPAT_PATH: &str = "/compatible-mode/v1/embeddings";

fn two_tenants() -> GatewayBuilder {
    TestGateway::builder()
        .tenant("search", K1)
        .tenant("ads", K2)
}

/// POSTs `body` to `path` with a tenant key and extra headers.
async fn post(
    gw: &TestGateway,
    path: &str,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = gw
        .client
        .post(gw.url(path))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Reply::from_response(req.send().await.unwrap()).await
}

/// Items the fake received in sync embedding calls so far.
fn items(gw: &TestGateway) -> u64 {
    gw.fake.state.items.load(Ordering::SeqCst)
}

/// The same body sent to the fake directly: upstream's own answer.
async fn upstream_answer(gw: &TestGateway, path: &str, body: &Value) -> Value {
    let r = gw
        .client
        .post(format!("{}{path}", gw.fake.url()))
        .header("authorization", format!("Bearer {UPSTREAM_KEY}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn units(m: &str, tenant: &str, model: &str, modality: &str, cache: &str) -> f64 {
    metric(
        m,
        "embedgate_usage_units_total",
        &[
            ("tenant", tenant),
            ("model", model),
            ("modality", modality),
            ("cache", cache),
        ],
    )
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a vector: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}
