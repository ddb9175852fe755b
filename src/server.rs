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
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use crate::app::App;
use crate::body::{self, Body};
use crate::connection::ConnectionConfig;
use crate::drain::Lingering;
use crate::error::GatewayError;
use crate::request_id;
use crate::shutdown::{self, Budget};
use crate::stack::{self, Api};

/// Which routes a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// The API (and `/metrics` unless it has its own listener).
    Main { metrics: bool },
    /// `server.metrics_listen`: metrics and health only.
    Metrics,
}

/// What every accept loop shares.
struct Shared {
    app: Arc<App>,
    api: Api<Lingering<Incoming>>,
    connections: ConnectionConfig,
    /// `server.max_connections`, over both listeners; shutdown waits for
    /// every slot to come back.
    slots: Arc<Semaphore>,
    draining: AtomicBool,
}

/// Serves until `shutdown` resolves, then stops accepting, lets requests in
/// flight finish and flushes quotas and the ledger, all within
/// `server.shutdown_grace` ([`crate::shutdown`]). Returns whether everything
/// was shipped.
pub(crate) async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let (stop_tx, stop_rx) = watch::channel(false);
    let max_connections = app.config.server.max_connections;
    let shared = Arc::new(Shared {
        api: stack::api(&app),
        connections: ConnectionConfig::new(&app.config.server),
        slots: Arc::new(Semaphore::new(max_connections)),
        draining: AtomicBool::new(false),
        app: app.clone(),
    });
    let main_kind = Listener::Main {
        metrics: metrics_listener.is_none(),
    };
    let mut loops = vec![tokio::spawn(accept_loop(
        shared.clone(),
        listener,
        main_kind,
        stop_rx.clone(),
    ))];
    if let Some(ml) = metrics_listener {
        loops.push(tokio::spawn(accept_loop(
            shared.clone(),
            ml,
            Listener::Metrics,
            stop_rx.clone(),
        )));
    }

    shutdown.await;
    let budget = Budget::starting_now(app.config.server.shutdown_grace);
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    shared.draining.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let abandoned = shutdown::drain(&app, &shared.slots, max_connections, &budget).await;
    let flushed = shutdown::final_flush(&app, &budget).await;
    // Traces last, in what is left of the budget: they are not owed.
    crate::telemetry::shutdown(budget.end).await;
    abandoned == 0 && flushed
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    kind: Listener,
    mut stop: watch::Receiver<bool>,
) {
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
        // Over the cap: closed at once (dropping it), counted, not queued.
        let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
            shared.app.metrics.connections_refused.inc();
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn_shared = shared.clone();
        let svc = service_fn(move |req| {
            let shared = conn_shared.clone();
            async move { Ok::<_, Infallible>(route(&shared, req, kind).await) }
        });
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let open = &shared.app.metrics.connections_open;
            open.inc();
            shared.connections.serve(stream, svc, stop, slot).await;
            open.dec();
        });
    }
}

/// The open routes here; the API through its stack.
async fn route(shared: &Shared, req: Request<Incoming>, kind: Listener) -> Response<Body> {
    let app = &*shared.app;
    let draining = &shared.draining;
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
        (Listener::Main { .. }, _, _) => {
            match shared.api.clone().oneshot(Lingering::wrap(req)).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
        (Listener::Metrics, _, _) => {
            GatewayError::NotFound.into_response(&request_id::fresh(), false)
        }
    }
}

fn readyz(app: &App, draining: &AtomicBool) -> Response<Body> {
    let health = |store: &Option<Arc<crate::redis_store::RedisStore>>| match store {
        None => "not_configured",
        Some(r) if r.is_up() => "up",
        Some(_) => "down",
    };
    let (cache, state) = (health(&app.cache_redis), health(&app.state_redis));
    // `redis`: every configured Redis up, or any of them down.
    let redis = match (cache, state) {
        ("down", _) | (_, "down") => "down",
        ("not_configured", "not_configured") => "not_configured",
        _ => "up",
    };
    let draining = draining.load(Ordering::SeqCst);
    let v = serde_json::json!({
        "status": if draining { "draining" } else { "ready" },
        "config": "loaded",
        "tenants": app.tenants.load().len(),
        "cache": if app.cache_redis.is_some() { "redis" } else { "memory" },
        "redis": redis,
        "redis_cache": cache,
        "redis_state": state,
        "upstream_key": if app.config.upstream.api_key.is_some() { "set" } else { "missing" },
        "ledger_buffered": app.metrics.ledger_buffered.get(),
        "journal": app.ledger.journal_status(),
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
