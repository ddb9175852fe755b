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
