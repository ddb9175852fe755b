//! Tenants and authentication: `Authorization: Bearer <key>` is matched by
//! SHA-256 digest, never by plaintext. The table is rebuilt on reload and
//! swapped atomically; requests in flight keep the tenant they started with.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderMap;

use crate::config::{Config, QuotaConfig, RateConfig, TenantConfig};
use crate::limits::LocalRate;
use crate::redis_store::tenant_tag;
use crate::secret::Digest;

pub struct Tenant {
    pub name: Arc<str>,
    /// Sent upstream as `X-DashScope-WorkSpace`.
    pub workspace: Option<String>,
    pub rate: Option<RateConfig>,
    pub quota: Option<QuotaConfig>,
    /// The shared rate bucket's Redis key, built once per reload.
    pub rate_key: String,
    /// This process's limiter: the whole limit without Redis, the fallback
    /// while Redis is down.
    pub local_rate: Option<Arc<LocalRate>>,
}

/// Everything that hot reload swaps.
pub struct TenantTable {
    by_digest: HashMap<Digest, Arc<Tenant>>,
    by_name: HashMap<Arc<str>, Arc<Tenant>>,
    pub admin: Option<Digest>,
}

impl TenantTable {
    /// Builds the table for `config`, keeping the limiter state of tenants
    /// whose rate did not change so a reload does not refill buckets.
    pub fn build(config: &Config, previous: Option<&TenantTable>) -> TenantTable {
        let mut by_digest = HashMap::new();
        let mut by_name = HashMap::new();
        for TenantConfig {
            name,
            keys,
            workspace,
            rate,
            quota,
        } in &config.tenants
        {
            let old = previous.and_then(|p| p.by_name.get(name.as_str()));
            let local_rate = match (rate, old) {
                (Some(r), Some(o)) if o.rate.as_ref() == Some(r) => o.local_rate.clone(),
                (Some(r), _) => Some(Arc::new(LocalRate::new(*r))),
                (None, _) => None,
            };
            let t = Arc::new(Tenant {
                name: Arc::from(name.as_str()),
                workspace: workspace.clone(),
                rate: *rate,
                quota: *quota,
                rate_key: format!("{}:rate", tenant_tag(name)),
                local_rate,
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
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Arc<Tenant>> {
        let key = bearer(headers)?;
        self.by_digest.get(&Digest::of(key.as_bytes())).cloned()
    }

    /// True when the request presents the admin token.
    pub fn is_admin(&self, headers: &HeaderMap) -> bool {
        match (&self.admin, bearer(headers)) {
            (Some(want), Some(key)) => Digest::of(key.as_bytes()).ct_eq(want),
            _ => false,
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.by_name.keys().map(|n| n.to_string()).collect();
        v.sort();
        v
    }

    pub fn get(&self, name: &str) -> Option<Arc<Tenant>> {
        self.by_name.get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    fn table(src: &str) -> TenantTable {
        let c = Config::parse(src, &|_| None).unwrap();
        TenantTable::build(&c, None)
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

    #[test]
    fn reload_keeps_unchanged_limiters() {
        let a = Digest::of(b"k").to_hex();
        let src = format!(
            "[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{a}\"]\nrate = {{ per_second = 1, burst = 2 }}\n"
        );
        let c = Config::parse(&src, &|_| None).unwrap();
        let t1 = TenantTable::build(&c, None);
        let t2 = TenantTable::build(&c, Some(&t1));
        let l1 = t1.get("a").unwrap().local_rate.clone().unwrap();
        let l2 = t2.get("a").unwrap().local_rate.clone().unwrap();
        assert!(Arc::ptr_eq(&l1, &l2));
        let changed = Config::parse(&src.replace("burst = 2", "burst = 3"), &|_| None).unwrap();
        let t3 = TenantTable::build(&changed, Some(&t2));
        let l3 = t3.get("a").unwrap().local_rate.clone().unwrap();
        assert!(!Arc::ptr_eq(&l1, &l3));
    }
}
