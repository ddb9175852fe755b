//! embedgate: a caching and metering API gateway for DashScope's multimodal
//! embedding API (ONE-PEACE).
//!
//! Modules, in the order a request meets them:
//!
//! - [`server`]: listeners, routes, graceful shutdown.
//! - [`tenants`]: key digests to tenants (auth), swapped on reload.
//! - [`limits`]: per-tenant rate limits and unit quotas (Redis or local).
//! - [`request`]: the request body parsed into a type that cannot be invalid.
//! - [`cache_key`]: the versioned, prefix-free cache key.
//! - [`cache`]: memory and Redis caches of embeddings.
//! - [`coalesce`]: identical misses in flight share one upstream call.
//! - [`proxy`]: the embedding request path that ties these together.
//! - [`upstream`]: the DashScope client, with retries.
//! - [`metrics`], [`ledger`]: Prometheus counters and the durable usage ledger.
//! - [`admin`]: usage reports.
//!
//! Support: [`config`] (TOML, validated), [`reload`] (SIGHUP, file watch),
//! [`redis_store`] (the shared Redis connection), [`error`] (the one error
//! type and its wire mapping), [`secret`], [`date`], [`app`] (shared state).

pub mod admin;
pub mod app;
pub mod cache;
pub mod cache_key;
pub mod coalesce;
pub mod config;
pub mod date;
pub mod error;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod redis_store;
pub mod reload;
pub mod request;
pub mod secret;
pub mod server;
pub mod tenants;
pub mod upstream;

use std::future::Future;
use tokio::net::TcpListener;

pub use app::App;
pub use config::Config;

/// Runs the gateway on already-bound listeners until `shutdown` resolves.
/// Tests bind `127.0.0.1:0` and pass the listener in.
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let app = App::new(config)?;
    let watcher = tokio::spawn(reload::watch(app.clone()));
    server::serve(app.clone(), listener, metrics_listener, shutdown).await;
    watcher.abort();
    Ok(())
}
