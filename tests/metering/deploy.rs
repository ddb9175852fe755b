//! Deploy files: the dashboard queries the contract's metrics, the deploy
//! files agree with each other (deploy/check_deploy.py), the compose config
//! is valid.

use std::path::PathBuf;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_metrics_exist_and_compose_config_is_valid() {
    let dash_path = repo().join("deploy/grafana/dashboards/embedgate.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&dash_path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", dash_path.display()));
    assert!(dash.is_object(), "dashboard is not a JSON object");

    let out = std::process::Command::new("python3")
        .arg(repo().join("deploy/check_dashboard.py"))
        .arg(&dash_path)
        .output()
        .expect("python3 is needed for deploy/check_dashboard.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    for needed in [
        "embedgate_usage_units_total",
        "embedgate_requests_total",
        "embedgate_request_duration_seconds",
    ] {
        assert!(
            names.iter().any(|n| n == needed),
            "dashboard does not use {needed}"
        );
    }

    // Every dashboard query (and alert rule) returning data on a real
    // Prometheus scraping the gateway: tests/operating/dashboard.rs.

    // The deploy files agree: two Redis (cache evicting, state persistent),
    // the gateway configs point at them, the shutdown budget fits the
    // platform's grace period; the ConfigMap's config is valid.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("python3")
        .arg(repo().join("deploy/check_deploy.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    match out.status.code() {
        Some(3) => println!(
            "note: deploy/check_deploy.py skipped: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        _ => {
            assert!(
                out.status.success(),
                "deploy/check_deploy.py:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let toml = dir.path().join("k8s-embedgate.toml");
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_embedgate"))
                .arg("check-config")
                .arg(&toml)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "the ConfigMap's embedgate.toml: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // docker compose config, when a compose tool is installed.
    let tools: [&[&str]; 2] = [&["docker", "compose"], &["docker-compose"]];
    let tool = tools.into_iter().find(|t| {
        std::process::Command::new(t[0])
            .args(&t[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    match tool {
        None => println!(
            "note: neither `docker compose` nor `docker-compose` works; compose check skipped"
        ),
        Some(t) => {
            let out = std::process::Command::new(t[0])
                .args(&t[1..])
                .args(["-f", "deploy/compose.yaml", "config"])
                .current_dir(repo())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{} config failed: {}",
                t.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
