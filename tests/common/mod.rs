//! Test harness: the real `embedgate` binary on port 0 with a temp config,
//! an in-process fake DashScope that counts calls, and a real `redis-server`
//! on a free port. Nothing here sleeps to wait for state: it polls with a
//! deadline.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use embedgate::fake_dashscope::{self, FakeState};
use embedgate::secret::Digest;
use serde_json::Value;

pub const EMBED_PATH: &str =
    "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding";
pub const MODEL: &str = "multimodal-embedding-one-peace-v1";
/// The company key the gateway reads from its environment; the fake accepts only it.
pub const UPSTREAM_KEY: &str = "sk-company-upstream-key";

pub fn digest(key: &str) -> String {
    Digest::of(key.as_bytes()).to_hex()
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

// ---------- fake upstream ----------

pub struct Fake {
    pub state: Arc<FakeState>,
    pub addr: SocketAddr,
}

impl Fake {
    pub async fn start() -> Fake {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let state = fake_dashscope::start(l, Some(UPSTREAM_KEY.to_string()));
        Fake { state, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> u64 {
        self.state.calls()
    }
}

// ---------- redis ----------

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                // Durable across kill/restart, so an outage loses nothing.
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                self.dir.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ping().is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn ping(&self) -> redis::RedisResult<()> {
        let c = redis::Client::open(self.url())?;
        let mut conn = c.get_connection_with_timeout(Duration::from_millis(200))?;
        redis::cmd("PING").query::<String>(&mut conn).map(|_| ())
    }

    /// A synchronous connection for assertions.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Kills the server (SIGKILL; the append-only file keeps the data).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, with its data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------- gateway ----------

pub struct Tenant<'a> {
    pub name: &'a str,
    pub key: &'a str,
    /// Extra TOML lines inside `[[tenants]]`, e.g. `rate = { … }`.
    pub extra: &'a str,
}

/// A config for the fake upstream. `extra` is appended verbatim (sections).
pub fn config(fake: &Fake, redis: Option<&Redis>, tenants: &[Tenant<'_>], extra: &str) -> String {
    let mut s = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n\n[upstream]\nbase_url = \"{}\"\napi_key_env = \"EG_TEST_UPSTREAM_KEY\"\ntimeout = \"10s\"\nretry_backoff = \"10ms\"\n\n",
        fake.url()
    );
    if let Some(r) = redis {
        s.push_str(&format!("[cache]\nredis_url = \"{}\"\n\n", r.url()));
    }
    s.push_str(&format!(
        "[admin]\ntoken_sha256 = \"{}\"\n\n",
        digest(ADMIN_TOKEN)
    ));
    for t in tenants {
        s.push_str(&format!(
            "[[tenants]]\nname = \"{}\"\nkey_sha256 = [\"{}\"]\n{}\n\n",
            t.name,
            digest(t.key),
            t.extra
        ));
    }
    s.push_str(extra);
    s
}

pub const ADMIN_TOKEN: &str = "admin-secret-token";

pub struct Gateway {
    pub addr: SocketAddr,
    pub child: Child,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
    pub stderr_path: PathBuf,
    pub client: reqwest::Client,
}

impl Gateway {
    pub fn start(config: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("embedgate.toml");
        std::fs::write(&path, config).unwrap();
        Self::start_at(dir, path)
    }

    fn start_at(dir: tempfile::TempDir, path: PathBuf) -> Gateway {
        let stderr_path = dir.path().join(format!("stderr-{}.log", free_port()));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_embedgate"))
            .arg("--config")
            .arg(&path)
            .env("EG_TEST_UPSTREAM_KEY", UPSTREAM_KEY)
            .env("EMBEDGATE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("embedgate listening on http://")
            .unwrap_or_else(|| {
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("gateway did not start: {line:?}\n{err}")
            })
            .parse()
            .unwrap();
        Gateway {
            addr,
            child,
            config_path: path,
            _dir: dir,
            stderr_path,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// POSTs an embedding request body with a tenant key.
    pub async fn embed(&self, key: &str, body: &str) -> Reply {
        self.embed_with(key, body, &[]).await
    }

    pub async fn embed_with(&self, key: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self
            .client
            .post(self.url(EMBED_PATH))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Reply {
        let mut req = self.client.get(self.url(path));
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        Reply::from(req.send().await.unwrap()).await
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics", None).await.text
    }

    /// Sends a signal (`TERM`, `HUP`) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM, then waits for exit; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the config file (picked up by the file watch or SIGHUP).
    pub fn rewrite_config(&self, config: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, config).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    async fn from(r: reqwest::Response) -> Reply {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        Reply {
            status,
            headers,
            text,
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_string()
    }
}

// ---------- request bodies ----------

/// A body with one text item.
pub fn text_body(text: &str) -> String {
    serde_json::json!({"model": MODEL, "input": {"contents": [{"text": text}]}, "parameters": {}})
        .to_string()
}

/// A body from a list of (modality, content) pairs.
pub fn body(items: &[(&str, &str)]) -> String {
    let contents: Vec<Value> = items
        .iter()
        .map(|(m, c)| serde_json::json!({ *m: *c }))
        .collect();
    serde_json::json!({"model": MODEL, "input": {"contents": contents}, "parameters": {}})
        .to_string()
}

// ---------- metrics ----------

/// The value of the series `name{labels}` (labels in any order), or 0.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<(String, String)> = rest
            .split("\",")
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((k.to_string(), v.trim_matches('"').to_string()))
            })
            .collect();
        if labels
            .iter()
            .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
            && have.len() == labels.len()
        {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}
