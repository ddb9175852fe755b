//! Tenants: `Authorization: Bearer <key>` is matched by SHA-256 digest,
//! never by plaintext. The table is rebuilt on reload and swapped
//! atomically; requests in flight keep the tenant they started with. Used by
//! the [`auth`](crate::auth) layer.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderMap;

use crate::config::{Config, QuotaConfig, RateConfig, ServerConfig, TenantConfig};
use crate::secret::Digest;

pub(crate) struct Tenant {
    pub(crate) name: Arc<str>,
    /// Sent upstream as `X-DashScope-WorkSpace`.
    pub(crate) workspace: Option<String>,
    pub(crate) rate: Option<RateConfig>,
    /// Upload policies' own rate, never unlimited.
    pub(crate) uploads_rate: RateConfig,
    pub(crate) quota: Option<QuotaConfig>,
    /// Requests in flight at once (the fair-share layer).
    pub(crate) max_in_flight: usize,
    /// The models it may call; `None`: every model served.
    pub(crate) models: Option<Vec<String>>,
}

impl Tenant {
    /// May this tenant call `model`?
    pub(crate) fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == model))
    }
}

/// Everything that hot reload swaps.
pub(crate) struct TenantTable {
    by_digest: HashMap<Digest, Arc<Tenant>>,
    by_name: HashMap<Arc<str>, Arc<Tenant>>,
    pub(crate) admin: Option<Digest>,
}

impl TenantTable {
    /// Builds the table for `config`; in-flight shares are taken of the
    /// running server's bound (`server` is restart-only).
    pub(crate) fn build(config: &Config, server: &ServerConfig) -> TenantTable {
        let mut by_digest = HashMap::new();
        let mut by_name = HashMap::new();
        for TenantConfig {
            name,
            keys,
            workspace,
            rate,
            uploads_rate,
            quota,
            max_in_flight,
            models,
        } in &config.tenants
        {
            let t = Arc::new(Tenant {
                name: Arc::from(name.as_str()),
                workspace: workspace.clone(),
                rate: *rate,
                uploads_rate: *uploads_rate,
                quota: *quota,
                max_in_flight: server.tenant_max_in_flight(*max_in_flight),
                models: models.clone(),
            });
            for k in keys {
                by_digest.insert(*k, t.clone());
            }
            by_name.insert(t.name.clone(), t);
        }
        TenantTable {
            by_digest,
            by_name,
            admin: config.admin.as_ref().map(|a| a.token),
        }
    }

    /// The tenant whose key the request presents, if any.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Option<Arc<Tenant>> {
        let key = bearer(headers)?;
        self.by_digest.get(&Digest::of(key.as_bytes())).cloned()
    }

    /// True when the request presents the admin token.
    pub(crate) fn is_admin(&self, headers: &HeaderMap) -> bool {
        match (&self.admin, bearer(headers)) {
            (Some(want), Some(key)) => Digest::of(key.as_bytes()).ct_eq(want),
            _ => false,
        }
    }

    pub(crate) fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.by_name.keys().map(|n| n.to_string()).collect();
        v.sort();
        v
    }

    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }
}

/// The key from `Authorization: Bearer <key>` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let key = key.trim();
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn table(src: &str) -> TenantTable {
        let c = Config::parse(src, &|_| None).unwrap();
        TenantTable::build(&c, &c.server)
    }

    fn with_key(k: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {k}")).unwrap(),
        );
        h
    }

    #[test]
    fn keys_match_by_digest_with_rotation() {
        let a = Digest::of(b"key-a1").to_hex();
        let a2 = Digest::of(b"key-a2").to_hex();
        let b = Digest::of(b"key-b").to_hex();
        let t = table(&format!(
            "[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{a}\", \"{a2}\"]\n[[tenants]]\nname = \"b\"\nkey_sha256 = [\"{b}\"]\n"
        ));
        assert_eq!(&*t.authenticate(&with_key("key-a1")).unwrap().name, "a");
        assert_eq!(&*t.authenticate(&with_key("key-a2")).unwrap().name, "a");
        assert_eq!(&*t.authenticate(&with_key("key-b")).unwrap().name, "b");
        assert!(t.authenticate(&with_key("key-c")).is_none());
        assert!(t.authenticate(&HeaderMap::new()).is_none());
        let mut basic = HeaderMap::new();
        basic.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Basic key-b"),
        );
        assert!(t.authenticate(&basic).is_none());
    }
}
