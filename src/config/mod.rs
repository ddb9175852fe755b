//! TOML configuration, read in two steps:
//!
//! 1. The file is deserialized into raw structs, one per section, that say
//!    exactly what the file may contain (`deny_unknown_fields`, typed fields).
//! 2. Each section's `load()` turns its raw struct into a type that cannot
//!    be invalid, recording semantic errors.
//!
//! Every error names the dotted key and, where the file has it, the line,
//! and all of them are collected, not returned one at a time, so an
//! operator fixes a file in one pass (`embedgate check-config`);
//! `check.rs` says how.
//!
//! One file per section: its raw struct, its `DEFAULT_*` constants (each
//! with its reason), its validated type and its `load()`. Adding a key
//! touches that file (the raw field, its default, its field in the
//! validated type, read in `load()`) and `config/embedgate.toml`, the
//! commented reference of every key; tests fail if the two drift apart.

mod admin;
mod cache;
mod check;
mod events;
mod ledger;
mod limits;
mod metering;
mod models;
mod prices;
mod server;
mod state;
mod telemetry;
mod tenants;
mod upstream;
mod values;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use admin::AdminConfig;
pub use cache::{CacheConfig, CacheScope, CompactForm};
pub use events::EventsConfig;
pub use ledger::LedgerConfig;
pub use limits::{LimitsConfig, StoreErrorPolicy};
pub use metering::{MeteringConfig, Weights};
pub use models::{ModelApi, ModelSpec, ModelTable, Vectors};
pub use server::ServerConfig;
pub use state::StateConfig;
pub use telemetry::TelemetryConfig;
pub use tenants::{QuotaConfig, QuotaPeriod, RateConfig, TenantConfig};
pub use upstream::{UpstreamConfig, ONE_PEACE_MODEL};

use check::Check;

/// A fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    /// Where quotas, rates and the ledger live (defaults to the cache's Redis).
    pub state: StateConfig,
    pub limits: LimitsConfig,
    pub metering: MeteringConfig,
    pub ledger: LedgerConfig,
    /// Usage events out (`[events]`).
    pub events: EventsConfig,
    /// `None`: admin routes answer 404.
    pub admin: Option<AdminConfig>,
    /// Traces over OTLP; off without an endpoint (restart).
    pub telemetry: TelemetryConfig,
    pub tenants: Vec<TenantConfig>,
    /// Every model served (`[[models]]` over the built-in table).
    pub models: ModelTable,
    /// Where the config came from, for SIGHUP reloads.
    pub source: Option<PathBuf>,
    /// The file's bytes as they were read: what the file watch compares
    /// with, so a change made before the watch starts is seen too.
    pub source_bytes: Option<Vec<u8>>,
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

/// Reads environment variables; a trait object so tests need not touch the
/// process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The whole file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: server::RawServer,
    #[serde(default)]
    upstream: upstream::RawUpstream,
    #[serde(default)]
    cache: cache::RawCache,
    #[serde(default)]
    state: state::RawState,
    #[serde(default)]
    limits: limits::RawLimits,
    #[serde(default)]
    metering: metering::RawMetering,
    #[serde(default)]
    ledger: ledger::RawLedger,
    #[serde(default)]
    events: events::RawEvents,
    admin: Option<admin::RawAdmin>,
    #[serde(default)]
    telemetry: telemetry::RawTelemetry,
    #[serde(default, deserialize_with = "tenants::list")]
    tenants: Vec<tenants::RawTenant>,
    #[serde(default, deserialize_with = "models_list")]
    models: Vec<models::RawModel>,
    /// SPEC §5 names this setting without a section; accepted here too.
    quota_on_store_error: Option<StoreErrorPolicy>,
}

fn models_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<models::RawModel>, D::Error> {
    values::list(d, "a list of tables ([[models]])")
}

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
        config.source_bytes = Some(src.into_bytes());
        Ok(config)
    }

    /// Validates config text; environment variables come from `env`.
    pub fn parse(src: &str, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
        let mut c = Check::new(src).map_err(|e| ConfigErrors(vec![e]))?;
        let Some(raw) = c.deserialize::<RawConfig>() else {
            return Err(ConfigErrors(c.into_errors()));
        };
        let cache = raw.cache.load(&mut c);
        let config = Config {
            server: raw.server.load(&mut c),
            upstream: raw.upstream.load(&mut c, env),
            state: raw.state.load(&cache, &mut c),
            cache,
            limits: raw.limits.load(raw.quota_on_store_error, &mut c),
            metering: raw.metering.load(&mut c),
            ledger: raw.ledger.load(&mut c),
            events: raw.events.load(&mut c, env),
            admin: raw.admin.and_then(|a| a.load(&mut c)),
            telemetry: raw.telemetry.load(&mut c),
            tenants: tenants::load(raw.tenants, &mut c),
            models: models::load(raw.models, &mut c),
            source: None,
            source_bytes: None,
        };
        for (i, t) in config.tenants.iter().enumerate() {
            for m in t.models.iter().flatten() {
                if config.models.get(m).is_none() && !config.upstream.models.contains(m) {
                    c.err(
                        &format!("tenants[{i}].models"),
                        format!("`{m}` is not a model this gateway serves (see [[models]])"),
                    );
                }
            }
        }
        c.finish(config).map_err(ConfigErrors)
    }

    /// The tenant named `name`, if any.
    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name == name)
    }
}
