//! embedgate: a caching and metering API gateway for DashScope's multimodal
//! embedding API (ONE-PEACE).
//!
//! Modules, in the order a request meets them:
//!
//! - [`server`]: listeners, the open routes (health, readiness, metrics),
//!   graceful shutdown within one budget ([`shutdown`]); [`connection`]: one client connection (cap, idle
//!   and head timeouts, graceful close); [`drain`]: a request body left
//!   unread by an early answer is read and discarded, so the client reads
//!   the answer.
//! - [`stack`]: the API request path as one `tower` stack; its doc comment
//!   lists every layer in order. Its generic layers come from `tower` and
//!   `tower-http`; the gateway's own are:
//!   - [`request_id`]: which `x-request-id` a request carries;
//!   - [`access_log`]: the access log line and request metrics;
//!   - [`rescue`]: the layers' errors as DashScope-shaped answers;
//!   - [`auth`]: the tenant from the key digest ([`tenants`]);
//!   - [`fair_share`]: the tenant's share of the requests in flight;
//!   - [`body_deadline`]: the whole body within its deadline;
//!   - [`rate_limit`]: the tenant's request rate ([`limits`]).
//! - [`embeddings`]: the embedding service, phase by phase:
//!   - [`request`]: the body parsed into a type that cannot be invalid;
//!   - [`forwarded`]: the client headers that go upstream, and which of
//!     them change the answer;
//!   - [`cache_key`]: the versioned, prefix-free cache key;
//!   - [`cache`]: memory and Redis caches of embeddings; an entry that is
//!     hit is compacted once, off the request path ([`compact`]), into the
//!     DEFLATE form gzip answers are built around ([`gzip`]);
//!   - [`coalesce`]: identical misses in flight share one upstream call;
//!   - [`limits`]: the quota reservation;
//!   - [`upstream`]: the DashScope client with retries, and the parsing of
//!     its answers;
//!   - [`metering`]: the [`Usage`](metering::Usage) of an answer, recorded
//!     in [`metrics`] and the [`ledger`] (its journal on disk before the
//!     answer is sent; shipped to Redis or SQLite exactly once);
//!   - [`response`]: answers rendered as JSON or SSE, with their headers.
//! - [`uploads`]: the SDK's upload-policy call: only `getPolicy` for a
//!   served model is forwarded, at the tenant's own uploads rate.
//! - [`admin`]: usage reports, and the `embedgate usage` command
//!   (reports, and `--reconcile` against upstream's usage export).
//!
//! Support: [`config`] (TOML, validated), [`reload`] (SIGHUP, file watch),
//! [`redis_store`] (the shared Redis connection), [`error`] (the one error
//! type and its wire mapping), [`body`] (the stack's body types),
//! [`secret`], [`date`], [`app`] (shared state), [`fault`] (injected
//! faults for tests, debug builds only), [`log_writer`] (the bounded,
//! lossy log queue and its writer thread), [`telemetry`] (OpenTelemetry
//! traces over OTLP, off unless configured), `fuzzing` (entry points for the
//! `cargo fuzz` targets in `fuzz/`; hidden, not part of the API).
//!
//! The library's API is what the `embedgate` command needs: [`Gateway`]
//! (and [`run`]), [`Config`], [`Digest`], [`usage_report`], [`LogQueue`]
//! and [`Traces`]; [`Stopped`] says how a run ended.

mod access_log;
mod admin;
mod app;
mod auth;
mod body;
mod body_deadline;
mod cache;
mod cache_key;
mod coalesce;
mod compact;
pub mod config;
mod connection;
mod date;
mod digits;
mod drain;
mod embeddings;
mod error;
mod fair_share;
mod family;
mod fault;
mod forwarded;
/// Entry points for the `cargo fuzz` targets in `fuzz/`: not part of the
/// library's API, only public because the targets are another crate.
#[doc(hidden)]
pub mod fuzzing;
mod gzip;
mod ledger;
mod limits;
mod log_writer;
mod metering;
mod metrics;
mod parse_memo;
mod rate_limit;
mod redis_store;
mod reload;
mod request;
mod request_id;
mod rescue;
mod response;
mod secret;
mod server;
mod shutdown;
mod stack;
mod tasks;
mod telemetry;
mod tenants;
mod uploads;
mod upstream;

use std::future::Future;
use tokio::net::TcpListener;

pub use admin::{usage_report, UsageArgs, UsageOutput};
pub use config::Config;
pub use log_writer::{LogGuard, LogQueue, DEFAULT_QUEUE_LINES};
pub use secret::Digest;
pub use telemetry::Traces;

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Everything owed to the state store was confirmed.
    Clean,
    /// Something was not: quota transitions or ledger rows Redis did not
    /// confirm, or upstream calls that did not end when the shutdown cut
    /// them (the log says which). `embedgate` exits with status 3.
    Unshipped,
}

/// The gateway's state, opened before it listens: a journal directory in
/// use by another process, or a ledger that cannot be opened, stops the
/// start here.
pub struct Gateway {
    app: std::sync::Arc<app::App>,
}

impl Gateway {
    /// Opens everything the gateway needs (Redis connects in the
    /// background). Must run inside a tokio runtime.
    pub fn open(config: Config) -> Result<Gateway, String> {
        Ok(Gateway {
            app: app::App::new(config)?,
        })
    }

    /// Serves on already-bound listeners until `shutdown` resolves. Tests
    /// bind `127.0.0.1:0` and pass the listener in.
    pub async fn run(
        self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Stopped {
        let app = self.app;
        let watcher = tokio::spawn(reload::watch(app.clone()));
        let summaries = tokio::spawn(access_log::summarise_refusals(app.clone()));
        let shipped = server::serve(app.clone(), listener, metrics_listener, shutdown).await;
        watcher.abort();
        summaries.abort();
        // The refusals suppressed since the last summary.
        app.refusal_lines.summarise();
        if shipped {
            Stopped::Clean
        } else {
            Stopped::Unshipped
        }
    }
}

/// Opens the gateway and runs it on already-bound listeners until
/// `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, String> {
    Ok(Gateway::open(config)?
        .run(listener, metrics_listener, shutdown)
        .await)
}
