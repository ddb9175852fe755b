//! `[cache]`: where embeddings are kept, for how long, shared by whom.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::check::Check;
use super::values::{self, HumanDuration};
use crate::secret::Secret;

/// DashScope's vectors for a fixed input do not change; a month keeps costs down.
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// A team never gets an answer computed for another team unless the operator
/// opts in to sharing.
const DEFAULT_SCOPE: CacheScope = CacheScope::Tenant;
/// One Redis URL is the common case; a cluster's seed list is spelled out anyway.
const DEFAULT_REDIS_CLUSTER: bool = false;
/// About 10k embeddings of ~30 KB each.
const DEFAULT_MEMORY_CACHE_BYTES: u64 = 256 * 1024 * 1024;
/// The hot tier: texts of compacted entries that identity clients read,
/// kept so a hot key is not inflated per hit. 8 MiB holds ~250 DashScope
/// answers; a small memory cache gives it a tenth of its bytes.
const DEFAULT_HOT_MAX_BYTES: u64 = 8 * 1024 * 1024;
const DEFAULT_HOT_SHARE: u64 = 10;
/// Identity clients' hits are served from the smallest exact form.
const DEFAULT_COMPACT_FORM: CompactForm = CompactForm::Float32;
/// A Redis that does not answer within this is treated as down for this request.
const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    Tenant,
    Shared,
}

impl<'de> Deserialize<'de> for CacheScope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        values::one_of(
            d,
            &[
                ("tenant", CacheScope::Tenant),
                ("shared", CacheScope::Shared),
            ],
        )
    }
}

/// The form an entry hit by identity clients is compacted to (both give
/// the text back byte for byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactForm {
    /// 4 bytes a float (a DashScope answer's numbers are float32 values),
    /// written back in ~20 µs; texts whose numbers are not take `Digits`.
    Float32,
    /// 8 bytes a float, written back in ~12 µs.
    Digits,
}

impl<'de> Deserialize<'de> for CompactForm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        values::one_of(
            d,
            &[
                ("float32", CompactForm::Float32),
                ("digits", CompactForm::Digits),
            ],
        )
    }
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
    /// The part of `memory_max_bytes` that keeps texts of compacted entries
    /// at hand for identity hits (0 = inflate every time).
    pub hot_max_bytes: u64,
    /// What entries identity clients hit are compacted to.
    pub compact_form: CompactForm,
    pub redis_timeout: Duration,
}

/// `[cache]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCache {
    redis_url: Option<String>,
    redis_cluster: Option<bool>,
    ttl: Option<HumanDuration>,
    scope: Option<CacheScope>,
    memory_max_bytes: Option<i64>,
    hot_max_bytes: Option<i64>,
    compact_form: Option<CompactForm>,
    redis_timeout: Option<HumanDuration>,
}

impl RawCache {
    pub(crate) fn load(self, c: &mut Check<'_>) -> CacheConfig {
        let redis_url = self.redis_url.filter(|u| !u.is_empty());
        let redis_cluster = self.redis_cluster.unwrap_or(DEFAULT_REDIS_CLUSTER);
        if let Some(url) = &redis_url {
            check_redis_url(c, "cache", url, redis_cluster);
        }
        let memory_max_bytes = c.non_negative(
            "cache.memory_max_bytes",
            self.memory_max_bytes,
            DEFAULT_MEMORY_CACHE_BYTES,
        );
        let hot_max_bytes = c.non_negative(
            "cache.hot_max_bytes",
            self.hot_max_bytes,
            DEFAULT_HOT_MAX_BYTES.min(memory_max_bytes / DEFAULT_HOT_SHARE),
        );
        if hot_max_bytes > memory_max_bytes / 2 {
            c.err(
                "cache.hot_max_bytes",
                format!(
                    "is a part of cache.memory_max_bytes ({memory_max_bytes}) and may be at most half of it, got {hot_max_bytes}"
                ),
            );
        }
        CacheConfig {
            redis_url: redis_url.map(Secret::new),
            redis_cluster,
            ttl: self.ttl.map_or(DEFAULT_CACHE_TTL, |d| d.0),
            scope: self.scope.unwrap_or(DEFAULT_SCOPE),
            memory_max_bytes,
            hot_max_bytes,
            compact_form: self.compact_form.unwrap_or(DEFAULT_COMPACT_FORM),
            redis_timeout: self.redis_timeout.map_or(DEFAULT_REDIS_TIMEOUT, |d| d.0),
        }
    }
}

/// Records an error when `url` (the `redis_url` of `[section]`) is not one
/// Redis URL, or with `cluster` a comma-separated list of them.
pub(super) fn check_redis_url(c: &mut Check<'_>, section: &str, url: &str, cluster: bool) {
    let key = format!("{section}.redis_url");
    let urls: Vec<&str> = url.split(',').map(str::trim).collect();
    if urls.iter().any(|u| redis::parse_redis_url(u).is_none()) {
        c.err(
            &key,
            "must be a redis:// or rediss:// URL (with redis_cluster = true, a comma-separated list of them)",
        );
    } else if urls.len() > 1 && !cluster {
        c.err(
            &key,
            format!("lists several nodes; set {section}.redis_cluster = true for Redis Cluster"),
        );
    }
}
