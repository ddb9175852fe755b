//! Requests of the embedding family (every model but ONE-PEACE), parsed
//! and checked against the model table before anything is forwarded: the
//! native text API (`input.texts`), the native multimodal API
//! (`input.contents`) and the OpenAI-compatible API (`input`).
//!
//! Two readers, one result. The quick one reads a well-formed request
//! without building a JSON tree: the top level and `input` as members with
//! unparsed values, each text kept as the request's own bytes. Anything it
//! is not sure of (escaped keys, a bare string for `texts`, an invalid
//! field) it leaves to the full one, which parses a [`Value`] tree and
//! names what is wrong; so every error comes from one place, and the
//! quick reader's answers are the full one's (tested on both).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::cache_key::canonical_json;
use crate::config::{ModelApi, ModelSpec, ModelTable, Vectors};
use crate::error::GatewayError;
use crate::request::{check_depth, Modality};

mod quick;

/// Which wire format a request came in (and its answer goes out) in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Text,
    Multimodal,
    Compatible,
}

impl Api {
    /// The cache-key tag: entries of different APIs are never shared.
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Api::Text => "text",
            Api::Multimodal => "multimodal",
            Api::Compatible => "compatible",
        }
    }

    /// The field that carries an item's position in an answer.
    pub(crate) fn index_field(self) -> &'static str {
        match self {
            Api::Text => "text_index",
            Api::Multimodal | Api::Compatible => "index",
        }
    }
}

/// One item: a text, or a multimodal content object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FamilyItem {
    /// What it is metered as: text, image (also `multi_images`) or video.
    pub(crate) modality: Modality,
    /// Its canonical JSON ([`canonical_json`]): a text as a JSON string, a
    /// content object with its keys sorted; keyed and forwarded as is.
    pub(crate) json: Bytes,
    /// UTF-8 bytes of its text (0 for media): the apportioning weight and
    /// the quota bound of text tokens.
    pub(crate) text_bytes: u64,
    /// Images in it (a `multi_images` list counts each).
    pub(crate) images: u64,
    /// Video items in it.
    pub(crate) videos: u64,
}

/// A parsed family request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FamilyRequest {
    pub(crate) api: Api,
    pub(crate) model: Arc<ModelSpec>,
    pub(crate) items: Vec<FamilyItem>,
    /// Native: `parameters` as sent (forwarded). Compatible: the top-level
    /// fields other than `model`, `input` and `encoding_format`.
    pub(crate) parameters: Map<String, Value>,
    /// Native: top-level fields other than `model`, `input`, `parameters`.
    pub(crate) extra: Map<String, Value>,
    /// Native: `input` fields other than `texts` / `contents`.
    pub(crate) input_extra: Map<String, Value>,
    /// The parameters as keyed: defaults filled in (`dimension`,
    /// `text_type`), fields that cannot change a vector removed.
    pub(crate) key_parameters: Map<String, Value>,
    /// Length of each vector in the answer.
    pub(crate) dimension: usize,
    /// Answers carry a dense `embedding` per item (not `output_type:
    /// "sparse"` alone).
    pub(crate) dense: bool,
    /// Vectors of the whole request: cached whole, never per item.
    pub(crate) fused: bool,
    /// Compatible mode: the client asked for `encoding_format: "base64"`.
    pub(crate) base64: bool,
}

fn bad(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidParameter(msg.into())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The body as a JSON object, nesting bounded before parsing.
fn object(body: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    check_depth(body)?;
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(bad(format!(
            "request body must be a JSON object, got {}",
            kind(&other)
        ))),
        Err(e) => Err(bad(format!("request body is not valid JSON: {e}"))),
    }
}

/// `model`, looked up in the table.
fn model(m: &mut Map<String, Value>, table: &ModelTable) -> Result<Arc<ModelSpec>, GatewayError> {
    match m.remove("model") {
        None | Some(Value::Null) => Err(bad("model is required")),
        Some(Value::String(s)) if s.is_empty() => Err(bad("model must not be empty")),
        Some(Value::String(s)) => table.get(&s).cloned().ok_or(GatewayError::ModelNotFound(s)),
        Some(other) => Err(bad(format!("model must be a string, got {}", kind(&other)))),
    }
}

/// The model's name as the body gives it, if it is a string (to pick the
/// path a multimodal request takes).
pub(crate) fn peek_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        model: Option<String>,
    }
    serde_json::from_slice::<Peek>(body).ok()?.model
}

fn wrong_api(spec: &ModelSpec, want: Api) -> GatewayError {
    let hint = match spec.api {
        ModelApi::Text => "a text embedding model: POST /api/v1/services/embeddings/text-embedding/text-embedding",
        ModelApi::Multimodal => "a multimodal embedding model: POST /api/v1/services/embeddings/multimodal-embedding/multimodal-embedding",
        ModelApi::Batch => "a batch model: submit it on the text-embedding path with X-DashScope-Async: enable",
    };
    match want {
        Api::Compatible => GatewayError::ModelNotFound(format!(
            "{} (not served in OpenAI compatibility mode; it is {hint})",
            spec.name
        )),
        Api::Text | Api::Multimodal => bad(format!("model `{}` is {hint}", spec.name)),
    }
}

/// An optional object field.
fn sub_object(m: &mut Map<String, Value>, key: &str) -> Result<Map<String, Value>, GatewayError> {
    match m.remove(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(o)) => Ok(o),
        Some(other) => Err(bad(format!(
            "{key} must be an object, got {}",
            kind(&other)
        ))),
    }
}

/// `dimension` (`dimensions` in compatible mode), checked against the model.
fn dimension(
    spec: &ModelSpec,
    params: &Map<String, Value>,
    field: &str,
    at: &str,
) -> Result<usize, GatewayError> {
    match params.get(field) {
        None | Some(Value::Null) => Ok(spec.default_dimension),
        Some(Value::Number(n)) => {
            let d = n
                .as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .filter(|&d| spec.allows_dimension(d));
            d.ok_or_else(|| {
                bad(format!(
                    "{at} {n} is not supported by {}; allowed: {:?}",
                    spec.name, spec.dimensions
                ))
            })
        }
        Some(other) => Err(bad(format!("{at} must be an integer, got {}", kind(other)))),
    }
}

fn text_item(v: Value, at: &str, spec: &ModelSpec) -> Result<FamilyItem, GatewayError> {
    let Value::String(s) = &v else {
        return Err(bad(format!("{at} must be a string, got {}", kind(&v))));
    };
    text_ok(s.len(), at, spec)?;
    Ok(FamilyItem {
        modality: Modality::Text,
        text_bytes: s.len() as u64,
        images: 0,
        videos: 0,
        json: Bytes::from(canonical_json(&v)),
    })
}

/// A text of `len` UTF-8 bytes is neither empty nor over the model's limit.
fn text_ok(len: usize, at: &str, spec: &ModelSpec) -> Result<(), GatewayError> {
    if len == 0 {
        return Err(bad(format!("{at} must not be empty")));
    }
    if len > spec.max_text_bytes {
        return Err(bad(format!(
            "{at} is {len} bytes, over the limit of {} for {}",
            spec.max_text_bytes, spec.name
        )));
    }
    Ok(())
}

/// At most this many images in one `multi_images` item (documented: 8).
const MAX_MULTI_IMAGES: usize = 8;

fn media(v: &Value, at: &str, spec: &ModelSpec, video: bool) -> Result<(), GatewayError> {
    let Value::String(s) = v else {
        return Err(bad(format!("{at} must be a string, got {}", kind(v))));
    };
    if s.is_empty() {
        return Err(bad(format!("{at} must not be empty")));
    }
    if s.len() > spec.max_url_bytes {
        return Err(bad(format!(
            "{at} is {} bytes, over the limit of {}",
            s.len(),
            spec.max_url_bytes
        )));
    }
    let lower = s.get(..16).unwrap_or(s).to_ascii_lowercase();
    let remote = ["http://", "https://", "oss://"]
        .iter()
        .any(|p| lower.starts_with(p));
    if video && !remote {
        return Err(bad(format!(
            "{at} must be an http(s) or oss:// URL (a video cannot be sent inline)"
        )));
    }
    if !video && !remote && !lower.starts_with("data:image/") {
        return Err(bad(format!(
            "{at} must be an http(s) or oss:// URL or a data:image/… Base64 URI"
        )));
    }
    Ok(())
}

fn content_item(v: Value, at: &str, spec: &ModelSpec) -> Result<FamilyItem, GatewayError> {
    let Value::Object(o) = &v else {
        return Err(bad(format!(
            "{at} must be an object with one of text, image, video, multi_images; got {}",
            kind(&v)
        )));
    };
    let mut item = FamilyItem {
        modality: Modality::Text,
        json: Bytes::new(),
        text_bytes: 0,
        images: 0,
        videos: 0,
    };
    let mut kinds = 0;
    for (key, value) in o {
        let at = format!("{at}.{key}");
        match key.as_str() {
            "text" => {
                let Value::String(t) = value else {
                    return Err(bad(format!("{at} must be a string, got {}", kind(value))));
                };
                text_ok(t.len(), &at, spec)?;
                item.text_bytes = t.len() as u64;
            }
            "image" => {
                media(value, &at, spec, false)?;
                item.images += 1;
            }
            "video" => {
                media(value, &at, spec, true)?;
                item.videos += 1;
            }
            "multi_images" => {
                let Value::Array(list) = value else {
                    return Err(bad(format!("{at} must be a list of image URLs")));
                };
                if list.is_empty() || list.len() > MAX_MULTI_IMAGES {
                    return Err(bad(format!(
                        "{at} must list 1 to {MAX_MULTI_IMAGES} images, got {}",
                        list.len()
                    )));
                }
                for (j, u) in list.iter().enumerate() {
                    media(u, &format!("{at}[{j}]"), spec, false)?;
                }
                item.images += list.len() as u64;
            }
            // Accepted by both SDK generations' item types; kept and keyed.
            "factor" => {
                if !matches!(value, Value::Number(_) | Value::String(_)) {
                    return Err(bad(format!("{at} must be a number, got {}", kind(value))));
                }
                continue;
            }
            "audio" => {
                return Err(bad(format!(
                    "{at} is not supported by {}; audio is ONE-PEACE's only",
                    spec.name
                )))
            }
            other => {
                return Err(bad(format!(
                "{at} is not supported; an item has text, image, video or multi_images (got `{}`)",
                other.escape_debug()
            )))
            }
        }
        kinds += 1;
    }
    if kinds == 0 {
        return Err(bad(format!(
            "{at} must have one of text, image, video, multi_images"
        )));
    }
    item.modality = if item.videos > 0 {
        Modality::Video
    } else if item.images > 0 {
        Modality::Image
    } else {
        Modality::Text
    };
    item.json = Bytes::from(canonical_json(&v));
    Ok(item)
}

fn count_ok(n: usize, at: &str, spec: &ModelSpec) -> Result<(), GatewayError> {
    if n == 0 {
        return Err(bad(format!("{at} must not be empty")));
    }
    if n > spec.max_items {
        return Err(bad(format!(
            "{at} has {n} items, over the limit of {} for {}",
            spec.max_items, spec.name
        )));
    }
    Ok(())
}

const OUTPUT_TYPES: &[&str] = &["dense", "sparse", "dense&sparse"];

impl FamilyRequest {
    /// A native request on the text or multimodal path.
    pub(crate) fn parse_native(
        body: &Bytes,
        api: Api,
        table: &ModelTable,
    ) -> Result<FamilyRequest, GatewayError> {
        match quick::native(body, api, table) {
            Some(r) => Ok(r),
            None => full_native(body, api, table),
        }
    }

    /// A request on `/compatible-mode/v1/embeddings`.
    pub(crate) fn parse_compatible(
        body: &Bytes,
        table: &ModelTable,
    ) -> Result<FamilyRequest, GatewayError> {
        match quick::compatible(body, table) {
            Some(r) => Ok(r),
            None => full_compatible(body, table),
        }
    }

    /// The upstream body for the items at `which` (positions in `items`),
    /// in that order. Compatible mode always asks for floats: answers are
    /// stored as floats and re-encoded for base64 clients. Written as
    /// serde_json writes the request's tree (members sorted by key).
    pub(crate) fn upstream_body(&self, which: &[usize]) -> Bytes {
        let items: Vec<&Bytes> = which
            .iter()
            .filter_map(|&i| self.items.get(i))
            .map(|it| &it.json)
            .collect();
        let mut top: Members<'_> = BTreeMap::new();
        top.insert("model", Part::Str(&self.model.name));
        match self.api {
            Api::Compatible => {
                top.insert("input", Part::Items(&items));
                for (k, v) in &self.parameters {
                    top.insert(k, Part::Json(v));
                }
                top.insert("encoding_format", Part::Str("float"));
            }
            Api::Text | Api::Multimodal => {
                let mut input: Members<'_> = BTreeMap::new();
                for (k, v) in &self.input_extra {
                    input.insert(k, Part::Json(v));
                }
                let key = if self.api == Api::Text {
                    "texts"
                } else {
                    "contents"
                };
                input.insert(key, Part::Items(&items));
                top.insert("input", Part::Object(input));
                top.insert("parameters", Part::Map(&self.parameters));
                for (k, v) in &self.extra {
                    top.insert(k, Part::Json(v));
                }
            }
        }
        let size: usize = items.iter().map(|i| i.len() + 1).sum();
        let mut out = Vec::with_capacity(size + 256);
        write_members(&mut out, &top);
        Bytes::from(out)
    }
}

/// An object of the upstream body, members by key.
type Members<'a> = BTreeMap<&'a str, Part<'a>>;

/// A member's value in the upstream body.
enum Part<'a> {
    Str(&'a str),
    Json(&'a Value),
    Map(&'a Map<String, Value>),
    Object(Members<'a>),
    /// The items, each its canonical JSON.
    Items(&'a [&'a Bytes]),
}

fn write_members(out: &mut Vec<u8>, members: &Members<'_>) {
    out.push(b'{');
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json(out, k);
        out.push(b':');
        match v {
            Part::Str(s) => write_json(out, s),
            Part::Json(v) => write_json(out, v),
            Part::Map(m) => write_json(out, m),
            Part::Object(o) => write_members(out, o),
            Part::Items(items) => {
                out.push(b'[');
                for (j, item) in items.iter().enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(item);
                }
                out.push(b']');
            }
        }
    }
    out.push(b'}');
}

/// Writing JSON to a `Vec` fails only for a map with non-string keys,
/// which none of these are.
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let _ = serde_json::to_writer(out, v);
}

/// The full reader of a native request: every error named.
fn full_native(body: &[u8], api: Api, table: &ModelTable) -> Result<FamilyRequest, GatewayError> {
    let mut m = object(body)?;
    let spec = model(&mut m, table)?;
    native_api_ok(&spec, api)?;
    let mut input = match m.remove("input") {
        None | Some(Value::Null) => return Err(bad("input is required")),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(bad(format!(
                "input must be an object, got {}",
                kind(&other)
            )))
        }
    };
    let parameters = sub_object(&mut m, "parameters")?;
    let list_key = list_key(api);
    let at = format!("input.{list_key}");
    let list = match input.remove(list_key) {
        None | Some(Value::Null) => return Err(bad(format!("{at} is required"))),
        // The SDK wraps one string itself; a bare string is taken too.
        Some(Value::String(s)) if api == Api::Text => vec![Value::String(s)],
        Some(Value::Array(a)) => a,
        Some(other) => return Err(bad(format!("{at} must be a list, got {}", kind(&other)))),
    };
    count_ok(list.len(), &at, &spec)?;
    let items = list
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let at = format!("{at}[{i}]");
            match api {
                Api::Text => text_item(v, &at, &spec),
                Api::Multimodal | Api::Compatible => content_item(v, &at, &spec),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    native_request(api, spec, items, parameters, m, input)
}

/// The full reader of a compatible-mode request: every error named.
fn full_compatible(body: &[u8], table: &ModelTable) -> Result<FamilyRequest, GatewayError> {
    let mut m = object(body)?;
    let spec = model(&mut m, table)?;
    if !spec.compatible_mode {
        return Err(wrong_api(&spec, Api::Compatible));
    }
    let list = match m.remove("input") {
        None | Some(Value::Null) => return Err(bad("input is required")),
        Some(Value::String(s)) => vec![Value::String(s)],
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(bad(format!(
                "input must be a string or a list of strings, got {}",
                kind(&other)
            )))
        }
    };
    count_ok(list.len(), "input", &spec)?;
    let items = list
        .into_iter()
        .enumerate()
        .map(|(i, v)| text_item(v, &format!("input[{i}]"), &spec))
        .collect::<Result<Vec<_>, _>>()?;
    let base64 = match m.remove("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => return Err(bad("encoding_format must be \"float\" or \"base64\"")),
    };
    compatible_request(spec, items, m, base64)
}

/// The model serves this native API.
fn native_api_ok(spec: &ModelSpec, api: Api) -> Result<(), GatewayError> {
    let want = match api {
        Api::Text => ModelApi::Text,
        Api::Multimodal | Api::Compatible => ModelApi::Multimodal,
    };
    if spec.api != want || spec.vectors == Vectors::Weighted {
        return Err(wrong_api(spec, api));
    }
    Ok(())
}

/// Where a native request lists its items.
fn list_key(api: Api) -> &'static str {
    match api {
        Api::Text => "texts",
        Api::Multimodal | Api::Compatible => "contents",
    }
}

/// A native request from its parts, its items read: what its parameters
/// mean for the model.
fn native_request(
    api: Api,
    spec: Arc<ModelSpec>,
    items: Vec<FamilyItem>,
    parameters: Map<String, Value>,
    extra: Map<String, Value>,
    input_extra: Map<String, Value>,
) -> Result<FamilyRequest, GatewayError> {
    let dimension = dimension(&spec, &parameters, "dimension", "parameters.dimension")?;
    let mut key_parameters = parameters.clone();
    key_parameters.insert("dimension".into(), Value::from(dimension));
    // Only whether an over-long input errors; errors are never cached.
    key_parameters.remove("auto_truncation");
    let mut dense = true;
    if let Some(v) = parameters.get("output_type") {
        match v.as_str() {
            Some(t) if OUTPUT_TYPES.contains(&t) => dense = t != "sparse",
            _ => {
                return Err(bad(format!(
                    "parameters.output_type must be one of {OUTPUT_TYPES:?}"
                )))
            }
        }
    }
    if api == Api::Text {
        match parameters.get("text_type") {
            None | Some(Value::Null) => {
                // DashScope's documented default.
                key_parameters.insert("text_type".into(), Value::from("document"));
            }
            Some(Value::String(t)) if t == "query" || t == "document" => {}
            Some(_) => {
                return Err(bad(
                    "parameters.text_type must be \"query\" or \"document\"",
                ))
            }
        }
    }
    let fusion = match parameters.get("enable_fusion") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(format!(
                "parameters.enable_fusion must be a boolean, got {}",
                kind(other)
            )))
        }
    };
    if !fusion {
        key_parameters.remove("enable_fusion");
    }
    let fused = match spec.vectors {
        Vectors::PerItem => false,
        Vectors::PerItemUnlessFusion => fusion,
        Vectors::Fused | Vectors::Weighted => true,
    };
    Ok(FamilyRequest {
        api,
        model: spec,
        items,
        parameters,
        extra,
        input_extra,
        key_parameters,
        dimension,
        dense,
        fused,
        base64: false,
    })
}

/// A compatible-mode request from its parts, its items read; `m` is the
/// top level less `model`, `input` and `encoding_format`.
fn compatible_request(
    spec: Arc<ModelSpec>,
    items: Vec<FamilyItem>,
    m: Map<String, Value>,
    base64: bool,
) -> Result<FamilyRequest, GatewayError> {
    let dimension = dimension(&spec, &m, "dimensions", "dimensions")?;
    let mut key_parameters = m.clone();
    key_parameters.insert("dimensions".into(), Value::from(dimension));
    // An end-user tag: no effect on vectors.
    key_parameters.remove("user");
    Ok(FamilyRequest {
        api: Api::Compatible,
        model: spec,
        items,
        parameters: m,
        extra: Map::new(),
        input_extra: Map::new(),
        key_parameters,
        dimension,
        dense: true,
        fused: false,
        base64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ModelTable {
        crate::config::Config::parse("", &|_| None).unwrap().models
    }

    /// Both readers: what the quick one reads, the full one reads the same.
    fn native(body: &[u8], api: Api, t: &ModelTable) -> Result<FamilyRequest, GatewayError> {
        let body = Bytes::copy_from_slice(body);
        let full = full_native(&body, api, t);
        if let Some(q) = quick::native(&body, api, t) {
            assert_eq!(Some(&q), full.as_ref().ok(), "{body:?}");
        }
        let r = FamilyRequest::parse_native(&body, api, t);
        assert_same(&r, &full);
        r
    }

    fn compatible(body: &[u8], t: &ModelTable) -> Result<FamilyRequest, GatewayError> {
        let body = Bytes::copy_from_slice(body);
        let full = full_compatible(&body, t);
        if let Some(q) = quick::compatible(&body, t) {
            assert_eq!(Some(&q), full.as_ref().ok(), "{body:?}");
        }
        let r = FamilyRequest::parse_compatible(&body, t);
        assert_same(&r, &full);
        r
    }

    fn assert_same(
        a: &Result<FamilyRequest, GatewayError>,
        b: &Result<FamilyRequest, GatewayError>,
    ) {
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(a), Err(b)) => assert_eq!((a.status(), a.message()), (b.status(), b.message())),
            _ => panic!("{a:?} vs {b:?}"),
        }
    }

    #[test]
    fn text_requests() {
        let t = table();
        let r = native(
            br#"{"model":"text-embedding-v4","input":{"texts":["a","bc"]},"parameters":{"dimension":512}}"#,
            Api::Text,
            &t,
        )
        .unwrap();
        assert_eq!((r.items.len(), r.dimension, r.fused), (2, 512, false));
        assert_eq!(r.key_parameters["text_type"], "document");
        assert_eq!(r.items[1].text_bytes, 2);
        let bad_dim = native(
            br#"{"model":"text-embedding-v4","input":{"texts":["a"]},"parameters":{"dimension":500}}"#,
            Api::Text,
            &t,
        )
        .unwrap_err();
        assert!(
            bad_dim.message().contains("parameters.dimension"),
            "{}",
            bad_dim.message()
        );
        let eleven: Vec<String> = (0..11).map(|i| format!("t{i}")).collect();
        let too_many = native(
            serde_json::json!({"model":"text-embedding-v4","input":{"texts":eleven}})
                .to_string()
                .as_bytes(),
            Api::Text,
            &t,
        )
        .unwrap_err();
        assert!(
            too_many.message().contains("over the limit of 10"),
            "{}",
            too_many.message()
        );
        let unknown = native(
            br#"{"model":"text-embedding-v9","input":{"texts":["a"]}}"#,
            Api::Text,
            &t,
        )
        .unwrap_err();
        assert!(unknown.message().contains("text-embedding-v9"));
        let wrong = native(
            br#"{"model":"qwen3-vl-embedding","input":{"texts":["a"]}}"#,
            Api::Text,
            &t,
        )
        .unwrap_err();
        assert!(
            wrong.message().contains("multimodal"),
            "{}",
            wrong.message()
        );
    }

    #[test]
    fn multimodal_requests() {
        let t = table();
        let r = native(
            br#"{"model":"qwen3-vl-embedding","input":{"contents":[{"text":"a"},{"image":"https://x/1.png"},{"video":"oss://b/v.mp4"}]},"parameters":{"enable_fusion":true}}"#,
            Api::Multimodal,
            &t,
        )
        .unwrap();
        assert!(r.fused);
        let kinds: Vec<Modality> = r.items.iter().map(|i| i.modality).collect();
        assert_eq!(kinds, [Modality::Text, Modality::Image, Modality::Video]);
        let r = native(
            br#"{"model":"qwen3-vl-embedding","input":{"contents":[{"text":"a"}]},"parameters":{"enable_fusion":false}}"#,
            Api::Multimodal,
            &t,
        )
        .unwrap();
        assert!(!r.fused && !r.key_parameters.contains_key("enable_fusion"));
        for (body, field) in [
            (
                r#"{"model":"tongyi-embedding-vision-plus","input":{"contents":[{"video":"data:video/mp4;base64,AA"}]}}"#,
                "input.contents[0].video",
            ),
            (
                r#"{"model":"tongyi-embedding-vision-plus","input":{"contents":[{"image":"/etc/passwd"}]}}"#,
                "input.contents[0].image",
            ),
            (
                r#"{"model":"tongyi-embedding-vision-plus","input":{"contents":[{"audio":"https://a"}]}}"#,
                "input.contents[0].audio",
            ),
            (
                r#"{"model":"tongyi-embedding-vision-plus","input":{"contents":[{}]}}"#,
                "input.contents[0]",
            ),
            (
                r#"{"model":"multimodal-embedding-v1","input":{"contents":[{"text":"a"}]},"parameters":{"dimension":512}}"#,
                "parameters.dimension",
            ),
        ] {
            let e = native(body.as_bytes(), Api::Multimodal, &t).unwrap_err();
            assert!(e.message().contains(field), "{body}: {}", e.message());
        }
    }

    #[test]
    fn compatible_requests() {
        let t = table();
        let r = compatible(
            br#"{"model":"text-embedding-v4","input":["a","b"],"encoding_format":"base64","user":"u1"}"#,
            &t,
        )
        .unwrap();
        assert!(r.base64 && r.dimension == 1024 && !r.key_parameters.contains_key("user"));
        let body: Value = serde_json::from_slice(&r.upstream_body(&[1])).unwrap();
        assert_eq!(body["input"], serde_json::json!(["b"]));
        assert_eq!(body["encoding_format"], "float");
        let e = compatible(br#"{"model":"text-embedding-v2","input":"a"}"#, &t).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn both_readers_agree() {
        let t = table();
        let deep = format!(
            r#"{{"model":"text-embedding-v4","input":{{"texts":["a"]}},"parameters":{{"x":{}1{}}}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        let nested = format!(
            r#"{{"model":"text-embedding-v4","input":{{"texts":["a"]}},"parameters":{{"x":{}1{}}}}}"#,
            "[".repeat(10),
            "]".repeat(10)
        );
        // (body, read by the quick reader)
        let text: &[(&str, bool)] = &[
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a","bc"]},"parameters":{"dimension":1024}}"#,
                true,
            ),
            (
                r#" { "input" : { "texts" : [ "x y" , "é😀" ] } , "model" : "text-embedding-v4" } "#,
                true,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a\nb","\u0041","\"q\"","\/","\ud83d\ude00","tab\t"]}}"#,
                true,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["\ud800"]}}"#,
                false,
            ),
            (
                "{\"model\":\"text-embedding-v4\",\"input\":{\"texts\":[\"a\u{1}b\"]}}",
                false,
            ),
            (
                r#"{"model":"text-embedding-v3","model":"text-embedding-v4","input":{"texts":["a"],"texts":["b","c"]}}"#,
                true,
            ),
            (
                r#"{"model":"text-embedding-v4","model":7,"input":{"texts":["a"]}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a"]},"parameters":null}"#,
                true,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a"]},"parameters":{"dimension":512},"parameters":{"text_type":"query"}}"#,
                true,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a"],"extra_in":{"k":[1,2]}},"zz":true,"aa":null}"#,
                true,
            ),
            (
                r#"{"mo\u0064el":"text-embedding-v4","input":{"texts":["a"]}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":"one string"}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":[1]}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":[""]}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":[]}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["1","2","3","4","5","6","7","8","9","10","11"]}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a"]},"parameters":{"dimension":1024.0}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a"]},"parameters":{"dimension":"1024"}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a"]},"parameters":{"text_type":"query","output_type":"sparse"}}"#,
                true,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a"]},"parameters":{"text_type":"other"}}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a"]},"parameters":[]}"#,
                false,
            ),
            (r#"{"model":"text-embedding-v4","input":null}"#, false),
            (
                r#"{"model":"text-embedding-v4","input":{"texts":["a"]}} x"#,
                false,
            ),
            (r#"{"model":"nope","input":{"texts":["a"]}}"#, false),
            (
                r#"{"model":"qwen3-vl-embedding","input":{"texts":["a"]}}"#,
                false,
            ),
            (r#"["model"]"#, false),
            ("{", false),
            (&deep, false),
            (&nested, false),
        ];
        for (body, quick) in text {
            let _ = native(body.as_bytes(), Api::Text, &t);
            let b = Bytes::copy_from_slice(body.as_bytes());
            assert_eq!(quick::native(&b, Api::Text, &t).is_some(), *quick, "{body}");
        }
        let multimodal: &[(&str, bool)] = &[
            (
                r#"{"model":"qwen3-vl-embedding","input":{"contents":[{"text":"a","factor":1},{"image":"https://x/1.png"},{"multi_images":["https://x/1.png","oss://b/2.png"]}]}}"#,
                true,
            ),
            (
                r#"{"model":"qwen3-vl-embedding","input":{"contents":[{"video":"oss://b/v.mp4","text":"caption"}]},"parameters":{"enable_fusion":true,"dimension":1024}}"#,
                true,
            ),
            (
                r#"{"model":"qwen3-vl-embedding","input":{"contents":[{"audio":"https://a"}]}}"#,
                false,
            ),
            (
                r#"{"model":"qwen3-vl-embedding","input":{"contents":["text"]}}"#,
                false,
            ),
        ];
        for (body, quick) in multimodal {
            let _ = native(body.as_bytes(), Api::Multimodal, &t);
            let b = Bytes::copy_from_slice(body.as_bytes());
            assert_eq!(
                quick::native(&b, Api::Multimodal, &t).is_some(),
                *quick,
                "{body}"
            );
        }
        let compat: &[(&str, bool)] = &[
            (
                r#"{"model":"text-embedding-v4","input":["a","b\n"],"encoding_format":"base64","user":"u1","dimensions":512}"#,
                true,
            ),
            (
                r#"{"model":"text-embedding-v4","input":"one","encoding_format":null}"#,
                true,
            ),
            (
                r#"{"model":"text-embedding-v4","input":"one","encoding_format":"float"}"#,
                true,
            ),
            (
                r#"{"model":"text-embedding-v4","input":"one","encoding_format":"hex"}"#,
                false,
            ),
            (
                r#"{"model":"text-embedding-v4","input":[["nested"]]}"#,
                false,
            ),
            (r#"{"model":"text-embedding-v2","input":"a"}"#, false),
        ];
        for (body, quick) in compat {
            let _ = compatible(body.as_bytes(), &t);
            let b = Bytes::copy_from_slice(body.as_bytes());
            assert_eq!(quick::compatible(&b, &t).is_some(), *quick, "{body}");
        }
    }

    /// The upstream body is what serializing the request's tree wrote.
    #[test]
    fn upstream_bodies_are_the_trees() {
        let t = table();
        let r = native(
            br#"{"zz":1,"model":"qwen3-vl-embedding","aa":[true],"input":{"contents":[{"text":"a\/b","factor":2},{"image":"https://x/1.png"}],"a":1,"z":{"y":2,"b":3}},"parameters":{"dimension":1024,"auto_truncation":true}}"#,
            Api::Multimodal,
            &t,
        )
        .unwrap();
        let tree = |items: Vec<Value>| {
            let mut input = r.input_extra.clone();
            input.insert("contents".into(), Value::Array(items));
            let mut top = r.extra.clone();
            top.insert("model".into(), Value::from(r.model.name.clone()));
            top.insert("input".into(), Value::Object(input));
            top.insert("parameters".into(), Value::Object(r.parameters.clone()));
            serde_json::to_vec(&Value::Object(top)).unwrap()
        };
        let item = |i: usize| serde_json::from_slice::<Value>(&r.items[i].json).unwrap();
        assert_eq!(
            &r.upstream_body(&[1, 0])[..],
            &tree(vec![item(1), item(0)])[..]
        );
        assert_eq!(&r.upstream_body(&[0])[..], &tree(vec![item(0)])[..]);
        let r = compatible(
            br#"{"model":"text-embedding-v4","input":["x","y\u00e9"],"user":"u","dimensions":512,"encoding_format":"base64"}"#,
            &t,
        )
        .unwrap();
        let mut top = r.parameters.clone();
        top.insert("model".into(), Value::from("text-embedding-v4"));
        top.insert("input".into(), serde_json::json!(["yé"]));
        top.insert("encoding_format".into(), Value::from("float"));
        assert_eq!(
            &r.upstream_body(&[1])[..],
            &serde_json::to_vec(&Value::Object(top)).unwrap()[..]
        );
    }
}
