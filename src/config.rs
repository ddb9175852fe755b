//! TOML configuration: raw serde structs, checked against the known keys
//! (every unknown key is an error), turned by [`Config::parse`] into types
//! that cannot be invalid.
//!
//! Every error names the dotted key and, where the file has it, the line.
//! Semantic errors are collected, not returned one at a time, so an operator
//! fixes a file in one pass (`embedgate check-config`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::{Digest, Secret};

/// The one model this gateway exists for.
pub const ONE_PEACE_MODEL: &str = "multimodal-embedding-one-peace-v1";
/// ONE-PEACE answers 1536 float32 values; anything else is not an embedding.
const DEFAULT_EMBEDDING_DIMENSION: usize = 1536;
/// The SDK docstring's limit for one text item ("70 words", measured in characters).
const DEFAULT_MAX_TEXT_CHARS: usize = 70;
/// DashScope's own request body limit is far above any sane embedding request.
const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Enough concurrency for a busy team's batch jobs, small enough to shed fast.
const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// DashScope's vectors for a fixed input do not change; a month keeps costs down.
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// About 10k embeddings of ~30 KB each.
const DEFAULT_MEMORY_CACHE_BYTES: u64 = 256 * 1024 * 1024;
/// A Redis that does not answer within this is treated as down for this request.
const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// The SDK's own default is 300 s; an embedding normally answers in well under 5 s.
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Two retries, like the 2.x SDK: enough to ride out a blip, bounded cost.
const DEFAULT_MAX_RETRIES: u32 = 2;
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Time given to requests in flight after SIGTERM.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub limits: LimitsConfig,
    pub metering: MeteringConfig,
    /// `None`: admin routes answer 404.
    pub admin: Option<AdminConfig>,
    pub tenants: Vec<TenantConfig>,
    /// Where the config came from, for SIGHUP reloads.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None`: `/metrics` is served on the main listener.
    pub metrics_listen: Option<SocketAddr>,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub shutdown_grace: Duration,
    /// Poll the config file for changes (SIGHUP always works).
    pub watch_config: bool,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme and authority, no trailing slash, e.g. `https://dashscope.aliyuncs.com`.
    pub base_url: http::Uri,
    pub api_key_env: String,
    /// `None` when the environment variable is unset: upstream calls are made
    /// without a key and upstream answers 401, which `/readyz` warns about.
    pub api_key: Option<Secret>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retries: u32,
    pub retry_backoff: Duration,
    pub models: Vec<String>,
    pub embedding_dimension: usize,
    pub max_text_chars: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    Tenant,
    Shared,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub redis_url: Option<Secret>,
    /// `redis_url` lists Redis Cluster seed nodes (comma-separated).
    pub redis_cluster: bool,
    pub ttl: Duration,
    pub scope: CacheScope,
    /// Memory cache size; with Redis it is the L1 in front of it (0 = no L1).
    pub memory_max_bytes: u64,
    pub redis_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorPolicy {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub quota_on_store_error: StoreErrorPolicy,
    /// Count cache hits against quotas too (default: only upstream units).
    pub quota_counts_hits: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weights {
    pub text: u64,
    pub image: u64,
    pub audio: u64,
}

#[derive(Debug, Clone)]
pub struct MeteringConfig {
    pub weights: Weights,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub token: Digest,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPeriod {
    Day,
    Month,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaConfig {
    pub units: u64,
    pub per: QuotaPeriod,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    pub name: String,
    pub keys: Vec<Digest>,
    pub workspace: Option<String>,
    pub rate: Option<RateConfig>,
    pub quota: Option<QuotaConfig>,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key, e.g. `tenants[1].rate.per_second`; empty for syntax errors.
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.key.is_empty(), self.line) {
            (false, Some(line)) => write!(f, "line {line}: {}: {}", self.key, self.message),
            (false, None) => write!(f, "{}: {}", self.key, self.message),
            (true, Some(line)) => write!(f, "line {line}: {}", self.message),
            (true, None) => write!(f, "{}", self.message),
        }
    }
}

/// All problems found in one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---- raw shapes, exactly what the file may say (unknown keys are found by
// `drop_invalid`, which reports all of them, not just the first) ----

#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    metering: RawMetering,
    admin: Option<RawAdmin>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
    /// SPEC §5 names this setting without a section; accepted here too.
    quota_on_store_error: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawServer {
    listen: Option<String>,
    metrics_listen: Option<String>,
    max_body_bytes: Option<i64>,
    max_in_flight: Option<i64>,
    shutdown_grace: Option<String>,
    watch_config: Option<bool>,
}

#[derive(Deserialize, Default)]
struct RawUpstream {
    base_url: Option<String>,
    api_key_env: Option<String>,
    timeout: Option<String>,
    connect_timeout: Option<String>,
    max_retries: Option<i64>,
    retry_backoff: Option<String>,
    models: Option<Vec<String>>,
    embedding_dimension: Option<i64>,
    max_text_chars: Option<i64>,
}

#[derive(Deserialize, Default)]
struct RawCache {
    redis_url: Option<String>,
    redis_cluster: Option<bool>,
    ttl: Option<String>,
    scope: Option<String>,
    memory_max_bytes: Option<i64>,
    redis_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawLimits {
    quota_on_store_error: Option<String>,
    quota_counts_hits: Option<bool>,
}

#[derive(Deserialize, Default)]
struct RawMetering {
    weights: Option<RawWeights>,
}

#[derive(Deserialize)]
struct RawWeights {
    text: Option<i64>,
    image: Option<i64>,
    audio: Option<i64>,
}

#[derive(Deserialize)]
struct RawAdmin {
    token_sha256: Option<String>,
}

#[derive(Deserialize)]
struct RawTenant {
    name: Option<String>,
    key_sha256: Option<Vec<String>>,
    workspace: Option<String>,
    rate: Option<RawRate>,
    quota: Option<RawQuota>,
}

#[derive(Deserialize)]
struct RawRate {
    per_second: Option<f64>,
    burst: Option<i64>,
}

#[derive(Deserialize)]
struct RawQuota {
    units: Option<i64>,
    per: Option<String>,
}

/// Collects errors while a raw config is turned into a [`Config`].
struct Check<'a> {
    doc: Option<toml_edit::ImDocument<&'a str>>,
    src: &'a str,
    errors: Vec<ConfigError>,
}

impl<'a> Check<'a> {
    fn err(&mut self, key: &str, message: impl Into<String>) {
        // One error per key: a value dropped for its type is not also "required".
        if self.errors.iter().any(|e| e.key == key) {
            return;
        }
        let line = self.line_of(key);
        self.errors.push(ConfigError {
            key: key.to_string(),
            line,
            message: message.into(),
        });
    }

    /// Finds the line of a dotted key such as `tenants[1].rate.burst`; falls
    /// back to the nearest enclosing key that the file spells out.
    fn line_of(&self, key: &str) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut item: &toml_edit::Item = doc.as_item();
        let mut best = None;
        for seg in key.split('.') {
            let (name, index) = match seg.split_once('[') {
                Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (seg, None),
            };
            let Some(next) = item.get(name) else { break };
            item = next;
            if let Some(span) = item.span() {
                best = Some(span.start);
            }
            if let Some(i) = index {
                let Some(next) = item.get(i) else { break };
                item = next;
                if let Some(span) = item.span() {
                    best = Some(span.start);
                }
            }
        }
        best.map(|offset| line_at(self.src, offset))
    }

    fn duration(&mut self, key: &str, raw: Option<&str>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.err(key, "must be greater than zero");
                    default
                }
                Err(e) => {
                    self.err(
                        key,
                        format!("`{s}` is not a duration ({e}); use e.g. \"30s\", \"5m\", \"30d\""),
                    );
                    default
                }
            },
        }
    }

    fn positive(&mut self, key: &str, raw: Option<i64>, default: u64) -> u64 {
        match raw {
            None => default,
            Some(v) if v > 0 => v as u64,
            Some(v) => {
                self.err(key, format!("must be a positive integer, got {v}"));
                default
            }
        }
    }

    fn addr(&mut self, key: &str, raw: &str) -> Option<SocketAddr> {
        match raw.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    key,
                    format!("`{raw}` is not an address; use IP:PORT, e.g. \"0.0.0.0:8080\""),
                );
                None
            }
        }
    }

    fn digest(&mut self, key: &str, raw: &str) -> Option<Digest> {
        match Digest::from_hex(raw) {
            Some(d) => Some(d),
            None => {
                self.err(
                    key,
                    "must be 64 hex characters (the SHA-256 digest printed by `embedgate hash-key`)",
                );
                None
            }
        }
    }
}

fn line_at(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Reads environment variables; a trait object so tests need not touch the
/// process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let src = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: String::new(),
                line: None,
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        let mut config = Config::parse(&src, &|k| std::env::var(k).ok())?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Validates config text; environment variables come from `env`.
    pub fn parse(src: &str, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
        let syntax = |e: toml_edit::TomlError| {
            let line = e.span().map(|s| line_at(src, s.start));
            ConfigErrors(vec![ConfigError {
                key: String::new(),
                line,
                message: e.message().trim().to_string(),
            }])
        };
        let mut doc = src.parse::<toml_edit::DocumentMut>().map_err(syntax)?;
        let mut c = Check {
            doc: toml_edit::ImDocument::parse(src).ok(),
            src,
            errors: Vec::new(),
        };
        // Unknown keys and values of the wrong type are reported with the
        // other errors, then dropped so the rest of the file is still checked.
        let mut problems = Vec::new();
        drop_invalid(doc.as_table_mut(), "", "", &mut problems);
        for (key, message) in problems {
            c.err(&key, message);
        }
        let cleaned = doc.to_string();
        let raw: RawConfig = match toml::from_str(&cleaned) {
            Ok(raw) => raw,
            Err(e) => {
                // Not expected after the schema pass; reported as is.
                let line = e.span().map(|s| line_at(&cleaned, s.start));
                c.errors.push(ConfigError {
                    key: String::new(),
                    line,
                    message: e.message().trim().to_string(),
                });
                c.errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
                return Err(ConfigErrors(c.errors));
            }
        };
        let config = build(raw, &mut c, env);
        if c.errors.is_empty() {
            Ok(config)
        } else {
            c.errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            Err(ConfigErrors(c.errors))
        }
    }

    /// The tenant named `name`, if any.
    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

fn build(raw: RawConfig, c: &mut Check<'_>, env: EnvLookup<'_>) -> Config {
    let s = raw.server;
    let listen = s
        .listen
        .as_deref()
        .map(|l| c.addr("server.listen", l))
        .unwrap_or_else(|| "127.0.0.1:8080".parse().ok())
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)));
    let metrics_listen = s
        .metrics_listen
        .as_deref()
        .and_then(|l| c.addr("server.metrics_listen", l));
    let server = ServerConfig {
        listen,
        metrics_listen,
        max_body_bytes: c.positive(
            "server.max_body_bytes",
            s.max_body_bytes,
            DEFAULT_MAX_BODY_BYTES as u64,
        ) as usize,
        max_in_flight: c.positive(
            "server.max_in_flight",
            s.max_in_flight,
            DEFAULT_MAX_IN_FLIGHT as u64,
        ) as usize,
        shutdown_grace: c.duration(
            "server.shutdown_grace",
            s.shutdown_grace.as_deref(),
            DEFAULT_SHUTDOWN_GRACE,
        ),
        watch_config: s.watch_config.unwrap_or(true),
    };

    let u = raw.upstream;
    let base_raw = u
        .base_url
        .unwrap_or_else(|| "https://dashscope.aliyuncs.com".to_string());
    let base_url = match base_raw.trim_end_matches('/').parse::<http::Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http") | Some("https"))
                && uri.authority().is_some()
                && (uri.path() == "/" || uri.path().is_empty()) =>
        {
            uri
        }
        _ => {
            c.err(
                "upstream.base_url",
                format!(
                    "`{base_raw}` must be an http(s) URL with a host and no path, e.g. \"https://dashscope.aliyuncs.com\""
                ),
            );
            http::Uri::from_static("https://dashscope.aliyuncs.com")
        }
    };
    let api_key_env = u
        .api_key_env
        .unwrap_or_else(|| "DASHSCOPE_API_KEY".to_string());
    if api_key_env.is_empty() {
        c.err("upstream.api_key_env", "must name an environment variable");
    }
    let api_key = env(&api_key_env).filter(|k| !k.is_empty()).map(Secret::new);
    let models = u
        .models
        .unwrap_or_else(|| vec![ONE_PEACE_MODEL.to_string()]);
    if models.is_empty() || models.iter().any(|m| m.is_empty()) {
        c.err(
            "upstream.models",
            "must list at least one non-empty model name",
        );
    }
    let max_retries = match u.max_retries {
        None => DEFAULT_MAX_RETRIES,
        Some(v) if (0..=10).contains(&v) => v as u32,
        Some(v) => {
            c.err(
                "upstream.max_retries",
                format!("must be between 0 and 10, got {v}"),
            );
            DEFAULT_MAX_RETRIES
        }
    };
    let upstream = UpstreamConfig {
        base_url,
        api_key_env,
        api_key,
        timeout: c.duration(
            "upstream.timeout",
            u.timeout.as_deref(),
            DEFAULT_UPSTREAM_TIMEOUT,
        ),
        connect_timeout: c.duration(
            "upstream.connect_timeout",
            u.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
        ),
        max_retries,
        retry_backoff: c.duration(
            "upstream.retry_backoff",
            u.retry_backoff.as_deref(),
            DEFAULT_RETRY_BACKOFF,
        ),
        models,
        embedding_dimension: c.positive(
            "upstream.embedding_dimension",
            u.embedding_dimension,
            DEFAULT_EMBEDDING_DIMENSION as u64,
        ) as usize,
        max_text_chars: c.positive(
            "upstream.max_text_chars",
            u.max_text_chars,
            DEFAULT_MAX_TEXT_CHARS as u64,
        ) as usize,
    };

    let k = raw.cache;
    let redis_url = k.redis_url.filter(|u| !u.is_empty());
    let redis_cluster = k.redis_cluster.unwrap_or(false);
    if let Some(url) = &redis_url {
        let urls: Vec<&str> = url.split(',').map(str::trim).collect();
        if urls.iter().any(|u| redis::parse_redis_url(u).is_none()) {
            c.err(
                "cache.redis_url",
                "must be a redis:// or rediss:// URL (with redis_cluster = true, a comma-separated list of them)",
            );
        } else if urls.len() > 1 && !redis_cluster {
            c.err(
                "cache.redis_url",
                "lists several nodes; set cache.redis_cluster = true for Redis Cluster",
            );
        }
    }
    let scope = match k.scope.as_deref() {
        None | Some("tenant") => CacheScope::Tenant,
        Some("shared") => CacheScope::Shared,
        Some(other) => {
            c.err(
                "cache.scope",
                format!("must be \"tenant\" or \"shared\", got \"{other}\""),
            );
            CacheScope::Tenant
        }
    };
    let memory_max_bytes = match k.memory_max_bytes {
        None => DEFAULT_MEMORY_CACHE_BYTES,
        Some(v) if v >= 0 => v as u64,
        Some(v) => {
            c.err("cache.memory_max_bytes", format!("must be >= 0, got {v}"));
            DEFAULT_MEMORY_CACHE_BYTES
        }
    };
    let cache = CacheConfig {
        redis_url: redis_url.map(Secret::new),
        redis_cluster,
        ttl: c.duration("cache.ttl", k.ttl.as_deref(), DEFAULT_CACHE_TTL),
        scope,
        memory_max_bytes,
        redis_timeout: c.duration(
            "cache.redis_timeout",
            k.redis_timeout.as_deref(),
            DEFAULT_REDIS_TIMEOUT,
        ),
    };

    let l = raw.limits;
    let (policy_key, policy) = match (raw.quota_on_store_error, l.quota_on_store_error) {
        (Some(_), Some(_)) => {
            c.err(
                "quota_on_store_error",
                "is set both at the top level and in [limits]; keep one",
            );
            ("limits.quota_on_store_error", None)
        }
        (Some(top), None) => ("quota_on_store_error", Some(top)),
        (None, in_limits) => ("limits.quota_on_store_error", in_limits),
    };
    let quota_on_store_error = match policy.as_deref() {
        None | Some("allow") => StoreErrorPolicy::Allow,
        Some("deny") => StoreErrorPolicy::Deny,
        Some(other) => {
            c.err(
                policy_key,
                format!("must be \"allow\" or \"deny\", got \"{other}\""),
            );
            StoreErrorPolicy::Allow
        }
    };
    let limits = LimitsConfig {
        quota_on_store_error,
        quota_counts_hits: l.quota_counts_hits.unwrap_or(false),
    };

    let m = raw.metering;
    let mut weights = Weights {
        text: 1,
        image: 1,
        audio: 2,
    };
    if let Some(w) = m.weights {
        weights.text = c.positive("metering.weights.text", w.text, 1);
        weights.image = c.positive("metering.weights.image", w.image, 1);
        weights.audio = c.positive("metering.weights.audio", w.audio, 2);
    }
    let metering = MeteringConfig { weights };

    let admin = match raw.admin {
        None => None,
        Some(RawAdmin { token_sha256: None }) => {
            c.err("admin.token_sha256", "is required in [admin]");
            None
        }
        Some(RawAdmin {
            token_sha256: Some(t),
        }) => c
            .digest("admin.token_sha256", &t)
            .map(|token| AdminConfig { token }),
    };

    let mut tenants = Vec::new();
    let mut names = HashSet::new();
    let mut key_owner: BTreeMap<Digest, String> = BTreeMap::new();
    for (i, t) in raw.tenants.into_iter().enumerate() {
        let at = format!("tenants[{i}]");
        let name = match t.name {
            Some(n) if valid_tenant_name(&n) => n,
            Some(n) => {
                c.err(
                    &format!("{at}.name"),
                    format!("`{n}` must be 1-64 characters of a-z, A-Z, 0-9, '-', '_'"),
                );
                continue;
            }
            None => {
                c.err(&format!("{at}.name"), "is required");
                continue;
            }
        };
        if !names.insert(name.clone()) {
            c.err(
                &format!("{at}.name"),
                format!("tenant `{name}` is defined twice"),
            );
        }
        let mut keys = Vec::new();
        match t.key_sha256 {
            None => c.err(
                &format!("{at}.key_sha256"),
                "is required (a list of digests)",
            ),
            Some(list) if list.is_empty() => {
                c.err(&format!("{at}.key_sha256"), "must list at least one digest")
            }
            Some(list) => {
                for (j, k) in list.iter().enumerate() {
                    let key = format!("{at}.key_sha256[{j}]");
                    if let Some(d) = c.digest(&key, k) {
                        if let Some(owner) = key_owner.get(&d) {
                            let msg = format!("this key is already used by tenant `{owner}`");
                            c.err(&key, msg);
                        } else {
                            key_owner.insert(d, name.clone());
                            keys.push(d);
                        }
                    }
                }
            }
        }
        let rate = t.rate.and_then(|r| {
            let per_second = match r.per_second {
                Some(v) if v.is_finite() && v > 0.0 => v,
                Some(v) => {
                    c.err(
                        &format!("{at}.rate.per_second"),
                        format!("must be a number > 0, got {v}"),
                    );
                    return None;
                }
                None => {
                    c.err(&format!("{at}.rate.per_second"), "is required in rate");
                    return None;
                }
            };
            let default_burst = per_second.ceil().max(1.0) as i64;
            let burst = c.positive(&format!("{at}.rate.burst"), r.burst, default_burst as u64);
            Some(RateConfig {
                per_second,
                burst: burst.min(u32::MAX as u64) as u32,
            })
        });
        let quota = t.quota.and_then(|q| {
            let units = match q.units {
                Some(v) if v >= 0 => v as u64,
                Some(v) => {
                    c.err(
                        &format!("{at}.quota.units"),
                        format!("must be >= 0, got {v}"),
                    );
                    return None;
                }
                None => {
                    c.err(&format!("{at}.quota.units"), "is required in quota");
                    return None;
                }
            };
            let per = match q.per.as_deref() {
                Some("day") => QuotaPeriod::Day,
                Some("month") => QuotaPeriod::Month,
                Some(other) => {
                    c.err(
                        &format!("{at}.quota.per"),
                        format!("must be \"day\" or \"month\", got \"{other}\""),
                    );
                    return None;
                }
                None => {
                    c.err(
                        &format!("{at}.quota.per"),
                        "is required in quota (\"day\" or \"month\")",
                    );
                    return None;
                }
            };
            Some(QuotaConfig { units, per })
        });
        let workspace = t.workspace.filter(|w| !w.is_empty());
        if let Some(w) = &workspace {
            if http::HeaderValue::from_str(w).is_err() {
                c.err(
                    &format!("{at}.workspace"),
                    "must be printable ASCII (it is sent as a header)",
                );
            }
        }
        tenants.push(TenantConfig {
            name,
            keys,
            workspace,
            rate,
            quota,
        });
    }

    Config {
        server,
        upstream,
        cache,
        limits,
        metering,
        admin,
        tenants,
        source: None,
    }
}

/// What a key's value must be.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    /// A number; integers are accepted.
    Num,
    Bool,
    StrList,
    Table,
    TableList,
}

impl Kind {
    fn accepts(self, item: &toml_edit::Item) -> bool {
        match self {
            Kind::Str => item.as_str().is_some(),
            Kind::Int => item.as_integer().is_some(),
            Kind::Num => item.as_integer().is_some() || item.as_float().is_some(),
            Kind::Bool => item.as_bool().is_some(),
            Kind::StrList => item
                .as_array()
                .is_some_and(|a| a.iter().all(|v| v.as_str().is_some())),
            Kind::Table => item.as_table_like().is_some(),
            Kind::TableList => {
                item.as_array_of_tables().is_some()
                    || item
                        .as_array()
                        .is_some_and(|a| a.iter().all(|v| v.as_inline_table().is_some()))
            }
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Int => "an integer",
            Kind::Num => "a number",
            Kind::Bool => "true or false",
            Kind::StrList => "a list of strings",
            Kind::Table => "a table",
            Kind::TableList => "a list of tables ([[...]])",
        }
    }
}

fn found(item: &toml_edit::Item) -> &'static str {
    if let Some(v) = item.as_value() {
        match v {
            toml_edit::Value::String(_) => "a string",
            toml_edit::Value::Integer(_) => "an integer",
            toml_edit::Value::Float(_) => "a float",
            toml_edit::Value::Boolean(_) => "a boolean",
            toml_edit::Value::Datetime(_) => "a date",
            toml_edit::Value::Array(_) => "a list",
            toml_edit::Value::InlineTable(_) => "a table",
        }
    } else if item.is_table() {
        "a table"
    } else if item.is_array_of_tables() {
        "a list of tables"
    } else {
        "nothing"
    }
}

/// The keys a table may have and what each must be, by the table's path
/// with array indices left out; `None` for a path that is not a table.
fn schema(path: &str) -> Option<&'static [(&'static str, Kind)]> {
    use Kind::*;
    Some(match path {
        "" => &[
            ("server", Table),
            ("upstream", Table),
            ("cache", Table),
            ("limits", Table),
            ("metering", Table),
            ("admin", Table),
            ("tenants", TableList),
            ("quota_on_store_error", Str),
        ],
        "server" => &[
            ("listen", Str),
            ("metrics_listen", Str),
            ("max_body_bytes", Int),
            ("max_in_flight", Int),
            ("shutdown_grace", Str),
            ("watch_config", Bool),
        ],
        "upstream" => &[
            ("base_url", Str),
            ("api_key_env", Str),
            ("timeout", Str),
            ("connect_timeout", Str),
            ("max_retries", Int),
            ("retry_backoff", Str),
            ("models", StrList),
            ("embedding_dimension", Int),
            ("max_text_chars", Int),
        ],
        "cache" => &[
            ("redis_url", Str),
            ("redis_cluster", Bool),
            ("ttl", Str),
            ("scope", Str),
            ("memory_max_bytes", Int),
            ("redis_timeout", Str),
        ],
        "limits" => &[("quota_on_store_error", Str), ("quota_counts_hits", Bool)],
        "metering" => &[("weights", Table)],
        "metering.weights" => &[("text", Int), ("image", Int), ("audio", Int)],
        "admin" => &[("token_sha256", Str)],
        "tenants" => &[
            ("name", Str),
            ("key_sha256", StrList),
            ("workspace", Str),
            ("rate", Table),
            ("quota", Table),
        ],
        "tenants.rate" => &[("per_second", Num), ("burst", Int)],
        "tenants.quota" => &[("units", Int), ("per", Str)],
        _ => return None,
    })
}

/// Removes keys the schema does not know and values of the wrong type,
/// recording each as (dotted key, message), so serde never stops at the
/// first one and every problem is reported together.
fn drop_invalid(
    table: &mut dyn toml_edit::TableLike,
    schema_path: &str,
    shown_path: &str,
    problems: &mut Vec<(String, String)>,
) {
    let Some(allowed) = schema(schema_path) else {
        return;
    };
    let keys: Vec<String> = table.iter().map(|(k, _)| k.to_string()).collect();
    for key in keys {
        let shown = if shown_path.is_empty() {
            key.clone()
        } else {
            format!("{shown_path}.{key}")
        };
        let Some((_, kind)) = allowed.iter().find(|(k, _)| *k == key) else {
            problems.push((shown, "unknown key".to_string()));
            table.remove(&key);
            continue;
        };
        let Some(item) = table.get_mut(&key) else {
            continue;
        };
        if !kind.accepts(item) {
            let msg = format!("must be {}, got {}", kind.expected(), found(item));
            problems.push((shown, msg));
            table.remove(&key);
            continue;
        }
        let schema = if schema_path.is_empty() {
            key.clone()
        } else {
            format!("{schema_path}.{key}")
        };
        if let Some(t) = item.as_table_like_mut() {
            drop_invalid(t, &schema, &shown, problems);
        } else if let Some(aot) = item.as_array_of_tables_mut() {
            for (i, t) in aot.iter_mut().enumerate() {
                drop_invalid(t, &schema, &format!("{shown}[{i}]"), problems);
            }
        } else if let Some(arr) = item.as_array_mut() {
            for (i, v) in arr.iter_mut().enumerate() {
                if let Some(t) = v.as_inline_table_mut() {
                    drop_invalid(t, &schema, &format!("{shown}[{i}]"), problems);
                }
            }
        }
    }
}

fn valid_tenant_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn parse(src: &str) -> Result<Config, ConfigErrors> {
        Config::parse(src, &|_| None)
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.server.max_body_bytes, 1024 * 1024);
        assert_eq!(c.cache.ttl, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(c.cache.scope, CacheScope::Tenant);
        assert_eq!(c.metering.weights.audio, 2);
        assert!(c.cache.redis_url.is_none());
        assert!(c.upstream.api_key.is_none());
        assert_eq!(c.upstream.models, vec![ONE_PEACE_MODEL.to_string()]);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        let e = &err.0[0];
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key, "server.lisen");
    }

    #[test]
    fn unknown_keys_are_listed_with_every_other_error() {
        let src = format!(
            "[server]\nlisen = 3\nshutdown_grace = \"soon\"\n\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\nrate = {{ per_second = 1, brust = 2 }}\ncolour = \"red\"\n"
        );
        let err = parse(&src).unwrap_err();
        let shown: Vec<String> = err.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            vec![
                "line 2: server.lisen: unknown key".to_string(),
                "line 3: server.shutdown_grace: `soon` is not a duration (expected number at 0); use e.g. \"30s\", \"5m\", \"30d\"".to_string(),
                "line 8: tenants[0].rate.brust: unknown key".to_string(),
                "line 9: tenants[0].colour: unknown key".to_string(),
            ]
        );
    }

    #[test]
    fn collects_every_semantic_error_with_lines() {
        let src = format!(
            "[cache]\nttl = \"soon\"\nscope = \"team\"\n\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\nrate = {{ per_second = -1, burst = 2 }}\n\n[[tenants]]\nname = \"b\"\nkey_sha256 = [\"xyz\"]\nquota = {{ units = 5, per = \"week\" }}\n"
        );
        let err = parse(&src).unwrap_err();
        let shown: Vec<String> = err.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(err.0.len(), 5, "{shown:#?}");
        assert!(shown[0].starts_with("line 2: cache.ttl:"), "{shown:#?}");
        assert!(shown[1].starts_with("line 3: cache.scope:"), "{shown:#?}");
        assert!(
            shown[2].starts_with("line 8: tenants[0].rate.per_second:"),
            "{shown:#?}"
        );
        assert!(
            shown[3].starts_with("line 12: tenants[1].key_sha256[0]:"),
            "{shown:#?}"
        );
        assert!(
            shown[4].starts_with("line 13: tenants[1].quota.per:"),
            "{shown:#?}"
        );
    }

    #[test]
    fn duplicate_keys_and_names_are_errors() {
        let src = format!(
            "[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\n"
        );
        let err = parse(&src).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.to_string().contains("defined twice"));
        assert!(err.to_string().contains("already used by tenant `a`"));
    }

    #[test]
    fn full_example_parses() {
        let src = format!(
            r#"
[server]
listen = "0.0.0.0:8080"
metrics_listen = "127.0.0.1:9100"
max_body_bytes = 1048576

[upstream]
base_url = "http://127.0.0.1:9"
api_key_env = "UP_KEY"
timeout = "30s"

[cache]
redis_url = "redis://127.0.0.1:6379"
ttl = "30d"
scope = "shared"

[metering]
weights = {{ text = 1, image = 3, audio = 2 }}

[admin]
token_sha256 = "{DIGEST}"

[[tenants]]
name = "search"
key_sha256 = ["{DIGEST}"]
workspace = "ws-1"
rate = {{ per_second = 20, burst = 40 }}
quota = {{ units = 100000, per = "day" }}
"#
        );
        let c = Config::parse(&src, &|k| (k == "UP_KEY").then(|| "sk-x".into())).unwrap();
        assert_eq!(c.cache.scope, CacheScope::Shared);
        assert_eq!(c.metering.weights.image, 3);
        assert_eq!(c.upstream.api_key.as_ref().unwrap().expose(), "sk-x");
        let t = c.tenant("search").unwrap();
        assert_eq!(
            t.rate,
            Some(RateConfig {
                per_second: 20.0,
                burst: 40
            })
        );
        assert_eq!(
            t.quota,
            Some(QuotaConfig {
                units: 100000,
                per: QuotaPeriod::Day
            })
        );
        assert!(c.admin.is_some());
        assert_eq!(
            c.server.metrics_listen,
            Some("127.0.0.1:9100".parse().unwrap())
        );
    }

    #[test]
    fn quota_on_store_error_at_top_level_or_in_limits() {
        let top = parse("quota_on_store_error = \"deny\"\n").unwrap();
        assert_eq!(top.limits.quota_on_store_error, StoreErrorPolicy::Deny);
        let section = parse("[limits]\nquota_on_store_error = \"deny\"\n").unwrap();
        assert_eq!(section.limits.quota_on_store_error, StoreErrorPolicy::Deny);
        let both =
            parse("quota_on_store_error = \"deny\"\n[limits]\nquota_on_store_error = \"allow\"\n");
        assert!(both
            .unwrap_err()
            .to_string()
            .contains("both at the top level"));
        let bad = parse("quota_on_store_error = \"maybe\"\n").unwrap_err();
        assert_eq!(bad.0[0].key, "quota_on_store_error");
        assert_eq!(bad.0[0].line, Some(1));
    }

    #[test]
    fn bad_base_url_is_rejected() {
        let err = parse("[upstream]\nbase_url = \"ftp://x/y\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "upstream.base_url");
        assert_eq!(err.0[0].line, Some(2));
    }

    #[test]
    fn bad_types_are_all_listed_with_key_and_line() {
        let src = "[server]\nmax_body_bytes = \"big\"\nmax_in_flight = \"many\"\n[cache]\nttl = \"soon\"\nredis_cluster = \"yes\"\n[[tenants]]\nname = \"a\"\nkey_sha256 = \"not-a-list\"\nrate = 5\n";
        let err = parse(src).unwrap_err();
        let shown: Vec<String> = err.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            vec![
                "line 2: server.max_body_bytes: must be an integer, got a string",
                "line 3: server.max_in_flight: must be an integer, got a string",
                "line 5: cache.ttl: `soon` is not a duration (expected number at 0); use e.g. \"30s\", \"5m\", \"30d\"",
                "line 6: cache.redis_cluster: must be true or false, got a string",
                "line 9: tenants[0].key_sha256: must be a list of strings, got a string",
                "line 10: tenants[0].rate: must be a table, got an integer",
            ],
            "{shown:#?}"
        );
    }
}
