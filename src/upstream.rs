//! Calls to DashScope: a pooled hyper client (rustls for https, plain http
//! for tests), the company key, the client's allow-listed headers
//! ([`crate::forwarded`]), and bounded retries with backoff and jitter
//! inside the request deadline.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use tracing::Instrument;

use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use crate::forwarded::ForwardedHeaders;
use crate::metrics::Metrics;
use crate::secret::Secret;
use std::sync::Arc;

mod success;
pub(crate) use success::{parse_success, Success};

/// Largest upstream answer we read; an embedding is ~30 KB.
const MAX_UPSTREAM_BODY: usize = 16 * 1024 * 1024;
/// Never wait longer than this between attempts, whatever upstream asks.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Idle pooled connections are closed after this.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// The embedding endpoint, as the SDK builds it.
pub(crate) const EMBEDDING_PATH: &str =
    "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding";
/// The synchronous text embedding endpoint (and the batch submit, with
/// `X-DashScope-Async: enable`).
pub(crate) const TEXT_EMBEDDING_PATH: &str =
    "/api/v1/services/embeddings/text-embedding/text-embedding";
/// The OpenAI-compatible embedding endpoint.
pub(crate) const COMPATIBLE_PATH: &str = "/compatible-mode/v1/embeddings";
/// Batch tasks: `GET /api/v1/tasks[/{id}]`, `POST /api/v1/tasks/{id}/cancel`.
pub(crate) const TASKS_PATH: &str = "/api/v1/tasks";
/// The SDK's upload-certificate endpoint.
pub(crate) const UPLOADS_PATH: &str = "/api/v1/uploads";

pub(crate) struct UpstreamResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

pub(crate) struct Upstream {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: Uri,
    host: HeaderValue,
    key: Option<Secret>,
    timeout: Duration,
    max_retries: u32,
    backoff: Duration,
    metrics: Arc<Metrics>,
    /// Set once, at the end of a shutdown's drain time: calls still running
    /// stop waiting ([`Upstream::cut_calls`]).
    cut: tokio::sync::watch::Sender<bool>,
}

impl Upstream {
    pub(crate) fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Upstream, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(30)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("TLS setup failed: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(256)
            .build(https);
        let host = cfg
            .base_url
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| "upstream.base_url has no host".to_string())?;
        Ok(Upstream {
            client,
            base: cfg.base_url.clone(),
            host,
            key: cfg.api_key.clone(),
            timeout: cfg.timeout,
            max_retries: cfg.max_retries,
            backoff: cfg.retry_backoff,
            metrics,
            cut: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Shutdown: every call still running ends at once with 504
    /// `GatewayTimeout`, its attempt in flight (or in backoff) counted as of
    /// unknown outcome, so its possible cost is recorded (`unknown` in the
    /// ledger, spent from the quota) instead of being lost with the
    /// process. A call begun after this is refused unsent.
    pub(crate) fn cut_calls(&self) {
        self.cut.send_replace(true);
    }

    /// Sends one logical request, retrying 429/5xx/transport errors with
    /// backoff while the deadline allows. Returns upstream's last answer,
    /// whatever its status (only transport failures are errors), and how
    /// many attempts were sent with an unknown outcome: timed out, reset
    /// after sending, or whose body failed mid-read. Upstream may have
    /// billed each of those; a connection that failed before the request
    /// was sent is not counted.
    pub(crate) async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        forwarded: &ForwardedHeaders,
        workspace: Option<&str>,
        body: Bytes,
    ) -> Sent {
        self.send_via(None, method, path_and_query, forwarded, workspace, body)
            .await
    }

    /// [`send`](Upstream::send) to `base` instead of `upstream.base_url`
    /// when given (a model served in another region).
    pub(crate) async fn send_via(
        &self,
        base: Option<&Uri>,
        method: Method,
        path_and_query: &str,
        forwarded: &ForwardedHeaders,
        workspace: Option<&str>,
        body: Bytes,
    ) -> Sent {
        let mut unknown_outcomes = 0;
        let mut cut = self.cut.subscribe();
        if *cut.borrow_and_update() {
            // Shutting down and past the drain: nothing is sent any more.
            return Sent {
                result: Err(GatewayError::GatewayTimeout),
                unknown_outcomes,
            };
        }
        let attempts = self.attempts(
            base,
            method,
            path_and_query,
            forwarded,
            workspace,
            body,
            &mut unknown_outcomes,
        );
        let result = tokio::select! {
            r = attempts => Some(r),
            _ = cut.wait_for(|cut| *cut) => None,
        };
        let result = result.unwrap_or_else(|| {
            // Cut by the shutdown: the attempt under way may have been sent.
            unknown_outcomes += 1;
            Err(GatewayError::GatewayTimeout)
        });
        Sent {
            result,
            unknown_outcomes,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        base: Option<&Uri>,
        method: Method,
        path_and_query: &str,
        forwarded: &ForwardedHeaders,
        workspace: Option<&str>,
        body: Bytes,
        unknown_outcomes: &mut u32,
    ) -> Result<UpstreamResponse, GatewayError> {
        let uri = self.uri(base, path_and_query)?;
        let mut headers = self.headers(forwarded, workspace, !body.is_empty());
        if let Some(host) = base
            .and_then(|b| b.authority())
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(HOST, host);
        }
        let deadline = Instant::now() + self.timeout;
        let mut attempt = 0u32;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(GatewayError::GatewayTimeout);
            }
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .body(Full::new(body.clone()))
                .map_err(|e| GatewayError::Internal(format!("building upstream request: {e}")))?;
            *req.headers_mut() = headers.clone();
            // Each attempt its own span, and its `traceparent` upstream.
            let span = crate::telemetry::upstream_span(&method, &uri, attempt, req.headers_mut());
            let started = Instant::now();
            let outcome = tokio::time::timeout(remaining, async {
                let resp = self.client.request(req).await?;
                let (parts, body) = resp.into_parts();
                let body = read_body(body).await?;
                Ok::<_, AttemptError>(UpstreamResponse {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                })
            })
            .instrument(span.clone())
            .await;
            crate::telemetry::upstream_ended(
                &span,
                match &outcome {
                    Ok(Ok(resp)) => Ok(resp.status),
                    Ok(Err(_)) => Err("connect_error"),
                    Err(_) => Err("timeout"),
                },
            );
            self.metrics
                .upstream_duration
                .observe(started.elapsed().as_secs_f64());
            let retryable = match outcome {
                Err(_) => {
                    self.metrics
                        .upstream_responses
                        .with_label_values(&["timeout"])
                        .inc();
                    // Sent, or maybe only connecting: counted as unknown,
                    // so the exposure is never hidden.
                    *unknown_outcomes += 1;
                    return Err(GatewayError::GatewayTimeout);
                }
                Ok(Ok(resp)) => {
                    self.metrics
                        .upstream_responses
                        .with_label_values(&[resp.status.as_str()])
                        .inc();
                    if !(resp.status == StatusCode::TOO_MANY_REQUESTS
                        || resp.status.is_server_error())
                        || attempt >= self.max_retries
                    {
                        return Ok(resp);
                    }
                    Retry {
                        after: retry_after(&resp.headers),
                        last: Ok(resp),
                    }
                }
                Ok(Err(e)) => {
                    self.metrics
                        .upstream_responses
                        .with_label_values(&["connect_error"])
                        .inc();
                    if e.may_have_been_billed() {
                        *unknown_outcomes += 1;
                    }
                    let err = GatewayError::BadGateway(e.to_string());
                    if attempt >= self.max_retries {
                        return Err(err);
                    }
                    Retry {
                        after: None,
                        last: Err(err),
                    }
                }
            };
            let wait = retryable.after.unwrap_or_else(|| self.backoff_for(attempt));
            if Instant::now() + wait >= deadline {
                // No time left for another attempt: answer with what we have.
                return retryable.last;
            }
            tracing::debug!(
                attempt,
                wait_ms = wait.as_millis() as u64,
                "retrying upstream"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Exponential backoff with ±50% jitter, capped.
    fn backoff_for(&self, attempt: u32) -> Duration {
        let base = self.backoff.saturating_mul(1u32 << attempt.min(10));
        let jitter = rand::thread_rng().gen_range(0.5..1.5);
        // Fallible: a configured backoff of years must not overflow here.
        Duration::try_from_secs_f64(base.min(MAX_BACKOFF).as_secs_f64() * jitter)
            .unwrap_or(MAX_BACKOFF)
            .min(MAX_BACKOFF)
    }

    fn uri(&self, base: Option<&Uri>, path_and_query: &str) -> Result<Uri, GatewayError> {
        let mut parts = base.unwrap_or(&self.base).clone().into_parts();
        parts.path_and_query = Some(
            path_and_query
                .parse()
                .map_err(|_| GatewayError::InvalidParameter("invalid request path".into()))?,
        );
        Uri::from_parts(parts).map_err(|e| GatewayError::Internal(format!("upstream uri: {e}")))
    }

    /// The client's allow-listed headers, then the gateway's own: the
    /// company key, the tenant's workspace, the content type.
    fn headers(
        &self,
        forwarded: &ForwardedHeaders,
        workspace: Option<&str>,
        json_body: bool,
    ) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(12);
        forwarded.write_to(&mut h);
        h.insert(HOST, self.host.clone());
        if let Some(key) = &self.key {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", key.expose())) {
                let mut v = v;
                v.set_sensitive(true);
                h.insert(AUTHORIZATION, v);
            }
        }
        if let Some(ws) = workspace.and_then(|w| HeaderValue::from_str(w).ok()) {
            h.insert("x-dashscope-workspace", ws);
        }
        if json_body {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        h.insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        h
    }
}

/// One logical upstream call: its result, and the attempts whose outcome
/// is unknown (see [`Upstream::send`]).
pub(crate) struct Sent {
    pub(crate) result: Result<UpstreamResponse, GatewayError>,
    pub(crate) unknown_outcomes: u32,
}

struct Retry {
    after: Option<Duration>,
    last: Result<UpstreamResponse, GatewayError>,
}

#[derive(Debug)]
enum AttemptError {
    Client(hyper_util::client::legacy::Error),
    Body(String),
}

impl AttemptError {
    /// False only when the request never left: the connection failed.
    fn may_have_been_billed(&self) -> bool {
        match self {
            AttemptError::Client(e) => !e.is_connect(),
            AttemptError::Body(_) => true,
        }
    }
}

impl From<hyper_util::client::legacy::Error> for AttemptError {
    fn from(e: hyper_util::client::legacy::Error) -> Self {
        AttemptError::Client(e)
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Client(e) => {
                write!(f, "upstream request failed: {e}")?;
                let mut src = std::error::Error::source(e);
                while let Some(s) = src {
                    write!(f, ": {s}")?;
                    src = s.source();
                }
                Ok(())
            }
            AttemptError::Body(e) => write!(f, "reading upstream body failed: {e}"),
        }
    }
}

/// Upstream's body, up to [`MAX_UPSTREAM_BODY`], in one buffer of exactly
/// its size: a success's vector is cached as a slice of it, which must not
/// keep a larger buffer (hyper's read buffer, a doubled `Vec`) alive.
async fn read_body(mut body: hyper::body::Incoming) -> Result<Bytes, AttemptError> {
    let hint = usize::try_from(body.size_hint().lower()).unwrap_or(MAX_UPSTREAM_BODY);
    let mut buf = BytesMut::with_capacity(hint.min(MAX_UPSTREAM_BODY));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| AttemptError::Body(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > MAX_UPSTREAM_BODY {
                return Err(AttemptError::Body("length limit exceeded".into()));
            }
            buf.extend_from_slice(data);
        }
    }
    if buf.capacity() == buf.len() {
        Ok(buf.freeze())
    } else {
        // No length, or a wrong one: never more than the body is kept.
        Ok(Bytes::copy_from_slice(&buf))
    }
}

/// Upstream's `retry-after-ms` / `retry-after` (seconds), capped. A value
/// that is not a finite number (`NaN`, `inf`, garbage) is ignored.
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite())
    };
    let secs = number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number("retry-after"))?;
    Some(Duration::from_secs_f64(
        secs.clamp(0.0, MAX_BACKOFF.as_secs_f64()),
    ))
}

/// Turns a non-200 upstream answer into the error the client sees:
/// upstream's own status, code and message when it gave them.
pub(crate) fn upstream_error(resp: &UpstreamResponse) -> GatewayError {
    #[derive(serde::Deserialize)]
    struct ErrBody {
        code: Option<String>,
        message: Option<String>,
        msg: Option<String>,
        request_id: Option<String>,
    }
    match serde_json::from_slice::<ErrBody>(&resp.body) {
        Ok(b) if b.code.is_some() || b.message.is_some() || b.msg.is_some() => {
            GatewayError::Upstream {
                status: resp.status,
                code: b
                    .code
                    .unwrap_or_else(|| default_code(resp.status).to_string()),
                message: b.message.or(b.msg).unwrap_or_default(),
                request_id: b.request_id,
            }
        }
        _ if resp.status.is_server_error() => GatewayError::BadGateway(format!(
            "upstream answered HTTP {} without a DashScope error body",
            resp.status
        )),
        _ => GatewayError::Upstream {
            status: resp.status,
            code: default_code(resp.status).to_string(),
            message: format!(
                "upstream answered HTTP {} without a DashScope error body",
                resp.status.as_u16()
            ),
            request_id: None,
        },
    }
}

fn default_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "InvalidParameter",
        401 => "InvalidApiKey",
        403 => "AccessDenied",
        404 => "NotFound",
        408 => "RequestTimeOut",
        413 => "BadRequest.TooLarge",
        429 => "Throttling",
        503 => "ServiceUnavailable",
        504 => "GatewayTimeout",
        _ => "InternalError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_passthrough_keeps_upstream_fields() {
        let r = UpstreamResponse {
            status: StatusCode::BAD_REQUEST,
            headers: HeaderMap::new(),
            body: Bytes::from_static(
                br#"{"code":"InvalidURL","message":"Invalid URL provided in your request.","request_id":"up-9"}"#,
            ),
        };
        let e = upstream_error(&r);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.code(), "InvalidURL");
        assert_eq!(e.message(), "Invalid URL provided in your request.");
        let html = UpstreamResponse {
            status: StatusCode::BAD_GATEWAY,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"<html>bad</html>"),
        };
        assert_eq!(upstream_error(&html).status(), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn retry_after_is_capped() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(8)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        for junk in ["NaN", "inf", "-inf", "1e999", "soon"] {
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from_static(junk));
            assert_eq!(retry_after(&h), None, "{junk}");
        }
    }
}
