//! Embedding cache: an in-process, byte-bounded memory cache (alone, or as
//! an L1 in front of Redis) and Redis.
//!
//! A value is only ever a successful upstream answer's `output.embedding`,
//! stored as the JSON text upstream sent. Values read from Redis are checked
//! (a list of `dimension` finite numbers) before they are served; anything
//! else is treated as a miss and overwritten by the next answer.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::Cache as QuickCache;
use quick_cache::Weighter;

use crate::cache_key::CacheKey;
use crate::gzip::Precompressed;
use crate::redis_store::RedisStore;

/// Prefix of values in Redis: versioned so a format change never serves
/// old bytes as new ones.
const REDIS_VALUE_PREFIX: &[u8] = b"eg1:";
/// A typical entry (1536 floats as JSON text), to size the memory index.
const TYPICAL_ENTRY_BYTES: u64 = 32 * 1024;

/// The gzip form of an entry, made on its first gzip hit.
type GzCell = Arc<OnceLock<Option<Precompressed>>>;

#[derive(Clone)]
struct Entry {
    embedding: Bytes,
    gz: GzCell,
    expires: Instant,
}

impl Entry {
    fn new(embedding: Bytes, expires: Instant) -> Entry {
        Entry {
            embedding,
            gz: GzCell::default(),
            expires,
        }
    }
}

/// A hit of [`Cache::get_found`]: the vector and its gzip form, which is
/// compressed once per entry (on the first hit that asks for it).
pub(crate) struct Found {
    pub(crate) embedding: Bytes,
    gz: GzCell,
}

impl Found {
    pub(crate) fn gzip(&self) -> Option<&Precompressed> {
        self.gz
            .get_or_init(|| Precompressed::of(&self.embedding))
            .as_ref()
    }
}

#[derive(Clone)]
struct EntryWeight;

impl Weighter<CacheKey, Entry> for EntryWeight {
    fn weight(&self, _key: &CacheKey, val: &Entry) -> u64 {
        // Key, bookkeeping, the bytes themselves and room for their gzip
        // form (made on the first gzip hit: about 45% of float text).
        (val.embedding.len() as u64 * 3 / 2 + 96).max(1)
    }
}

/// What a lookup found.
pub(crate) enum Lookup {
    Hit(Bytes),
    Miss,
}

pub(crate) struct Cache {
    memory: Option<QuickCache<CacheKey, Entry, EntryWeight>>,
    redis: Option<Arc<RedisStore>>,
    ttl: Duration,
    /// Redis keys live under this prefix.
    namespace: &'static str,
}

impl Cache {
    pub(crate) fn new(
        memory_max_bytes: u64,
        redis: Option<Arc<RedisStore>>,
        ttl: Duration,
    ) -> Cache {
        let memory = (memory_max_bytes > 0).then(|| {
            let items = (memory_max_bytes / TYPICAL_ENTRY_BYTES).clamp(16, 1 << 20) as usize;
            QuickCache::with_weighter(items, memory_max_bytes, EntryWeight)
        });
        Cache {
            memory,
            redis,
            ttl,
            namespace: "eg:c:",
        }
    }

    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}{}", self.namespace, key.to_hex())
    }

    /// Looks `key` up; a Redis error or timeout is a miss.
    pub(crate) async fn get(&self, key: &CacheKey, dimension: usize) -> Lookup {
        self.get_with(key, |raw| valid_embedding(raw, dimension))
            .await
    }

    /// [`get`](Cache::get), with the entry's gzip form at hand.
    pub(crate) async fn get_found(&self, key: &CacheKey, dimension: usize) -> Option<Found> {
        self.lookup(key, |raw| valid_embedding(raw, dimension))
            .await
            .map(|e| Found {
                embedding: e.embedding,
                gz: e.gz,
            })
    }

    /// Looks `key` up; an entry read from Redis is served only if `valid`
    /// says it is whole (memory holds only what this process stored).
    pub(crate) async fn get_with(&self, key: &CacheKey, valid: impl Fn(&[u8]) -> bool) -> Lookup {
        match self.lookup(key, valid).await {
            Some(e) => Lookup::Hit(e.embedding),
            None => Lookup::Miss,
        }
    }

    async fn lookup(&self, key: &CacheKey, valid: impl Fn(&[u8]) -> bool) -> Option<Entry> {
        if let Some(mem) = &self.memory {
            if let Some(e) = mem.get(key) {
                if e.expires > Instant::now() {
                    return Some(e);
                }
                mem.remove(key);
            }
        }
        let Some(redis) = &self.redis else {
            return None;
        };
        let rkey = self.redis_key(key);
        let got = redis
            .call("cache_get", false, |mut c| async move {
                redis::cmd("GET")
                    .arg(&rkey)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            })
            .await;
        let raw = match got {
            Ok(Some(raw)) => raw,
            Ok(None) | Err(_) => return None,
        };
        let Some(body) = raw.strip_prefix(REDIS_VALUE_PREFIX) else {
            tracing::warn!(key = ?key, "cache entry in an unknown format; treated as a miss");
            return None;
        };
        if !valid(body) {
            tracing::warn!(key = ?key, "cache entry failed validation; treated as a miss");
            return None;
        }
        // The L1 copy expires no later than a fresh Redis entry would.
        let entry = Entry::new(Bytes::copy_from_slice(body), Instant::now() + self.ttl);
        if let Some(mem) = &self.memory {
            mem.insert(*key, entry.clone());
        }
        Some(entry)
    }

    /// Stores an embedding that was validated by the caller. With a memory
    /// cache it is readable here when this returns and Redis is written in
    /// the background; without one, this waits for the Redis write, so the
    /// entry is readable before the caller lets identical requests go.
    pub(crate) async fn store(self: &Arc<Self>, key: CacheKey, embedding: Bytes) {
        if self.memory.is_some() {
            self.put_memory(&key, embedding.clone());
            if self.redis.is_some() {
                let me = self.clone();
                tokio::spawn(async move { me.put_redis(&key, embedding).await });
            }
        } else {
            self.put_redis(&key, embedding).await;
        }
    }

    /// A second look for a request that just became the leader of a miss:
    /// the previous leader may have stored the answer between this request's
    /// lookup and its turn. Memory only when there is a memory cache.
    pub(crate) async fn recheck(&self, key: &CacheKey, dimension: usize) -> Option<Bytes> {
        if let Some(mem) = &self.memory {
            return mem
                .get(key)
                .filter(|e| e.expires > Instant::now())
                .map(|e| e.embedding);
        }
        match self.get(key, dimension).await {
            Lookup::Hit(e) => Some(e),
            Lookup::Miss => None,
        }
    }

    /// Stores in memory and Redis, waiting for both.
    #[cfg(test)]
    pub(crate) async fn put(&self, key: &CacheKey, embedding: Bytes) {
        self.put_memory(key, embedding.clone());
        self.put_redis(key, embedding).await;
    }

    fn put_memory(&self, key: &CacheKey, embedding: Bytes) {
        if let Some(mem) = &self.memory {
            mem.insert(*key, Entry::new(embedding, Instant::now() + self.ttl));
        }
    }

    async fn put_redis(&self, key: &CacheKey, embedding: Bytes) {
        let Some(redis) = &self.redis else {
            return;
        };
        let rkey = self.redis_key(key);
        let ttl_ms = self.ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        let mut value = Vec::with_capacity(REDIS_VALUE_PREFIX.len() + embedding.len());
        value.extend_from_slice(REDIS_VALUE_PREFIX);
        value.extend_from_slice(&embedding);
        // Skipped while Redis is down: the next miss refills it.
        let _ = redis
            .call("cache_put", false, |mut c| async move {
                redis::cmd("SET")
                    .arg(&rkey)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
    }
}

/// True when `raw` is a JSON list of exactly `dimension` numbers.
///
/// One pass over the bytes with JSON's number grammar, without converting
/// to floats: this runs on every miss and every Redis hit, and parsing
/// 1536 floats costs more than the rest of the request.
pub(crate) fn valid_embedding(raw: &[u8], dimension: usize) -> bool {
    let mut i = skip_ws(raw, 0);
    if raw.get(i) != Some(&b'[') {
        return false;
    }
    i = skip_ws(raw, i + 1);
    let mut count = 0usize;
    if raw.get(i) == Some(&b']') {
        return dimension == 0 && skip_ws(raw, i + 1) == raw.len();
    }
    loop {
        match json_number(raw, i) {
            Some(end) => i = skip_ws(raw, end),
            None => return false,
        }
        count += 1;
        match raw.get(i) {
            Some(b',') => i = skip_ws(raw, i + 1),
            Some(b']') => return count == dimension && skip_ws(raw, i + 1) == raw.len(),
            _ => return false,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

fn digits(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b'0'..=b'9')) {
        i += 1;
    }
    i
}

/// The end of the JSON number starting at `i`, if one does. Integer parts
/// of up to 16 digits and exponents up to 290 keep every value finite.
fn json_number(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => {
            let end = digits(b, i + 1);
            if end - i > 16 {
                return None;
            }
            i = end;
        }
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits(b, i);
        if end == i || end - i > 3 {
            return None;
        }
        let exp: u32 = b[i..end]
            .iter()
            .fold(0, |acc, d| acc * 10 + u32::from(d - b'0'));
        if exp > 290 {
            return None;
        }
        i = end;
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(valid_embedding(b"[1,2.5,-0.020782470703125]", 3));
        assert!(valid_embedding(b" [ 1e-3 , -0 ,2E+10 ] ", 3));
        assert!(valid_embedding(b"[]", 0));
        for bad in [
            &b"[1,2]"[..],
            b"[1,\"2\",3]",
            b"{}",
            b"[1,2,",
            b"[1,2,3",
            b"[1,2,3]x",
            b"[01,2,3]",
            b"[1.,2,3]",
            b"[.5,2,3]",
            b"[1e999,2,3]",
            b"[+1,2,3]",
            b"[NaN,2,3]",
            b"[1,,3]",
            b"[1,2,null]",
            b"[[1],2,3]",
        ] {
            assert!(!valid_embedding(bad, 3), "{}", String::from_utf8_lossy(bad));
        }
        // Agrees with serde_json on what it accepts.
        let v: Vec<f64> = (0..1536).map(|i| (i as f64 - 700.0) / 3.7e3).collect();
        let text = serde_json::to_vec(&v).unwrap_or_default();
        assert!(valid_embedding(&text, 1536));
    }

    #[tokio::test]
    async fn memory_hit_and_expiry() {
        let models = vec!["m".to_string()];
        let req = crate::request::EmbeddingRequest::parse(
            br#"{"model":"m","input":{"contents":[{"text":"a"}]}}"#,
            &crate::request::ParseRules::for_tests(&models),
        );
        let Ok(req) = req else { return };
        let key = crate::cache_key::cache_key(
            crate::cache_key::KeyScope::Shared,
            None,
            &req,
            &crate::forwarded::ForwardedHeaders::default(),
        );
        let c = Cache::new(1 << 20, None, Duration::from_millis(1));
        assert!(matches!(c.get(&key, 2).await, Lookup::Miss));
        c.put(&key, Bytes::from_static(b"[1,2]")).await;
        let c2 = Cache::new(1 << 20, None, Duration::from_secs(60));
        c2.put(&key, Bytes::from_static(b"[1,2]")).await;
        assert!(matches!(c2.get(&key, 2).await, Lookup::Hit(b) if &b[..] == b"[1,2]"));
        // The 1 ms entry: once its deadline passes it is gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if matches!(c.get(&key, 2).await, Lookup::Miss) {
                break;
            }
            assert!(Instant::now() < deadline, "entry never expired");
            tokio::task::yield_now().await;
        }
    }
}
