//! The official Python SDKs (`dashscope`, `openai`; pinned in
//! scripts/sdk-venv.sh) in a venv made once under the cargo target dir, and
//! a clean command line to run a driver script with.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes (once; scripts/sdk-venv.sh locks) the venv and returns its python,
/// or None when it cannot be made and `EMBEDGATE_SKIP_SDK=1`.
pub fn sdk_python() -> Result<Option<PathBuf>, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let out = Command::new("bash")
        .arg(root.join("scripts/sdk-venv.sh"))
        .arg(&venv)
        .output()
        .expect("cannot run bash scripts/sdk-venv.sh");
    if out.status.success() {
        let py = String::from_utf8(out.stdout).unwrap();
        return Ok(Some(PathBuf::from(py.trim())));
    }
    let why = format!(
        "could not install the dashscope and openai SDKs into {} (needs python3-venv and PyPI):\n{}",
        venv.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::var("EMBEDGATE_SKIP_SDK").as_deref() == Ok("1") {
        eprintln!("SKIPPED (EMBEDGATE_SKIP_SDK=1): {why}");
        return Ok(None);
    }
    Err(format!(
        "{why}\nSet EMBEDGATE_SKIP_SDK=1 to skip this test where PyPI is unreachable."
    ))
}

/// The venv's python (made on a blocking thread), or None when skipped.
pub async fn sdk_python_or_skip() -> Option<PathBuf> {
    let setup = tokio::task::spawn_blocking(sdk_python).await.unwrap();
    setup.unwrap_or_else(|e| panic!("{e}"))
}

/// `py tests/sdk/<script>`, UTF-8 output, with no proxy and no SDK setting
/// from this process's environment (the caller sets what the driver reads).
pub fn sdk_command(py: &Path, script: &str) -> Command {
    let mut cmd = Command::new(py);
    cmd.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/sdk")
            .join(script),
    )
    .env("PYTHONIOENCODING", "utf-8");
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "DASHSCOPE_API_KEY",
        "DASHSCOPE_BASE_URL",
        "DASHSCOPE_HTTP_BASE_URL",
        "DASHSCOPE_API_REGION",
        "DASHSCOPE_MAX_RETRIES",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
    ] {
        cmd.env_remove(v);
    }
    cmd
}
