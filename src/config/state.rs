//! `[state]`: the Redis for what must not be lost or evicted: quota
//! counters and their reservation records, rate buckets, the usage ledger.
//! The cache (`[cache]`) may live in another Redis, one that evicts.
//!
//! Every key here defaults to the cache's own (`cache.redis_url`,
//! `cache.redis_cluster`, `cache.redis_timeout`): a small setup runs one
//! Redis for both, as before; a large one points `state.redis_url` at a
//! persistent, `noeviction` Redis and lets the cache's evict.

use std::time::Duration;

use serde::Deserialize;

use super::cache::{check_redis_url, CacheConfig};
use super::check::Check;
use super::values::HumanDuration;
use crate::secret::Secret;

/// The resolved state store: `[state]`, with the cache's values where a key
/// is not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// `None`: no Redis at all (memory cache, local limits, in-process ledger).
    pub redis_url: Option<Secret>,
    /// `redis_url` lists Redis Cluster seed nodes (comma-separated).
    pub redis_cluster: bool,
    pub redis_timeout: Duration,
}

impl StateConfig {
    /// True when the state lives in the cache's Redis, reached the same way:
    /// then one connection serves both.
    pub fn same_as_cache(&self, cache: &CacheConfig) -> bool {
        self.redis_url == cache.redis_url
            && self.redis_cluster == cache.redis_cluster
            && self.redis_timeout == cache.redis_timeout
    }
}

/// `[state]` as written. No key has a default of its own: each one left out
/// takes the `[cache]` key of the same name, so a config written before
/// `[state]` existed keeps one Redis for everything.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawState {
    redis_url: Option<String>,
    redis_cluster: Option<bool>,
    redis_timeout: Option<HumanDuration>,
}

impl RawState {
    pub(crate) fn load(self, cache: &CacheConfig, c: &mut Check<'_>) -> StateConfig {
        let redis_url = self.redis_url.filter(|u| !u.is_empty());
        let redis_cluster = match (&redis_url, self.redis_cluster) {
            (_, None) => cache.redis_cluster,
            (Some(_), Some(cluster)) => cluster,
            (None, Some(cluster)) => {
                if cluster != cache.redis_cluster {
                    c.err(
                        "state.redis_cluster",
                        "applies to state.redis_url, which is not set (the state then uses cache.redis_url and cache.redis_cluster)",
                    );
                }
                cache.redis_cluster
            }
        };
        if let Some(url) = &redis_url {
            check_redis_url(c, "state", url, redis_cluster);
        }
        StateConfig {
            redis_url: redis_url
                .map(Secret::new)
                .or_else(|| cache.redis_url.clone()),
            redis_cluster,
            redis_timeout: self.redis_timeout.map_or(cache.redis_timeout, |d| d.0),
        }
    }
}
