//! The request id: `x-request-id` from the client when it is a plain token,
//! else a new UUID. Set by the stack's first layer, it names the request in
//! the access log, in error bodies and in hit answers.

use http::{HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

/// A client's id longer than this, or with other characters than
/// `[A-Za-z0-9._:-]`, is replaced: it is echoed into JSON bodies and logs.
const MAX_CLIENT_ID_LEN: usize = 128;

pub(crate) fn fresh() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// Makes a UUID for requests that came without a usable id.
#[derive(Clone, Copy, Default)]
pub(crate) struct MakeUuid;

impl MakeRequestId for MakeUuid {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&fresh()).ok().map(RequestId::new)
    }
}

/// Drops a client-sent `x-request-id` that is not a plain token, so the
/// id layer makes a fresh one.
pub(crate) fn drop_unusable<B>(mut req: Request<B>) -> Request<B> {
    let usable = req
        .headers()
        .get("x-request-id")
        .is_some_and(|v| is_token(v.as_bytes()));
    if !usable {
        req.headers_mut().remove("x-request-id");
    }
    req
}

fn is_token(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_CLIENT_ID_LEN
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The id the stack gave this request (a new one outside the stack).
pub(crate) fn of<B>(req: &Request<B>) -> String {
    req.extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_tokens_are_kept() {
        for (id, kept) in [
            ("abc-123_x.y:z", true),
            ("", false),
            ("a\"b", false),
            ("has space", false),
            (&"x".repeat(129), false),
            (&"x".repeat(128), true),
        ] {
            let mut req = Request::new(());
            if let Ok(v) = HeaderValue::from_str(id) {
                req.headers_mut().insert("x-request-id", v);
            }
            let req = drop_unusable(req);
            assert_eq!(req.headers().contains_key("x-request-id"), kept, "{id:?}");
        }
    }
}
