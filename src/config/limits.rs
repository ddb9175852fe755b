//! `[limits]`: how quotas behave when their store is down, and what they count.
//! The limits themselves are per tenant (`[[tenants]]`).

use serde::{Deserialize, Deserializer};

use super::check::Check;
use super::values;

/// A Redis outage should not stop embeddings for every team; the overshoot
/// is bounded and added to Redis when it returns.
const DEFAULT_QUOTA_ON_STORE_ERROR: StoreErrorPolicy = StoreErrorPolicy::Allow;
/// Cache hits cost the company nothing upstream, and quotas guard that bill.
const DEFAULT_QUOTA_COUNTS_HITS: bool = false;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorPolicy {
    Allow,
    Deny,
}

impl<'de> Deserialize<'de> for StoreErrorPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        values::one_of(
            d,
            &[
                ("allow", StoreErrorPolicy::Allow),
                ("deny", StoreErrorPolicy::Deny),
            ],
        )
    }
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub quota_on_store_error: StoreErrorPolicy,
    /// Count cache hits against quotas too (default: only upstream units).
    pub quota_counts_hits: bool,
}

/// `[limits]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    quota_on_store_error: Option<StoreErrorPolicy>,
    quota_counts_hits: Option<bool>,
}

impl RawLimits {
    /// `top_level` is `quota_on_store_error` written outside any section, as
    /// SPEC §5 spells it; it may be set there or here, not in both.
    pub(crate) fn load(
        self,
        top_level: Option<StoreErrorPolicy>,
        c: &mut Check<'_>,
    ) -> LimitsConfig {
        let policy = match (top_level, self.quota_on_store_error) {
            (Some(_), Some(_)) => {
                c.err(
                    "quota_on_store_error",
                    "is set both at the top level and in [limits]; keep one",
                );
                None
            }
            (Some(policy), None) | (None, Some(policy)) => Some(policy),
            (None, None) => None,
        };
        LimitsConfig {
            quota_on_store_error: policy.unwrap_or(DEFAULT_QUOTA_ON_STORE_ERROR),
            quota_counts_hits: self.quota_counts_hits.unwrap_or(DEFAULT_QUOTA_COUNTS_HITS),
        }
    }
}
