//! The command line: `hash-key`, `check-config`, start-up refusing a bad
//! config, the metrics listener, and no test double in the product.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::*;

use std::io::Write;
use std::process::{Command, Stdio};

fn embedgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_embedgate"))
}

fn hash_key(input: &str) -> (bool, String, String) {
    let mut child = embedgate()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn hash_key_prints_the_sha256_of_stdin() {
    let foo = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n";
    assert_eq!(hash_key("foo"), (true, foo.to_string(), String::new()));
    // A trailing newline from `echo` is not part of the key.
    assert_eq!(hash_key("foo\n").1, foo);
    assert_eq!(hash_key("foo\r\n").1, foo);
    // Inner whitespace is.
    assert_ne!(hash_key("foo bar").1, foo);
    let (ok, out, err) = hash_key("");
    assert!(
        !ok && out.is_empty() && err.contains("no key on stdin"),
        "{err}"
    );
}

#[test]
fn start_refuses_a_bad_config_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[cache]\nttl = \"forever\"\nscope = \"team\"\n\n[upstrem]\nbase_url = \"x\"\n",
    )
    .unwrap();
    let out = embedgate().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    for want in [
        "line 5: cache.ttl: `forever` is not a duration",
        "line 6: cache.scope: must be \"tenant\" or \"shared\"",
        "line 8: upstrem: unknown key",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    // It never started listening.
    assert!(String::from_utf8(out.stdout).unwrap().is_empty());
}

#[test]
fn a_missing_config_file_is_an_error() {
    let out = embedgate()
        .args(["--config", "/nonexistent/embedgate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("cannot read"));
}

/// `server.metrics_listen`: `/metrics` moves to its own listener (printed on
/// the second stdout line) and leaves the API port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_have_their_own_listener() {
    // The harness reads both stdout lines: `embedgate listening on
    // http://ADDR`, then `embedgate metrics on http://ADDR/metrics`.
    let gw = TestGateway::builder()
        .set("server", "metrics_listen = \"127.0.0.1:0\"")
        .start()
        .await;
    let api = format!("http://{}", gw.addr);
    let metrics = format!("http://{}/metrics", gw.metrics_addr.unwrap());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let m = client.get(&metrics).send().await.unwrap();
    assert_eq!(m.status(), 200);
    assert!(m.text().await.unwrap().contains("embedgate_build_info"));
    let on_api = client.get(format!("{api}/metrics")).send().await.unwrap();
    assert_eq!(on_api.status(), 404);
    // Health is on both; the API is not on the metrics port.
    assert_eq!(
        client
            .get(format!("{api}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let base = metrics.trim_end_matches("/metrics");
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let api_on_metrics = client
        .post(format!(
            "{base}/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
        ))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(api_on_metrics.status(), 404);
}

/// The test double is not in the product: `fake-dashscope` is its own crate
/// and binary, not an `embedgate` subcommand.
#[test]
fn fake_dashscope_is_not_an_embedgate_subcommand() {
    let out = embedgate().arg("fake-dashscope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("unrecognized subcommand 'fake-dashscope'"),
        "{err}"
    );
    assert!(String::from_utf8(out.stdout).unwrap().is_empty());
}

// ---------- check-config ----------

fn check_config(src: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("embedgate.toml");
    std::fs::write(&path, src).unwrap();
    let out = embedgate().arg("check-config").arg(&path).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The stderr line naming `line N: key:`.
fn error_line<'a>(stderr: &'a str, line: usize, key: &str) -> &'a str {
    let want = format!("line {line}: {key}:");
    stderr
        .lines()
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no `{want}` in stderr:\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_a_valid_file() {
    let fake = Fake::start().await;
    let src = TestGateway::builder()
        .fake(&fake)
        .tenant("a", "ka")
        .rate(0.001, 5)
        .quota(10, Per::Day)
        .set("limits", "quota_on_store_error = \"deny\"")
        .set("limits", "quota_counts_hits = true")
        .config();
    let (code, out, err) = check_config(&src);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
}

/// Bad values only: every one is listed.
#[test]
fn check_config_lists_every_bad_value() {
    let src = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"soon\"\n\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"xyz\"]\nrate = {{ per_second = -1, burst = 5 }}\n\n[[tenants]]\nname = \"b\"\nkey_sha256 = [\"{}\"]\n",
        digest("kb")
    );
    let (code, _, err) = check_config(&src);
    assert_eq!(code, Some(2), "stderr: {err}");
    error_line(&err, 3, "server.shutdown_grace");
    error_line(&err, 7, "tenants[0].key_sha256[0]");
    error_line(&err, 8, "tenants[0].rate.per_second");
}

/// An unknown key together with bad values: all of them are listed.
#[test]
fn check_config_lists_unknown_key_with_the_other_errors() {
    let src = "[server]\nlisten = \"127.0.0.1:0\"\nlisen = \"127.0.0.1:1\"\nshutdown_grace = \"soon\"\n\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"xyz\"]\n";
    let (code, _, err) = check_config(src);
    assert_eq!(code, Some(2), "stderr: {err}");
    let unknown = err
        .lines()
        .find(|l| l.contains("line 3:"))
        .unwrap_or_else(|| panic!("no `line 3:` in stderr:\n{err}"));
    assert!(unknown.contains("lisen"), "{unknown}");
    error_line(&err, 4, "server.shutdown_grace");
    error_line(&err, 8, "tenants[0].key_sha256[0]");
}

/// `embedgate usage` reads a SQLite ledger written before the ledger had a
/// model (without changing it): its rows are ONE-PEACE's, `--model` filters
/// by model.
#[tokio::test]
async fn usage_reads_a_sqlite_ledger_from_before_models() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = TestGateway::builder()
        .fake(&fake)
        .tenant("a", "ka")
        .data_dir(dir.path())
        .config();
    let config = dir.path().join("embedgate.toml");
    std::fs::write(&config, src).unwrap();
    let day = today();
    {
        let db = rusqlite::Connection::open(dir.path().join("ledger.sqlite")).unwrap();
        db.execute_batch(
            "CREATE TABLE usage (tenant TEXT NOT NULL, day TEXT NOT NULL, field TEXT NOT NULL,
               value INTEGER NOT NULL, PRIMARY KEY (tenant, day, field)) WITHOUT ROWID;
             CREATE TABLE applied (run TEXT NOT NULL, tenant TEXT NOT NULL, day TEXT NOT NULL,
               last_row INTEGER NOT NULL, updated INTEGER NOT NULL,
               PRIMARY KEY (run, tenant, day)) WITHOUT ROWID;
             PRAGMA user_version = 1;",
        )
        .unwrap();
        for (f, v) in [
            ("text|miss|items", 4),
            ("text|miss|units", 4),
            ("requests|miss", 3),
        ] {
            db.execute(
                "INSERT INTO usage VALUES ('a', ?1, ?2, ?3)",
                rusqlite::params![day, f, v],
            )
            .unwrap();
        }
    }
    let usage = |extra: &[&str]| {
        let out = embedgate()
            .arg("usage")
            .arg("--config")
            .arg(&config)
            .args(["--from", &day, "--to", &day, "--format", "csv"])
            .args(extra)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let header = "tenant,day,modality,cache,items,units,computed_units,upstream_units,model,cost\n";
    assert_eq!(
        usage(&[]),
        format!("{header}a,{day},text,miss,4,4,0,0,{MODEL},\n")
    );
    assert_eq!(usage(&["--model", MODEL]), usage(&[]));
    assert_eq!(usage(&["--model", "text-embedding-v4"]), header);
    assert_eq!(
        usage(&["--view", "totals"]),
        format!("tenant,model,requests,items,units,hit_units,miss_units,unknown_units,cost,miss_cost\na,{MODEL},3,4,4,0,4,0,,\n")
    );
    // Read as it was: not migrated by a report.
    let db = rusqlite::Connection::open(dir.path().join("ledger.sqlite")).unwrap();
    let cols: i64 = db
        .query_row(
            "SELECT count(*) FROM pragma_table_info('usage') WHERE name = 'model'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(cols, 0);
}
