//! A real `prometheus` server in a temp dir, scraping one target every
//! second and evaluating deploy/prometheus/alerts.yml; killed on drop.

use super::*;

use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub(crate) struct Prometheus {
    child: Child,
    pub(crate) url: String,
    dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl Prometheus {
    /// Starts `bin` scraping `target` (host:port, `/metrics`) as job
    /// `embedgate`, and waits until it is ready.
    pub(crate) async fn start(bin: &Path, target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = repo().join("deploy/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: embedgate\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: ['{target}']\n",
            rules = rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        };
        let ready = format!("{}/-/ready", p.url);
        eventually(60, "prometheus ready", async || {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            let r = p.client.get(&ready).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        p
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `/api/v1/{path}` with query parameters: the `data` of a
    /// success, or the error Prometheus gave.
    pub(crate) async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let r = self
            .client
            .get(format!("{}/api/v1/{path}", self.url))
            .query(params)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        match v["status"].as_str() {
            Some("success") => Ok(v["data"].clone()),
            _ => Err(format!("{}: {}", v["errorType"], v["error"])),
        }
    }

    /// An instant query now: its result vector (or an error).
    pub(crate) async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a query that returns one sample (`sum(…)`), if it does.
    pub(crate) async fn scalar(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).await.ok()?;
        let [one] = result.as_slice() else {
            return None;
        };
        one["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
