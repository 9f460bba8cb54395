//! The downstream HTTP server: one accepted connection served with a hyper
//! service, as HTTP/1.1, HTTP/2 (h2c prior knowledge), or either (AUTO,
//! decided from the first bytes: the HTTP/2 preface or not).
//!
//! Limits follow Envoy's defaults: request headers over
//! `max_request_headers_kb` are answered with 431 (HTTP/1.1) or refused
//! (HTTP/2), a malformed request gets 400 and the connection closes, and
//! neither affects other connections. On drain, HTTP/1.1 connections close
//! after the response in flight and HTTP/2 connections send GOAWAY.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use mesh_core::config::CodecType;

/// Settings of the downstream codec.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// AUTO, HTTP1 or HTTP2.
    pub codec: CodecType,
    /// `max_request_headers_kb` in bytes.
    pub max_request_headers_bytes: usize,
    /// `request_headers_timeout`.
    pub request_headers_timeout: Option<Duration>,
    /// Connection idle timeout: no byte either way for this long closes the
    /// connection (see [`crate::idle`]).
    pub idle_timeout: Option<Duration>,
}

/// Serves one connection until it ends or, after `drain` fires, until its
/// in-flight requests are done.
pub async fn serve_connection<I, S, B>(
    io: I,
    config: &ServerConfig,
    service: S,
    drain: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match config.idle_timeout {
        Some(t) => serve(crate::idle::IdleIo::new(io, t), config, service, drain).await,
        None => serve(io, config, service, drain).await,
    }
}

async fn serve<I, S, B>(io: I, config: &ServerConfig, service: S, drain: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(io);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    {
        let mut h1 = builder.http1();
        h1.timer(TokioTimer::new())
            .max_buf_size(config.max_request_headers_bytes.max(8192))
            .keep_alive(true)
            .half_close(false);
        match config.request_headers_timeout {
            Some(t) => {
                h1.header_read_timeout(t);
            }
            None => {
                h1.header_read_timeout(None);
            }
        }
    }
    {
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new())
            .max_header_list_size(config.max_request_headers_bytes as u32)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(16 << 20)
            .max_concurrent_streams(1024);
    }
    let builder = match config.codec {
        CodecType::Auto => builder,
        CodecType::Http1 => builder.http1_only(),
        CodecType::Http2 => builder.http2_only(),
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "downstream connection ended with an error");
            }
            return;
        }
        _ = drain.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "downstream connection ended with an error while draining");
    }
}
