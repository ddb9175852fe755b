//! Gateway config: the builder that writes it and starts the binary on it.

use super::{digest, Fake, Redis, TestGateway, ADMIN_TOKEN};

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
/// backoff; `[admin]` with [`ADMIN_TOKEN`]; no tenants, memory cache. Each
/// start runs in a fresh temp directory, so the default `[ledger]` paths
/// (journal, SQLite) are its own; `data_dir` keeps them across starts.
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
    /// Environment variables for the binary, besides the harness's own.
    env: Vec<(String, String)>,
    /// stderr to a pipe that nobody reads (see `stderr_unread`).
    stderr_unread: bool,
}

impl GatewayBuilder {
    pub(super) fn new() -> GatewayBuilder {
        GatewayBuilder {
            fake: None,
            upstream_url: None,
            sections: Vec::new(),
            tenants: Vec::new(),
            env: Vec::new(),
            stderr_unread: false,
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

    /// Adds a tenant; `rate`, `uploads_rate`, `quota` and `tenant_toml`
    /// apply to the last one added.
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

    /// `uploads_rate = { per_second, burst }` for the last tenant.
    pub fn uploads_rate(self, per_second: f64, burst: u64) -> Self {
        self.tenant_toml(format!(
            "uploads_rate = {{ per_second = {per_second}, burst = {burst} }}"
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

    /// `state.redis_url` of this Redis: rate buckets, quotas and the ledger
    /// there, the cache in `redis(…)`'s (or in memory).
    pub fn state_redis(self, redis: &Redis) -> Self {
        self.set("state", format!("redis_url = \"{}\"", redis.url()))
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

    /// Keeps the ledger's journal and SQLite database in `dir` (as
    /// `journal/` and `ledger.sqlite`), so a restart (or a replica) finds
    /// them; without it each start has its own.
    pub fn data_dir(self, dir: &std::path::Path) -> Self {
        let journal = dir.join("journal");
        let sqlite = dir.join("ledger.sqlite");
        self.set("ledger", format!("journal_dir = \"{}\"", journal.display()))
            .set("ledger", format!("sqlite_path = \"{}\"", sqlite.display()))
    }

    /// Sets an environment variable for the binary (e.g. `EMBEDGATE_LOG_QUEUE`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The binary's stderr goes to a pipe that the test holds open and
    /// never reads: once the pipe's buffer is full, every write to it
    /// blocks, like a log collector that stopped reading. `logs()` is then
    /// empty.
    pub fn stderr_unread(mut self) -> Self {
        self.stderr_unread = true;
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

    pub(super) fn render(&self, fake: &Fake) -> String {
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
        self.try_start().await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `start`, for a start that may fail: `Err` holds the reason and
    /// the binary's stderr.
    pub async fn try_start(&self) -> Result<TestGateway, String> {
        let fake = match &self.fake {
            Some(f) => f.clone(),
            None => Fake::start().await,
        };
        let config = self.render(&fake);
        TestGateway::spawn(
            &config,
            fake,
            self.has("server", "metrics_listen"),
            &self.env,
            self.stderr_unread,
        )
    }
}
