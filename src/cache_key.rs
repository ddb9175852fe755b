//! The cache key: SHA-256 over a versioned, prefix-free encoding of
//! everything that can change the upstream result: the parsed body, the
//! forwarded headers that change the answer, the tenant's workspace and,
//! unless the cache is shared, the tenant.
//!
//! Each field is written as `tag byte, u64 big-endian length, bytes`, so no
//! field can run into the next (`["ab","c"]` and `["a","bc"]` differ). The
//! request and its forwarded headers are destructured field by field:
//! adding a field to [`EmbeddingRequest`] or [`ForwardedHeaders`] breaks the
//! build here until someone decides whether it belongs in the key.
//! Coalescing uses the same key, so it never joins requests the key tells
//! apart.

use std::fmt;

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::forwarded::ForwardedHeaders;
use crate::request::{EmbeddingRequest, Item};

/// Bump when the encoding changes: old entries then simply stop matching.
/// v2: the forwarded headers that change the answer.
const KEY_VERSION: &[u8] = b"embedgate-cache-key/v2";

/// Who may share an entry.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyScope<'a> {
    /// Entries belong to one tenant (`cache.scope = "tenant"`).
    Tenant(&'a str),
    /// Entries are shared company-wide (`cache.scope = "shared"`).
    Shared,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey([u8; 32]);

impl CacheKey {
    pub(crate) fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// Two words of the digest (a SHA-256: any of its bits are as good as
    /// the others), for tables that index and tell keys apart by them.
    pub(crate) fn words(&self) -> (u64, u64) {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&self.0[..8]);
        b.copy_from_slice(&self.0[8..16]);
        (u64::from_le_bytes(a), u64::from_le_bytes(b))
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", &self.to_hex()[..16])
    }
}

/// Writes fields (tag, length, bytes) into a hash or a buffer.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

struct Encoder<S>(S);

impl<S: Sink> Encoder<S> {
    fn field(&mut self, tag: u8, bytes: &[u8]) {
        self.0.put(&[tag]);
        self.0.put(&(bytes.len() as u64).to_be_bytes());
        self.0.put(bytes);
    }

    /// Who may share the entry, and the upstream account it is bound to.
    fn scope(&mut self, scope: KeyScope<'_>, workspace: Option<&str>) {
        match scope {
            KeyScope::Tenant(name) => self.field(TAG_SCOPE_TENANT, name.as_bytes()),
            KeyScope::Shared => self.field(TAG_SCOPE_SHARED, b""),
        }
        self.field(TAG_WORKSPACE, workspace.unwrap_or("").as_bytes());
    }

    /// The forwarded headers that change the answer.
    fn headers(&mut self, headers: &ForwardedHeaders) {
        let ForwardedHeaders {
            // Already normalised (trimmed, lowercased, blank = absent), and
            // sent upstream exactly so.
            data_inspection,
            oss_resource_resolve,
            // Identify the caller: the answer is the same whoever asks.
            user_agent: _,
            sdk_client: _,
            sdk_session_id: _,
            // Only the language of error messages; errors are never cached.
            accept_language: _,
            // Only on batch submits, which are never cached.
            dashscope_async: _,
        } = headers;
        self.field(TAG_DATA_INSPECTION, header_bytes(data_inspection));
        self.field(TAG_OSS_RESOURCE_RESOLVE, header_bytes(oss_resource_resolve));
    }
}

// Tags: one byte per kind of field, never reused.
const TAG_SCOPE_TENANT: u8 = 1;
const TAG_SCOPE_SHARED: u8 = 2;
const TAG_WORKSPACE: u8 = 3;
const TAG_MODEL: u8 = 4;
const TAG_ITEM_COUNT: u8 = 5;
const TAG_MODALITY: u8 = 6;
const TAG_CONTENT: u8 = 7;
const TAG_FACTOR: u8 = 8;
const TAG_PARAMETERS: u8 = 9;
const TAG_EXTRA: u8 = 10;
const TAG_INPUT_EXTRA: u8 = 11;
const TAG_DATA_INSPECTION: u8 = 12;
const TAG_OSS_RESOURCE_RESOLVE: u8 = 13;

/// The key for `req`, sent upstream with `headers`, as seen by a tenant
/// whose requests go upstream with `workspace` (the upstream account
/// context, which `oss://` inputs and results are bound to).
pub(crate) fn cache_key(
    scope: KeyScope<'_>,
    workspace: Option<&str>,
    req: &EmbeddingRequest,
    headers: &ForwardedHeaders,
) -> CacheKey {
    KeyFields::of(req).key(scope, workspace, headers)
}

/// The part of a request's key that comes from its body (model, items,
/// parameters, extras), encoded once: [`crate::parse_memo`] keeps it with
/// the parsed request, so a body sent again is keyed by hashing these
/// bytes with the scope and headers.
pub(crate) struct KeyFields(Vec<u8>);

impl KeyFields {
    pub(crate) fn of(req: &EmbeddingRequest) -> KeyFields {
        let EmbeddingRequest {
            model,
            items,
            parameters,
            // Only decides whether an over-long input errors; errors are never cached.
            auto_truncation: _,
            extra,
            input_extra,
        } = req;
        let mut e = Encoder(Vec::with_capacity(256));
        e.field(TAG_MODEL, model.as_bytes());
        e.field(TAG_ITEM_COUNT, &(items.len() as u64).to_be_bytes());
        for Item {
            modality,
            content,
            factor,
        } in items
        {
            e.field(TAG_MODALITY, modality.as_str().as_bytes());
            e.field(TAG_CONTENT, content.as_bytes());
            e.field(TAG_FACTOR, &factor.to_bits().to_be_bytes());
        }
        let mut params = parameters.clone();
        params.remove("auto_truncation");
        e.field(TAG_PARAMETERS, canonical_object(&params).as_bytes());
        e.field(TAG_EXTRA, canonical_object(extra).as_bytes());
        e.field(TAG_INPUT_EXTRA, canonical_object(input_extra).as_bytes());
        KeyFields(e.0)
    }

    /// The key of the request these fields are from.
    pub(crate) fn key(
        &self,
        scope: KeyScope<'_>,
        workspace: Option<&str>,
        headers: &ForwardedHeaders,
    ) -> CacheKey {
        let mut e = Encoder(Sha256::new());
        e.0.update(KEY_VERSION);
        e.scope(scope, workspace);
        e.0.update(&self.0);
        e.headers(headers);
        CacheKey(e.0.finalize().into())
    }
}

/// Bump when the family's item encoding changes.
const ITEM_KEY_VERSION: &[u8] = b"embedgate-item-key/v2";
const TAG_API: u8 = 14;
const TAG_ITEM: u8 = 15;

/// What a family request's cache entry is keyed on, apart from its
/// item(s): everything in the request that reaches upstream and can
/// change a vector, already normalised by the parser (defaults filled in,
/// fields that cannot change a vector removed).
pub(crate) struct FamilyKeyParts<'a> {
    /// Which API: native text, native multimodal and compatible-mode
    /// entries are never shared (not shown to be identical).
    pub(crate) api: &'static str,
    pub(crate) model: &'a str,
    pub(crate) parameters: &'a Map<String, Value>,
    pub(crate) extra: &'a Map<String, Value>,
    pub(crate) input_extra: &'a Map<String, Value>,
}

/// What every key of one family request shares (scope, API, model,
/// parameters, keyed headers), hashed once; [`FamilyKeyBase::key`] adds the
/// item(s): one item (per-item caching) or a whole request's items in order
/// (fused models), each as its canonical JSON (an object's keys sorted, a
/// text a JSON string).
pub(crate) struct FamilyKeyBase(Sha256);

impl FamilyKeyBase {
    pub(crate) fn new(
        scope: KeyScope<'_>,
        workspace: Option<&str>,
        parts: &FamilyKeyParts<'_>,
        headers: &ForwardedHeaders,
    ) -> FamilyKeyBase {
        let mut e = Encoder(Sha256::new());
        e.0.update(ITEM_KEY_VERSION);
        e.scope(scope, workspace);
        e.field(TAG_API, parts.api.as_bytes());
        e.field(TAG_MODEL, parts.model.as_bytes());
        e.field(
            TAG_PARAMETERS,
            canonical_object(parts.parameters).as_bytes(),
        );
        e.field(TAG_EXTRA, canonical_object(parts.extra).as_bytes());
        e.field(
            TAG_INPUT_EXTRA,
            canonical_object(parts.input_extra).as_bytes(),
        );
        e.headers(headers);
        FamilyKeyBase(e.0)
    }

    /// The key of `items` (one, or a fused request's all), each given as
    /// its [`canonical_json`].
    pub(crate) fn key<'v>(&self, items: impl ExactSizeIterator<Item = &'v [u8]>) -> CacheKey {
        let mut e = Encoder(self.0.clone());
        e.field(TAG_ITEM_COUNT, &(items.len() as u64).to_be_bytes());
        for item in items {
            e.field(TAG_ITEM, item);
        }
        CacheKey(e.0.finalize().into())
    }
}

/// `v` as the family keys it: JSON with object keys sorted at every depth.
pub(crate) fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_value(v, &mut out);
    out
}

/// An absent header is written as empty: `ForwardedHeaders` never holds a
/// blank value, so the two cannot be confused.
fn header_bytes(v: &Option<http::HeaderValue>) -> &[u8] {
    v.as_ref().map_or(&[], |v| v.as_bytes())
}

/// JSON with object keys sorted at every depth, whatever map type
/// serde_json was built with (`preserve_order` may be on via another crate).
fn canonical_object(m: &Map<String, Value>) -> String {
    let mut out = String::new();
    write_object(m, &mut out);
    out
}

fn write_object(m: &Map<String, Value>, out: &mut String) {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    out.push('{');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String((*k).clone()).to_string());
        out.push(':');
        if let Some(v) = m.get(*k) {
            write_value(v, out);
        }
    }
    out.push('}');
}

fn write_value(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => write_object(m, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ParseRules;

    fn parse(body: &str) -> EmbeddingRequest {
        let models = vec!["multimodal-embedding-one-peace-v1".to_string()];
        EmbeddingRequest::parse(body.as_bytes(), &ParseRules::for_tests(&models)).unwrap()
    }

    fn key_with(scope: KeyScope<'_>, body: &str) -> CacheKey {
        cache_key(scope, None, &parse(body), &ForwardedHeaders::default())
    }

    /// The key of `BASE` sent with these client headers.
    fn key_with_headers(pairs: &[(&str, &str)]) -> CacheKey {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let headers = ForwardedHeaders::from_client(&h).unwrap();
        cache_key(KeyScope::Tenant("search"), None, &parse(BASE), &headers)
    }

    fn key(body: &str) -> CacheKey {
        key_with(KeyScope::Tenant("search"), body)
    }

    const BASE: &str = r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好","factor":1},{"image":"https://x/1.png"}]},"parameters":{}}"#;

    #[test]
    fn equivalences() {
        let k = key(BASE);
        let same = [
            // 1.x layout: model, parameters, input; spaced separators; factor first.
            r#"{"model": "multimodal-embedding-one-peace-v1", "parameters": {}, "input": {"contents": [{"factor": 1, "text": "你好"}, {"image": "https://x/1.png"}]}}"#,
            // 1.20 layout: ASCII escapes.
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"\u4f60\u597d","factor":1.0},{"image":"https://x/1.png","factor":"1"}]},"parameters":{}}"#,
            // factor absent == 1; parameters absent == {}.
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好"},{"image":"https://x/1.png","factor":1}]}}"#,
            // auto_truncation does not change the result.
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好","factor":"1.0"},{"image":"https://x/1.png"}]},"parameters":{"auto_truncation":true}}"#,
            "{\n  \"model\" : \"multimodal-embedding-one-peace-v1\",\n  \"input\" : { \"contents\" : [ { \"text\" : \"你好\" } , { \"image\" : \"https://x/1.png\" } ] }\n}",
        ];
        for body in same {
            assert_eq!(key(body), k, "{body}");
        }
        // Nested parameter key order does not matter either.
        assert_eq!(
            key(
                r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"a"}]},"parameters":{"x":{"b":1,"a":2},"dimension":512}}"#
            ),
            key(
                r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"a"}]},"parameters":{"dimension":512,"x":{"a":2,"b":1}}}"#
            ),
        );
    }

    #[test]
    fn distinctions() {
        let k = key(BASE);
        let different = [
            // factor
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好","factor":2},{"image":"https://x/1.png"}]}}"#,
            // item order
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"image":"https://x/1.png"},{"text":"你好"}]}}"#,
            // modality with the same content
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好"},{"audio":"https://x/1.png"}]}}"#,
            // content
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好!"},{"image":"https://x/1.png"}]}}"#,
            // parameters
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好"},{"image":"https://x/1.png"}]},"parameters":{"dimension":512}}"#,
            // the SDK's nested-parameters quirk
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好"},{"image":"https://x/1.png"}]},"parameters":{"parameters":{"auto_truncation":true}}}"#,
            // extra top-level field
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好"},{"image":"https://x/1.png"}]},"resources":[]}"#,
            // extra input field
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"你好"},{"image":"https://x/1.png"}],"x":1}}"#,
        ];
        for body in different {
            assert_ne!(key(body), k, "{body}");
        }
        // Tenant scope and shared scope.
        assert_ne!(key_with(KeyScope::Tenant("ads"), BASE), k);
        assert_ne!(key_with(KeyScope::Shared, BASE), k);
        assert_eq!(
            key_with(KeyScope::Shared, BASE),
            key_with(KeyScope::Shared, BASE)
        );
    }

    #[test]
    fn prefix_free_contents() {
        let a = key(
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"ab"},{"text":"c"}]}}"#,
        );
        let b = key(
            r#"{"model":"multimodal-embedding-one-peace-v1","input":{"contents":[{"text":"a"},{"text":"bc"}]}}"#,
        );
        assert_ne!(a, b);
    }

    #[test]
    fn workspace_separates_entries() {
        let req = parse(BASE);
        let none = ForwardedHeaders::default();
        assert_ne!(
            cache_key(KeyScope::Shared, Some("ws-1"), &req, &none),
            cache_key(KeyScope::Shared, None, &req, &none)
        );
    }

    #[test]
    fn answer_changing_headers_separate_entries() {
        let k = key(BASE);
        assert_eq!(key_with_headers(&[]), k);
        for name in [
            "x-dashscope-datainspection",
            "x-dashscope-ossresourceresolve",
        ] {
            let on = key_with_headers(&[(name, "enable")]);
            assert_ne!(on, k, "{name}");
            assert_ne!(key_with_headers(&[(name, "disable")]), on, "{name}");
            // Normalised: case and surrounding whitespace do not matter,
            // and a blank value is no header.
            assert_eq!(key_with_headers(&[(name, " Enable ")]), on, "{name}");
            assert_eq!(key_with_headers(&[(name, "ENABLE")]), on, "{name}");
            assert_eq!(key_with_headers(&[(name, " ")]), k, "{name}");
        }
        // One header's value is not the other's.
        assert_ne!(
            key_with_headers(&[("x-dashscope-datainspection", "enable")]),
            key_with_headers(&[("x-dashscope-ossresourceresolve", "enable")]),
        );
        assert_ne!(
            key_with_headers(&[
                ("x-dashscope-datainspection", "enable"),
                ("x-dashscope-ossresourceresolve", "enable"),
            ]),
            key_with_headers(&[("x-dashscope-datainspection", "enable")]),
        );
    }

    #[test]
    fn identification_headers_share_entries() {
        let k = key(BASE);
        assert_eq!(
            key_with_headers(&[
                ("user-agent", "dashscope/2.0.2; python/3.11.7"),
                ("x-dashscope-sdk-client", "python-sdk/2.0.2/embeddings"),
                (
                    "x-dashscope-sdk-session-id",
                    "ca0cbd9c802e41629a50e9f74d3a8371"
                ),
                ("accept-language", "zh-CN"),
                // Not forwarded at all.
                ("x-dashscope-async", "enable"),
                ("cookie", "a=b"),
            ]),
            k
        );
    }
}
