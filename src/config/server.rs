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
/// The whole shutdown, SIGTERM to exit: the drain gets all but the last 5 s,
/// i.e. the default upstream timeout (30 s), so a miss in flight at SIGTERM
/// can still finish, be cached and be metered; the last 5 s flush quotas
/// and the ledger. Below the shipped pod's 45 s terminationGracePeriodSeconds
/// minus its 5 s preStop, with 5 s to spare.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(35);
/// Edits (and Kubernetes ConfigMap updates) apply without anyone sending SIGHUP.
const DEFAULT_WATCH_CONFIG: bool = true;
/// Far below the usual 65,536 file descriptors, leaving room for upstream
/// and Redis connections; a replica serving more should be scaled out.
const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// A connection with no bytes either way for this long (including one that
/// never sends its first byte) is closed; SDK clients reconnect on demand.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// An HTTP/1 request head is a few hundred bytes: 10 s is generous for any
/// real client and short for a slowloris.
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body (at most `max_body_bytes`) must arrive within this, plus
/// the time `body_min_bytes_per_second` allows for its size.
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// 16 KiB/s: a 1 MiB body may take 64 s more; anything slower is a stall.
const DEFAULT_BODY_MIN_BYTES_PER_SECOND: u64 = 16 * 1024;
/// One tenant may hold half of the in-flight bound, so no team can take
/// the whole gateway; a tenant's own `max_in_flight` overrides it.
const DEFAULT_TENANT_IN_FLIGHT_SHARE: f64 = 0.5;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None`: `/metrics` is served on the main listener.
    pub metrics_listen: Option<SocketAddr>,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    /// The whole shutdown, from SIGTERM to exit (`src/shutdown.rs`).
    pub shutdown_grace: Duration,
    /// Poll the config file for changes (SIGHUP always works).
    pub watch_config: bool,
    /// Open client connections; more are closed as soon as accepted.
    pub max_connections: usize,
    /// No bytes either way for this long: the connection is closed.
    pub idle_timeout: Duration,
    /// Time for a whole HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// Base time for a request body; see [`ServerConfig::body_deadline`].
    pub body_read_timeout: Duration,
    pub body_min_bytes_per_second: u64,
    /// Fraction of `max_in_flight` one tenant may hold by default.
    pub tenant_in_flight_share: f64,
}

impl ServerConfig {
    /// How long a body of `bytes` may take to arrive in all.
    pub fn body_deadline(&self, bytes: u64) -> Duration {
        let rate = self.body_min_bytes_per_second.max(1);
        self.body_read_timeout + Duration::from_millis(bytes.saturating_mul(1000) / rate)
    }

    /// A tenant's in-flight bound: its own, else its share of the global one.
    pub fn tenant_max_in_flight(&self, own: Option<usize>) -> usize {
        own.unwrap_or_else(|| {
            // Saturating float-to-int; the share is in (0, 1].
            ((self.max_in_flight as f64) * self.tenant_in_flight_share).ceil() as usize
        })
        .clamp(1, self.max_in_flight)
    }
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
    max_connections: Option<i64>,
    idle_timeout: Option<HumanDuration>,
    header_read_timeout: Option<HumanDuration>,
    body_read_timeout: Option<HumanDuration>,
    body_min_bytes_per_second: Option<i64>,
    tenant_in_flight_share: Option<f64>,
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
            max_connections: c.positive(
                "server.max_connections",
                self.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            ),
            idle_timeout: self.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            header_read_timeout: self
                .header_read_timeout
                .map_or(DEFAULT_HEADER_READ_TIMEOUT, |d| d.0),
            body_read_timeout: self
                .body_read_timeout
                .map_or(DEFAULT_BODY_READ_TIMEOUT, |d| d.0),
            body_min_bytes_per_second: c.positive(
                "server.body_min_bytes_per_second",
                self.body_min_bytes_per_second,
                DEFAULT_BODY_MIN_BYTES_PER_SECOND,
            ),
            tenant_in_flight_share: match self.tenant_in_flight_share {
                None => DEFAULT_TENANT_IN_FLIGHT_SHARE,
                Some(s) if s > 0.0 && s <= 1.0 => s,
                Some(s) => {
                    c.err(
                        "server.tenant_in_flight_share",
                        format!("must be a fraction in (0, 1], got {s}"),
                    );
                    DEFAULT_TENANT_IN_FLIGHT_SHARE
                }
            },
        }
    }
}
