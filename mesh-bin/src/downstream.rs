//! A listener's filter chains and what happens to each accepted connection
//! before its terminal filter runs: the TLS inspector (SNI, ALPN and
//! transport protocol peeked from the ClientHello), the HTTP or protocol
//! inspector (the application protocol of a plain-text connection, see
//! `inspect.rs`), filter chain selection (`filter_chain_match`), and TLS
//! termination under the chain's handshake timeout
//! (`transport_socket_connect_timeout`). The inspectors share one deadline,
//! `listener_filters_timeout`, from the accept.
//!
//! A connection that matches no chain, stalls before its ClientHello or the
//! bytes that tell its protocol, closes during inspection, or fails its
//! handshake is closed with a `debug` log line naming the peer and the
//! reason, and counted (`envoy_listener_no_filter_chain_match`,
//! `envoy_listener_downstream_pre_cx_timeout`,
//! `envoy_listener_downstream_listener_filter_remote_close`, the `ssl.*`
//! handshake stats, `mesh_listener_tls_inspector_timeout`). Other
//! connections are not affected: each runs on its own task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_codec::http::server::{serve_connection, ServerConfig};
use mesh_core::identity::PeerIdentity;
use mesh_core::listener::{Accepted, ConnectionGuard};
use mesh_core::stats::{Counter, GaugeGuard, Store};
use mesh_tls::chain_match::{ConnectionInfo, FilterChainSelector};
use mesh_tls::inspect::{peek_client_hello, Inspection};
use mesh_tls::ServerTls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::access_log::listener::{ConnLog, Metered};
use crate::access_log::AccessLogger;
use crate::cluster::ClusterManager;
use crate::http::{ConnService, HcmShared, HttpProxy};
use crate::inspect::{Inspected, ProtocolInspector};
use crate::rpc::{RpcConnection, RpcShared, RpcWorker};
use crate::tcp::TcpProxyShared;

/// The terminal network filter of a chain, shared by every worker.
#[derive(Debug)]
pub(crate) enum Terminal {
    /// `http_connection_manager`.
    Http(Arc<HcmShared>, ServerConfig),
    /// `tcp_proxy`.
    Tcp(Arc<TcpProxyShared>),
    /// The L7 RPC proxy (Dubbo, Thrift, SOFA Bolt).
    Rpc(Arc<RpcShared>),
    /// A chain of a listener from LDS: what it runs is swapped in place
    /// when routes or clusters change.
    Swapping(Swapping),
}

/// The swappable terminal of an xDS listener's chain: each new connection
/// (TCP, RPC) or request (HTTP) takes what its slot holds at that moment.
#[derive(Clone)]
pub(crate) enum Swapping {
    /// One slot per worker.
    Http(Vec<Arc<ArcSwap<HttpProxy>>>, ServerConfig),
    /// One slot for every worker.
    Tcp(Arc<ArcSwap<TcpProxyShared>>),
    /// One slot per worker.
    Rpc(Vec<Arc<ArcSwap<RpcWorker>>>),
}

impl std::fmt::Debug for Swapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Swapping::Http(..) => "Swapping::Http",
            Swapping::Tcp(_) => "Swapping::Tcp",
            Swapping::Rpc(_) => "Swapping::Rpc",
        })
    }
}

/// One filter chain, shared by every worker.
#[derive(Debug)]
pub(crate) struct Chain {
    pub(crate) terminal: Terminal,
    pub(crate) tls: Option<Arc<ServerTls>>,
    pub(crate) handshake_timeout: Option<Duration>,
    /// `envoy.filters.network.rbac`.
    pub(crate) rbac: Option<mesh_filter::rbac::RbacFilter>,
    /// `envoy.filters.network.local_ratelimit`.
    pub(crate) rate_limit: Option<mesh_filter::local_ratelimit::ConnectionRateLimiter>,
}

/// A listener's filter chains and how one is chosen.
#[derive(Debug)]
pub(crate) struct Chains {
    pub(crate) chains: Vec<Chain>,
    pub(crate) selector: FilterChainSelector,
    /// Peek at the ClientHello (configured `tls_inspector`, or needed by a
    /// chain's match, as Envoy adds it by itself).
    pub(crate) inspect: bool,
    pub(crate) inspect_timeout: Option<Duration>,
    /// `continue_on_listener_filters_timeout`: a connection whose ClientHello
    /// did not come in time is matched as plain text instead of closed.
    pub(crate) continue_on_timeout: bool,
    pub(crate) no_match: Counter,
    pub(crate) inspect_timeouts: Counter,
    /// `http_inspector` / `protocol_inspector`.
    pub(crate) protocols: Option<ProtocolInspector>,
    /// Envoy's `downstream_pre_cx_timeout`: listener filters timed out.
    pub(crate) pre_cx_timeout: Counter,
    /// Envoy's `downstream_listener_filter_remote_close`: the peer closed
    /// while the listener filters waited for bytes.
    pub(crate) remote_close: Counter,
    /// The original destination filter and `use_original_dst` hand-off.
    pub(crate) capture: crate::original_dst::Capture,
    /// `default_filter_chain`: the chain (not matched by the selector) for
    /// connections no other chain matches.
    pub(crate) default_chain: Option<usize>,
    /// The listener's `access_log`.
    pub(crate) access_log: Option<AccessLogger>,
}

impl Chains {
    /// Registers the listener-level stats of the listener bound to `addr`.
    pub(crate) fn new(
        chains: Vec<Chain>,
        selector: FilterChainSelector,
        inspector: bool,
        inspect_timeout: Option<Duration>,
        continue_on_timeout: bool,
        store: &Store,
        addr: SocketAddr,
    ) -> Self {
        let label = vec![(
            "envoy_listener_address",
            format!("{}_{}", addr.ip(), addr.port()),
        )];
        let inspect = inspector || selector.needs_inspection();
        Chains {
            chains,
            selector,
            inspect,
            inspect_timeout,
            continue_on_timeout,
            no_match: store.counter("envoy_listener_no_filter_chain_match", &label),
            inspect_timeouts: store.counter("mesh_listener_tls_inspector_timeout", &label),
            protocols: None,
            pre_cx_timeout: store.counter("envoy_listener_downstream_pre_cx_timeout", &label),
            remote_close: store.counter(
                "envoy_listener_downstream_listener_filter_remote_close",
                &label,
            ),
            capture: Default::default(),
            default_chain: None,
            access_log: None,
        }
    }

    /// Adds the listener's `http_inspector` and/or `protocol_inspector`.
    pub(crate) fn with_protocol_inspector(
        mut self,
        http_inspector: bool,
        protocol_inspector: bool,
        store: &Store,
    ) -> Self {
        self.protocols = ProtocolInspector::new(http_inspector, protocol_inspector, store);
        self
    }

    /// With `default_filter_chain` at index `default` of the chains.
    pub(crate) fn with_default_chain(mut self, default: Option<usize>) -> Self {
        self.default_chain = default;
        self
    }

    /// With the original destination filter and hand-off of `capture`.
    pub(crate) fn with_capture(mut self, capture: crate::original_dst::Capture) -> Self {
        self.capture = capture;
        self
    }

    /// Adds the listener's `access_log` (errors name the log's index).
    pub(crate) fn with_access_log(
        mut self,
        configs: &[mesh_core::config::AccessLog],
        store: &Store,
    ) -> Result<Self, String> {
        self.access_log = AccessLogger::new(configs, store)?;
        Ok(self)
    }
}

/// The filter chain selector of `l` (its matched chains) and the index of
/// its `default_filter_chain`, the last chain, when it has one.
pub(crate) fn chain_selector(
    l: &mesh_core::config::Listener,
) -> (FilterChainSelector, Option<usize>) {
    let matched = l.filter_chains.len() - usize::from(l.default_filter_chain);
    let selector = FilterChainSelector::new(
        l.filter_chains[..matched]
            .iter()
            .map(|c| c.filter_chain_match.clone())
            .collect(),
    );
    (selector, l.default_filter_chain.then_some(matched))
}

/// The addresses of a downstream connection.
#[derive(Clone, Copy)]
struct Conn {
    peer: SocketAddr,
    local: SocketAddr,
    /// `local` is the original destination restored by the listener filter.
    restored: bool,
}

enum WorkerTerminal {
    Http {
        proxy: Arc<HttpProxy>,
        server: Arc<ServerConfig>,
    },
    Tcp(Arc<TcpProxyShared>),
    Rpc(Arc<RpcWorker>),
    HttpSwapping {
        slot: Arc<ArcSwap<HttpProxy>>,
        server: Arc<ServerConfig>,
    },
    TcpSwapping(Arc<ArcSwap<TcpProxyShared>>),
    RpcSwapping(Arc<ArcSwap<RpcWorker>>),
}

/// One worker's view of a listener's chains (its own HTTP proxies and
/// pools).
pub(crate) struct WorkerChains {
    shared: Arc<Chains>,
    terminals: Vec<WorkerTerminal>,
    drain: CancellationToken,
    worker: usize,
}

impl WorkerChains {
    /// The view of worker `worker` (which picks its slots of swapping
    /// terminals).
    pub(crate) fn for_worker(
        shared: Arc<Chains>,
        cm: &ClusterManager,
        drain: CancellationToken,
        worker: usize,
    ) -> Self {
        let terminals = shared
            .chains
            .iter()
            .map(|c| match &c.terminal {
                Terminal::Http(hcm, server) => WorkerTerminal::Http {
                    proxy: Arc::new(HttpProxy::new(hcm.clone(), cm)),
                    server: Arc::new(server.clone()),
                },
                Terminal::Tcp(t) => WorkerTerminal::Tcp(t.clone()),
                Terminal::Rpc(r) => WorkerTerminal::Rpc(Arc::new(RpcWorker::new(r.clone(), cm))),
                Terminal::Swapping(Swapping::Http(slots, server)) => WorkerTerminal::HttpSwapping {
                    slot: slots[worker % slots.len().max(1)].clone(),
                    server: Arc::new(server.clone()),
                },
                Terminal::Swapping(Swapping::Tcp(slot)) => {
                    WorkerTerminal::TcpSwapping(slot.clone())
                }
                Terminal::Swapping(Swapping::Rpc(slots)) => {
                    WorkerTerminal::RpcSwapping(slots[worker % slots.len().max(1)].clone())
                }
            })
            .collect();
        WorkerChains {
            shared,
            terminals,
            drain,
            worker,
        }
    }

    /// The worker this view belongs to.
    pub(crate) fn worker(&self) -> usize {
        self.worker
    }

    /// Serves one accepted connection to its end: the original destination
    /// filter and hand-off first, then the chosen listener's chains.
    pub(crate) async fn serve(self: Arc<Self>, a: Accepted) {
        let c = self.shared.capture.apply(self.clone(), a);
        c.chains.serve_chains(c.accepted, c.restored).await
    }

    /// Serves one connection with this listener's filter chains;
    /// `restored`: its local address is the original destination.
    async fn serve_chains(self: Arc<Self>, a: Accepted, restored: bool) {
        let Accepted {
            stream,
            peer,
            local,
            guard,
        } = a;
        let shared = &self.shared;
        let deadline = shared
            .inspect_timeout
            .and_then(|t| tokio::time::Instant::now().checked_add(t));
        // After a timeout the remaining listener filters are skipped.
        let mut timed_out = false;
        let mut log = shared
            .access_log
            .as_ref()
            .map(|l| ConnLog::new(l, peer, local));
        let (transport, hello) = if shared.inspect {
            let t = shared
                .inspect_timeout
                .unwrap_or(Duration::from_secs(u32::MAX as u64));
            match peek_client_hello(&stream, t).await {
                Ok(Inspection::Tls(h)) => ("tls", Some(h)),
                Ok(Inspection::NotTls) => ("raw_buffer", None),
                Err(e)
                    if e.kind() == std::io::ErrorKind::TimedOut && shared.continue_on_timeout =>
                {
                    shared.inspect_timeouts.inc();
                    shared.pre_cx_timeout.inc();
                    timed_out = true;
                    tracing::debug!(%peer, "tls_inspector: no ClientHello in time; continuing as plain text");
                    ("raw_buffer", None)
                }
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        shared.inspect_timeouts.inc();
                        shared.pre_cx_timeout.inc();
                    } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        shared.remote_close.inc();
                    }
                    tracing::debug!(%peer, error = %e, "tls_inspector: no ClientHello; closing");
                    return;
                }
            }
        } else {
            ("raw_buffer", None)
        };
        let mut detected = Vec::new();
        if let (Some(pi), "raw_buffer", false) = (&shared.protocols, transport, timed_out) {
            match pi.inspect(&stream, deadline).await {
                Inspected::Decided(Some(p)) => {
                    tracing::trace!(%peer, protocol = p.name(), "protocol inspector: detected");
                    detected.push(p.name().to_string());
                }
                Inspected::Decided(None) => {
                    tracing::trace!(%peer, "protocol inspector: no known protocol");
                }
                Inspected::TimedOut if shared.continue_on_timeout => {
                    shared.pre_cx_timeout.inc();
                    tracing::debug!(%peer, "protocol inspector: no decision in time; continuing with no application protocol");
                }
                Inspected::TimedOut => {
                    shared.pre_cx_timeout.inc();
                    tracing::debug!(%peer, "protocol inspector: no decision within listener_filters_timeout; closing");
                    return;
                }
                Inspected::Failed(e) => {
                    if matches!(e, mesh_core::peek::PeekError::Closed { .. }) {
                        shared.remote_close.inc();
                    }
                    tracing::debug!(%peer, error = %e, "protocol inspector: connection failed before its protocol was known; closing");
                    return;
                }
            }
        }
        let info = ConnectionInfo {
            local,
            peer,
            transport_protocol: transport,
            sni: hello.as_ref().and_then(|h| h.sni.as_deref()),
            alpn: hello.as_ref().map(|h| &h.alpn).unwrap_or(&detected),
        };
        if let Some(l) = &mut log {
            l.sni(info.sni);
        }
        let Some(index) = shared.selector.select(&info).or(shared.default_chain) else {
            shared.no_match.inc();
            if let Some(l) = &mut log {
                l.no_filter_chain();
            }
            tracing::debug!(%peer, %local, sni = ?info.sni, transport, "no filter chain matches; closing");
            return;
        };
        let chain = &shared.chains[index];
        if chain.rate_limit.as_ref().is_some_and(|r| !r.admit()) {
            tracing::debug!(%peer, "local_ratelimit: connection over the limit; closing");
            return;
        }
        let rpc = match &self.terminals[index] {
            WorkerTerminal::Rpc(worker) => Some(worker.clone()),
            WorkerTerminal::RpcSwapping(slot) => Some(slot.load_full()),
            _ => None,
        };
        if let (Some(worker), None, None) = (rpc, &chain.rbac, &chain.tls) {
            // A plain-text RPC chain without RBAC: straight to the proxy. The
            // listener's log line counts the connection's bytes.
            let stream = Metered::new(stream, log.as_ref().map(ConnLog::meter));
            let conn = RpcConnection {
                peer,
                local,
                identity: None,
            };
            return worker
                .handle_io(stream, conn, guard, self.drain.clone())
                .await;
        }
        let conn = Conn {
            peer,
            local,
            restored,
        };
        match &chain.tls {
            None => self.run(index, stream, conn, guard, None, &mut log).await,
            Some(tls) => match tls.accept(stream, chain.handshake_timeout).await {
                Ok((stream, id)) => {
                    self.run(index, stream, conn, guard, Some(Arc::new(id)), &mut log)
                        .await
                }
                Err(e) => {
                    if let Some(l) = &mut log {
                        l.tls_failed(e.reason.as_str(), &e.message);
                    }
                    tracing::debug!(%peer, reason = e.reason.as_str(), error = %e.message,
                        "downstream TLS handshake failed; closing");
                }
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run<S>(
        &self,
        index: usize,
        stream: S,
        conn: Conn,
        guard: ConnectionGuard,
        tls: Option<Arc<PeerIdentity>>,
        log: &mut Option<ConnLog>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            peer,
            local,
            restored,
        } = conn;
        let original_dst = restored.then_some(local);
        if let (Some(l), Some(id)) = (log.as_mut(), &tls) {
            l.tls(id);
        }
        let stream = Metered::new(stream, log.as_ref().map(ConnLog::meter));
        if let Some(rbac) = &self.shared.chains[index].rbac {
            let facts = mesh_filter::rbac::ConnectionFacts {
                peer,
                local,
                identity: tls.as_deref(),
            };
            if let Err(policy) = rbac.check_policy(None::<&http::Request<()>>, &facts) {
                if let Some(l) = log.as_mut() {
                    l.terminated(format!(
                        "rbac_access_denied_matched_policy[{}]",
                        policy.unwrap_or("none")
                    ));
                }
                tracing::debug!(%peer, "rbac: connection denied; closing");
                return;
            }
        }
        match &self.terminals[index] {
            WorkerTerminal::Http { proxy, server } => {
                let mut svc =
                    ConnService::new(proxy.clone(), peer, local).with_original_dst(original_dst);
                if let Some(l) = log.as_mut() {
                    l.http();
                    svc = svc.with_connection_id(l.id());
                }
                if let Some(id) = tls {
                    svc = svc.with_tls(id);
                }
                let hstats = proxy.shared().stats.clone();
                hstats.cx_total.inc();
                let _cx = GaugeGuard::new(&hstats.cx_active);
                serve_connection(stream, server, svc, self.drain.clone()).await;
                drop(guard);
            }
            WorkerTerminal::HttpSwapping { slot, server } => {
                let mut svc = ConnService::swapping(slot.clone(), peer, local)
                    .with_original_dst(original_dst);
                if let Some(l) = log.as_mut() {
                    l.http();
                    svc = svc.with_connection_id(l.id());
                }
                if let Some(id) = tls {
                    svc = svc.with_tls(id);
                }
                let hstats = slot.load().shared().stats.clone();
                hstats.cx_total.inc();
                let _cx = GaugeGuard::new(&hstats.cx_active);
                serve_connection(stream, server, svc, self.drain.clone()).await;
                drop(guard);
            }
            WorkerTerminal::Tcp(_) | WorkerTerminal::TcpSwapping(_) => {
                let tcp = match &self.terminals[index] {
                    WorkerTerminal::TcpSwapping(slot) => slot.load_full(),
                    WorkerTerminal::Tcp(t) => t.clone(),
                    _ => return,
                };
                let outcome = tcp
                    .handle_captured(
                        stream,
                        peer,
                        Some(local),
                        original_dst,
                        tls.as_deref(),
                        guard,
                    )
                    .await;
                if let Some(l) = log.as_mut() {
                    l.tcp(outcome);
                }
            }
            WorkerTerminal::Rpc(_) | WorkerTerminal::RpcSwapping(_) => {
                let worker = match &self.terminals[index] {
                    WorkerTerminal::RpcSwapping(slot) => slot.load_full(),
                    WorkerTerminal::Rpc(w) => w.clone(),
                    _ => return,
                };
                let conn = RpcConnection {
                    peer,
                    local,
                    identity: tls,
                };
                worker
                    .handle_io(stream, conn, guard, self.drain.clone())
                    .await;
            }
        }
    }
}
