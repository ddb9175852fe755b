//! `GET /api/v1/uploads?action=getPolicy&model=…`: the SDK's upload
//! certificate, fetched with the company key (the `oss://` URL it yields
//! then resolves for the same account). Not cached, not metered. Behind the
//! same auth, in-flight and rate layers as the embedding route.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};

use crate::app::App;
use crate::body::{full, Body, ReqBody};
use crate::error::GatewayError;
use crate::forwarded::ForwardedHeaders;
use crate::request_id;
use crate::upstream::{upstream_error, UPLOADS_PATH};

/// The upload-policy route's service.
pub(crate) async fn serve(
    app: Arc<App>,
    req: Request<ReqBody>,
) -> Result<Response<Body>, Infallible> {
    let rid = request_id::of(&req);
    let (parts, _) = req.into_parts();
    Ok(match policy(&app, &parts).await {
        Ok(r) => r,
        Err(e) => e.into_response(&rid, false),
    })
}

async fn policy(app: &App, req: &http::request::Parts) -> Result<Response<Body>, GatewayError> {
    let tenant = req
        .extensions
        .get::<Arc<crate::tenants::Tenant>>()
        .cloned()
        .ok_or_else(|| GatewayError::Internal("no tenant on an authenticated route".into()))?;
    let pq = req
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(UPLOADS_PATH);
    let forwarded = ForwardedHeaders::from_client(&req.headers)?;
    let resp = app
        .upstream
        .send(
            Method::GET,
            pq,
            &forwarded,
            tenant.workspace.as_deref(),
            Bytes::new(),
        )
        .await?;
    if resp.status != StatusCode::OK {
        return Err(upstream_error(&resp));
    }
    let ct = resp
        .headers
        .get(CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let mut r = Response::new(full(resp.body));
    r.headers_mut().insert(CONTENT_TYPE, ct);
    Ok(r)
}
