//! The one place where whatever the layers below produced becomes a
//! DashScope-shaped answer: their errors (load shed, deadline), the bare
//! responses of generic layers (`tower-http`'s 413, the panic handler's
//! 500), each mapped to a [`GatewayError`] and rendered with this
//! request's id. Answers the gateway's own services made pass unchanged.

use std::any::Any;
use std::convert::Infallible;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::body::{boxed, Body, BoxError, BoxFuture};
use crate::error::{ErrorCode, GatewayError};
use crate::request_id;
use crate::response;

/// Turns the layers' errors into a [`GatewayError`].
fn classify(e: &BoxError) -> GatewayError {
    if e.is::<tower::load_shed::error::Overloaded>() {
        GatewayError::Overloaded
    } else if e.is::<tower::timeout::error::Elapsed>() {
        GatewayError::GatewayTimeout
    } else {
        GatewayError::Internal(format!("request failed in the stack: {e}"))
    }
}

/// The error a generic layer meant with a bare status.
fn from_status(status: StatusCode, body_limit: usize) -> GatewayError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => GatewayError::BodyTooLarge { limit: body_limit },
        StatusCode::REQUEST_TIMEOUT => GatewayError::RequestTimeout,
        StatusCode::SERVICE_UNAVAILABLE => GatewayError::Overloaded,
        StatusCode::GATEWAY_TIMEOUT => GatewayError::GatewayTimeout,
        StatusCode::NOT_FOUND => GatewayError::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => GatewayError::MethodNotAllowed,
        other => GatewayError::Internal(format!("a layer answered HTTP {other} on its own")),
    }
}

/// For `tower-http`'s `CatchPanicLayer`: logs the panic and answers a bare
/// 500, which [`Rescue`] turns into DashScope's `InternalError`.
pub(crate) fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response<Body> {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = detail, "a request panicked");
    let mut r = Response::new(crate::body::full(bytes::Bytes::new()));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

#[derive(Clone, Copy)]
pub(crate) struct RescueLayer {
    /// `server.max_body_bytes`, for the 413 message.
    body_limit: usize,
}

impl RescueLayer {
    pub(crate) fn new(body_limit: usize) -> RescueLayer {
        RescueLayer { body_limit }
    }
}

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            body_limit: self.body_limit,
            not_ready: None,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Rescue<S> {
    inner: S,
    body_limit: usize,
    /// The layers below failed to get ready: the next call answers this.
    not_ready: Option<GatewayError>,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Rescue<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ResB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(classify(&e.into()));
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Request<ReqB>) -> BoxFuture {
        let rid = request_id::of(&req);
        if let Some(e) = self.not_ready.take() {
            return response::now(e.into_response(&rid, false));
        }
        let body_limit = self.body_limit;
        let answer = self.inner.call(req);
        Box::pin(async move {
            let e = match answer.await {
                Ok(r) if r.status().is_success() || r.extensions().get::<ErrorCode>().is_some() => {
                    return Ok(r.map(boxed));
                }
                Ok(r) => from_status(r.status(), body_limit),
                Err(e) => classify(&e.into()),
            };
            Ok(e.into_response(&rid, false))
        })
    }
}
