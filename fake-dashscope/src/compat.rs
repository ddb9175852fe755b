//! OpenAI-compatible embeddings: `POST /compatible-mode/v1/embeddings`,
//! `text-embedding-v3` and `-v4` only. Vectors equal the native
//! `text_type=document` ones of the same model and dimension.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Request;
use serde_json::{json, Value};

use crate::text::dimension_of;
use crate::vectors::{base64_f32_le, item_embedding_with, text_tokens};
use crate::{array_of, new_request_id, receive, reply_raw, Answer, FakeState, Fault, Obj, Shape};

const MODELS: &[&str] = &["text-embedding-v3", "text-embedding-v4"];
/// Inputs per request.
pub const MAX_INPUTS: usize = 10;

/// An OpenAI-shaped error answer.
pub(crate) fn oai_error(status: u16, code: &str, message: &str) -> Answer {
    reply_raw(
        status,
        json!({
            "error": {"code": code, "message": message, "param": null, "type": "invalid_request_error"},
            "request_id": new_request_id(),
        })
        .to_string(),
    )
}

/// The OpenAI-shaped code of an injected status (`fallback` otherwise).
pub(crate) fn oai_code(status: u16, fallback: &str) -> &str {
    match status {
        400 => "invalid_parameter_error",
        401 => "invalid_api_key",
        404 => "model_not_found",
        429 => "limit_requests",
        500..=599 => "internal_error",
        _ => fallback,
    }
}

fn invalid(message: &str) -> Answer {
    oai_error(400, "invalid_parameter_error", message)
}

fn inputs_len(v: &Value) -> u64 {
    match v.get("input") {
        Some(Value::Array(a)) => a.len() as u64,
        Some(Value::String(_)) => 1,
        _ => 0,
    }
}

pub(crate) async fn embed(s: Arc<FakeState>, req: Request<Incoming>) -> Answer {
    let r = match receive(&s, req, &s.compat_calls, inputs_len, Shape::OpenAi).await {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let v = r.body;
    let name = v.get("model").and_then(Value::as_str).unwrap_or("");
    if !MODELS.contains(&name) {
        return oai_error(
            404,
            "model_not_found",
            &format!("The model `{name}` does not exist or you do not have access to it."),
        );
    }
    let dims: &[usize] = match crate::text::model(name) {
        Some(m) => m.dims,
        None => &[1024],
    };
    let texts: Vec<String> = match v.get("input") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(a)) => match a
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
        {
            Some(t) => t,
            None => return invalid("input should be a string or a list of strings"),
        },
        _ => return invalid("input is required"),
    };
    if texts.is_empty() {
        return invalid("input should not be empty");
    }
    if texts.len() > MAX_INPUTS {
        return invalid(&format!(
            "batch size is invalid, it should not be larger than {MAX_INPUTS}."
        ));
    }
    if texts.iter().any(|t| t.is_empty() || text_tokens(t) > 8192) {
        return invalid("Range of input length should be [1, 8192]");
    }
    let dimension = match dimension_of(&v, "dimensions", dims, 1024) {
        Ok(d) => d,
        Err(msg) => return invalid(&msg),
    };
    let base64 = match v.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(other) => {
            return invalid(&format!(
                "encoding_format should be float or base64, not {other}"
            ))
        }
    };
    let rid = new_request_id();
    match r.fault {
        Some(Fault::CodeOn200) => {
            return reply_raw(
                200,
                json!({"error": {"code": "internal_error", "message": "injected", "param": null, "type": "invalid_request_error"}, "request_id": rid}).to_string(),
            )
        }
        Some(Fault::BadEmbedding) => {
            return reply_raw(
                200,
                json!({"data": [{"embedding": [0.1, 0.2], "index": 0, "object": "embedding"}], "model": name, "object": "list", "usage": {"prompt_tokens": 1, "total_tokens": 1}, "id": rid}).to_string(),
            )
        }
        _ => {}
    }
    let full = s.full_precision.load(Ordering::SeqCst);
    let document = json!({});
    let mut total = 0u64;
    let mut entries = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        total += text_tokens(t);
        let vector = item_embedding_with(name, "text", t, &document, dimension, full);
        let embedding = if base64 {
            json!(base64_f32_le(&vector))
        } else {
            json!(vector)
        };
        entries.push(
            Obj::new()
                .put("embedding", embedding)
                .put("index", json!(i))
                .put("object", json!("embedding"))
                .done(),
        );
    }
    if matches!(r.fault, Some(Fault::WrongUsage)) {
        total += 1;
    }
    s.billed_units.fetch_add(total, Ordering::SeqCst);
    let body = Obj::new()
        .raw("data", &array_of(&entries))
        .put("model", json!(name))
        .put("object", json!("list"))
        .put(
            "usage",
            json!({"prompt_tokens": total, "total_tokens": total}),
        )
        .put("id", json!(rid))
        .done();
    reply_raw(200, body)
}
