//! The access log and the request metrics, as `tower-http`'s trace layer
//! callbacks: one `embedgate::access` line and one
//! `embedgate_requests_total` / `embedgate_request_duration_seconds` sample
//! per answered request, labelled from what the inner layers put on the
//! response (route, [`TenantName`], [`ModelName`], [`CacheStatus`],
//! [`ErrorCode`]).
//! [`InFlight`] keeps `embedgate_in_flight_requests` true, also for
//! requests whose client went away.
//!
//! Refusals (503 from shedding, 429 from rate limits) can arrive at the full
//! rate of a client's retry loop; their lines are limited by
//! [`RefusalLines`]: at most [`REFUSAL_LINES_PER_SECOND`] a second of each
//! kind in full, the rest counted and summarised once a second
//! ([`summarise_refusals`]).
//! The metrics count every request either way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use tower_http::request_id::RequestId;
use tower_http::trace::{MakeSpan, OnResponse};
use tracing::Span;

use crate::app::App;
use crate::auth::TenantName;
use crate::error::ErrorCode;
use crate::metering::{CacheStatus, ModelName};
use crate::metrics::{model_label, Metrics, NO_MODEL, NO_TENANT};

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
    app: Arc<App>,
}

impl AccessLog {
    pub(crate) fn new(app: Arc<App>) -> AccessLog {
        AccessLog { app }
    }
}

impl<B> OnResponse<B> for AccessLog {
    fn on_response(self, r: &Response<B>, elapsed: Duration, _: &Span) {
        let ext = r.extensions();
        let route = ext.get::<RouteName>().map(|r| r.0).unwrap_or("none");
        let tenant = ext.get::<TenantName>().map(|t| &*t.0).unwrap_or(NO_TENANT);
        let model = ext
            .get::<ModelName>()
            .map(|m| model_label(&m.0))
            .unwrap_or(NO_MODEL);
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
        let metrics: &Metrics = &self.app.metrics;
        if !UNMETERED_ROUTES.contains(&route) {
            metrics
                .requests
                .with_label_values(&[tenant, model, cache, &code])
                .inc();
            metrics
                .request_duration
                .with_label_values(&[cache])
                .observe(elapsed.as_secs_f64());
        }
        if !self.app.refusal_lines.admit(status) {
            return;
        }
        tracing::info!(
            target: "embedgate::access",
            route,
            tenant,
            model,
            cache,
            status = status.as_u16(),
            code = %code,
            request_id,
            duration_us = elapsed.as_micros() as u64,
            "request"
        );
    }
}

/// Full access lines per second for each kind of refusal (503, 429), at
/// most; the rest are summarised.
pub(crate) const REFUSAL_LINES_PER_SECOND: u64 = 10;

/// The rate limit on refusals' access lines: for 503 (shed) and for 429
/// (throttled) answers, a budget of [`REFUSAL_LINES_PER_SECOND`] full lines,
/// renewed by [`Self::roll`] once a second, and a count of the answers
/// logged only in the summary.
pub(crate) struct RefusalLines {
    /// When the last summary was written (only [`Self::summarise`] takes it).
    since: Mutex<Instant>,
    shed: Budget,
    throttled: Budget,
}

#[derive(Default)]
struct Budget {
    /// Lines logged (or attempted) since the last roll.
    logged: AtomicU64,
    /// Answers not logged since the last roll.
    suppressed: AtomicU64,
}

impl Budget {
    fn admit(&self) -> bool {
        // Once the budget is spent, only the count is written.
        if self.logged.load(Ordering::Relaxed) < REFUSAL_LINES_PER_SECOND
            && self.logged.fetch_add(1, Ordering::Relaxed) < REFUSAL_LINES_PER_SECOND
        {
            return true;
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        false
    }

    fn roll(&self) -> u64 {
        self.logged.store(0, Ordering::Relaxed);
        self.suppressed.swap(0, Ordering::Relaxed)
    }
}

/// What [`RefusalLines::roll`] found suppressed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Suppressed {
    pub(crate) shed: u64,
    pub(crate) throttled: u64,
}

impl Default for RefusalLines {
    fn default() -> RefusalLines {
        RefusalLines {
            since: Mutex::new(Instant::now()),
            shed: Budget::default(),
            throttled: Budget::default(),
        }
    }
}

impl RefusalLines {
    /// Whether an answer with this status gets its access line; answers
    /// that are not refusals always do.
    pub(crate) fn admit(&self, status: StatusCode) -> bool {
        match status {
            StatusCode::SERVICE_UNAVAILABLE => self.shed.admit(),
            StatusCode::TOO_MANY_REQUESTS => self.throttled.admit(),
            _ => true,
        }
    }

    /// Renews the budgets; returns (and forgets) what was suppressed.
    pub(crate) fn roll(&self) -> Suppressed {
        Suppressed {
            shed: self.shed.roll(),
            throttled: self.throttled.roll(),
        }
    }

    /// Rolls and writes one summary line per kind of refusal suppressed
    /// since the last summary.
    pub(crate) fn summarise(&self) {
        let seconds = {
            let mut since = self.since.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let seconds = now.duration_since(*since).as_secs_f64();
            *since = now;
            seconds
        };
        let s = self.roll();
        for (n, status, what) in [(s.shed, 503u16, "shed"), (s.throttled, 429, "throttled")] {
            if n > 0 {
                tracing::info!(
                    target: "embedgate::access",
                    suppressed = n,
                    status,
                    "suppressed {n} {what} ({status}) requests in the last {seconds:.1} s"
                );
            }
        }
    }
}

/// Renews the refusal-line budget and logs what was suppressed, once a
/// second, until aborted.
pub(crate) async fn summarise_refusals(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        app.refusal_lines.summarise();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_lines_are_limited_per_second_and_kind_and_counted() {
        let r = RefusalLines::default();
        let n = REFUSAL_LINES_PER_SECOND;
        let admitted = |status| (0..n + 5).filter(|_| r.admit(status)).count() as u64;
        assert_eq!(admitted(StatusCode::SERVICE_UNAVAILABLE), n);
        // Each kind has its own budget; other answers are always logged.
        assert_eq!(admitted(StatusCode::TOO_MANY_REQUESTS), n);
        assert!(!r.admit(StatusCode::TOO_MANY_REQUESTS));
        for s in [
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::GATEWAY_TIMEOUT,
        ] {
            assert!(r.admit(s));
        }
        assert_eq!(
            r.roll(),
            Suppressed {
                shed: 5,
                throttled: 6
            }
        );
        // A new second: new budgets, nothing suppressed yet.
        assert!(r.admit(StatusCode::TOO_MANY_REQUESTS));
        assert!(r.admit(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(r.roll(), Suppressed::default());
    }
}
