//! Recently parsed ONE-PEACE request bodies, so a body sent again (a hot
//! key: a client in a loop, many clients asking for the same text) is not
//! parsed and keyed again: the parse walks the JSON at four levels and the
//! key canonicalises `parameters` and the extras, together ~1 µs of a
//! ~15 µs hit (issue 11's profile).
//!
//! A body is remembered only when it parsed, on its second parse (see
//! [`Slot`]); the entry holds the body's
//! bytes and is used only for a body equal to them byte for byte, so a
//! lookup answers exactly what parsing that body answers (the parse rules
//! are the process's config, fixed for its life). What is remembered:
//! the parsed request and its fields' key encoding ([`KeyFields`]); the
//! key itself still adds the tenant's scope and the forwarded headers.
//!
//! The table is direct-mapped ([`SLOTS`] slots, each a mutex held for a
//! compare or a swap): a body parsed twice takes its slot, whoever had
//! it. Bodies
//! over [`MAX_BODY_BYTES`] are not kept, so the memo holds at most a few MB
//! however it is fed. A client that makes its bodies collide only evicts
//! entries, which costs their next request one parse.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::cache_key::KeyFields;
use crate::request::EmbeddingRequest;

/// Slots of the table.
const SLOTS: usize = 512;
/// Bodies larger than this are parsed every time (and parsing them costs
/// more than a memo saves: they are rarely sent twice).
pub(crate) const MAX_BODY_BYTES: usize = 2048;

/// A parsed request with what its cache key needs from it.
pub(crate) struct Parsed {
    pub(crate) request: EmbeddingRequest,
    pub(crate) model: Arc<str>,
    pub(crate) key_fields: KeyFields,
}

impl Parsed {
    pub(crate) fn new(request: EmbeddingRequest) -> Parsed {
        Parsed {
            model: Arc::from(request.model.as_str()),
            key_fields: KeyFields::of(&request),
            request,
        }
    }
}

struct Entry {
    body: Bytes,
    parsed: Arc<Parsed>,
}

/// One slot: the body it keeps, and the hash of the last body parsed
/// here but not kept. A body is kept on its second parse in a row (its
/// hash seen), so a stream of bodies sent once (misses) costs a hash and
/// a lock each, never a copy or an eviction.
#[derive(Default)]
struct Slot {
    kept: Option<Entry>,
    seen: u64,
}

pub(crate) struct ParseMemo {
    slots: Box<[Mutex<Slot>]>,
    hasher: foldhash::fast::RandomState,
}

impl Default for ParseMemo {
    fn default() -> ParseMemo {
        ParseMemo {
            slots: (0..SLOTS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl ParseMemo {
    /// `body` parsed: the remembered result for these exact bytes, else
    /// `parse(body)`'s, remembered when it is a request seen twice.
    pub(crate) fn get_or_parse<E>(
        &self,
        body: &Bytes,
        parse: impl FnOnce(&[u8]) -> Result<EmbeddingRequest, E>,
    ) -> Result<Arc<Parsed>, E> {
        if body.len() > MAX_BODY_BYTES {
            return parse(body).map(|r| Arc::new(Parsed::new(r)));
        }
        // Never 0, the empty `seen`.
        let hash = self.hasher.hash_one(&body[..]) | 1;
        let slot = &self.slots[(hash >> 1) as usize % SLOTS];
        if let Some(e) = &lock(slot).kept {
            if e.body == *body {
                return Ok(e.parsed.clone());
            }
        }
        let parsed = Arc::new(Parsed::new(parse(body)?));
        let evicted = {
            let mut s = lock(slot);
            if s.seen == hash {
                s.seen = 0;
                s.kept.replace(Entry {
                    // Its own copy: `body` may be a view into a larger buffer.
                    body: Bytes::copy_from_slice(body),
                    parsed: parsed.clone(),
                })
            } else {
                s.seen = hash;
                None
            }
        };
        // Freed outside the lock.
        drop(evicted);
        Ok(parsed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ParseRules;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn body(text: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"model":"m","input":{{"contents":[{{"text":"{text}"}}]}}}}"#
        ))
    }

    fn parse_counted<'a>(
        models: &'a [String],
        calls: &'a AtomicUsize,
    ) -> impl Fn(&[u8]) -> Result<EmbeddingRequest, crate::error::GatewayError> + 'a {
        move |b| {
            calls.fetch_add(1, Ordering::Relaxed);
            EmbeddingRequest::parse(b, &ParseRules::for_tests(models))
        }
    }

    #[test]
    fn a_body_sent_again_is_kept_and_found_and_a_different_one_parsed() {
        let models = vec!["m".to_string()];
        let calls = AtomicUsize::new(0);
        let memo = ParseMemo::default();
        // Parsed the first time, and kept the second.
        for n in 1..=2 {
            let a = memo.get_or_parse(&body("a"), parse_counted(&models, &calls));
            assert_eq!(a.ok().unwrap().request.items[0].content, "a");
            assert_eq!(calls.load(Ordering::Relaxed), n);
        }
        let a2 = memo.get_or_parse(&body("a"), parse_counted(&models, &calls));
        let a3 = memo.get_or_parse(&body("a"), parse_counted(&models, &calls));
        assert!(Arc::ptr_eq(&a2.ok().unwrap(), &a3.ok().unwrap()));
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        let b = memo
            .get_or_parse(&body("b"), parse_counted(&models, &calls))
            .ok()
            .unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        assert_eq!(b.request.items[0].content, "b");
        assert_eq!(&*b.model, "m");
    }

    #[test]
    fn errors_and_large_bodies_are_not_remembered() {
        let models = vec!["m".to_string()];
        let calls = AtomicUsize::new(0);
        let memo = ParseMemo::default();
        let bad = Bytes::from_static(br#"{"model":"other","input":{}}"#);
        for _ in 0..2 {
            assert!(memo
                .get_or_parse(&bad, parse_counted(&models, &calls))
                .is_err());
        }
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        let large = body(&"x".repeat(MAX_BODY_BYTES));
        for _ in 0..2 {
            let p = memo.get_or_parse(&large, |b| {
                calls.fetch_add(1, Ordering::Relaxed);
                EmbeddingRequest::parse(
                    b,
                    &ParseRules {
                        max_text_chars: 1 << 20,
                        max_text_bytes: 1 << 20,
                        ..ParseRules::for_tests(&models)
                    },
                )
            });
            assert!(p.is_ok());
        }
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn colliding_bodies_take_each_others_slot_and_answer_their_own() {
        let models = vec!["m".to_string()];
        let calls = AtomicUsize::new(0);
        let memo = ParseMemo::default();
        // More bodies than slots: some share a slot; each answers its own.
        // Each body is sent twice in a row, so it is kept.
        for round in 0..2 {
            for i in 0..SLOTS * 2 {
                let text = format!("t{i}");
                for _ in 0..2 {
                    let p = memo
                        .get_or_parse(&body(&text), parse_counted(&models, &calls))
                        .ok()
                        .unwrap();
                    assert_eq!(p.request.items[0].content, text, "round {round}");
                }
            }
        }
        // Round one parsed each body twice (seen, then kept); round two
        // found some bodies kept, not all (later bodies evicted earlier
        // ones sharing their slot).
        let n = calls.load(Ordering::Relaxed);
        assert!(n > SLOTS * 4 && n < SLOTS * 8, "{n} parses");
    }

    #[test]
    fn bodies_sent_once_do_not_evict_a_kept_one() {
        let models = vec!["m".to_string()];
        let calls = AtomicUsize::new(0);
        let memo = ParseMemo::default();
        for _ in 0..2 {
            let _ = memo.get_or_parse(&body("hot"), parse_counted(&models, &calls));
        }
        for i in 0..SLOTS * 4 {
            let _ = memo.get_or_parse(&body(&format!("once {i}")), parse_counted(&models, &calls));
        }
        let before = calls.load(Ordering::Relaxed);
        let _ = memo.get_or_parse(&body("hot"), parse_counted(&models, &calls));
        assert_eq!(
            calls.load(Ordering::Relaxed),
            before,
            "the hot body was parsed again"
        );
    }
}
