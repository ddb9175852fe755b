//! Rendering answers: the response body type, JSON and DashScope's SSE
//! framing, and the headers the gateway adds (`X-Cache`, `RateLimit-*`,
//! `X-Quota-Remaining`). Errors render through
//! [`GatewayError::into_response`](crate::error::GatewayError::into_response).

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use std::convert::Infallible;
use std::future::Future;

use http::{Request, Response, StatusCode};

use crate::body::{json, json_chunks, sse_event, Body, BoxFuture, Chunks, ReqBody};
use crate::error::GatewayError;
use crate::limits::RateState;
use crate::metering::{CacheStatus, Usage};
use crate::request_id;

/// The gateway's refusal of `req`, framed as its route frames answers,
/// with the request's id.
pub(crate) fn refusal<B>(req: &Request<B>, e: GatewayError, framing: Framing) -> Response<Body> {
    if framing == Framing::OpenAi {
        return crate::family::compatible_error(e, &request_id::of(req));
    }
    e.into_response(&request_id::of(req), framing.sse(req.headers()))
}

/// An answer that is ready now, as the future every layer returns.
pub(crate) fn now(r: Response<Body>) -> BoxFuture {
    Box::pin(std::future::ready(Ok(r)))
}

/// Serves a route from the request's head (its body is not read) and
/// renders the route's error as a JSON refusal.
pub(crate) async fn from_head<F, Fut>(
    req: Request<ReqBody>,
    handle: F,
) -> Result<Response<Body>, Infallible>
where
    F: FnOnce(http::request::Parts) -> Fut,
    Fut: Future<Output = Result<Response<Body>, GatewayError>>,
{
    let rid = request_id::of(&req);
    let (parts, _) = req.into_parts();
    Ok(handle(parts)
        .await
        .unwrap_or_else(|e| e.into_response(&rid, false)))
}

/// How a route frames its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Always JSON (uploads, admin).
    Json,
    /// SSE when the client asks for it (the embedding endpoints).
    SseIfAsked,
    /// JSON, errors in OpenAI's shape (`/compatible-mode/v1/embeddings`).
    OpenAi,
}

impl Framing {
    pub(crate) fn sse(self, h: &HeaderMap) -> bool {
        match self {
            Framing::Json | Framing::OpenAi => false,
            Framing::SseIfAsked => wants_sse(h),
        }
    }
}

/// True when the client asked for DashScope's SSE framing.
fn wants_sse(h: &HeaderMap) -> bool {
    h.get("x-dashscope-sse")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("enable"))
        || h.get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"))
}

/// A successful embedding answer, as JSON or as one SSE event; the
/// `x-request-id` header matches the body's `request_id`.
pub(crate) fn success(body: Bytes, request_id: &str, sse: bool) -> Response<Body> {
    let mut r = if sse {
        sse_event(StatusCode::OK, "result", &body)
    } else {
        json(StatusCode::OK, body)
    };
    if let Ok(rid) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert(X_REQUEST_ID, rid);
    }
    r
}

/// A hit's answer, as DashScope writes it:
/// `{"output":{"embedding":…},"usage":…,"request_id":"…"}`, as the three
/// buffers it is made of: the vector is the cache's own bytes, not copied.
pub(crate) fn hit_chunks(embedding: Bytes, usage: &Usage, request_id: &str) -> Chunks {
    let usage = usage.json();
    let mut suffix = Vec::with_capacity(usage.len() + request_id.len() + 32);
    suffix.extend_from_slice(b"},\"usage\":");
    suffix.extend_from_slice(usage.as_bytes());
    suffix.extend_from_slice(b",\"request_id\":\"");
    suffix.extend_from_slice(request_id.as_bytes());
    suffix.extend_from_slice(b"\"}");
    Chunks::new([
        Bytes::from_static(HIT_PREFIX),
        embedding,
        Bytes::from(suffix),
    ])
}

const HIT_PREFIX: &[u8] = b"{\"output\":{\"embedding\":";

/// A successful answer made of buffers ([`hit_chunks`]): as JSON, or, for
/// SSE, joined into one event.
pub(crate) fn success_chunks(chunks: Chunks, request_id: &str, sse: bool) -> Response<Body> {
    if sse {
        return success(chunks.concat(), request_id, sse);
    }
    let mut r = json_chunks(StatusCode::OK, chunks);
    if let Ok(rid) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert(X_REQUEST_ID, rid);
    }
    r
}

/// A hit's answer as gzip, around the entry's precompressed vector.
pub(crate) fn hit_gzip(
    embedding: &crate::gzip::Precompressed,
    usage: &Usage,
    request_id: &str,
) -> Bytes {
    let suffix = format!(
        "}},\"usage\":{},\"request_id\":\"{request_id}\"}}",
        usage.json()
    );
    crate::gzip::wrap(HIT_PREFIX, embedding, suffix.as_bytes())
}

/// Header names the gateway sets on most answers, parsed once.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const X_QUOTA_REMAINING: HeaderName = HeaderName::from_static("x-quota-remaining");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// `X-Cache: HIT | PARTIAL | MISS`.
pub(crate) fn set_cache_header(h: &mut HeaderMap, cache: CacheStatus) {
    h.insert(
        X_CACHE,
        HeaderValue::from_static(match cache {
            CacheStatus::Hit => "HIT",
            CacheStatus::Partial => "PARTIAL",
            // An unknown outcome is an upstream call too.
            CacheStatus::Miss | CacheStatus::Unknown => "MISS",
        }),
    );
}

/// `RateLimit-Limit/Remaining/Reset` (seconds, rounded up).
pub(crate) fn set_rate_headers(h: &mut HeaderMap, rate: &RateState) {
    h.insert(RATELIMIT_LIMIT, HeaderValue::from(rate.limit));
    h.insert(RATELIMIT_REMAINING, HeaderValue::from(rate.remaining));
    h.insert(
        RATELIMIT_RESET,
        HeaderValue::from(rate.reset.as_secs() + u64::from(rate.reset.subsec_nanos() > 0)),
    );
}

pub(crate) fn set_quota_header(h: &mut HeaderMap, remaining: u64) {
    h.insert(X_QUOTA_REMAINING, HeaderValue::from(remaining));
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::header::CONTENT_TYPE;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn sse_framing() {
        let r = sse_event(StatusCode::OK, "result", b"{\"a\":\n1}");
        assert_eq!(r.headers()[CONTENT_TYPE], "text/event-stream;charset=UTF-8");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"a\":1}\n\n"
        );
    }

    #[test]
    fn rate_reset_rounds_up() {
        let mut h = HeaderMap::new();
        set_rate_headers(
            &mut h,
            &RateState {
                limit: 5,
                remaining: 2,
                reset: std::time::Duration::from_millis(1200),
            },
        );
        assert_eq!(h["ratelimit-reset"], "2");
        assert_eq!(h["ratelimit-remaining"], "2");
    }
}
