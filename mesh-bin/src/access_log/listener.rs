//! A listener's own `access_log`: one line per downstream connection, written
//! when the connection closes, as Envoy's listener access logs are. It also
//! covers connections closed before any network filter ran: no filter chain
//! matched (flag `NR`, details `filter_chain_not_found`), the listener filter
//! timed out, the TLS handshake failed (`%DOWNSTREAM_TRANSPORT_FAILURE_REASON%`).
//! Istio sets one with a `response_flag_filter` on `NR`.
//!
//! The record is a [`ConnLog`] kept by the task serving the connection; it
//! logs when dropped, so every way the task ends is logged. The connection's
//! bytes are counted by [`Metered`] (after TLS decryption, as Envoy counts
//! them); a TCP proxy connection adds its upstream, cluster and flag.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use mesh_core::flags::ResponseFlag;
use mesh_core::identity::PeerIdentity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{AccessLogger, LogRecord};

/// What a TCP proxy connection reports for the log lines of its connection.
#[derive(Clone, Default)]
pub struct TcpOutcome {
    /// The response flag, if any.
    pub flag: Option<ResponseFlag>,
    /// The upstream endpoint, if one was picked.
    pub upstream: Option<SocketAddr>,
    /// The upstream connection's local address, once connected.
    pub upstream_local: Option<SocketAddr>,
    /// The cluster.
    pub cluster: Option<Arc<crate::cluster::ClusterEntry>>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub failure: Option<String>,
}

/// `%UPSTREAM_TRANSPORT_FAILURE_REASON%` of a failed connect, in Envoy's
/// words: `delayed_connect_error:_Connection_refused`.
pub fn connect_failure_reason(e: &io::Error) -> String {
    let text = match e.raw_os_error() {
        // The system's message without Rust's " (os error N)".
        Some(code) => {
            let t = io::Error::from_raw_os_error(code).to_string();
            match t.find(" (os error") {
                Some(i) => t[..i].to_owned(),
                None => t,
            }
        }
        None => e.to_string(),
    };
    no_spaces(&format!("delayed_connect_error: {text}"))
}

/// `%DOWNSTREAM_TRANSPORT_FAILURE_REASON%` / `%UPSTREAM_TRANSPORT_FAILURE_REASON%`
/// of a failed TLS handshake: `TLS_error:<reason>:<message>`.
pub fn tls_failure_reason(reason: &str, message: &str) -> String {
    no_spaces(&format!("TLS_error:{reason}:{message}"))
}

/// A failed upstream transport handshake inside an `io::Error`, with its
/// `%UPSTREAM_TRANSPORT_FAILURE_REASON%` (see [`upstream_failure_reason`]).
#[derive(Debug)]
pub struct TransportFailure {
    /// The error text.
    pub message: String,
    /// The reason as Envoy writes it (`TLS_error:...`).
    pub reason: String,
}

impl std::fmt::Display for TransportFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TransportFailure {}

/// `%UPSTREAM_TRANSPORT_FAILURE_REASON%` of a failed upstream connect: the
/// socket error, or the [`TransportFailure`] a connector reported; `None`
/// for a connect timeout (Envoy has no reason then either).
pub fn upstream_failure_reason(e: &io::Error) -> Option<String> {
    if e.raw_os_error().is_some() {
        return Some(connect_failure_reason(e));
    }
    e.get_ref()
        .and_then(|i| i.downcast_ref::<TransportFailure>())
        .map(|t| t.reason.clone())
}

/// As Envoy writes failure reasons: no white space.
fn no_spaces(s: &str) -> String {
    s.replace(char::is_whitespace, "_")
}

/// Bytes a connection moved, counted by [`Metered`].
#[derive(Debug, Default)]
pub struct Meter {
    received: AtomicU64,
    sent: AtomicU64,
    /// 0: nothing read yet; 1: HTTP/1.1; 2: HTTP/2 (the first bytes read
    /// were the HTTP/2 preface).
    protocol: AtomicU8,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// A stream that counts what it reads and writes into a [`Meter`] (or is a
/// plain pass-through without one).
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    meter: Option<Arc<Meter>>,
}

impl<S> Metered<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, meter: Option<Arc<Meter>>) -> Self {
        Metered { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Some(m) = &self.meter {
            let new = &buf.filled()[before..];
            if !new.is_empty() && m.received.fetch_add(new.len() as u64, Ordering::Relaxed) == 0 {
                let n = new.len().min(H2_PREFACE.len());
                let h2 = new[..n] == H2_PREFACE[..n];
                m.protocol.store(if h2 { 2 } else { 1 }, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count(&r);
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

impl<S> Metered<S> {
    fn count(&self, r: &Poll<io::Result<usize>>) {
        if let (Some(m), Poll::Ready(Ok(n))) = (&self.meter, r) {
            m.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

/// One downstream connection's listener log record; logged when dropped.
#[derive(Debug)]
pub struct ConnLog {
    logger: AccessLogger,
    start: SystemTime,
    started: Instant,
    peer: SocketAddr,
    local: SocketAddr,
    id: u64,
    flag: Option<ResponseFlag>,
    details: Option<&'static str>,
    transport_failure: Option<String>,
    termination: Option<String>,
    tls: Option<Arc<PeerIdentity>>,
    sni: Option<Box<str>>,
    meter: Arc<Meter>,
    http: bool,
    tcp: Option<TcpOutcome>,
}

impl ConnLog {
    /// A record for the connection from `peer` accepted on `local`.
    pub fn new(logger: &AccessLogger, peer: SocketAddr, local: SocketAddr) -> Self {
        ConnLog {
            logger: logger.clone(),
            start: SystemTime::now(),
            started: Instant::now(),
            peer,
            local,
            id: super::next_connection_id(),
            flag: None,
            details: None,
            transport_failure: None,
            termination: None,
            tls: None,
            sni: None,
            meter: Arc::default(),
            http: false,
            tcp: None,
        }
    }

    /// The connection's id (`%CONNECTION_ID%`), for the filters' own logs.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The meter to count the connection's bytes with.
    pub fn meter(&self) -> Arc<Meter> {
        self.meter.clone()
    }

    /// No filter chain matched: `NR`, `filter_chain_not_found`.
    pub fn no_filter_chain(&mut self) {
        self.flag = Some(ResponseFlag::NoRouteFound);
        self.details = Some("filter_chain_not_found");
    }

    /// The downstream TLS handshake failed (`%DOWNSTREAM_TRANSPORT_FAILURE_REASON%`).
    pub fn tls_failed(&mut self, reason: &str, message: &str) {
        self.transport_failure = Some(tls_failure_reason(reason, message));
    }

    /// Why a network filter closed the connection
    /// (`%CONNECTION_TERMINATION_DETAILS%`).
    pub fn terminated(&mut self, details: String) {
        self.termination = Some(details);
    }

    /// The SNI the TLS inspector read (`%REQUESTED_SERVER_NAME%`).
    pub fn sni(&mut self, sni: Option<&str>) {
        self.sni = sni.map(Box::from);
    }

    /// The downstream TLS session, once established.
    pub fn tls(&mut self, id: &Arc<PeerIdentity>) {
        self.tls = Some(id.clone());
    }

    /// The connection runs an HTTP connection manager (`%PROTOCOL%` is read
    /// from its first bytes).
    pub fn http(&mut self) {
        self.http = true;
    }

    /// What the TCP proxy did with the connection.
    pub fn tcp(&mut self, outcome: TcpOutcome) {
        self.tcp = Some(outcome);
    }
}

impl TcpOutcome {
    /// The connection's flags in the order Envoy sets them: its tcp_proxy
    /// adds `URX` after `UF` when a connect failure used up its connect
    /// attempts (one: mesh does not retry connects).
    pub fn extra_flags(&self) -> super::flags::FlagSet {
        let mut s = super::flags::FlagSet::of(self.flag);
        if self.flag == Some(ResponseFlag::UpstreamConnectionFailure) {
            s.insert(ResponseFlag::UpstreamRetryLimitExceeded);
        }
        s
    }
}

impl std::fmt::Debug for TcpOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpOutcome")
            .field("flag", &self.flag)
            .field("upstream", &self.upstream)
            .field("cluster", &self.cluster.as_ref().map(|c| &c.config.name))
            .finish_non_exhaustive()
    }
}

impl Drop for ConnLog {
    fn drop(&mut self) {
        let m = &self.meter;
        let tcp = self.tcp.take().unwrap_or_default();
        let protocol = match m.protocol.load(Ordering::Relaxed) {
            1 if self.http => Some(http::Version::HTTP_11),
            2 if self.http => Some(http::Version::HTTP_2),
            _ => None,
        };
        let rec = LogRecord {
            flag: self.flag.or(tcp.flag),
            extra_flags: tcp.extra_flags(),
            details: self.details,
            bytes_received: m.received.load(Ordering::Relaxed),
            bytes_sent: m.sent.load(Ordering::Relaxed),
            upstream_host: tcp.upstream,
            upstream_unconnected: tcp.upstream_local.is_none(),
            upstream_local: tcp.upstream_local,
            upstream_failure: tcp.failure.as_deref(),
            upstream_cluster: tcp.cluster.as_ref().map(|c| c.config.name.as_str()),
            attempts: tcp.upstream.map(|_| 1),
            downstream_remote: Some(self.peer),
            downstream_direct_remote: Some(self.peer),
            downstream_local: Some(self.local),
            connection_id: Some(self.id),
            tls: self.tls.as_deref(),
            downstream_failure: self.transport_failure.as_deref(),
            termination_details: self.termination.as_deref(),
            protocol,
            sni: self.sni.as_deref(),
            ..LogRecord::new(
                self.start,
                self.started.elapsed(),
                &self.logger.inner.hostname,
            )
        };
        self.logger.log(&rec);
    }
}
