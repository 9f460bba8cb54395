//! Upstream transport hooks: what happens to a freshly connected TCP stream
//! before a protocol runs on it (TLS origination, for example).
//!
//! The codecs do not know TLS; a [`Connector`] (implemented with `mesh-tls`
//! by the proxy) turns the TCP stream into any byte stream. An
//! [`EndpointPool`](crate::http::client::EndpointPool) made
//! with a connector runs it on every new connection; one without sends
//! plain text.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream a connector produces.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// The future a [`Connector`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send>>;

/// What the connection will carry, so a connector can offer the right ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// Opaque bytes (TCP proxying).
    Raw,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2.
    Http2,
}

/// Wraps a new upstream connection (for example in TLS). An error fails the
/// connection attempt: the proxy reports it as a connect failure (`UF`).
pub trait Connector: Send + Sync + Debug {
    /// Wraps `tcp`, a connection to `peer`.
    fn connect(&self, tcp: TcpStream, peer: SocketAddr, carried: Carried) -> ConnectFuture;
}

/// Connects to `addr`, from `source` when given (a cluster's
/// `upstream_bind_config`: the socket is bound to that address, port 0
/// meaning any, before connecting).
pub async fn connect_from(addr: SocketAddr, source: Option<SocketAddr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = match source {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(source)?;
    socket.connect(addr).await
}
