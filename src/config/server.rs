//! `[server]`: listeners, request limits, shutdown, config watching.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use serde::Deserialize;

use super::check::Check;
use super::values::{HumanDuration, ListenAddr};

/// Loopback: a gateway started without a config is not reachable from other
/// hosts until someone says so; 8080 is the usual unprivileged HTTP port.
const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// DashScope's own request body limit is far above any sane embedding request.
const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Enough concurrency for a busy team's batch jobs, small enough to shed fast.
const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// As long as the default upstream timeout, so a miss in flight at SIGTERM
/// can still finish, be cached and be metered.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Edits (and Kubernetes ConfigMap updates) apply without anyone sending SIGHUP.
const DEFAULT_WATCH_CONFIG: bool = true;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None`: `/metrics` is served on the main listener.
    pub metrics_listen: Option<SocketAddr>,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub shutdown_grace: Duration,
    /// Poll the config file for changes (SIGHUP always works).
    pub watch_config: bool,
}

/// `[server]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    listen: Option<ListenAddr>,
    metrics_listen: Option<ListenAddr>,
    max_body_bytes: Option<i64>,
    max_in_flight: Option<i64>,
    shutdown_grace: Option<HumanDuration>,
    watch_config: Option<bool>,
}

impl RawServer {
    pub(crate) fn load(self, c: &mut Check<'_>) -> ServerConfig {
        ServerConfig {
            listen: self.listen.map_or(DEFAULT_LISTEN, |a| a.0),
            metrics_listen: self.metrics_listen.map(|a| a.0),
            max_body_bytes: c.positive(
                "server.max_body_bytes",
                self.max_body_bytes,
                DEFAULT_MAX_BODY_BYTES,
            ),
            max_in_flight: c.positive(
                "server.max_in_flight",
                self.max_in_flight,
                DEFAULT_MAX_IN_FLIGHT,
            ),
            shutdown_grace: self.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            watch_config: self.watch_config.unwrap_or(DEFAULT_WATCH_CONFIG),
        }
    }
}
