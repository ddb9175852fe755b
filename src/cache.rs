//! Embedding cache: an in-process, byte-bounded memory cache (alone, or as
//! an L1 in front of Redis) and Redis.
//!
//! A value is only ever a successful upstream answer's `output.embedding`
//! (or one of the family's entries), as the JSON text upstream sent. Values
//! read from Redis are checked (a list of `dimension` finite numbers)
//! before they are served; anything else is treated as a miss and
//! overwritten by the next answer.
//!
//! An entry has two forms:
//!
//! - **text**, as it is stored: a miss does no more than that (most
//!   entries are never hit again);
//! - **compact**, made once by the compaction thread ([`crate::compact`])
//!   when a ONE-PEACE entry is first hit, replacing the text in memory and
//!   in Redis. Which one depends on who hit it:
//!   - a gzip client: the text's raw DEFLATE blocks ([`Precompressed`],
//!     ~42% of float text, `eg2:` in Redis). gzip hits are built around
//!     them as they are; identity hits inflate them (~46 µs);
//!   - an identity client: the **digits form** ([`Digits`]), written back
//!     as text exactly: float32 words (4 bytes per float, ~20% of the
//!     text, `eg4:`, ~20 µs to write back) or, for texts whose numbers are
//!     not float32 values or with `cache.compact_form = "digits"`, decimal
//!     digits (8 bytes per float, ~40%, `eg3:`, ~12 µs). A gzip hit of
//!     such an entry asks for the DEFLATE form, which then replaces it.
//!
//!   Identity hits of either form first look in the **hot tier**: a small
//!   byte-bounded cache of the texts identity clients read
//!   (`cache.hot_max_bytes`, a part of `memory_max_bytes`).
//!
//! Identity clients get the same bytes from every form: a compact one gives
//! the text back exactly (checked when it is made, and by length and CRC-32
//! when it is read from Redis).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::{Cache as QuickCache, EntryAction, EntryResult};
use quick_cache::Weighter;

use crate::cache_key::CacheKey;
use crate::compact::{self, Asked, Compactor, Finisher, Job, Source};
use crate::digits::{Digits, Words};
use crate::gzip::{size_class, Precompressed};
use crate::redis_store::RedisStore;

/// Prefix of a Redis value holding an entry's text. Versioned, like the
/// others, so a format change never serves old bytes as new ones.
const REDIS_TEXT: &[u8] = b"eg1:";
/// Prefix of a Redis value holding an entry's compact form: then the text's
/// length and CRC-32 (4 bytes each, little-endian), then its raw DEFLATE
/// blocks.
const REDIS_COMPACT: &[u8] = b"eg2:";
/// Prefix of a Redis value holding an entry's digits form with decimal
/// digits words ([`Digits::encode`]).
const REDIS_DIGITS: &[u8] = b"eg3:";
/// Prefix of a Redis value holding an entry's digits form with float32
/// words.
const REDIS_FLOAT32: &[u8] = b"eg4:";
/// A typical entry once compacted (1536 floats as JSON text, deflated), to
/// size the memory index.
const TYPICAL_ENTRY_BYTES: u64 = 16 * 1024;
/// A typical text (1536 floats as JSON text), to size the hot tier's index.
const TYPICAL_TEXT_BYTES: u64 = 32 * 1024;
/// Smaller texts stay text: the compact form would save too little.
const MIN_COMPACT_BYTES: usize = 1024;
/// The longest text an `eg2:` value may claim to inflate to: a corrupt
/// length must not allocate without bound (ONE-PEACE's are ~31 KB).
const MAX_TEXT_BYTES: u64 = 16 << 20;
/// Memory of an entry besides its buffers: the key and the entry (128),
/// the cache's slot metadata and index (~40) and the promoted `Bytes`
/// headers.
const ENTRY_OVERHEAD: u64 = 192;
/// Memory of a hot text besides its bytes: the key, the value, the slot,
/// the `Bytes` header and the allocator's.
const HOT_OVERHEAD: u64 = 128;

/// What a memory entry holds.
#[derive(Clone)]
enum Form {
    /// As stored. `settled`: compaction was tried and did not pay, it stays
    /// text.
    Text {
        text: Bytes,
        settled: bool,
    },
    Compact(Precompressed),
    Digits(Digits),
}

#[derive(Clone)]
struct Entry {
    form: Form,
    expires: Instant,
}

impl Entry {
    fn text(text: Bytes, expires: Instant) -> Entry {
        Entry {
            form: Form::Text {
                text,
                settled: false,
            },
            expires,
        }
    }
}

/// The memory an entry holds (its buffers as the allocator rounds them,
/// plus its bookkeeping): what `cache.memory_max_bytes` bounds.
#[derive(Clone)]
struct EntryWeight;

impl Weighter<CacheKey, Entry> for EntryWeight {
    fn weight(&self, _key: &CacheKey, val: &Entry) -> u64 {
        ENTRY_OVERHEAD
            + match &val.form {
                Form::Text { text, .. } => size_class(text.len()) as u64,
                Form::Compact(c) => c.allocated() as u64,
                Form::Digits(d) => d.allocated() as u64,
            }
    }
}

/// A text in the hot tier, with the CRC-32 of the compact form it belongs
/// to: it is served only for that form (the key's entry may have been
/// stored again since).
#[derive(Clone)]
struct HotText {
    text: Bytes,
    crc: u32,
}

#[derive(Clone)]
struct HotWeight;

impl Weighter<CacheKey, HotText> for HotWeight {
    fn weight(&self, _key: &CacheKey, val: &HotText) -> u64 {
        HOT_OVERHEAD + size_class(val.text.len()) as u64
    }
}

/// A hit of [`Cache::get_found`].
pub(crate) enum Found {
    /// The vector's JSON text.
    Text(Bytes),
    /// The vector's compact form, for a client that takes gzip: compressed
    /// once per entry.
    Gzip(Precompressed),
}

/// What a lookup found.
pub(crate) enum Lookup {
    Hit(Bytes),
    Miss,
}

/// What a lookup read, before it is made into an answer.
enum Held {
    /// A memory entry's form, or an `eg1:` Redis value's text.
    Form(Form),
    /// An `eg2:` Redis value: its compact form and the text it was checked as.
    Both(Precompressed, Bytes),
    /// An `eg3:` or `eg4:` Redis value: its digits form and the text it was
    /// checked as.
    DigitsRead(Digits, Bytes),
}

/// The stores, shared with the compaction thread.
struct Stores {
    memory: Option<QuickCache<CacheKey, Entry, EntryWeight>>,
    hot: Option<QuickCache<CacheKey, HotText, HotWeight>>,
    /// Keys whose text was read once and not kept in the hot tier: a text
    /// goes there on its key's second read, so keys read in turn, more of
    /// them than the tier holds, do not churn it (every one evicting
    /// another and the allocator keeping the churned texts' memory).
    seen: Option<Doorkeeper>,
    redis: Option<Arc<RedisStore>>,
    ttl: Duration,
    /// The digits form identity clients' entries are compacted to (the
    /// smallest one a text has, of this kind or larger).
    words: Words,
    /// Redis keys live under this prefix.
    namespace: &'static str,
    /// Where the compaction thread's Redis writes run.
    runtime: Option<tokio::runtime::Handle>,
}

pub(crate) struct Cache {
    stores: Arc<Stores>,
    /// `None` without any store (nothing to compact), or when its thread
    /// could not start.
    compactor: Option<Compactor>,
}

impl Cache {
    /// `hot_max_bytes` of `memory_max_bytes` hold the hot tier (none
    /// without a memory cache); `words`: the digits form's kind.
    pub(crate) fn new(
        memory_max_bytes: u64,
        hot_max_bytes: u64,
        words: Words,
        redis: Option<Arc<RedisStore>>,
        ttl: Duration,
    ) -> Cache {
        let hot_bytes = hot_max_bytes.min(memory_max_bytes / 2);
        let memory = (memory_max_bytes > 0).then(|| {
            let bytes = memory_max_bytes - hot_bytes;
            let items = (bytes / TYPICAL_ENTRY_BYTES).clamp(16, 1 << 20) as usize;
            QuickCache::with_weighter(items, bytes, EntryWeight)
        });
        let hot_items = (hot_bytes / TYPICAL_TEXT_BYTES).clamp(4, 1 << 16) as usize;
        let hot = (memory.is_some() && hot_bytes > 0)
            .then(|| QuickCache::with_weighter(hot_items, hot_bytes, HotWeight));
        let seen = hot.as_ref().map(|_| Doorkeeper::new(hot_items * 2));
        let stores = Arc::new(Stores {
            memory,
            hot,
            seen,
            redis,
            ttl,
            words,
            namespace: "eg:c:",
            runtime: tokio::runtime::Handle::try_current().ok(),
        });
        let compactor = if stores.memory.is_some() || stores.redis.is_some() {
            let s = stores.clone();
            Compactor::start(compact::QUEUE_JOBS, move |job, fin| s.compact(job, fin))
        } else {
            None
        };
        Cache { stores, compactor }
    }

    /// Looks `key` up; a Redis error or timeout is a miss.
    pub(crate) async fn get(&self, key: &CacheKey, dimension: usize) -> Lookup {
        self.get_with(key, |raw| valid_embedding(raw, dimension))
            .await
    }

    /// A ONE-PEACE lookup: the vector's compact form for a client that
    /// takes `gzip` (when the entry has one, or gets one within a bounded
    /// wait), else its text. A hit asks for the entry to be compacted.
    pub(crate) async fn get_found(
        &self,
        key: &CacheKey,
        dimension: usize,
        gzip: bool,
    ) -> Option<Found> {
        let held = self
            .lookup(key, |raw| valid_embedding(raw, dimension))
            .await?;
        match held {
            Held::Both(c, _) if gzip => Some(Found::Gzip(c)),
            Held::Both(c, text) => {
                self.keep_hot(key, &text, c.crc());
                Some(Found::Text(text))
            }
            Held::DigitsRead(d, text) if gzip => Some(
                self.deflated(key, d)
                    .await
                    .map_or(Found::Text(text), Found::Gzip),
            ),
            Held::DigitsRead(d, text) => {
                self.keep_hot(key, &text, d.crc());
                Some(Found::Text(text))
            }
            Held::Form(Form::Compact(c)) if gzip => Some(Found::Gzip(c)),
            Held::Form(Form::Compact(c)) => self.text_of(key, &c).map(Found::Text),
            Held::Form(Form::Digits(d)) if gzip => match self.deflated(key, d.clone()).await {
                Some(c) => Some(Found::Gzip(c)),
                None => self.digits_text(key, &d, false).map(Found::Text),
            },
            Held::Form(Form::Digits(d)) => self.digits_text(key, &d, true).map(Found::Text),
            Held::Form(Form::Text { text, settled }) => {
                let compactor = match &self.compactor {
                    Some(c) if !settled && text.len() >= MIN_COMPACT_BYTES => c,
                    _ => return Some(Found::Text(text)),
                };
                match compactor.ask(*key, &text, !gzip, gzip) {
                    Asked::Queued(done) if gzip => match compact::wait(&done).await {
                        Some(c) => Some(Found::Gzip(c)),
                        None => Some(Found::Text(text)),
                    },
                    Asked::Queued(_) | Asked::Dropped => Some(Found::Text(text)),
                }
            }
        }
    }

    /// The DEFLATE form of a digits entry, for a gzip client: asked of the
    /// compaction thread and waited for a bounded time.
    async fn deflated(&self, key: &CacheKey, d: Digits) -> Option<Precompressed> {
        match self
            .compactor
            .as_ref()?
            .ask(*key, Source::Digits(d), false, true)
        {
            Asked::Queued(done) => compact::wait(&done).await,
            Asked::Dropped => None,
        }
    }

    /// Looks `key` up; an entry read from Redis is served only if `valid`
    /// says it is whole (memory holds only what this process stored).
    pub(crate) async fn get_with(&self, key: &CacheKey, valid: impl Fn(&[u8]) -> bool) -> Lookup {
        let text = match self.lookup(key, valid).await {
            None => None,
            Some(
                Held::Form(Form::Text { text, .. })
                | Held::Both(_, text)
                | Held::DigitsRead(_, text),
            ) => Some(text),
            Some(Held::Form(Form::Compact(c))) => self.text_of(key, &c),
            Some(Held::Form(Form::Digits(d))) => self.digits_text(key, &d, true),
        };
        text.map_or(Lookup::Miss, Lookup::Hit)
    }

    async fn lookup(&self, key: &CacheKey, valid: impl Fn(&[u8]) -> bool) -> Option<Held> {
        let s = &self.stores;
        if let Some(mem) = &s.memory {
            if let Some(e) = mem.get(key) {
                if e.expires > Instant::now() {
                    return Some(Held::Form(e.form));
                }
                mem.remove(key);
            }
        }
        let Some(redis) = &s.redis else {
            return None;
        };
        let rkey = s.redis_key(key);
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
        let held = if let Some(text) = raw.strip_prefix(REDIS_TEXT) {
            if !valid(text) {
                tracing::warn!(key = ?key, "cache entry failed validation; treated as a miss");
                return None;
            }
            Held::Form(Form::Text {
                text: Bytes::copy_from_slice(text),
                settled: false,
            })
        } else if let Some(value) = raw.strip_prefix(REDIS_COMPACT) {
            let Some((c, text)) = decode_compact(value) else {
                tracing::warn!(key = ?key, "compact cache entry does not inflate to its length and CRC; treated as a miss");
                return None;
            };
            if !valid(&text) {
                tracing::warn!(key = ?key, "cache entry failed validation; treated as a miss");
                return None;
            }
            Held::Both(c, text)
        } else if let Some((value, kind)) = raw
            .strip_prefix(REDIS_FLOAT32)
            .map(|v| (v, Words::Float32))
            .or_else(|| raw.strip_prefix(REDIS_DIGITS).map(|v| (v, Words::Digits)))
        {
            let Some((d, text)) = Digits::decode(value, kind) else {
                tracing::warn!(key = ?key, "digits cache entry does not give its length and CRC; treated as a miss");
                return None;
            };
            if !valid(&text) {
                tracing::warn!(key = ?key, "cache entry failed validation; treated as a miss");
                return None;
            }
            Held::DigitsRead(d, text)
        } else {
            tracing::warn!(key = ?key, "cache entry in an unknown format; treated as a miss");
            return None;
        };
        // The L1 copy expires no later than a fresh Redis entry would.
        if let Some(mem) = &s.memory {
            let form = match &held {
                Held::Form(f) => f.clone(),
                Held::Both(c, _) => Form::Compact(c.clone()),
                Held::DigitsRead(d, _) => Form::Digits(d.clone()),
            };
            mem.insert(
                *key,
                Entry {
                    form,
                    expires: Instant::now() + s.ttl,
                },
            );
        }
        Some(held)
    }

    /// A compact entry's text: from the hot tier, else inflated (and kept
    /// there). An entry that does not inflate (a bug) is dropped: a miss.
    fn text_of(&self, key: &CacheKey, c: &Precompressed) -> Option<Bytes> {
        self.compact_text(key, c.crc(), c.len(), true, "deflate", || c.inflate())
    }

    /// A digits entry's text: from the hot tier, else written again (and
    /// kept there if `hot`: an identity client reads it).
    fn digits_text(&self, key: &CacheKey, d: &Digits, hot: bool) -> Option<Bytes> {
        self.compact_text(key, d.crc(), d.len(), hot, "digits", || d.text())
    }

    /// A compact form's text (the form's CRC-32 and text length given):
    /// from the hot tier, else made by `make` and kept there if `hot`. A
    /// form that does not give its text (a bug) is dropped: a miss.
    fn compact_text(
        &self,
        key: &CacheKey,
        crc: u32,
        len: u64,
        hot: bool,
        form: &'static str,
        make: impl FnOnce() -> Option<Bytes>,
    ) -> Option<Bytes> {
        if let Some(t) = self.hot_text(key, crc, len) {
            return Some(t);
        }
        let Some(text) = make() else {
            tracing::error!(key = ?key, form, "a compact memory entry does not give its text; dropped");
            if let Some(mem) = &self.stores.memory {
                mem.remove(key);
            }
            return None;
        };
        if hot {
            self.keep_hot(key, &text, crc);
        }
        Some(text)
    }

    /// The hot tier's text of the compact form with this CRC and length.
    fn hot_text(&self, key: &CacheKey, crc: u32, len: u64) -> Option<Bytes> {
        let h = self.stores.hot.as_ref()?.get(key)?;
        (h.crc == crc && h.text.len() as u64 == len).then_some(h.text)
    }

    fn keep_hot(&self, key: &CacheKey, text: &Bytes, crc: u32) {
        self.stores.keep_hot(key, text, crc, false);
    }

    /// Stores an embedding that was validated by the caller, as text. With
    /// a memory cache it is readable here when this returns and Redis is
    /// written in the background; without one, this waits for the Redis
    /// write, so the entry is readable before the caller lets identical
    /// requests go.
    pub(crate) async fn store(self: &Arc<Self>, key: CacheKey, embedding: Bytes) {
        if self.stores.memory.is_some() {
            self.put_memory(&key, embedding.clone());
            if self.stores.redis.is_some() {
                let s = self.stores.clone();
                tokio::spawn(async move { s.put_text(&key, embedding).await });
            }
        } else {
            self.stores.put_text(&key, embedding).await;
        }
    }

    /// A second look for a request that just became the leader of a miss:
    /// the previous leader may have stored the answer between this request's
    /// lookup and its turn. Memory only when there is a memory cache.
    pub(crate) async fn recheck(&self, key: &CacheKey, dimension: usize) -> Option<Bytes> {
        if let Some(mem) = &self.stores.memory {
            let e = mem.get(key).filter(|e| e.expires > Instant::now())?;
            return match e.form {
                Form::Text { text, .. } => Some(text),
                Form::Compact(c) => self.text_of(key, &c),
                Form::Digits(d) => self.digits_text(key, &d, false),
            };
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
        self.stores.put_text(key, embedding).await;
    }

    fn put_memory(&self, key: &CacheKey, embedding: Bytes) {
        if let Some(mem) = &self.stores.memory {
            mem.insert(
                *key,
                Entry::text(embedding, Instant::now() + self.stores.ttl),
            );
        }
    }
}

impl Stores {
    /// Keeps a text identity clients read in the hot tier, for the compact
    /// form with this CRC-32, if its key was read before (else it only
    /// notes the key); `copy`: in a buffer of its own.
    fn keep_hot(&self, key: &CacheKey, text: &Bytes, crc: u32, copy: bool) {
        let Some(hot) = &self.hot else {
            return;
        };
        // A key the tier holds (for another form) was read before.
        if let Some(seen) = self.seen.as_ref().filter(|_| hot.peek(key).is_none()) {
            if !seen.second_read(key) {
                return;
            }
        }
        let text = if copy {
            Bytes::copy_from_slice(text)
        } else {
            text.clone()
        };
        hot.insert(*key, HotText { text, crc });
    }

    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}{}", self.namespace, key.to_hex())
    }

    /// Writes an entry's text (`eg1:`), with the cache's TTL.
    async fn put_text(&self, key: &CacheKey, text: Bytes) {
        let Some(redis) = &self.redis else {
            return;
        };
        let rkey = self.redis_key(key);
        let ttl_ms = self.ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        let mut value = Vec::with_capacity(REDIS_TEXT.len() + text.len());
        value.extend_from_slice(REDIS_TEXT);
        value.extend_from_slice(&text);
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

    /// Replaces an entry's value with its compact form (`eg2:`, `eg3:` or
    /// `eg4:`), keeping its TTL; an entry that expired or was evicted
    /// meanwhile stays gone. Another answer stored for the key since is replaced too: both
    /// are upstream's answer to the same input.
    async fn put_compact(&self, key: &CacheKey, form: &Form) {
        let Some(redis) = &self.redis else {
            return;
        };
        let rkey = self.redis_key(key);
        let value = match form {
            Form::Compact(c) => encode_compact(c),
            Form::Digits(d) => {
                let mut v = match d.kind() {
                    Words::Float32 => REDIS_FLOAT32,
                    Words::Digits => REDIS_DIGITS,
                }
                .to_vec();
                d.encode(&mut v);
                v
            }
            Form::Text { .. } => return,
        };
        // Skipped while Redis is down: the entry stays text there.
        let _ = redis
            .call("cache_compact", false, |mut c| async move {
                redis::cmd("SET")
                    .arg(&rkey)
                    .arg(value)
                    .arg("XX")
                    .arg("KEEPTTL")
                    .query_async::<redis::Value>(&mut c)
                    .await
            })
            .await;
    }

    /// The compaction thread's work: one entry's compact form, made once,
    /// for the requests waiting on it, the memory entry (only if it still
    /// holds the form the job was made from) and Redis. A gzip client's
    /// job makes the DEFLATE form; an identity client's the smallest digits
    /// form (DEFLATE if the text has none).
    fn compact(self: &Arc<Self>, job: Job, fin: &Finisher) {
        let Job {
            key,
            source,
            read_as_text,
            gzip,
            done,
        } = job;
        let settle = |c: Option<Precompressed>| {
            done.finish(c);
            fin.forget(&key);
        };
        if let Some(mem) = &self.memory {
            match mem.peek(&key).map(|e| e.form) {
                Some(f) if holds(&f, &source) => {}
                // Compacted by an earlier job (this one was asked just
                // before that one replaced the entry).
                Some(Form::Compact(c)) => return settle(Some(c)),
                // Stored again or compacted otherwise since: nothing to do
                // (a gzip hit of a digits entry asks again).
                Some(_) => return settle(None),
                // Evicted: only Redis may still want it.
                None => {
                    if self.redis.is_none() {
                        return settle(None);
                    }
                }
            }
        }
        let Some(text) = source.text() else {
            tracing::error!(key = ?key, "digits cache entry does not give its text; not compacted");
            return settle(None);
        };
        let digits = match (&source, gzip) {
            (Source::Text(_), false) => Digits::smallest(&text, self.words),
            _ => None,
        };
        let form = match digits {
            Some(d) => Some(Form::Digits(d)),
            None => Precompressed::of(&text)
                .filter(|c| c.size() < text.len())
                .map(Form::Compact),
        };
        let Some(form) = form else {
            tracing::debug!(key = ?key, bytes = text.len(), "cache entry does not compress; it stays text");
            if let (Some(mem), Source::Text(t)) = (&self.memory, &source) {
                let _ = mem.entry(&key, Some(Duration::ZERO), |_, e| {
                    if let Form::Text {
                        text: held,
                        settled,
                    } = &mut e.form
                    {
                        if same(held, t) {
                            *settled = true;
                        }
                    }
                    EntryAction::Retain(())
                });
            }
            return settle(None);
        };
        let crc = match &form {
            Form::Compact(c) => c.crc(),
            Form::Digits(d) => d.crc(),
            Form::Text { .. } => 0,
        };
        if let Some(mem) = &self.memory {
            let replaced = mem.entry(&key, Some(Duration::ZERO), |_, e| {
                let holds_source = holds(&e.form, &source);
                if holds_source {
                    e.form = form.clone();
                }
                EntryAction::Retain(holds_source)
            });
            // (A vacant result's guard, dropped here, leaves the key absent.)
            if matches!(replaced, EntryResult::Retained(true)) && read_as_text {
                // A copy: the stored buffer shares its allocator page with
                // other entries' texts (mimalloc: 16 to a 512 KiB page),
                // all freed by compaction, and one kept would keep the
                // whole page from being returned.
                self.keep_hot(&key, &text, crc, true);
            }
            // Hits read the compact form from memory from now on.
            fin.forget(&key);
        }
        // Waiters are woken once the entry is replaced: what they are
        // served, later hits read too.
        done.finish(match &form {
            Form::Compact(c) => Some(c.clone()),
            _ => None,
        });
        match (&self.redis, &self.runtime) {
            (Some(_), Some(rt)) => {
                let me = self.clone();
                let fin = fin.handle();
                // Without memory, the key stays asked until Redis holds the
                // compact form: hits meanwhile join this job.
                rt.spawn(async move {
                    me.put_compact(&key, &form).await;
                    fin.forget(&key);
                });
            }
            _ => fin.forget(&key),
        }
    }
}

/// Notes the keys read once, in a table of slots indexed by a part of the
/// key, each holding another part (a key's note is lost when another key
/// takes its slot): a key read again before the table has seen about as
/// many other keys as it has slots is recognised, one read in turn with
/// many more is not (e.g. 4,096 keys read in turn through 512 slots: one
/// in ~3,000 is).
struct Doorkeeper {
    slots: Box<[AtomicU64]>,
}

impl Doorkeeper {
    /// At least `keys` slots (a power of two).
    fn new(keys: usize) -> Doorkeeper {
        let n = keys.max(16).next_power_of_two();
        Doorkeeper {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// True when `key` was noted and not overwritten since (the note is
    /// used up); else notes it.
    fn second_read(&self, key: &CacheKey) -> bool {
        let (index, tag) = key.words();
        // 0 is an empty slot.
        let tag = tag | 1;
        let slot = &self.slots[index as usize & (self.slots.len() - 1)];
        if slot
            .compare_exchange(tag, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        slot.store(tag, Ordering::Relaxed);
        false
    }
}

/// The entry holds the form a job was made from (the same buffers).
fn holds(form: &Form, source: &Source) -> bool {
    match (form, source) {
        (Form::Text { text, .. }, Source::Text(t)) => same(text, t),
        (Form::Digits(held), Source::Digits(d)) => held.same(d),
        _ => false,
    }
}

/// The same buffer (not only the same bytes).
fn same(a: &Bytes, b: &Bytes) -> bool {
    a.as_ptr() == b.as_ptr() && a.len() == b.len()
}

fn encode_compact(c: &Precompressed) -> Vec<u8> {
    let mut v = Vec::with_capacity(REDIS_COMPACT.len() + 8 + c.size());
    v.extend_from_slice(REDIS_COMPACT);
    v.extend_from_slice(&u32::try_from(c.len()).unwrap_or(u32::MAX).to_le_bytes());
    v.extend_from_slice(&c.crc().to_le_bytes());
    for part in c.blocks() {
        v.extend_from_slice(part);
    }
    v
}

/// An `eg2:` value (after its prefix): its compact form and the text it
/// inflates to, or `None` when it does not inflate to its length and CRC.
fn decode_compact(value: &[u8]) -> Option<(Precompressed, Bytes)> {
    let len = u64::from(u32::from_le_bytes(value.get(..4)?.try_into().ok()?));
    let crc = u32::from_le_bytes(value.get(4..8)?.try_into().ok()?);
    if len > MAX_TEXT_BYTES {
        return None;
    }
    let c = Precompressed::from_blocks(value.get(8..)?, crc, len);
    let text = c.inflate()?;
    Some((c, text))
}

/// True when `raw` is a JSON list of exactly `dimension` numbers (with
/// whitespace around it): the miss path's one-pass scanner
/// ([`crate::upstream::numbers_end`]), also run on every Redis hit.
pub(crate) fn valid_embedding(raw: &[u8], dimension: usize) -> bool {
    let start = crate::upstream::skip_ws(raw, 0);
    crate::upstream::numbers_end(raw, start, dimension)
        .is_some_and(|end| crate::upstream::skip_ws(raw, end) == raw.len())
}

/// A cache key for tests: of a one-text request for `text`.
#[cfg(test)]
pub(crate) fn test_key(text: &str) -> CacheKey {
    let models = vec!["m".to_string()];
    let body = serde_json::json!({"model": "m", "input": {"contents": [{"text": text}]}});
    let req = crate::request::EmbeddingRequest::parse(
        body.to_string().as_bytes(),
        &crate::request::ParseRules::for_tests(&models),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    crate::cache_key::cache_key(
        crate::cache_key::KeyScope::Shared,
        None,
        &req,
        &crate::forwarded::ForwardedHeaders::default(),
    )
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
        let key = test_key("a");
        let c = Cache::new(1 << 20, 0, Words::Float32, None, Duration::from_millis(1));
        assert!(matches!(c.get(&key, 2).await, Lookup::Miss));
        c.put(&key, Bytes::from_static(b"[1,2]")).await;
        let c2 = Cache::new(1 << 20, 0, Words::Float32, None, Duration::from_secs(60));
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

    /// 1536 floats as DashScope prints them (float32 values in shortest
    /// float64 form, ~19 characters each).
    fn dashscope_vector(seed: u32) -> Bytes {
        Bytes::from(crate::digits::test_vector(seed, 1.0))
    }

    fn form(c: &Cache, key: &CacheKey) -> Option<Form> {
        c.stores.memory.as_ref()?.peek(key).map(|e| e.form)
    }

    /// The entry's compact form, once the compaction thread made it.
    async fn compacted(c: &Cache, key: &CacheKey) -> Form {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(f @ (Form::Compact(_) | Form::Digits(_))) = form(c, key) {
                return f;
            }
            assert!(Instant::now() < deadline, "never compacted");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A gzip hit's compact form: the first ones may wait longer than the
    /// bounded wait on a slow machine and be answered with the text.
    async fn gzip_hit(c: &Cache, key: &CacheKey, text: &Bytes) -> Precompressed {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match c.get_found(key, 1536, true).await {
                Some(Found::Gzip(z)) => return z,
                Some(Found::Text(t)) => assert_eq!(&t, text),
                None => panic!("miss"),
            }
            assert!(Instant::now() < deadline, "never compacted");
        }
    }

    /// A memory cache of 8 MiB (`hot_max_bytes` of it the hot tier), a
    /// minute's TTL, no Redis.
    fn cache_8mib(hot_max_bytes: u64, words: Words) -> Arc<Cache> {
        Arc::new(Cache::new(
            8 << 20,
            hot_max_bytes,
            words,
            None,
            Duration::from_secs(60),
        ))
    }

    fn weight(c: &Cache) -> u64 {
        c.stores.memory.as_ref().map_or(0, |m| m.weight())
    }

    #[test]
    fn the_weigher_counts_the_bytes_held() {
        let text = dashscope_vector(1);
        let t = Entry::text(text.clone(), Instant::now());
        assert_eq!(
            EntryWeight.weight(&test_key("w"), &t),
            32 * 1024 + ENTRY_OVERHEAD
        );
        let p = Precompressed::of(&text).unwrap();
        let z = Entry {
            form: Form::Compact(p.clone()),
            expires: Instant::now(),
        };
        // 12 KiB and the rest, rounded to its size class.
        let rest = p.size() - 12_288;
        assert!(rest < 1024, "{}", p.size());
        assert_eq!(
            EntryWeight.weight(&test_key("w"), &z),
            12_288 + size_class(rest) as u64 + ENTRY_OVERHEAD
        );
        // The goal: at most 14 KB per DashScope-sized entry.
        assert!(
            p.allocated() as u64 + ENTRY_OVERHEAD <= 14_000,
            "{}",
            p.size()
        );
        // The digits form: 4 or 8 bytes a float and its small rest.
        for (kind, most) in [(Words::Float32, 6_600), (Words::Digits, 12_800)] {
            let d = Digits::of(&text, kind).unwrap();
            let dz = Entry {
                form: Form::Digits(d.clone()),
                expires: Instant::now(),
            };
            assert_eq!(
                EntryWeight.weight(&test_key("w"), &dz),
                d.allocated() as u64 + ENTRY_OVERHEAD
            );
            assert!(
                d.allocated() as u64 + ENTRY_OVERHEAD <= most,
                "{kind:?}: {}",
                d.allocated()
            );
        }
        // What the overhead stands for fits in it.
        let own = std::mem::size_of::<(CacheKey, Entry)>() as u64;
        assert!(own + 48 <= ENTRY_OVERHEAD, "{own}");
        assert!(std::mem::size_of::<(CacheKey, HotText)>() as u64 + 48 <= HOT_OVERHEAD);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_digits_kind_is_the_configured_one_or_the_one_the_text_has() {
        // An entry of `text` in a cache set to `words`, hit once: the
        // digits form it is compacted to.
        async fn compacted_to(words: Words, text: &Bytes) -> Digits {
            let (c, key) = (cache_8mib(0, words), test_key("d"));
            c.store(key, text.clone()).await;
            assert!(matches!(
                c.get_found(&key, 1536, false).await,
                Some(Found::Text(_))
            ));
            let Form::Digits(d) = compacted(&c, &key).await else {
                panic!("not the digits form")
            };
            assert_eq!(d.text().as_ref(), Some(text));
            d
        }
        let d = compacted_to(Words::Digits, &dashscope_vector(5)).await;
        assert_eq!(d.kind(), Words::Digits);
        // Numbers that are not float32 values: digits, whatever is set.
        let mut numbers = vec!["-0.12345678901234567"; 1536].join(",");
        numbers.insert(0, '[');
        numbers.push(']');
        let d = compacted_to(Words::Float32, &Bytes::from(numbers)).await;
        assert_eq!(d.kind(), Words::Digits);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hit_entry_is_compacted_once_and_reads_the_same() {
        // No hot tier: identity hits of the compact form inflate it.
        let c = cache_8mib(0, Words::Float32);
        let (key, text) = (test_key("k"), dashscope_vector(2));
        c.store(key, text.clone()).await;
        assert_eq!(weight(&c), size_class(text.len()) as u64 + ENTRY_OVERHEAD);
        // Stored as text; a miss asks nothing.
        assert!(matches!(form(&c, &key), Some(Form::Text { .. })));
        assert_eq!(c.compactor.as_ref().unwrap().queued(), 0);
        // The first hit is served the text and asks for compaction.
        let Some(Found::Text(got)) = c.get_found(&key, 1536, false).await else {
            panic!("no text hit")
        };
        assert!(same(&got, &text));
        // An identity client's hit: the digits form, float32 words.
        let Form::Digits(d) = compacted(&c, &key).await else {
            panic!("not the digits form")
        };
        assert_eq!(d.kind(), Words::Float32);
        assert_eq!(weight(&c), d.allocated() as u64 + ENTRY_OVERHEAD);
        assert!(weight(&c) * 100 <= text.len() as u64 * 22, "{}", weight(&c));
        // Identity hits: the same bytes, written again.
        for _ in 0..2 {
            let Some(Found::Text(again)) = c.get_found(&key, 1536, false).await else {
                panic!("no text hit")
            };
            assert_eq!(again, text);
            assert!(!same(&again, &text));
        }
        assert!(matches!(c.get_with(&key, |_| true).await, Lookup::Hit(b) if b == text));
        assert_eq!(c.recheck(&key, 1536).await, Some(text.clone()));
        // A gzip hit asks for the DEFLATE form, which replaces the digits:
        // gzip hits are built around it as it is.
        let z = gzip_hit(&c, &key, &text).await;
        assert_eq!(z.inflate(), Some(text.clone()));
        let Some(Form::Compact(p)) = form(&c, &key) else {
            panic!("not the DEFLATE form")
        };
        assert_eq!(z.blocks(), p.blocks());
        assert_eq!(weight(&c), p.allocated() as u64 + ENTRY_OVERHEAD);
        assert!(weight(&c) * 100 <= text.len() as u64 * 45, "{}", weight(&c));
        let Some(Found::Gzip(z)) = c.get_found(&key, 1536, true).await else {
            panic!("no gzip hit")
        };
        assert_eq!(z.blocks(), p.blocks());
        // Identity hits of it: the same bytes, inflated.
        let Some(Found::Text(again)) = c.get_found(&key, 1536, false).await else {
            panic!("no text hit")
        };
        assert_eq!(again, text);
        // Stored again (e.g. `no-cache`): text again, until hit again.
        c.store(key, text.clone()).await;
        assert!(matches!(form(&c, &key), Some(Form::Text { .. })));
        // A gzip client's first hit makes the DEFLATE form directly.
        let z = gzip_hit(&c, &key, &text).await;
        assert!(matches!(form(&c, &key), Some(Form::Compact(p)) if p.blocks() == z.blocks()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hot_tier_keeps_the_text_identity_clients_read() {
        let c = cache_8mib(1 << 20, Words::Float32);
        let (key, text) = (test_key("h"), dashscope_vector(3));
        c.store(key, text.clone()).await;
        let _ = c.get_found(&key, 1536, false).await;
        let Form::Digits(p) = compacted(&c, &key).await else {
            panic!("not the digits form")
        };
        // The first identity hit only noted the key; the second one's text
        // (written back from the digits) goes to the hot tier, and later
        // identity hits read that buffer.
        let Some(Found::Text(hot)) = c.get_found(&key, 1536, false).await else {
            panic!("no text hit")
        };
        assert_eq!(hot, text);
        let Some(Found::Text(again)) = c.get_found(&key, 1536, false).await else {
            panic!("no text hit")
        };
        assert!(same(&hot, &again));
        // A hot text is only served for its own compact form.
        let other = dashscope_vector(4);
        let hot_tier = c.stores.hot.as_ref().unwrap();
        hot_tier.insert(
            key,
            HotText {
                text: other,
                crc: p.crc() ^ 1,
            },
        );
        let Some(Found::Text(inflated)) = c.get_found(&key, 1536, false).await else {
            panic!("no text hit")
        };
        assert_eq!(inflated, text);
        // ... and then kept there.
        let Some(Found::Text(hot)) = c.get_found(&key, 1536, false).await else {
            panic!("no text hit")
        };
        assert!(same(&hot, &inflated));
        // The hot tier is a part of the budget: the main cache got the rest.
        let main = c.stores.memory.as_ref().unwrap().capacity();
        let tier = c.stores.hot.as_ref().unwrap().capacity();
        assert_eq!((main, tier), ((8 << 20) - (1 << 20), 1 << 20));
    }

    #[test]
    fn keys_read_once_in_turn_do_not_churn_the_hot_tier() {
        // 1 MiB: 32 texts, and 64 keys noted.
        let c = cache_8mib(1 << 20, Words::Float32);
        let hot = c.stores.hot.as_ref().unwrap();
        let text = dashscope_vector(9);
        for round in 0..3 {
            for i in 0..500 {
                c.keep_hot(&test_key(&format!("{round} {i}")), &text, 1);
            }
        }
        assert_eq!(hot.len(), 0);
        // A key read again soon goes in.
        let key = test_key("again");
        c.keep_hot(&key, &text, 1);
        c.keep_hot(&key, &text, 1);
        assert!(hot.get(&key).is_some_and(|h| same(&h.text, &text)));
        // Without a hot tier nothing is noted either.
        let none = cache_8mib(0, Words::Float32);
        assert!(none.stores.seen.is_none());
        // The table alone: keys read in turn, 8 times as many as it has
        // slots, are (almost) never recognised; a key read again soon is.
        let d = Doorkeeper::new(512);
        let keys: Vec<_> = (0..4096).map(|i| test_key(&format!("d{i}"))).collect();
        let mut recognised = 0;
        for _ in 0..3 {
            recognised += keys.iter().filter(|k| d.second_read(k)).count();
        }
        assert!(recognised < 40, "{recognised}");
        assert!(!d.second_read(&keys[7]) && d.second_read(&keys[7]));
        assert!(!d.second_read(&keys[7]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gzip_hit_waits_for_the_compact_form() {
        let c = cache_8mib(0, Words::Float32);
        let (key, text) = (test_key("g"), dashscope_vector(5));
        c.store(key, text.clone()).await;
        // The wait is bounded; on a slow machine the first answer may be
        // the text, but the entry is compacted and gzip hits get it.
        let deadline = Instant::now() + Duration::from_secs(20);
        let z = loop {
            match c.get_found(&key, 1536, true).await {
                Some(Found::Gzip(z)) => break z,
                Some(Found::Text(t)) => assert!(same(&t, &text)),
                None => panic!("miss"),
            }
            assert!(Instant::now() < deadline, "never compacted");
        };
        assert_eq!(z.inflate(), Some(text));
        assert!(matches!(form(&c, &key), Some(Form::Compact(_))));
    }

    #[tokio::test]
    async fn a_job_replaces_only_the_entry_it_was_made_from() {
        let c = cache_8mib(0, Words::Float32);
        let key = test_key("r");
        let (old, new) = (dashscope_vector(6), dashscope_vector(7));
        c.store(key, old.clone()).await;
        // Stored again (equal bytes, another buffer) before the job ran.
        c.store(key, Bytes::copy_from_slice(&new)).await;
        let fin = Finisher::for_tests();
        let done = Arc::new(compact::Done::default());
        c.stores.compact(
            Job {
                key,
                source: Source::Text(old.clone()),
                read_as_text: true,
                gzip: false,
                done: done.clone(),
            },
            &fin,
        );
        assert!(matches!(form(&c, &key), Some(Form::Text { text, .. }) if text == new));
        assert!(compact::wait(&done).await.is_none());
        // The entry's own job replaces it; one for an evicted key does nothing.
        let Some(Form::Text { text: held, .. }) = form(&c, &key) else {
            panic!("not text")
        };
        let job = |text: &Bytes, key| Job {
            key,
            source: Source::Text(text.clone()),
            read_as_text: false,
            gzip: true,
            done: Arc::new(compact::Done::default()),
        };
        c.stores.compact(job(&held, key), &fin);
        assert!(
            matches!(form(&c, &key), Some(Form::Compact(p)) if p.inflate() == Some(new.clone()))
        );
        c.stores.compact(job(&held, test_key("gone")), &fin);
        assert!(form(&c, &test_key("gone")).is_none());
        // A text that does not compress stays text, settled.
        let mut x = 0x2545_f491_u32;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect();
        let noise = Bytes::from(noise);
        let k2 = test_key("n");
        c.store(k2, noise.clone()).await;
        c.stores.compact(job(&noise, k2), &fin);
        assert!(matches!(
            form(&c, &k2),
            Some(Form::Text { settled: true, .. })
        ));
        let Some(Found::Text(t)) = c.get_found(&k2, 0, true).await else {
            panic!("no hit")
        };
        assert!(same(&t, &noise));
    }

    #[test]
    fn redis_compact_values_round_trip_and_corrupt_ones_are_refused() {
        let text = dashscope_vector(8);
        let p = Precompressed::of(&text).unwrap();
        let v = encode_compact(&p);
        assert!(v.starts_with(REDIS_COMPACT));
        assert_eq!(v.len(), 4 + 8 + p.size());
        let (back, inflated) = decode_compact(&v[4..]).unwrap();
        assert_eq!(inflated, text);
        assert_eq!((back.crc(), back.len()), (p.crc(), p.len()));
        let body = &v[4..];
        let mut flipped = body.to_vec();
        let mid = 8 + p.size() / 2;
        flipped[mid] ^= 0x20;
        let mut long = body.to_vec();
        long[0] = long[0].wrapping_add(1);
        let mut crc = body.to_vec();
        crc[4] ^= 1;
        let mut huge = body.to_vec();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        // One more stored byte after the text.
        let mut extra = body.to_vec();
        extra.extend_from_slice(&[0, 1, 0, 0xfe, 0xff, b'x']);
        for (what, bad) in [
            ("flipped", &flipped[..]),
            ("length", &long[..]),
            ("crc", &crc[..]),
            ("huge", &huge[..]),
            ("extra", &extra[..]),
            ("truncated", &body[..body.len() - 40]),
            ("header only", &body[..8]),
            ("short", &body[..3]),
        ] {
            assert!(decode_compact(bad).is_none(), "{what}");
        }
    }
}
