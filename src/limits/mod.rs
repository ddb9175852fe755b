//! Per-tenant rate limits ([`rate`]) and unit quotas ([`quota`]), in Redis
//! when it is configured (shared by every replica), else in this process.
//!
//! State is keyed by tenant name and takes the tenant's limits as
//! arguments, so this module knows nothing of authentication and a reload
//! that leaves a tenant's limits unchanged keeps its state.

mod quota;
mod rate;

use std::sync::Arc;

pub(crate) use quota::Reservation;
pub(crate) use rate::{RateRefusal, RateState};

use crate::config::{QuotaConfig, RateConfig, StoreErrorPolicy};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::redis_store::RedisStore;

pub(crate) struct Limits {
    rates: rate::Rates,
    quotas: Arc<quota::Quotas>,
}

impl Limits {
    /// Must run inside a tokio runtime with Redis: it starts the task that
    /// repays quota used locally during a Redis outage.
    pub(crate) fn new(
        redis: Option<Arc<RedisStore>>,
        policy: StoreErrorPolicy,
        metrics: Arc<Metrics>,
    ) -> Limits {
        let quotas = Arc::new(quota::Quotas::new(redis.clone(), policy, metrics));
        if redis.is_some() {
            tokio::spawn(quotas.clone().repay_loop());
        }
        Limits {
            rates: rate::Rates::new(redis),
            quotas,
        }
    }

    /// Takes one request from the tenant's rate.
    pub(crate) async fn check_rate(
        &self,
        tenant: &Arc<str>,
        cfg: RateConfig,
    ) -> Result<RateState, RateRefusal> {
        self.rates.check(tenant, cfg).await
    }

    /// Reserves `units` of the tenant's quota before an upstream call.
    pub(crate) async fn reserve(
        &self,
        tenant: &Arc<str>,
        quota: QuotaConfig,
        units: u64,
    ) -> Result<Reservation, GatewayError> {
        self.quotas.reserve(tenant, quota, units).await
    }

    /// The request succeeded and upstream billed `actual` units.
    pub(crate) async fn settle(&self, r: Reservation, actual: u64) {
        self.quotas.settle(r, actual).await
    }

    /// The request failed: the units go back.
    pub(crate) async fn release(&self, r: Reservation) {
        self.quotas.release(r).await
    }

    /// Units left in the tenant's current period, as last seen here.
    pub(crate) fn remaining(&self, tenant: &Arc<str>, quota: QuotaConfig) -> u64 {
        self.quotas.remaining(tenant, quota)
    }

    /// After a reload: forgets the rate state of tenants no longer configured.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.rates.retain(keep)
    }
}
