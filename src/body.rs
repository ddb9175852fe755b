//! The body types of the request path. The layers from `tower-http` wrap
//! bodies in their own types; the stack boxes each once at its edge so
//! every gateway service takes [`ReqBody`] and answers [`Body`].

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

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
