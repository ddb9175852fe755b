//! The embedding service: what happens to an authenticated, admitted
//! request on `POST …/multimodal-embedding`, in the order it happens:
//!
//! 1. **headers, body and parse**: the allow-listed headers to forward
//!    ([`ForwardedHeaders`]; 400 naming one too long or repeated), the body
//!    read under the stack's size limit (413) and read timeout (408),
//!    parsed into a typed request (400 naming the field);
//! 2. **cache key and lookup**: the body and the forwarded headers that
//!    change the answer; a hit is answered here, with the gateway's own
//!    [`Usage`];
//! 3. **coalescing**: an identical miss in flight answers followers;
//! 4. **quota**: the request's units reserved before upstream (429);
//! 5. **upstream**: with retries; only a real success is accepted;
//! 6. **metering**: upstream's usage is the record, into the metrics and
//!    the ledger's journal, before the answer is sent.
//!
//! 4–6 run in their own task: a client that hangs up does not cancel a
//! call the company pays for, so it is still cached and metered.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::app::App;
use crate::auth::tenant_of;
use crate::body::{Body, ReqBody};
use crate::cache::Found;
use crate::cache_key::{CacheKey, KeyScope};
use crate::coalesce::{self, Outcome, Role};
use crate::config::CacheScope;
use crate::config::{ModelApi, Vectors};
use crate::error::{Fault, GatewayError};
use crate::family::{self, Api};
use crate::fault;
use crate::forwarded::ForwardedHeaders;
use crate::metering::{self, CacheStatus, ModelName, Reconciled, Usage};
use crate::parse_memo::Parsed;
use crate::request::{EmbeddingRequest, ParseRules};
use crate::request_id;
use crate::response::{self, Framing};
use crate::telemetry::TARGET;
use crate::tenants::Tenant;
use crate::upstream::{parse_success, upstream_error, Success, EMBEDDING_PATH};

/// How many times a follower whose leader failed tries again before it
/// calls upstream on its own.
const MAX_FOLLOW_ATTEMPTS: usize = 3;

/// What the request path learned, for the response headers.
#[derive(Default)]
struct Seen {
    cache: Option<CacheStatus>,
    model: Option<Arc<str>>,
    quota_remaining: Option<u64>,
    /// The client takes gzip (and not SSE): a hit answers it from the
    /// entry's gzip form.
    gzip_ok: bool,
}

/// A successful answer's body and id.
struct Answer {
    body: AnswerBody,
    request_id: String,
    /// `body` is gzip.
    gzip: bool,
}

enum AnswerBody {
    Whole(Bytes),
    /// A hit: the entry's vector between its prefix and suffix.
    Hit(crate::body::Chunks),
}

/// The embedding endpoint (the innermost service of its route).
pub(crate) async fn serve(
    app: Arc<App>,
    req: Request<ReqBody>,
) -> Result<Response<Body>, Infallible> {
    let request_id = request_id::of(&req);
    let sse = Framing::SseIfAsked.sse(req.headers());
    let mut seen = Seen {
        gzip_ok: !sse && crate::gzip::accepted(req.headers()),
        ..Seen::default()
    };
    let result = match tenant_of(&req) {
        Ok(tenant) => {
            seen.quota_remaining = tenant.quota.map(|q| app.limits.remaining(&tenant.name, q));
            match read_request(&app, req).await {
                Err(e) => Err(e),
                Ok((parts, forwarded, body)) => {
                    // 1. parse. A request the ONE-PEACE parser takes names
                    // a model of ONE-PEACE's kind; every other multimodal
                    // model goes the family's way.
                    let parsed = app.parse_memo.get_or_parse(&body, |b| {
                        EmbeddingRequest::parse(b, &ParseRules::of(&app.config.upstream))
                    });
                    let family_model = parsed.is_err()
                        && family::peek_model(&body)
                            .filter(|m| !app.config.upstream.models.contains(m))
                            .and_then(|m| app.config.models.get(&m))
                            .is_some_and(|s| {
                                s.api == ModelApi::Multimodal && s.vectors != Vectors::Weighted
                            });
                    if family_model {
                        return Ok(family::respond(
                            &app,
                            tenant,
                            &parts.headers,
                            forwarded,
                            body,
                            Api::Multimodal,
                            &request_id,
                            sse,
                        )
                        .await);
                    }
                    // What is kept from here on is the parsed request.
                    drop(body);
                    match parsed {
                        Ok(parsed) => {
                            answer(
                                &app,
                                tenant,
                                parts,
                                forwarded,
                                parsed,
                                &request_id,
                                &mut seen,
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        }
        Err(e) => Err(e),
    };
    let mut r = match result {
        Ok(a) => {
            let mut r = match a.body {
                AnswerBody::Whole(b) => response::success(b, &a.request_id, sse),
                AnswerBody::Hit(c) => response::success_chunks(c, &a.request_id, sse),
            };
            if a.gzip {
                r.headers_mut().insert(
                    http::header::CONTENT_ENCODING,
                    http::HeaderValue::from_static("gzip"),
                );
            }
            r.headers_mut().insert(
                http::header::VARY,
                http::HeaderValue::from_static("accept-encoding"),
            );
            r
        }
        Err(e) => e.into_response(&request_id, sse),
    };
    if let Some(c) = seen.cache {
        response::set_cache_header(r.headers_mut(), c);
        r.extensions_mut().insert(c);
    }
    if let Some(q) = seen.quota_remaining {
        response::set_quota_header(r.headers_mut(), q);
    }
    if let Some(m) = seen.model {
        r.extensions_mut().insert(ModelName(m));
    }
    Ok(r)
}

pub(crate) struct CacheControl {
    pub(crate) no_cache: bool,
    pub(crate) no_store: bool,
}

pub(crate) fn cache_control(h: &HeaderMap) -> CacheControl {
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

/// 1. Reads the body into one buffer sized from its length, so a large
///    body is never held twice; the stack's size limit and read deadline
///    show up as the body's errors.
pub(crate) async fn read_body(mut body: ReqBody, limit: usize) -> Result<Bytes, GatewayError> {
    let hint = usize::try_from(body.size_hint().lower()).unwrap_or(limit);
    let mut buf = BytesMut::with_capacity(hint.min(limit));
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    buf.extend_from_slice(d);
                }
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(GatewayError::BodyTooLarge { limit })
            }
            Err(e) if e.is::<crate::body_deadline::BodyTimeout>() => {
                return Err(GatewayError::RequestTimeout)
            }
            Err(e) => {
                return Err(GatewayError::InvalidParameter(format!(
                    "could not read the request body: {e}"
                )))
            }
        }
    }
    Ok(buf.freeze())
}

/// 1. The forwarded headers (400 naming one too long or repeated) and the
///    body, read under the stack's limits.
pub(crate) async fn read_request(
    app: &App,
    req: Request<ReqBody>,
) -> Result<(http::request::Parts, ForwardedHeaders, Bytes), GatewayError> {
    let (parts, body) = req.into_parts();
    let forwarded = ForwardedHeaders::from_client(&parts.headers)?;
    let body = read_body(body, app.config.server.max_body_bytes).await?;
    Ok((parts, forwarded, body))
}

async fn answer(
    app: &Arc<App>,
    tenant: Arc<Tenant>,
    parts: http::request::Parts,
    forwarded: ForwardedHeaders,
    memo: Arc<Parsed>,
    request_id: &str,
    seen: &mut Seen,
) -> Result<Answer, GatewayError> {
    let parsed = &memo.request;
    let model = memo.model.clone();
    seen.model = Some(model.clone());
    if !tenant.may_use(&parsed.model) {
        return Err(GatewayError::ModelNotAllowed(parsed.model.clone()));
    }

    // 2. cache key and lookup
    let scope = match app.config.cache.scope {
        CacheScope::Tenant => KeyScope::Tenant(&tenant.name),
        CacheScope::Shared => KeyScope::Shared,
    };
    let key = memo
        .key_fields
        .key(scope, tenant.workspace.as_deref(), &forwarded);
    let usage = Usage::of(parsed.counts(), &app.config.metering.weights);
    let dimension = parsed.expected_dimension(app.config.upstream.embedding_dimension);
    let cc = cache_control(&parts.headers);

    let mut follow_attempts = 0;
    loop {
        if !cc.no_cache {
            let lookup = tracing::debug_span!(target: TARGET, "cache.lookup");
            if let Some(found) = app
                .cache
                .get_found(&key, dimension, seen.gzip_ok)
                .instrument(lookup)
                .await
            {
                let (embedding, gz) = match found {
                    // The gzip answer is sent as it is: no text needed.
                    Found::Gzip(p) => (
                        Bytes::new(),
                        Some(response::hit_gzip(&p, &usage, request_id)),
                    ),
                    Found::Text(text) => (text, None),
                };
                return answer_hit(app, &tenant, &model, embedding, gz, usage, request_id, seen)
                    .await;
            }
        }
        // 3. coalescing
        let guard = if cc.no_cache || follow_attempts >= MAX_FOLLOW_ATTEMPTS {
            None
        } else {
            match app.coalescer.join(key) {
                Role::Leader(g) => {
                    let lookup = tracing::debug_span!(target: TARGET, "cache.lookup");
                    if let Some(embedding) =
                        app.cache.recheck(&key, dimension).instrument(lookup).await
                    {
                        g.finish(Outcome::Done(embedding.clone()));
                        return answer_hit(
                            app, &tenant, &model, embedding, None, usage, request_id, seen,
                        )
                        .await;
                    }
                    Some(g)
                }
                Role::Follower(rx) => match coalesce::wait(rx)
                    .instrument(tracing::debug_span!(target: TARGET, "coalesce.wait"))
                    .await
                {
                    Outcome::Done(embedding) => {
                        app.metrics.coalesced.inc();
                        return answer_hit(
                            app, &tenant, &model, embedding, None, usage, request_id, seen,
                        )
                        .await;
                    }
                    // Upstream's answer to this very input, made for the
                    // leader: reported like the leader's, as a miss.
                    Outcome::Failed(e) => {
                        seen.cache = Some(CacheStatus::Miss);
                        return Err(e);
                    }
                    Outcome::Retry => {
                        follow_attempts += 1;
                        continue;
                    }
                },
            }
        };
        let body = parsed.upstream_body()?;
        // 4–6 in their own task, which holds an upstream slot so shutdown
        // waits for it and hung-up clients cannot pile up detached calls.
        let slot = app
            .upstream_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| GatewayError::Overloaded)?;
        seen.cache = Some(CacheStatus::Miss);
        let miss = Miss {
            app: app.clone(),
            tenant: tenant.clone(),
            model: model.clone(),
            key,
            usage,
            dimension,
            no_store: cc.no_store,
            forwarded: forwarded.clone(),
            body,
            panic_after_reserve: fault::wanted(parsed),
            guard,
            _slot: slot,
        };
        // In the request's span: its phases are the request's children.
        let result = match tokio::spawn(miss.run().in_current_span()).await {
            Ok((result, remaining)) => {
                if remaining.is_some() {
                    seen.quota_remaining = remaining;
                }
                result
            }
            Err(e) => Err(GatewayError::Internal(format!("upstream task failed: {e}"))),
        };
        // X-Cache: MISS means an upstream call was made; a refusal before
        // it (quota, quota store) carries no X-Cache.
        if let Err(e) = &result {
            if e.fault() != Fault::Upstream {
                seen.cache = None;
            }
        }
        return result;
    }
}

/// 2. A hit: the cached vector with the gateway's own usage.
#[allow(clippy::too_many_arguments)]
async fn answer_hit(
    app: &Arc<App>,
    tenant: &Arc<Tenant>,
    model: &str,
    embedding: Bytes,
    gzip: Option<Bytes>,
    usage: Usage,
    request_id: &str,
    seen: &mut Seen,
) -> Result<Answer, GatewayError> {
    if app.config.limits.quota_counts_hits {
        if let Some(q) = tenant.quota {
            let r = app.limits.reserve(&tenant.name, q, usage.total()).await?;
            seen.quota_remaining = Some(r.remaining);
            app.limits.settle(r, usage.total()).await;
        }
    }
    seen.cache = Some(CacheStatus::Hit);
    app.meter(
        &tenant.name,
        model,
        CacheStatus::Hit,
        &Reconciled::own(usage),
    )
    .await;
    let gzipped = gzip.is_some();
    Ok(Answer {
        body: match gzip {
            Some(g) => AnswerBody::Whole(g),
            None => AnswerBody::Hit(response::hit_chunks(embedding, &usage, request_id)),
        },
        request_id: request_id.to_string(),
        gzip: gzipped,
    })
}

/// The upstream half of a miss (4–6); owns everything it needs so it can
/// outlive the client's connection.
struct Miss {
    app: Arc<App>,
    tenant: Arc<Tenant>,
    model: Arc<str>,
    key: CacheKey,
    /// The gateway's figure: reserved before the call, compared with
    /// upstream's after it.
    usage: Usage,
    dimension: usize,
    no_store: bool,
    /// Sent as they were keyed.
    forwarded: ForwardedHeaders,
    body: Bytes,
    guard: Option<coalesce::LeaderGuard>,
    _slot: OwnedSemaphorePermit,
    /// An injected fault (debug builds, tests only): see [`fault`].
    panic_after_reserve: bool,
}

impl Miss {
    async fn run(mut self) -> (Result<Answer, GatewayError>, Option<u64>) {
        // 4. quota
        let units = self.usage.total();
        let reservation = match self.tenant.quota {
            None => None,
            Some(q) => match self.app.limits.reserve(&self.tenant.name, q, units).await {
                Ok(r) => Some(r),
                // Dropping the guard tells followers to try on their own.
                Err(e) => return (Err(e), None),
            },
        };
        let mut remaining = reservation.as_ref().map(|r| r.remaining);
        if self.panic_after_reserve {
            fault::panic_now();
        }
        // 5. upstream
        let (result, unknown) = self.call_upstream().await;
        // Attempts upstream may have billed without an answer: recorded as
        // `unknown` in the ledger and spent from the quota, never dropped.
        let exposure = self.usage.times(u64::from(unknown));
        if unknown > 0 {
            self.app
                .meter_unknown(&self.tenant.name, &self.model, unknown, &exposure);
        }
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
                // 6. metering: upstream's usage block is the record.
                let reconciled = metering::reconcile(self.usage, success.usage);
                let record = reconciled.record;
                if reconciled.mismatch {
                    // Counted by `App::meter`.
                    tracing::warn!(
                        tenant = %self.tenant.name,
                        expected_units = units,
                        upstream_units = record.total(),
                        upstream_usage = success.usage.is_some(),
                        "upstream usage disagrees with the gateway's computation; upstream's is recorded"
                    );
                }
                if let Some(r) = reservation {
                    let spent = record.total() + exposure.total();
                    remaining = Some(r.remaining.saturating_sub(spent.saturating_sub(units)));
                    self.app.limits.settle(r, spent).await;
                }
                self.app
                    .meter(
                        &self.tenant.name,
                        &self.model,
                        CacheStatus::Miss,
                        &reconciled,
                    )
                    .await;
                (
                    Ok(Answer {
                        body: AnswerBody::Whole(success.body),
                        request_id: success.request_id,
                        gzip: false,
                    }),
                    remaining,
                )
            }
            Err(e) => {
                if let Some(r) = reservation {
                    let spent = exposure.total();
                    remaining = Some((r.remaining + units).saturating_sub(spent));
                    if spent > 0 {
                        self.app.limits.settle(r, spent).await;
                    } else {
                        self.app.limits.release(r).await;
                    }
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

    /// The call and its attempts of unknown outcome.
    async fn call_upstream(&self) -> (Result<Success, GatewayError>, u32) {
        let sent = self
            .app
            .upstream
            .send(
                Method::POST,
                EMBEDDING_PATH,
                &self.forwarded,
                self.tenant.workspace.as_deref(),
                self.body.clone(),
            )
            .await;
        let result = sent.result.and_then(|resp| {
            if resp.status != StatusCode::OK {
                return Err(upstream_error(&resp));
            }
            parse_success(resp.body, self.dimension)
        });
        (result, sent.unknown_outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
