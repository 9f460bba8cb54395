//! The upstream side: one connection to an endpoint carries many requests
//! at once. Each request gets a fresh request id on that connection (the
//! client's id is restored on the response), so requests from many
//! downstream connections share one upstream connection without their ids
//! colliding.
//!
//! State of a [`Multiplexed`] connection:
//!
//! ```text
//! open ──(read/write error, EOF, undecodable response)──► closed
//! ```
//!
//! When it closes, every request waiting on it fails with
//! [`ClientError::Reset`] and [`EndpointClient`] connects anew for the next
//! request. Heartbeats from the upstream are answered.
//!
//! The transport is the caller's choice: [`ClientConfig::connector`] wraps
//! every new connection (the proxy passes its TLS connector for a cluster
//! with an `UpstreamTlsContext` or a matching `transport_socket_matches`
//! entry), so this module knows nothing of TLS. The connect timeout covers
//! the TCP connect and the connector's handshake together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::{Codec, Message, MessageKind, DEFAULT_MAX_FRAME};
use crate::transport::{connect_from, Carried, Connector, Io};

/// Why an upstream request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be made (refused, unreachable, timed out).
    /// Safe to retry elsewhere: nothing was sent.
    #[error("upstream connect failed: {0}")]
    Connect(String),
    /// The connection closed before the response arrived. The request may
    /// have been processed.
    #[error("upstream connection closed before the response")]
    Reset,
    /// The upstream sent bytes that are not a valid frame.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
}

/// Settings of upstream connections.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// The largest response frame accepted.
    pub max_frame: usize,
    /// Send the protocol's heartbeat on a connection that has sent nothing
    /// for this long (Dubbo and Bolt servers close connections that stay
    /// silent), when the protocol has one. Default 60 s.
    pub heartbeat_interval: Option<Duration>,
    /// Wraps every new connection (TLS origination); `None`: plain text.
    /// A connector error is a connect failure ([`ClientError::Connect`]).
    pub connector: Option<Arc<dyn Connector>>,
    /// The local address new connections are bound to (a cluster's
    /// `upstream_bind_config`); `None`: chosen by the system.
    pub source: Option<SocketAddr>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            heartbeat_interval: Some(Duration::from_secs(60)),
            connector: None,
            source: None,
        }
    }
}

type Reply = oneshot::Sender<Result<Message, ClientError>>;

struct Pending {
    client_id: u64,
    reply: Reply,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    closed: AtomicBool,
    error: Mutex<Option<ClientError>>,
    /// Tells the reader and the writer to stop and drop the connection
    /// (see [`Multiplexed::abandon`]).
    abort: tokio_util::sync::CancellationToken,
}

impl Shared {
    fn close(&self, why: ClientError) {
        self.closed.store(true, Ordering::Release);
        let mut e = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(why.clone());
        }
        drop(e);
        let drained: Vec<Pending> = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.drain().map(|(_, v)| v).collect()
        };
        for p in drained {
            let _ = p.reply.send(Err(why.clone()));
        }
    }
}

enum Outgoing {
    Call(Message, Option<Reply>),
    Raw(Message),
}

/// One multiplexed connection to an endpoint.
pub struct Multiplexed {
    tx: mpsc::UnboundedSender<Outgoing>,
    shared: Arc<Shared>,
    /// Requests that have checked this connection out of an
    /// [`EndpointClient`].
    reserved: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Multiplexed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Multiplexed")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Multiplexed {
    /// Connects to `addr` (from [`ClientConfig::source`], through
    /// [`ClientConfig::connector`]) and starts the connection's reader and
    /// writer. [`ClientConfig::connect_timeout`] bounds the TCP connect and
    /// the connector's handshake together.
    pub async fn connect(
        addr: SocketAddr,
        codec: Arc<dyn Codec>,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let connect = async {
            let stream = connect_from(addr, config.source)
                .await
                .map_err(|e| ClientError::Connect(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            match &config.connector {
                None => Ok(Transport::Plain(stream)),
                Some(c) => c
                    .connect(stream, addr, Carried::Raw)
                    .await
                    .map(Transport::Wrapped)
                    .map_err(|e| ClientError::Connect(format!("transport handshake: {e}"))),
            }
        };
        let transport = match tokio::time::timeout(config.connect_timeout, connect).await {
            Ok(t) => t?,
            Err(_) => return Err(ClientError::Connect("connect timeout".into())),
        };
        let (max_frame, heartbeat) = (config.max_frame, config.heartbeat_interval);
        Ok(match transport {
            Transport::Plain(s) => Self::start(s, codec, max_frame, heartbeat),
            Transport::Wrapped(io) => Self::start_io(io, codec, max_frame, heartbeat),
        })
    }

    /// Runs the multiplexing over an already connected stream.
    pub fn start(
        stream: TcpStream,
        codec: Arc<dyn Codec>,
        max_frame: usize,
        heartbeat_interval: Option<Duration>,
    ) -> Self {
        let (rd, wr) = stream.into_split();
        Self::start_halves(rd, wr, codec, max_frame, heartbeat_interval)
    }

    /// Runs the multiplexing over any connected byte stream (a TLS stream,
    /// for example).
    pub fn start_io<S: Io>(
        stream: S,
        codec: Arc<dyn Codec>,
        max_frame: usize,
        heartbeat_interval: Option<Duration>,
    ) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        Self::start_halves(rd, wr, codec, max_frame, heartbeat_interval)
    }

    fn start_halves<R, W>(
        rd: R,
        wr: W,
        codec: Arc<dyn Codec>,
        max_frame: usize,
        heartbeat_interval: Option<Duration>,
    ) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            error: Mutex::new(None),
            abort: tokio_util::sync::CancellationToken::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(
            wr,
            codec.clone(),
            rx,
            shared.clone(),
            heartbeat_interval,
        ));
        tokio::spawn(read_loop(rd, codec, tx.clone(), shared.clone(), max_frame));
        Multiplexed {
            tx,
            shared,
            reserved: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// True once the connection has failed or closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Requests waiting for their response.
    pub fn in_flight(&self) -> usize {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Sends a request and waits for its response (whose id is the
    /// request's original id). Dropping the future abandons the request;
    /// a late response is discarded.
    pub async fn call(&self, msg: Message) -> Result<Message, ClientError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Outgoing::Call(msg, Some(reply))).is_err() {
            return Err(self.error());
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.error()),
        }
    }

    /// Sends a message that gets no response (oneway).
    pub fn send(&self, msg: Message) -> Result<(), ClientError> {
        self.tx
            .send(Outgoing::Call(msg, None))
            .map_err(|_| self.error())
    }

    /// Closes the connection now: its waiting requests fail with
    /// [`ClientError::Reset`] and the socket is dropped. Used when a
    /// request is abandoned on a connection whose server answers in order,
    /// where a later request would otherwise wait behind it.
    pub fn abandon(&self) {
        self.shared.close(ClientError::Reset);
        self.shared.abort.cancel();
    }

    fn error(&self) -> ClientError {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(ClientError::Reset)
    }
}

/// A new connection: plain TCP (split without a lock) or what a
/// connector made of it.
enum Transport {
    Plain(TcpStream),
    Wrapped(crate::transport::BoxIo),
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    codec: Arc<dyn Codec>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
    heartbeat_interval: Option<Duration>,
) {
    let max_id = codec.max_request_id().max(1);
    let mut next_id: u64 = 0;
    let mut out = BytesMut::with_capacity(8 * 1024);
    let mut since_sweep = 0usize;
    loop {
        let next = async {
            tokio::select! {
                o = rx.recv() => o,
                _ = shared.abort.cancelled() => None,
            }
        };
        let first = match heartbeat_interval {
            Some(t) => match tokio::time::timeout(t, next).await {
                Ok(Some(o)) => o,
                Ok(None) => return,
                Err(_) => {
                    // Idle: keep the connection alive with a heartbeat (its
                    // reply is ignored by the reader).
                    next_id = next_id % max_id + 1;
                    match codec.heartbeat(next_id) {
                        Some(hb) => Outgoing::Raw(hb),
                        None => continue,
                    }
                }
            },
            None => match next.await {
                Some(o) => o,
                None => return,
            },
        };
        let mut item = Some(first);
        while let Some(o) = item.take() {
            match o {
                Outgoing::Raw(m) => codec.encode(&m, m.id, &mut out),
                Outgoing::Call(m, reply) => {
                    let id = {
                        let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
                        since_sweep += 1;
                        if since_sweep >= 4096 {
                            // Drop entries whose caller gave up (timeouts).
                            pending.retain(|_, p| !p.reply.is_closed());
                            since_sweep = 0;
                        }
                        let mut id;
                        loop {
                            next_id = next_id % max_id + 1;
                            id = next_id;
                            if !pending.contains_key(&id) {
                                break;
                            }
                        }
                        if let Some(reply) = reply {
                            pending.insert(
                                id,
                                Pending {
                                    client_id: m.id,
                                    reply,
                                },
                            );
                        }
                        id
                    };
                    codec.encode(&m, id, &mut out);
                }
            }
            if out.len() < 64 * 1024 {
                item = rx.try_recv().ok();
            }
        }
        // Flushed: a TLS stream may hold written bytes until then.
        let written = match wr.write_all(&out).await {
            Ok(()) => wr.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::debug!(error = %e, "writing to an RPC upstream failed");
            shared.close(ClientError::Reset);
            return;
        }
        out.clear();
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    codec: Arc<dyn Codec>,
    tx: mpsc::UnboundedSender<Outgoing>,
    shared: Arc<Shared>,
    max_frame: usize,
) {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        loop {
            match codec.decode(&mut buf, max_frame) {
                Ok(Some(mut msg)) => match msg.kind {
                    MessageKind::Response | MessageKind::Error => {
                        let p = shared
                            .pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&msg.id);
                        if let Some(p) = p {
                            msg.id = p.client_id;
                            let _ = p.reply.send(Ok(msg));
                        }
                    }
                    MessageKind::Heartbeat => {
                        if let Some(r) = codec.heartbeat_reply(&msg) {
                            let _ = tx.send(Outgoing::Raw(r));
                        }
                    }
                    MessageKind::HeartbeatReply => {}
                    kind => {
                        tracing::debug!(
                            codec = codec.name(),
                            ?kind,
                            "ignoring a request sent by an upstream"
                        );
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(codec = codec.name(), reason = %e.reason, "closing an RPC upstream connection: undecodable frame");
                    shared.close(ClientError::Protocol(e.reason.into_owned()));
                    return;
                }
            }
        }
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = shared.abort.cancelled() => Ok(0),
        };
        match read {
            Ok(0) | Err(_) => {
                shared.close(ClientError::Reset);
                return;
            }
            Ok(_) => {}
        }
    }
}

/// The client for one endpoint.
///
/// For a codec that multiplexes ([`Codec::multiplexes`]: Dubbo, Bolt) it
/// keeps one connection and sends every request over it; connecting is
/// serialised, so a burst of requests to a new endpoint makes one
/// connection, not one each. For a codec whose servers answer in order, one
/// request at a time (Thrift), each request takes an idle connection or
/// opens one, so a slow call never delays another.
pub struct EndpointClient {
    addr: SocketAddr,
    codec: Arc<dyn Codec>,
    config: ClientConfig,
    conns: Mutex<Vec<Arc<Multiplexed>>>,
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for EndpointClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointClient")
            .field("addr", &self.addr)
            .finish()
    }
}

/// A connection reserved for one request; released on drop.
struct Checkout(Arc<Multiplexed>);

impl Drop for Checkout {
    fn drop(&mut self) {
        self.0.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EndpointClient {
    /// A client for `addr`; it connects on first use.
    pub fn new(addr: SocketAddr, codec: Arc<dyn Codec>, config: ClientConfig) -> Self {
        EndpointClient {
            addr,
            codec,
            config,
            conns: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.is_closed());
        conns.len()
    }

    fn reserve(&self) -> Option<Checkout> {
        let limit = if self.codec.multiplexes() {
            usize::MAX
        } else {
            1
        };
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.is_closed());
        for c in conns.iter() {
            let r = c.reserved.load(Ordering::Acquire);
            if r < limit
                && c.reserved
                    .compare_exchange(r, r + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(Checkout(c.clone()));
            }
        }
        None
    }

    async fn checkout(&self) -> Result<Checkout, ClientError> {
        if let Some(c) = self.reserve() {
            return Ok(c);
        }
        let _serial = if self.codec.multiplexes() {
            let g = self.connecting.lock().await;
            if let Some(c) = self.reserve() {
                return Ok(c);
            }
            Some(g)
        } else {
            None
        };
        let c = Arc::new(Multiplexed::connect(self.addr, self.codec.clone(), &self.config).await?);
        c.reserved.fetch_add(1, Ordering::AcqRel);
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        Ok(Checkout(c))
    }

    /// Sends a request (or a oneway message, answered with `None`).
    ///
    /// Dropping the future before the response abandons the request. On a
    /// connection whose server answers in order ([`Codec::multiplexes`] is
    /// false) that also closes the connection: the server is still busy
    /// with the request, and the next request would wait behind it.
    pub async fn call(&self, msg: Message) -> Result<Option<Message>, ClientError> {
        let conn = self.checkout().await?;
        if msg.kind == MessageKind::Oneway {
            conn.0.send(msg)?;
            return Ok(None);
        }
        let mut abandoned = Abandon(if self.codec.multiplexes() {
            None
        } else {
            Some(&conn.0)
        });
        let out = conn.0.call(msg).await.map(Some);
        abandoned.0 = None;
        out
    }
}

/// Closes an in-order connection whose request was abandoned (dropped
/// while waiting for its response).
struct Abandon<'a>(Option<&'a Arc<Multiplexed>>);

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            c.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::dubbo::Dubbo;

    /// An upstream that answers every Dubbo request out of order (the
    /// second before the first) and records heartbeats.
    #[tokio::test]
    async fn responses_are_matched_by_id_and_idle_connections_send_heartbeats() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hb_tx, mut hb_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let mut held: Vec<Message> = Vec::new();
            loop {
                while let Ok(Some(m)) = Dubbo.decode(&mut buf, 1 << 20) {
                    if m.kind == MessageKind::Heartbeat {
                        let _ = hb_tx.send(m.id);
                        continue;
                    }
                    held.push(m);
                    if held.len() == 2 {
                        let mut out = BytesMut::new();
                        for req in held.drain(..).rev() {
                            let mut r = Message::new(req.id, MessageKind::Response);
                            r.body = bytes::Bytes::from(req.meta.service.clone());
                            Dubbo.encode(&r, req.id, &mut out);
                        }
                        s.write_all(&out).await.unwrap();
                    }
                }
                if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        });
        let config = ClientConfig {
            heartbeat_interval: Some(Duration::from_millis(100)),
            ..ClientConfig::default()
        };
        let c = Arc::new(EndpointClient::new(addr, Arc::new(Dubbo), config));
        let req = |id: u64, who: &str| {
            let mut b = crate::rpc::dubbo::request(id, who, "", "m", &[], &[]);
            Dubbo.decode(&mut b, 1 << 20).unwrap().unwrap()
        };
        // Both clients use id 1: the connection rewrites them.
        let (a, b) = tokio::join!(c.call(req(1, "aaaa")), c.call(req(1, "bbbb")));
        let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
        assert_eq!(a.id, 1);
        assert_eq!(b.id, 1);
        assert_eq!((&a.body[..], &b.body[..]), (&b"aaaa"[..], &b"bbbb"[..]));
        assert_eq!(c.connections(), 1);
        let hb = tokio::time::timeout(Duration::from_secs(5), hb_rx.recv()).await;
        assert!(
            matches!(hb, Ok(Some(_))),
            "no heartbeat on an idle connection"
        );
    }

    /// A Thrift server answers in order: when a call is abandoned (its
    /// caller timed out), its connection is closed, so the next call opens
    /// a fresh one instead of waiting behind the abandoned one.
    #[tokio::test]
    async fn an_abandoned_in_order_call_closes_its_connection() {
        use crate::rpc::thrift::Thrift;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, mut closed_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    loop {
                        while let Ok(Some(m)) = Thrift::default().decode(&mut buf, 1 << 20) {
                            // `slow` is never answered.
                            if m.meta.method != "slow" {
                                let mut r = Message::new(m.id, MessageKind::Response);
                                r.meta.method = m.meta.method.clone();
                                r.wire = m.wire;
                                r.body = bytes::Bytes::from_static(&[0]);
                                let mut out = BytesMut::new();
                                Thrift::default().encode(&r, m.id, &mut out);
                                s.write_all(&out).await.unwrap();
                            }
                        }
                        if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            let _ = closed_tx.send(());
                            return;
                        }
                    }
                });
            }
        });
        let call = |name: &str| {
            // Framed, strict binary: CALL `name`, seqid 1, empty args.
            let mut f = BytesMut::new();
            f.extend_from_slice(&(13 + name.len() as u32).to_be_bytes());
            f.extend_from_slice(&[0x80, 0x01, 0x00, 0x01]);
            f.extend_from_slice(&(name.len() as u32).to_be_bytes());
            f.extend_from_slice(name.as_bytes());
            f.extend_from_slice(&1u32.to_be_bytes());
            f.extend_from_slice(&[0]);
            Thrift::default().decode(&mut f, 1 << 20).unwrap().unwrap()
        };
        let c = EndpointClient::new(addr, Arc::new(Thrift::default()), ClientConfig::default());
        assert!(c.call(call("fast")).await.unwrap().is_some());
        let slow = tokio::time::timeout(Duration::from_millis(200), c.call(call("slow"))).await;
        assert!(slow.is_err(), "the slow call was answered");
        // The connection that carried the abandoned call is closed...
        let closed = tokio::time::timeout(Duration::from_secs(5), closed_rx.recv()).await;
        assert!(matches!(closed, Ok(Some(()))), "the connection stayed open");
        // ... and the next call is answered on a new one.
        let next = tokio::time::timeout(Duration::from_secs(5), c.call(call("fast"))).await;
        assert!(matches!(next, Ok(Ok(Some(_)))), "{next:?}");
        assert_eq!(c.connections(), 1);
    }

    /// A connector that refuses every connection: the call fails as a
    /// connect failure (safe to retry), and nothing reaches the upstream.
    #[tokio::test]
    async fn a_failing_connector_is_a_connect_failure() {
        #[derive(Debug)]
        struct Refuse;
        impl Connector for Refuse {
            fn connect(
                &self,
                _tcp: TcpStream,
                _peer: SocketAddr,
                _carried: Carried,
            ) -> crate::transport::ConnectFuture {
                Box::pin(async {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "handshake refused",
                    ))
                })
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (got_tx, mut got_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = BytesMut::new();
                let n = s.read_buf(&mut buf).await.unwrap_or(0);
                let _ = got_tx.send(n);
            }
        });
        let config = ClientConfig {
            connector: Some(Arc::new(Refuse)),
            ..ClientConfig::default()
        };
        let c = EndpointClient::new(addr, Arc::new(Dubbo), config);
        let mut b = crate::rpc::dubbo::request(1, "svc", "", "m", &[], &[]);
        let req = Dubbo.decode(&mut b, 1 << 20).unwrap().unwrap();
        match c.call(req).await {
            Err(ClientError::Connect(e)) => assert!(e.contains("handshake refused"), "{e}"),
            other => panic!("expected a connect failure, got {other:?}"),
        }
        assert_eq!(c.connections(), 0);
        let n = tokio::time::timeout(Duration::from_secs(5), got_rx.recv()).await;
        assert!(
            matches!(n, Ok(Some(0))),
            "the upstream received bytes: {n:?}"
        );
    }
}
