//! Operating embedgate: the alert rules (`promtool check rules` and the
//! rules' unit tests), and the Grafana dashboard and the rules evaluated by
//! a real Prometheus server scraping the real gateway.
//!
//! Needs `promtool` and `prometheus` (Debian package `prometheus`; the
//! tests fail without them unless `EMBEDGATE_SKIP_PROMETHEUS=1`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "../common/mod.rs"]
mod common;
use common::*;

use std::path::{Path, PathBuf};

mod dashboard;
mod prometheus;
mod rules;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The path of `tool` on `PATH`; `None` when the test should be skipped
/// (`EMBEDGATE_SKIP_PROMETHEUS=1`); panics with how to install it otherwise.
fn tool(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| is_executable(p))
    });
    if found.is_some() {
        return found;
    }
    if std::env::var("EMBEDGATE_SKIP_PROMETHEUS").as_deref() == Ok("1") {
        println!("note: {tool} not found; skipped (EMBEDGATE_SKIP_PROMETHEUS=1)");
        return None;
    }
    panic!(
        "{tool} not found on PATH: install the Debian package `prometheus` \
         (apt-get install prometheus; scripts/test.sh does it), \
         or set EMBEDGATE_SKIP_PROMETHEUS=1 to skip this test"
    );
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
