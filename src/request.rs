//! Parses an embedding request body into a type that cannot be invalid.
//!
//! Every refusal names the offending field (`input.contents[2].factor must
//! be > 0`). Parsing works on JSON values, never raw bytes, so the SDKs'
//! different key orders, spacing and escapes give the same request.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::config::Weights;
use crate::error::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Modality {
    Text,
    Image,
    Audio,
}

impl Modality {
    pub(crate) const ALL: [Modality; 3] = [Modality::Text, Modality::Image, Modality::Audio];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "text",
            Modality::Image => "image",
            Modality::Audio => "audio",
        }
    }

    pub(crate) fn from_name(s: &str) -> Option<Modality> {
        match s {
            "text" => Some(Modality::Text),
            "image" => Some(Modality::Image),
            "audio" => Some(Modality::Audio),
            _ => None,
        }
    }

    pub(crate) fn weight(self, w: &Weights) -> u64 {
        match self {
            Modality::Text => w.text,
            Modality::Image => w.image,
            Modality::Audio => w.audio,
        }
    }

    fn index(self) -> usize {
        match self {
            Modality::Text => 0,
            Modality::Image => 1,
            Modality::Audio => 2,
        }
    }
}

/// One content item: exactly one modality, its content, its weight factor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Item {
    pub(crate) modality: Modality,
    pub(crate) content: String,
    /// Normalised: `1`, `1.0` and `"1"` are all `1.0`; finite and > 0.
    pub(crate) factor: f64,
}

/// Items per modality.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts([u64; 3]);

impl Counts {
    pub(crate) fn get(&self, m: Modality) -> u64 {
        self.0[m.index()]
    }

    pub(crate) fn set(&mut self, m: Modality, n: u64) {
        self.0[m.index()] = n;
    }

    pub(crate) fn add(&mut self, m: Modality, n: u64) {
        self.0[m.index()] += n;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|&n| n == 0)
    }

    /// The sum over modalities (for a per-modality units vector: total units).
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// A parsed `multimodal-embedding` request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EmbeddingRequest {
    pub(crate) model: String,
    pub(crate) items: Vec<Item>,
    /// All of `parameters` as sent (the SDK copies extra keywords here),
    /// `auto_truncation` included.
    pub(crate) parameters: Map<String, Value>,
    pub(crate) auto_truncation: bool,
    /// Top-level fields other than model/input/parameters; forwarded, so
    /// they are part of the cache key.
    pub(crate) extra: Map<String, Value>,
    /// Fields of `input` other than `contents`; forwarded and keyed likewise.
    pub(crate) input_extra: Map<String, Value>,
}

/// What the parser needs from config.
#[derive(Debug, Clone)]
pub(crate) struct ParseRules<'a> {
    pub(crate) models: &'a [String],
    pub(crate) max_text_chars: usize,
}

fn bad(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidParameter(msg.into())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl EmbeddingRequest {
    pub(crate) fn parse(
        body: &[u8],
        rules: &ParseRules<'_>,
    ) -> Result<EmbeddingRequest, GatewayError> {
        let root: Value = serde_json::from_slice(body)
            .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
        let Value::Object(mut root) = root else {
            return Err(bad(format!(
                "request body must be a JSON object, got {}",
                type_name(&root)
            )));
        };

        let model = match root.remove("model") {
            None | Some(Value::Null) => return Err(bad("model is required")),
            Some(Value::String(m)) if m.is_empty() => return Err(bad("model must not be empty")),
            Some(Value::String(m)) => m,
            Some(other) => {
                return Err(bad(format!(
                    "model must be a string, got {}",
                    type_name(&other)
                )))
            }
        };
        if !rules.models.contains(&model) {
            return Err(GatewayError::ModelNotFound(model));
        }

        let mut input = match root.remove("input") {
            None | Some(Value::Null) => return Err(bad("input is required")),
            Some(Value::Object(i)) => i,
            Some(other) => {
                return Err(bad(format!(
                    "input must be an object, got {}",
                    type_name(&other)
                )))
            }
        };
        let contents = match input.remove("contents") {
            None | Some(Value::Null) => return Err(bad("input.contents is required")),
            Some(Value::Array(c)) => c,
            Some(other) => {
                return Err(bad(format!(
                    "input.contents must be a list, got {}",
                    type_name(&other)
                )))
            }
        };
        if contents.is_empty() {
            return Err(bad("input.contents must not be empty"));
        }

        let parameters = match root.remove("parameters") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p,
            Some(other) => {
                return Err(bad(format!(
                    "parameters must be an object, got {}",
                    type_name(&other)
                )))
            }
        };
        let auto_truncation = match parameters.get("auto_truncation") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(bad(format!(
                    "parameters.auto_truncation must be a boolean, got {}",
                    type_name(other)
                )))
            }
        };

        let mut items = Vec::with_capacity(contents.len());
        for (i, raw) in contents.into_iter().enumerate() {
            items.push(parse_item(i, raw, auto_truncation, rules)?);
        }

        Ok(EmbeddingRequest {
            model,
            items,
            parameters,
            auto_truncation,
            extra: root,
            input_extra: input,
        })
    }

    pub(crate) fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for item in &self.items {
            c.add(item.modality, 1);
        }
        c
    }

    /// The vector length a valid answer has: `parameters.dimension` when the
    /// caller asked for one, else the configured default.
    pub(crate) fn expected_dimension(&self, default: usize) -> usize {
        self.parameters
            .get("dimension")
            .and_then(Value::as_u64)
            .filter(|&d| d > 0 && d <= 65_536)
            .map(|d| d as usize)
            .unwrap_or(default)
    }

    /// The body sent upstream: the parsed request written back, with each
    /// factor as the number it was normalised to, so upstream sees exactly
    /// what the cache key describes.
    pub(crate) fn upstream_body(&self) -> Bytes {
        let contents: Vec<Value> = self
            .items
            .iter()
            .map(|it| {
                let mut o = Map::new();
                o.insert(
                    it.modality.as_str().to_string(),
                    Value::String(it.content.clone()),
                );
                o.insert("factor".to_string(), factor_value(it.factor));
                Value::Object(o)
            })
            .collect();
        let mut input = self.input_extra.clone();
        input.insert("contents".to_string(), Value::Array(contents));
        let mut root = self.extra.clone();
        root.insert("model".to_string(), Value::String(self.model.clone()));
        root.insert("input".to_string(), Value::Object(input));
        root.insert(
            "parameters".to_string(),
            Value::Object(self.parameters.clone()),
        );
        Bytes::from(Value::Object(root).to_string())
    }
}

/// Integral factors go out as integers (`2`, not `2.0`), as the SDK sends them.
fn factor_value(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::from(1))
    }
}

fn parse_item(
    i: usize,
    raw: Value,
    auto_truncation: bool,
    rules: &ParseRules<'_>,
) -> Result<Item, GatewayError> {
    let at = format!("input.contents[{i}]");
    let Value::Object(obj) = raw else {
        return Err(bad(format!(
            "{at} must be an object with one of text, image, audio; got {}",
            type_name(&raw)
        )));
    };
    let mut found: Option<(Modality, String)> = None;
    let mut factor = 1.0;
    for (key, value) in obj {
        if key == "factor" {
            factor = parse_factor(&at, &value)?;
            continue;
        }
        let Some(modality) = Modality::from_name(&key) else {
            return Err(bad(format!(
                "{at}.{key} is not supported; an item has one of text, image, audio and an optional factor"
            )));
        };
        if let Some((first, _)) = &found {
            return Err(bad(format!(
                "{at} must have exactly one of text, image, audio; found {} and {key}",
                first.as_str()
            )));
        }
        let content = match value {
            Value::String(s) if s.is_empty() => {
                return Err(bad(format!("{at}.{key} must not be empty")))
            }
            Value::String(s) => s,
            other => {
                return Err(bad(format!(
                    "{at}.{key} must be a string, got {}",
                    type_name(&other)
                )))
            }
        };
        found = Some((modality, content));
    }
    let Some((modality, content)) = found else {
        return Err(bad(format!("{at} must have one of text, image, audio")));
    };
    if modality == Modality::Text && !auto_truncation {
        let n = content.chars().count();
        if n > rules.max_text_chars {
            return Err(bad(format!(
                "{at}.text is {n} characters, over the limit of {}; shorten it or set parameters.auto_truncation to true",
                rules.max_text_chars
            )));
        }
    }
    Ok(Item {
        modality,
        content,
        factor,
    })
}

fn parse_factor(at: &str, v: &Value) -> Result<f64, GatewayError> {
    let f = match v {
        Value::Null => return Ok(1.0),
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| bad(format!("{at}.factor must be a finite number")))?,
        Value::String(s) => s.trim().parse::<f64>().map_err(|_| {
            bad(format!(
                "{at}.factor must be a number or numeric string, got \"{s}\""
            ))
        })?,
        other => {
            return Err(bad(format!(
                "{at}.factor must be a number or numeric string, got {}",
                type_name(other)
            )))
        }
    };
    if !f.is_finite() {
        return Err(bad(format!("{at}.factor must be a finite number")));
    }
    if f <= 0.0 {
        return Err(bad(format!("{at}.factor must be > 0")));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> (Vec<String>, usize) {
        (vec!["multimodal-embedding-one-peace-v1".to_string()], 70)
    }

    fn parse(body: &str) -> Result<EmbeddingRequest, GatewayError> {
        let (models, max) = rules();
        EmbeddingRequest::parse(
            body.as_bytes(),
            &ParseRules {
                models: &models,
                max_text_chars: max,
            },
        )
    }

    fn message(body: &str) -> String {
        match parse(body) {
            Err(GatewayError::InvalidParameter(m)) => m,
            other => panic!("expected InvalidParameter, got {other:?}"),
        }
    }

    const M: &str = "\"model\":\"multimodal-embedding-one-peace-v1\"";

    #[test]
    fn parses_the_spec_example() {
        let r = parse(&format!(
            "{{{M},\"input\":{{\"contents\":[{{\"text\":\"你好\",\"factor\":1}},{{\"audio\":\"https://x/cow.flac\",\"factor\":2}},{{\"image\":\"https://x/1.png\",\"factor\":\"3\"}}]}},\"parameters\":{{\"auto_truncation\":true}}}}"
        ))
        .unwrap();
        assert_eq!(r.items.len(), 3);
        assert_eq!(r.items[2].factor, 3.0);
        assert!(r.auto_truncation);
        let w = Weights {
            text: 1,
            image: 1,
            audio: 2,
        };
        let usage = crate::metering::Usage::of(r.counts(), &w);
        assert_eq!(usage.total(), 4);
        let usage: Value = serde_json::from_str(&usage.json()).unwrap();
        assert_eq!(usage["audio"]["weight"], 2);
        assert_eq!(usage["total_usage"], 4);
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases = [
            ("[]", "request body must be a JSON object"),
            ("{", "request body is not valid JSON"),
            ("{\"input\":{\"contents\":[{\"text\":\"a\"}]}}", "model is required"),
            (&format!("{{{M}}}"), "input is required"),
            (&format!("{{{M},\"input\":[]}}"), "input must be an object"),
            (&format!("{{{M},\"input\":{{}}}}"), "input.contents is required"),
            (&format!("{{{M},\"input\":{{\"contents\":[]}}}}"), "input.contents must not be empty"),
            (&format!("{{{M},\"input\":{{\"contents\":{{}}}}}}"), "input.contents must be a list"),
            (&format!("{{{M},\"input\":{{\"contents\":[1]}}}}"), "input.contents[0] must be an object"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"factor\":1}}]}}}}"), "input.contents[0] must have one of text, image, audio"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"text\":\"a\",\"image\":\"b\"}}]}}}}"), "input.contents[0] must have exactly one of text, image, audio"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"video\":\"a\"}}]}}}}"), "input.contents[0].video is not supported"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"text\":5}}]}}}}"), "input.contents[0].text must be a string"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"text\":\"\"}}]}}}}"), "input.contents[0].text must not be empty"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"text\":\"a\"}},{{\"text\":\"b\"}},{{\"image\":\"c\",\"factor\":0}}]}}}}"), "input.contents[2].factor must be > 0"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":-1}}]}}}}"), "input.contents[0].factor must be > 0"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":\"abc\"}}]}}}}"), "input.contents[0].factor must be a number or numeric string"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":\"NaN\"}}]}}}}"), "input.contents[0].factor must be a finite number"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":\"inf\"}}]}}}}"), "input.contents[0].factor must be a finite number"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":true}}]}}}}"), "input.contents[0].factor must be a number or numeric string"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\"}}]}},\"parameters\":[]}}"), "parameters must be an object"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\"}}]}},\"parameters\":{{\"auto_truncation\":\"yes\"}}}}"), "parameters.auto_truncation must be a boolean"),
            ("{\"model\":5,\"input\":{}}", "model must be a string"),
        ];
        for (body, want) in cases {
            let got = message(body);
            assert!(got.starts_with(want), "{body}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn unknown_model_is_refused() {
        let r = parse("{\"model\":\"gpt-4\",\"input\":{\"contents\":[{\"text\":\"a\"}]}}");
        assert!(matches!(r, Err(GatewayError::ModelNotFound(m)) if m == "gpt-4"));
    }

    #[test]
    fn text_limit_applies_only_without_truncation() {
        let long = "字".repeat(71);
        let ok = "字".repeat(70);
        let body = |t: &str, trunc: bool| {
            format!("{{{M},\"input\":{{\"contents\":[{{\"text\":\"{t}\"}}]}},\"parameters\":{{\"auto_truncation\":{trunc}}}}}")
        };
        assert!(parse(&body(&ok, false)).is_ok());
        assert!(message(&body(&long, false)).contains("input.contents[0].text is 71 characters"));
        assert!(parse(&body(&long, true)).is_ok());
    }

    #[test]
    fn factors_normalise() {
        for f in ["1", "1.0", "\"1\"", "\" 1.0 \"", "null"] {
            let r = parse(&format!(
                "{{{M},\"input\":{{\"contents\":[{{\"text\":\"a\",\"factor\":{f}}}]}}}}"
            ))
            .unwrap();
            assert_eq!(r.items[0].factor, 1.0, "{f}");
        }
    }

    #[test]
    fn upstream_body_carries_everything_parsed() {
        let r = parse(&format!(
            "{{{M},\"input\":{{\"contents\":[{{\"factor\":\"2\",\"image\":\"u\"}},{{\"text\":\"t\",\"factor\":0.5}}],\"extra_in\":1}},\"parameters\":{{\"dimension\":512,\"auto_truncation\":true}},\"resources\":[\"r\"]}}"
        ))
        .unwrap();
        let v: Value = serde_json::from_slice(&r.upstream_body()).unwrap();
        assert_eq!(v["input"]["contents"][0]["factor"], 2);
        assert_eq!(v["input"]["contents"][0]["image"], "u");
        assert_eq!(v["input"]["contents"][1]["factor"], 0.5);
        assert_eq!(v["input"]["extra_in"], 1);
        assert_eq!(v["parameters"]["auto_truncation"], true);
        assert_eq!(v["parameters"]["dimension"], 512);
        assert_eq!(v["resources"][0], "r");
        assert_eq!(r.expected_dimension(1536), 512);
    }
}
