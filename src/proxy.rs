//! The embedding request path, in the order a request meets it:
//!
//! 1. **auth**: the tenant from the key digest (401 otherwise);
//! 2. **load shedding**: a permit from the in-flight bound (503 otherwise);
//! 3. **rate limit**: one token from the tenant's rate (429);
//! 4. **body and parse**: size limit (413), typed request (400);
//! 5. **cache key and lookup**: a hit is answered here;
//! 6. **coalescing**: an identical miss in flight answers followers;
//! 7. **quota**: the request's units reserved before upstream (429);
//! 8. **upstream**: with retries; only a real success is accepted;
//! 9. **metering**: counters and ledger for every successful answer.
//!
//! The upstream part (7–9) runs in its own task: a client that hangs up
//! does not cancel a call the company pays for, so it is still cached and
//! metered.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::OwnedSemaphorePermit;

use crate::app::App;
use crate::cache::{valid_embedding, Lookup};
use crate::cache_key::{cache_key, CacheKey, KeyScope};
use crate::coalesce::{self, Outcome, Role};
use crate::config::{CacheScope, Weights};
use crate::error::{Fault, GatewayError};
use crate::ledger::CacheStatus;
use crate::limits::RateState;
use crate::metrics::NO_TENANT;
use crate::request::{Counts, EmbeddingRequest, Modality, ParseRules};
use crate::tenants::Tenant;
use crate::upstream::{upstream_error, EMBEDDING_PATH, UPLOADS_PATH};

pub type Body = Full<Bytes>;

/// How many times a follower whose leader failed tries again before it
/// calls upstream on its own.
const MAX_FOLLOW_ATTEMPTS: usize = 3;

/// What the request path learned, for headers, metrics and the access log.
#[derive(Default)]
struct Ctx {
    tenant: Option<Arc<Tenant>>,
    cache: Option<CacheStatus>,
    rate: Option<RateState>,
    quota_remaining: Option<u64>,
}

/// A successful answer's body and id.
struct Answer {
    body: Bytes,
    request_id: String,
}

pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// True when the client asked for DashScope's SSE framing.
fn wants_sse(h: &HeaderMap) -> bool {
    h.get("x-dashscope-sse")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("enable"))
        || h.get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"))
}

struct CacheControl {
    no_cache: bool,
    no_store: bool,
}

fn cache_control(h: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl {
        no_cache: false,
        no_store: false,
    };
    for v in h.get_all(http::header::CACHE_CONTROL) {
        for d in v.to_str().unwrap_or("").split(',') {
            let d = d.trim();
            if d.eq_ignore_ascii_case("no-cache") {
                cc.no_cache = true;
            } else if d.eq_ignore_ascii_case("no-store") {
                cc.no_store = true;
            }
        }
    }
    cc
}

/// `POST /api/v1/services/embeddings/multimodal-embedding/multimodal-embedding`.
pub async fn embeddings(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let request_id = new_request_id();
    let sse = wants_sse(req.headers());
    let mut ctx = Ctx::default();
    let result = serve_embedding(app, req, &request_id, &mut ctx).await;
    let response = match result {
        Ok(answer) => success_response(answer, sse),
        Err(e) => error_response(&e, &request_id, sse),
    };
    finish(app, ctx, response, started, "embeddings")
}

/// `GET /api/v1/uploads?action=getPolicy&model=…`: the SDK's upload
/// certificate, fetched with the company key (the `oss://` URL it yields
/// then resolves for the same account). Not cached, not metered.
pub async fn uploads(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let request_id = new_request_id();
    let mut ctx = Ctx::default();
    let result = async {
        let tenant = authenticate(app, req.headers(), &mut ctx)?;
        let _permit = app
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| GatewayError::Overloaded)?;
        check_rate(app, &tenant, &mut ctx).await?;
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| UPLOADS_PATH.to_string());
        let resp = app
            .upstream
            .send(
                Method::GET,
                &pq,
                req.headers(),
                tenant.workspace.as_deref(),
                Bytes::new(),
            )
            .await?;
        if resp.status != StatusCode::OK {
            return Err(upstream_error(&resp));
        }
        Ok(resp)
    }
    .await;
    let response = match result {
        Ok(resp) => {
            let ct = resp
                .headers
                .get(CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/json"));
            let mut r = Response::new(Full::new(resp.body));
            r.headers_mut().insert(CONTENT_TYPE, ct);
            r
        }
        Err(e) => error_response(&e, &request_id, false),
    };
    finish(app, ctx, response, started, "uploads")
}

/// Takes a token from the tenant's rate; a refusal still reports the rate
/// state (none left, full again after `Retry-After`) in the headers.
async fn check_rate(app: &App, tenant: &Tenant, ctx: &mut Ctx) -> Result<(), GatewayError> {
    match app.limits.check_rate(tenant).await {
        Ok(state) => {
            ctx.rate = state;
            Ok(())
        }
        Err(GatewayError::RateLimited { retry_after }) => {
            ctx.rate = tenant.rate.map(|cfg| RateState {
                limit: cfg.burst,
                remaining: 0,
                reset: retry_after,
            });
            Err(GatewayError::RateLimited { retry_after })
        }
        Err(e) => Err(e),
    }
}

fn authenticate(app: &App, h: &HeaderMap, ctx: &mut Ctx) -> Result<Arc<Tenant>, GatewayError> {
    let tenant = app
        .tenants
        .load()
        .authenticate(h)
        .ok_or(GatewayError::InvalidApiKey)?;
    ctx.tenant = Some(tenant.clone());
    Ok(tenant)
}

async fn serve_embedding(
    app: &Arc<App>,
    req: Request<Incoming>,
    request_id: &str,
    ctx: &mut Ctx,
) -> Result<Answer, GatewayError> {
    // 1. auth
    let tenant = authenticate(app, req.headers(), ctx)?;
    // 2. load shedding
    let permit = app
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| GatewayError::Overloaded)?;
    // 3. rate limit
    check_rate(app, &tenant, ctx).await?;
    ctx.quota_remaining = app.limits.remaining(&tenant);

    // 4. body and parse
    let limit = app.config.server.max_body_bytes;
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(GatewayError::BodyTooLarge { limit });
        }
    }
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                GatewayError::BodyTooLarge { limit }
            } else {
                GatewayError::InvalidParameter(format!("could not read the request body: {e}"))
            }
        })?
        .to_bytes();
    let parsed = EmbeddingRequest::parse(
        &body,
        &ParseRules {
            models: &app.config.upstream.models,
            max_text_chars: app.config.upstream.max_text_chars,
        },
    )?;

    // 5. cache key and lookup
    let scope = match app.config.cache.scope {
        CacheScope::Tenant => KeyScope::Tenant(&tenant.name),
        CacheScope::Shared => KeyScope::Shared,
    };
    let key = cache_key(scope, tenant.workspace.as_deref(), &parsed);
    let counts = parsed.counts();
    let weights = app.config.metering.weights;
    let dimension = parsed.expected_dimension(app.config.upstream.embedding_dimension);
    let cc = cache_control(&parts.headers);

    let mut follow_attempts = 0;
    loop {
        if !cc.no_cache {
            if let Lookup::Hit(embedding) = app.cache.get(&key, dimension).await {
                return answer_hit(app, &tenant, embedding, &counts, request_id, ctx).await;
            }
        }
        // 6. coalescing
        let guard = if cc.no_cache || follow_attempts >= MAX_FOLLOW_ATTEMPTS {
            None
        } else {
            match app.coalescer.join(key) {
                Role::Leader(g) => {
                    if let Some(embedding) = app.cache.recheck(&key, dimension).await {
                        g.finish(Outcome::Done(embedding.clone()));
                        return answer_hit(app, &tenant, embedding, &counts, request_id, ctx).await;
                    }
                    Some(g)
                }
                Role::Follower(rx) => match coalesce::wait(rx).await {
                    Outcome::Done(embedding) => {
                        app.metrics.coalesced.inc();
                        return answer_hit(app, &tenant, embedding, &counts, request_id, ctx).await;
                    }
                    // Upstream's answer to this very input, made for the
                    // leader: reported like the leader's, as a miss.
                    Outcome::Failed(e) => {
                        ctx.cache = Some(CacheStatus::Miss);
                        return Err(e);
                    }
                    Outcome::Retry => {
                        follow_attempts += 1;
                        continue;
                    }
                },
            }
        };
        // 7–9 in their own task.
        ctx.cache = Some(CacheStatus::Miss);
        let miss = Miss {
            app: app.clone(),
            tenant: tenant.clone(),
            key,
            counts,
            units: counts.units(&weights),
            dimension,
            no_store: cc.no_store,
            headers: parts.headers.clone(),
            body: parsed.upstream_body(),
            guard,
            _permit: permit,
        };
        let result = match tokio::spawn(miss.run()).await {
            Ok((result, remaining)) => {
                if remaining.is_some() {
                    ctx.quota_remaining = remaining;
                }
                result
            }
            Err(e) => Err(GatewayError::Internal(format!("upstream task failed: {e}"))),
        };
        // X-Cache: MISS means an upstream call was made; a refusal before
        // it (quota, quota store) carries no X-Cache.
        if let Err(e) = &result {
            if e.fault() != Fault::Upstream {
                ctx.cache = None;
            }
        }
        return result;
    }
}

async fn answer_hit(
    app: &Arc<App>,
    tenant: &Arc<Tenant>,
    embedding: Bytes,
    counts: &Counts,
    request_id: &str,
    ctx: &mut Ctx,
) -> Result<Answer, GatewayError> {
    let weights = app.config.metering.weights;
    if app.config.limits.quota_counts_hits {
        if let Some(r) = app.limits.reserve(tenant, counts.units(&weights)).await? {
            ctx.quota_remaining = Some(r.remaining);
            let units = counts.units(&weights);
            app.limits.settle(r, units).await;
        }
    }
    ctx.cache = Some(CacheStatus::Hit);
    let units = units_per_modality(counts, &weights);
    meter(app, &tenant.name, CacheStatus::Hit, counts, &units);
    let usage = counts.usage_json(&weights);
    let mut body = Vec::with_capacity(embedding.len() + usage.len() + request_id.len() + 64);
    body.extend_from_slice(b"{\"output\":{\"embedding\":");
    body.extend_from_slice(&embedding);
    body.extend_from_slice(b"},\"usage\":");
    body.extend_from_slice(usage.as_bytes());
    body.extend_from_slice(b",\"request_id\":\"");
    body.extend_from_slice(request_id.as_bytes());
    body.extend_from_slice(b"\"}");
    Ok(Answer {
        body: Bytes::from(body),
        request_id: request_id.to_string(),
    })
}

fn units_per_modality(counts: &Counts, w: &Weights) -> Counts {
    let mut u = Counts::default();
    for m in Modality::ALL {
        u.set(m, counts.get(m) * m.weight(w));
    }
    u
}

/// Counters and ledger for one successful answer.
fn meter(app: &App, tenant: &Arc<str>, cache: CacheStatus, items: &Counts, units: &Counts) {
    for m in Modality::ALL {
        let n = items.get(m);
        if n == 0 {
            continue;
        }
        let labels = [&**tenant, m.as_str(), cache.as_str()];
        app.metrics.items.with_label_values(&labels).inc_by(n);
        app.metrics
            .usage_units
            .with_label_values(&labels)
            .inc_by(units.get(m));
    }
    app.ledger.record(tenant, cache, items, units);
}

/// The upstream half of a miss; owns everything it needs so it can outlive
/// the client's connection.
struct Miss {
    app: Arc<App>,
    tenant: Arc<Tenant>,
    key: CacheKey,
    counts: Counts,
    units: u64,
    dimension: usize,
    no_store: bool,
    headers: HeaderMap,
    body: Bytes,
    guard: Option<coalesce::LeaderGuard>,
    /// Keeps this work counted as in flight until it is done (shutdown waits).
    _permit: OwnedSemaphorePermit,
}

impl Miss {
    async fn run(mut self) -> (Result<Answer, GatewayError>, Option<u64>) {
        // 7. quota
        let reservation = match self.app.limits.reserve(&self.tenant, self.units).await {
            Ok(r) => r,
            // Dropping the guard tells followers to try on their own.
            Err(e) => return (Err(e), None),
        };
        let mut remaining = reservation.as_ref().map(|r| r.remaining);
        // 8. upstream
        let result = self.call_upstream().await;
        match result {
            Ok(success) => {
                // Stored before the followers are released, so a request
                // that looks the key up after this sees the entry.
                if !self.no_store {
                    self.app
                        .cache
                        .store(self.key, success.embedding.clone())
                        .await;
                }
                if let Some(g) = self.guard.take() {
                    g.finish(Outcome::Done(success.embedding.clone()));
                }
                // 9. metering: upstream's usage block is the record.
                let weights = self.app.config.metering.weights;
                let expected_units = units_per_modality(&self.counts, &weights);
                let (items, units) = match success.usage {
                    Some(u) => u,
                    None => (self.counts, expected_units),
                };
                if success.usage.is_none() || items != self.counts || units != expected_units {
                    self.app
                        .metrics
                        .usage_mismatch
                        .with_label_values(&[&self.tenant.name])
                        .inc();
                    tracing::warn!(
                        tenant = %self.tenant.name,
                        expected_units = self.units,
                        upstream_units = units.total(),
                        upstream_usage = success.usage.is_some(),
                        "upstream usage disagrees with the gateway's computation; upstream's is recorded"
                    );
                }
                if let Some(r) = reservation {
                    let billed = units.total();
                    remaining = Some(
                        r.remaining
                            .saturating_sub(billed.saturating_sub(self.units)),
                    );
                    self.app.limits.settle(r, billed).await;
                }
                meter(
                    &self.app,
                    &self.tenant.name,
                    CacheStatus::Miss,
                    &items,
                    &units,
                );
                (
                    Ok(Answer {
                        body: success.body,
                        request_id: success.request_id,
                    }),
                    remaining,
                )
            }
            Err(e) => {
                if let Some(r) = reservation {
                    remaining = Some(r.remaining + self.units);
                    self.app.limits.release(r).await;
                }
                if e.fault() == Fault::Upstream {
                    if let Some(g) = self.guard.take() {
                        g.finish(Outcome::Failed(e.clone()));
                    }
                }
                (Err(e), remaining)
            }
        }
    }

    async fn call_upstream(&self) -> Result<Success, GatewayError> {
        let resp = self
            .app
            .upstream
            .send(
                Method::POST,
                EMBEDDING_PATH,
                &self.headers,
                self.tenant.workspace.as_deref(),
                self.body.clone(),
            )
            .await?;
        if resp.status != StatusCode::OK {
            return Err(upstream_error(&resp));
        }
        parse_success(resp.body, self.dimension)
    }
}

struct Success {
    /// Upstream's body, passed to the client as is.
    body: Bytes,
    embedding: Bytes,
    request_id: String,
    /// (items, units) per modality from upstream's `usage`.
    usage: Option<(Counts, Counts)>,
}

/// Accepts only a real success: no `code`, a numeric `output.embedding` of
/// the expected length.
fn parse_success(body: Bytes, dimension: usize) -> Result<Success, GatewayError> {
    #[derive(Deserialize)]
    struct Up<'a> {
        #[serde(borrow)]
        output: Option<UpOutput<'a>>,
        usage: Option<serde_json::Value>,
        request_id: Option<String>,
        code: Option<serde_json::Value>,
        message: Option<String>,
    }
    #[derive(Deserialize)]
    struct UpOutput<'a> {
        #[serde(borrow)]
        embedding: Option<&'a RawValue>,
    }
    let up: Up<'_> = serde_json::from_slice(&body)
        .map_err(|e| GatewayError::BadGateway(format!("upstream 200 is not JSON: {e}")))?;
    let code = match &up.code {
        Some(serde_json::Value::String(c)) if !c.is_empty() => Some(c.clone()),
        Some(serde_json::Value::Null) | None => None,
        Some(serde_json::Value::String(_)) => None,
        Some(other) => Some(other.to_string()),
    };
    if let Some(code) = code {
        return Err(GatewayError::Upstream {
            status: StatusCode::BAD_GATEWAY,
            code,
            message: up.message.unwrap_or_default(),
            request_id: up.request_id,
        });
    }
    let Some(raw) = up.output.and_then(|o| o.embedding) else {
        return Err(GatewayError::BadGateway(
            "upstream 200 without output.embedding".into(),
        ));
    };
    if !valid_embedding(raw.get().as_bytes(), dimension) {
        return Err(GatewayError::BadGateway(format!(
            "upstream 200 whose output.embedding is not {dimension} numbers"
        )));
    }
    let embedding = Bytes::copy_from_slice(raw.get().as_bytes());
    let usage = up.usage.as_ref().and_then(parse_usage);
    let request_id = up.request_id.unwrap_or_else(new_request_id);
    Ok(Success {
        body,
        embedding,
        request_id,
        usage,
    })
}

/// Upstream's `usage`: `{"text":{"measure":1,"weight":1},…}`.
fn parse_usage(v: &serde_json::Value) -> Option<(Counts, Counts)> {
    let obj = v.as_object()?;
    let mut items = Counts::default();
    let mut units = Counts::default();
    for m in Modality::ALL {
        if let Some(entry) = obj.get(m.as_str()) {
            let measure = entry.get("measure")?.as_u64()?;
            let weight = entry.get("weight")?.as_u64()?;
            items.set(m, measure);
            units.set(m, measure * weight);
        }
    }
    (!items.is_empty()).then_some((items, units))
}

fn success_response(a: Answer, sse: bool) -> Response<Body> {
    let rid = HeaderValue::from_str(&a.request_id).ok();
    let mut r = if sse {
        sse_response(StatusCode::OK, "result", &a.body)
    } else {
        let mut r = Response::new(Full::new(a.body));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    if let Some(rid) = rid {
        r.headers_mut().insert("x-request-id", rid);
    }
    r
}

/// DashScope's SSE framing: one event carrying the whole JSON answer.
fn sse_response(status: StatusCode, event: &str, json: &[u8]) -> Response<Body> {
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
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream;charset=UTF-8"),
    );
    r
}

pub fn error_response(e: &GatewayError, request_id: &str, sse: bool) -> Response<Body> {
    let body = e.body(request_id);
    let mut r = if sse {
        sse_response(e.status(), "error", &body)
    } else {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = e.status();
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    for (k, v) in e.extra_headers() {
        r.headers_mut().insert(k, v);
    }
    r.extensions_mut().insert(MetricCode(e.metric_code()));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("x-request-id", v);
    }
    match e.fault() {
        Fault::Gateway => tracing::error!(request_id, error = %e, "gateway error"),
        Fault::Upstream => tracing::warn!(request_id, error = %e, "upstream error"),
        Fault::Client => {}
    }
    r
}

/// Adds the cache, rate and quota headers, records the request metrics and
/// writes the access log line.
fn finish(
    app: &App,
    ctx: Ctx,
    mut r: Response<Body>,
    started: Instant,
    route: &'static str,
) -> Response<Body> {
    let h = r.headers_mut();
    if let Some(c) = ctx.cache {
        h.insert(
            "x-cache",
            HeaderValue::from_static(match c {
                CacheStatus::Hit => "HIT",
                CacheStatus::Miss => "MISS",
            }),
        );
    }
    if let Some(rate) = ctx.rate {
        h.insert("ratelimit-limit", HeaderValue::from(rate.limit));
        h.insert("ratelimit-remaining", HeaderValue::from(rate.remaining));
        h.insert(
            "ratelimit-reset",
            HeaderValue::from(rate.reset.as_secs() + u64::from(rate.reset.subsec_nanos() > 0)),
        );
    }
    if let Some(q) = ctx.quota_remaining {
        h.insert("x-quota-remaining", HeaderValue::from(q));
    }
    let status = r.status();
    let code = if status == StatusCode::OK {
        "ok".to_string()
    } else {
        error_code_of(&r)
    };
    let tenant = ctx.tenant.as_ref().map(|t| &*t.name).unwrap_or(NO_TENANT);
    let cache = ctx.cache.map(|c| c.as_str()).unwrap_or("none");
    app.metrics
        .requests
        .with_label_values(&[tenant, cache, &code])
        .inc();
    let elapsed = started.elapsed();
    app.metrics
        .request_duration
        .with_label_values(&[cache])
        .observe(elapsed.as_secs_f64());
    tracing::info!(
        target: "embedgate::access",
        route,
        tenant,
        cache,
        status = status.as_u16(),
        code = %code,
        duration_us = elapsed.as_micros() as u64,
        "request"
    );
    r
}

/// The metric label for an error response: carried in an extension set by
/// [`error_response`], else derived from the status.
fn error_code_of(r: &Response<Body>) -> String {
    r.extensions()
        .get::<MetricCode>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| format!("http_{}", r.status().as_u16()))
}

/// The closed-set metric code of an error response.
#[derive(Clone, Copy)]
pub struct MetricCode(pub &'static str);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn success_requires_a_real_embedding() {
        let ok = Bytes::from_static(
            br#"{"output":{"embedding":[0.5,1,2]},"usage":{"text":{"measure":1,"weight":1},"audio":{"measure":2,"weight":2},"total_usage":5},"request_id":"r1"}"#,
        );
        let s = parse_success(ok, 3).unwrap_or_else(unreachable_err);
        assert_eq!(&s.embedding[..], b"[0.5,1,2]");
        assert_eq!(s.request_id, "r1");
        let (items, units) = s.usage.unwrap();
        assert_eq!(items.get(Modality::Audio), 2);
        assert_eq!(units.get(Modality::Audio), 4);

        let coded = Bytes::from_static(
            br#"{"code":"InvalidParameter","message":"bad","request_id":"r2","output":{"embedding":[1,2,3]}}"#,
        );
        assert!(
            matches!(parse_success(coded, 3), Err(GatewayError::Upstream { code, .. }) if code == "InvalidParameter")
        );
        let short = Bytes::from_static(br#"{"output":{"embedding":[1,2]}}"#);
        assert!(matches!(
            parse_success(short, 3),
            Err(GatewayError::BadGateway(_))
        ));
        let strings = Bytes::from_static(br#"{"output":{"embedding":["1","2","3"]}}"#);
        assert!(matches!(
            parse_success(strings, 3),
            Err(GatewayError::BadGateway(_))
        ));
        let none = Bytes::from_static(br#"{"output":{}}"#);
        assert!(matches!(
            parse_success(none, 3),
            Err(GatewayError::BadGateway(_))
        ));
    }

    fn unreachable_err(e: GatewayError) -> Success {
        panic_free_fail(&e.to_string())
    }

    #[allow(clippy::panic)]
    fn panic_free_fail(msg: &str) -> Success {
        panic!("{msg}")
    }

    #[test]
    fn sse_framing() {
        let r = sse_response(StatusCode::OK, "result", b"{\"a\":\n1}");
        assert_eq!(r.headers()[CONTENT_TYPE], "text/event-stream;charset=UTF-8");
    }

    #[test]
    fn cache_control_directives() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        let cc = cache_control(&h);
        assert!(cc.no_cache && !cc.no_store);
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        let cc = cache_control(&h);
        assert!(!cc.no_cache && cc.no_store);
    }
}
