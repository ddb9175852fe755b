//! Integration tests of the core gateway: HTTP against the real binary, a
//! fake DashScope that counts calls, and a real Redis where needed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "../common/mod.rs"]
mod common;
use common::*;

use serde_json::json;

mod auth_headers;
mod bad_inputs;
mod bounded_input;
mod cache_control;
mod cache_key;
mod client_hangup;
mod coalescing;
mod compression;
mod forwarded_headers;
mod hit_miss;
mod logs;
mod operational_routes;
mod overload;
mod persistence;
mod retries;
mod shutdown;
mod sse;
mod unknown_paths;
mod upload_policy;
mod upstream_errors;

const K1: &str = "sk-tenant-search-1";
const K2: &str = "sk-tenant-ads-2";

/// One tenant `search` (key `K1`), memory cache.
fn one_tenant() -> GatewayBuilder {
    TestGateway::builder().tenant("search", K1)
}

/// Tenants `search` (key `K1`) and `ads` (key `K2`).
fn two_tenants() -> GatewayBuilder {
    one_tenant().tenant("ads", K2)
}

fn mixed_body() -> String {
    json!({
        "model": MODEL,
        "input": {"contents": [
            {"text": "你好", "factor": 1},
            {"audio": "https://example.com/cow.flac", "factor": 2},
            {"image": "https://example.com/256_1.png", "factor": "3"},
            {"audio": "https://example.com/dog.flac"}
        ]},
        "parameters": {"auto_truncation": true}
    })
    .to_string()
}
