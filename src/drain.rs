//! Lingering close for request bodies: a body the gateway stops reading
//! early (413 by `Content-Length` or while reading, 401, 429, 503, 404…) is
//! read to its end and discarded after the answer is sent, up to
//! [`DRAIN_MAX_BYTES`] within [`DRAIN_TIMEOUT`].
//!
//! Why: hyper closes a connection whose request body was not read to the
//! end, and a TCP close with unread data answers the client's next bytes
//! with a reset. A client still sending its body then gets a broken pipe or
//! a connection reset instead of the answer (Python's `http.client` always;
//! `requests` where the reset destroys the answer before it is read).
//! Drained, the client finishes sending, reads the answer, and the
//! connection stays open for its next request.
//!
//! What it costs is bounded: a body announced larger than the bound is not
//! read at all (the connection is closed as before), nothing read is kept,
//! and the request itself has already been answered and counted.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http::header::EXPECT;
use http::{Request, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

/// A client over the limit by a few MB (a batch of images inlined by
/// mistake) gets its answer; one sending far more is cut off, as before.
pub(crate) const DRAIN_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Time for the rest of a body to arrive: 16 MiB at 13 Mbit/s. Shorter
/// than the 30 s a body may stall between chunks, since the answer is out.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body that drains itself when dropped unfinished.
pub(crate) struct Lingering<B>
where
    B: Body + Unpin + Send + 'static,
{
    /// `None` once dropped.
    inner: Option<B>,
    /// HTTP/1 only: on HTTP/2 dropping a body resets just its stream.
    linger: bool,
    /// The client sent `Expect: 100-continue` and hyper sends the `100`
    /// only when the body is first read: until then the client sends
    /// nothing, and there is nothing to drain.
    awaiting_continue: bool,
    /// The body ended or failed: nothing left to drain.
    done: bool,
}

impl<B> Lingering<B>
where
    B: Body + Unpin + Send + 'static,
{
    pub(crate) fn wrap(req: Request<B>) -> Request<Lingering<B>> {
        let linger = req.version() <= Version::HTTP_11;
        let awaiting_continue = req
            .headers()
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        req.map(|b| Lingering {
            inner: Some(b),
            linger,
            awaiting_continue,
            done: false,
        })
    }
}

impl<B> Body for Lingering<B>
where
    B: Body + Unpin + Send + 'static,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        this.awaiting_continue = false;
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            this.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(Body::size_hint).unwrap_or_default()
    }
}

impl<B> Drop for Lingering<B>
where
    B: Body + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if self.done || !self.linger || self.awaiting_continue || body.is_end_stream() {
            return;
        }
        // Announced larger than what would be read: close at once.
        if body.size_hint().lower() > DRAIN_MAX_BYTES {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drain(body, DRAIN_MAX_BYTES, DRAIN_TIMEOUT));
        }
    }
}

/// Reads and discards `body` until it ends, fails, passes `max` bytes or
/// `timeout` passes; dropping it then lets hyper keep or close the
/// connection. Returns the bytes read.
async fn drain<B>(mut body: B, max: u64, timeout: Duration) -> u64
where
    B: Body + Unpin,
{
    let mut read = 0u64;
    let _ = tokio::time::timeout(timeout, async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                read += d.remaining() as u64;
                if read > max {
                    break;
                }
            }
        }
    })
    .await;
    if read > 0 {
        tracing::debug!(bytes = read, "drained the unread rest of a request body");
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use std::convert::Infallible;
    use tokio::sync::mpsc;

    /// A body fed through a channel, as a client sends one.
    struct Sent(mpsc::Receiver<Bytes>);

    impl Body for Sent {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn drain_stops_at_the_time_limit() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        // The client then stalls: the drain gives up after the timeout.
        let started = tokio::time::Instant::now();
        let read = drain(Sent(rx), 100, Duration::from_secs(10)).await;
        assert_eq!(read, 3);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_stops_past_the_byte_limit_and_at_the_end() {
        let (tx, rx) = mpsc::channel(4);
        let feeder = tokio::spawn(async move {
            for _ in 0..100 {
                if tx.send(Bytes::from(vec![0u8; 10])).await.is_err() {
                    break;
                }
            }
        });
        assert_eq!(drain(Sent(rx), 25, Duration::from_secs(10)).await, 30);
        feeder.await.unwrap();
        let whole = Full::new(Bytes::from_static(b"12345"));
        assert_eq!(drain(whole, 100, Duration::from_secs(10)).await, 5);
    }

    #[tokio::test]
    async fn only_an_unfinished_http1_body_without_a_pending_continue_lingers() {
        let req = |version, expect: bool| {
            let mut b = Request::builder().version(version);
            if expect {
                b = b.header(EXPECT, "100-continue");
            }
            Lingering::wrap(b.body(Full::new(Bytes::from_static(b"x"))).unwrap()).into_body()
        };
        let b = req(Version::HTTP_11, false);
        assert!(b.linger && !b.awaiting_continue && !b.is_end_stream());
        assert!(!req(Version::HTTP_2, false).linger);
        let mut b = req(Version::HTTP_11, true);
        assert!(b.awaiting_continue);
        // Reading it sends the 100: from then on the client is sending.
        let frame = b.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "x");
        assert!(!b.awaiting_continue);
        assert!(b.frame().await.is_none());
        assert!(b.done && b.is_end_stream());
    }
}
