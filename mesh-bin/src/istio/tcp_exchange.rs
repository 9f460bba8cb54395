//! `istio.metadata_exchange` over TCP (Istio's `istio-peer-exchange`
//! protocol): two sidecars joined by an mTLS connection whose negotiated
//! ALPN is the filter's `protocol` each write one frame with their
//! workload's metadata at the start of the byte stream and read (and strip)
//! the peer's from the start of the bytes they receive.
//!
//! A frame is a 4-byte big-endian magic (`0x3D230467`), a 4-byte
//! big-endian length and that many bytes of a serialized
//! `google.protobuf.Any` holding a `google.protobuf.Struct` with
//! `x-envoy-peer-metadata` (the workload, as [`PeerInfo::to_struct`]) and
//! `x-envoy-peer-metadata-id` (the node id).
//!
//! - As a listener's network filter (inbound) the frame is read from the
//!   client's bytes and this proxy's is written to the client first.
//! - As a cluster's upstream filter (outbound) this proxy's frame is
//!   written to the upstream first and the peer's read from the upstream's
//!   bytes.
//!
//! Like Istio's filter: another ALPN leaves the connection untouched; bytes
//! that do not start with the magic (a peer without the filter) are relayed
//! untouched; a frame that does not decode is dropped and the bytes after
//! it relayed, the peer staying unknown. Each is logged at debug with its
//! reason and counted. Beyond Istio, a frame longer than
//! [`MAX_FRAME_LEN`] or one not complete [`FRAME_TIMEOUT`] after its first
//! byte closes the connection.
//!
//! What was learned is kept in a [`PeerSlot`] per connection, for the TCP
//! proxy and `istio.stats` to read.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use envoy_types::pb::google::protobuf::{value::Kind, Any, Struct, Value};
use mesh_core::config::istio::TcpMetadataExchange;
use mesh_core::stats::{Counter, Store};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::metadata::{local_node_json, PeerInfo};

/// The frame's magic number (Istio's `MetadataExchangeInitialHeader`).
pub const MAGIC: u32 = 0x3D23_0467;
/// The longest frame body accepted (Istio has no bound; workload metadata
/// is a few hundred bytes).
pub const MAX_FRAME_LEN: u32 = 64 * 1024;
/// How long a frame may take to arrive once its first byte has.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// The Struct key of the peer's metadata.
pub const METADATA_KEY: &str = "x-envoy-peer-metadata";
/// The Struct key of the peer's node id.
pub const METADATA_ID_KEY: &str = "x-envoy-peer-metadata-id";
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";
const HEADER_LEN: usize = 8;

/// The peer learned by one connection's exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpPeer {
    /// `x-envoy-peer-metadata-id`: the peer's node id (empty if not sent).
    pub id: String,
    /// `x-envoy-peer-metadata`: the peer's workload.
    pub info: PeerInfo,
}

/// Where one connection's exchange stores the peer it learned: empty until
/// (and unless) a valid frame was read. Shared with whoever reports on the
/// connection (`istio.stats`).
#[derive(Debug, Default)]
pub struct PeerSlot(OnceLock<Arc<TcpPeer>>);

impl PeerSlot {
    /// The peer, once learned.
    pub fn get(&self) -> Option<&Arc<TcpPeer>> {
        self.0.get()
    }
}

/// The peers one TCP proxy connection learned: the downstream's (the
/// listener's network filter) and the upstream's (the cluster's filter).
/// Each stays empty without the exchange.
#[derive(Debug, Clone, Default)]
pub struct TcpPeers {
    /// The client side's workload (inbound).
    pub downstream: Arc<PeerSlot>,
    /// The server side's workload (outbound).
    pub upstream: Arc<PeerSlot>,
}

/// The counters of Istio's filter (`metadata_exchange.*`).
#[derive(Debug, Clone)]
pub struct ExchangeStats {
    /// `alpn_protocol_found`: connections that ran the exchange.
    pub alpn_protocol_found: Counter,
    /// `alpn_protocol_not_found`: connections with another ALPN.
    pub alpn_protocol_not_found: Counter,
    /// `initial_header_not_found`: the peer's bytes did not start with the
    /// magic.
    pub initial_header_not_found: Counter,
    /// `header_not_found`: the frame did not decode.
    pub header_not_found: Counter,
    /// `metadata_added`: a peer was learned.
    pub metadata_added: Counter,
}

impl ExchangeStats {
    /// The counters in `store` (`envoy_metadata_exchange_*`).
    pub fn new(store: &Store) -> Self {
        let c = |n: &str| store.counter(&format!("envoy_metadata_exchange_{n}"), &[]);
        ExchangeStats {
            alpn_protocol_found: c("alpn_protocol_found"),
            alpn_protocol_not_found: c("alpn_protocol_not_found"),
            initial_header_not_found: c("initial_header_not_found"),
            header_not_found: c("header_not_found"),
            metadata_added: c("metadata_added"),
        }
    }
}

/// A compiled `istio.metadata_exchange` network or cluster filter.
#[derive(Debug)]
pub struct TcpExchange {
    protocol: String,
    additional_labels: Vec<String>,
    frame: Vec<u8>,
    stats: ExchangeStats,
}

impl TcpExchange {
    /// Compiles `config` with this proxy's node (see
    /// [`super::metadata::set_local_node`]).
    pub fn new(config: &TcpMetadataExchange, stats: ExchangeStats) -> Self {
        let (id, metadata) = local_node_json();
        let local = PeerInfo::from_node_json(metadata, &config.additional_labels);
        TcpExchange {
            protocol: config.protocol.clone(),
            additional_labels: config.additional_labels.clone(),
            frame: encode_frame(id, &local),
            stats,
        }
    }

    /// Whether a connection whose negotiated ALPN is `alpn` runs the
    /// exchange (counted either way).
    pub fn applies(&self, alpn: Option<&str>) -> bool {
        let on = !self.protocol.is_empty() && alpn == Some(self.protocol.as_str());
        if on {
            self.stats.alpn_protocol_found.inc();
        } else {
            self.stats.alpn_protocol_not_found.inc();
        }
        on
    }

    /// Writes this proxy's frame to `stream` (within `FRAME_TIMEOUT`) and
    /// returns the stream, reading the peer's frame into `slot` before any
    /// other byte.
    pub async fn start<S>(
        self: &Arc<Self>,
        mut stream: S,
        slot: Arc<PeerSlot>,
    ) -> io::Result<Exchanging<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let write = async {
            stream.write_all(&self.frame).await?;
            stream.flush().await
        };
        tokio::time::timeout(FRAME_TIMEOUT, write)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "istio-peer-exchange: writing metadata timed out",
                )
            })??;
        Ok(Exchanging {
            inner: stream,
            reading: Some(Reading {
                exchange: self.clone(),
                slot,
                deadline: None,
            }),
            buf: Vec::new(),
            pos: 0,
        })
    }
}

/// This proxy's frame: magic, length, `Any{Struct{metadata, id}}`.
pub fn encode_frame(id: &str, local: &PeerInfo) -> Vec<u8> {
    let mut fields = BTreeMap::new();
    fields.insert(
        METADATA_KEY.to_owned(),
        Value {
            kind: Some(Kind::StructValue(local.to_struct())),
        },
    );
    if !id.is_empty() {
        fields.insert(
            METADATA_ID_KEY.to_owned(),
            Value {
                kind: Some(Kind::StringValue(id.to_owned())),
            },
        );
    }
    let data = Struct {
        fields: fields.into_iter().collect(),
    };
    let any = Any {
        type_url: STRUCT_TYPE_URL.to_owned(),
        value: data.encode_to_vec(),
    }
    .encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_LEN + any.len());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&(any.len() as u32).to_be_bytes());
    out.extend_from_slice(&any);
    out
}

/// Decodes a frame body (the `Any`).
pub fn decode_body(body: &[u8], additional: &[String]) -> Result<TcpPeer, String> {
    let any = Any::decode(body).map_err(|e| format!("not a google.protobuf.Any: {e}"))?;
    if any.type_url != STRUCT_TYPE_URL {
        return Err(format!("unexpected type {:?}", any.type_url));
    }
    let s = Struct::decode(any.value.as_slice()).map_err(|e| format!("not a Struct: {e}"))?;
    let Some(Kind::StructValue(m)) = s.fields.get(METADATA_KEY).and_then(|v| v.kind.as_ref())
    else {
        return Err(format!("no {METADATA_KEY}"));
    };
    let id = match s.fields.get(METADATA_ID_KEY).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(id)) => id.clone(),
        _ => String::new(),
    };
    Ok(TcpPeer {
        id,
        info: PeerInfo::from_struct(m, additional),
    })
}

/// What a frame at the start of `buf` is.
enum Parse {
    /// More bytes are needed.
    Partial,
    /// Not a frame: relay everything.
    NoMagic,
    /// A frame of this total length.
    Frame(usize),
}

fn parse(buf: &[u8]) -> Result<Parse, String> {
    if buf.len() >= 4 && buf[..4] != MAGIC.to_be_bytes() {
        return Ok(Parse::NoMagic);
    }
    if buf.len() < HEADER_LEN {
        return Ok(Parse::Partial);
    }
    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > MAX_FRAME_LEN {
        return Err(format!(
            "istio-peer-exchange: metadata frame of {len} bytes (more than {MAX_FRAME_LEN})"
        ));
    }
    let total = HEADER_LEN + len as usize;
    Ok(if buf.len() < total {
        Parse::Partial
    } else {
        Parse::Frame(total)
    })
}

#[derive(Debug)]
struct Reading {
    exchange: Arc<TcpExchange>,
    slot: Arc<PeerSlot>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A byte stream whose first bytes are the peer's exchange frame, which is
/// read into the connection's [`PeerSlot`] and never returned to the
/// reader. Writes pass through.
#[derive(Debug)]
pub struct Exchanging<S> {
    inner: S,
    reading: Option<Reading>,
    buf: Vec<u8>,
    pos: usize,
}

impl<S> Exchanging<S> {
    /// A stream without the exchange (another ALPN): every byte as it is.
    pub fn passthrough(inner: S) -> Self {
        Exchanging {
            inner,
            reading: None,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> Exchanging<S> {
    /// Reads until the frame is handled; then the remaining buffered bytes
    /// are relayed.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Some(r) = self.reading.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let stats = &r.exchange.stats;
            match parse(&self.buf).map_err(|e| {
                tracing::debug!(reason = %e, "istio-peer-exchange: closing the connection");
                io::Error::new(io::ErrorKind::InvalidData, e)
            })? {
                Parse::NoMagic => {
                    stats.initial_header_not_found.inc();
                    tracing::debug!("istio-peer-exchange: the peer's bytes do not start with the magic (no metadata exchange on its side); relaying them untouched");
                    self.reading = None;
                    return Poll::Ready(Ok(()));
                }
                Parse::Frame(total) => {
                    match decode_body(&self.buf[HEADER_LEN..total], &r.exchange.additional_labels) {
                        Ok(peer) => {
                            stats.metadata_added.inc();
                            tracing::debug!(peer = %peer.id, workload = %peer.info.workload_name,
                                namespace = %peer.info.namespace, "istio-peer-exchange: learned the peer");
                            let _ = r.slot.0.set(Arc::new(peer));
                        }
                        Err(e) => {
                            stats.header_not_found.inc();
                            tracing::debug!(reason = %e, "istio-peer-exchange: dropping a metadata frame that does not decode");
                        }
                    }
                    self.pos = total;
                    self.reading = None;
                    return Poll::Ready(Ok(()));
                }
                Parse::Partial => {}
            }
            if !self.buf.is_empty() {
                let d = r
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(FRAME_TIMEOUT)));
                if d.as_mut().poll(cx).is_ready() {
                    tracing::debug!("istio-peer-exchange: metadata frame incomplete after {FRAME_TIMEOUT:?}; closing the connection");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "istio-peer-exchange: metadata frame timed out",
                    )));
                }
            }
            let mut chunk = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // The peer closed before a whole frame: relay what came.
                tracing::debug!(
                    "istio-peer-exchange: the peer closed before its metadata frame was complete"
                );
                self.reading = None;
                return Poll::Ready(Ok(()));
            }
            self.buf.extend_from_slice(rb.filled());
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Exchanging<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reading.is_some() {
            ready!(this.poll_frame(cx))?;
        }
        if this.pos < this.buf.len() {
            let n = out.remaining().min(this.buf.len() - this.pos);
            out.put_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.buf.len() {
                this.buf = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Exchanging<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Runs `exchange` on `stream` when the negotiated `alpn` selects it;
/// otherwise (or without an exchange) returns the stream untouched.
pub async fn maybe_start<S>(
    exchange: Option<&Arc<TcpExchange>>,
    alpn: Option<&str>,
    stream: S,
    slot: &Arc<PeerSlot>,
) -> io::Result<Exchanging<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match exchange {
        Some(x) if x.applies(alpn) => x.start(stream, slot.clone()).await,
        _ => Ok(Exchanging::passthrough(stream)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn exchange(store: &Store, node_name: &str) -> (Arc<TcpExchange>, PeerInfo) {
        let info = PeerInfo::from_node_json(
            &json!({"NAME": node_name, "NAMESPACE": "default", "WORKLOAD_NAME": node_name,
                "LABELS": {"app": node_name}}),
            &[],
        );
        let x = TcpExchange {
            protocol: "istio-peer-exchange".into(),
            additional_labels: Vec::new(),
            frame: encode_frame(&format!("sidecar~{node_name}"), &info),
            stats: ExchangeStats::new(store),
        };
        (Arc::new(x), info)
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Both ends of a real TCP connection exchange frames: each learns the
    /// other and reads exactly the other's application bytes.
    #[tokio::test]
    async fn both_sides_learn_each_other_over_a_socket() {
        let store = Store::default();
        let (client_x, client_info) = exchange(&store, "productpage");
        let (server_x, server_info) = exchange(&store, "reviews");
        let (c, s) = pair().await;
        let (cslot, sslot) = (Arc::new(PeerSlot::default()), Arc::new(PeerSlot::default()));
        let server = {
            let sslot = sslot.clone();
            tokio::spawn(async move {
                let mut s = maybe_start(Some(&server_x), Some("istio-peer-exchange"), s, &sslot)
                    .await
                    .unwrap();
                let mut got = [0u8; 5];
                s.read_exact(&mut got).await.unwrap();
                s.write_all(b"pong!").await.unwrap();
                got
            })
        };
        let mut c = maybe_start(Some(&client_x), Some("istio-peer-exchange"), c, &cslot)
            .await
            .unwrap();
        c.write_all(b"ping!").await.unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong!");
        assert_eq!(&server.await.unwrap(), b"ping!");
        let learned = cslot.get().unwrap();
        assert_eq!(learned.id, "sidecar~reviews");
        assert_eq!(learned.info, server_info);
        assert_eq!(sslot.get().unwrap().info, client_info);
        assert_eq!(client_x.stats.metadata_added.get(), 2);
    }

    /// A peer without the exchange: its bytes are relayed untouched.
    #[tokio::test]
    async fn bytes_without_the_magic_pass_through() {
        let store = Store::default();
        let (x, _) = exchange(&store, "reviews");
        let (mut c, s) = pair().await;
        let slot = Arc::new(PeerSlot::default());
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut s = x.start(s, slot.clone()).await.unwrap();
        let mut got = [0u8; 16];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
        assert!(slot.get().is_none());
        assert_eq!(x.stats.initial_header_not_found.get(), 1);
    }

    /// A frame with the magic whose body is not an Any is dropped; the
    /// bytes after it are relayed. An oversized length is an error.
    #[tokio::test]
    async fn malformed_frames() {
        let store = Store::default();
        let (x, _) = exchange(&store, "reviews");
        let (mut c, s) = pair().await;
        let slot = Arc::new(PeerSlot::default());
        let mut frame = MAGIC.to_be_bytes().to_vec();
        frame.extend_from_slice(&3u32.to_be_bytes());
        frame.extend_from_slice(b"\xff\xff\xffdata");
        c.write_all(&frame).await.unwrap();
        let mut s = x.start(s, slot.clone()).await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"data");
        assert!(slot.get().is_none());
        assert_eq!(x.stats.header_not_found.get(), 1);

        let (mut c, s) = pair().await;
        let mut frame = MAGIC.to_be_bytes().to_vec();
        frame.extend_from_slice(&u32::MAX.to_be_bytes());
        c.write_all(&frame).await.unwrap();
        let mut s = x.start(s, slot.clone()).await.unwrap();
        let err = s.read(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// Another ALPN: nothing is written, nothing is read.
    #[tokio::test]
    async fn other_alpn_is_untouched() {
        let store = Store::default();
        let (x, _) = exchange(&store, "reviews");
        let (mut c, s) = pair().await;
        let slot = Arc::new(PeerSlot::default());
        let mut s = maybe_start(Some(&x), Some("istio"), s, &slot)
            .await
            .unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        assert_eq!(x.stats.alpn_protocol_not_found.get(), 1);
    }
}
