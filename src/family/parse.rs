//! Requests of the embedding family (every model but ONE-PEACE), parsed
//! and checked against the model table before anything is forwarded: the
//! native text API (`input.texts`), the native multimodal API
//! (`input.contents`) and the OpenAI-compatible API (`input`).

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::{ModelApi, ModelSpec, ModelTable, Vectors};
use crate::error::GatewayError;
use crate::request::{check_depth, Modality};

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
    /// As sent: a JSON string (texts) or object (contents); forwarded and
    /// keyed as is.
    pub(crate) raw: Value,
    /// UTF-8 bytes of its text (0 for media): the apportioning weight and
    /// the quota bound of text tokens.
    pub(crate) text_bytes: u64,
    /// Images in it (a `multi_images` list counts each).
    pub(crate) images: u64,
    /// Video items in it.
    pub(crate) videos: u64,
}

/// A parsed family request.
#[derive(Debug, Clone)]
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
    if s.is_empty() {
        return Err(bad(format!("{at} must not be empty")));
    }
    if s.len() > spec.max_text_bytes {
        return Err(bad(format!(
            "{at} is {} bytes, over the limit of {} for {}",
            s.len(),
            spec.max_text_bytes,
            spec.name
        )));
    }
    Ok(FamilyItem {
        modality: Modality::Text,
        text_bytes: s.len() as u64,
        images: 0,
        videos: 0,
        raw: v,
    })
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
        raw: Value::Null,
        text_bytes: 0,
        images: 0,
        videos: 0,
    };
    let mut kinds = 0;
    for (key, value) in o {
        let at = format!("{at}.{key}");
        match key.as_str() {
            "text" => {
                let t = text_item(value.clone(), &at, spec)?;
                item.text_bytes = t.text_bytes;
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
    item.raw = v;
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
        body: &[u8],
        api: Api,
        table: &ModelTable,
    ) -> Result<FamilyRequest, GatewayError> {
        let mut m = object(body)?;
        let spec = model(&mut m, table)?;
        let want = match api {
            Api::Text => ModelApi::Text,
            Api::Multimodal | Api::Compatible => ModelApi::Multimodal,
        };
        if spec.api != want || spec.vectors == Vectors::Weighted {
            return Err(wrong_api(&spec, api));
        }
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
        let list_key = match api {
            Api::Text => "texts",
            Api::Multimodal | Api::Compatible => "contents",
        };
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
            extra: m,
            input_extra: input,
            key_parameters,
            dimension,
            dense,
            fused,
            base64: false,
        })
    }

    /// A request on `/compatible-mode/v1/embeddings`.
    pub(crate) fn parse_compatible(
        body: &[u8],
        table: &ModelTable,
    ) -> Result<FamilyRequest, GatewayError> {
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

    /// The upstream body for the items at `which` (positions in `items`),
    /// in that order. Compatible mode always asks for floats: answers are
    /// stored as floats and re-encoded for base64 clients.
    pub(crate) fn upstream_body(&self, which: &[usize]) -> Result<bytes::Bytes, GatewayError> {
        let items: Vec<&Value> = which
            .iter()
            .filter_map(|&i| self.items.get(i))
            .map(|it| &it.raw)
            .collect();
        let mut top = Map::new();
        top.insert("model".into(), Value::from(self.model.name.clone()));
        match self.api {
            Api::Compatible => {
                top.insert(
                    "input".into(),
                    serde_json::to_value(&items).map_err(internal)?,
                );
                for (k, v) in &self.parameters {
                    top.insert(k.clone(), v.clone());
                }
                top.insert("encoding_format".into(), Value::from("float"));
            }
            Api::Text | Api::Multimodal => {
                let mut input = self.input_extra.clone();
                let key = if self.api == Api::Text {
                    "texts"
                } else {
                    "contents"
                };
                input.insert(key.into(), serde_json::to_value(&items).map_err(internal)?);
                top.insert("input".into(), Value::Object(input));
                top.insert("parameters".into(), Value::Object(self.parameters.clone()));
                for (k, v) in &self.extra {
                    top.insert(k.clone(), v.clone());
                }
            }
        }
        serde_json::to_vec(&Value::Object(top))
            .map(bytes::Bytes::from)
            .map_err(internal)
    }
}

fn internal(e: serde_json::Error) -> GatewayError {
    GatewayError::Internal(format!("serializing an upstream body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ModelTable {
        crate::config::Config::parse("", &|_| None).unwrap().models
    }

    #[test]
    fn text_requests() {
        let t = table();
        let r = FamilyRequest::parse_native(
            br#"{"model":"text-embedding-v4","input":{"texts":["a","bc"]},"parameters":{"dimension":512}}"#,
            Api::Text,
            &t,
        )
        .unwrap();
        assert_eq!((r.items.len(), r.dimension, r.fused), (2, 512, false));
        assert_eq!(r.key_parameters["text_type"], "document");
        assert_eq!(r.items[1].text_bytes, 2);
        let bad_dim = FamilyRequest::parse_native(
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
        let too_many = FamilyRequest::parse_native(
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
        let unknown = FamilyRequest::parse_native(
            br#"{"model":"text-embedding-v9","input":{"texts":["a"]}}"#,
            Api::Text,
            &t,
        )
        .unwrap_err();
        assert!(unknown.message().contains("text-embedding-v9"));
        let wrong = FamilyRequest::parse_native(
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
        let r = FamilyRequest::parse_native(
            br#"{"model":"qwen3-vl-embedding","input":{"contents":[{"text":"a"},{"image":"https://x/1.png"},{"video":"oss://b/v.mp4"}]},"parameters":{"enable_fusion":true}}"#,
            Api::Multimodal,
            &t,
        )
        .unwrap();
        assert!(r.fused);
        let kinds: Vec<Modality> = r.items.iter().map(|i| i.modality).collect();
        assert_eq!(kinds, [Modality::Text, Modality::Image, Modality::Video]);
        let r = FamilyRequest::parse_native(
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
            let e = FamilyRequest::parse_native(body.as_bytes(), Api::Multimodal, &t).unwrap_err();
            assert!(e.message().contains(field), "{body}: {}", e.message());
        }
    }

    #[test]
    fn compatible_requests() {
        let t = table();
        let r = FamilyRequest::parse_compatible(
            br#"{"model":"text-embedding-v4","input":["a","b"],"encoding_format":"base64","user":"u1"}"#,
            &t,
        )
        .unwrap();
        assert!(r.base64 && r.dimension == 1024 && !r.key_parameters.contains_key("user"));
        let body: Value = serde_json::from_slice(&r.upstream_body(&[1]).unwrap()).unwrap();
        assert_eq!(body["input"], serde_json::json!(["b"]));
        assert_eq!(body["encoding_format"], "float");
        let e =
            FamilyRequest::parse_compatible(br#"{"model":"text-embedding-v2","input":"a"}"#, &t)
                .unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }
}
