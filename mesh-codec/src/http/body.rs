//! The body type the proxy streams in both directions.
//!
//! One enum instead of a boxed trait object: a forwarded body stays a
//! hyper `Incoming` (frames, trailers and end-of-stream pass through
//! untouched), a proxy-made response is a single `Bytes`, and an upstream
//! response body carries what must happen when it ends — its connection
//! goes back to the pool, its endpoint's active-request count drops, and a
//! route timeout still applies while it streams.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Why a proxied body failed mid-stream.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The peer's body failed (reset, closed early, protocol error).
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// The route timeout expired while the response was streaming.
    #[error("upstream request timeout while streaming the response")]
    Timeout,
    /// No frame arrived for the stream idle timeout.
    #[error("stream idle timeout while streaming the response")]
    IdleTimeout,
    /// The downstream request body did not arrive within the HCM
    /// `request_timeout`.
    #[error("request timeout: the request body did not arrive in time")]
    RequestTimeout,
    /// A retry took over the request body from this try.
    #[error("request body taken over by a retry")]
    Superseded,
}

/// Runs a closure when the owning body ends or is dropped, whichever is
/// first.
pub struct OnEnd(Option<Box<dyn FnOnce(bool, u64) + Send + Sync>>);

impl OnEnd {
    /// `f(completed, bytes)`: `completed` is true when the body reached its
    /// end; `bytes` is how many body bytes passed through.
    pub fn new(f: impl FnOnce(bool, u64) + Send + Sync + 'static) -> Self {
        OnEnd(Some(Box::new(f)))
    }

    /// Runs the closure now (once); arguments as in [`OnEnd::new`].
    pub fn fire(&mut self, completed: bool, bytes: u64) {
        if let Some(f) = self.0.take() {
            f(completed, bytes);
        }
    }
}

impl Drop for OnEnd {
    fn drop(&mut self) {
        self.fire(false, 0);
    }
}

impl std::fmt::Debug for OnEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnEnd")
    }
}

/// An upstream response body with its end-of-stream bookkeeping.
pub struct UpstreamBody {
    inner: Incoming,
    on_end: Option<OnEnd>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    idle: Option<IdleTimer>,
    bytes: u64,
    on_trailers: Option<OnTrailers>,
}

/// Called with the response trailers, if the body has any.
type OnTrailers = Box<dyn FnOnce(&http::HeaderMap) + Send + Sync>;

impl UpstreamBody {
    /// Wraps `inner`; `on_end` runs when it ends; `deadline` (if any) fails
    /// the body when it passes first.
    pub fn new(
        inner: Incoming,
        on_end: Option<OnEnd>,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    ) -> Self {
        UpstreamBody {
            inner,
            on_end,
            deadline,
            idle: None,
            bytes: 0,
            on_trailers: None,
        }
    }

    /// Calls `f` with the trailers when they pass (before the body's end
    /// is reported), for the access log.
    pub fn with_trailers(
        mut self,
        f: impl FnOnce(&http::HeaderMap) + Send + Sync + 'static,
    ) -> Self {
        self.on_trailers = Some(Box::new(f));
        self
    }

    /// Fails the body when no frame arrives for `timeout` (the stream idle
    /// timeout).
    pub fn with_idle_timeout(mut self, timeout: Option<std::time::Duration>) -> Self {
        self.idle = timeout.map(|t| IdleTimer {
            timeout: t,
            last: tokio::time::Instant::now(),
            sleep: None,
        });
        self
    }

    fn end(&mut self, completed: bool) {
        if let Some(mut e) = self.on_end.take() {
            e.fire(completed, self.bytes);
        }
    }
}

/// A stream idle timer that costs a clock read per frame: the sleep is
/// created only when the body first waits, and moved forward only when it
/// fires before the idle time has really passed.
struct IdleTimer {
    timeout: std::time::Duration,
    last: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleTimer {
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let due = self.last + self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = self.last + self.timeout;
            if tokio::time::Instant::now() >= due {
                return true;
            }
            sleep.as_mut().reset(due);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body that was already complete (empty, HEAD, 204) counts as read
        // to the end even if nobody polled it, so its connection is reused.
        let done = self.inner.is_end_stream();
        self.end(done);
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.end(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                } else if let Some(t) = frame.trailers_ref() {
                    if let Some(f) = this.on_trailers.take() {
                        f(t);
                    }
                }
                if let Some(idle) = this.idle.as_mut() {
                    idle.last = tokio::time::Instant::now();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        this.end(false);
                        return Poll::Ready(Some(Err(BodyError::Timeout)));
                    }
                }
                if let Some(idle) = this.idle.as_mut() {
                    if idle.poll_expired(cx) {
                        this.end(false);
                        return Poll::Ready(Some(Err(BodyError::IdleTimeout)));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

/// A body the proxy sends: forwarded, proxy-made, or empty.
#[derive(Default)]
pub enum ProxyBody {
    /// No body.
    #[default]
    Empty,
    /// A complete body held in memory (direct responses, error replies).
    Full(Option<Bytes>),
    /// A downstream request body being forwarded upstream.
    Incoming(Incoming),
    /// An upstream response body being forwarded downstream.
    Upstream(UpstreamBody),
    /// A downstream request body that must arrive whole before a deadline
    /// (the HCM `request_timeout`).
    Deadline(Incoming, Pin<Box<tokio::time::Sleep>>),
    /// Any other body (a request body replayed for a retry).
    Boxed(Pin<Box<dyn Body<Data = Bytes, Error = BodyError> + Send>>),
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyBody::Empty => f.write_str("Empty"),
            ProxyBody::Full(b) => f.debug_tuple("Full").field(b).finish(),
            ProxyBody::Incoming(b) => f.debug_tuple("Incoming").field(b).finish(),
            ProxyBody::Upstream(b) => f.debug_tuple("Upstream").field(b).finish(),
            ProxyBody::Deadline(b, _) => f.debug_tuple("Deadline").field(b).finish(),
            ProxyBody::Boxed(_) => f.write_str("Boxed"),
        }
    }
}

impl ProxyBody {
    /// A body of these bytes.
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        if b.is_empty() {
            ProxyBody::Empty
        } else {
            ProxyBody::Full(Some(b))
        }
    }
}

impl From<Incoming> for ProxyBody {
    fn from(b: Incoming) -> Self {
        ProxyBody::Incoming(b)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        // Every variant is Unpin (Incoming is; UpstreamBody's fields are).
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Boxed(b) => b.as_mut().poll_frame(cx),
            ProxyBody::Deadline(b, deadline) => match Pin::new(b).poll_frame(cx) {
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        Poll::Ready(Some(Err(BodyError::RequestTimeout)))
                    } else {
                        Poll::Pending
                    }
                }
                other => other.map_err(BodyError::from),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Incoming(b) => b.is_end_stream(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Deadline(b, _) => b.is_end_stream(),
            ProxyBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Incoming(b) => b.size_hint(),
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Deadline(b, _) => b.size_hint(),
            ProxyBody::Boxed(b) => b.size_hint(),
        }
    }
}
