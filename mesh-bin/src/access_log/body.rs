//! `%REQUEST_DURATION%` and `%BYTES_RECEIVED%` of a request with a body:
//! the body is watched on its way upstream, for the moment its last byte
//! arrived and the bytes it carried. Only when some format reads them: a
//! request without a body, or a log that does not need them, is not
//! wrapped.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use mesh_codec::http::body::ProxyBody;

use super::{AccessLogger, HttpLogEntry};

/// What a watched request body reports: when it ended, and its bytes.
#[derive(Debug)]
pub struct BodyMark {
    started: Instant,
    /// Nanoseconds from `started` to the body's end, plus one; 0 until then.
    end: AtomicU64,
    bytes: AtomicU64,
}

impl BodyMark {
    /// Start to the body's last byte, once it has arrived.
    pub fn ended(&self) -> Option<Duration> {
        match self.end.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n - 1)),
        }
    }

    /// The body bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn end(&self) {
        let n = self
            .started
            .elapsed()
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64;
        let _ = self
            .end
            .compare_exchange(0, n + 1, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// A request body reporting to a [`BodyMark`].
struct Watched {
    inner: ProxyBody,
    mark: Arc<BodyMark>,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = mesh_codec::http::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.mark.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                // The sender may stop polling once the body says it ended.
                if f.is_trailers() || self.inner.is_end_stream() {
                    self.mark.end();
                }
            }
            Poll::Ready(None) => self.mark.end(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl AccessLogger {
    /// The request body to send upstream: watched for `entry` when some
    /// format reads `%REQUEST_DURATION%`, or `%BYTES_RECEIVED%` of a body
    /// without `content-length`; else `body` as it is.
    pub fn watch_body(&self, entry: &mut HttpLogEntry, body: ProxyBody) -> ProxyBody {
        let n = &self.inner.needs;
        let wanted = (n.request_duration && entry.request_duration.is_none())
            || (n.bytes_received && entry.bytes_received == 0);
        if !wanted || body.is_end_stream() {
            return body;
        }
        let mark = Arc::new(BodyMark {
            started: entry.started,
            end: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        entry.body = Some(mark.clone());
        ProxyBody::Boxed(Box::pin(Watched { inner: body, mark }))
    }
}
