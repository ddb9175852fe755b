//! `[[models]]`: the model table. Every DashScope embedding model the
//! gateway serves, with the API it belongs to, how its vectors may be
//! cached, its dimensions and limits, how its quota reservation is bounded
//! and what one unit costs. Built-in entries cover the models documented in
//! `dashscope-embeddings.md`; a `[[models]]` entry with a built-in name
//! overrides the keys it sets, one with a new name adds a model (so a new
//! DashScope model needs no release).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use super::check::Check;
use super::upstream::ONE_PEACE_MODEL;
use super::values;

/// Which DashScope API serves a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelApi {
    /// `…/text-embedding/text-embedding`, synchronous (`input.texts`).
    Text,
    /// `…/multimodal-embedding/multimodal-embedding` (`input.contents`).
    Multimodal,
    /// The text path with `X-DashScope-Async: enable`, then `/api/v1/tasks`.
    Batch,
}

impl ModelApi {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelApi::Text => "text",
            ModelApi::Multimodal => "multimodal",
            ModelApi::Batch => "batch",
        }
    }
}

/// What a vector depends on, which decides the cache unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Vectors {
    /// One vector per item that depends only on that item: cached per item.
    PerItem,
    /// Per item, unless `parameters.enable_fusion` is true: then one vector
    /// for the whole request, cached whole (`qwen3-vl-embedding`).
    PerItemUnlessFusion,
    /// Vectors of the whole request (fused, or not known to be
    /// independent): cached whole.
    Fused,
    /// ONE-PEACE: one fused vector, units = Σ items × modality weight
    /// (`[metering.weights]`), served by the ONE-PEACE path.
    Weighted,
}

/// One model, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub api: ModelApi,
    /// Also served on `/compatible-mode/v1/embeddings` (text models).
    pub compatible_mode: bool,
    pub vectors: Vectors,
    /// Allowed `dimension` values; empty: any positive one.
    pub dimensions: Vec<usize>,
    /// The dimension of an answer that names none.
    pub default_dimension: usize,
    /// Items (texts or contents) per request.
    pub max_items: usize,
    /// Bytes per text item.
    pub max_text_bytes: usize,
    /// Bytes per image/video URL or data URI.
    pub max_url_bytes: usize,
    /// Tokens reserved from the quota per image before the call (an upper
    /// bound; the quota is settled to what upstream bills).
    pub image_tokens: u64,
    /// Tokens reserved per video item before the call.
    pub video_tokens: u64,
    /// Price of one unit (one token; for ONE-PEACE one weighted item), in
    /// the currency of the reports; `None`: reports show no cost.
    pub price_per_unit: Option<f64>,
    /// Where this model's calls go when not `upstream.base_url` (some
    /// models exist in one region only).
    pub upstream_base_url: Option<http::Uri>,
}

impl ModelSpec {
    /// The dimension answers have for a request that asked for `asked`.
    pub fn dimension(&self, asked: Option<usize>) -> usize {
        asked.unwrap_or(self.default_dimension)
    }

    pub fn allows_dimension(&self, d: usize) -> bool {
        d > 0 && (self.dimensions.is_empty() || self.dimensions.contains(&d))
    }
}

/// Every model served, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelTable {
    models: BTreeMap<String, Arc<ModelSpec>>,
}

impl ModelTable {
    pub fn get(&self, name: &str) -> Option<&Arc<ModelSpec>> {
        self.models.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelSpec>> {
        self.models.values()
    }

    /// Price per unit by model, for the usage reports.
    pub fn unit_prices(&self) -> BTreeMap<String, f64> {
        self.models
            .values()
            .filter_map(|m| Some((m.name.clone(), m.price_per_unit?)))
            .collect()
    }
}

/// Tokens per text row of the text models, as documented.
const TEXT_V3_V4_TOKENS: usize = 8192;
const TEXT_V1_V2_TOKENS: usize = 2048;
/// A token is at least one byte of UTF-8 in DashScope's tokenizers and
/// rarely more than four; eight bytes per token never refuses a text
/// upstream would take, and still bounds what is hashed and forwarded.
const BYTES_PER_TOKEN_BOUND: usize = 8;
/// Multimodal text items: 32,000 tokens for the qwen-vl models.
const QWEN_VL_TEXT_TOKENS: usize = 32_000;
const TONGYI_TEXT_TOKENS: usize = 1024;
/// A signed OSS URL is about 1 KB; images may also come as Base64 data
/// URIs of up to a few MB (3–5 MB documented), which is what this allows.
const MAX_MEDIA_BYTES: usize = 7 * 1024 * 1024;
/// Visual tokens reserved per image: DashScope documents no per-image
/// figure; a 3 MB image at the models' largest input resolution is at most
/// 1280 visual tokens in Qwen-VL's scheme (28×28-pixel patches, max 1,003,520
/// pixels). Settled to what upstream bills.
const DEFAULT_IMAGE_TOKENS: u64 = 1280;
/// Video: at most 64 frames (`max_video_frames`) of at most 1280 tokens
/// would be 81,920; DashScope's default frame rate makes most videos far
/// cheaper, but the reservation must not be below what may be billed.
const DEFAULT_VIDEO_TOKENS: u64 = 64 * 1280;

#[allow(clippy::too_many_arguments)]
fn builtin(
    name: &str,
    api: ModelApi,
    vectors: Vectors,
    dims: &[usize],
    default_dimension: usize,
    max_items: usize,
    text_tokens: usize,
    price_per_1k: Option<f64>,
) -> ModelSpec {
    ModelSpec {
        name: name.to_string(),
        api,
        compatible_mode: false,
        vectors,
        dimensions: dims.to_vec(),
        default_dimension,
        max_items,
        max_text_bytes: text_tokens * BYTES_PER_TOKEN_BOUND,
        max_url_bytes: MAX_MEDIA_BYTES,
        image_tokens: DEFAULT_IMAGE_TOKENS,
        video_tokens: DEFAULT_VIDEO_TOKENS,
        price_per_unit: price_per_1k.map(|p| p / 1000.0),
        upstream_base_url: None,
    }
}

/// The built-in table (dashscope-embeddings.md §a.1, §b.1, §d). Prices
/// are the Beijing list prices in CNY per token where documented.
fn builtins() -> Vec<ModelSpec> {
    use ModelApi::*;
    use Vectors::*;
    const V4_DIMS: &[usize] = &[2048, 1536, 1024, 768, 512, 256, 128, 64];
    const V3_DIMS: &[usize] = &[1024, 768, 512, 256, 128, 64];
    const PLUS_DIMS: &[usize] = &[64, 128, 256, 512, 1024, 1152];
    const FLASH_DIMS: &[usize] = &[64, 128, 256, 512, 768];
    const QWEN3_DIMS: &[usize] = &[256, 512, 768, 1024, 1536, 2048, 2560];
    const QWEN25_DIMS: &[usize] = &[512, 768, 1024, 2048];
    let mut v = vec![
        builtin(
            "text-embedding-v1",
            Text,
            PerItem,
            &[1536],
            1536,
            25,
            TEXT_V1_V2_TOKENS,
            Some(0.0007),
        ),
        builtin(
            "text-embedding-v2",
            Text,
            PerItem,
            &[1536],
            1536,
            25,
            TEXT_V1_V2_TOKENS,
            Some(0.0007),
        ),
        builtin(
            "text-embedding-v3",
            Text,
            PerItem,
            V3_DIMS,
            1024,
            10,
            TEXT_V3_V4_TOKENS,
            Some(0.0005),
        ),
        builtin(
            "text-embedding-v4",
            Text,
            PerItem,
            V4_DIMS,
            1024,
            10,
            TEXT_V3_V4_TOKENS,
            Some(0.0005),
        ),
        builtin(
            "text-embedding-async-v1",
            Batch,
            PerItem,
            &[1536],
            1536,
            1,
            TEXT_V1_V2_TOKENS,
            Some(0.00035),
        ),
        builtin(
            "text-embedding-async-v2",
            Batch,
            PerItem,
            &[1536],
            1536,
            1,
            TEXT_V1_V2_TOKENS,
            Some(0.00035),
        ),
        builtin(
            "multimodal-embedding-v1",
            Multimodal,
            PerItem,
            &[1024],
            1024,
            20,
            512,
            Some(0.0007),
        ),
        builtin(
            "tongyi-embedding-vision-plus",
            Multimodal,
            PerItem,
            PLUS_DIMS,
            1152,
            20,
            TONGYI_TEXT_TOKENS,
            Some(0.0005),
        ),
        builtin(
            "tongyi-embedding-vision-flash",
            Multimodal,
            PerItem,
            FLASH_DIMS,
            768,
            20,
            TONGYI_TEXT_TOKENS,
            Some(0.0005),
        ),
        // Snapshots fuse inside one content object: each object is still
        // its own item.
        builtin(
            "tongyi-embedding-vision-plus-2026-03-06",
            Multimodal,
            PerItem,
            PLUS_DIMS,
            1152,
            20,
            TONGYI_TEXT_TOKENS,
            Some(0.0005),
        ),
        builtin(
            "tongyi-embedding-vision-flash-2026-03-06",
            Multimodal,
            PerItem,
            FLASH_DIMS,
            768,
            20,
            TONGYI_TEXT_TOKENS,
            Some(0.0005),
        ),
        builtin(
            "qwen3-vl-embedding",
            Multimodal,
            PerItemUnlessFusion,
            QWEN3_DIMS,
            2560,
            20,
            QWEN_VL_TEXT_TOKENS,
            Some(0.0007),
        ),
        // Whether its vectors are independent is not documented: whole.
        builtin(
            "qwen2.5-vl-embedding",
            Multimodal,
            Fused,
            QWEN25_DIMS,
            1024,
            20,
            QWEN_VL_TEXT_TOKENS,
            Some(0.0007),
        ),
        builtin(
            ONE_PEACE_MODEL,
            Multimodal,
            Weighted,
            &[1536],
            1536,
            32,
            70,
            None,
        ),
    ];
    for m in &mut v {
        m.compatible_mode = matches!(m.name.as_str(), "text-embedding-v3" | "text-embedding-v4");
    }
    v
}

/// One `[[models]]` entry as written: every key but `name` optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    name: String,
    api: Option<ModelApi>,
    compatible_mode: Option<bool>,
    vectors: Option<Vectors>,
    #[serde(default, deserialize_with = "values::integers")]
    dimensions: Option<Vec<i64>>,
    default_dimension: Option<i64>,
    max_items: Option<i64>,
    max_text_bytes: Option<i64>,
    max_url_bytes: Option<i64>,
    image_tokens: Option<i64>,
    video_tokens: Option<i64>,
    price_per_unit: Option<f64>,
    upstream_base_url: Option<String>,
}

/// The built-in table with the file's entries applied.
pub(crate) fn load(raw: Vec<RawModel>, c: &mut Check<'_>) -> ModelTable {
    let mut models: BTreeMap<String, ModelSpec> = builtins()
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect();
    let mut seen = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let at = |k: &str| format!("models[{i}].{k}");
        if r.name.is_empty() || r.name.len() > 64 || !r.name.bytes().all(model_name_byte) {
            c.err(
                &at("name"),
                format!(
                    "`{}` must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
                    r.name.escape_debug()
                ),
            );
            continue;
        }
        if seen.contains(&r.name) {
            c.err(&at("name"), format!("`{}` is listed twice", r.name));
            continue;
        }
        seen.push(r.name.clone());
        let mut m = match models.remove(&r.name) {
            Some(m) => m,
            None => {
                let Some(api) = r.api else {
                    c.err(
                        &at("api"),
                        format!(
                            "`{}` is not a built-in model: say which API serves it (\"text\", \"multimodal\" or \"batch\")",
                            r.name
                        ),
                    );
                    continue;
                };
                let mut m = builtin(&r.name, api, Vectors::Fused, &[], 1024, 10, 8192, None);
                if api == ModelApi::Text {
                    m.vectors = Vectors::PerItem;
                }
                m
            }
        };
        if let Some(api) = r.api {
            m.api = api;
        }
        if let Some(v) = r.vectors {
            m.vectors = v;
        }
        if let Some(b) = r.compatible_mode {
            m.compatible_mode = b;
        }
        if let Some(dims) = r.dimensions {
            let mut ok = Vec::new();
            for d in dims {
                match usize::try_from(d) {
                    Ok(n) if n > 0 => ok.push(n),
                    Ok(_) | Err(_) => c.err(
                        &at("dimensions"),
                        format!("must list positive integers, got {d}"),
                    ),
                }
            }
            m.dimensions = ok;
        }
        m.default_dimension = c.positive(
            &at("default_dimension"),
            r.default_dimension,
            m.default_dimension,
        );
        m.max_items = c.positive(&at("max_items"), r.max_items, m.max_items);
        m.max_text_bytes = c.positive(&at("max_text_bytes"), r.max_text_bytes, m.max_text_bytes);
        m.max_url_bytes = c.positive(&at("max_url_bytes"), r.max_url_bytes, m.max_url_bytes);
        m.image_tokens = c.non_negative(&at("image_tokens"), r.image_tokens, m.image_tokens);
        m.video_tokens = c.non_negative(&at("video_tokens"), r.video_tokens, m.video_tokens);
        if let Some(p) = r.price_per_unit {
            if p.is_finite() && p >= 0.0 {
                m.price_per_unit = Some(p);
            } else {
                c.err(
                    &at("price_per_unit"),
                    format!("must be a number >= 0, got {p}"),
                );
            }
        }
        if let Some(u) = r.upstream_base_url {
            match super::upstream::base_url(&u) {
                Some(uri) => m.upstream_base_url = Some(uri),
                None => c.err(
                    &at("upstream_base_url"),
                    format!("`{u}` must be an http(s) URL with a host and no path"),
                ),
            }
        }
        if !m.dimensions.is_empty() && !m.dimensions.contains(&m.default_dimension) {
            c.err(
                &at("default_dimension"),
                format!(
                    "{} is not among the model's dimensions {:?}",
                    m.default_dimension, m.dimensions
                ),
            );
        }
        if m.compatible_mode && m.api != ModelApi::Text {
            c.err(
                &at("compatible_mode"),
                "only text models are served by the OpenAI-compatible endpoint",
            );
        }
        if m.vectors == Vectors::Weighted && m.api != ModelApi::Multimodal {
            c.err(
                &at("vectors"),
                "\"weighted\" (ONE-PEACE's scheme) is for multimodal models only",
            );
        }
        models.insert(m.name.clone(), m);
    }
    ModelTable {
        models: models.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
    }
}

fn model_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(src: &str) -> Result<ModelTable, Vec<super::super::ConfigError>> {
        super::super::Config::parse(src, &|_| None)
            .map(|c| c.models)
            .map_err(|e| e.0)
    }

    #[test]
    fn builtins_cover_the_family() {
        let t = table("").unwrap();
        for name in [
            "text-embedding-v1",
            "text-embedding-v4",
            "text-embedding-async-v2",
            "multimodal-embedding-v1",
            "tongyi-embedding-vision-plus",
            "qwen3-vl-embedding",
            "qwen2.5-vl-embedding",
            ONE_PEACE_MODEL,
        ] {
            assert!(t.get(name).is_some(), "{name}");
        }
        let v4 = t.get("text-embedding-v4").unwrap();
        assert!(v4.compatible_mode && v4.allows_dimension(512) && !v4.allows_dimension(500));
        assert_eq!(v4.dimension(None), 1024);
        assert_eq!(
            t.get("qwen2.5-vl-embedding").unwrap().vectors,
            Vectors::Fused
        );
        assert!(t.unit_prices()["text-embedding-v4"] > 0.0);
    }

    #[test]
    fn entries_override_and_extend() {
        let t = table(
            r#"
[[models]]
name = "text-embedding-v4"
max_items = 5
price_per_unit = 0.25
upstream_base_url = "https://dashscope-intl.aliyuncs.com/"

[[models]]
name = "text-embedding-v9"
api = "text"
dimensions = [4096]
default_dimension = 4096
compatible_mode = true
"#,
        )
        .unwrap();
        let v4 = t.get("text-embedding-v4").unwrap();
        assert_eq!((v4.max_items, v4.price_per_unit), (5, Some(0.25)));
        assert_eq!(
            v4.upstream_base_url.as_ref().unwrap().host(),
            Some("dashscope-intl.aliyuncs.com")
        );
        assert_eq!(
            v4.default_dimension, 1024,
            "unset keys keep the built-in value"
        );
        let v9 = t.get("text-embedding-v9").unwrap();
        assert_eq!(
            (v9.api, v9.vectors, v9.default_dimension),
            (ModelApi::Text, Vectors::PerItem, 4096)
        );
    }

    #[test]
    fn bad_entries_are_named() {
        let errs = table(
            r#"
[[models]]
name = "new-model"

[[models]]
name = "text-embedding-v4"
default_dimension = 1000
price_per_unit = -1.0

[[models]]
name = "qwen3-vl-embedding"
compatible_mode = true
"#,
        )
        .unwrap_err();
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"models[0].api"), "{errs:?}");
        assert!(keys.contains(&"models[1].default_dimension"), "{errs:?}");
        assert!(keys.contains(&"models[1].price_per_unit"), "{errs:?}");
        assert!(keys.contains(&"models[2].compatible_mode"), "{errs:?}");
    }
}
