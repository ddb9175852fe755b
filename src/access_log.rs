//! The access log and the request metrics, as a layer ([`AccessLayer`]):
//! the request span, then one `embedgate::access` line and one
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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body::Frame;
use tower::{Layer, Service};
use tower_http::request_id::RequestId;
use tower_http::trace::MakeSpan;
use tracing::Span;

use crate::body::{Body, BodyError};

use crate::app::App;
use crate::auth::TenantName;
use crate::error::ErrorCode;
use crate::log_writer::LogQueue;
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

/// Layer 4 of the stack: makes the request span ([`crate::telemetry`]'s,
/// entered while the inner layers run), and when the answer's head is
/// ready writes its access line and request metrics ([`AccessLog`]).
///
/// In place of `tower-http`'s `TraceLayer`, which did the same through
/// callbacks but also timed every body frame (four clock reads and a body
/// wrapper per answer, ~1.5% of a hit's CPU): here the clock is read once
/// at the start and once at the head, and the body is wrapped only when
/// the span is recorded (traces on, or DEBUG logs), to keep the span open
/// until the body is sent.
#[derive(Clone)]
pub(crate) struct AccessLayer {
    log: AccessLog,
}

impl AccessLayer {
    pub(crate) fn new(app: Arc<App>) -> AccessLayer {
        AccessLayer {
            log: AccessLog { app },
        }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            log: self.log.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Access<S> {
    inner: S,
    log: AccessLog,
}

impl<S, B> Service<Request<B>> for Access<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Unpin,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = AccessFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> AccessFuture<S::Future> {
        let start = Instant::now();
        let span = crate::telemetry::RequestSpan.make_span(&req);
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        AccessFuture {
            inner,
            span,
            start,
            log: Some(self.log.clone()),
        }
    }
}

pub(crate) struct AccessFuture<F> {
    inner: F,
    span: Span,
    start: Instant,
    log: Option<AccessLog>,
}

impl<F, E> Future for AccessFuture<F>
where
    // The stack's inner futures are boxed: no pin projection needed.
    F: Future<Output = Result<Response<Body>, E>> + Unpin,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let r = {
            let _entered = this.span.enter();
            ready!(Pin::new(&mut this.inner).poll(cx))
        };
        let Some(log) = this.log.take() else {
            return Poll::Ready(r);
        };
        Poll::Ready(r.map(|resp| {
            log.on_response(&resp, this.start.elapsed());
            if this.span.is_disabled() {
                return resp;
            }
            let span = std::mem::replace(&mut this.span, Span::none());
            resp.map(|inner| http_body_util::BodyExt::boxed_unsync(SpanBody { inner, span }))
        }))
    }
}

/// A response body that keeps the request span open, and entered, until
/// the answer is sent (the exported span then covers the body).
struct SpanBody {
    inner: Body,
    span: Span,
}

impl http_body::Body for SpanBody {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, BodyError>>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone)]
pub(crate) struct AccessLog {
    app: Arc<App>,
}

impl AccessLog {
    fn on_response(self, r: &Response<Body>, elapsed: Duration) {
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
        let code: std::borrow::Cow<'_, str> = match (status, ext.get::<ErrorCode>()) {
            (StatusCode::OK, _) => "ok".into(),
            (_, Some(c)) => c.0.into(),
            (s, None) => format!("http_{}", s.as_u16()).into(),
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
        let duration_us = elapsed.as_micros() as u64;
        if let Some(queue) = LogQueue::access_lines() {
            if tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
                let line = Line {
                    route,
                    tenant,
                    model,
                    cache,
                    status: status.as_u16(),
                    code: &code,
                    request_id,
                    duration_us,
                };
                queue.push_owned(line.json(std::time::SystemTime::now()));
            }
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
            duration_us,
            "request"
        );
    }
}

const ACCESS_TARGET: &str = "embedgate::access";

/// One access line's fields.
struct Line<'a> {
    route: &'a str,
    tenant: &'a str,
    model: &'a str,
    cache: &'a str,
    status: u16,
    code: &'a str,
    request_id: &'a str,
    duration_us: u64,
}

impl Line<'_> {
    /// The line as `tracing-subscriber`'s flattened JSON formatter writes
    /// the `tracing::info!` above (same keys, order, escapes and timestamp),
    /// written by hand: formatting through `tracing` cost ~1.4 µs a request.
    fn json(&self, now: std::time::SystemTime) -> Vec<u8> {
        let mut out = Vec::with_capacity(320);
        out.extend_from_slice(b"{\"timestamp\":\"");
        rfc3339_micros(now, &mut out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",\"route\":");
        json_str(self.route, &mut out);
        out.extend_from_slice(b",\"tenant\":");
        json_str(self.tenant, &mut out);
        out.extend_from_slice(b",\"model\":");
        json_str(self.model, &mut out);
        out.extend_from_slice(b",\"cache\":");
        json_str(self.cache, &mut out);
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        out.extend_from_slice(b",\"code\":");
        json_str(self.code, &mut out);
        out.extend_from_slice(b",\"request_id\":");
        json_str(self.request_id, &mut out);
        out.extend_from_slice(b",\"duration_us\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.duration_us).as_bytes());
        out.extend_from_slice(b",\"target\":\"embedgate::access\"}\n");
        out
    }
}

/// A JSON string, escaped as `serde_json` escapes it.
fn json_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// `2026-11-24T15:47:46.902568Z`, as `tracing-subscriber`'s default timer
/// writes it (UTC, microseconds).
fn rfc3339_micros(t: std::time::SystemTime, out: &mut Vec<u8>) {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    let digits = |out: &mut Vec<u8>, v: u64, n: usize| {
        let mut buf = [b'0'; 6];
        let mut v = v;
        for i in (0..n).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out.extend_from_slice(&buf[..n]);
    };
    digits(out, y.max(0) as u64, 4);
    out.push(b'-');
    digits(out, m, 2);
    out.push(b'-');
    digits(out, day, 2);
    out.push(b'T');
    digits(out, sod / 3600, 2);
    out.push(b':');
    digits(out, sod / 60 % 60, 2);
    out.push(b':');
    digits(out, sod % 60, 2);
    out.push(b'.');
    digits(out, u64::from(d.subsec_micros()), 6);
    out.push(b'Z');
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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

    /// Captures what a `tracing-subscriber` JSON formatter writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The hand-written line is the line `tracing-subscriber` writes for
    /// the same event, escapes included (but for the time it was taken).
    #[test]
    fn hand_written_access_lines_match_tracing_subscribers() {
        let cap = Capture::default();
        let odd = "id \"quoted\" back\\slash tab\t nl\n bell\u{7} \u{1f} é ✓";
        for (rid, code, status, us) in [
            ("3de36d68-2836-432e-b801-883e282200b3", "ok", 200u16, 6u64),
            (odd, "RateLimited", 429, u64::MAX),
            ("", "http_404", 404, 0),
        ] {
            cap.0.lock().unwrap().clear();
            let writer = cap.clone();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(
                    target: "embedgate::access",
                    route = "embeddings",
                    tenant = "team-a",
                    model = "multimodal-embedding-one-peace-v1",
                    cache = "hit",
                    status,
                    code = %code,
                    request_id = rid,
                    duration_us = us,
                    "request"
                );
            });
            let theirs = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
            let now = std::time::SystemTime::now();
            let ours = Line {
                route: "embeddings",
                tenant: "team-a",
                model: "multimodal-embedding-one-peace-v1",
                cache: "hit",
                status,
                code,
                request_id: rid,
                duration_us: us,
            }
            .json(now);
            let ours = String::from_utf8(ours).unwrap();
            // The timestamps differ by when they were taken; both are 27
            // characters of the same shape.
            let cut = |l: &str| (l[..14].to_string(), l[41..].to_string());
            assert_eq!(cut(&ours), cut(&theirs), "ours {ours} theirs {theirs}");
            let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
            assert_eq!(v["request_id"], rid);
            assert_eq!(v["duration_us"], us);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let mut out = Vec::new();
            let t = std::time::UNIX_EPOCH
                + Duration::from_secs(secs)
                + Duration::from_micros(u64::from(micros));
            rfc3339_micros(t, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(at(1_795_527_466, 902_568), "2026-11-24T13:37:46.902568Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
    }

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
