//! Per-tenant rate limits ([`rate`]) and unit quotas ([`quota`]), in Redis
//! when it is configured (shared by every replica), else in this process.
//! A tenant has two rates, one per [`RateBucket`], each its own bucket.
//!
//! State is keyed by tenant name and takes the tenant's limits as
//! arguments, so this module knows nothing of authentication and a reload
//! that leaves a tenant's limits unchanged keeps its state.

mod quota;
mod rate;

use std::sync::Arc;

use tracing::Instrument;

pub(crate) use quota::Reservation;
pub(crate) use rate::{RateRefusal, RateState};

use crate::config::{QuotaConfig, RateConfig, StoreErrorPolicy};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::redis_store::RedisStore;

/// Which of a tenant's rates a request spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateBucket {
    /// `rate`: embedding requests.
    Embeddings,
    /// `uploads_rate`: upload policies, which spend the company account's
    /// certificate rate rather than embedding capacity.
    Uploads,
}

impl RateBucket {
    /// The bucket's Redis key after the tenant's hash tag.
    fn redis_suffix(self) -> &'static str {
        match self {
            RateBucket::Embeddings => "rate",
            RateBucket::Uploads => "uploads-rate",
        }
    }
}

pub(crate) struct Limits {
    rates: rate::Rates,
    upload_rates: rate::Rates,
    quotas: Arc<quota::Quotas>,
}

impl Limits {
    /// Must run inside a tokio runtime with Redis: it starts the task that
    /// applies to Redis the quota transitions it did not answer in time.
    pub(crate) fn new(
        redis: Option<Arc<RedisStore>>,
        policy: StoreErrorPolicy,
        metrics: Arc<Metrics>,
    ) -> Limits {
        let rates = rate::Rates::new(
            redis.clone(),
            RateBucket::Embeddings.redis_suffix(),
            &metrics,
        );
        let upload_rates =
            rate::Rates::new(redis.clone(), RateBucket::Uploads.redis_suffix(), &metrics);
        let quotas = Arc::new(quota::Quotas::new(redis.clone(), policy, metrics));
        if redis.is_some() {
            tokio::spawn(quotas.clone().sync_loop());
        }
        Limits {
            rates,
            upload_rates,
            quotas,
        }
    }

    /// Takes one request from the tenant's rate `cfg` in `bucket`.
    pub(crate) async fn check_rate(
        &self,
        bucket: RateBucket,
        tenant: &Arc<str>,
        cfg: RateConfig,
    ) -> Result<RateState, RateRefusal> {
        match bucket {
            RateBucket::Embeddings => self.rates.check(tenant, cfg).await,
            RateBucket::Uploads => self.upload_rates.check(tenant, cfg).await,
        }
    }

    /// Reserves `units` of the tenant's quota before an upstream call.
    pub(crate) async fn reserve(
        &self,
        tenant: &Arc<str>,
        quota: QuotaConfig,
        units: u64,
    ) -> Result<Reservation, GatewayError> {
        let span = tracing::debug_span!(target: crate::telemetry::TARGET, "quota");
        self.quotas
            .reserve(tenant, quota, units)
            .instrument(span)
            .await
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

    /// Sends quota transitions Redis has not confirmed yet, until none is
    /// left or `deadline` passes (shutdown). True when none is left.
    pub(crate) async fn flush(&self, deadline: std::time::Duration) -> bool {
        self.quotas.flush(deadline).await
    }

    /// After a reload: forgets the rate state of tenants no longer configured.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.rates.retain(&keep);
        self.upload_rates.retain(&keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreErrorPolicy;

    #[tokio::test]
    async fn a_tenants_two_buckets_are_spent_apart() {
        let limits = Limits::new(
            None,
            StoreErrorPolicy::Allow,
            Arc::new(Metrics::new().unwrap()),
        );
        let t: Arc<str> = Arc::from("t");
        let one = RateConfig {
            per_second: 0.001,
            burst: 1,
        };
        assert!(limits
            .check_rate(RateBucket::Uploads, &t, one)
            .await
            .is_ok());
        assert!(limits
            .check_rate(RateBucket::Uploads, &t, one)
            .await
            .is_err());
        // The embedding bucket is untouched by the uploads spent.
        assert!(limits
            .check_rate(RateBucket::Embeddings, &t, one)
            .await
            .is_ok());
        assert!(limits
            .check_rate(RateBucket::Embeddings, &t, one)
            .await
            .is_err());
        // Another tenant's uploads bucket is its own.
        let u: Arc<str> = Arc::from("u");
        assert!(limits
            .check_rate(RateBucket::Uploads, &u, one)
            .await
            .is_ok());
    }
}
