//! Listeners, the open routes, and graceful shutdown. Every other request
//! goes through the API stack ([`crate::stack`]), its body wrapped so that
//! what an early answer leaves unread is drained ([`crate::drain`]): a
//! client still sending reads the answer instead of a reset.
//!
//! Routes (everything else is a DashScope-style 404 and never forwarded):
//!
//! | route | auth | what |
//! |---|---|---|
//! | `GET /healthz` | open | process is up |
//! | `GET /readyz` | open | config loaded; backends in the body |
//! | `GET /metrics` | open | Prometheus text (here unless `server.metrics_listen`) |
//! | `POST /api/v1/services/embeddings/multimodal-embedding/multimodal-embedding` | tenant | embeddings |
//! | `GET /api/v1/uploads` | tenant | SDK upload certificate, passed through |
//! | `GET /admin/usage` | admin | usage report |

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::app::App;
use crate::body::{self, Body};
use crate::drain::Lingering;
use crate::error::GatewayError;
use crate::request_id;
use crate::stack::{self, Api};

/// A client must send its request head within this (slowloris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time given to write buffered ledger rows to Redis on shutdown.
const LEDGER_FLUSH_ON_SHUTDOWN: Duration = Duration::from_secs(5);

/// Which routes a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// The API (and `/metrics` unless it has its own listener).
    Main { metrics: bool },
    /// `server.metrics_listen`: metrics and health only.
    Metrics,
}

/// Serves until `shutdown` resolves, then stops accepting, lets requests in
/// flight finish (up to `server.shutdown_grace`), flushes the ledger and
/// returns.
pub(crate) async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) {
    let draining = Arc::new(AtomicBool::new(false));
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let main_kind = Listener::Main {
        metrics: metrics_listener.is_none(),
    };
    let api: Api<Lingering<Incoming>> = stack::api(&app);
    let mut loops = Vec::new();
    loops.push(tokio::spawn(accept_loop(
        app.clone(),
        api.clone(),
        listener,
        main_kind,
        draining.clone(),
        graceful.clone(),
        stop_rx.clone(),
    )));
    if let Some(ml) = metrics_listener {
        loops.push(tokio::spawn(accept_loop(
            app.clone(),
            api.clone(),
            ml,
            Listener::Metrics,
            draining.clone(),
            graceful.clone(),
            stop_rx.clone(),
        )));
    }

    shutdown.await;
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    draining.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let grace = app.config.server.shutdown_grace;
    match Arc::try_unwrap(graceful) {
        Ok(g) => {
            if tokio::time::timeout(grace, g.shutdown()).await.is_err() {
                tracing::warn!("shutdown grace period over; closing remaining connections");
            }
        }
        Err(_) => tracing::error!("connections still referenced after the accept loops ended"),
    }
    // Upstream calls whose clients hung up still hold slots: wait for them.
    let max = app.config.server.max_in_flight as u32;
    let _ = tokio::time::timeout(grace, app.upstream_slots.acquire_many(max)).await;
    if app.ledger.flush(LEDGER_FLUSH_ON_SHUTDOWN).await {
        tracing::info!("ledger flushed");
    } else {
        tracing::error!("ledger could not be flushed to Redis before exit; buffered rows are lost");
    }
}

async fn accept_loop(
    app: Arc<App>,
    api: Api<Lingering<Incoming>>,
    listener: TcpListener,
    kind: Listener,
    draining: Arc<AtomicBool>,
    graceful: Arc<GracefulShutdown>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let api = api.clone();
        let draining = draining.clone();
        let svc = service_fn(move |req| {
            let app = app.clone();
            let api = api.clone();
            let draining = draining.clone();
            async move { Ok::<_, Infallible>(route(&app, api, req, kind, &draining).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
}

/// The open routes here; the API through its stack.
async fn route(
    app: &App,
    api: Api<Lingering<Incoming>>,
    req: Request<Incoming>,
    kind: Listener,
    draining: &AtomicBool,
) -> Response<Body> {
    match (kind, req.method(), req.uri().path()) {
        (_, &Method::GET | &Method::HEAD, "/healthz") => {
            body::json(StatusCode::OK, r#"{"status":"ok"}"#)
        }
        (_, &Method::GET | &Method::HEAD, "/readyz") => readyz(app, draining),
        (Listener::Main { metrics: true } | Listener::Metrics, &Method::GET, "/metrics") => {
            body::with_body(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                app.metrics.render(),
            )
        }
        (Listener::Main { .. }, _, _) => match api.oneshot(Lingering::wrap(req)).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        (Listener::Metrics, _, _) => {
            GatewayError::NotFound.into_response(&request_id::fresh(), false)
        }
    }
}

fn readyz(app: &App, draining: &AtomicBool) -> Response<Body> {
    let redis = match &app.redis {
        None => "not_configured",
        Some(r) if r.is_up() => "up",
        Some(_) => "down",
    };
    let draining = draining.load(Ordering::SeqCst);
    let v = serde_json::json!({
        "status": if draining { "draining" } else { "ready" },
        "config": "loaded",
        "tenants": app.tenants.load().len(),
        "cache": if app.redis.is_some() { "redis" } else { "memory" },
        "redis": redis,
        "upstream_key": if app.config.upstream.api_key.is_some() { "set" } else { "missing" },
        "ledger_buffered": app.metrics.ledger_buffered.get(),
    });
    // A draining replica leaves the load balancer; a Redis outage does not
    // (requests are still served).
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    body::json(status, v.to_string())
}
