//! Body read deadline: a request body must arrive in full within
//! `server.body_read_timeout` plus its size at `server.body_min_bytes_per_second`
//! (see `ServerConfig::body_deadline`), counted from when the request
//! arrived. A stalled or trickling body ends in [`BodyTimeout`], which the
//! embedding service answers with 408 `RequestTimeOut`; its slots are then
//! free for others.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

/// The body did not arrive in time.
#[derive(Debug)]
pub(crate) struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimeout {}

/// Wraps a body with its deadline.
pub(crate) struct DeadlineBody<B> {
    inner: B,
    started: Instant,
    base: Duration,
    min_rate: u64,
    received: u64,
    sleep: Pin<Box<Sleep>>,
}

impl<B> DeadlineBody<B> {
    pub(crate) fn new(inner: B, base: Duration, min_rate: u64) -> DeadlineBody<B> {
        let started = Instant::now();
        DeadlineBody {
            inner,
            started,
            base,
            min_rate: min_rate.max(1),
            received: 0,
            sleep: Box::pin(tokio::time::sleep_until(started + base)),
        }
    }

    /// What the bytes received so far have earned.
    fn deadline(&self) -> Instant {
        let earned = Duration::from_millis(self.received.saturating_mul(1000) / self.min_rate);
        self.started + self.base + earned
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                    let deadline = this.deadline();
                    this.sleep.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use tokio::sync::mpsc;

    /// A body fed by a channel, so the test decides when bytes arrive.
    struct Chunks(mpsc::Receiver<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_and_bytes_earn_time() {
        let (tx, rx) = mpsc::channel(4);
        // 1 s base, 1000 B/s: 500 bytes earn half a second more.
        let body = DeadlineBody::new(Chunks(rx), Duration::from_secs(1), 1000);
        let reader = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
        tx.send(Bytes::from(vec![b'x'; 500])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1400)).await;
        assert!(!reader.is_finished(), "500 bytes earned 0.5 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let err = reader.await.unwrap().unwrap_err();
        assert!(err.is::<BodyTimeout>(), "{err}");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_in_time_is_untouched() {
        let body = DeadlineBody::new(
            Full::new(Bytes::from_static(b"hello")),
            Duration::from_secs(1),
            1,
        );
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"hello");
    }
}
