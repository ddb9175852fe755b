//! The body types of the request path. The layers from `tower-http` wrap
//! bodies in their own types; the stack boxes each once at its edge so
//! every gateway service takes [`ReqBody`] and answers [`Body`]. Also the
//! two framings every answer uses: a JSON body, or one SSE event.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// The future every gateway layer and service returns.
pub(crate) type BoxFuture = Pin<
    Box<dyn Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static>,
>;

/// Errors of the layers (load shed, deadline) and of any body.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A body's error. A named type rather than a bare `BoxError`: futures
/// that hold a boxed body across an await then stay `Send` (a trait object
/// in the body's type trips rustc's higher-ranked lifetime inference).
#[derive(Debug)]
pub(crate) struct BodyError(pub(crate) BoxError);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl BodyError {
    /// True when the error is (or was boxed from) a `T`.
    pub(crate) fn is<T: std::error::Error + 'static>(&self) -> bool {
        self.0.is::<T>()
    }
}

/// Every response body the stack produces.
pub(crate) type Body = UnsyncBoxBody<Bytes, BodyError>;

/// Every request body the gateway's services read: the client's body,
/// already behind the size limit and the read timeout.
pub(crate) type ReqBody = UnsyncBoxBody<Bytes, BodyError>;

/// A body that is all there in one buffer.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose errors convert to [`BoxError`].
pub(crate) fn boxed<B>(b: B) -> UnsyncBoxBody<Bytes, BodyError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(|e| BodyError(e.into())).boxed_unsync()
}

/// A response with this status, content type and body.
pub(crate) fn with_body(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A body of a few buffers sent as they are, one frame each: a hit's answer
/// is the cached vector (tens of KB) between a small prefix and suffix,
/// written without copying the vector into a new buffer (hyper queues the
/// frames and writes them, with the head, in one `writev`).
pub(crate) struct Chunks {
    bufs: std::collections::VecDeque<Bytes>,
    remaining: u64,
}

impl Chunks {
    pub(crate) fn new(bufs: impl IntoIterator<Item = Bytes>) -> Chunks {
        let bufs: std::collections::VecDeque<Bytes> =
            bufs.into_iter().filter(|b| !b.is_empty()).collect();
        let remaining = bufs.iter().map(|b| b.len() as u64).sum();
        Chunks { bufs, remaining }
    }
}

impl Chunks {
    /// All the buffers in one.
    pub(crate) fn concat(&self) -> Bytes {
        let mut all = Vec::with_capacity(usize::try_from(self.remaining).unwrap_or(0));
        for b in &self.bufs {
            all.extend_from_slice(b);
        }
        Bytes::from(all)
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.bufs.pop_front();
        if let Some(b) = &next {
            self.remaining -= b.len() as u64;
        }
        std::task::Poll::Ready(next.map(|b| Ok(http_body::Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.bufs.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// A JSON answer made of a few buffers ([`Chunks`]).
pub(crate) fn json_chunks(status: StatusCode, chunks: Chunks) -> Response<Body> {
    let mut r = Response::new(chunks.map_err(|never| match never {}).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    with_body(status, "application/json", body)
}

/// DashScope's SSE framing: one event carrying the whole JSON answer.
pub(crate) fn sse_event(status: StatusCode, event: &str, json: &[u8]) -> Response<Body> {
    // SSE data must be one line; re-serialise if upstream's JSON had newlines.
    let one_line: Bytes = if json.contains(&b'\n') {
        serde_json::from_slice::<serde_json::Value>(json)
            .map(|v| Bytes::from(v.to_string()))
            .unwrap_or_else(|_| Bytes::copy_from_slice(json))
    } else {
        Bytes::copy_from_slice(json)
    };
    let mut body = Vec::with_capacity(one_line.len() + 64);
    body.extend_from_slice(
        format!(
            "id:1\nevent:{event}\n:HTTP_STATUS/{}\ndata:",
            status.as_u16()
        )
        .as_bytes(),
    );
    body.extend_from_slice(&one_line);
    body.extend_from_slice(b"\n\n");
    with_body(status, "text/event-stream;charset=UTF-8", body)
}
