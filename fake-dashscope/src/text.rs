//! Synchronous text embedding: `POST /api/v1/services/embeddings/text-embedding/text-embedding`
//! without `X-DashScope-Async`, models `text-embedding-v1`…`v4`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Request;
use serde_json::{json, Value};

use crate::vectors::{item_embedding_with, sparse_embedding, text_tokens};
use crate::{
    array_of, error, new_request_id, receive, reply_raw, Answer, FakeState, Fault, Obj, Shape,
};

/// A synchronous text model and its limits.
#[derive(Debug, Clone, Copy)]
pub struct TextModel {
    pub name: &'static str,
    /// Accepted `dimension` values.
    pub dims: &'static [usize],
    pub default_dim: usize,
    /// Texts per request.
    pub max_rows: usize,
    /// Tokens per text (the fake's count: ceil(utf8 bytes / 3)).
    pub max_tokens: u64,
    /// Accepts `output_type` sparse / dense&sparse.
    pub sparse: bool,
}

pub const TEXT_MODELS: &[TextModel] = &[
    TextModel {
        name: "text-embedding-v1",
        dims: &[1536],
        default_dim: 1536,
        max_rows: 25,
        max_tokens: 2048,
        sparse: false,
    },
    TextModel {
        name: "text-embedding-v2",
        dims: &[1536],
        default_dim: 1536,
        max_rows: 25,
        max_tokens: 2048,
        sparse: false,
    },
    TextModel {
        name: "text-embedding-v3",
        dims: &[1024, 768, 512, 256, 128, 64],
        default_dim: 1024,
        max_rows: 10,
        max_tokens: 8192,
        sparse: true,
    },
    TextModel {
        name: "text-embedding-v4",
        dims: &[2048, 1536, 1024, 768, 512, 256, 128, 64],
        default_dim: 1024,
        max_rows: 10,
        max_tokens: 8192,
        sparse: true,
    },
];

/// Batch text models (async only).
pub(crate) const ASYNC_MODELS: &[&str] = &["text-embedding-async-v1", "text-embedding-async-v2"];

pub(crate) fn model(name: &str) -> Option<&'static TextModel> {
    TEXT_MODELS.iter().find(|m| m.name == name)
}

fn texts_len(v: &Value) -> u64 {
    match v.pointer("/input/texts") {
        Some(Value::Array(a)) => a.len() as u64,
        Some(Value::String(_)) => 1,
        _ => 0,
    }
}

fn invalid(message: &str) -> Answer {
    error(400, "InvalidParameter", message)
}

/// The texts of a text-family body (`input.texts`: a list of strings, or
/// one string), or the error message.
pub(crate) fn texts_of(v: &Value) -> Result<Vec<String>, String> {
    match v.pointer("/input/texts") {
        Some(Value::String(t)) => Ok(vec![t.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "input.texts should be a string or a list of strings".to_string()),
        _ => Err("input.texts is required".to_string()),
    }
}

/// A `dimension` parameter checked against `dims` (absent: `default`).
pub(crate) fn dimension_of(
    params: &Value,
    key: &str,
    dims: &[usize],
    default: usize,
) -> Result<usize, String> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(d) => match d.as_u64().map(|d| d as usize) {
            Some(d) if dims.contains(&d) => Ok(d),
            _ => Err(format!(
                "The {key} parameter is invalid ({d}): it should be one of {dims:?}."
            )),
        },
    }
}

pub(crate) async fn embed(s: Arc<FakeState>, req: Request<Incoming>) -> Answer {
    let r = match receive(&s, req, &s.text_calls, texts_len, Shape::DashScope).await {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let v = r.body;
    let name = v.get("model").and_then(Value::as_str).unwrap_or("");
    if ASYNC_MODELS.contains(&name) {
        return error(
            403,
            "AccessDenied",
            "current user api does not support synchronous calls",
        );
    }
    let Some(m) = model(name) else {
        return invalid("Model not exist.");
    };
    let empty = json!({});
    let params = v.get("parameters").unwrap_or(&empty);
    let texts = match texts_of(&v) {
        Ok(t) => t,
        Err(msg) => return invalid(&msg),
    };
    if texts.is_empty() {
        return invalid("input.texts should not be empty");
    }
    if texts.len() > m.max_rows {
        return invalid(&format!(
            "batch size is invalid, it should not be larger than {}.",
            m.max_rows
        ));
    }
    for t in &texts {
        if t.is_empty() || text_tokens(t) > m.max_tokens {
            return invalid(&format!(
                "Range of input length should be [1, {}]",
                m.max_tokens
            ));
        }
    }
    let dimension = match dimension_of(params, "dimension", m.dims, m.default_dim) {
        Ok(d) => d,
        Err(msg) => return invalid(&msg),
    };
    match params.get("text_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "query" || t == "document" => {}
        Some(other) => {
            return invalid(&format!(
                "The text_type parameter is invalid ({other}): it should be query or document."
            ))
        }
    }
    let (dense, sparse) = match params.get("output_type") {
        None | Some(Value::Null) => (true, false),
        Some(Value::String(t)) if t == "dense" => (true, false),
        Some(Value::String(t)) if m.sparse && t == "sparse" => (false, true),
        Some(Value::String(t)) if m.sparse && t == "dense&sparse" => (true, true),
        Some(other) => {
            return invalid(&format!(
                "The output_type parameter is invalid ({other}) for model {}.",
                m.name
            ))
        }
    };
    let rid = new_request_id();
    match r.fault {
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
                json!({"output": {"embeddings": [{"embedding": [0.1, 0.2], "text_index": 0}]}, "usage": {"total_tokens": 1}, "request_id": rid}).to_string(),
            )
        }
        _ => {}
    }
    let full = s.full_precision.load(Ordering::SeqCst);
    let mut total = 0u64;
    let mut entries = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        total += text_tokens(t);
        let mut e = Obj::new();
        if dense {
            e = e.put(
                "embedding",
                json!(item_embedding_with(
                    m.name, "text", t, params, dimension, full
                )),
            );
        }
        if sparse {
            e = e.put(
                "sparse_embedding",
                json!(sparse_embedding(m.name, t, params)),
            );
        }
        entries.push(e.put("text_index", json!(i)).done());
    }
    if matches!(r.fault, Some(Fault::WrongUsage)) {
        total += 1;
    }
    s.billed_units.fetch_add(total, Ordering::SeqCst);
    let body = Obj::new()
        .raw(
            "output",
            &Obj::new().raw("embeddings", &array_of(&entries)).done(),
        )
        .put("usage", json!({"total_tokens": total}))
        .put("request_id", json!(rid))
        .done();
    reply_raw(200, body)
}
