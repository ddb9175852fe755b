//! The gateway's shared state, built once from config; tenants are the part
//! that hot reload swaps.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::cache::Cache;
use crate::coalesce::Coalescer;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::redis_store::RedisStore;
use crate::tenants::TenantTable;
use crate::upstream::Upstream;

pub struct App {
    /// The config the process started with; only `tenants` and `admin`
    /// follow reloads (through `tenants`).
    pub config: Config,
    pub tenants: ArcSwap<TenantTable>,
    pub cache: Arc<Cache>,
    pub coalescer: Arc<Coalescer>,
    pub upstream: Upstream,
    pub limits: Arc<Limits>,
    pub ledger: Arc<Ledger>,
    pub metrics: Arc<Metrics>,
    pub redis: Option<Arc<RedisStore>>,
    /// Bounds work in flight (requests and the upstream calls they spawn);
    /// shutdown waits for every permit to come back.
    pub in_flight: Arc<Semaphore>,
}

impl App {
    /// Builds the state; must run inside a tokio runtime (it starts the
    /// Redis connector and the ledger writer).
    pub fn new(config: Config) -> Result<Arc<App>, String> {
        let metrics = Arc::new(Metrics::new());
        let redis = match &config.cache.redis_url {
            Some(url) => Some(RedisStore::start(
                url,
                config.cache.redis_cluster,
                config.cache.redis_timeout,
                metrics.clone(),
            )?),
            None => None,
        };
        let cache = Arc::new(Cache::new(
            config.cache.memory_max_bytes,
            redis.clone(),
            config.cache.ttl,
        ));
        let upstream = Upstream::new(&config.upstream, metrics.clone())?;
        let limits = Limits::new(
            redis.clone(),
            config.limits.quota_on_store_error,
            metrics.clone(),
        );
        let ledger = Ledger::new(redis.clone(), metrics.clone());
        let tenants = ArcSwap::from_pointee(TenantTable::build(&config, None));
        let in_flight = Arc::new(Semaphore::new(config.server.max_in_flight));
        Ok(Arc::new(App {
            config,
            tenants,
            cache,
            coalescer: Arc::new(Coalescer::default()),
            upstream,
            limits,
            ledger,
            metrics,
            redis,
            in_flight,
        }))
    }

    /// Applies a reloaded config's tenants and admin token. Settings that
    /// need a restart are reported, not applied.
    pub fn apply_reload(&self, new: &Config) -> Vec<&'static str> {
        let old = self.tenants.load();
        self.tenants
            .store(Arc::new(TenantTable::build(new, Some(&old))));
        let mut restart = Vec::new();
        let c = &self.config;
        if c.server.listen != new.server.listen
            || c.server.metrics_listen != new.server.metrics_listen
        {
            restart.push("server.listen");
        }
        if c.cache.redis_url != new.cache.redis_url
            || c.cache.scope != new.cache.scope
            || c.cache.ttl != new.cache.ttl
        {
            restart.push("cache");
        }
        if c.upstream.base_url != new.upstream.base_url
            || c.upstream.api_key_env != new.upstream.api_key_env
        {
            restart.push("upstream");
        }
        if c.metering.weights != new.metering.weights {
            restart.push("metering.weights");
        }
        restart
    }
}
