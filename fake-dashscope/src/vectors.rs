//! Deterministic vectors of the embedding family: one per item, depending
//! only on the model, the item (kind + value), the effective dimension and
//! the parameters that change vectors. Tests compute expected vectors with
//! [`item_embedding`] and [`fusion_embedding`].

use serde_json::{json, Value};

use crate::{embedding_for, full_precision_embedding_for};

/// Tokens the fake counts for a text: `ceil(utf8_bytes / 3)`, at least 1.
pub fn text_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(3).max(1)
}

/// `parameters.fps` as the fake reads it (absent: 1.0, the documented default).
pub(crate) fn fps_of(params: &Value) -> f64 {
    params.get("fps").and_then(Value::as_f64).unwrap_or(1.0)
}

/// Frames the fake samples from a video: `max(1, round(4 * fps))`.
pub(crate) fn video_frames(params: &Value) -> u64 {
    let f = (4.0 * fps_of(params)).round();
    if f.is_finite() && f >= 1.0 {
        f as u64
    } else {
        1
    }
}

fn str_param<'a>(params: &'a Value, key: &str) -> &'a str {
    params.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The seed of one item's vector: what the vector depends on, normalised.
fn item_seed(model: &str, kind: &str, value: &str, params: &Value, dimension: usize) -> Value {
    let instruct = str_param(params, "instruct");
    if model.starts_with("text-embedding") {
        // Text family (native and compatible mode): text_type (default
        // "document") and instruct change the vector.
        let text_type = params
            .get("text_type")
            .and_then(Value::as_str)
            .unwrap_or("document");
        json!(["item", model, kind, value, text_type, instruct, dimension])
    } else {
        // Multimodal family: instruct, and fps for video items.
        let fps = if kind == "video" {
            format!("{}", fps_of(params))
        } else {
            String::new()
        };
        json!(["item", model, kind, value, instruct, fps, dimension])
    }
}

/// The vector of one item, with the fake's short exact float32 values (what
/// the fake answers unless `full_precision` is on).
///
/// - `kind`: `text` (text models and compatible mode: always `text`),
///   `image`, `video` or `multi_images`;
/// - `value`: the string as sent; for `multi_images`, the JSON text of the
///   URL list (`serde_json::to_string(&urls)`, i.e. `["u1","u2"]`);
/// - `params`: the request's `parameters` object (or `json!({})`). Read:
///   text models `text_type` (absent = `document`) and `instruct`;
///   multimodal models `instruct`, and `fps` for video items (absent = 1.0).
///   Every other key is ignored;
/// - `dimension`: the effective dimension (the model's default when absent).
///
/// A compatible-mode vector equals the native `text_type=document` one:
/// `item_embedding(model, "text", text, &json!({}), dims)`.
pub fn item_embedding(
    model: &str,
    kind: &str,
    value: &str,
    params: &Value,
    dimension: usize,
) -> Vec<f32> {
    item_embedding_with(model, kind, value, params, dimension, false)
}

/// [`item_embedding`], with the full-precision values when `full_precision`.
pub fn item_embedding_with(
    model: &str,
    kind: &str,
    value: &str,
    params: &Value,
    dimension: usize,
    full_precision: bool,
) -> Vec<f32> {
    let seed = item_seed(model, kind, value, params, dimension);
    if full_precision {
        full_precision_embedding_for(&seed, dimension)
    } else {
        embedding_for(&seed, dimension)
    }
}

/// The (kind, value) of a multimodal content item, as [`item_embedding`]
/// takes them; `None` unless it has exactly one of text, image, video,
/// multi_images (other keys such as `factor` are ignored).
pub fn content_kind_value(item: &Value) -> Option<(&'static str, String)> {
    let obj = item.as_object()?;
    let mut found = None;
    for kind in ["text", "image", "video", "multi_images"] {
        if let Some(v) = obj.get(kind) {
            if found.is_some() {
                return None;
            }
            let value = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            found = Some((kind, value));
        }
    }
    found
}

/// The one vector of a fused request (`qwen3-vl-embedding` with
/// `enable_fusion=true`): depends on every item in order (kind + value),
/// `instruct`, `fps` and the dimension.
pub fn fusion_embedding(
    model: &str,
    contents: &Value,
    params: &Value,
    dimension: usize,
) -> Vec<f32> {
    fusion_embedding_with(model, contents, params, dimension, false)
}

/// [`fusion_embedding`], with full-precision values when `full_precision`.
pub fn fusion_embedding_with(
    model: &str,
    contents: &Value,
    params: &Value,
    dimension: usize,
    full_precision: bool,
) -> Vec<f32> {
    let items: Vec<Value> = contents
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| match content_kind_value(i) {
            Some((k, v)) => json!([k, v]),
            None => i.clone(),
        })
        .collect();
    let seed = json!([
        "fusion",
        model,
        items,
        str_param(params, "instruct"),
        format!("{}", fps_of(params)),
        dimension
    ]);
    if full_precision {
        full_precision_embedding_for(&seed, dimension)
    } else {
        embedding_for(&seed, dimension)
    }
}

/// The fake's sparse embedding of a text: one entry per distinct
/// whitespace-separated token (at most 64), deterministic.
pub(crate) fn sparse_embedding(model: &str, text: &str, params: &Value) -> Vec<Value> {
    use sha2::{Digest as _, Sha256};
    let text_type = params
        .get("text_type")
        .and_then(Value::as_str)
        .unwrap_or("document");
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let mut tokens: Vec<&str> = text.split_whitespace().collect();
    if tokens.is_empty() {
        tokens.push(text);
    }
    for tok in tokens {
        if out.len() >= 64 || !seen.insert(tok) {
            continue;
        }
        let h = Sha256::digest(format!("{model}\u{0}{text_type}\u{0}{tok}").as_bytes());
        let index = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 250_002;
        // Exact float32 in (0, 1].
        let value = f32::from(u16::from_be_bytes([h[4], h[5]]) | 1) / 65_536.0;
        out.push(json!({"index": index, "value": value, "token": tok}));
    }
    out
}

/// Standard base64 (with padding) of the little-endian float32 bytes, as
/// OpenAI's `encoding_format: "base64"` answers.
pub fn base64_f32_le(v: &[f32]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_values() {
        // 1.0f32 = 00 00 80 3f (LE) -> "AACAPw=="
        assert_eq!(base64_f32_le(&[1.0]), "AACAPw==");
        // 1.0, -2.0 -> 00 00 80 3f 00 00 00 c0
        assert_eq!(base64_f32_le(&[1.0, -2.0]), "AACAPwAAAMA=");
        assert_eq!(base64_f32_le(&[]), "");
    }

    #[test]
    fn vectors_depend_on_what_they_should() {
        let p = json!({});
        let a = item_embedding("text-embedding-v4", "text", "hi", &p, 1024);
        assert_eq!(a.len(), 1024);
        assert_eq!(
            a,
            item_embedding(
                "text-embedding-v4",
                "text",
                "hi",
                &json!({"text_type": "document", "other": 1}),
                1024
            )
        );
        assert_ne!(
            a,
            item_embedding(
                "text-embedding-v4",
                "text",
                "hi",
                &json!({"text_type": "query"}),
                1024
            )
        );
        assert_ne!(
            a,
            item_embedding(
                "text-embedding-v4",
                "text",
                "hi",
                &json!({"instruct": "x"}),
                1024
            )
        );
        assert_ne!(
            a,
            item_embedding("text-embedding-v3", "text", "hi", &p, 1024)
        );
        assert_ne!(
            a[..512],
            item_embedding("text-embedding-v4", "text", "hi", &p, 512)[..]
        );
        // fps changes video vectors only; 1 and 1.0 are the same fps.
        let m = "tongyi-embedding-vision-plus";
        let v = item_embedding(m, "video", "https://x/v.mp4", &json!({}), 64);
        assert_eq!(
            v,
            item_embedding(m, "video", "https://x/v.mp4", &json!({"fps": 1}), 64)
        );
        assert_ne!(
            v,
            item_embedding(m, "video", "https://x/v.mp4", &json!({"fps": 0.5}), 64)
        );
        let i = item_embedding(m, "image", "https://x/i.png", &json!({}), 64);
        assert_eq!(
            i,
            item_embedding(m, "image", "https://x/i.png", &json!({"fps": 0.5}), 64)
        );
        assert_eq!(video_frames(&json!({"fps": 0.5})), 2);
        assert_eq!(video_frames(&json!({"fps": 0})), 1);
        assert_eq!(video_frames(&json!({})), 4);
    }
}
