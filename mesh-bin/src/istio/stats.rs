//! `istio.stats` over HTTP: Istio's standard request metrics
//! (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`) with Istio's labels.
//!
//! The reporter is `source` on an outbound listener (or any listener not
//! marked `INBOUND`) and `destination` on an inbound one, as Istio decides
//! it. This workload's labels come from the node metadata, the peer's from
//! the HTTP metadata exchange (`unknown` without one). `destination_service`
//! is the cluster's `istio.services[0]`, else the request's host unless
//! `disable_host_header_fallback`. `source_principal` on the destination
//! side is the downstream peer certificate's URI SAN; the principals of
//! this proxy's own certificate and of the upstream certificate are not
//! surfaced yet, so they are `unknown`.
//!
//! A request is recorded when its response body ends (or the stream is
//! dropped): duration from the request's arrival, request bytes (headers
//! and body) and response bytes (headers, body and trailers). Series are
//! cached per label tuple, so a known tuple costs a map lookup.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use mesh_codec::http::body::ProxyBody;
use mesh_core::config::istio::{Stats, StatsReporter};
use mesh_core::config::{HttpFilter, TrafficDirection};
use mesh_core::flags::ResponseFlag;
use mesh_core::identity::PeerIdentity;
use mesh_core::stats::{Counter, Histogram, Labels, Store, BYTES_BUCKETS, DURATION_BUCKETS};

use super::metadata::{Exchange, PeerInfo};
use crate::cluster::ClusterEntry;

const UNKNOWN: &str = "unknown";

/// One HCM's compiled `istio.stats`.
#[derive(Debug)]
pub struct IstioStats {
    store: Store,
    /// `reporter="source"` (else `destination`).
    source: bool,
    host_fallback: bool,
    local: PeerInfo,
    series: Mutex<HashMap<Key, Arc<Series>>>,
}

/// The series of one label tuple.
#[derive(Debug)]
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// What tells one label tuple from another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) peer: Option<Arc<PeerInfo>>,
    pub(super) peer_principal: Option<Arc<str>>,
    pub(super) cluster_service: Option<Arc<ClusterKey>>,
    pub(super) host: Option<Box<str>>,
    pub(super) grpc: bool,
    pub(super) code: u16,
    pub(super) grpc_status: Option<Box<str>>,
    pub(super) flag: Option<&'static str>,
    pub(super) mtls: bool,
    /// A TCP connection's tuple (`request_protocol="tcp"`, no response
    /// code or gRPC status).
    pub(super) tcp: bool,
}

/// A cluster's `istio.services[0]` (host, name, namespace).
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct ClusterKey(String, String, String);

impl ClusterKey {
    /// The cluster's service, if istiod named one.
    pub(super) fn of(cluster: &ClusterEntry) -> Option<Arc<Self>> {
        cluster.config.istio_service.as_ref().map(|s| {
            Arc::new(ClusterKey(
                s.host.clone(),
                s.name.clone(),
                s.namespace.clone(),
            ))
        })
    }
}

/// What the router reports back about a request (set in the request's
/// extensions by [`IstioStats::on_request`]).
#[derive(Debug, Clone, Default)]
pub struct Pending(Arc<PendingInner>);

#[derive(Debug, Default)]
struct PendingInner {
    cluster: OnceLock<Arc<ClusterEntry>>,
    body_bytes: AtomicU64,
}

impl Pending {
    /// The cluster the request was sent to.
    pub fn routed(&self, cluster: &Arc<ClusterEntry>) {
        let _ = self.0.cluster.set(cluster.clone());
    }
}

/// One request's state until its response ends.
#[derive(Debug)]
pub struct RequestState {
    started: Instant,
    pending: Pending,
    header_bytes: u64,
    host: Option<Box<str>>,
    grpc: bool,
    identity: Option<Arc<PeerIdentity>>,
}

fn header_bytes(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len()) as u64)
        .sum()
}

impl IstioStats {
    /// Compiles the filter for an HCM.
    pub fn new(config: &Stats, store: &Store) -> Self {
        let source = match config.reporter {
            StatsReporter::ServerGateway => false,
            StatsReporter::Unspecified => config.traffic_direction != TrafficDirection::Inbound,
        };
        IstioStats {
            store: store.clone(),
            source,
            host_fallback: !config.disable_host_header_fallback,
            local: super::metadata::local_peer(),
            series: Mutex::default(),
        }
    }

    /// Starts a request: notes its arrival and head, and leaves a
    /// [`Pending`] for the router.
    pub fn on_request<B>(&self, req: &mut Request<B>) -> RequestState {
        let pending = Pending::default();
        req.extensions_mut().insert(pending.clone());
        let host = self.host_fallback.then(|| {
            let a = mesh_core::view::RequestView::authority(&*req).unwrap_or_default();
            let host = match a.rsplit_once(':') {
                Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => a,
            };
            Box::from(host)
        });
        RequestState {
            started: Instant::now(),
            pending,
            header_bytes: header_bytes(req.headers()),
            host,
            grpc: req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
            identity: req.extensions().get::<Arc<PeerIdentity>>().cloned(),
        }
    }

    /// Wraps the response body: the request is recorded when it ends.
    pub fn on_response(
        self: &Arc<Self>,
        st: RequestState,
        exchange: Option<&Exchange>,
        mut resp: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let peer = exchange.and_then(|e| {
            if self.source {
                e.upstream_peer.clone()
            } else {
                e.downstream_peer.clone()
            }
        });
        let identity = st.identity.as_ref().filter(|_| !self.source);
        let cluster_service = st.pending.0.cluster.get().and_then(|c| ClusterKey::of(c));
        let key = Key {
            peer,
            peer_principal: identity
                .and_then(|i| i.uri_sans.first().map(|s| Arc::from(s.as_str()))),
            host: if cluster_service.is_some() {
                None
            } else {
                st.host.clone()
            },
            cluster_service,
            grpc: st.grpc,
            code: resp.status().as_u16(),
            grpc_status: grpc_status(resp.headers()),
            flag: resp.extensions().get::<ResponseFlag>().map(|f| f.as_str()),
            mtls: identity.is_some(),
            tcp: false,
        };
        let response_bytes = header_bytes(resp.headers());
        let inner = std::mem::take(resp.body_mut());
        *resp.body_mut() = ProxyBody::Boxed(Box::pin(Watched {
            inner,
            watch: Counted {
                bytes: response_bytes,
                end: Some(End {
                    stats: self.clone(),
                    key,
                    st,
                }),
            },
        }));
        resp
    }

    fn series(&self, key: Key) -> Arc<Series> {
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        let labels = self.labels(&key);
        let s = Arc::new(Series {
            requests: self.store.counter("istio_requests_total", &labels),
            duration: self.store.histogram(
                "istio_request_duration_milliseconds",
                &labels,
                DURATION_BUCKETS,
            ),
            request_bytes: self
                .store
                .histogram("istio_request_bytes", &labels, BYTES_BUCKETS),
            response_bytes: self
                .store
                .histogram("istio_response_bytes", &labels, BYTES_BUCKETS),
        });
        map.insert(key, s.clone());
        s
    }

    /// `reporter="source"` (else `destination`).
    pub(super) fn is_source(&self) -> bool {
        self.source
    }

    /// Istio's labels for a tuple, in Istio's order.
    pub(super) fn labels(&self, key: &Key) -> Labels {
        let (src, dst) = if self.source {
            (Some(&self.local), key.peer.as_deref())
        } else {
            (key.peer.as_deref(), Some(&self.local))
        };
        let or_unknown = |s: Option<&str>| match s {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => UNKNOWN.to_owned(),
        };
        let field = |p: Option<&PeerInfo>, f: fn(&PeerInfo) -> &str| or_unknown(p.map(f));
        let label = |p: Option<&PeerInfo>, l: &str| or_unknown(p.and_then(|p| p.label(l)));
        let canonical = |p: Option<&PeerInfo>| {
            or_unknown(p.and_then(|p| {
                p.label("service.istio.io/canonical-name")
                    .or_else(|| p.label("app"))
                    .or(Some(p.workload_name.as_str()))
            }))
        };
        let revision = |p: Option<&PeerInfo>| match p {
            Some(p) => p
                .label("service.istio.io/canonical-revision")
                .or_else(|| p.label("version"))
                .unwrap_or("latest")
                .to_owned(),
            None => UNKNOWN.to_owned(),
        };
        let (service, service_name, service_namespace) = match (&key.cluster_service, &key.host) {
            (Some(c), _) => (c.0.clone(), c.1.clone(), c.2.clone()),
            (None, Some(h)) if !h.is_empty() => (
                h.to_string(),
                h.to_string(),
                field(dst, |p| p.namespace.as_str()),
            ),
            _ => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        let (source_principal, policy) = if self.source {
            (UNKNOWN.to_owned(), UNKNOWN)
        } else if key.mtls {
            (or_unknown(key.peer_principal.as_deref()), "mutual_tls")
        } else {
            (UNKNOWN.to_owned(), "none")
        };
        let mut labels = vec![
            (
                "reporter",
                if self.source { "source" } else { "destination" }.into(),
            ),
            ("source_workload", field(src, |p| p.workload_name.as_str())),
            ("source_canonical_service", canonical(src)),
            ("source_canonical_revision", revision(src)),
            (
                "source_workload_namespace",
                field(src, |p| p.namespace.as_str()),
            ),
            ("source_principal", source_principal),
            ("source_app", label(src, "app")),
            ("source_version", label(src, "version")),
            ("source_cluster", field(src, |p| p.cluster_id.as_str())),
            (
                "destination_workload",
                field(dst, |p| p.workload_name.as_str()),
            ),
            (
                "destination_workload_namespace",
                field(dst, |p| p.namespace.as_str()),
            ),
            ("destination_principal", UNKNOWN.into()),
            ("destination_app", label(dst, "app")),
            ("destination_version", label(dst, "version")),
            ("destination_service", service),
            ("destination_canonical_service", canonical(dst)),
            ("destination_canonical_revision", revision(dst)),
            ("destination_service_name", service_name),
            ("destination_service_namespace", service_namespace),
            ("destination_cluster", field(dst, |p| p.cluster_id.as_str())),
            (
                "request_protocol",
                match (key.tcp, key.grpc) {
                    (true, _) => "tcp",
                    (false, true) => "grpc",
                    (false, false) => "http",
                }
                .into(),
            ),
            ("response_flags", key.flag.unwrap_or("-").into()),
            ("connection_security_policy", policy.into()),
            ("response_code", key.code.to_string()),
            (
                "grpc_response_status",
                key.grpc_status.as_deref().unwrap_or_default().into(),
            ),
        ];
        if key.tcp {
            // Istio's TCP metrics have no response code or gRPC status.
            labels.truncate(labels.len() - 2);
        }
        labels
    }
}

fn grpc_status(h: &HeaderMap) -> Option<Box<str>> {
    h.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(Box::from)
}

/// What is recorded when a response body ends.
#[derive(Debug)]
struct End {
    stats: Arc<IstioStats>,
    key: Key,
    st: RequestState,
}

/// What a [`Watched`] body reports its frames and its end to.
trait Watch: Send + Unpin {
    /// A frame passed; `last` when the body has ended with it.
    fn frame(&mut self, f: &Frame<Bytes>, last: bool);
    /// The body ended, failed or was dropped (called at least once).
    fn end(&mut self);
}

/// A body whose frames are reported to a [`Watch`].
struct Watched<W: Watch> {
    inner: ProxyBody,
    watch: W,
}

impl<W: Watch> Drop for Watched<W> {
    fn drop(&mut self) {
        self.watch.end();
    }
}

impl<W: Watch> Body for Watched<W> {
    type Data = Bytes;
    type Error = mesh_codec::http::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                let last = f.is_trailers() || this.inner.is_end_stream();
                this.watch.frame(f, last);
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.watch.end(),
            Poll::Pending => {}
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

/// A response's bytes, and what to record when it ends.
struct Counted {
    bytes: u64,
    end: Option<End>,
}

impl Watch for Counted {
    fn frame(&mut self, f: &Frame<Bytes>, last: bool) {
        if let Some(d) = f.data_ref() {
            self.bytes += d.len() as u64;
        }
        if let Some(t) = f.trailers_ref() {
            self.bytes += header_bytes(t);
            if let (Some(e), Some(s)) = (self.end.as_mut(), grpc_status(t)) {
                e.key.grpc_status = Some(s);
            }
        }
        if last {
            self.end();
        }
    }

    fn end(&mut self) {
        let Some(mut end) = self.end.take() else {
            return;
        };
        if !end.key.grpc {
            end.key.grpc_status = None;
        } else if end.key.grpc_status.is_none() {
            end.key.grpc_status = Some(Box::from(UNKNOWN));
        }
        let s = end.stats.series(end.key);
        s.requests.inc();
        s.duration
            .record(end.st.started.elapsed().as_secs_f64() * 1000.0);
        let body = end.st.pending.0.body_bytes.load(Ordering::Relaxed);
        s.request_bytes.record((end.st.header_bytes + body) as f64);
        s.response_bytes.record(self.bytes as f64);
    }
}

impl Watch for Pending {
    fn frame(&mut self, f: &Frame<Bytes>, _last: bool) {
        if let Some(d) = f.data_ref() {
            self.0
                .body_bytes
                .fetch_add(d.len() as u64, Ordering::Relaxed);
        }
    }

    fn end(&mut self) {}
}

/// The request body the router sends upstream: counted when the request
/// has `istio.stats` state.
pub fn watch_request(head: &http::request::Parts, body: ProxyBody) -> ProxyBody {
    match head.extensions.get::<Pending>() {
        Some(p) if !body.is_end_stream() => ProxyBody::Boxed(Box::pin(Watched {
            inner: body,
            watch: p.clone(),
        })),
        _ => body,
    }
}

/// A reply made before the request was routed (a malformed request):
/// recorded too, with the peer unknown.
pub fn local_reply<B>(
    stats: &Option<Arc<IstioStats>>,
    req: &mut Request<B>,
    resp: Response<ProxyBody>,
) -> Response<ProxyBody> {
    match stats {
        Some(s) => {
            let st = s.on_request(req);
            s.on_response(st, None, resp)
        }
        None => resp,
    }
}

/// The compiled `istio.stats` of an HCM's filters, if any.
pub fn from_filters(filters: &[HttpFilter], store: &Store) -> Option<Arc<IstioStats>> {
    filters.iter().find_map(|f| match f {
        HttpFilter::IstioStats(c) => Some(Arc::new(IstioStats::new(c, store))),
        _ => None,
    })
}
