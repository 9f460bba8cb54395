//! The upstream HTTP client: a connection pool per endpoint.
//!
//! Each worker owns its pools (as Envoy's workers do), so a pool is only
//! touched by one thread and its lock is never contended.
//!
//! - HTTP/1.1: idle keep-alive connections are kept in a LIFO list. A
//!   connection goes back to the list when its response body has been read
//!   to the end; a response dropped early, an upgrade or an error closes it.
//!   A stale idle connection (closed by the upstream while idle) is retried
//!   once on a fresh one, which is safe because the request was never
//!   written.
//! - HTTP/2: one multiplexed connection per endpoint, re-established when it
//!   closes.
//!
//! Connect failures and timeouts are reported as [`UpstreamError::Connect`]
//! so the proxy can answer 503 with Envoy's `UF` flag.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::{OnEnd, ProxyBody};
use crate::transport::{Carried, Connector};

/// Which HTTP version a pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolProtocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 (h2c prior knowledge).
    Http2,
}

/// Settings of an endpoint pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The protocol.
    pub protocol: PoolProtocol,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle connections kept at most (HTTP/1.1).
    pub max_idle: usize,
    /// An idle HTTP/1.1 connection older than this is closed instead of
    /// reused (checked when the pool next looks at it).
    pub idle_timeout: Option<Duration>,
    /// Requests one connection carries before it is closed (HTTP/1.1) or
    /// no longer given new streams (HTTP/2); `None`: unlimited. Envoy's
    /// `max_requests_per_connection`.
    pub max_requests_per_connection: Option<u32>,
}

/// Why an upstream request failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection could not be established (refused, unreachable,
    /// timed out). Retrying elsewhere is safe: nothing was sent.
    #[error("connection failure: {0}")]
    Connect(io::Error),
    /// The connection or stream ended before response headers arrived
    /// (reset, closed, protocol error). The request may have been seen.
    #[error("disconnect/reset before headers: {0}")]
    Reset(hyper::Error),
    /// The HTTP handshake (HTTP/2 preface) failed.
    #[error("protocol handshake failed: {0}")]
    Handshake(hyper::Error),
    /// A cluster limit ([`PoolLimits`]: `max_connections` with
    /// `max_pending_requests` full) refused the request before anything
    /// was sent. Never retried.
    #[error("overflow: connection and pending-request limits reached")]
    Overflow,
}

/// Limits a cluster's pools obey together (Envoy's `max_connections` and
/// `max_pending_requests` circuit breakers), shared by every worker's
/// pools of the cluster.
///
/// A request that needs a new connection is *pending* until it has one:
/// it takes a pending permit (refused: [`UpstreamError::Overflow`]) and a
/// connection permit, which the connection holds until it closes. When no
/// connection permit is left, an HTTP/1.1 request waits, still pending,
/// for a connection of its pool to come back idle or for a permit.
pub trait PoolLimits: Send + Sync + std::fmt::Debug {
    /// A permit to open one connection, or `None` at the limit.
    fn try_connection(&self) -> Option<LimitPermit>;
    /// A permit for one request waiting for a connection, or `None` at the
    /// limit.
    fn try_pending(&self) -> Option<LimitPermit>;
}

/// A permit of [`PoolLimits`], given back when dropped.
pub type LimitPermit = Box<dyn std::any::Any + Send + Sync>;

/// Which side an [`UpstreamError`] should be blamed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Could not connect (Envoy `UF`, 503).
    Connect,
    /// The upstream answered with something that is not HTTP (Envoy `UPE`, 502).
    UpstreamProtocol,
    /// The downstream request body failed (bad chunk, reset): the client's
    /// fault (400).
    DownstreamBody,
    /// The downstream request body did not arrive within the request
    /// timeout (408).
    RequestTimeout,
    /// The upstream closed or reset before the response headers (Envoy `UC`, 503).
    Reset,
    /// A circuit breaker refused the request (Envoy `UO`, 503).
    Overflow,
}

impl UpstreamError {
    /// True for connect failures (Envoy's `UF`).
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }

    /// True when an HTTP/2 upstream refused the stream (`RST_STREAM` with
    /// `REFUSED_STREAM`): it processed nothing, so a retry is safe.
    pub fn is_refused_stream(&self) -> bool {
        let UpstreamError::Reset(e) = self else {
            return false;
        };
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if let Some(h2) = s.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = s.source();
        }
        false
    }

    /// Who failed, as the proxy reports it.
    pub fn kind(&self) -> FailureKind {
        match self {
            UpstreamError::Connect(_) => FailureKind::Connect,
            UpstreamError::Overflow => FailureKind::Overflow,
            UpstreamError::Reset(e) | UpstreamError::Handshake(e) => {
                let body_error = std::error::Error::source(e)
                    .and_then(|s| s.downcast_ref::<super::body::BodyError>());
                if matches!(body_error, Some(super::body::BodyError::RequestTimeout)) {
                    FailureKind::RequestTimeout
                } else if e.is_user() {
                    FailureKind::DownstreamBody
                } else if e.is_parse() || e.is_parse_status() {
                    FailureKind::UpstreamProtocol
                } else {
                    FailureKind::Reset
                }
            }
        }
    }
}

/// The connection pool of one endpoint (per worker).
#[derive(Debug)]
pub struct EndpointPool {
    addr: SocketAddr,
    config: PoolConfig,
    /// Idle HTTP/1.1 connections: sender, idle since, requests carried.
    idle: Mutex<Vec<(H1Sender, tokio::time::Instant, u32)>>,
    h2: Mutex<Option<H2Sender>>,
    /// Streams opened on the current HTTP/2 connection (changed under the
    /// `h2` lock).
    h2_used: std::sync::atomic::AtomicU32,
    /// Held while an HTTP/2 connection is being established, so that
    /// concurrent first requests share one connection instead of racing.
    h2_connecting: tokio::sync::Mutex<()>,
    limits: Option<Arc<dyn PoolLimits>>,
    /// Signalled when an HTTP/1.1 connection goes back idle (only with
    /// limits, for requests waiting for a connection).
    returned: tokio::sync::Notify,
    /// Wraps each new connection (TLS); plain text when `None`.
    connector: Option<Arc<dyn Connector>>,
    /// The local address new connections are bound to (the cluster's
    /// `upstream_bind_config`); any when `None`.
    source: Option<SocketAddr>,
}

/// What [`EndpointPool::send`] returns: the response, and a hook to run when
/// its body ends (returns the connection to the pool).
pub type PooledResponse = (Response<Incoming>, Option<OnEnd>);

/// The local address of the upstream connection that carried a response:
/// in the response's extensions when asked for (see
/// [`EndpointPool::send_traced`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLocal(pub SocketAddr);

/// A connection's sender with the connection's local address (read once,
/// when it connected).
#[derive(Debug, Clone)]
struct Sender<S> {
    inner: S,
    local: Option<SocketAddr>,
}

impl<S> std::ops::Deref for Sender<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.inner
    }
}

impl<S> std::ops::DerefMut for Sender<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S> Sender<S> {
    /// Puts the connection's local address in `resp`'s extensions.
    fn mark(&self, resp: &mut Response<Incoming>) {
        if let Some(a) = self.local {
            resp.extensions_mut().insert(ConnectionLocal(a));
        }
    }
}

type H1Sender = Sender<http1::SendRequest<ProxyBody>>;
type H2Sender = Sender<http2::SendRequest<ProxyBody>>;

impl EndpointPool {
    /// A pool for `addr`.
    pub fn new(addr: SocketAddr, config: PoolConfig) -> Arc<Self> {
        Self::with_options(addr, config, None, None)
    }

    /// A pool for `addr` obeying cluster-wide `limits`.
    pub fn with_limits(
        addr: SocketAddr,
        config: PoolConfig,
        limits: Option<Arc<dyn PoolLimits>>,
    ) -> Arc<Self> {
        Self::with_options(addr, config, limits, None)
    }

    /// A pool for `addr` whose new connections are wrapped by `connector`
    /// (TLS origination) when one is given.
    pub fn with_connector(
        addr: SocketAddr,
        config: PoolConfig,
        connector: Option<Arc<dyn Connector>>,
    ) -> Arc<Self> {
        Self::with_options(addr, config, None, connector)
    }

    /// A pool for `addr` obeying cluster-wide `limits`, whose new
    /// connections are wrapped by `connector` when one is given.
    pub fn with_options(
        addr: SocketAddr,
        config: PoolConfig,
        limits: Option<Arc<dyn PoolLimits>>,
        connector: Option<Arc<dyn Connector>>,
    ) -> Arc<Self> {
        Self::with_source(addr, config, limits, connector, None)
    }

    /// [`EndpointPool::with_options`] whose connections are made from
    /// `source` (bound before connecting; port 0: any port).
    pub fn with_source(
        addr: SocketAddr,
        config: PoolConfig,
        limits: Option<Arc<dyn PoolLimits>>,
        connector: Option<Arc<dyn Connector>>,
        source: Option<SocketAddr>,
    ) -> Arc<Self> {
        Arc::new(EndpointPool {
            addr,
            config,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_used: std::sync::atomic::AtomicU32::new(0),
            h2_connecting: tokio::sync::Mutex::new(()),
            limits,
            returned: tokio::sync::Notify::new(),
            connector,
            source,
        })
    }

    /// The permits a new connection needs: pending while it waits, then a
    /// connection permit. `Ok(None)` without limits; with `wait`, an idle
    /// connection that came back meanwhile is returned instead.
    async fn connection_permit(
        &self,
        wait: bool,
    ) -> Result<Result<Option<LimitPermit>, (H1Sender, u32)>, UpstreamError> {
        let Some(limits) = &self.limits else {
            return Ok(Ok(None));
        };
        let _pending = limits.try_pending().ok_or(UpstreamError::Overflow)?;
        loop {
            if let Some(p) = limits.try_connection() {
                return Ok(Ok(Some(p)));
            }
            if !wait {
                return Err(UpstreamError::Overflow);
            }
            // A connection of this pool coming back, or (another worker's
            // connection closing) a permit freed: look again.
            let _ = tokio::time::timeout(Duration::from_millis(10), self.returned.notified()).await;
            if let Some(s) = self.take_idle() {
                return Ok(Err(s));
            }
        }
    }

    /// Whether the pool holds no connection (no idle HTTP/1.1 connection,
    /// no open HTTP/2 connection), so dropping it closes nothing.
    pub fn is_idle(&self) -> bool {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        idle.is_empty() && h2.as_ref().is_none_or(|s| s.is_closed())
    }

    /// The endpoint address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        let stream = tokio::time::timeout(
            self.config.connect_timeout,
            crate::transport::connect_from(self.addr, self.source),
        )
        .await
        .map_err(|_| {
            UpstreamError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))
        })?
        .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Sends a request. For HTTP/1.1 the request URI should be in origin
    /// form with a `host` header; for HTTP/2 it must be absolute
    /// (`http://authority/path`), which becomes `:scheme`/`:authority`.
    /// `upgrade` marks a request whose connection must not be reused.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        upgrade: bool,
    ) -> Result<PooledResponse, UpstreamError> {
        self.send_traced(req, upgrade, false).await
    }

    /// [`EndpointPool::send`]; with `local`, the response's extensions
    /// carry the connection's local address ([`ConnectionLocal`]).
    pub async fn send_traced(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        upgrade: bool,
        local: bool,
    ) -> Result<PooledResponse, UpstreamError> {
        match self.config.protocol {
            PoolProtocol::Http1 => self.send_h1(req, upgrade, local).await,
            PoolProtocol::Http2 => self.send_h2(req, local).await,
        }
    }

    fn take_idle(&self) -> Option<(H1Sender, u32)> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = self.config.idle_timeout {
            // The oldest connections sit at the front.
            let now = tokio::time::Instant::now();
            let expired = idle
                .iter()
                .take_while(|(_, since, _)| now - *since >= t)
                .count();
            idle.drain(..expired);
        }
        while let Some((s, _, used)) = idle.pop() {
            if !s.is_closed() {
                return Some((s, used));
            }
        }
        None
    }

    async fn new_h1(&self, permit: Option<LimitPermit>) -> Result<H1Sender, UpstreamError> {
        let stream = self.connect().await?;
        let local = stream.local_addr().ok();
        let inner = match &self.connector {
            None => h1_handshake(stream, permit).await?,
            Some(c) => {
                let io = self.wrap(c, stream, Carried::Http1).await?;
                h1_handshake(io, permit).await?
            }
        };
        Ok(Sender { inner, local })
    }

    /// Runs the connector on a new connection, under the connect timeout.
    async fn wrap(
        &self,
        connector: &Arc<dyn Connector>,
        stream: TcpStream,
        carried: Carried,
    ) -> Result<crate::transport::BoxIo, UpstreamError> {
        tokio::time::timeout(
            self.config.connect_timeout,
            connector.connect(stream, self.addr, carried),
        )
        .await
        .map_err(|_| {
            UpstreamError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                "transport handshake timeout",
            ))
        })?
        .map_err(UpstreamError::Connect)
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
        upgrade: bool,
        local: bool,
    ) -> Result<PooledResponse, UpstreamError> {
        // Try idle connections first; a stale one hands the request back.
        while let Some((mut sender, used)) = self.take_idle() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.finish_h1(resp, sender, upgrade, used + 1, local)),
                Err(mut e) => match e.take_message() {
                    Some(r) => {
                        req = r;
                        continue;
                    }
                    None => return Err(UpstreamError::Reset(e.into_error())),
                },
            }
        }
        // Connecting is the cold path: boxed so its large future does not
        // grow (and get copied with) every request's future.
        let (mut sender, used) = match Box::pin(self.connection_permit(true)).await? {
            Ok(permit) => (Box::pin(self.new_h1(permit)).await?, 0),
            Err(idle) => idle,
        };
        sender.ready().await.map_err(UpstreamError::Reset)?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Reset)?;
        Ok(self.finish_h1(resp, sender, upgrade, used + 1, local))
    }

    fn finish_h1(
        self: &Arc<Self>,
        mut resp: Response<Incoming>,
        sender: H1Sender,
        upgrade: bool,
        used: u32,
        local: bool,
    ) -> PooledResponse {
        if local {
            sender.mark(&mut resp);
        }
        if upgrade || resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return (resp, None);
        }
        if self
            .config
            .max_requests_per_connection
            .is_some_and(|max| used >= max)
        {
            // The connection's last request: it closes once the response
            // (and the sender) is dropped.
            return (resp, None);
        }
        let pool = Arc::downgrade(self);
        let on_end = OnEnd::new(move |completed, _bytes| {
            if !completed {
                return;
            }
            if let Some(pool) = pool.upgrade() {
                let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < pool.config.max_idle {
                    idle.push((sender, tokio::time::Instant::now(), used));
                }
                drop(idle);
                if pool.limits.is_some() {
                    pool.returned.notify_one();
                }
            }
        });
        (resp, Some(on_end))
    }

    fn cached_h2(&self) -> Option<H2Sender> {
        let mut guard = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        let s = guard.as_ref().filter(|s| !s.is_closed()).cloned()?;
        self.count_h2_stream(&mut guard);
        Some(s)
    }

    /// Counts a stream on the current HTTP/2 connection; at
    /// `max_requests_per_connection` the connection gets no new streams
    /// (it closes once its streams end and its senders are dropped).
    fn count_h2_stream(&self, current: &mut Option<H2Sender>) {
        use std::sync::atomic::Ordering;
        let used = self.h2_used.fetch_add(1, Ordering::Relaxed) + 1;
        if self
            .config
            .max_requests_per_connection
            .is_some_and(|max| used >= max)
        {
            *current = None;
        }
    }

    async fn h2_sender(&self) -> Result<H2Sender, UpstreamError> {
        if let Some(s) = self.cached_h2() {
            return Ok(s);
        }
        let _connecting = self.h2_connecting.lock().await;
        if let Some(s) = self.cached_h2() {
            return Ok(s);
        }
        // Without waiting, no idle HTTP/1.1 connection comes back.
        let permit = self.connection_permit(false).await?.unwrap_or_default();
        let stream = self.connect().await?;
        let local = stream.local_addr().ok();
        let inner = match &self.connector {
            None => h2_handshake(stream, permit).await?,
            Some(c) => {
                let io = self.wrap(c, stream, Carried::Http2).await?;
                h2_handshake(io, permit).await?
            }
        };
        let sender = Sender { inner, local };
        let mut current = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        *current = Some(sender.clone());
        self.h2_used.store(0, std::sync::atomic::Ordering::Relaxed);
        self.count_h2_stream(&mut current);
        Ok(sender)
    }

    async fn send_h2(
        &self,
        req: Request<ProxyBody>,
        local: bool,
    ) -> Result<PooledResponse, UpstreamError> {
        let mut sender = match self.cached_h2() {
            Some(s) => s,
            None => Box::pin(self.h2_sender()).await?,
        };
        sender.ready().await.map_err(UpstreamError::Reset)?;
        let mut resp = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Reset)?;
        if local {
            sender.mark(&mut resp);
        }
        Ok((resp, None))
    }
}

/// The connection's permit (cluster connection limits) lives as long as the
/// connection task.
async fn h1_handshake<I>(
    io: I,
    permit: Option<LimitPermit>,
) -> Result<http1::SendRequest<ProxyBody>, UpstreamError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
        }
    });
    Ok(sender)
}

async fn h2_handshake<I>(
    io: I,
    permit: Option<LimitPermit>,
) -> Result<http2::SendRequest<ProxyBody>, UpstreamError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .adaptive_window(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(sender)
}
