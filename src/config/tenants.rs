//! `[[tenants]]`: who may call, with which keys, how often, how much. The
//! one part of the config that hot reload applies.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Deserializer};

use super::check::Check;
use super::values;
use crate::secret::Digest;

/// Tenant names are metric labels and Redis key tags: short keeps both cheap.
const MAX_TENANT_NAME_LEN: usize = 64;
/// The SDK fetches one upload policy per call that has local files, so one
/// a second with five at once covers a team uploading in a loop; the
/// certificate API allows the whole company account 100 a second per model,
/// so no one team can use it up, and only about a hundred at once could.
const DEFAULT_UPLOADS_RATE: RateConfig = RateConfig {
    per_second: 1.0,
    burst: 5,
};

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

impl<'de> Deserialize<'de> for QuotaPeriod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        values::one_of(
            d,
            &[("day", QuotaPeriod::Day), ("month", QuotaPeriod::Month)],
        )
    }
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
    /// Upload policies (`GET /api/v1/uploads`): a bucket of its own, always set.
    pub uploads_rate: RateConfig,
    pub quota: Option<QuotaConfig>,
    /// Requests of this tenant in flight at once; `None`: its share of
    /// `server.max_in_flight` (`server.tenant_in_flight_share`).
    pub max_in_flight: Option<usize>,
    /// The models this tenant may call; `None`: every model served.
    pub models: Option<Vec<String>>,
}

/// One `[[tenants]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    name: Option<String>,
    #[serde(default, deserialize_with = "values::strings")]
    key_sha256: Option<Vec<String>>,
    workspace: Option<String>,
    rate: Option<RawRate>,
    uploads_rate: Option<RawRate>,
    quota: Option<RawQuota>,
    max_in_flight: Option<i64>,
    #[serde(default, deserialize_with = "values::strings")]
    models: Option<Vec<String>>,
}

/// `rate = { per_second, burst }` (and `uploads_rate`) as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRate {
    per_second: Option<f64>,
    burst: Option<i64>,
}

/// `quota = { units, per }` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuota {
    units: Option<i64>,
    per: Option<QuotaPeriod>,
}

/// For `#[serde(default, deserialize_with = "tenants::list")]`.
pub(crate) fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RawTenant>, D::Error> {
    values::list(d, "a list of tables ([[tenants]])")
}

/// Checks every tenant, and that no name or key is used twice.
pub(crate) fn load(raw: Vec<RawTenant>, c: &mut Check<'_>) -> Vec<TenantConfig> {
    let mut tenants = Vec::new();
    let mut names = HashSet::new();
    let mut key_owner: BTreeMap<Digest, String> = BTreeMap::new();
    for (i, t) in raw.into_iter().enumerate() {
        let at = format!("tenants[{i}]");
        let name = match t.name {
            Some(n) if valid_name(&n) => n,
            Some(n) => {
                c.err(
                    &format!("{at}.name"),
                    format!(
                        "`{n}` must be 1-{MAX_TENANT_NAME_LEN} characters of a-z, A-Z, 0-9, '-', '_'"
                    ),
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
        let rate = t.rate.and_then(|r| r.load(&format!("{at}.rate"), c));
        let uploads_rate = t
            .uploads_rate
            .and_then(|r| r.load(&format!("{at}.uploads_rate"), c))
            .unwrap_or(DEFAULT_UPLOADS_RATE);
        let quota = t.quota.and_then(|q| q.load(&at, c));
        let max_in_flight = t
            .max_in_flight
            .map(|_| c.positive(&format!("{at}.max_in_flight"), t.max_in_flight, 1usize));
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
            uploads_rate,
            quota,
            max_in_flight,
            models: t.models,
        });
    }
    tenants
}

impl RawRate {
    /// `at` is the table's dotted key, e.g. `tenants[0].rate`.
    fn load(self, at: &str, c: &mut Check<'_>) -> Option<RateConfig> {
        let per_second = match self.per_second {
            Some(v) if v.is_finite() && v > 0.0 => v,
            Some(v) => {
                c.err(
                    &format!("{at}.per_second"),
                    format!("must be a number > 0, got {v}"),
                );
                return None;
            }
            None => {
                let table = at.rsplit('.').next().unwrap_or(at);
                c.err(
                    &format!("{at}.per_second"),
                    format!("is required in {table}"),
                );
                return None;
            }
        };
        let burst = c.positive(
            &format!("{at}.burst"),
            self.burst,
            default_burst(per_second),
        );
        Some(RateConfig {
            per_second,
            burst: u32::try_from(burst).unwrap_or(u32::MAX),
        })
    }
}

/// One second's worth of requests, and at least one.
fn default_burst(per_second: f64) -> u64 {
    // Saturating float-to-int: `per_second` is finite and > 0 here.
    per_second.ceil().max(1.0) as u64
}

impl RawQuota {
    fn load(self, at: &str, c: &mut Check<'_>) -> Option<QuotaConfig> {
        let units = match self.units {
            Some(v) => match u64::try_from(v) {
                Ok(units) => units,
                Err(_) => {
                    c.err(
                        &format!("{at}.quota.units"),
                        format!("must be >= 0, got {v}"),
                    );
                    return None;
                }
            },
            None => {
                c.err(&format!("{at}.quota.units"), "is required in quota");
                return None;
            }
        };
        let Some(per) = self.per else {
            c.err(
                &format!("{at}.quota.per"),
                "is required in quota (\"day\" or \"month\")",
            );
            return None;
        };
        Some(QuotaConfig { units, per })
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_TENANT_NAME_LEN
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
