//! mesh-codec: bytes to messages and back.
//!
//! - [`http`]: HTTP/1.1 and HTTP/2 on hyper — the downstream server
//!   ([`http::server`], AUTO/HTTP1/HTTP2 codecs, h2c prior knowledge), the
//!   upstream client with per-endpoint connection pools ([`http::client`]),
//!   the body type the proxy streams ([`http::body`]) and hop-by-hop header
//!   handling ([`http::hop`]);
//! - [`rpc`]: the RPC codec framework (one [`rpc::Codec`] per protocol,
//!   shared framing, pipelining and multiplexing) with the Dubbo, Thrift and
//!   SOFA Bolt codecs;
//! - [`sniff`]: which protocol a connection speaks, from its first bytes
//!   (HTTP/1.x, h2c, Dubbo, SOFA Bolt, Thrift), for listener-level
//!   protocol detection;
//! - [`tcp`]: raw TCP pass-through for `envoy.filters.network.tcp_proxy`;
//! - [`transport`]: the hook that wraps new upstream connections (TLS).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod http;
pub mod idle;
pub mod rpc;
pub mod sniff;
pub mod tcp;
pub mod transport;
