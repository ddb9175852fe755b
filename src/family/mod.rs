//! The embedding family (every model but ONE-PEACE): text, multimodal and
//! OpenAI-compatible requests, cached per item where a vector depends only
//! on its own item, whole where the model fuses.
//!
//! One request, in order:
//!
//! 1. **parse** against the model table ([`parse`]); an unknown model, a
//!    model the tenant may not use, a bad dimension or too many items is
//!    refused here, nothing forwarded or metered;
//! 2. **units**: one cache unit per distinct item (per-item models) or one
//!    for the whole request (fused); each is keyed on the item plus every
//!    parameter that changes its vector ([`FamilyKeyBase`]);
//! 3. **lookup** of every unit; the rest are **coalesced**: a unit already
//!    in flight for another request is waited for, not requested again;
//! 4. **miss**: the units this request leads go upstream in one call of
//!    only those items, in their own task (a client that hangs up does not
//!    cancel what the company pays for): quota reserved with an upper bound,
//!    settled to what upstream billed; each item stored with its units
//!    (exact for a single-item call, else the batch total apportioned by
//!    UTF-8 length, largest remainder); metered as `miss`;
//! 5. **answer**: the client's items in its order, renumbered; `usage` is
//!    what the whole answer costs (served), `X-Usage-Billed` what upstream
//!    billed for this request; units served from cache metered as `hit`.
//!    `X-Cache: HIT` (no upstream call), `MISS` (every item forwarded) or
//!    `PARTIAL`.

pub(crate) mod answer;
pub(crate) mod entry;
pub(crate) mod parse;
pub(crate) mod usage;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::Instrument;

use crate::app::App;
use crate::body::Body;
use crate::cache::Lookup;
use crate::cache_key::{CacheKey, FamilyKeyBase, FamilyKeyParts, KeyScope};
use crate::coalesce::{self, Outcome, Role};
use crate::config::CacheScope;
use crate::error::{Fault, GatewayError};
use crate::forwarded::ForwardedHeaders;
use crate::metering::{CacheStatus, ModelName, Reconciled, Usage};
use crate::response;
use crate::telemetry::{self, TARGET};
use crate::tenants::Tenant;
use crate::upstream::{upstream_error, COMPATIBLE_PATH, EMBEDDING_PATH, TEXT_EMBEDDING_PATH};

use entry::{Entry, OutRef, Stored};
pub(crate) use parse::{peek_model, Api, FamilyRequest};

/// `X-Cache` of a family answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    Hit,
    Partial,
    Miss,
}

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const X_USAGE_BILLED: HeaderName = HeaderName::from_static("x-usage-billed");

/// What the request path learned, for the response headers.
#[derive(Default)]
struct Seen {
    served: Option<Served>,
    quota_remaining: Option<u64>,
    billed: Option<u64>,
    model: Option<Arc<str>>,
    /// Tokens the answer's input cost, for the request's span.
    input_tokens: Option<u64>,
}

/// One cache unit of a request: a distinct item, or the whole request.
struct Unit {
    key: CacheKey,
    /// The first item position it answers: the one sent upstream for it.
    first: usize,
    /// Answers it gives: one per position of its item (a repeated item
    /// answers several), or one for a fused request's whole.
    answers: u64,
}

/// Up to this many items, a repeated item is found by comparing keys, not
/// through a hash map.
const SCAN_UNITS: usize = 32;

/// `POST …/text-embedding`: a synchronous text request, or with
/// `X-DashScope-Async: enable` a batch task's submit.
pub(crate) async fn serve_text(
    app: Arc<App>,
    req: http::Request<crate::body::ReqBody>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let is_async = req
        .headers()
        .get("x-dashscope-async")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("enable"));
    if is_async {
        return crate::tasks::submit(app, req).await;
    }
    Ok(serve_api(app, req, Api::Text).await)
}

/// `POST /compatible-mode/v1/embeddings`.
pub(crate) async fn serve_compatible(
    app: Arc<App>,
    req: http::Request<crate::body::ReqBody>,
) -> Result<Response<Body>, std::convert::Infallible> {
    Ok(serve_api(app, req, Api::Compatible).await)
}

async fn serve_api(
    app: Arc<App>,
    req: http::Request<crate::body::ReqBody>,
    api: Api,
) -> Response<Body> {
    let request_id = crate::request_id::of(&req);
    let sse = api != Api::Compatible && response::Framing::SseIfAsked.sse(req.headers());
    let render_err = |e: GatewayError| match api {
        Api::Compatible => compatible_error(e, &request_id),
        Api::Text | Api::Multimodal => e.into_response(&request_id, sse),
    };
    let tenant = match crate::auth::tenant_of(&req) {
        Ok(t) => t,
        Err(e) => return render_err(e),
    };
    match crate::embeddings::read_request(&app, req).await {
        Ok((parts, forwarded, body)) => {
            respond(
                &app,
                tenant,
                &parts.headers,
                forwarded,
                body,
                api,
                &request_id,
                sse,
            )
            .await
        }
        Err(e) => render_err(e),
    }
}

/// A family request on one of its routes; `body` is read already.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn respond(
    app: &Arc<App>,
    tenant: Arc<Tenant>,
    headers: &HeaderMap,
    forwarded: ForwardedHeaders,
    body: Bytes,
    api: Api,
    request_id: &str,
    sse: bool,
) -> Response<Body> {
    let mut seen = Seen {
        quota_remaining: tenant.quota.map(|q| app.limits.remaining(&tenant.name, q)),
        ..Seen::default()
    };
    let result = answer(
        app, &tenant, headers, forwarded, body, api, request_id, &mut seen,
    )
    .await;
    let mut r = match result {
        Ok((body, rid)) => response::success(body, &rid, sse),
        Err(e) if api == Api::Compatible => compatible_error(e, request_id),
        Err(e) => e.into_response(request_id, sse),
    };
    let h = r.headers_mut();
    if let Some(s) = seen.served {
        h.insert(
            X_CACHE,
            HeaderValue::from_static(match s {
                Served::Hit => "HIT",
                Served::Partial => "PARTIAL",
                Served::Miss => "MISS",
            }),
        );
        r.extensions_mut().insert(match s {
            Served::Hit => CacheStatus::Hit,
            Served::Partial => CacheStatus::Partial,
            Served::Miss => CacheStatus::Miss,
        });
    }
    if let Some(b) = seen.billed {
        r.headers_mut().insert(X_USAGE_BILLED, HeaderValue::from(b));
    }
    if let Some(q) = seen.quota_remaining {
        response::set_quota_header(r.headers_mut(), q);
    }
    if let Some(m) = seen.model {
        r.extensions_mut().insert(ModelName(m));
    }
    if let Some(n) = seen.input_tokens {
        telemetry::set_input_tokens(&mut r, n);
    }
    r
}

/// The OpenAI-compatible error shape the `openai` SDK reads
/// (`error.message`, `error.code`, `error.type`).
pub(crate) fn compatible_error(e: GatewayError, request_id: &str) -> Response<Body> {
    let (status, code) = match &e {
        GatewayError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "model_not_found"),
        GatewayError::InvalidApiKey => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
        GatewayError::RateLimited { .. }
        | GatewayError::QuotaExceeded
        | GatewayError::TenantBusy { .. } => (StatusCode::TOO_MANY_REQUESTS, "limit_requests"),
        other if other.status().is_client_error() => (other.status(), "invalid_parameter_error"),
        other => (other.status(), "internal_error"),
    };
    // Headers (Retry-After, x-should-retry, the metric's code) as the
    // native answer has them; only the body's shape differs.
    let mut r = e.clone().into_response(request_id, false);
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    let body = serde_json::json!({
        "error": {"code": code, "message": e.message(), "param": null, "type": kind},
        "request_id": request_id,
    });
    *r.status_mut() = status;
    *r.body_mut() = crate::body::full(body.to_string());
    r
}

fn scope_of<'a>(app: &App, tenant: &'a Tenant) -> KeyScope<'a> {
    match app.config.cache.scope {
        CacheScope::Tenant => KeyScope::Tenant(&tenant.name),
        CacheScope::Shared => KeyScope::Shared,
    }
}

/// Per-item entries hold exactly one answer object.
fn decode_unit(raw: Bytes, fused: bool) -> Option<Stored> {
    Stored::read(raw).filter(|e| fused || e.outs == 1)
}

#[allow(clippy::too_many_arguments)]
async fn answer(
    app: &Arc<App>,
    tenant: &Arc<Tenant>,
    headers: &HeaderMap,
    forwarded: ForwardedHeaders,
    body: Bytes,
    api: Api,
    request_id: &str,
    seen: &mut Seen,
) -> Result<(Bytes, String), GatewayError> {
    // 1. parse
    let req = match api {
        Api::Compatible => FamilyRequest::parse_compatible(&body, &app.config.models)?,
        Api::Text | Api::Multimodal => FamilyRequest::parse_native(&body, api, &app.config.models)?,
    };
    drop(body);
    seen.model = Some(Arc::from(req.model.name.as_str()));
    if !tenant.may_use(&req.model.name) {
        return Err(GatewayError::ModelNotAllowed(req.model.name.clone()));
    }
    let req = Arc::new(req);

    // 2. units
    let scope = scope_of(app, tenant);
    let parts = FamilyKeyParts {
        api: api.tag(),
        model: &req.model.name,
        parameters: &req.key_parameters,
        extra: &req.extra,
        input_extra: &req.input_extra,
    };
    let base = FamilyKeyBase::new(scope, tenant.workspace.as_deref(), &parts, &forwarded);
    let fused = req.fused;
    // Per item position, the unit that answers it.
    let mut unit_of: Vec<usize> = Vec::with_capacity(req.items.len());
    let units: Vec<Unit> = if fused {
        unit_of.resize(req.items.len(), 0);
        vec![Unit {
            key: base.key(req.items.iter().map(|i| &i.json[..])),
            first: 0,
            answers: 1,
        }]
    } else {
        let scan = req.items.len() <= SCAN_UNITS;
        let mut units: Vec<Unit> = Vec::with_capacity(req.items.len());
        let mut by_key: HashMap<CacheKey, usize> = HashMap::new();
        for (pos, item) in req.items.iter().enumerate() {
            let key = base.key(std::iter::once(&item.json[..]));
            let known = if scan {
                units.iter().position(|u| u.key == key)
            } else {
                by_key.get(&key).copied()
            };
            match known {
                Some(u) => {
                    units[u].answers += 1;
                    unit_of.push(u);
                }
                None => {
                    if !scan {
                        by_key.insert(key, units.len());
                    }
                    unit_of.push(units.len());
                    units.push(Unit {
                        key,
                        first: pos,
                        answers: 1,
                    });
                }
            }
        }
        units
    };
    let cc = crate::embeddings::cache_control(headers);

    // 3. lookup and coalescing
    let mut found: Vec<Option<Stored>> = units.iter().map(|_| None).collect();
    let mut lead: Vec<(usize, Option<coalesce::LeaderGuard>)> = Vec::new();
    let mut follow: Vec<(usize, watch::Receiver<coalesce::Slot>)> = Vec::new();
    // One span over every unit's lookup (entered by each).
    let lookup = if cc.no_cache {
        tracing::Span::none()
    } else {
        tracing::debug_span!(target: TARGET, "cache.lookup")
    };
    for (u, unit) in units.iter().enumerate() {
        if cc.no_cache {
            lead.push((u, None));
            continue;
        }
        if let Lookup::Hit(raw) = app
            .cache
            .get_with(&unit.key, Entry::is_whole)
            .instrument(lookup.clone())
            .await
        {
            if let Some(e) = decode_unit(raw, fused) {
                found[u] = Some(e);
                continue;
            }
        }
        match app.coalescer.join(unit.key) {
            Role::Leader(g) => {
                // The previous leader may have stored it since the lookup.
                let again = app.cache.get_with(&unit.key, |_| true);
                if let Lookup::Hit(raw) = again.instrument(lookup.clone()).await {
                    if let Some(e) = decode_unit(raw.clone(), fused) {
                        g.finish(Outcome::Done(raw));
                        found[u] = Some(e);
                        continue;
                    }
                }
                lead.push((u, Some(g)));
            }
            Role::Follower(rx) => follow.push((u, rx)),
        }
    }
    drop(lookup);

    // 4. the units this request leads, upstream
    let mut fetched: Vec<bool> = vec![false; units.len()];
    let mut billed_total = 0u64;
    let mut passthrough: Option<(Bytes, String)> = None;
    if !lead.is_empty() {
        let miss = fetch(
            app,
            tenant,
            &req,
            &units,
            lead,
            &forwarded,
            cc.no_store,
            seen,
        )
        .await?;
        billed_total += miss.billed;
        for (u, e) in miss.entries {
            fetched[u] = true;
            found[u] = Some(e);
        }
        passthrough = miss.passthrough;
    }
    // Units in flight for other requests: their leaders' answers.
    let mut again = Vec::new();
    for (u, rx) in follow {
        let wait = tracing::debug_span!(target: TARGET, "coalesce.wait");
        match coalesce::wait(rx).instrument(wait).await {
            Outcome::Done(raw) => match decode_unit(raw, fused) {
                Some(e) => {
                    app.metrics.coalesced.inc();
                    found[u] = Some(e);
                }
                None => again.push((u, None)),
            },
            // Upstream's answer to this very item, made for the leader.
            Outcome::Failed(e) => {
                seen.served = Some(Served::Miss);
                return Err(e);
            }
            Outcome::Retry => again.push((u, None)),
        }
    }
    if !again.is_empty() {
        let miss = fetch(
            app,
            tenant,
            &req,
            &units,
            again,
            &forwarded,
            cc.no_store,
            seen,
        )
        .await?;
        billed_total += miss.billed;
        for (u, e) in miss.entries {
            fetched[u] = true;
            found[u] = Some(e);
        }
        passthrough = None;
    }

    // 5. the answer
    let entries: Vec<Stored> = found
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| GatewayError::Internal("a unit has no answer".into()))?;
    // Per answer: the first answer of a unit this request fetched is a
    // miss; every other answer was served without an upstream call.
    let mut hit_usage = Usage::default();
    let mut served = Usage::default();
    let mut images = 0;
    let mut misses = 0u64;
    let mut hits = 0u64;
    for (u, (unit, e)) in units.iter().zip(&entries).enumerate() {
        usage::add(&mut served, &e.usage, unit.answers);
        images += e.images * unit.answers;
        let hit_answers = if fetched[u] {
            misses += 1;
            unit.answers - 1
        } else {
            unit.answers
        };
        hits += hit_answers;
        usage::add(&mut hit_usage, &e.usage, hit_answers);
    }
    if hits > 0 {
        if app.config.limits.quota_counts_hits {
            if let Some(q) = tenant.quota {
                let r = app
                    .limits
                    .reserve(&tenant.name, q, hit_usage.total())
                    .await?;
                seen.quota_remaining = Some(r.remaining);
                app.limits.settle(r, hit_usage.total()).await;
            }
        }
        app.meter(
            &tenant.name,
            &req.model.name,
            CacheStatus::Hit,
            &Reconciled::own(hit_usage),
        )
        .await;
    }
    seen.served = Some(match (hits, misses) {
        (_, 0) => Served::Hit,
        (0, _) => Served::Miss,
        _ => Served::Partial,
    });
    seen.billed = Some(billed_total);
    seen.input_tokens = Some(served.total());
    if hits == 0 && !req.base64 {
        if let Some(p) = passthrough {
            // Every item went upstream in one call, in the client's order:
            // upstream's own answer, byte for byte.
            return Ok(p);
        }
    }
    let usage_json = entry::usage_json(api, &served, images);
    let outs: Vec<OutRef<'_>> = if fused {
        entries[0].outs().collect()
    } else {
        unit_of.iter().map(|&u| entries[u].first_out()).collect()
    };
    Ok((
        entry::render(
            api,
            &req.model.name,
            &outs,
            &usage_json,
            request_id,
            req.base64,
        ),
        request_id.to_string(),
    ))
}

/// What one upstream call brought.
struct Fetched {
    entries: Vec<(usize, Stored)>,
    billed: u64,
    /// Upstream's body and id, when the call carried exactly the client's
    /// items in the client's order.
    passthrough: Option<(Bytes, String)>,
}

#[allow(clippy::too_many_arguments)]
async fn fetch(
    app: &Arc<App>,
    tenant: &Arc<Tenant>,
    req: &Arc<FamilyRequest>,
    units: &[Unit],
    lead: Vec<(usize, Option<coalesce::LeaderGuard>)>,
    forwarded: &ForwardedHeaders,
    no_store: bool,
    seen: &mut Seen,
) -> Result<Fetched, GatewayError> {
    let slot = app
        .upstream_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| GatewayError::Overloaded)?;
    let positions: Vec<usize> = if req.fused {
        (0..req.items.len()).collect()
    } else {
        lead.iter().map(|(u, _)| units[*u].first).collect()
    };
    let whole = !req.fused
        && positions.len() == req.items.len()
        && positions.iter().enumerate().all(|(i, &p)| i == p);
    let miss = Miss {
        app: app.clone(),
        tenant: tenant.clone(),
        req: req.clone(),
        keys: lead.iter().map(|(u, _)| units[*u].key).collect(),
        unit_ids: lead.iter().map(|(u, _)| *u).collect(),
        guards: lead.into_iter().map(|(_, g)| g).collect(),
        positions,
        whole,
        forwarded: forwarded.clone(),
        no_store,
        _slot: slot,
    };
    seen.served = Some(Served::Miss);
    // In the request's span: its phases are the request's children.
    match tokio::spawn(miss.run().in_current_span()).await {
        Ok((result, remaining)) => {
            if remaining.is_some() {
                seen.quota_remaining = remaining;
            }
            if let Err(e) = &result {
                // A refusal before the call (quota) is no upstream call.
                if e.fault() != Fault::Upstream {
                    seen.served = None;
                }
            }
            result
        }
        Err(e) => Err(GatewayError::Internal(format!("upstream task failed: {e}"))),
    }
}

/// The upstream half of a miss; owns what it needs to outlive the client.
struct Miss {
    app: Arc<App>,
    tenant: Arc<Tenant>,
    req: Arc<FamilyRequest>,
    /// Per unit fetched: its key, its id in the request, its guard.
    keys: Vec<CacheKey>,
    unit_ids: Vec<usize>,
    guards: Vec<Option<coalesce::LeaderGuard>>,
    /// Item positions sent, in order.
    positions: Vec<usize>,
    /// The call carries the client's items exactly, in order.
    whole: bool,
    forwarded: ForwardedHeaders,
    no_store: bool,
    _slot: OwnedSemaphorePermit,
}

impl Miss {
    async fn run(mut self) -> (Result<Fetched, GatewayError>, Option<u64>) {
        let req = self.req.clone();
        let spec = &req.model;
        let sent: Vec<&parse::FamilyItem> = self.positions.iter().map(|&p| &req.items[p]).collect();
        // The quota's reservation: an upper bound of what may be billed.
        let bound = usage::bound_usage(spec, sent.iter().copied());
        let reservation = match self.tenant.quota {
            None => None,
            Some(q) => match self
                .app
                .limits
                .reserve(&self.tenant.name, q, bound.total())
                .await
            {
                Ok(r) => Some(r),
                Err(e) => return (Err(e), None),
            },
        };
        let mut remaining = reservation.as_ref().map(|r| r.remaining);
        let body = req.upstream_body(&self.positions);
        let path = match req.api {
            Api::Text => TEXT_EMBEDDING_PATH,
            Api::Multimodal => EMBEDDING_PATH,
            Api::Compatible => COMPATIBLE_PATH,
        };
        let sent_result = self
            .app
            .upstream
            .send_via(
                spec.upstream_base_url.as_ref(),
                Method::POST,
                path,
                &self.forwarded,
                self.tenant.workspace.as_deref(),
                body,
            )
            .await;
        let unknown = sent_result.unknown_outcomes;
        // Attempts upstream may have billed without an answer: at their
        // upper bound, recorded as `unknown`, spent from the quota.
        let exposure = bound.times(u64::from(unknown));
        if unknown > 0 {
            self.app
                .meter_unknown(&self.tenant.name, &spec.name, unknown, &exposure);
        }
        let expect = (!req.fused).then_some(self.positions.len());
        let result = sent_result.result.and_then(|resp| {
            if resp.status != StatusCode::OK {
                return Err(upstream_error(&resp));
            }
            let a = answer::parse_answer(&resp.body, req.api, expect, req.dimension, req.dense)?;
            Ok((a, resp.body))
        });
        match result {
            Ok((answer, raw_body)) => {
                let billed = usage::billed(req.api, answer.usage.as_ref());
                let billed_figures = billed.unwrap_or(usage::Billed {
                    text: bound.total(),
                    visual: 0,
                });
                let mut entries = Vec::with_capacity(self.keys.len());
                // Each item's share of the bill, under its own modality.
                let per = usage::per_item(spec, &sent, billed_figures);
                let miss_usage = usage::sum(per.iter());
                if req.fused {
                    // One answer for all the items: their usage together.
                    entries.push(Entry {
                        exact: billed.is_some(),
                        usage: miss_usage,
                        images: sent.iter().map(|i| i.images).sum(),
                        outs: answer.outs,
                    });
                } else {
                    for ((out, u), it) in answer.outs.into_iter().zip(per).zip(&sent) {
                        entries.push(Entry {
                            exact: billed.is_some() && sent.len() == 1,
                            usage: u,
                            images: it.images,
                            outs: vec![out],
                        });
                    }
                }
                let stored: Vec<Stored> = entries.iter().map(Entry::store).collect();
                for (key, e) in self.keys.iter().zip(&stored) {
                    if !self.no_store {
                        self.app.cache.store(*key, e.raw().clone()).await;
                    }
                }
                for (g, e) in self.guards.iter_mut().zip(&stored) {
                    if let Some(g) = g.take() {
                        g.finish(Outcome::Done(e.raw().clone()));
                    }
                }
                // Metering: upstream's bill is the record; a usage shape
                // this gateway cannot read is counted, recorded at the
                // reservation's bound, never dropped.
                let reconciled = Reconciled {
                    record: miss_usage,
                    computed: if billed.is_some() { miss_usage } else { bound },
                    upstream: billed.is_some(),
                    mismatch: billed.is_none(),
                };
                if billed.is_none() {
                    // Counted by `meter` (the record's `mismatch`).
                    tracing::warn!(
                        tenant = %self.tenant.name,
                        model = %spec.name,
                        "upstream usage in a shape this gateway does not know; recorded at the reservation's bound"
                    );
                }
                let spent = miss_usage.total() + exposure.total();
                if let Some(r) = reservation {
                    remaining = Some((r.remaining + bound.total()).saturating_sub(spent));
                    self.app.limits.settle(r, spent).await;
                }
                self.app
                    .meter(
                        &self.tenant.name,
                        &spec.name,
                        CacheStatus::Miss,
                        &reconciled,
                    )
                    .await;
                let passthrough = self.whole.then_some((raw_body, answer.request_id));
                (
                    Ok(Fetched {
                        entries: self.unit_ids.iter().copied().zip(stored).collect(),
                        billed: miss_usage.total(),
                        passthrough,
                    }),
                    remaining,
                )
            }
            Err(e) => {
                if let Some(r) = reservation {
                    let spent = exposure.total();
                    remaining = Some((r.remaining + bound.total()).saturating_sub(spent));
                    if spent > 0 {
                        self.app.limits.settle(r, spent).await;
                    } else {
                        self.app.limits.release(r).await;
                    }
                }
                if e.fault() == Fault::Upstream {
                    for g in self.guards.iter_mut() {
                        if let Some(g) = g.take() {
                            g.finish(Outcome::Failed(e.clone()));
                        }
                    }
                }
                (Err(e), remaining)
            }
        }
    }
}
