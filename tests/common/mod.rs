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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fake_dashscope::FakeState;
use http::HeaderMap;
use serde_json::Value;
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

// ---------- fake upstream ----------

/// The fake DashScope on a port of its own, in this process. Cloning shares it.
#[derive(Clone)]
pub struct Fake {
    pub state: Arc<FakeState>,
    pub addr: SocketAddr,
}

impl Fake {
    /// Starts a fake that accepts only [`UPSTREAM_KEY`].
    pub async fn start() -> Fake {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let state = fake_dashscope::start(l, Some(UPSTREAM_KEY.to_string()));
        Fake { state, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Embedding calls received (every attempt).
    pub fn calls(&self) -> u64 {
        self.state.calls()
    }

    /// Scripts the answers to the next embedding calls, one fault per call.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.push_faults(faults);
    }

    /// Latency added to every embedding answer from now on.
    pub fn set_latency_ms(&self, ms: u64) {
        self.state.latency_ms.store(ms, Ordering::SeqCst);
    }

    /// Units billed: Σ total_usage of the 200 answers given.
    pub fn billed_units(&self) -> u64 {
        self.state.billed_units.load(Ordering::SeqCst)
    }

    pub fn upload_policy_calls(&self) -> u64 {
        self.state.upload_policy_calls.load(Ordering::SeqCst)
    }

    pub fn oss_uploads(&self) -> u64 {
        self.state.oss_uploads.load(Ordering::SeqCst)
    }

    /// Bodies of every embedding call, in order.
    pub fn bodies(&self) -> Vec<Value> {
        self.state.bodies.lock().unwrap().clone()
    }

    /// Headers of every embedding call, in order.
    pub fn headers(&self) -> Vec<HeaderMap> {
        self.state.headers.lock().unwrap().clone()
    }

    pub fn last_body(&self) -> Option<Value> {
        self.state.last_body()
    }

    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.state.last_headers()
    }
}

// ---------- redis ----------

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
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

// ---------- gateway config and start-up ----------

/// A quota period (`quota = { units = N, per = "…" }`).
#[derive(Debug, Clone, Copy)]
pub enum Per {
    Day,
    Month,
}

impl Per {
    fn as_str(self) -> &'static str {
        match self {
            Per::Day => "day",
            Per::Month => "month",
        }
    }
}

#[derive(Clone)]
struct TenantSpec {
    name: String,
    key: String,
    /// TOML lines inside its `[[tenants]]` table.
    lines: Vec<String>,
}

/// Writes a gateway config and starts the binary on it. The config starts
/// as: `[server]` on 127.0.0.1:0 with a 10 s shutdown grace; `[upstream]` at
/// the fake, the key from the environment, a 10 s timeout and a 10 ms retry
/// backoff; `[admin]` with [`ADMIN_TOKEN`]; no tenants, memory cache.
///
/// `start` takes `&self`, so one builder starts replicas or restarts with
/// the same config; give those a shared `fake(&fake)`, otherwise each
/// `start` starts its own fake.
#[derive(Clone)]
pub struct GatewayBuilder {
    fake: Option<Fake>,
    upstream_url: Option<String>,
    /// Top-level tables in order, each with its `key = value` lines in order.
    sections: Vec<(String, Vec<(String, String)>)>,
    tenants: Vec<TenantSpec>,
}

impl GatewayBuilder {
    fn new() -> GatewayBuilder {
        GatewayBuilder {
            fake: None,
            upstream_url: None,
            sections: Vec::new(),
            tenants: Vec::new(),
        }
        .set("server", "listen = \"127.0.0.1:0\"")
        .set("server", "shutdown_grace = \"10s\"")
        .set("upstream", "api_key_env = \"EG_TEST_UPSTREAM_KEY\"")
        .set("upstream", "timeout = \"10s\"")
        .set("upstream", "retry_backoff = \"10ms\"")
        .set(
            "admin",
            format!("token_sha256 = \"{}\"", digest(ADMIN_TOKEN)),
        )
    }

    /// Uses this fake upstream instead of starting one per `start`.
    pub fn fake(mut self, fake: &Fake) -> Self {
        self.fake = Some(fake.clone());
        self
    }

    /// Points `upstream.base_url` elsewhere than at the fake.
    pub fn upstream_url(mut self, url: &str) -> Self {
        self.upstream_url = Some(url.to_string());
        self
    }

    /// Adds a tenant; `rate`, `quota` and `tenant_toml` apply to the last one added.
    pub fn tenant(mut self, name: &str, key: &str) -> Self {
        self.tenants.push(TenantSpec {
            name: name.to_string(),
            key: key.to_string(),
            lines: Vec::new(),
        });
        self
    }

    /// `rate = { per_second, burst }` for the last tenant.
    pub fn rate(self, per_second: f64, burst: u64) -> Self {
        self.tenant_toml(format!(
            "rate = {{ per_second = {per_second}, burst = {burst} }}"
        ))
    }

    /// `quota = { units, per }` for the last tenant.
    pub fn quota(self, units: u64, per: Per) -> Self {
        self.tenant_toml(format!(
            "quota = {{ units = {units}, per = \"{}\" }}",
            per.as_str()
        ))
    }

    /// A TOML line inside the last tenant's table, e.g. `workspace = "ws-9"`.
    pub fn tenant_toml(mut self, line: impl Into<String>) -> Self {
        let t = self
            .tenants
            .last_mut()
            .expect("tenant(name, key) before its settings");
        t.lines.push(line.into());
        self
    }

    /// `cache.redis_url` of this Redis (`None`: memory cache, no change).
    pub fn redis<'a>(self, redis: impl Into<Option<&'a Redis>>) -> Self {
        match redis.into() {
            Some(r) => self.set("cache", format!("redis_url = \"{}\"", r.url())),
            None => self,
        }
    }

    /// Sets `key = value` (one TOML line) in the top-level table `section`,
    /// replacing the key's value if the table has it already.
    pub fn set(mut self, section: &str, line: impl Into<String>) -> Self {
        let line = line.into();
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("set({section:?}, {line:?}): not `key = value`"));
        let (key, value) = (key.trim().to_string(), value.trim().to_string());
        let i = match self.sections.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let keys = &mut self.sections[i].1;
        match keys.iter_mut().find(|(k, _)| *k == key) {
            Some(kv) => kv.1 = value,
            None => keys.push((key, value)),
        }
        self
    }

    /// No `[admin]` table: the admin routes are off.
    pub fn no_admin(mut self) -> Self {
        self.sections.retain(|(s, _)| s != "admin");
        self
    }

    /// The config file's text, for the fake given with `fake(&fake)`.
    pub fn config(&self) -> String {
        let fake = self
            .fake
            .as_ref()
            .expect("config() needs the fake: call .fake(&fake) first");
        self.render(fake)
    }

    fn render(&self, fake: &Fake) -> String {
        let base_url = self.upstream_url.clone().unwrap_or_else(|| fake.url());
        let mut s = String::new();
        for (section, keys) in &self.sections {
            s.push_str(&format!("[{section}]\n"));
            if section == "upstream" {
                s.push_str(&format!("base_url = \"{base_url}\"\n"));
            }
            for (k, v) in keys {
                s.push_str(&format!("{k} = {v}\n"));
            }
            s.push('\n');
        }
        for t in &self.tenants {
            s.push_str(&format!(
                "[[tenants]]\nname = \"{}\"\nkey_sha256 = [\"{}\"]\n",
                t.name,
                digest(&t.key)
            ));
            for l in &t.lines {
                s.push_str(l);
                s.push('\n');
            }
            s.push('\n');
        }
        s
    }

    fn has(&self, section: &str, key: &str) -> bool {
        self.sections
            .iter()
            .any(|(s, keys)| s == section && keys.iter().any(|(k, _)| k == key))
    }

    /// Writes the config to a temp dir and starts the binary on it.
    pub async fn start(&self) -> TestGateway {
        let fake = match &self.fake {
            Some(f) => f.clone(),
            None => Fake::start().await,
        };
        let config = self.render(&fake);
        TestGateway::spawn(&config, fake, self.has("server", "metrics_listen"))
    }
}

/// The real `embedgate` binary, killed on drop.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// Where `/metrics` is served when `server.metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub child: Child,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
    pub stderr_path: PathBuf,
    pub client: reqwest::Client,
    /// The upstream this gateway calls.
    pub fake: Fake,
}

impl TestGateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::new()
    }

    fn spawn(config: &str, fake: Fake, metrics_line: bool) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("embedgate.toml");
        std::fs::write(&path, config).unwrap();
        let stderr_path = dir.path().join("stderr.log");
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
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // The bound addresses, printed on stdout once listening.
        let mut read = |prefix: &str, suffix: &str| -> SocketAddr {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            line.trim()
                .strip_prefix(prefix)
                .and_then(|l| l.strip_suffix(suffix))
                .unwrap_or_else(|| {
                    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    panic!("gateway did not start: {line:?} (want {prefix}ADDR{suffix})\n{err}")
                })
                .parse()
                .unwrap()
        };
        let addr = read("embedgate listening on http://", "");
        let metrics_addr = metrics_line.then(|| read("embedgate metrics on http://", "/metrics"));
        TestGateway {
            addr,
            metrics_addr,
            child,
            config_path: path,
            _dir: dir,
            stderr_path,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            fake,
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

    /// The `/metrics` text (from the metrics listener when there is one).
    pub async fn metrics(&self) -> String {
        match self.metrics_addr {
            None => self.get("/metrics", None).await.text,
            Some(a) => {
                let r = self
                    .client
                    .get(format!("http://{a}/metrics"))
                    .send()
                    .await
                    .unwrap();
                Reply::from(r).await.text
            }
        }
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

    /// Rewrites the config file with `builder`'s config for this gateway's fake.
    pub fn reconfigure(&self, builder: &GatewayBuilder) {
        self.rewrite_config(&builder.render(&self.fake));
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------- replies ----------

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

/// `output.embedding` of a success body.
pub fn embedding(v: &Value) -> &Vec<Value> {
    v["output"]["embedding"]
        .as_array()
        .unwrap_or_else(|| panic!("no output.embedding in {v}"))
}

/// Asserts a successful JSON answer (SPEC §1): 200, application/json, no
/// `code`, 1536 numbers. Returns the body.
pub fn assert_success(r: &Reply) -> Value {
    assert_eq!(r.status, 200, "{}", r.text);
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let v = r.json();
    assert!(
        v.get("code").is_none(),
        "success carries a code: {}",
        r.text
    );
    let e = embedding(&v);
    assert_eq!(e.len(), 1536);
    assert!(e.iter().all(Value::is_number));
    v
}

/// Asserts a DashScope-shaped error with this status and code: JSON with
/// `code`, a non-empty `message` and `request_id`. Returns the body.
pub fn assert_error(r: &Reply, status: u16, code: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.text);
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let v = r.json();
    assert_eq!(v["code"], code, "{}", r.text);
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
    assert!(
        v["request_id"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
    v
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

// ---------- metrics: the one Prometheus text parser ----------

/// One sample line of the Prometheus text format.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// `k="v",…}` (after the `{`): the labels, unescaped, and the rest of the line.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut chars = s.char_indices();
    loop {
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            if c == '}' && key.is_empty() {
                return Some((labels, &s[i + 1..]));
            }
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()?.1 {
                '\\' => match chars.next()?.1 {
                    'n' => val.push('\n'),
                    o => val.push(o),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        labels.insert(key, val);
        match chars.next()? {
            (_, ',') => {}
            (i, '}') => return Some((labels, &s[i + 1..])),
            _ => return None,
        }
    }
}

/// Every sample of a `/metrics` text; panics on a line it cannot read.
pub fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(i) => {
                let (labels, rest) =
                    parse_labels(&line[i + 1..]).unwrap_or_else(|| panic!("bad line {line:?}"));
                (&line[..i], labels, rest)
            }
            None => {
                let (n, rest) = line
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("bad line {line:?}"));
                (n, BTreeMap::new(), rest)
            }
        };
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("bad value in {line:?}"));
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// The value of the series `name{labels}` (exactly these labels, in any
/// order), or 0.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples(text)
        .into_iter()
        .filter(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
        .sum()
}

/// Σ of every series of `name`, whatever its labels.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    samples(text)
        .into_iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// Every series of `name`, keyed by its label values in `keys` order;
/// asserts each has exactly the label set `keys`.
pub fn series(text: &str, name: &str, keys: &[&str]) -> BTreeMap<Vec<String>, f64> {
    let want: std::collections::BTreeSet<&str> = keys.iter().copied().collect();
    let mut out = BTreeMap::new();
    for s in samples(text).into_iter().filter(|s| s.name == name) {
        let have: std::collections::BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
        assert_eq!(have, want, "{name} has labels {:?}", s.labels);
        let k: Vec<String> = keys.iter().map(|k| s.labels[*k].clone()).collect();
        assert!(
            out.insert(k, s.value).is_none(),
            "duplicate series of {name}"
        );
    }
    out
}
