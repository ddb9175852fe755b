//! One client connection: the connection cap, the idle timeout (also for a
//! connection that never sends its first byte, HTTP/1 or HTTP/2), the
//! HTTP/1 head timeout and head size, HTTP/2 keep-alive pings, and the
//! graceful close at shutdown.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::body::Body;
use crate::config::ServerConfig;

/// The largest request head (HTTP/1 read buffer, HTTP/2 header list). A
/// DashScope SDK head is well under 2 KiB.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// HTTP/2 pings a quiet connection this often and closes it when a ping
/// is not answered within the same time (a dead peer).
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// How connections are served, built once per listener.
pub(crate) struct ConnectionConfig {
    builder: auto::Builder<TokioExecutor>,
    idle_timeout: Duration,
}

impl ConnectionConfig {
    pub(crate) fn new(server: &ServerConfig) -> ConnectionConfig {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(server.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(H2_KEEP_ALIVE))
            .keep_alive_timeout(H2_KEEP_ALIVE)
            .max_header_list_size(MAX_HEAD_BYTES as u32);
        ConnectionConfig {
            builder,
            idle_timeout: server.idle_timeout,
        }
    }

    /// Serves one connection until it ends. It is closed gracefully (a
    /// request in flight is finished) once it has been idle for
    /// `idle_timeout` or `stop` turns true, and dropped if it is still idle
    /// twice that long. `_slot` is its place under `server.max_connections`.
    pub(crate) async fn serve<S>(
        &self,
        stream: TcpStream,
        svc: S,
        mut stop: watch::Receiver<bool>,
        _slot: OwnedSemaphorePermit,
    ) where
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<Body>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let activity = Arc::new(AtomicU64::new(now_ms()));
        let io = Tracked {
            inner: stream,
            activity: activity.clone(),
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), svc);
        let mut conn = std::pin::pin!(conn);
        let idle_ms = self.idle_timeout.as_millis() as u64;
        let mut tick = tokio::time::interval(
            (self.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing = *stop.borrow();
        if closing {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tick.tick() => {
                    let idle = now_ms().saturating_sub(activity.load(Ordering::Relaxed));
                    if !closing && idle >= idle_ms {
                        // Finishes a request in flight, then closes.
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    } else if closing && idle >= idle_ms.saturating_mul(2) {
                        // A peer that ignores the close (an HTTP/2 client
                        // that never answers the GOAWAY ping) is dropped.
                        return;
                    }
                }
                r = stop.changed(), if !closing => {
                    if r.is_err() || *stop.borrow() {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// Milliseconds on a process-wide monotonic clock.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A stream that records when bytes last moved either way.
struct Tracked {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        self.activity.store(now_ms(), Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
