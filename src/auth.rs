//! Authentication layer: the tenant whose key digest matches the request's
//! `Authorization: Bearer …` goes into the request's extensions (as
//! `Arc<Tenant>`), and its name onto the response (as [`TenantName`]) for
//! the access log and metrics. Anything else is answered 401 here and goes
//! no further.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::app::App;
use crate::body::{Body, BoxFuture, ReqBody};
use crate::error::GatewayError;
use crate::response::{self, Framing};
use crate::tenants::Tenant;

/// The tenant that answered this request, on the response.
#[derive(Debug, Clone)]
pub(crate) struct TenantName(pub(crate) Arc<str>);

/// The tenant the auth layer put on the request.
pub(crate) fn tenant_of<B>(req: &Request<B>) -> Result<Arc<Tenant>, GatewayError> {
    req.extensions()
        .get::<Arc<Tenant>>()
        .cloned()
        .ok_or_else(|| GatewayError::Internal("no tenant on an authenticated route".into()))
}

#[derive(Clone)]
pub(crate) struct AuthLayer {
    app: Arc<App>,
    framing: Framing,
}

impl AuthLayer {
    pub(crate) fn new(app: Arc<App>, framing: Framing) -> AuthLayer {
        AuthLayer { app, framing }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            app: self.app.clone(),
            framing: self.framing,
            inner,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Auth<S> {
    app: Arc<App>,
    framing: Framing,
    inner: S,
}

impl<S> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> BoxFuture {
        let found = {
            let _span = tracing::debug_span!(target: crate::telemetry::TARGET, "auth").entered();
            self.app.tenants.load().authenticate(req.headers())
        };
        let Some(tenant) = found else {
            return response::now(response::refusal(
                &req,
                GatewayError::InvalidApiKey,
                self.framing,
            ));
        };
        let name = TenantName(tenant.name.clone());
        req.extensions_mut().insert(tenant);
        let answer = self.inner.call(req);
        Box::pin(async move {
            let mut r = answer.await?;
            r.extensions_mut().insert(name);
            Ok(r)
        })
    }
}
