//! Replies: status, headers, text; success and error shape assertions.

use serde_json::Value;

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub async fn from_response(r: reqwest::Response) -> Reply {
        Reply::from(r).await
    }

    pub(super) async fn from(r: reqwest::Response) -> Reply {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        Reply {
            status,
            headers,
            text,
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_string()
    }
}

/// `output.embedding` of a success body.
pub fn embedding(v: &Value) -> &Vec<Value> {
    v["output"]["embedding"]
        .as_array()
        .unwrap_or_else(|| panic!("no output.embedding in {v}"))
}

/// Asserts a successful JSON answer (SPEC §1): 200, application/json, no
/// `code`, 1536 numbers. Returns the body.
pub fn assert_success(r: &Reply) -> Value {
    assert_eq!(r.status, 200, "{}", r.text);
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let v = r.json();
    assert!(
        v.get("code").is_none(),
        "success carries a code: {}",
        r.text
    );
    let e = embedding(&v);
    assert_eq!(e.len(), 1536);
    assert!(e.iter().all(Value::is_number));
    v
}

/// Asserts a DashScope-shaped error with this status and code: JSON with
/// `code`, a non-empty `message` and `request_id`. Returns the body.
pub fn assert_error(r: &Reply, status: u16, code: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.text);
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let v = r.json();
    assert_eq!(v["code"], code, "{}", r.text);
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
    assert!(
        v["request_id"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
    v
}
