//! The downstream side of an RPC connection: frames requests off the
//! socket, runs each through a `tower::Service` concurrently (many requests
//! in flight per connection, answered in completion order, matched by the
//! client through their request ids), answers heartbeats locally, and
//! writes responses back in batches.
//!
//! A frame that cannot be decoded ends the connection after the codec's
//! error reply (when it has one) is written; the reason is logged. Other
//! connections are not affected.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use super::{Codec, Message, MessageKind, DEFAULT_MAX_FRAME};

/// Limits of one downstream connection.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The largest frame accepted (default 8 MiB).
    pub max_frame: usize,
    /// Requests handled at once per connection; beyond it the connection
    /// is not read until one finishes (default 1024).
    pub max_in_flight: usize,
    /// Close the connection after this long with no request in flight and
    /// no byte received (`None`: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame: DEFAULT_MAX_FRAME,
            max_in_flight: 1024,
            idle_timeout: None,
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The client closed it.
    Eof,
    /// Draining, or the idle timeout passed.
    Local(&'static str),
    /// A frame could not be decoded (the reason).
    Decode(String),
    /// Reading or writing the socket failed.
    Io(String),
}

/// What a connection moved, for stats and logs.
#[derive(Debug, Clone, Default)]
pub struct ConnectionTotals {
    /// Requests (and oneways) received.
    pub requests: u64,
    /// Heartbeats answered.
    pub heartbeats: u64,
    /// Bytes read.
    pub bytes_received: u64,
    /// Bytes written.
    pub bytes_sent: u64,
}

/// Serves one downstream connection until it closes. `svc` is cloned for
/// every request; it returns the message to send back (with the request's
/// id), or `None` (oneway requests). `stop` ends the connection gracefully:
/// no more requests are read, those in flight finish.
pub async fn serve<IO, S>(
    io: IO,
    codec: Arc<dyn Codec>,
    config: &ServerConfig,
    svc: S,
    stop: CancellationToken,
) -> (Closed, ConnectionTotals)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Message, Response = Option<Message>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(io);
    // A permit travels with each response until it is written, so a client
    // that stops reading stops being read: at most `max_in_flight`
    // requests and responses are held per connection.
    let (tx, rx) = mpsc::unbounded_channel::<(Message, Option<OwnedSemaphorePermit>)>();
    let writer = tokio::spawn(write_loop(wr, codec.clone(), rx));
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let mut totals = ConnectionTotals::default();
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut decode_reply = None;
    let closed = 'conn: loop {
        // Everything already buffered first (pipelined requests).
        loop {
            match codec.decode(&mut buf, config.max_frame) {
                Ok(Some(msg)) => match msg.kind {
                    MessageKind::Request | MessageKind::Oneway => {
                        totals.requests += 1;
                        let permit = tokio::select! {
                            p = in_flight.clone().acquire_owned() => p,
                            _ = stop.cancelled() => break 'conn Closed::Local("draining"),
                        };
                        let Ok(permit) = permit else {
                            break 'conn Closed::Local("closing");
                        };
                        let svc = svc.clone();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let Ok(resp) = svc.oneshot(msg).await;
                            if let Some(resp) = resp {
                                let _ = tx.send((resp, Some(permit)));
                            }
                        });
                    }
                    MessageKind::Heartbeat => {
                        totals.heartbeats += 1;
                        if let Some(r) = codec.heartbeat_reply(&msg) {
                            let _ = tx.send((r, None));
                        }
                    }
                    kind => {
                        tracing::debug!(
                            codec = codec.name(),
                            ?kind,
                            id = msg.id,
                            "ignoring a response sent by a client"
                        );
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    decode_reply = e.reply;
                    break 'conn Closed::Decode(e.reason.into_owned());
                }
            }
        }
        let read = async {
            match config.idle_timeout {
                Some(t) => loop {
                    match tokio::time::timeout(t, rd.read_buf(&mut buf)).await {
                        Ok(r) => return Some(r),
                        // Idle only when nothing is in flight.
                        Err(_) if in_flight.available_permits() == config.max_in_flight.max(1) => {
                            return None
                        }
                        Err(_) => continue,
                    }
                },
                None => Some(rd.read_buf(&mut buf).await),
            }
        };
        tokio::select! {
            r = read => match r {
                Some(Ok(0)) => break Closed::Eof,
                Some(Ok(n)) => totals.bytes_received += n as u64,
                Some(Err(e)) => break Closed::Io(e.to_string()),
                None => break Closed::Local("idle timeout"),
            },
            _ = stop.cancelled() => break Closed::Local("draining"),
        }
    };
    if let Closed::Decode(reason) = &closed {
        tracing::info!(codec = codec.name(), reason = %reason, "closing an RPC connection: undecodable frame");
    }
    // Let the requests in flight finish, then the writer drains and ends.
    let _ = in_flight
        .acquire_many(config.max_in_flight.max(1) as u32)
        .await;
    drop(tx);
    let sent = match writer.await {
        Ok((mut wr, sent)) => {
            let mut extra = 0;
            if let Some(reply) = decode_reply {
                if wr.write_all(&reply).await.is_ok() {
                    extra = reply.len() as u64;
                }
            }
            let _ = wr.shutdown().await;
            sent + extra
        }
        Err(_) => 0,
    };
    totals.bytes_sent = sent;
    (closed, totals)
}

async fn write_loop<W: AsyncWrite + Unpin + Send + 'static>(
    mut wr: W,
    codec: Arc<dyn Codec>,
    mut rx: mpsc::UnboundedReceiver<(Message, Option<OwnedSemaphorePermit>)>,
) -> (W, u64) {
    let mut out = BytesMut::with_capacity(8 * 1024);
    let mut sent = 0u64;
    let mut failed = false;
    let mut permits = Vec::new();
    while let Some((msg, permit)) = rx.recv().await {
        codec.encode(&msg, msg.id, &mut out);
        permits.extend(permit);
        // Batch whatever else is ready into the same write.
        while out.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok((m, p)) => {
                    codec.encode(&m, m.id, &mut out);
                    permits.extend(p);
                }
                Err(_) => break,
            }
        }
        if !failed {
            // Flushed: a TLS stream may hold written bytes until then.
            let written = match wr.write_all(&out).await {
                Ok(()) => wr.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::debug!(error = %e, "writing RPC responses failed");
                failed = true;
            } else {
                sent += out.len() as u64;
            }
        }
        out.clear();
        permits.clear();
    }
    (wr, sent)
}
