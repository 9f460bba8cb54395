//! A response body slowed to a bandwidth: the fault filter's
//! `response_rate_limit` (`limit_kbps`, KiB per second as in Envoy).
//!
//! Data leaves in slices of 1/16 of a second's worth, each due when the
//! bytes already sent would have taken that long at the rate (the first
//! slice goes at once). Only one inner frame is held at a time and the
//! inner body is not polled while it drains, so throttling never buffers
//! more than one chunk: a fast upstream is slowed by flow control.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// `inner`, delivered at no more than `kbps` KiB per second.
pub struct ThrottledBody<B> {
    inner: Pin<Box<B>>,
    bytes_per_sec: u64,
    slice: usize,
    pending: Bytes,
    started: Option<Instant>,
    sent: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Held until the body is dropped (the fault's active count).
    _guard: Option<Box<dyn std::any::Any + Send>>,
}

impl<B> std::fmt::Debug for ThrottledBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottledBody")
            .field("bytes_per_sec", &self.bytes_per_sec)
            .field("sent", &self.sent)
            .finish()
    }
}

impl<B> ThrottledBody<B> {
    /// Throttles `inner` to `kbps` (≥ 1) KiB/s, holding `guard` until the
    /// body is dropped.
    pub fn new(inner: B, kbps: u64, guard: Option<Box<dyn std::any::Any + Send>>) -> Self {
        let bytes_per_sec = kbps.max(1).saturating_mul(1024);
        ThrottledBody {
            inner: Box::pin(inner),
            bytes_per_sec,
            slice: usize::try_from(bytes_per_sec / 16)
                .unwrap_or(usize::MAX)
                .max(1),
            pending: Bytes::new(),
            started: None,
            sent: 0,
            sleep: None,
            _guard: guard,
        }
    }

    /// When the next slice may go: when the bytes sent so far would have
    /// taken at the rate.
    fn due(&self, start: Instant) -> Instant {
        let nanos = u128::from(self.sent) * 1_000_000_000 / u128::from(self.bytes_per_sec);
        start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

impl<B> Body for ThrottledBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let start = *this.started.get_or_insert_with(Instant::now);
                let due = this.due(start);
                if Instant::now() < due {
                    let sleep = this
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                    sleep.as_mut().reset(due);
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                let n = this.slice.min(this.pending.len());
                let piece = this.pending.split_to(n);
                this.sent += n as u64;
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = self.inner.size_hint();
        let extra = self.pending.len() as u64;
        h.set_lower(h.lower().saturating_add(extra));
        if let Some(u) = h.upper() {
            h.set_upper(u.saturating_add(extra));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test(start_paused = true)]
    async fn the_body_arrives_at_the_rate() {
        // 64 KiB at 16 KiB/s: one slice (1 KiB) at once, the rest over
        // (64 - 1) / 16 s.
        let body = Full::new(Bytes::from(vec![7u8; 64 * 1024]));
        let mut t = ThrottledBody::new(body, 16, None);
        let start = Instant::now();
        let mut got = 0;
        let mut frames = 0;
        while let Some(f) = t.frame().await {
            let d = f.unwrap().into_data().unwrap();
            assert!(d.len() <= 1024);
            got += d.len();
            frames += 1;
        }
        assert_eq!(got, 64 * 1024);
        assert_eq!(frames, 64);
        let took = start.elapsed();
        // The timer rounds each wait up to the millisecond.
        let want = Duration::from_micros(63 * 1_000_000 / 16);
        assert!(
            took >= want && took <= want + Duration::from_millis(2),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn trailers_pass_and_the_guard_lives_as_long_as_the_body() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let frames = futures::stream::iter(vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers(http::HeaderMap::new())),
        ]);
        let body = http_body_util::StreamBody::new(frames);
        let mut t = ThrottledBody::new(body, 1, Some(Box::new(Flag(dropped.clone()))));
        assert_eq!(
            t.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert!(t.frame().await.unwrap().unwrap().is_trailers());
        assert!(t.frame().await.is_none());
        assert!(!dropped.load(Ordering::SeqCst));
        drop(t);
        assert!(dropped.load(Ordering::SeqCst));
    }
}
