//! Rate limit layer: one token from the authenticated tenant's rate for the
//! route's [`RateBucket`] ([`Limits::check_rate`](crate::limits::Limits::check_rate)):
//! `rate` on the embedding route (none configured: unlimited),
//! `uploads_rate` on the uploads route; or 429 `Throttling.RateQuota` with
//! `Retry-After`. Every answer past this layer, the refusal included,
//! carries `RateLimit-Limit/Remaining/Reset` of that bucket.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::app::App;
use crate::auth::tenant_of;
use crate::body::{Body, BoxFuture, ReqBody};
use crate::limits::RateBucket;
use crate::response::{self, set_rate_headers, Framing};

#[derive(Clone)]
pub(crate) struct RateLimitLayer {
    app: Arc<App>,
    framing: Framing,
    bucket: RateBucket,
}

impl RateLimitLayer {
    pub(crate) fn new(app: Arc<App>, framing: Framing, bucket: RateBucket) -> RateLimitLayer {
        RateLimitLayer {
            app,
            framing,
            bucket,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            app: self.app.clone(),
            framing: self.framing,
            bucket: self.bucket,
            inner,
        }
    }
}

#[derive(Clone)]
pub(crate) struct RateLimit<S> {
    app: Arc<App>,
    framing: Framing,
    bucket: RateBucket,
    inner: S,
}

impl<S> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        // The clone that was polled ready answers; this one stays for the next.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let app = self.app.clone();
        let bucket = self.bucket;
        let framing = self.framing;
        Box::pin(async move {
            let tenant = match tenant_of(&req) {
                Ok(t) => t,
                Err(e) => return Ok(response::refusal(&req, e, framing)),
            };
            let cfg = match bucket {
                RateBucket::Embeddings => tenant.rate,
                RateBucket::Uploads => Some(tenant.uploads_rate),
            };
            let Some(cfg) = cfg else {
                return inner.call(req).await;
            };
            let span = tracing::debug_span!(target: crate::telemetry::TARGET, "rate_limit");
            match app
                .limits
                .check_rate(bucket, &tenant.name, cfg)
                .instrument(span)
                .await
            {
                Ok(state) => {
                    let mut r = inner.call(req).await?;
                    set_rate_headers(r.headers_mut(), &state);
                    Ok(r)
                }
                Err(refusal) => {
                    let mut r = response::refusal(&req, refusal.error(), framing);
                    set_rate_headers(r.headers_mut(), &refusal.state);
                    Ok(r)
                }
            }
        })
    }
}
