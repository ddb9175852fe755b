//! The access log and the request metrics, as `tower-http`'s trace layer
//! callbacks: one `embedgate::access` line and one
//! `embedgate_requests_total` / `embedgate_request_duration_seconds` sample
//! per answered request, labelled from what the inner layers put on the
//! response (route, [`TenantName`], [`CacheStatus`], [`ErrorCode`]).
//! [`InFlight`] keeps `embedgate_in_flight_requests` true, also for
//! requests whose client went away.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower_http::request_id::RequestId;
use tower_http::trace::{MakeSpan, OnResponse};
use tracing::Span;

use crate::auth::TenantName;
use crate::error::ErrorCode;
use crate::metering::CacheStatus;
use crate::metrics::{Metrics, NO_TENANT};

/// Which route answered, on the response; set by the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RouteName(pub(crate) &'static str);

/// Routes whose requests are operator traffic: logged, not counted as
/// API requests in the metrics.
const UNMETERED_ROUTES: &[&str] = &["admin"];

/// A span per request at DEBUG: free unless `EMBEDGATE_LOG` asks for it.
#[derive(Clone, Copy, Default)]
pub(crate) struct RequestSpan;

impl<B> MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        let id = req
            .extensions()
            .get::<RequestId>()
            .and_then(|id| id.header_value().to_str().ok())
            .unwrap_or("");
        tracing::debug_span!("request", method = %req.method(), path = req.uri().path(), request_id = id)
    }
}

#[derive(Clone)]
pub(crate) struct AccessLog {
    metrics: Arc<Metrics>,
}

impl AccessLog {
    pub(crate) fn new(metrics: Arc<Metrics>) -> AccessLog {
        AccessLog { metrics }
    }
}

impl<B> OnResponse<B> for AccessLog {
    fn on_response(self, r: &Response<B>, elapsed: Duration, _: &Span) {
        let ext = r.extensions();
        let route = ext.get::<RouteName>().map(|r| r.0).unwrap_or("none");
        let tenant = ext.get::<TenantName>().map(|t| &*t.0).unwrap_or(NO_TENANT);
        let cache = ext
            .get::<CacheStatus>()
            .map(|c| c.as_str())
            .unwrap_or("none");
        let status = r.status();
        let code = match (status, ext.get::<ErrorCode>()) {
            (StatusCode::OK, _) => "ok".to_string(),
            (_, Some(c)) => c.0.to_string(),
            (s, None) => format!("http_{}", s.as_u16()),
        };
        let request_id = ext
            .get::<RequestId>()
            .and_then(|id| id.header_value().to_str().ok())
            .or_else(|| r.headers().get("x-request-id")?.to_str().ok())
            .unwrap_or("");
        if !UNMETERED_ROUTES.contains(&route) {
            self.metrics
                .requests
                .with_label_values(&[tenant, cache, &code])
                .inc();
            self.metrics
                .request_duration
                .with_label_values(&[cache])
                .observe(elapsed.as_secs_f64());
        }
        tracing::info!(
            target: "embedgate::access",
            route,
            tenant,
            cache,
            status = status.as_u16(),
            code = %code,
            request_id,
            duration_us = elapsed.as_micros() as u64,
            "request"
        );
    }
}

/// Counts a request in `embedgate_in_flight_requests` until it is
/// answered or dropped.
pub(crate) struct InFlight(Arc<Metrics>);

impl InFlight {
    pub(crate) fn new(metrics: &Arc<Metrics>) -> InFlight {
        metrics.in_flight.inc();
        InFlight(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}
