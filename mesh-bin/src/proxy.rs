//! `Proxy`: a configuration turned into running listeners, clusters and the
//! admin API.
//!
//! Start-up order: clusters are built and DNS clusters resolved first, then
//! every listener socket is bound, then the workers start accepting, then
//! `/ready` turns 200 — so a listener never accepts a request its clusters
//! cannot serve yet.
//!
//! Workers: `concurrency` threads, each running its own single-threaded
//! tokio runtime with its own `SO_REUSEPORT` socket per listener and its own
//! upstream connection pools (Envoy's worker model). Nothing on the request
//! path crosses threads except relaxed atomic stats and the read-only
//! route tables and endpoint sets.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mesh_codec::http::server::ServerConfig;
use mesh_core::config::{Bootstrap, NetworkFilter};
use mesh_core::listener::{
    accept_loop, bind_tcp, Accepted, ConnectionLimiter, Drain, ListenerStats,
};
use mesh_core::stats::Store;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::cluster::ClusterManager;
use crate::downstream::{Chain, Chains, Terminal, WorkerChains};
use crate::http::HcmShared;
use crate::rpc::RpcShared;
use crate::tcp::TcpProxyShared;

/// How to run a proxy (the command-line knobs).
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Worker threads (Envoy's `--concurrency`), at least 1.
    pub concurrency: usize,
    /// How the worker threads are organised.
    pub runtime: RuntimeMode,
    /// How long draining may take before the process exits anyway.
    pub drain_time: Duration,
    /// Where to write the admin address once bound (`--admin-address-path`).
    pub admin_address_path: Option<std::path::PathBuf>,
    /// RPC codecs registered by a Rust program, for `RpcCodec::Custom`.
    pub rpc_codecs: crate::rpc::CodecRegistry,
    /// The largest xDS response accepted (`--xds-max-message-bytes`);
    /// larger ones fail the stream with a clear error.
    pub xds_max_message_size: usize,
    /// On-demand EDS (`--lazy-eds`): clusters from CDS are warm at once and
    /// subscribe to their endpoints only when a request first uses them
    /// (`crate::lazy_eds`).
    pub lazy_eds: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            concurrency: 1,
            runtime: RuntimeMode::PerCore,
            drain_time: Duration::from_secs(5),
            admin_address_path: None,
            rpc_codecs: Default::default(),
            xds_max_message_size: mesh_xds::client::DEFAULT_MAX_MESSAGE_SIZE,
            lazy_eds: false,
        }
    }
}

/// How request traffic is spread over threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeMode {
    /// `concurrency` threads, each with its own current-thread tokio runtime,
    /// its own `SO_REUSEPORT` socket per listener and its own upstream pools
    /// (Envoy's worker model; the default).
    #[default]
    PerCore,
    /// One multi-thread tokio runtime with `concurrency` worker threads and
    /// work stealing, one socket per listener and one set of pools.
    Shared,
}

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is valid but cannot be served (field path and reason).
    #[error("{0}")]
    Config(String),
    /// A socket could not be bound.
    #[error("binding {addr} for {what}: {source}")]
    Bind {
        /// What was being bound.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not start.
    #[error("starting a worker: {0}")]
    Worker(std::io::Error),
}

struct BuiltListener {
    name: String,
    addr: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
    limiter: Option<ConnectionLimiter>,
    stats: ListenerStats,
    chains: Arc<Chains>,
}

/// The field path of the terminal filter config of chain `ci` of listener `li`.
fn terminal_path(li: usize, ci: usize, l: &mesh_core::config::Listener) -> String {
    let index = usize::from(ci == 0 && l.connection_limit.is_some())
        + usize::from(l.filter_chains.get(ci).is_some_and(|c| c.rbac.is_some()))
        + usize::from(
            l.filter_chains
                .get(ci)
                .is_some_and(|c| c.local_ratelimit.is_some()),
        );
    format!("static_resources.listeners[{li}].filter_chains[{ci}].filters[{index}].typed_config")
}

/// Checks what the loader cannot: compiles every route table (regexes,
/// header templates, domains) as [`Proxy::start`] would, and refuses what
/// this build cannot run (EDS clusters), without binding anything. Returns
/// every error with its field path.
pub fn check(bootstrap: &Bootstrap) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(d) = &bootstrap.dynamic_resources {
        errors.extend(crate::dynamic::check(d, &bootstrap.clusters));
    }
    for (i, c) in bootstrap.clusters.iter().enumerate() {
        if bootstrap.dynamic_resources.is_none()
            && matches!(c.discovery, mesh_core::config::DiscoveryType::Eds { .. })
        {
            errors.push(format!(
                "static_resources.clusters[{i}].type: EDS needs an xDS source, which this build does not have yet (unsupported)"
            ));
        }
    }
    for (li, l) in bootstrap.listeners.iter().enumerate() {
        for (ci, chain) in l.filter_chains.iter().enumerate() {
            let terminal_path = |li, l| terminal_path(li, ci, l);
            if let NetworkFilter::Rpc(rpc) = &chain.terminal {
                if let Err(e) = mesh_core::router::RouteTable::new(&rpc.route_config) {
                    errors.push(format!(
                        "{}.route_config.{}: {}",
                        terminal_path(li, l),
                        e.path,
                        e.message
                    ));
                }
            }
            if let NetworkFilter::HttpConnectionManager(hcm) = &chain.terminal {
                if let Err(e) = mesh_core::router::RouteTable::new(&hcm.route_config) {
                    errors.push(format!(
                        "{}.route_config.{}: {}",
                        terminal_path(li, l),
                        e.path,
                        e.message
                    ));
                }
                if let Some(name) = &hcm.server_name {
                    if http::HeaderValue::from_str(name).is_err() {
                        errors.push(format!(
                            "{}.server_name: not a valid header value",
                            terminal_path(li, l)
                        ));
                    }
                }
            }
        }
    }
    errors
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    admin_addr: Option<SocketAddr>,
    xds: Option<Arc<crate::dynamic::XdsRuntime>>,
    listeners: Vec<(String, SocketAddr)>,
    drain: Drain,
    store: Store,
    stop: CancellationToken,
    drain_time: Duration,
}

impl Proxy {
    /// Starts everything the configuration describes. Must be called from
    /// within a tokio runtime, which then runs the admin API and DNS
    /// refreshes; request traffic runs on the proxy's own worker threads.
    /// `config_json` is what `/config_dump` shows.
    pub async fn start(
        bootstrap: Bootstrap,
        options: ProxyOptions,
        config_json: serde_json::Value,
    ) -> Result<Proxy, StartError> {
        if let Some(d) = &bootstrap.dynamic_resources {
            if let Some(e) = crate::dynamic::check(d, &bootstrap.clusters)
                .into_iter()
                .next()
            {
                return Err(StartError::Config(e));
            }
        }
        crate::istio::metadata::set_local_node(&bootstrap.node);
        let store = Store::new();
        let stop = CancellationToken::new();
        let drain = Drain::new();
        let secrets =
            crate::tls::secret_store(&bootstrap, &store, &stop).map_err(StartError::Config)?;
        let tls_registry = Arc::new(crate::tls::TlsRegistry::default());
        let cm = Arc::new(
            ClusterManager::build_with_secrets(
                &bootstrap.clusters,
                &bootstrap.node.locality.zone,
                &store,
                &stop,
                bootstrap.dynamic_resources.is_some(),
                &secrets,
            )
            .await
            .map_err(StartError::Config)?,
        );
        for c in cm.iter() {
            if let Some(t) = &c.tls {
                tls_registry.add_client(t.clone());
            }
            for t in c.socket_matches.iter().filter_map(|m| m.tls.as_ref()) {
                tls_registry.add_client(t.clone());
            }
        }
        let concurrency = options.concurrency.max(1);
        let socket_groups = match options.runtime {
            RuntimeMode::PerCore => concurrency,
            RuntimeMode::Shared => 1,
        };

        let handoff = Arc::new(crate::original_dst::Handoff::default());
        let mut built = Vec::new();
        for (li, l) in bootstrap.listeners.iter().enumerate() {
            let path = format!("static_resources.listeners[{li}]");
            if l.filter_chains.is_empty() {
                return Err(StartError::Config(format!(
                    "{path}.filter_chains: at least one filter chain is required"
                )));
            }
            let mut terminals = Vec::new();
            for (ci, chain) in l.filter_chains.iter().enumerate() {
                let terminal = match &chain.terminal {
                    NetworkFilter::HttpConnectionManager(hcm) => {
                        let shared = HcmShared::new(hcm, &store).map_err(|e| {
                            StartError::Config(format!("{}.{e}", terminal_path(li, ci, l)))
                        })?;
                        let server = ServerConfig {
                            codec: hcm.codec_type,
                            max_request_headers_bytes: hcm.max_request_headers_kb as usize * 1024,
                            request_headers_timeout: hcm.request_headers_timeout,
                            idle_timeout: hcm.idle_timeout,
                        };
                        Terminal::Http(Arc::new(shared), server)
                    }
                    NetworkFilter::Rpc(r) => Terminal::Rpc(Arc::new(
                        RpcShared::new(r, &cm, &store, &options.rpc_codecs).map_err(|e| {
                            StartError::Config(format!("{}.{e}", terminal_path(li, ci, l)))
                        })?,
                    )),
                    NetworkFilter::TcpProxy(t) => {
                        Terminal::Tcp(Arc::new(TcpProxyShared::new(t, &cm, &store).map_err(
                            |e| StartError::Config(format!("{}.{e}", terminal_path(li, ci, l))),
                        )?))
                    }
                };
                terminals.push(terminal);
            }
            let (addr, mut sockets) = if l.bind_to_port {
                let first = bind_tcp(l.address).map_err(|source| StartError::Bind {
                    what: format!("listener {:?}", l.name),
                    addr: l.address,
                    source,
                })?;
                let addr = first.local_addr().map_err(|source| StartError::Bind {
                    what: format!("listener {:?}", l.name),
                    addr: l.address,
                    source,
                })?;
                if l.original_dst || l.use_original_dst {
                    crate::original_dst::register_capture_listener(addr);
                }
                (addr, vec![first])
            } else {
                // `bind_to_port: false`: only receives hand-offs.
                (l.address, Vec::new())
            };
            for _ in 1..socket_groups {
                if !l.bind_to_port {
                    break;
                }
                sockets.push(bind_tcp(addr).map_err(|source| StartError::Bind {
                    what: format!("listener {:?} (worker socket)", l.name),
                    addr,
                    source,
                })?);
            }
            let label = vec![(
                "envoy_listener_address",
                format!("{}_{}", addr.ip(), addr.port()),
            )];
            let mut chains = Vec::new();
            for (ci, (chain, terminal)) in l.filter_chains.iter().zip(terminals).enumerate() {
                let tls = match &chain.tls {
                    None => None,
                    Some(ctx) => {
                        let t = mesh_tls::ServerTls::new(
                            ctx,
                            Some(secrets.clone()),
                            mesh_tls::TlsStats::new(&store, "listener", &label),
                        )
                        .map_err(|e| {
                            StartError::Config(format!(
                                "{path}.filter_chains[{ci}].transport_socket.typed_config.{e}"
                            ))
                        })?;
                        let t = Arc::new(t);
                        tls_registry.add_server(t.clone());
                        Some(t)
                    }
                };
                let rbac = match &chain.rbac {
                    None => None,
                    Some(r) => Some(crate::rbac::network_rbac(r, &store).map_err(|e| {
                        StartError::Config(format!(
                            "{path}.filter_chains[{ci}].filters[0].typed_config.{e}"
                        ))
                    })?),
                };
                chains.push(Chain {
                    terminal,
                    tls,
                    handshake_timeout: chain.handshake_timeout,
                    rbac,
                    rate_limit: chain.local_ratelimit.as_ref().map(|c| {
                        mesh_filter::local_ratelimit::ConnectionRateLimiter::new(c, &store)
                    }),
                });
            }
            let (selector, default_chain) = crate::downstream::chain_selector(l);
            let chains = Chains::new(
                chains,
                selector,
                l.tls_inspector,
                l.listener_filters_timeout,
                l.continue_on_listener_filters_timeout,
                &store,
                addr,
            )
            .with_protocol_inspector(l.http_inspector, l.protocol_inspector, &store)
            .with_default_chain(default_chain)
            .with_capture(crate::original_dst::Capture {
                restore: l.original_dst,
                hand_off: l.use_original_dst.then(|| handoff.clone()),
            })
            .with_access_log(&l.access_log, &store)
            .map_err(|e| StartError::Config(format!("{path}.access_log{e}")))?;
            built.push(BuiltListener {
                name: l.name.clone(),
                addr,
                sockets,
                limiter: l
                    .connection_limit
                    .as_ref()
                    .map(|c| ConnectionLimiter::new(c.max_connections as usize, c.delay)),
                stats: ListenerStats::new(&store, addr),
                chains: Arc::new(chains),
            });
        }
        let listeners: Vec<(String, SocketAddr)> =
            built.iter().map(|b| (b.name.clone(), b.addr)).collect();

        // Admin.
        let mut admin_addr = None;
        let mut admin_state = None;
        if let Some(admin) = &bootstrap.admin {
            let sock = bind_tcp(admin.address).map_err(|source| StartError::Bind {
                what: "admin".into(),
                addr: admin.address,
                source,
            })?;
            let addr = sock.local_addr().map_err(|source| StartError::Bind {
                what: "admin".into(),
                addr: admin.address,
                source,
            })?;
            let listener =
                tokio::net::TcpListener::from_std(sock).map_err(|source| StartError::Bind {
                    what: "admin".into(),
                    addr,
                    source,
                })?;
            let state = Arc::new(AdminState {
                store: store.clone(),
                clusters: cm.clone(),
                listeners: listeners.clone(),
                config_json,
                ready: Default::default(),
                drain: drain.clone(),
                tls: tls_registry.clone(),
                xds: Default::default(),
            });
            tokio::spawn(admin::serve(listener, state.clone()));
            if let Some(p) = &options.admin_address_path {
                std::fs::write(p, addr.to_string()).map_err(|e| {
                    StartError::Config(format!("--admin-address-path {}: {e}", p.display()))
                })?;
            }
            admin_addr = Some(addr);
            admin_state = Some(state);
        }

        // Workers. Every listener has one view per worker, bound or not,
        // as the target of `use_original_dst` hand-offs.
        let mut per_worker: Vec<Vec<(std::net::TcpListener, &BuiltListener, Arc<WorkerChains>)>> =
            (0..socket_groups).map(|_| Vec::new()).collect();
        for b in &built {
            let views: Vec<Arc<WorkerChains>> = (0..socket_groups)
                .map(|w| {
                    Arc::new(WorkerChains::for_worker(
                        b.chains.clone(),
                        &cm,
                        drain.token(),
                        w,
                    ))
                })
                .collect();
            handoff.publish(&b.name, b.addr, views.clone());
            for (w, s) in b.sockets.iter().enumerate() {
                let s = s.try_clone().map_err(StartError::Worker)?;
                per_worker[w].push((s, b, views[w].clone()));
            }
        }
        let mut worker_handles = Vec::new();
        for (w, sockets) in per_worker.into_iter().enumerate() {
            let jobs: Vec<WorkerListener> = sockets
                .into_iter()
                .map(|(s, b, view)| WorkerListener {
                    socket: s,
                    limiter: b.limiter.clone(),
                    stats: b.stats.clone(),
                    chains: view,
                })
                .collect();
            let drain = drain.clone();
            let rt = match options.runtime {
                RuntimeMode::PerCore => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build(),
                RuntimeMode::Shared => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(concurrency)
                    .thread_name("mesh-worker")
                    .enable_all()
                    .build(),
            }
            .map_err(StartError::Worker)?;
            worker_handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("mesh-worker-{w}"))
                .spawn(move || rt.block_on(run_worker(jobs, drain)))
                .map_err(StartError::Worker)?;
        }
        drop(built);
        // SDS over xDS for static listeners and clusters needs the xDS
        // manager even without `dynamic_resources`.
        let static_secrets = crate::tls::static_xds_secrets(&bootstrap);
        let dynamic = match bootstrap.dynamic_resources.clone() {
            None if !static_secrets.is_empty() => Some(Default::default()),
            d => d,
        };
        let xds = match dynamic {
            None => None,
            Some(config) => Some(
                crate::dynamic::start(crate::dynamic::Context {
                    config,
                    node: bootstrap.node.clone(),
                    store: store.clone(),
                    static_clusters: cm.clone(),
                    workers: worker_handles,
                    drain: drain.clone(),
                    stop: stop.clone(),
                    max_message_size: options.xds_max_message_size,
                    lazy_eds: options.lazy_eds,
                    rpc_codecs: options.rpc_codecs.clone(),
                    secrets: secrets.clone(),
                    tls: tls_registry.clone(),
                    static_secrets,
                    handoff: handoff.clone(),
                })
                .map_err(StartError::Config)?,
            ),
        };
        if let Some(state) = &admin_state {
            match &xds {
                None => state.ready.store(true, Ordering::Release),
                Some(x) => {
                    // Envoy's init manager: LIVE once the first xDS
                    // configuration is applied (or timed out).
                    let _ = state.xds.set(x.clone());
                    let (state, x) = (state.clone(), x.clone());
                    tokio::spawn(async move {
                        x.wait_initialized().await;
                        state.ready.store(true, Ordering::Release);
                    });
                }
            }
        }
        tracing::info!(listeners = ?listeners, admin = ?admin_addr, workers = concurrency, "mesh is ready");
        Ok(Proxy {
            admin_addr,
            xds,
            listeners,
            drain,
            store,
            stop,
            drain_time: options.drain_time,
        })
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// A listener's bound address by name (static, or from LDS).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .or_else(|| self.xds.as_ref()?.listeners().get(name).copied())
    }

    /// The dynamic configuration, when the bootstrap has
    /// `dynamic_resources`.
    pub fn xds(&self) -> Option<&Arc<crate::dynamic::XdsRuntime>> {
        self.xds.as_ref()
    }

    /// Every stat.
    pub fn stats(&self) -> &Store {
        &self.store
    }

    /// The drain handle (signalled by `/quitquitquit` too).
    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Stops accepting, lets in-flight requests finish for up to the drain
    /// time, then stops background work. Returns true when every connection
    /// ended in time.
    pub async fn shutdown(self) -> bool {
        self.drain.signal();
        let clean = tokio::time::timeout(self.drain_time, self.drain.wait())
            .await
            .is_ok();
        self.stop.cancel();
        if !clean {
            tracing::warn!(
                open = self.drain.active(),
                "drain time over; closing the remaining connections"
            );
        }
        clean
    }
}

struct WorkerListener {
    socket: std::net::TcpListener,
    limiter: Option<ConnectionLimiter>,
    stats: ListenerStats,
    chains: Arc<WorkerChains>,
}

async fn run_worker(jobs: Vec<WorkerListener>, drain: Drain) {
    for job in jobs {
        let listener = match tokio::net::TcpListener::from_std(job.socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "worker could not register a listener");
                continue;
            }
        };
        let chains = job.chains;
        tokio::spawn(accept_loop(
            listener,
            job.limiter,
            drain.clone(),
            job.stats,
            move |a: Accepted| chains.clone().serve(a),
        ));
    }
    drain.wait().await;
}
