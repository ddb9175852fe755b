//! The command line: `hash-key`, and start-up refusing a bad config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut child = embedgate()
        .arg("--config")
        .arg(&path)
        .env("EMBEDGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let api = lines.next().unwrap().unwrap();
    let metrics = lines.next().unwrap().unwrap();
    let api = api
        .strip_prefix("embedgate listening on ")
        .unwrap()
        .to_string();
    let metrics = metrics
        .strip_prefix("embedgate metrics on ")
        .unwrap()
        .to_string();
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
    let _ = child.kill();
    let _ = child.wait();
}
