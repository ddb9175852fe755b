//! The multimodal family other than ONE-PEACE, on the multimodal path:
//! independent per-item vectors (`multimodal-embedding-v1`, tongyi vision,
//! `qwen2.5-vl-embedding`, `qwen3-vl-embedding`), and one fused vector for
//! `qwen3-vl-embedding` with `enable_fusion=true`.

use std::sync::atomic::Ordering;

use http::HeaderMap;
use serde_json::{json, Value};

use crate::text::dimension_of;
use crate::vectors::{
    content_kind_value, fusion_embedding_with, item_embedding_with, text_tokens, video_frames,
};
use crate::{array_of, error, new_request_id, reply_raw, Answer, FakeState, Fault, Obj};

/// Contents per request the fake accepts.
pub const MAX_CONTENTS: usize = 20;
/// Visual tokens per image, and per sampled video frame.
pub const TOKENS_PER_IMAGE: u64 = 256;

/// A multimodal model of the family and what it accepts.
#[derive(Debug, Clone, Copy)]
pub struct MultimodalModel {
    pub name: &'static str,
    pub dims: &'static [usize],
    pub default_dim: usize,
    /// Accepts `multi_images` items.
    pub multi_images: bool,
    /// Honours `parameters.enable_fusion`.
    pub fusion: bool,
}

pub const MULTIMODAL_MODELS: &[MultimodalModel] = &[
    MultimodalModel {
        name: "multimodal-embedding-v1",
        dims: &[1024],
        default_dim: 1024,
        multi_images: false,
        fusion: false,
    },
    MultimodalModel {
        name: "tongyi-embedding-vision-plus",
        dims: &[64, 128, 256, 512, 1024, 1152],
        default_dim: 1152,
        multi_images: true,
        fusion: false,
    },
    MultimodalModel {
        name: "tongyi-embedding-vision-flash",
        dims: &[64, 128, 256, 512, 768],
        default_dim: 768,
        multi_images: true,
        fusion: false,
    },
    MultimodalModel {
        name: "qwen3-vl-embedding",
        dims: &[256, 512, 768, 1024, 1536, 2048, 2560],
        default_dim: 2560,
        multi_images: false,
        fusion: true,
    },
    MultimodalModel {
        name: "qwen2.5-vl-embedding",
        dims: &[512, 768, 1024, 2048],
        default_dim: 1024,
        multi_images: false,
        fusion: false,
    },
];

pub(crate) fn model(name: &str) -> Option<&'static MultimodalModel> {
    MULTIMODAL_MODELS.iter().find(|m| m.name == name)
}

fn invalid(message: &str) -> Answer {
    error(400, "InvalidParameter", message)
}

fn image_ok(url: &str) -> bool {
    ["http://", "https://", "oss://", "data:image/"]
        .iter()
        .any(|p| url.starts_with(p))
}

/// Checks a media URL the way ONE-PEACE does (oss:// needs the resolve
/// header; "unreachable" in a URL cannot be fetched).
fn media_check(url: &str, resolve: bool) -> Option<Answer> {
    if url.starts_with("oss://") && !resolve {
        return Some(invalid(
            "oss:// resources need X-DashScope-OssResourceResolve: enable",
        ));
    }
    if url.contains("unreachable") {
        return Some(error(
            400,
            "InvalidURL",
            "Invalid URL provided in your request.",
        ));
    }
    None
}

/// Usage of one item: (text tokens, visual tokens, images).
fn item_usage(kind: &str, item: &Value, params: &Value) -> (u64, u64, u64) {
    match kind {
        "text" => (
            text_tokens(item.get("text").and_then(Value::as_str).unwrap_or("")),
            0,
            0,
        ),
        "image" => (0, TOKENS_PER_IMAGE, 1),
        "video" => (0, video_frames(params) * TOKENS_PER_IMAGE, 0),
        "multi_images" => {
            let n = item
                .get("multi_images")
                .and_then(Value::as_array)
                .map_or(0, |a| a.len() as u64);
            (0, n * TOKENS_PER_IMAGE, n)
        }
        _ => (0, 0, 0),
    }
}

pub(crate) fn embed(
    s: &FakeState,
    m: &MultimodalModel,
    headers: &HeaderMap,
    v: &Value,
    fault: Option<Fault>,
) -> Answer {
    let Some(contents) = v.pointer("/input/contents").and_then(Value::as_array) else {
        return invalid("input.contents is required");
    };
    if contents.is_empty() {
        return invalid("input.contents should not be empty");
    }
    if contents.len() > MAX_CONTENTS {
        return invalid(&format!(
            "input.contents: at most {MAX_CONTENTS} contents per request"
        ));
    }
    let empty = json!({});
    let params = v.get("parameters").unwrap_or(&empty);
    let dimension = match dimension_of(params, "dimension", m.dims, m.default_dim) {
        Ok(d) => d,
        Err(msg) => return invalid(&msg),
    };
    match params.get("output_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "dense" => {}
        Some(other) => {
            return invalid(&format!(
                "The output_type parameter is invalid ({other}): only dense is supported."
            ))
        }
    }
    let resolve = headers
        .get("x-dashscope-ossresourceresolve")
        .and_then(|h| h.to_str().ok())
        == Some("enable");
    let mut kinds = Vec::with_capacity(contents.len());
    for (i, item) in contents.iter().enumerate() {
        let Some((kind, value)) = content_kind_value(item) else {
            return invalid(&format!(
                "input.contents[{i}] should have exactly one of text, image, video{}",
                if m.multi_images { ", multi_images" } else { "" }
            ));
        };
        match kind {
            "text" => {
                if !item.get("text").is_some_and(Value::is_string) || value.is_empty() {
                    return invalid(&format!(
                        "input.contents[{i}].text should be a non-empty string"
                    ));
                }
            }
            "image" => {
                if !item.get("image").is_some_and(Value::is_string) || !image_ok(&value) {
                    return invalid(&format!(
                        "input.contents[{i}].image should be an http(s):// or oss:// URL or a data:image/ URI"
                    ));
                }
                if let Some(answer) = media_check(&value, resolve) {
                    return answer;
                }
            }
            "video" => {
                if value.starts_with("data:") {
                    return invalid(&format!(
                        "input.contents[{i}].video should be a URL: base64 video is not supported"
                    ));
                }
                if !item.get("video").is_some_and(Value::is_string) || !image_ok(&value) {
                    return invalid(&format!(
                        "input.contents[{i}].video should be an http(s):// or oss:// URL"
                    ));
                }
                if let Some(answer) = media_check(&value, resolve) {
                    return answer;
                }
            }
            _ => {
                if !m.multi_images {
                    return invalid(&format!(
                        "input.contents[{i}].multi_images is not supported by model {}",
                        m.name
                    ));
                }
                let Some(urls) = item.get("multi_images").and_then(Value::as_array) else {
                    return invalid(&format!(
                        "input.contents[{i}].multi_images should be a list of image URLs"
                    ));
                };
                if urls.is_empty() || urls.len() > 8 {
                    return invalid(&format!(
                        "input.contents[{i}].multi_images should hold 1 to 8 images"
                    ));
                }
                for (j, u) in urls.iter().enumerate() {
                    let u = u.as_str().unwrap_or("");
                    if !image_ok(u) {
                        return invalid(&format!(
                            "input.contents[{i}].multi_images[{j}] should be an http(s):// or oss:// URL or a data:image/ URI"
                        ));
                    }
                    if let Some(answer) = media_check(u, resolve) {
                        return answer;
                    }
                }
            }
        }
        kinds.push((kind, value));
    }
    let rid = new_request_id();
    match fault {
        Some(Fault::CodeOn200) => {
            return reply_raw(
                200,
                json!({"code": "InternalError.Algo", "message": "injected", "request_id": rid})
                    .to_string(),
            )
        }
        Some(Fault::BadEmbedding) => {
            return reply_raw(
                200,
                json!({"output": {"embeddings": [{"index": 0, "embedding": [0.1, 0.2], "type": "text"}]}, "usage": {"input_tokens": 1, "image_tokens": 0}, "request_id": rid}).to_string(),
            )
        }
        _ => {}
    }
    let (mut text, mut visual, mut images) = (0u64, 0u64, 0u64);
    for (item, (kind, _)) in contents.iter().zip(&kinds) {
        let (t, vis, n) = item_usage(kind, item, params);
        text += t;
        visual += vis;
        images += n;
    }
    if matches!(fault, Some(Fault::WrongUsage)) {
        text += 1;
    }
    let full = s.full_precision.load(Ordering::SeqCst);
    let fused = m.fusion && params.get("enable_fusion").and_then(Value::as_bool) == Some(true);
    let entries: Vec<String> = if fused {
        vec![Obj::new()
            .put("index", json!(0))
            .put(
                "embedding",
                json!(fusion_embedding_with(
                    m.name,
                    &Value::Array(contents.clone()),
                    params,
                    dimension,
                    full
                )),
            )
            .put("type", json!("fusion"))
            .done()]
    } else {
        kinds
            .iter()
            .enumerate()
            .map(|(i, (kind, value))| {
                Obj::new()
                    .put("index", json!(i))
                    .put(
                        "embedding",
                        json!(item_embedding_with(
                            m.name, kind, value, params, dimension, full
                        )),
                    )
                    .put("type", json!(kind))
                    .done()
            })
            .collect()
    };
    let input_tokens = text + visual;
    s.billed_units.fetch_add(input_tokens, Ordering::SeqCst);
    let mut usage = Obj::new()
        .put("input_tokens", json!(input_tokens))
        .put("image_tokens", json!(visual));
    if images > 0 {
        usage = usage.put("image_count", json!(images));
    }
    let body = Obj::new()
        .raw(
            "output",
            &Obj::new().raw("embeddings", &array_of(&entries)).done(),
        )
        .raw("usage", &usage.done())
        .put("request_id", json!(rid))
        .done();
    reply_raw(200, body)
}
