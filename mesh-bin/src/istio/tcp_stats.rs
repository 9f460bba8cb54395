//! `istio.stats` as a network filter before `tcp_proxy`: Istio's TCP
//! metrics (`istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total`,
//! `istio_tcp_received_bytes_total`).
//!
//! The labels are the HTTP filter's ([`IstioStats`]) with
//! `request_protocol="tcp"` and without `response_code` and
//! `grpc_response_status`, as Istio's. The peer is the one the TCP
//! metadata exchange learned (`unknown` without one) and
//! `destination_service` is the cluster's `istio.services[0]`.
//!
//! Bytes are counted on the downstream connection: received from it and
//! sent to it (after the exchange's own frames). A connection is reported
//! once it reached its upstream: every `tcp_reporting_duration` (Istio's
//! default 15 s) the byte deltas, and at close the last deltas and the
//! close. It is counted as opened at its first report, so that the peer
//! learned by the exchange is in its labels.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_core::config::istio::Stats;
use mesh_core::flags::ResponseFlag;
use mesh_core::identity::PeerIdentity;
use mesh_core::stats::{Counter, Store};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::metadata::PeerInfo;
use super::stats::{ClusterKey, IstioStats, Key};
use super::tcp_exchange::TcpPeers;
use crate::cluster::ClusterEntry;

/// Istio's default `tcp_reporting_duration`.
pub const DEFAULT_REPORTING: Duration = Duration::from_secs(15);

/// One `tcp_proxy`'s compiled network `istio.stats`.
#[derive(Debug)]
pub struct IstioTcpStats {
    labels: IstioStats,
    store: Store,
    every: Duration,
    series: Mutex<HashMap<Key, Arc<TcpSeries>>>,
}

/// The counters of one label tuple.
#[derive(Debug)]
struct TcpSeries {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl IstioTcpStats {
    /// Compiles the filter.
    pub fn new(config: &Stats, store: &Store) -> Self {
        IstioTcpStats {
            labels: IstioStats::new(config, store),
            store: store.clone(),
            every: config
                .tcp_reporting_duration
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_REPORTING),
            series: Mutex::default(),
        }
    }

    /// The meter of one downstream connection to `cluster`; `identity` is
    /// the downstream's TLS peer, if any.
    pub fn connection(
        self: &Arc<Self>,
        peers: &TcpPeers,
        cluster: &ClusterEntry,
        identity: Option<&PeerIdentity>,
    ) -> Arc<TcpMeter> {
        // The downstream's certificate speaks for the source only on the
        // destination side (as the HTTP filter).
        let identity = identity.filter(|_| !self.labels.is_source());
        Arc::new(TcpMeter {
            stats: self.clone(),
            peers: peers.clone(),
            service: ClusterKey::of(cluster),
            principal: identity.and_then(|i| i.uri_sans.first().map(|s| Arc::from(s.as_str()))),
            mtls: identity.is_some(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            state: Mutex::default(),
        })
    }

    fn series(&self, key: Key) -> Arc<TcpSeries> {
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        let labels = self.labels.labels(&key);
        let s = Arc::new(TcpSeries {
            opened: self
                .store
                .counter("istio_tcp_connections_opened_total", &labels),
            closed: self
                .store
                .counter("istio_tcp_connections_closed_total", &labels),
            sent: self.store.counter("istio_tcp_sent_bytes_total", &labels),
            received: self
                .store
                .counter("istio_tcp_received_bytes_total", &labels),
        });
        map.insert(key, s.clone());
        s
    }
}

/// One connection's byte counts and what was reported of them.
#[derive(Debug)]
pub struct TcpMeter {
    stats: Arc<IstioTcpStats>,
    peers: TcpPeers,
    service: Option<Arc<ClusterKey>>,
    principal: Option<Arc<str>>,
    mtls: bool,
    received: AtomicU64,
    sent: AtomicU64,
    state: Mutex<Reported>,
}

#[derive(Debug, Default)]
struct Reported {
    connected: bool,
    opened: bool,
    closed: bool,
    received: u64,
    sent: u64,
    peer: Option<Arc<PeerInfo>>,
}

/// Stops a connection's periodic reports when dropped.
#[derive(Debug)]
pub struct Ticker(tokio::task::JoinHandle<()>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TcpMeter {
    /// The connection reached its upstream: it is reported from now on,
    /// every `tcp_reporting_duration` until the returned [`Ticker`] drops.
    pub fn connected(self: &Arc<Self>) -> Ticker {
        self.lock().connected = true;
        let meter = self.clone();
        let every = self.stats.every;
        Ticker(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                meter.report(None);
            }
        }))
    }

    /// The connection closed (with `flag`, if it failed): the last report.
    pub fn close(&self, flag: Option<ResponseFlag>) {
        self.report(Some(flag.map(|f| f.as_str())));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reported> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports the byte deltas (and the close when `end` is set, with its
    /// response flag).
    fn report(&self, end: Option<Option<&'static str>>) {
        let mut st = self.lock();
        if !st.connected || st.closed {
            return;
        }
        if st.peer.is_none() {
            let slot = if self.stats.labels.is_source() {
                &self.peers.upstream
            } else {
                &self.peers.downstream
            };
            st.peer = slot.get().map(|p| Arc::new(p.info.clone()));
        }
        let key = Key {
            peer: st.peer.clone(),
            peer_principal: self.principal.clone(),
            cluster_service: self.service.clone(),
            host: None,
            grpc: false,
            code: 0,
            grpc_status: None,
            flag: end.flatten(),
            mtls: self.mtls,
            tcp: true,
        };
        let series = self.stats.series(key);
        if !st.opened {
            st.opened = true;
            series.opened.inc();
        }
        let received = self.received.load(Ordering::Relaxed);
        let sent = self.sent.load(Ordering::Relaxed);
        series.received.add(received - st.received);
        series.sent.add(sent - st.sent);
        st.received = received;
        st.sent = sent;
        if end.is_some() {
            st.closed = true;
            series.closed.inc();
        }
    }
}

/// A downstream stream whose bytes are counted for a [`TcpMeter`]
/// (untouched without one).
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    meter: Option<Arc<TcpMeter>>,
}

impl<S> Metered<S> {
    /// Counts `inner`'s bytes into `meter`.
    pub fn new(inner: S, meter: Option<Arc<TcpMeter>>) -> Self {
        Metered { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Some(m), Poll::Ready(Ok(()))) = (&this.meter, &r) {
            let n = (buf.filled().len() - before) as u64;
            m.received.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.count_sent(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.count_sent(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S> Metered<S> {
    fn count_sent(&self, r: &Poll<io::Result<usize>>) {
        if let (Some(m), Poll::Ready(Ok(n))) = (&self.meter, r) {
            m.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}
