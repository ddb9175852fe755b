//! Request bodies.

use serde_json::Value;

use super::MODEL;

/// A body with one text item.
pub fn text_body(text: &str) -> String {
    serde_json::json!({"model": MODEL, "input": {"contents": [{"text": text}]}, "parameters": {}})
        .to_string()
}

/// A body from a list of (modality, content) pairs.
pub fn body(items: &[(&str, &str)]) -> String {
    let contents: Vec<Value> = items
        .iter()
        .map(|(m, c)| serde_json::json!({ *m: *c }))
        .collect();
    serde_json::json!({"model": MODEL, "input": {"contents": contents}, "parameters": {}})
        .to_string()
}
