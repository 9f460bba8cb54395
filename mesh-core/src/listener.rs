//! The listener/connection runtime: binding, the accept loop, per-listener
//! connection limits, and graceful drain.
//!
//! Drain works in two steps, as in Envoy: [`Drain::signal`] stops every
//! accept loop and tells each connection to finish what it is doing (an
//! HTTP/1.1 connection closes after its current response, an HTTP/2
//! connection sends GOAWAY); [`Drain::wait`] resolves once every tracked
//! connection has ended, and the caller bounds it with the drain timeout.
//! Both halves are runtime-agnostic, so one `Drain` covers every worker
//! thread.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::stats::{Counter, Gauge, GaugeGuard, Store};

/// Graceful-drain coordination shared by every listener and connection.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    /// A drain that has not been signalled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining: accept loops stop, connections are asked to finish.
    pub fn signal(&self) {
        self.tracker.close();
        self.token.cancel();
    }

    /// True once [`Drain::signal`] was called.
    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves when draining starts.
    pub fn signalled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// A token that is cancelled when draining starts.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Tracks a connection future: [`Drain::wait`] waits for it.
    pub fn track<F: Future>(&self, fut: F) -> tokio_util::task::task_tracker::TrackedFuture<F> {
        self.tracker.track_future(fut)
    }

    /// How many tracked connections are still running.
    pub fn active(&self) -> usize {
        self.tracker.len()
    }

    /// Resolves once draining was signalled and every tracked connection
    /// has ended.
    pub async fn wait(&self) {
        self.token.cancelled().await;
        self.tracker.wait().await;
    }
}

/// Binds a TCP listening socket with `SO_REUSEADDR` and `SO_REUSEPORT`, so
/// several workers can each own an accept queue on the same port (the
/// kernel spreads new connections between them) and a new process can bind
/// beside an old one during an upgrade.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Per-listener stats, named as Envoy's `listener.<address>.*`.
#[derive(Debug, Clone)]
pub struct ListenerStats {
    /// `downstream_cx_total`.
    pub cx_total: Counter,
    /// `downstream_cx_active`.
    pub cx_active: Gauge,
    /// `downstream_cx_overflow`: connections closed by the connection limit.
    pub cx_overflow: Counter,
}

impl ListenerStats {
    /// Registers the stats of the listener bound to `addr`.
    pub fn new(store: &Store, addr: SocketAddr) -> Self {
        let label = vec![(
            "envoy_listener_address",
            format!("{}_{}", addr.ip(), addr.port()),
        )];
        ListenerStats {
            cx_total: store.counter("envoy_listener_downstream_cx_total", &label),
            cx_active: store.gauge("envoy_listener_downstream_cx_active", &label),
            cx_overflow: store.counter("envoy_listener_downstream_cx_overflow", &label),
        }
    }
}

/// A per-listener cap on concurrent connections, shared by every worker.
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    permits: Arc<Semaphore>,
    delay: Option<Duration>,
}

impl ConnectionLimiter {
    /// At most `max` concurrent connections; rejected ones are closed after
    /// `delay` (immediately when `None`).
    pub fn new(max: usize, delay: Option<Duration>) -> Self {
        ConnectionLimiter {
            permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            delay,
        }
    }
}

/// What a connection handler receives with each accepted connection.
#[derive(Debug)]
pub struct Accepted {
    /// The connection.
    pub stream: TcpStream,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The local address it arrived on.
    pub local: SocketAddr,
    /// Held for the connection's lifetime: its slot under the listener's
    /// connection limit and its share of `downstream_cx_active`.
    pub guard: ConnectionGuard,
}

/// Keeps a connection counted while it is open.
#[derive(Debug)]
pub struct ConnectionGuard {
    _permit: Option<OwnedSemaphorePermit>,
    _active: GaugeGuard,
}

/// Accepts connections until draining starts, handing each to `handler` on
/// a task of the current runtime that `drain` tracks.
pub async fn accept_loop<H, Fut>(
    listener: TcpListener,
    limiter: Option<ConnectionLimiter>,
    drain: Drain,
    stats: ListenerStats,
    mut handler: H,
) where
    H: FnMut(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.signalled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        stats.cx_total.inc();
        let permit = match &limiter {
            None => None,
            Some(l) => match l.permits.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    stats.cx_overflow.inc();
                    tracing::debug!(%peer, "connection limit reached; closing");
                    if let Some(d) = l.delay {
                        tokio::spawn(drain.track(async move {
                            tokio::time::sleep(d).await;
                            drop(stream);
                        }));
                    }
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(_) => continue,
        };
        let guard = ConnectionGuard {
            _permit: permit,
            _active: GaugeGuard::new(&stats.cx_active),
        };
        let fut = handler(Accepted {
            stream,
            peer,
            local,
            guard,
        });
        tokio::spawn(drain.track(fut));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn limit_closes_connections_over_the_cap_and_drain_waits() {
        let std_listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let store = Store::new();
        let stats = ListenerStats::new(&store, addr);
        let drain = Drain::new();
        let loop_task = tokio::spawn(accept_loop(
            listener,
            Some(ConnectionLimiter::new(1, None)),
            drain.clone(),
            stats.clone(),
            |mut a: Accepted| async move {
                let mut buf = [0u8; 4];
                // Echo one message, then hold the connection until the peer closes.
                if a.stream.read_exact(&mut buf).await.is_ok() {
                    let _ = a.stream.write_all(&buf).await;
                }
                let _ = a.stream.read(&mut buf).await;
                drop(a.guard);
            },
        ));
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        first.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // The second connection is over the limit: closed without service.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let n = second.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(stats.cx_overflow.get(), 1);
        assert_eq!(stats.cx_active.get(), 1);

        drain.signal();
        loop_task.await.unwrap();
        assert_eq!(drain.active(), 1, "the open connection is still tracked");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), drain.wait())
            .await
            .unwrap();
        assert_eq!(stats.cx_active.get(), 0);
    }
}
