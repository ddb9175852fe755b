//! The API request path, built once by [`api`] as a `tower` stack: every
//! layer a request meets, in order, and what it adds or reads.
//!
//! Outer stack (every API route, `/admin/` included):
//!
//! 1. **request id** (`tower-http` `SetRequestId`): keeps a client's plain
//!    `x-request-id`, else makes a UUID; it names the request in the
//!    access log, error bodies and hit answers.
//! 2. **sensitive headers** (`tower-http`): `Authorization` is marked
//!    sensitive, so no `Debug` or log of the request shows it.
//! 3. **in-flight gauge**: `embedgate_in_flight_requests` while the
//!    request is being served, also when the client goes away.
//! 4. **access log and request metrics** ([`AccessLayer`]): the request
//!    span, then one `embedgate::access` line and one
//!    `embedgate_requests_total` / `…_duration_seconds` sample per answer,
//!    labelled from what the inner layers put on the response; refusals'
//!    lines (503, 429) are limited to a few a second plus a summary.
//!    With `[telemetry]` on, its span is the exported request span
//!    ([`crate::telemetry`]), filled in from the same response.
//! 5. **propagate request id** (`tower-http`): `x-request-id` on every
//!    answer (the body's `request_id` where the answer has one).
//! 6. **rescue** ([`RescueLayer`]): the one place where the errors and bare
//!    responses of the layers below become DashScope-shaped answers.
//! 7. **catch panic** (`tower-http`): a panic becomes a 500
//!    `InternalError`, not a dropped connection.
//! 8. **request deadline** (`tower` `Timeout`): no request lives longer
//!    than twice the upstream timeout plus a margin (504); an upstream call
//!    it interrupts still finishes, is cached and metered in its own task.
//! 9. **body size limit** (`tower-http` `RequestBodyLimit`):
//!    `server.max_body_bytes`, from `Content-Length` or while reading (413);
//!    the rest of a refused body is drained ([`crate::drain`], wrapped
//!    around the body by the server) so the client reads the 413.
//! 10. **body read deadline** ([`DeadlineBody`]): the whole body within
//!     `server.body_read_timeout` plus its size at
//!     `server.body_min_bytes_per_second`, else 408.
//! 11. **router** ([`Router`]): method and path pick the route; anything
//!     else is 404 (405 for a known path), never forwarded.
//!
//! Tenant routes (embeddings, uploads) then add, in order:
//!
//! a. **auth** ([`AuthLayer`]): the tenant from the key digest into the
//!    request's extensions (401 otherwise);
//! b. **global in-flight bound** (`tower` `LoadShed` + `ConcurrencyLimit`
//!    on one semaphore of `server.max_in_flight`): excess is shed at once
//!    with 503, never queued;
//! b2. **fair share** ([`FairShareLayer`]): at most the tenant's
//!    `max_in_flight` requests at once (429 `Throttling`), so one team at
//!    its bound leaves the rest of the gateway to the others;
//! c. **rate limit** ([`RateLimitLayer`]): one token from the tenant's
//!    rate for the route (429), `RateLimit-*` headers: `rate` for
//!    embeddings, `uploads_rate` (a bucket of its own) for uploads;
//! d. the route's service: [`embeddings::serve`] (forwarded headers and
//!    parse → cache key → cache → coalesce → quota → upstream → metering) or
//!    [`uploads::serve`] (only `getPolicy` for a served model is forwarded).
//!
//! `/admin/` routes go to [`admin::serve`], which checks the admin token
//! itself.
//! Health, readiness and metrics are served before this stack
//! ([`crate::server`]) so load shedding never fails a liveness probe.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
#[cfg(test)]
use http::StatusCode;
use http::{Method, Request, Response};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::access_log::{AccessLayer, InFlight, RouteName};
use crate::app::App;
use crate::auth::AuthLayer;
use crate::body::{self, Body, BoxError, BoxFuture, ReqBody};
use crate::body_deadline::DeadlineBody;
use crate::error::GatewayError;
use crate::fair_share::FairShareLayer;
use crate::limits::RateBucket;
use crate::rate_limit::RateLimitLayer;
use crate::request_id::{self, MakeUuid};
use crate::rescue::{self, RescueLayer};
use crate::response::{self, Framing};
use crate::telemetry;
use crate::upstream::{
    COMPATIBLE_PATH, EMBEDDING_PATH, TASKS_PATH, TEXT_EMBEDDING_PATH, UPLOADS_PATH,
};
use crate::{admin, embeddings, uploads};
use crate::{family, tasks};

/// Added to twice the upstream timeout for the whole-request deadline:
/// room for a follower that leads after its leader failed, and for Redis.
const REQUEST_DEADLINE_MARGIN: Duration = Duration::from_secs(5);

/// The API as one cloneable service, generic over the request body so
/// tests can drive it in process without sockets.
pub(crate) type Api<B> = BoxCloneSyncService<Request<B>, Response<Body>, Infallible>;

/// One route's service below the router.
type Route = BoxCloneSyncService<Request<ReqBody>, Response<Body>, Infallible>;

/// Builds the API stack (see the module docs for each layer).
pub(crate) fn api<B>(app: &Arc<App>) -> Api<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    around(app, Router::new(app))
}

/// Layers 1–10 around `routes` (the router, or a test's service).
fn around<B, S>(app: &Arc<App>, routes: S) -> Api<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    S: Service<Request<ReqBody>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let server = &app.config.server;
    let deadline = app.config.upstream.timeout * 2 + REQUEST_DEADLINE_MARGIN;
    let (body_base, body_rate) = (server.body_read_timeout, server.body_min_bytes_per_second);
    let metrics = app.metrics.clone();
    let stack = ServiceBuilder::new()
        // 1.
        .map_request(request_id::drop_unusable)
        .layer(SetRequestIdLayer::x_request_id(MakeUuid))
        // 2.
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
        // 3.
        .map_future(move |answer| {
            let counted = InFlight::new(&metrics);
            async move {
                let r = answer.await;
                drop(counted);
                r
            }
        })
        // 4.
        .layer(AccessLayer::new(app.clone()))
        .map_response(telemetry::on_response)
        // 5.
        .layer(PropagateRequestIdLayer::x_request_id())
        // 6.
        .layer(RescueLayer::new(server.max_body_bytes))
        // 7.
        .layer(CatchPanicLayer::custom(rescue::panic_response))
        // 8.
        .timeout(deadline)
        // 9.
        .layer(RequestBodyLimitLayer::new(server.max_body_bytes))
        // 10.
        .map_request(move |r: Request<_>| {
            r.map(|b| body::boxed(DeadlineBody::new(b, body_base, body_rate)))
        })
        // 11.
        .service(routes);
    BoxCloneSyncService::new(stack)
}

/// a–c around a tenant route's service `svc`, whose rate is `bucket`.
fn tenant_route<S>(app: &Arc<App>, framing: Framing, bucket: RateBucket, svc: S) -> Route
where
    S: Service<Request<ReqBody>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let route = ServiceBuilder::new()
        // a.
        .layer(AuthLayer::new(app.clone(), framing))
        // b. (the shed error becomes a 503 here, where the tenant is known)
        .layer(RescueLayer::new(app.config.server.max_body_bytes))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(
            app.in_flight.clone(),
        ))
        // b2.
        .layer(FairShareLayer::new(app.tenant_slots.clone(), framing))
        // c.
        .layer(RateLimitLayer::new(app.clone(), framing, bucket))
        // d.
        .service(svc);
    BoxCloneSyncService::new(route)
}

/// Layer 11: method and path to route. It is cloned per request, as every
/// service in the stack is, so the routes sit behind one `Arc` and only the
/// chosen route's service is cloned.
#[derive(Clone)]
pub(crate) struct Router {
    routes: Arc<Routes>,
}

struct Routes {
    embeddings: Route,
    text: Route,
    compatible: Route,
    tasks: Route,
    uploads: Route,
    admin: Route,
}

impl Router {
    fn new(app: &Arc<App>) -> Router {
        let routes = Routes {
            embeddings: tenant_route(
                app,
                Framing::SseIfAsked,
                RateBucket::Embeddings,
                Handler::new(app, |app, req| Box::pin(embeddings::serve(app, req))),
            ),
            text: tenant_route(
                app,
                Framing::SseIfAsked,
                RateBucket::Embeddings,
                Handler::new(app, |app, req| Box::pin(family::serve_text(app, req))),
            ),
            compatible: tenant_route(
                app,
                Framing::OpenAi,
                RateBucket::Embeddings,
                Handler::new(app, |app, req| Box::pin(family::serve_compatible(app, req))),
            ),
            // Submits and polls spend the tenant's own rate (the SDK's
            // `wait` polls every 1 to 5 s).
            tasks: tenant_route(
                app,
                Framing::Json,
                RateBucket::Embeddings,
                Handler::new(app, |app, req| Box::pin(tasks::serve(app, req))),
            ),
            uploads: tenant_route(
                app,
                Framing::Json,
                RateBucket::Uploads,
                Handler::new(app, |app, req| Box::pin(uploads::serve(app, req))),
            ),
            admin: BoxCloneSyncService::new(Handler::new(app, |app, req| {
                Box::pin(admin::serve(app, req))
            })),
        };
        Router {
            routes: Arc::new(routes),
        }
    }
}

impl Service<Request<ReqBody>> for Router {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each route gets ready in its own call (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        let path = req.uri().path();
        let (name, route) = match (req.method(), path) {
            (&Method::POST, EMBEDDING_PATH) => ("embeddings", &self.routes.embeddings),
            (&Method::GET, UPLOADS_PATH) => ("uploads", &self.routes.uploads),
            (&Method::POST, TEXT_EMBEDDING_PATH) => ("text", &self.routes.text),
            (&Method::POST, COMPATIBLE_PATH) => ("compatible", &self.routes.compatible),
            (&Method::GET | &Method::POST, p) if is_task_path(p) => ("tasks", &self.routes.tasks),
            (_, EMBEDDING_PATH | UPLOADS_PATH | TEXT_EMBEDDING_PATH | COMPATIBLE_PATH) => {
                return refuse(&req, GatewayError::MethodNotAllowed);
            }
            (_, p) if p.starts_with("/admin/") => ("admin", &self.routes.admin),
            (_, _) => return refuse(&req, GatewayError::NotFound),
        };
        let answer = route.clone().oneshot(req);
        Box::pin(async move {
            let mut r = answer.await?;
            r.extensions_mut().insert(RouteName(name));
            Ok(r)
        })
    }
}

/// `/api/v1/tasks`, `/api/v1/tasks/{id}`, `/api/v1/tasks/{id}/cancel`.
fn is_task_path(p: &str) -> bool {
    match p.strip_prefix(TASKS_PATH) {
        Some("") | Some("/") => true,
        Some(rest) => {
            let rest = rest.trim_start_matches('/');
            let id = rest.strip_suffix("/cancel").unwrap_or(rest);
            !id.is_empty() && !id.contains('/')
        }
        None => false,
    }
}

/// A route's innermost service: an async function of the app and the request.
#[derive(Clone)]
struct Handler {
    app: Arc<App>,
    serve: fn(Arc<App>, Request<ReqBody>) -> BoxFuture,
}

impl Handler {
    fn new(app: &Arc<App>, serve: fn(Arc<App>, Request<ReqBody>) -> BoxFuture) -> Handler {
        Handler {
            app: app.clone(),
            serve,
        }
    }
}

impl Service<Request<ReqBody>> for Handler {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        (self.serve)(self.app.clone(), req)
    }
}

fn refuse(req: &Request<ReqBody>, e: GatewayError) -> BoxFuture {
    response::now(response::refusal(req, e, Framing::Json))
}

/// The stack driven in process, without sockets: what each generic layer
/// adds, and that every answer is DashScope-shaped.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::secret::Digest;
    use http_body_util::{BodyExt, Full};
    use serde_json::Value;

    const KEY: &str = "sk-in-process";

    /// No journal and an in-memory SQLite ledger: nothing on disk, so tests
    /// in parallel share no directory.
    fn app(extra: &str) -> Arc<App> {
        let src = format!(
            "[server]\nmax_body_bytes = 64\nmax_in_flight = 1\n[upstream]\nbase_url = \"http://127.0.0.1:9\"\n{extra}\n[ledger]\njournal = false\nsqlite_path = \":memory:\"\n[[tenants]]\nname = \"t\"\nkey_sha256 = [\"{}\"]\nrate = {{ per_second = 0.001, burst = 1 }}\n",
            Digest::of(KEY.as_bytes()).to_hex()
        );
        App::new(Config::parse(&src, &|_| None).unwrap()).unwrap()
    }

    fn request(
        method: Method,
        path: &str,
        key: Option<&str>,
        body: &'static str,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            b = b.header(AUTHORIZATION, format!("Bearer {k}"));
        }
        b.body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    async fn send(svc: &Api<Full<Bytes>>, req: Request<Full<Bytes>>) -> (Response<()>, Value) {
        let r = svc.clone().oneshot(req).await.unwrap();
        let (parts, body) = r.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (Response::from_parts(parts, ()), v)
    }

    /// A DashScope error whose `request_id` is the `x-request-id` header.
    fn assert_error(r: &Response<()>, v: &Value, status: u16, code: &str) {
        assert_eq!(r.status().as_u16(), status, "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        let id = r.headers()["x-request-id"].to_str().unwrap();
        assert_eq!(v["request_id"], id, "{v}");
    }

    #[tokio::test]
    async fn unknown_paths_methods_and_keys_are_refused_in_dashscope_shape() {
        let app = app("");
        let svc: Api<Full<Bytes>> = api(&app);
        let (r, v) = send(&svc, request(Method::GET, "/api/v1/other", Some(KEY), "")).await;
        assert_error(&r, &v, 404, "NotFound");
        let (r, v) = send(&svc, request(Method::GET, EMBEDDING_PATH, Some(KEY), "")).await;
        assert_error(&r, &v, 405, "MethodNotAllowed");
        let (r, v) = send(
            &svc,
            request(Method::POST, EMBEDDING_PATH, Some("wrong"), "{}"),
        )
        .await;
        assert_error(&r, &v, 401, "InvalidApiKey");
        assert_eq!(r.headers()["x-should-retry"], "false");
    }

    #[tokio::test]
    async fn the_body_limit_answers_413_before_anything_is_read() {
        let app = app("");
        let svc: Api<Full<Bytes>> = api(&app);
        let big = "x".repeat(65).leak();
        let (r, v) = send(&svc, request(Method::POST, EMBEDDING_PATH, Some(KEY), big)).await;
        assert_error(&r, &v, 413, "BadRequest.TooLarge");
        assert!(v["message"].as_str().unwrap().contains("64 bytes"), "{v}");
    }

    #[tokio::test]
    async fn bad_input_after_auth_and_rate_carries_rate_headers_then_429() {
        let app = app("");
        let svc: Api<Full<Bytes>> = api(&app);
        let (r, v) = send(
            &svc,
            request(Method::POST, EMBEDDING_PATH, Some(KEY), "{\"model\":5}"),
        )
        .await;
        assert_error(&r, &v, 400, "InvalidParameter");
        assert_eq!(r.headers()["ratelimit-limit"], "1");
        assert_eq!(r.headers()["ratelimit-remaining"], "0");
        // The one token is spent: the next request is refused by the rate layer.
        let (r, v) = send(&svc, request(Method::POST, EMBEDDING_PATH, Some(KEY), "{}")).await;
        assert_error(&r, &v, 429, "Throttling.RateQuota");
        assert!(r.headers().contains_key("retry-after"));
    }

    #[tokio::test]
    async fn a_plain_client_request_id_is_kept_and_an_unusable_one_replaced() {
        let app = app("");
        let svc: Api<Full<Bytes>> = api(&app);
        let mut req = request(Method::GET, "/nowhere", None, "");
        req.headers_mut().insert(
            "x-request-id",
            http::HeaderValue::from_static("client-id-1"),
        );
        let (r, v) = send(&svc, req).await;
        assert_eq!(r.headers()["x-request-id"], "client-id-1");
        assert_eq!(v["request_id"], "client-id-1");
        let mut req = request(Method::GET, "/nowhere", None, "");
        req.headers_mut()
            .insert("x-request-id", http::HeaderValue::from_static("a\"b"));
        let (r, v) = send(&svc, req).await;
        let id = r.headers()["x-request-id"].to_str().unwrap();
        assert_ne!(id, "a\"b");
        assert_eq!(v["request_id"], id);
    }

    #[tokio::test]
    async fn a_panic_becomes_an_internal_error_and_the_gauge_comes_back() {
        let app = app("");
        let panicking = tower::service_fn(|_: Request<ReqBody>| async {
            if true {
                panic!("injected fault");
            }
            Ok::<Response<Body>, Infallible>(Response::new(body::full(Bytes::new())))
        });
        let svc: Api<Full<Bytes>> = around(&app, panicking);
        let (r, v) = send(&svc, request(Method::POST, EMBEDDING_PATH, Some(KEY), "{}")).await;
        assert_error(&r, &v, 500, "InternalError");
        assert!(!v.to_string().contains("injected fault"), "{v}");
        assert_eq!(app.metrics.in_flight.get(), 0);
        let m = String::from_utf8(app.metrics.render()).unwrap();
        assert!(
            m.contains("embedgate_requests_total{cache=\"none\",code=\"InternalError\",model=\"none\",tenant=\"(none)\"} 1"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn the_global_in_flight_bound_sheds_with_503() {
        let app = app("");
        // The one permit is held, as by a request in flight.
        let held = app.in_flight.clone().try_acquire_owned().unwrap();
        let svc: Api<Full<Bytes>> = api(&app);
        let (r, v) = send(&svc, request(Method::POST, EMBEDDING_PATH, Some(KEY), "{}")).await;
        assert_error(&r, &v, 503, "ServiceUnavailable");
        drop(held);
        let (r, _) = send(&svc, request(Method::POST, EMBEDDING_PATH, Some(KEY), "{}")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}
