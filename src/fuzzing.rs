//! Entry points for the `cargo fuzz` targets in `fuzz/`; not part of the
//! library's API (hidden from its docs; nothing in the gateway calls it).
//! docs/development.md, "Fuzzing", says how to run them.
//!
//! Each function takes one fuzz input, runs it through the code under test
//! and checks the invariants listed in its doc with `assert!`: a failed one
//! is a bug the fuzzer reports with the input that found it. The seed
//! corpora checked in under `fuzz/corpus/` also go through them in
//! `cargo test` (stable, no cargo-fuzz needed).

use std::sync::OnceLock;

use http::HeaderValue;
use serde_json::{Map, Value};

use crate::cache_key::{cache_key, CacheKey, KeyScope};
use crate::config::{Config, ConfigError};
use crate::error::GatewayError;
use crate::forwarded::ForwardedHeaders;
use crate::request::{EmbeddingRequest, Modality, ParseRules};

/// The built-in defaults (an empty file), read once.
fn default_config() -> Option<&'static Config> {
    static DEFAULT: OnceLock<Option<Config>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| Config::parse("", &|_| None).ok())
        .as_ref()
}

/// A request body, parsed with the default config's rules (its models and
/// input limits). Checks:
///
/// - no panic, whatever the bytes;
/// - a refusal is `InvalidParameter` or `ModelNotFound`, answered as a 400
///   whose body is DashScope's JSON `{code, message, request_id}`, with a
///   message of at most [`MAX_REFUSAL_BYTES`] whatever the body's size;
/// - an accepted request is valid: a configured model, 1 to `max_items`
///   items, each with non-empty content within its modality's limits and a
///   finite factor > 0, text within `max_text_chars` unless
///   `auto_truncation`;
/// - the body sent upstream is exactly the parsed request: `model`,
///   `parameters` and the other fields as parsed, each item as its one
///   modality and its factor, nothing else;
/// - the body sent upstream parses back to an equal request with the same
///   cache key that writes the same bytes, or is refused only by one of the
///   gateway's own size limits (writing can lengthen a body: `parameters`
///   is added when absent, `1E15` is written `1000000000000000.0`);
/// - the cache key tells apart what it must: another tenant, shared and
///   tenant scopes, another workspace, a keyed forwarded header, a changed
///   content, and one character moved from one item to the next (the
///   encoding is prefix-free).
pub fn request(body: &[u8]) {
    let config = default_config();
    assert!(config.is_some(), "the empty config must be valid");
    let Some(config) = config else { return };
    let rules = ParseRules::of(&config.upstream);
    let req = match EmbeddingRequest::parse(body, &rules) {
        Ok(req) => req,
        Err(e) => return check_refusal(&e),
    };
    check_valid(&req, &rules);

    let headers = ForwardedHeaders::default();
    let key = cache_key(KeyScope::Tenant("t"), None, &req, &headers);

    // What goes upstream is what the key describes.
    let upstream = req.upstream_body();
    assert!(upstream.is_ok(), "the upstream body: {upstream:?}");
    let Ok(upstream) = upstream else { return };
    check_upstream_body(&req, &upstream);
    match EmbeddingRequest::parse(&upstream, &rules) {
        Ok(again) => {
            assert_eq!(again, req, "the upstream body must be the same request");
            assert_eq!(
                cache_key(KeyScope::Tenant("t"), None, &again, &headers),
                key,
                "the upstream body must have the same cache key"
            );
            assert!(
                again.upstream_body().is_ok_and(|b| b == upstream),
                "the upstream body must be stable: {upstream:?}"
            );
        }
        Err(e) => assert!(
            matches!(&e, GatewayError::InvalidParameter(m) if m.contains("over the limit of")),
            "the upstream body must parse, or be over a size limit: {e:?}\n{upstream:?}"
        ),
    }

    check_key_distinguishes(&req, &headers, key);
}

/// The longest refusal message: a refusal echoes at most a few short,
/// cut pieces of the body.
pub const MAX_REFUSAL_BYTES: usize = 1024;

fn check_refusal(e: &GatewayError) {
    assert!(
        matches!(
            e,
            GatewayError::InvalidParameter(_) | GatewayError::ModelNotFound(_)
        ),
        "a bad body must be the client's fault, got {e:?}"
    );
    assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    assert!(e.message().len() <= MAX_REFUSAL_BYTES, "{e:?}");
    let wire: Result<Value, _> = serde_json::from_slice(&e.body("rid"));
    assert!(
        wire.as_ref()
            .is_ok_and(|v| v["code"].is_string() && v["message"].is_string()),
        "the refusal must be DashScope's JSON: {wire:?}"
    );
}

fn check_valid(req: &EmbeddingRequest, rules: &ParseRules<'_>) {
    assert!(rules.models.contains(&req.model), "{req:?}");
    assert!((1..=rules.max_items).contains(&req.items.len()), "{req:?}");
    for item in &req.items {
        assert!(!item.content.is_empty(), "{item:?}");
        assert!(item.factor.is_finite() && item.factor > 0.0, "{item:?}");
        match item.modality {
            Modality::Text => {
                assert!(item.content.len() <= rules.max_text_bytes, "{item:?}");
                if !req.auto_truncation {
                    assert!(
                        item.content.chars().count() <= rules.max_text_chars,
                        "{item:?}"
                    );
                }
            }
            Modality::Image | Modality::Audio | Modality::Video => {
                assert!(item.content.len() <= rules.max_url_bytes, "{item:?}");
            }
        }
    }
    assert_eq!(req.counts().total(), req.items.len() as u64);
}

/// The upstream body, read as plain JSON, against the parsed request.
fn check_upstream_body(req: &EmbeddingRequest, upstream: &[u8]) {
    let object = |v: Option<Value>| match v {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    let root = object(serde_json::from_slice(upstream).ok());
    let input = root.as_ref().and_then(|r| object(r.get("input").cloned()));
    let contents = input.as_ref().and_then(|i| match i.get("contents") {
        Some(Value::Array(c)) => Some(c.clone()),
        _ => None,
    });
    assert!(
        contents.is_some(),
        "the upstream body must be an object with input.contents: {upstream:?}"
    );
    let (Some(mut root), Some(mut input), Some(contents)) = (root, input, contents) else {
        return;
    };

    root.remove("input");
    let mut fields = Map::new();
    fields.insert("model".to_string(), Value::String(req.model.clone()));
    fields.insert(
        "parameters".to_string(),
        Value::Object(req.parameters.clone()),
    );
    fields.extend(req.extra.clone());
    assert_eq!(root, fields, "the upstream body's fields");

    input.remove("contents");
    assert_eq!(input, req.input_extra, "the upstream body's input fields");

    assert_eq!(contents.len(), req.items.len());
    for (sent, item) in contents.iter().zip(&req.items) {
        let mut want = Map::new();
        want.insert(
            item.modality.as_str().to_string(),
            Value::String(item.content.clone()),
        );
        want.insert("factor".to_string(), sent["factor"].clone());
        assert_eq!(sent, &Value::Object(want), "an upstream item");
        assert_eq!(
            sent["factor"].as_f64(),
            Some(item.factor),
            "an upstream factor: {sent}"
        );
    }
}

fn check_key_distinguishes(req: &EmbeddingRequest, headers: &ForwardedHeaders, key: CacheKey) {
    let differs = |other: CacheKey, what: &str| assert_ne!(other, key, "{what}: {req:?}");
    differs(
        cache_key(KeyScope::Tenant("u"), None, req, headers),
        "another tenant",
    );
    differs(cache_key(KeyScope::Shared, None, req, headers), "shared");
    differs(
        cache_key(KeyScope::Tenant("t"), Some("ws"), req, headers),
        "a workspace",
    );
    let inspected = ForwardedHeaders {
        data_inspection: Some(HeaderValue::from_static("enable")),
        ..headers.clone()
    };
    differs(
        cache_key(KeyScope::Tenant("t"), None, req, &inspected),
        "X-DashScope-DataInspection",
    );

    let mut changed = req.clone();
    if let Some(first) = changed.items.first_mut() {
        first.content.push('x');
    }
    differs(
        cache_key(KeyScope::Tenant("t"), None, &changed, headers),
        "a changed content",
    );

    // ["ab", "c"] and ["a", "bc"]: the same bytes, split elsewhere.
    let mut moved = req.clone();
    if let [first, second, ..] = moved.items.as_mut_slice() {
        if let Some(c) = first.content.pop() {
            second.content.insert(0, c);
            differs(
                cache_key(KeyScope::Tenant("t"), None, &moved, headers),
                "a character moved to the next item",
            );
        }
    }
}

/// Config text, read with no environment variables. Checks:
///
/// - no panic, whatever the text;
/// - a refused file has at least one error, each with a message; every
///   line is within the file; errors come sorted by line, those without
///   one last; every list index in an error's key is one the file has,
///   and a key the file has comes with its line;
/// - an accepted file is valid: at least one non-empty model, positive
///   sizes and limits (input limits too), durations > 0 that can be added to the clock, a
///   tenant share in (0, 1]; tenants with
///   unique valid names, at least one key each and no key used twice,
///   finite positive rates with a burst of at least one.
pub fn config(src: &str) {
    match Config::parse(src, &|_| None) {
        Ok(c) => check_config(&c),
        Err(errors) => check_errors(src, &errors.0),
    }
}

fn check_errors(src: &str, errors: &[ConfigError]) {
    assert!(!errors.is_empty(), "a refusal must say why");
    let lines = src.split('\n').count();
    let doc = toml_edit::ImDocument::parse(src).ok();
    for e in errors {
        assert!(!e.message.trim().is_empty(), "{e:?}");
        if let Some(line) = e.line {
            assert!((1..=lines).contains(&line), "{e:?} in {lines} lines");
        }
        if let Some(doc) = &doc {
            check_error_key(doc, e);
        }
    }
    let order: Vec<usize> = errors
        .iter()
        .map(|e| e.line.unwrap_or(usize::MAX))
        .collect();
    assert!(
        order.is_sorted(),
        "errors must be sorted by line: {errors:?}"
    );
}

/// Walks `e.key` (when it is all bare keys and indices) through the file.
fn check_error_key(doc: &toml_edit::ImDocument<&str>, e: &ConfigError) {
    if e.key.is_empty() || e.key.contains('"') {
        return;
    }
    let mut item = Some(doc.as_item());
    for part in e.key.split('.') {
        let mut pieces = part.split('[');
        if let Some(name) = pieces.next().filter(|n| !n.is_empty()) {
            item = item
                .and_then(|i| i.as_table_like())
                .and_then(|t| t.get(name));
        }
        for index in pieces {
            let index = index
                .strip_suffix(']')
                .and_then(|i| i.parse::<usize>().ok());
            assert!(index.is_some(), "a malformed key: {e:?}");
            // An index is always into a list the file has.
            let next = item.zip(index).and_then(|(i, n)| i.get(n));
            assert!(next.is_some(), "an index the file does not have: {e:?}");
            item = next;
        }
    }
    if item.is_some() {
        assert!(
            e.line.is_some(),
            "a key the file has must have a line: {e:?}"
        );
    }
}

fn check_config(c: &Config) {
    let up = &c.upstream;
    assert!(!up.models.is_empty() && up.models.iter().all(|m| !m.is_empty()));
    assert!(up.max_text_chars > 0 && up.embedding_dimension > 0);
    assert!(up.max_items > 0 && up.max_text_bytes > 0 && up.max_url_bytes > 0);
    let s = &c.server;
    assert!(s.max_body_bytes > 0 && s.max_in_flight > 0 && s.max_connections > 0);
    assert!(s.body_min_bytes_per_second > 0);
    assert!(s.tenant_in_flight_share > 0.0 && s.tenant_in_flight_share <= 1.0);
    for d in [
        s.shutdown_grace,
        s.idle_timeout,
        s.header_read_timeout,
        s.body_read_timeout,
        up.timeout,
        up.connect_timeout,
        up.retry_backoff,
        c.cache.ttl,
        c.cache.redis_timeout,
        c.state.redis_timeout,
    ] {
        assert!(!d.is_zero(), "{c:?}");
        // The gateway adds them to the clock (`Instant::now() + ttl`).
        assert!(
            std::time::Instant::now().checked_add(d).is_some(),
            "{d:?} overflows the clock"
        );
    }
    let mut keys = std::collections::HashSet::new();
    for t in &c.tenants {
        assert!(
            c.tenant(&t.name)
                .is_some_and(|found| std::ptr::eq(found, t)),
            "tenant names must be unique: {c:?}"
        );
        assert!(!t.name.is_empty() && !t.keys.is_empty(), "{t:?}");
        for k in &t.keys {
            assert!(keys.insert(*k), "a key used twice: {c:?}");
        }
        for r in t.rate.iter().chain([&t.uploads_rate]) {
            assert!(r.per_second.is_finite() && r.per_second > 0.0, "{t:?}");
            assert!(r.burst >= 1, "{t:?}");
        }
        assert!(t.max_in_flight.is_none_or(|n| n > 0), "{t:?}");
        let bound = s.tenant_max_in_flight(t.max_in_flight);
        assert!((1..=s.max_in_flight).contains(&bound), "{t:?}");
        if let Some(w) = &t.workspace {
            assert!(!w.is_empty() && HeaderValue::from_str(w).is_ok(), "{t:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The checked-in seeds (`seed-*`; a local fuzz run adds its finds
    /// next to them), as the fuzz targets get them.
    fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("seed-")
            })
            .map(|path| (path.display().to_string(), std::fs::read(&path).unwrap()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn request_seeds_keep_the_invariants() {
        let seeds = seeds("request");
        assert!(seeds.len() >= 5, "{seeds:?}");
        let rules = ParseRules::of(&default_config().unwrap().upstream);
        let mut accepted = 0;
        for (name, bytes) in &seeds {
            eprintln!("{name}");
            request(bytes);
            accepted += usize::from(EmbeddingRequest::parse(bytes, &rules).is_ok());
        }
        // The seeds reach past the parser's refusals.
        assert!(accepted >= 3, "{accepted} of {} accepted", seeds.len());
    }

    #[test]
    fn config_seeds_keep_the_invariants() {
        let seeds = seeds("config");
        assert!(seeds.len() >= 3, "{seeds:?}");
        for (name, bytes) in &seeds {
            eprintln!("{name}");
            config(std::str::from_utf8(bytes).unwrap());
        }
    }
}
