//! A Redis connection (standalone or Cluster) with a health flag and
//! per-call timeouts. The gateway has one for the cache and one for the
//! state (limits and ledger), or a single one holding both when
//! `state.redis_url` is the cache's ([`Holds`]).
//!
//! Requests never wait on a Redis that is known to be down: the first failed
//! call marks it down, hot-path callers then skip it, and a background probe
//! marks it up again. Every key a tenant touches carries the hash tag
//! `{eg:<tenant>}` so one tenant's keys live in one Cluster slot and its Lua
//! scripts stay atomic.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::sync::{Notify, OnceCell};

use crate::metrics::Metrics;
use crate::secret::Secret;

/// How often a down Redis is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// What one Redis holds: its `store` label(s) in `embedgate_redis_up`, and
/// the config key its errors name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holds {
    /// Cached embeddings only (`cache.redis_url`).
    Cache,
    /// Rate buckets, quotas and the ledger only (`state.redis_url`).
    State,
    /// Both (`state.redis_url` left to default to `cache.redis_url`).
    Both,
}

impl Holds {
    /// Values of the `store` label this Redis reports under.
    pub(crate) fn stores(self) -> &'static [&'static str] {
        match self {
            Holds::Cache => &["cache"],
            Holds::State => &["state"],
            Holds::Both => &["cache", "state"],
        }
    }

    /// For logs: `cache`, `state` or `cache+state`.
    fn label(self) -> &'static str {
        match self {
            Holds::Cache => "cache",
            Holds::State => "state",
            Holds::Both => "cache+state",
        }
    }

    fn url_key(self) -> &'static str {
        match self {
            Holds::Cache | Holds::Both => "cache.redis_url",
            Holds::State => "state.redis_url",
        }
    }
}

/// One connection handle, cheap to clone, multiplexed underneath.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Why a Redis call did not give an answer.
#[derive(Debug)]
pub(crate) enum StoreError {
    /// Known down (or not yet connected); the call was not attempted.
    Down,
    Timeout,
    Redis(redis::RedisError),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Down => f.write_str("redis is down"),
            StoreError::Timeout => f.write_str("redis call timed out"),
            StoreError::Redis(e) => write!(f, "redis error: {e}"),
        }
    }
}

pub(crate) struct RedisStore {
    conn: OnceCell<Conn>,
    /// Last known health: [`UNKNOWN`] until the first call or probe answers.
    state: AtomicU8,
    /// Woken when Redis comes back, so buffered work is flushed at once.
    pub(crate) came_up: Notify,
    timeout: Duration,
    holds: Holds,
    metrics: Arc<Metrics>,
}

impl RedisStore {
    /// Starts connecting in the background and returns at once: the gateway
    /// serves (without Redis) while Redis is unreachable.
    ///
    /// `url` is one `redis://` URL, or for a Cluster a comma-separated list of
    /// seed node URLs.
    pub(crate) fn start(
        url: &Secret,
        cluster: bool,
        timeout: Duration,
        holds: Holds,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<RedisStore>, String> {
        for store in holds.stores() {
            metrics.redis_up.with_label_values(&[store]).set(0);
        }
        let store = Arc::new(RedisStore {
            conn: OnceCell::new(),
            state: AtomicU8::new(UNKNOWN),
            came_up: Notify::new(),
            timeout,
            holds,
            metrics,
        });
        let key = holds.url_key();
        let nodes: Vec<String> = url
            .expose()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if cluster {
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(timeout * 4)
                .response_timeout(timeout)
                .build()
                .map_err(|e| format!("{key}: {}", redact(&e.to_string())))?;
            let s = store.clone();
            tokio::spawn(async move {
                loop {
                    match client.get_async_connection().await {
                        Ok(c) => {
                            let _ = s.conn.set(Conn::Cluster(c));
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(store = holds.label(), error = %redact(&e.to_string()), "redis cluster not reachable yet");
                            tokio::time::sleep(PROBE_INTERVAL * 4).await;
                        }
                    }
                }
            });
        } else {
            let first = nodes.first().cloned().unwrap_or_default();
            let client = redis::Client::open(first)
                .map_err(|e| format!("{key}: {}", redact(&e.to_string())))?;
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout * 4))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            let mgr = ConnectionManager::new_lazy_with_config(client, cfg)
                .map_err(|e| format!("{key}: {}", redact(&e.to_string())))?;
            let _ = store.conn.set(Conn::Single(mgr));
        }
        let s = store.clone();
        tokio::spawn(async move { s.probe_loop().await });
        Ok(store)
    }

    /// True when the last call or probe got an answer.
    pub(crate) fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// False only when Redis is known to be down: right after start, calls
    /// are attempted before the first probe has answered.
    fn worth_trying(&self) -> bool {
        self.state.load(Ordering::Relaxed) != DOWN
    }

    /// Records health; true when this changed it from not-up to up.
    fn set_up(&self, up: bool) -> bool {
        let prev = self
            .state
            .swap(if up { UP } else { DOWN }, Ordering::Relaxed);
        for store in self.holds.stores() {
            self.metrics
                .redis_up
                .with_label_values(&[store])
                .set(i64::from(up));
        }
        up && prev != UP
    }

    async fn probe_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ok = match self.conn.get() {
                None => false,
                Some(c) => {
                    let mut c = c.clone();
                    matches!(
                        tokio::time::timeout(
                            self.timeout * 4,
                            redis::cmd("PING").query_async::<String>(&mut c)
                        )
                        .await,
                        Ok(Ok(_))
                    )
                }
            };
            let was_up = self.is_up();
            if self.set_up(ok) {
                tracing::info!(store = self.holds.label(), "redis is reachable");
                self.came_up.notify_waiters();
            } else if !ok && was_up {
                tracing::warn!(
                    store = self.holds.label(),
                    "redis is unreachable; serving without it"
                );
            }
        }
    }

    /// Runs one Redis call with the configured timeout. `op` names the call
    /// in `embedgate_cache_errors_total{op}`. `force` attempts the call even
    /// when Redis is believed down (background flushers use it).
    pub(crate) async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        force: bool,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(conn) = self.conn.get() else {
            self.metrics.cache_errors.with_label_values(&[op]).inc();
            return Err(StoreError::Down);
        };
        if !force && !self.worth_trying() {
            self.metrics.cache_errors.with_label_values(&[op]).inc();
            return Err(StoreError::Down);
        }
        let r = match tokio::time::timeout(self.timeout, f(conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout),
        };
        match &r {
            Ok(_) => {
                if !self.is_up() && self.set_up(true) {
                    self.came_up.notify_waiters();
                }
            }
            Err(e) => {
                self.metrics.cache_errors.with_label_values(&[op]).inc();
                // A script error is a bug, not an outage.
                let outage = !matches!(e, StoreError::Redis(re) if re.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError));
                if outage && self.state.load(Ordering::Relaxed) != DOWN {
                    self.set_up(false);
                    tracing::warn!(store = self.holds.label(), op, error = %e, "redis call failed; serving without it");
                }
            }
        }
        r
    }

    /// Waits until Redis is believed up.
    pub(crate) async fn wait_up(&self) {
        loop {
            let notified = self.came_up.notified();
            if self.is_up() {
                return;
            }
            notified.await;
        }
    }
}

/// Removes a password from a Redis URL inside an error message.
fn redact(s: &str) -> String {
    match (s.find("://"), s.find('@')) {
        (Some(a), Some(b)) if b > a => format!("{}://*****{}", &s[..a], &s[b..]),
        _ => s.to_string(),
    }
}

/// The hash-tagged prefix of every key that belongs to `tenant`.
pub(crate) fn tenant_tag(tenant: &str) -> String {
    format!("{{eg:{tenant}}}")
}
