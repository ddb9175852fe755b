//! Test harness: the real `embedgate` binary on port 0 with a temp config,
//! the fake DashScope (the `fake-dashscope` crate, in-process) that counts
//! calls, and a real `redis-server` on a free port. Tests talk to the binary
//! only: nothing here uses the `embedgate` library. Nothing here sleeps to
//! wait for state: it polls with a deadline.
//!
//! ```ignore
//! let gw = TestGateway::builder()
//!     .tenant("q", "kq")
//!     .quota(3, Per::Day)
//!     .redis(&redis)
//!     .set("limits", "quota_counts_hits = true")
//!     .start()
//!     .await;
//! assert_eq!(gw.embed("kq", &text_body("a")).await.status, 200);
//! assert_eq!(gw.fake.calls(), 1);
//! ```
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

mod bodies;
mod builder;
mod fake;
mod gateway;
mod metrics;
mod redis_server;
mod reply;
mod sdk;

// Not every test binary uses every part.
#[allow(unused_imports)]
pub use self::{
    bodies::*, builder::*, fake::*, gateway::*, metrics::*, redis_server::*, reply::*, sdk::*,
};

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

pub use fake_dashscope::Fault;

pub const EMBED_PATH: &str =
    "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding";
pub const MODEL: &str = "multimodal-embedding-one-peace-v1";
/// The company key the gateway reads from its environment; the fake accepts only it.
pub const UPSTREAM_KEY: &str = "sk-company-upstream-key";
/// The admin token of every config the builder writes (unless `no_admin()`).
pub const ADMIN_TOKEN: &str = "admin-secret-token";

/// SHA-256 of `key` in lowercase hex, as `key_sha256` / `token_sha256` hold it.
pub fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Today's date in UTC, `YYYY-MM-DD`, computed here, independently of the
/// gateway's own date code (Howard Hinnant's civil_from_days).
pub fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Polls `f` until it returns Some, or panics after `secs`.
pub async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
