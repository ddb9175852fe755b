//! The gateway's shared state, built once from config; tenants are the part
//! that hot reload swaps.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::access_log::RefusalLines;
use crate::cache::Cache;
use crate::coalesce::Coalescer;
use crate::config::{CompactForm, Config};
use crate::digits::Words;
use crate::fair_share::TenantSlots;
use crate::ledger::Ledger;
use crate::limits::Limits;
use crate::metering::{CacheStatus, Reconciled, Usage};
use crate::metrics::{model_label, Metrics};
use crate::parse_memo::ParseMemo;
use crate::redis_store::{Holds, RedisStore};
use crate::tasks::TaskStore;
use crate::tenants::TenantTable;
use crate::upstream::Upstream;

pub(crate) struct App {
    /// The config the process started with; only `tenants` and `admin`
    /// follow reloads (through `tenants`).
    pub(crate) config: Config,
    pub(crate) tenants: ArcSwap<TenantTable>,
    pub(crate) cache: Arc<Cache>,
    pub(crate) coalescer: Arc<Coalescer>,
    pub(crate) upstream: Upstream,
    pub(crate) limits: Limits,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) metrics: Arc<Metrics>,
    /// The cache's Redis (`cache.redis_url`).
    pub(crate) cache_redis: Option<Arc<RedisStore>>,
    /// The Redis of rate buckets, quotas and the ledger (`state.redis_url`);
    /// the same store as `cache_redis` when the config does not separate them.
    pub(crate) state_redis: Option<Arc<RedisStore>>,
    /// The global in-flight bound (`server.max_in_flight`), shared by every
    /// API route's concurrency limit.
    pub(crate) in_flight: Arc<Semaphore>,
    /// Upstream calls in flight, held by a miss's own task until it is
    /// cached and metered: bounds calls whose clients hung up, and shutdown
    /// waits for every slot to come back.
    pub(crate) upstream_slots: Arc<Semaphore>,
    /// Each tenant's share of the in-flight bound.
    pub(crate) tenant_slots: Arc<TenantSlots>,
    /// The per-second budget of refusals' access lines.
    pub(crate) refusal_lines: RefusalLines,
    /// Batch tasks' owners (state Redis, or SQLite beside the ledger's).
    pub(crate) tasks: TaskStore,
    /// The models upload policies are fetched for: ONE-PEACE's and every
    /// multimodal model of the table (the SDK uploads local files for
    /// them all).
    pub(crate) upload_models: Vec<String>,
    /// ONE-PEACE bodies parsed lately (the parse rules are `config`'s).
    pub(crate) parse_memo: ParseMemo,
}

impl App {
    /// Builds the state; must run inside a tokio runtime (it starts the
    /// Redis connector and the ledger's shipper). Fails when the ledger's
    /// journal or database cannot be opened (the message says why).
    pub(crate) fn new(config: Config) -> Result<Arc<App>, String> {
        let metrics = Arc::new(Metrics::new().map_err(|e| format!("metrics: {e}"))?);
        let (cache_redis, state_redis) = stores(&config, &metrics)?;
        let cache = Arc::new(Cache::new(
            config.cache.memory_max_bytes,
            config.cache.hot_max_bytes,
            match config.cache.compact_form {
                CompactForm::Float32 => Words::Float32,
                CompactForm::Digits => Words::Digits,
            },
            cache_redis.clone(),
            config.cache.ttl,
        ));
        let upstream = Upstream::new(&config.upstream, metrics.clone())?;
        let limits = Limits::new(
            state_redis.clone(),
            config.limits.quota_on_store_error,
            metrics.clone(),
        );
        let ledger = Ledger::open_with_events(
            &config.ledger,
            &config.events,
            state_redis.clone(),
            metrics.clone(),
        )?;
        let upload_models = config
            .upstream
            .models
            .iter()
            .cloned()
            .chain(
                config
                    .models
                    .iter()
                    .filter(|m| m.api == crate::config::ModelApi::Multimodal)
                    .map(|m| m.name.clone()),
            )
            .collect();
        let tasks = TaskStore::open(state_redis.clone(), &config.ledger.sqlite_path)?;
        let tenants = ArcSwap::from_pointee(TenantTable::build(&config, &config.server));
        let in_flight = Arc::new(Semaphore::new(config.server.max_in_flight));
        let upstream_slots = Arc::new(Semaphore::new(config.server.max_in_flight));
        Ok(Arc::new(App {
            config,
            tenants,
            cache,
            coalescer: Arc::new(Coalescer::default()),
            upstream,
            limits,
            ledger,
            metrics,
            cache_redis,
            state_redis,
            in_flight,
            upstream_slots,
            tenant_slots: Arc::new(TenantSlots::default()),
            refusal_lines: RefusalLines::default(),
            tasks,
            upload_models,
            parse_memo: ParseMemo::default(),
        }))
    }

    /// Upstream attempts of unknown outcome for one request to `model`:
    /// counted, and their possible cost in the ledger (journaled) as
    /// `unknown`.
    pub(crate) fn meter_unknown(
        &self,
        tenant: &Arc<str>,
        model: &str,
        attempts: u32,
        exposure: &Usage,
    ) {
        self.metrics
            .upstream_unknown_outcomes
            .with_label_values(&[tenant])
            .inc_by(u64::from(attempts));
        self.metrics
            .unknown_outcome_units
            .with_label_values(&[tenant, model_label(model)])
            .inc_by(exposure.total());
        self.ledger.record(
            tenant,
            model,
            CacheStatus::Unknown,
            &Reconciled::own(*exposure),
        );
    }

    /// Counters and ledger for one successful call to `model` (`cache` is
    /// hit or miss; a partial answer is metered as two calls, its hit items
    /// and its miss items); returns once it is in the journal (written with
    /// the rows of other answers recorded meanwhile), so the caller may
    /// send the answer. A mismatch of upstream's usage with the
    /// gateway's is counted here (`embedgate_usage_mismatch_total`).
    pub(crate) async fn meter(
        &self,
        tenant: &Arc<str>,
        model: &str,
        cache: CacheStatus,
        r: &Reconciled,
    ) {
        if !cache.is_row_status() {
            tracing::error!(
                %tenant,
                model = model_label(model),
                "an answer metered as partial: meter its hit items and its miss items instead; not metered"
            );
            return;
        }
        self.metrics.record_usage(tenant, model, cache, &r.record);
        self.metrics.record_reconciliation(tenant, cache, r);
        if r.mismatch {
            self.metrics
                .usage_mismatch
                .with_label_values(&[tenant, model_label(model)])
                .inc();
        }
        self.ledger.record_answer(tenant, model, cache, r).await;
    }

    /// Applies a reloaded config's tenants and admin token. Settings that
    /// need a restart are reported, not applied.
    pub(crate) fn apply_reload(&self, new: &Config) -> Vec<&'static str> {
        self.tenants
            .store(Arc::new(TenantTable::build(new, &self.config.server)));
        let configured = |name: &str| new.tenants.iter().any(|t| t.name == name);
        self.limits.retain(configured);
        self.tenant_slots.retain(configured);
        let mut restart = Vec::new();
        let c = &self.config;
        if c.models != new.models {
            restart.push("models");
        }
        if c.server.listen != new.server.listen
            || c.server.metrics_listen != new.server.metrics_listen
        {
            restart.push("server.listen");
        }
        if c.server.max_in_flight != new.server.max_in_flight
            || c.server.max_connections != new.server.max_connections
            || c.server.tenant_in_flight_share != new.server.tenant_in_flight_share
            || c.server.idle_timeout != new.server.idle_timeout
            || c.server.header_read_timeout != new.server.header_read_timeout
            || c.server.body_read_timeout != new.server.body_read_timeout
            || c.server.body_min_bytes_per_second != new.server.body_min_bytes_per_second
            || c.server.max_body_bytes != new.server.max_body_bytes
        {
            restart.push("server");
        }
        if c.cache.redis_url != new.cache.redis_url
            || c.cache.redis_cluster != new.cache.redis_cluster
            || c.cache.redis_timeout != new.cache.redis_timeout
            || c.cache.scope != new.cache.scope
            || c.cache.ttl != new.cache.ttl
            || c.cache.memory_max_bytes != new.cache.memory_max_bytes
            || c.cache.hot_max_bytes != new.cache.hot_max_bytes
            || c.cache.compact_form != new.cache.compact_form
        {
            restart.push("cache");
        }
        if c.state != new.state {
            restart.push("state");
        }
        if c.upstream.base_url != new.upstream.base_url
            || c.upstream.api_key_env != new.upstream.api_key_env
        {
            restart.push("upstream");
        }
        if c.metering.weights != new.metering.weights {
            restart.push("metering.weights");
        }
        if c.ledger != new.ledger {
            restart.push("ledger");
        }
        if c.events != new.events {
            restart.push("events");
        }
        if c.telemetry != new.telemetry {
            restart.push("telemetry");
        }
        restart
    }
}

/// The cache's Redis and the state's: two connections when the config
/// separates them, one holding both when it does not.
#[allow(clippy::type_complexity)]
fn stores(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(Option<Arc<RedisStore>>, Option<Arc<RedisStore>>), String> {
    let (cache, state) = (&config.cache, &config.state);
    if state.same_as_cache(cache) {
        let both = match &cache.redis_url {
            Some(url) => Some(RedisStore::start(
                url,
                cache.redis_cluster,
                cache.redis_timeout,
                Holds::Both,
                metrics.clone(),
            )?),
            None => None,
        };
        return Ok((both.clone(), both));
    }
    let start = |url: &Option<crate::secret::Secret>, cluster, timeout, holds| match url {
        Some(url) => RedisStore::start(url, cluster, timeout, holds, metrics.clone()).map(Some),
        None => Ok(None),
    };
    Ok((
        start(
            &cache.redis_url,
            cache.redis_cluster,
            cache.redis_timeout,
            Holds::Cache,
        )?,
        start(
            &state.redis_url,
            state.redis_cluster,
            state.redis_timeout,
            Holds::State,
        )?,
    ))
}
