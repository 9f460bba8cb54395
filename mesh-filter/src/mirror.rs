//! Request mirroring (Envoy route `request_mirror_policies`): a fraction of
//! requests is copied, fire-and-forget, to a shadow cluster with `-shadow`
//! appended to the authority. The primary request never waits for, nor
//! fails because of, its shadow.
//!
//! The pieces here are the ones the proxy and any tower stack share:
//! [`MirrorLayer`] does it in any tower stack; [`sampled`] decides whether a request is mirrored, [`shadow_authority`]
//! names the shadow host, and [`TeeBody`] copies a request body, up to a
//! bound, while it streams to the primary upstream. The copy is handed
//! over only when the whole body fits the bound; past it the shadow is
//! dropped (never unbounded buffering).
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use mesh_filter::mirror::{shadow_authority, TeeBody};
//!
//! # tokio_test_block_on(async {
//! let (tee, copy) = TeeBody::new(Full::new(Bytes::from_static(b"hello")), 1024);
//! // The primary reads the body as usual ...
//! let primary = tee.collect().await.unwrap().to_bytes();
//! assert_eq!(primary, "hello");
//! // ... and the shadow gets the same bytes once it has ended.
//! assert_eq!(copy.await.unwrap(), "hello");
//! assert_eq!(shadow_authority("api.example:8080"), "api.example-shadow:8080");
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use mesh_core::policy::FractionalPercent;
use tokio::sync::oneshot;

/// Whether a request falls in `fraction` (a fresh random draw).
pub fn sampled(fraction: FractionalPercent) -> bool {
    fraction.numerator > 0
        && (fraction.numerator >= fraction.denominator
            || fastrand::u32(0..fraction.denominator) < fraction.numerator)
}

/// The shadow authority: `-shadow` appended to the host, before any port
/// (as Envoy does: `foo:8080` becomes `foo-shadow:8080`). An IPv6 literal
/// (`[::1]:80`) keeps its brackets around the address.
pub fn shadow_authority(authority: &str) -> String {
    let split = match authority.rfind(':') {
        // A colon inside `[...]` is part of an IPv6 address, not a port.
        Some(i) if !authority[i..].contains(']') => i,
        _ => authority.len(),
    };
    let (host, port) = authority.split_at(split);
    format!("{host}-shadow{port}")
}

/// A request body that copies its data, up to `limit` bytes, while it is
/// read; when it ends within the limit the copy is sent to the receiver
/// returned by [`TeeBody::new`]. When the body goes past the limit, fails
/// or is dropped before its end, the receiver gets an error instead (the
/// sender is dropped) and the shadow is not sent.
pub struct TeeBody<B> {
    inner: B,
    copy: Option<(BytesMut, oneshot::Sender<Bytes>)>,
    limit: usize,
}

impl<B> TeeBody<B> {
    /// Wraps `inner`; the receiver resolves to the whole body once read.
    pub fn new(inner: B, limit: usize) -> (Self, oneshot::Receiver<Bytes>) {
        let (tx, rx) = oneshot::channel();
        (
            TeeBody {
                inner,
                copy: Some((BytesMut::new(), tx)),
                limit,
            },
            rx,
        )
    }

    fn finish(&mut self) {
        if let Some((buf, tx)) = self.copy.take() {
            let _ = tx.send(buf.freeze());
        }
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let over = this
                        .copy
                        .as_ref()
                        .is_some_and(|(buf, _)| buf.len() + data.len() > this.limit);
                    if over {
                        this.copy = None;
                    } else if let Some((buf, _)) = this.copy.as_mut() {
                        buf.extend_from_slice(data);
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => this.copy = None,
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A `tower::Layer` that mirrors a `fraction` of requests to a shadow
/// service, fire-and-forget: the inner service gets the request at once
/// (its body wrapped in a [`TeeBody`]), and the shadow service gets a copy
/// with `-shadow` appended to the authority once the body has been read
/// whole within `limit` bytes. The shadow's response and errors are
/// dropped; the inner service's response is never delayed by them.
/// Needs a tokio runtime (shadows run on spawned tasks).
#[derive(Clone)]
pub struct MirrorLayer<M> {
    shadow: M,
    fraction: FractionalPercent,
    limit: usize,
}

impl<M> MirrorLayer<M> {
    /// Mirrors `fraction` of requests to `shadow`, bodies up to `limit`.
    pub fn new(shadow: M, fraction: FractionalPercent, limit: usize) -> Self {
        MirrorLayer {
            shadow,
            fraction,
            limit,
        }
    }
}

impl<S, M: Clone> tower::Layer<S> for MirrorLayer<M> {
    type Service = Mirror<S, M>;

    fn layer(&self, inner: S) -> Mirror<S, M> {
        Mirror {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`MirrorLayer`].
#[derive(Clone)]
pub struct Mirror<S, M> {
    inner: S,
    layer: MirrorLayer<M>,
}

impl<S, M, B> tower::Service<http::Request<B>> for Mirror<S, M>
where
    S: tower::Service<http::Request<TeeBody<B>>>,
    M: tower::Service<http::Request<Bytes>> + Clone + Send + 'static,
    M::Future: Send,
    B: Body<Data = Bytes> + Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> S::Future {
        let (parts, body) = req.into_parts();
        let (tee, rx) = TeeBody::new(body, self.layer.limit);
        if sampled(self.layer.fraction) {
            let mut head = http::Request::new(Bytes::new());
            *head.method_mut() = parts.method.clone();
            *head.uri_mut() = parts.uri.clone();
            *head.version_mut() = parts.version;
            *head.headers_mut() = parts.headers.clone();
            shadow_head(&mut head);
            let shadow = self.layer.shadow.clone();
            tokio::spawn(async move {
                let Ok(body) = rx.await else { return };
                *head.body_mut() = body;
                let _ = tower::ServiceExt::oneshot(shadow, head).await;
            });
        }
        self.inner.call(http::Request::from_parts(parts, tee))
    }
}

/// Appends `-shadow` to the request's authority (URI and `Host`).
fn shadow_head<T>(req: &mut http::Request<T>) {
    if let Some(a) = req.uri().authority() {
        let mut uri = req.uri().clone().into_parts();
        if let Ok(a) = shadow_authority(a.as_str()).parse() {
            uri.authority = Some(a);
            if let Ok(u) = http::Uri::from_parts(uri) {
                *req.uri_mut() = u;
            }
        }
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(shadow_authority);
    if let Some(v) = host.and_then(|h| http::HeaderValue::from_str(&h).ok()) {
        req.headers_mut().insert(http::header::HOST, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[test]
    fn shadow_suffix_goes_before_the_port() {
        assert_eq!(shadow_authority("foo"), "foo-shadow");
        assert_eq!(shadow_authority("foo:8080"), "foo-shadow:8080");
        assert_eq!(shadow_authority("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(shadow_authority("[::1]"), "[::1]-shadow");
    }

    #[test]
    fn sampling_follows_the_fraction() {
        let none = FractionalPercent::ZERO;
        let all = FractionalPercent::HUNDRED;
        assert!(!(0..1000).any(|_| sampled(none)));
        assert!((0..1000).all(|_| sampled(all)));
        let half = FractionalPercent {
            numerator: 50,
            denominator: 100,
        };
        let n = (0..10_000).filter(|_| sampled(half)).count();
        assert!((4_000..6_000).contains(&n), "{n}");
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_copied() {
        let chunks = Chunks([Bytes::from_static(b"ab"), Bytes::from_static(b"cd")].into());
        let (tee, rx) = TeeBody::new(chunks, 4);
        let got = tee.collect().await.unwrap().to_bytes();
        assert_eq!(got, "abcd");
        assert_eq!(rx.await.unwrap(), "abcd");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_not_copied_but_still_forwarded() {
        let (tee, rx) = TeeBody::new(Full::new(Bytes::from_static(b"hello")), 4);
        let got = tee.collect().await.unwrap().to_bytes();
        assert_eq!(got, "hello");
        assert!(rx.await.is_err());
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_is_not_copied() {
        let (tee, rx) = TeeBody::new(Full::new(Bytes::from_static(b"hello")), 1024);
        drop(tee);
        assert!(rx.await.is_err());
    }

    #[tokio::test]
    async fn the_layer_sends_a_shadow_copy_and_answers_from_the_primary() {
        use tower::{Layer, ServiceExt};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let shadow = tower::service_fn(move |r: http::Request<Bytes>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(r);
                // A shadow that never answers in time must not matter.
                std::future::pending::<Result<(), std::convert::Infallible>>().await
            }
        });
        let primary = tower::service_fn(|r: http::Request<TeeBody<Full<Bytes>>>| async move {
            let body = r.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, std::convert::Infallible>(body)
        });
        let svc = MirrorLayer::new(shadow, FractionalPercent::HUNDRED, 1024).layer(primary);
        let req = http::Request::post("http://api:80/x")
            .header("host", "api:80")
            .body(Full::new(Bytes::from_static(b"data")))
            .unwrap();
        assert_eq!(svc.oneshot(req).await.unwrap(), "data");
        let copy = rx.recv().await.unwrap();
        assert_eq!(copy.uri(), "http://api-shadow:80/x");
        assert_eq!(copy.headers()["host"], "api-shadow:80");
        assert_eq!(copy.body(), "data");
    }

    /// A body of several data frames.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }
}
