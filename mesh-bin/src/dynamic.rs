//! Configuration from a control plane: `dynamic_resources` served at
//! runtime.
//!
//! One task (the *manager*, on the main runtime) owns the dynamic state and
//! applies each xDS update received by the `mesh-xds` clients. A resource is
//! turned into proto3 JSON and loaded by the bootstrap loader's own
//! functions, so xDS accepts and refuses exactly what a file does; a refused
//! update is NACKed with the loader's field path and changes nothing.
//!
//! Read-copy-update everywhere: a change builds new objects and publishes
//! them with an atomic pointer swap, never mutating what a request in
//! flight holds.
//!
//! - **Clusters** (CDS): the cluster map is copied, changed and stored. A
//!   cluster whose configuration changed keeps its balancer (endpoints and
//!   their state) and stats; a removed one leaves the map, and requests
//!   that already hold it finish with it.
//! - **Endpoints** (EDS): `Balancer::update` on the cluster's balancer,
//!   which keeps each surviving endpoint's state. Never rebuilds a cluster.
//! - **Routes** (RDS): the HCMs naming the route configuration get a new
//!   `HcmShared` (compiled route table) and, per worker, a new `HttpProxy`
//!   stored into the listener's per-worker `ArcSwap`; every request reads
//!   that slot when it starts (`ConnService::swapping`), so a keep-alive
//!   connection follows route changes and a request in flight keeps the
//!   table it started with.
//! - **Secrets** (SDS): each secret is checked and published in the
//!   proxy's one `SecretStore`; TLS contexts rebuild on their next
//!   handshake, so new connections use it and established ones keep
//!   theirs.
//! - **Listeners** (LDS): a new listener binds one `SO_REUSEPORT` socket per
//!   worker and runs the same accept loop and filter chain selection (TLS
//!   inspector, TLS, network RBAC) as a static one
//!   ([`crate::downstream::WorkerChains`]), each chain's terminal in a
//!   swappable slot. A changed
//!   listener on the same address and connection settings only swaps its
//!   terminal filter; otherwise a new listener starts first and the old one
//!   drains (stops accepting; HTTP/1.1 connections close after their
//!   response, HTTP/2 ones get GOAWAY). A removed listener drains.
//!
//! Ordering and warming follow Envoy: clusters are subscribed before their
//! endpoints and listeners before their routes; a new EDS cluster is
//! *warming* until its endpoints arrive or its `initial_fetch_timeout`
//! passes, and a listener update waits for warming clusters first. A
//! listener whose route configuration has not arrived warms the same way
//! before it binds, and so do listeners and clusters whose SDS secrets
//! have not arrived.
//!
//! With `--lazy-eds` ([`crate::lazy_eds`]), EDS clusters from CDS skip that
//! warming: they are built without subscribing to their endpoints, and the
//! first request that uses one asks the manager to subscribe.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_codec::http::server::ServerConfig;
use mesh_core::config::tls::CommonTlsContext;
use mesh_core::config::{
    ApiConfigSource, Cluster, ConfigSource, ConfigSourceKind, DiscoveryType, DynamicResources,
    HttpConnectionManager, Listener, LocalityLbEndpoints, NetworkFilter, Node, RouteConfiguration,
};
use mesh_core::listener::{
    accept_loop, bind_tcp, Accepted, ConnectionLimiter, Drain, ListenerStats,
};
use mesh_core::stats::Store;
use mesh_filter::local_ratelimit::ConnectionRateLimiter;
use mesh_lb::{dns, Balancer};
use mesh_tls::{ClientTls, SecretStore, ServerTls, TlsStats};
use mesh_xds::client::{self, ClientConfig, Delivery, XdsHandle};
use mesh_xds::types::{self, Protocol, Service};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bootstrap;
use crate::cluster::{ClusterEntry, ClusterManager, ClusterStats, WorkerCluster};
use crate::downstream::{Chain, Chains, Swapping, Terminal, WorkerChains};
use crate::http::{HcmShared, HttpProxy};
use crate::lazy_eds::{self, OnDemandEndpoints};
use crate::rpc::{RpcShared, RpcWorker};
use crate::socket_match::{SocketMatches, UpstreamSockets};
use crate::tcp::TcpProxyShared;
use crate::tls::{xds_secrets, TlsRegistry};

/// What the manager needs from the proxy that starts it.
pub(crate) struct Context {
    pub(crate) config: DynamicResources,
    pub(crate) node: Node,
    pub(crate) store: Store,
    /// The static clusters (CDS never replaces or removes them).
    pub(crate) static_clusters: Arc<ClusterManager>,
    /// One runtime handle per socket group (worker).
    pub(crate) workers: Vec<tokio::runtime::Handle>,
    pub(crate) drain: Drain,
    pub(crate) stop: CancellationToken,
    pub(crate) max_message_size: usize,
    /// RPC codecs registered by a Rust program.
    pub(crate) rpc_codecs: crate::rpc::CodecRegistry,
    /// The proxy's one secret store: SDS secrets received over xDS are
    /// published here, where every TLS context finds them.
    pub(crate) secrets: Arc<SecretStore>,
    /// TLS contexts shown by `/certs`.
    pub(crate) tls: Arc<TlsRegistry>,
    /// SDS secrets over xDS named by static listeners and clusters.
    pub(crate) static_secrets: Vec<(String, ConfigSource)>,
    /// Every listener by address, for `use_original_dst` hand-offs.
    pub(crate) handoff: Arc<crate::original_dst::Handoff>,
    /// On-demand EDS for clusters from CDS (`--lazy-eds`).
    pub(crate) lazy_eds: bool,
}

/// One applied (or refused) resource, for `/config_dump`.
#[derive(Debug, Clone)]
struct DumpEntry {
    version: String,
    last_updated: SystemTime,
    /// Kept encoded (a fraction of the JSON's size) and converted when
    /// `/config_dump` asks.
    resource: mesh_xds::pb::google::protobuf::Any,
}

/// What admin shows about dynamic configuration.
#[derive(Default)]
struct Shown {
    listeners: BTreeMap<String, SocketAddr>,
    resources: BTreeMap<&'static str, BTreeMap<String, DumpEntry>>,
    clients: Vec<(String, XdsHandle)>,
    initialized: bool,
    /// `--lazy-eds`: how many EDS clusters came from CDS, and those a
    /// request subscribed, each with whether its endpoints are loaded.
    lazy_eds: Option<(usize, BTreeMap<String, bool>)>,
}

/// The running dynamic configuration, as admin and `Proxy` see it.
#[derive(Default)]
pub struct XdsRuntime {
    shown: Mutex<Shown>,
    ready: tokio::sync::Notify,
    clusters: ArcSwap<ClusterManager>,
}

impl std::fmt::Debug for XdsRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsRuntime").finish_non_exhaustive()
    }
}

impl XdsRuntime {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shown> {
        self.shown.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every cluster now: static and from CDS.
    pub fn clusters(&self) -> Arc<ClusterManager> {
        self.clusters.load_full()
    }

    /// Dynamic listeners and their bound addresses.
    pub fn listeners(&self) -> BTreeMap<String, SocketAddr> {
        self.lock().listeners.clone()
    }

    /// Whether the first configuration has been applied (or waited for
    /// its `initial_fetch_timeout`).
    pub fn initialized(&self) -> bool {
        self.lock().initialized
    }

    /// Waits until [`XdsRuntime::initialized`].
    pub async fn wait_initialized(&self) {
        loop {
            let n = self.ready.notified();
            if self.initialized() {
                return;
            }
            n.await;
        }
    }

    /// The dynamic part of `/config_dump`, in Envoy's shape: per type, the
    /// dynamic resources with `version_info` and `last_updated`, and the
    /// client's last NACK (`error_state`).
    pub fn config_dump(&self) -> Value {
        let shown = self.lock();
        let mut status: BTreeMap<String, client::TypeStatus> = BTreeMap::new();
        for (_, h) in &shown.clients {
            for (t, s) in h.status() {
                status.insert(t, s);
            }
        }
        let mut configs = Vec::new();
        for (t, dump_type, key) in [
            (
                types::CLUSTER,
                "ClustersConfigDump",
                "dynamic_active_clusters",
            ),
            (
                types::ENDPOINT,
                "EndpointsConfigDump",
                "dynamic_endpoint_configs",
            ),
            (types::LISTENER, "ListenersConfigDump", "dynamic_listeners"),
            (types::ROUTE, "RoutesConfigDump", "dynamic_route_configs"),
            (types::SECRET, "SecretsConfigDump", "dynamic_active_secrets"),
        ] {
            let st = status.get(t).cloned().unwrap_or_default();
            let items: Vec<Value> = shown
                .resources
                .get(t)
                .map(|m| {
                    m.iter()
                        .map(|(name, e)| {
                            json!({
                                "name": name,
                                "version_info": e.version,
                                "last_updated": mesh_core::time::rfc3339_millis(e.last_updated),
                                "resource": mesh_xds::convert::any_to_json(&e.resource).unwrap_or(Value::Null),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let error_state = st.last_nack.as_ref().map(|n| {
                json!({
                    "failed_configuration_version": n.version,
                    "details": n.detail,
                    "last_update_attempt": mesh_core::time::rfc3339_millis(n.at),
                })
            });
            configs.push(json!({
                "@type": format!("type.googleapis.com/envoy.admin.v3.{dump_type}"),
                "version_info": st.version,
                "last_updated": st.last_updated.map(mesh_core::time::rfc3339_millis),
                key: items,
                "error_state": error_state,
                "acks": st.acks,
                "nacks": st.nacks,
            }));
        }
        let connected: Vec<Value> = shown
            .clients
            .iter()
            .map(|(label, h)| {
                json!({"source": label, "connected": h.connected(), "last_stream_error": h.last_stream_error()})
            })
            .collect();
        let mut dump = json!({"configs": configs, "xds_streams": connected});
        if let Some((known, used)) = &shown.lazy_eds {
            let subscribed: Vec<Value> = used
                .iter()
                .map(|(name, loaded)| json!({"cluster": name, "endpoints_loaded": loaded}))
                .collect();
            dump["lazy_eds"] = json!({
                "known_clusters": known,
                "subscribed_clusters": subscribed,
            });
        }
        dump
    }
}

/// Checks a bootstrap's `dynamic_resources` against its static clusters
/// (the management server's cluster must exist and have an endpoint).
pub(crate) fn check(config: &DynamicResources, clusters: &[Cluster]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    if let Some(a) = &config.ads_config {
        sources.push(("dynamic_resources.ads_config", a));
    }
    for (path, c) in [
        (
            "dynamic_resources.cds_config.api_config_source",
            &config.cds_config,
        ),
        (
            "dynamic_resources.lds_config.api_config_source",
            &config.lds_config,
        ),
    ] {
        if let Some(ConfigSourceKind::Api(a)) = c.as_ref().map(|c| &c.kind) {
            sources.push((path, a));
        }
    }
    for (path, s) in sources {
        match clusters.iter().find(|c| c.name == s.cluster_name) {
            Some(c) if matches!(c.discovery, DiscoveryType::Eds { .. }) => errors.push(format!(
                "{path}.grpc_services[0].envoy_grpc.cluster_name: the management server's cluster {:?} must be STATIC or DNS",
                s.cluster_name
            )),
            _ => {}
        }
    }
    errors
}

/// Starts the xDS clients and the manager. Returns at once; the first
/// configuration arrives asynchronously ([`XdsRuntime::wait_initialized`]).
pub(crate) fn start(cx: Context) -> Result<Arc<XdsRuntime>, String> {
    let runtime = Arc::new(XdsRuntime::default());
    runtime.clusters.store(cx.static_clusters.clone());
    let (tx, rx) = mpsc::channel(64);
    let (lazy_tx, lazy_rx) = mpsc::unbounded_channel();
    let workers = cx.workers.len();
    // The gauges exist only in lazy mode.
    let gauge = |name: &str| match cx.lazy_eds {
        true => cx.store.gauge(name, &[]),
        false => Default::default(),
    };
    let lazy = LazyEds {
        requests: lazy_tx,
        used: BTreeSet::new(),
        deadlines: HashMap::new(),
        wanted: BTreeSet::new(),
        known_count: 0,
        known: gauge("mesh_lazy_eds_clusters_known"),
        subscribed: gauge("mesh_lazy_eds_clusters_subscribed"),
    };
    if cx.lazy_eds {
        runtime.lock().lazy_eds = Some((0, BTreeMap::new()));
    }
    let mut m = Manager {
        lazy,
        cm: (*cx.static_clusters).clone(),
        cx,
        runtime: runtime.clone(),
        deliveries: tx,
        clients: HashMap::new(),
        dynamic_clusters: BTreeSet::new(),
        dns_stops: HashMap::new(),
        warming: HashMap::new(),
        assignments: HashMap::new(),
        routes: HashMap::new(),
        listeners: BTreeMap::new(),
        warming_listeners: BTreeMap::new(),
        pending_lds: None,
        worker_clusters: (0..workers).map(|_| HashMap::new()).collect(),
        first: HashMap::new(),
        subscribed: HashMap::new(),
        secret_bodies: HashMap::new(),
    };
    let started = Instant::now();
    if let Some(c) = m.cx.config.cds_config.clone() {
        let deadline = c.initial_fetch_timeout.map(|t| started + t);
        m.first.insert(types::CLUSTER, deadline);
        m.subscribe(types::CLUSTER, &c.kind, BTreeSet::new())?;
    }
    if let Some(c) = m.cx.config.lds_config.clone() {
        let deadline = c.initial_fetch_timeout.map(|t| started + t);
        m.first.insert(types::LISTENER, deadline);
        m.subscribe(types::LISTENER, &c.kind, BTreeSet::new())?;
    }
    // Static EDS clusters get their endpoints over xDS too.
    let statics: Vec<Cluster> = m.cm.iter().map(|e| e.config.clone()).collect();
    for c in &statics {
        if let DiscoveryType::Eds { source, .. } = &c.discovery {
            m.warm(&c.name, source.initial_fetch_timeout);
        }
    }
    m.subscribe_endpoints()?;
    // Static listeners and clusters naming SDS secrets: the proxy is ready
    // once they arrived (or their initial fetch timeout passed).
    if !m.cx.static_secrets.is_empty() {
        let t = longest(
            m.cx.static_secrets
                .iter()
                .map(|(_, s)| s.initial_fetch_timeout),
        );
        m.first.insert(types::SECRET, t.map(|t| started + t));
    }
    m.subscribe_secrets()?;
    m.check_initialized();
    tokio::spawn(m.run(rx, lazy_rx));
    Ok(runtime)
}

impl Manager {
    /// Whether `c` gets its endpoints on demand: an EDS cluster from CDS
    /// under `--lazy-eds` (static EDS clusters subscribe at start).
    fn is_lazy(&self, c: &Cluster) -> bool {
        self.cx.lazy_eds
            && matches!(c.discovery, DiscoveryType::Eds { .. })
            && self.cx.static_clusters.get(&c.name).is_none()
    }

    /// The on-demand state of a lazy cluster being built: an `old` entry
    /// with the same discovery gives its own; a cluster in use whose
    /// discovery changed subscribes again at once.
    fn on_demand_for(
        &mut self,
        c: &Cluster,
        old: Option<&ClusterEntry>,
    ) -> Option<Arc<OnDemandEndpoints>> {
        if !self.is_lazy(c) {
            return None;
        }
        let DiscoveryType::Eds {
            service_name,
            source,
        } = &c.discovery
        else {
            return None;
        };
        if let Some(o) = old.filter(|o| o.config.discovery == c.discovery) {
            if let Some(od) = &o.on_demand {
                return Some(od.clone());
            }
        }
        let od = OnDemandEndpoints::new(
            &c.name,
            source.initial_fetch_timeout,
            self.lazy.requests.clone(),
        );
        if self.lazy.used.contains(&c.name) {
            od.mark_requested();
            if self.assignments.contains_key(service_name) {
                od.mark_ready();
            } else {
                self.lazy.deadlines.insert(
                    c.name.clone(),
                    Instant::now()
                        + source
                            .initial_fetch_timeout
                            .unwrap_or(lazy_eds::DEFAULT_WAIT),
                );
            }
        }
        Some(od)
    }

    /// A request used a lazy cluster for the first time: subscribe to its
    /// endpoints (they may be known already, from a cluster with the same
    /// service name). A cluster removed or rebuilt with another discovery
    /// since the request picked it releases the request at once.
    fn use_lazy_cluster(&mut self, requested: &Arc<OnDemandEndpoints>) {
        let name = requested.cluster();
        let current = self.cm.get(name).cloned();
        let Some(e) = current.filter(|e| {
            e.on_demand
                .as_ref()
                .is_some_and(|od| Arc::ptr_eq(od, requested))
        }) else {
            requested.mark_ready();
            return;
        };
        let od = requested.clone();
        let DiscoveryType::Eds {
            service_name,
            source,
        } = &e.config.discovery
        else {
            return;
        };
        if !self.lazy.used.insert(name.to_string()) {
            return;
        }
        tracing::info!(cluster = %name, service = %service_name, "lazy EDS: subscribing to the endpoints of a cluster in use");
        if self.assignments.contains_key(service_name) {
            od.mark_ready();
        } else {
            self.lazy.deadlines.insert(
                name.to_string(),
                Instant::now()
                    + source
                        .initial_fetch_timeout
                        .unwrap_or(lazy_eds::DEFAULT_WAIT),
            );
        }
        if let Err(err) = self.subscribe_endpoints() {
            tracing::warn!(cluster = %name, error = %err, "lazy EDS: cannot subscribe");
            self.lazy.deadlines.remove(name);
            od.mark_ready();
        }
    }

    /// Publishes the lazy EDS gauges and the `/config_dump` view.
    fn show_lazy(&self) {
        let used: BTreeMap<String, bool> = self
            .lazy
            .used
            .iter()
            .map(|n| {
                let loaded = match self.cm.get(n).map(|e| &e.config.discovery) {
                    Some(DiscoveryType::Eds { service_name, .. }) => {
                        self.assignments.contains_key(service_name)
                    }
                    _ => false,
                };
                (n.clone(), loaded)
            })
            .collect();
        self.lazy.known.set(self.lazy.known_count as i64);
        self.lazy.subscribed.set(used.len() as i64);
        self.runtime.lock().lazy_eds = Some((self.lazy.known_count, used));
    }
}

/// A listener being served.
struct ActiveListener {
    config: Listener,
    addr: SocketAddr,
    drain: Drain,
    /// One per filter chain.
    chains: Vec<Swapping>,
}

/// The manager's on-demand EDS state (`--lazy-eds`).
struct LazyEds {
    /// Given to each lazy cluster: its first request sends its name here.
    requests: mpsc::UnboundedSender<Arc<OnDemandEndpoints>>,
    /// Lazy clusters a request used: their endpoints are subscribed.
    used: BTreeSet<String>,
    /// Used clusters waiting for their endpoints, until the deadline.
    deadlines: HashMap<String, Instant>,
    /// The EDS service names subscribed: assignments of other names (a
    /// response crossing an unsubscription) are not kept.
    wanted: BTreeSet<String>,
    /// How many EDS clusters from CDS there are.
    known_count: usize,
    /// `mesh_lazy_eds_clusters_known`: EDS clusters from CDS.
    known: mesh_core::stats::Gauge,
    /// `mesh_lazy_eds_clusters_subscribed`: those whose endpoints are
    /// subscribed.
    subscribed: mesh_core::stats::Gauge,
}

struct Manager {
    lazy: LazyEds,
    cx: Context,
    runtime: Arc<XdsRuntime>,
    deliveries: mpsc::Sender<Delivery>,
    /// xDS clients by source key (`ads`, or `cluster/type`).
    clients: HashMap<String, XdsHandle>,
    cm: ClusterManager,
    dynamic_clusters: BTreeSet<String>,
    dns_stops: HashMap<String, CancellationToken>,
    /// Clusters waiting for their endpoints, with their deadline.
    warming: HashMap<String, Option<Instant>>,
    /// Last endpoints per EDS service name.
    assignments: HashMap<String, Vec<LocalityLbEndpoints>>,
    routes: HashMap<String, RouteConfiguration>,
    listeners: BTreeMap<String, ActiveListener>,
    /// Listeners waiting for their route configuration, with a deadline.
    warming_listeners: BTreeMap<String, (Listener, Option<Instant>)>,
    /// An LDS update waiting for warming clusters.
    pending_lds: Option<Delivery>,
    worker_clusters: Vec<HashMap<Arc<str>, Arc<WorkerCluster>>>,
    /// Types whose first update is awaited, with the deadline.
    first: HashMap<&'static str, Option<Instant>>,
    /// Names subscribed per (source key, type).
    subscribed: HashMap<(String, &'static str), BTreeSet<String>>,
    /// The last applied body of each SDS secret (an unchanged secret is
    /// not reloaded).
    secret_bodies: HashMap<String, mesh_xds::pb::google::protobuf::Any>,
}

fn short_errors(errors: &bootstrap::ConfigErrors) -> String {
    errors
        .0
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl Manager {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Delivery>,
        mut lazy_rx: mpsc::UnboundedReceiver<Arc<OnDemandEndpoints>>,
    ) {
        loop {
            let next = self.next_deadline();
            tokio::select! {
                d = rx.recv() => match d {
                    Some(d) => self.handle(d),
                    None => return,
                },
                Some(od) = lazy_rx.recv() => self.use_lazy_cluster(&od),
                _ = async {
                    match next {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => self.timers(),
                _ = self.cx.stop.cancelled() => return,
            }
            self.after_change();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.warming
            .values()
            .chain(self.warming_listeners.values().map(|(_, d)| d))
            .chain(self.first.values())
            .flatten()
            .chain(self.lazy.deadlines.values())
            .min()
            .copied()
    }

    fn timers(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .warming
            .iter()
            .filter(|(_, d)| d.is_some_and(|d| d <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for n in expired {
            tracing::warn!(cluster = %n, "initial fetch timeout: the cluster's endpoints or secrets did not arrive; it goes live without them");
            self.warming.remove(&n);
        }
        let expired: Vec<String> = self
            .lazy
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for n in expired {
            tracing::warn!(cluster = %n, "lazy EDS: the endpoints did not arrive within the initial fetch timeout; requests get 503 until they do");
            self.lazy.deadlines.remove(&n);
            if let Some(od) = self.cm.get(&n).and_then(|e| e.on_demand.clone()) {
                od.mark_ready();
            }
        }

        let expired: Vec<String> = self
            .warming_listeners
            .iter()
            .filter(|(_, (_, d))| d.is_some_and(|d| d <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for n in expired {
            if let Some((l, _)) = self.warming_listeners.remove(&n) {
                tracing::warn!(listener = %n, "initial fetch timeout: the route configuration or a secret did not arrive; the listener goes live without it");
                if let Err(e) = self.activate(l) {
                    tracing::warn!(listener = %n, error = %e, "listener failed to start");
                }
            }
        }
        self.first.retain(|t, d| {
            let expired = d.is_some_and(|d| d <= now);
            if expired {
                tracing::warn!(
                    r#type = types::short(t),
                    "initial fetch timeout: no configuration yet"
                );
            }
            !expired
        });
    }

    /// Work that may follow any event: an LDS update that was waiting for
    /// warming clusters, readiness.
    fn after_change(&mut self) {
        if self.warming.is_empty() {
            if let Some(d) = self.pending_lds.take() {
                let r = self.apply_listeners(&d.update);
                d.reply(r);
            }
        }
        self.check_initialized();
    }

    fn check_initialized(&mut self) {
        let done = self.first.is_empty()
            && self.warming.is_empty()
            && self.warming_listeners.is_empty()
            && self.pending_lds.is_none();
        if done && !self.runtime.initialized() {
            self.runtime.lock().initialized = true;
            self.runtime.ready.notify_waiters();
            tracing::info!("xDS: initial configuration applied");
        }
        if self.cx.lazy_eds {
            self.show_lazy();
        }
    }

    fn handle(&mut self, d: Delivery) {
        let t = d.update.type_url.clone();
        let r = match t.as_str() {
            types::CLUSTER => self.apply_clusters(&d.update),
            types::ENDPOINT => self.apply_endpoints(&d.update),
            types::ROUTE => self.apply_routes(&d.update),
            types::SECRET => self.apply_secrets(&d.update),
            types::LISTENER => {
                if !self.warming.is_empty() {
                    // Clusters first: listeners go live once they are warm.
                    self.first.remove(types::LISTENER);
                    self.pending_lds = Some(d);
                    return;
                }
                self.apply_listeners(&d.update)
            }
            other => Err(format!("resource type {other} is not supported")),
        };
        if r.is_ok() {
            for (k, v) in [
                (types::CLUSTER, types::CLUSTER),
                (types::LISTENER, types::LISTENER),
            ] {
                if t == k {
                    self.first.remove(v);
                }
            }
        }
        d.reply(r);
    }

    // ---- sources and subscriptions ----

    fn source_key(kind: &ConfigSourceKind, type_url: &str) -> String {
        match kind {
            ConfigSourceKind::Ads => "ads".into(),
            ConfigSourceKind::Api(a) => format!(
                "{}/{}/{}",
                a.cluster_name,
                if a.delta { "delta" } else { "sotw" },
                types::short(type_url)
            ),
        }
    }

    fn client(
        &mut self,
        kind: &ConfigSourceKind,
        type_url: &'static str,
    ) -> Result<XdsHandle, String> {
        let key = Self::source_key(kind, type_url);
        if let Some(h) = self.clients.get(&key) {
            return Ok(h.clone());
        }
        let (api, service): (ApiConfigSource, Service) = match kind {
            ConfigSourceKind::Ads => (
                self.cx.config.ads_config.clone().ok_or(
                    "dynamic_resources.ads_config: required by an `ads: {}` config source",
                )?,
                Service::Aggregated,
            ),
            ConfigSourceKind::Api(a) => (a.clone(), Service::PerType(type_url)),
        };
        let entry = self
            .cm
            .get(&api.cluster_name)
            .ok_or_else(|| format!("xDS cluster {:?} is not a static cluster", api.cluster_name))?;
        let uri = match &entry.config.pipe {
            Some(path) => format!("unix:{path}"),
            None => entry
                .balancer
                .endpoints()
                .endpoints
                .first()
                .map(|e| format!("http://{}", e.addr))
                .ok_or_else(|| format!("xDS cluster {:?} has no endpoint", api.cluster_name))?,
        };
        let mut node = client::node(&self.cx.node.id, &self.cx.node.cluster);
        if !self.cx.node.metadata_json.is_empty() {
            node.metadata = serde_json::from_str(&self.cx.node.metadata_json)
                .ok()
                .and_then(|v| client::json_to_struct(&v));
        }
        let l = &self.cx.node.locality;
        if !(l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty()) {
            node.locality = Some(mesh_xds::pb::envoy::config::core::v3::Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            });
        }
        let mut config = ClientConfig::new(uri.clone(), node);
        config.service = service;
        config.protocol = if api.delta {
            Protocol::Delta
        } else {
            Protocol::StateOfTheWorld
        };
        config.max_message_size = self.cx.max_message_size;
        config.connect_timeout = entry.config.connect_timeout;
        let (handle, mut rx) = client::start(config);
        let tx = self.deliveries.clone();
        let stop = self.cx.stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    d = rx.recv() => match d {
                        Some(d) => if tx.send(d).await.is_err() { return },
                        None => return,
                    },
                    _ = stop.cancelled() => return,
                }
            }
        });
        tracing::info!(source = %key, server = %uri, "xDS stream started");
        self.clients.insert(key.clone(), handle.clone());
        self.runtime.lock().clients.push((key, handle.clone()));
        Ok(handle)
    }

    fn subscribe(
        &mut self,
        type_url: &'static str,
        kind: &ConfigSourceKind,
        names: BTreeSet<String>,
    ) -> Result<(), String> {
        let key = Self::source_key(kind, type_url);
        let k = (key, type_url);
        if self.subscribed.get(&k) == Some(&names) && !types::is_wildcard(type_url) {
            return Ok(());
        }
        let h = self.client(kind, type_url)?;
        h.subscribe(type_url, names.clone());
        self.subscribed.insert(k, names);
        Ok(())
    }

    /// Subscribes to the endpoints of every EDS cluster, per source.
    fn subscribe_endpoints(&mut self) -> Result<(), String> {
        let mut by_source: BTreeMap<String, (ConfigSourceKind, BTreeSet<String>)> = BTreeMap::new();
        // Lazy EDS: the static clusters and the dynamic ones a request used.
        let lazy_set: Vec<Arc<ClusterEntry>>;
        let clusters: Box<dyn Iterator<Item = &Arc<ClusterEntry>>> = if self.cx.lazy_eds {
            lazy_set = self
                .cx
                .static_clusters
                .iter()
                .chain(self.lazy.used.iter().filter_map(|n| self.cm.get(n)))
                .cloned()
                .collect();
            Box::new(lazy_set.iter())
        } else {
            Box::new(self.cm.iter())
        };
        for e in clusters {
            if let DiscoveryType::Eds {
                service_name,
                source,
            } = &e.config.discovery
            {
                by_source
                    .entry(Self::source_key(&source.kind, types::ENDPOINT))
                    .or_insert_with(|| (source.kind.clone(), BTreeSet::new()))
                    .1
                    .insert(service_name.clone());
            }
        }
        if self.cx.lazy_eds {
            // Endpoints of clusters no longer used (removed) are dropped.
            let wanted: BTreeSet<String> =
                by_source.values().flat_map(|(_, n)| n).cloned().collect();
            let stale: Vec<String> = self
                .assignments
                .keys()
                .filter(|n| !wanted.contains(*n))
                .cloned()
                .collect();
            self.lazy.wanted = wanted;
            for n in stale {
                self.assignments.remove(&n);
                self.forget(types::ENDPOINT, &n);
            }
        }
        self.subscribe_by_source(types::ENDPOINT, by_source)
    }

    /// Subscribes to `names` per source of a named (not wildcard) type;
    /// sources that no longer have names get an empty set.
    fn subscribe_by_source(
        &mut self,
        type_url: &'static str,
        by_source: BTreeMap<String, (ConfigSourceKind, BTreeSet<String>)>,
    ) -> Result<(), String> {
        let known: Vec<String> = self
            .subscribed
            .keys()
            .filter(|(_, t)| *t == type_url)
            .map(|(k, _)| k.clone())
            .collect();
        for k in known {
            if !by_source.contains_key(&k) {
                if let Some(h) = self.clients.get(&k) {
                    h.subscribe(type_url, BTreeSet::new());
                }
                self.subscribed.remove(&(k, type_url));
            }
        }
        for (_, (kind, names)) in by_source {
            self.subscribe(type_url, &kind, names)?;
        }
        Ok(())
    }

    /// Subscribes to the SDS secrets that static and dynamic listeners and
    /// clusters name, per source.
    fn subscribe_secrets(&mut self) -> Result<(), String> {
        let mut wanted = self.cx.static_secrets.clone();
        let listeners = self
            .listeners
            .values()
            .map(|l| &l.config)
            .chain(self.warming_listeners.values().map(|(l, _)| l));
        for l in listeners {
            wanted.extend(listener_tls(l).flat_map(xds_secrets));
        }
        for n in &self.dynamic_clusters {
            for t in self
                .cm
                .get(n)
                .into_iter()
                .flat_map(|e| e.config.tls_contexts())
            {
                wanted.extend(xds_secrets(&t.common));
            }
        }
        let mut by_source: BTreeMap<String, (ConfigSourceKind, BTreeSet<String>)> = BTreeMap::new();
        for (name, source) in wanted {
            by_source
                .entry(Self::source_key(&source.kind, types::SECRET))
                .or_insert_with(|| (source.kind.clone(), BTreeSet::new()))
                .1
                .insert(name);
        }
        self.subscribe_by_source(types::SECRET, by_source)
    }

    /// Subscribes to the route configurations every listener names.
    fn subscribe_routes(&mut self) -> Result<(), String> {
        let mut by_source: BTreeMap<String, (ConfigSourceKind, BTreeSet<String>)> = BTreeMap::new();
        let hcms = self
            .listeners
            .values()
            .map(|l| &l.config)
            .chain(self.warming_listeners.values().map(|(l, _)| l))
            .flat_map(rds_of)
            .cloned()
            .collect::<Vec<_>>();
        for rds in hcms {
            by_source
                .entry(Self::source_key(&rds.config_source.kind, types::ROUTE))
                .or_insert_with(|| (rds.config_source.kind.clone(), BTreeSet::new()))
                .1
                .insert(rds.route_config_name.clone());
        }
        for (_, (kind, names)) in by_source {
            self.subscribe(types::ROUTE, &kind, names)?;
        }
        Ok(())
    }

    fn remember(
        &self,
        type_url: &'static str,
        name: &str,
        version: &str,
        resource: mesh_xds::pb::google::protobuf::Any,
    ) {
        self.runtime
            .lock()
            .resources
            .entry(type_url)
            .or_default()
            .insert(
                name.to_string(),
                DumpEntry {
                    version: version.to_string(),
                    last_updated: SystemTime::now(),
                    resource,
                },
            );
    }

    fn forget(&self, type_url: &'static str, name: &str) {
        if let Some(m) = self.runtime.lock().resources.get_mut(type_url) {
            m.remove(name);
        }
    }

    // ---- clusters ----

    fn warm(&mut self, name: &str, timeout: Option<Duration>) {
        self.warming
            .insert(name.to_string(), timeout.map(|t| Instant::now() + t));
    }

    fn apply_clusters(&mut self, u: &client::Update) -> Result<(), String> {
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for r in &u.resources {
            let json = match mesh_xds::convert::any_to_json(&r.body) {
                Ok(j) => j,
                Err(e) => {
                    errors.push(format!("cluster {:?}: {e}", r.name));
                    continue;
                }
            };
            match bootstrap::cluster_from_json(&json) {
                Ok(c) if self.cx.static_clusters.get(&c.name).is_some() => errors.push(format!(
                    "cluster {:?}: a static cluster cannot be replaced over CDS",
                    c.name
                )),
                Ok(c) => match self.client_tls(&c) {
                    Ok(tls) => loaded.push((c, tls, r.body.clone())),
                    Err(e) => errors.push(format!("cluster {:?}: {e}", c.name)),
                },
                Err(e) => errors.push(format!("cluster {:?}: {}", r.name, short_errors(&e))),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let mut removed: BTreeSet<String> = u.removed.iter().cloned().collect();
        if u.state_of_the_world {
            let present: BTreeSet<&str> = loaded.iter().map(|(c, _, _)| c.name.as_str()).collect();
            removed.extend(
                self.dynamic_clusters
                    .iter()
                    .filter(|n| !present.contains(n.as_str()))
                    .cloned(),
            );
        }
        let mut cm = self.cm.clone();
        let mut gone: Vec<&str> = Vec::new();
        for name in &removed {
            if self.dynamic_clusters.remove(name) {
                gone.push(name);
                self.warming.remove(name);
                self.lazy.used.remove(name);
                self.lazy.deadlines.remove(name);
                if let Some(s) = self.dns_stops.remove(name) {
                    s.cancel();
                }
                self.forget(types::CLUSTER, name);
                tracing::info!(cluster = %name, "cluster removed");
            }
        }
        cm.remove_many(gone);
        for (c, tls, json) in loaded {
            self.remember(types::CLUSTER, &c.name, &u.version, json);
            let old = cm.get(&c.name).cloned();
            if old.as_ref().is_some_and(|o| o.config == c) {
                continue;
            }
            let entry = self.build_cluster(&c, old.as_deref(), tls);
            self.dynamic_clusters.insert(c.name.clone());
            cm.insert(Arc::new(entry));
        }
        self.cm = cm;
        self.runtime.clusters.store(Arc::new(self.cm.clone()));
        if self.cx.lazy_eds {
            self.lazy.known_count = self
                .dynamic_clusters
                .iter()
                .filter(|n| self.cm.get(n).is_some_and(|e| e.on_demand.is_some()))
                .count();
        }
        self.subscribe_endpoints()?;
        self.subscribe_secrets()?;
        self.refresh_terminals();
        Ok(())
    }

    /// The upstream TLS contexts of a cluster from CDS: its
    /// `transport_socket` and its `transport_socket_matches` (refused with
    /// the field path when their certificates are not usable; SDS secrets
    /// may arrive later).
    fn client_tls(&self, c: &Cluster) -> Result<UpstreamSockets, String> {
        let matches = SocketMatches::build(c, Some(self.cx.secrets.clone()), &self.cx.store)?;
        let Some(t) = &c.tls else {
            return Ok((None, matches));
        };
        let stats = TlsStats::new(
            &self.cx.store,
            "cluster",
            &[("envoy_cluster_name", c.name.clone())],
        );
        let tls = Arc::new(
            ClientTls::new(t, Some(self.cx.secrets.clone()), stats)
                .map_err(|e| format!("transport_socket.typed_config.{e}"))?,
        );
        Ok((Some(tls), matches))
    }

    /// Whether a cluster has what it waits for: its endpoints (EDS) and
    /// its SDS secrets.
    fn cluster_warm(&self, c: &Cluster) -> bool {
        let endpoints = match &c.discovery {
            _ if self.is_lazy(c) => true,
            DiscoveryType::Eds { service_name, .. } => self.assignments.contains_key(service_name),
            _ => true,
        };
        endpoints
            && c.tls_contexts()
                .all(|t| secrets_ready(&self.cx.secrets, &t.common))
    }

    /// How long a cluster that is not warm waits (`None`: forever): the
    /// longest `initial_fetch_timeout` of what it is missing.
    fn cluster_warm_timeout(&self, c: &Cluster) -> Option<Duration> {
        let mut pending = Vec::new();
        if let DiscoveryType::Eds {
            service_name,
            source,
        } = &c.discovery
        {
            if !self.assignments.contains_key(service_name) && !self.is_lazy(c) {
                pending.push(source.initial_fetch_timeout);
            }
        }
        for t in c.tls_contexts() {
            pending.extend(missing_secrets(&self.cx.secrets, &t.common));
        }
        longest(pending)
    }

    /// Clusters that became warm leave the warming set.
    fn rewarm(&mut self) {
        let warm: Vec<String> = self
            .warming
            .keys()
            .filter(|n| {
                self.cm
                    .get(n.as_str())
                    .is_none_or(|e| self.cluster_warm(&e.config))
            })
            .cloned()
            .collect();
        for n in warm {
            self.warming.remove(&n);
        }
    }

    /// A cluster entry for `c`; an `old` entry of the same name gives its
    /// balancer (endpoints and their state) when the policy is unchanged.
    fn build_cluster(
        &mut self,
        c: &Cluster,
        old: Option<&ClusterEntry>,
        (tls, socket_matches): UpstreamSockets,
    ) -> ClusterEntry {
        let stats = ClusterStats::new(&self.cx.store, &c.name);
        let balancer = match old {
            Some(o)
                if o.config.lb_policy == c.lb_policy
                    && o.config.lb == c.lb
                    && o.config.discovery == c.discovery =>
            {
                o.balancer.clone()
            }
            // A new policy: a new balancer, filled below (EDS: from the
            // last assignment).
            _ => Arc::new(
                Balancer::with_config(c.lb_policy, c.lb.clone())
                    .with_local_zone(self.cx.node.locality.zone.clone()),
            ),
        };
        // One stop token per cluster for its background tasks (DNS refresh,
        // health checking, outlier detection); a rebuilt cluster stops the
        // old ones.
        if let Some(s) = self.dns_stops.remove(&c.name) {
            s.cancel();
        }
        let cluster_stop = self.cx.stop.child_token();
        self.dns_stops.insert(c.name.clone(), cluster_stop.clone());
        match &c.discovery {
            DiscoveryType::Static => match dns::static_endpoints(c) {
                Ok(eps) => {
                    balancer.update(eps);
                }
                Err(e) => tracing::warn!(cluster = %c.name, error = %e, "static endpoints refused"),
            },
            DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
                let stop = cluster_stop.clone();
                let membership = stats.membership_total.clone();
                tokio::spawn(dns::refresh_loop(
                    c.clone(),
                    balancer.clone(),
                    stop,
                    move |n| membership.set(n as i64),
                ));
                // Resolve now, as Envoy does, rather than at the first
                // refresh: a new cluster gets its endpoints, and a rebuilt
                // one's kept endpoints take its new `transport_socket_matches`.
                let (c, balancer) = (c.clone(), balancer.clone());
                let membership = stats.membership_total.clone();
                tokio::spawn(async move {
                    if let Ok(specs) = dns::resolve(&c).await {
                        balancer.update(specs);
                        membership.set(balancer.endpoints().endpoints.len() as i64);
                    }
                });
            }
            DiscoveryType::Eds { service_name, .. } => {
                if let Some(l) = self.assignments.get(service_name).cloned() {
                    set_endpoints(c, &balancer, &stats, l);
                }
            }
            DiscoveryType::OriginalDst(_) => {}
        }
        let original_dst = match &c.discovery {
            DiscoveryType::OriginalDst(od) => {
                Some(match old.and_then(|o| o.original_dst.clone()) {
                    // The same balancer keeps its hosts.
                    Some(h) if old.is_some_and(|o| Arc::ptr_eq(&o.balancer, &balancer)) => h,
                    _ => crate::original_dst::OriginalDstHosts::start(
                        od.clone(),
                        balancer.clone(),
                        &self.cx.stop,
                    ),
                })
            }
            _ => None,
        };
        if old.is_none() && !self.cluster_warm(c) {
            self.warm(&c.name, self.cluster_warm_timeout(c));
        }
        if let Some(t) = &tls {
            self.cx.tls.add_client(t.clone());
        }
        for t in socket_matches.iter().filter_map(|m| m.tls.as_ref()) {
            self.cx.tls.add_client(t.clone());
        }
        stats
            .membership_total
            .set(balancer.endpoints().endpoints.len() as i64);
        let (outlier, health_checker) = match crate::cluster::health_for(
            c,
            &balancer,
            &self.cx.store,
            &cluster_stop,
            (&tls, &socket_matches),
        ) {
            Ok((outlier, checker, _first_round)) => (outlier, checker),
            Err(e) => {
                tracing::warn!(cluster = %c.name, error = %e, "health checking not started");
                (None, None)
            }
        };
        ClusterEntry {
            config: c.clone(),
            balancer,
            policy: crate::resilience::ClusterPolicy::new(c, &self.cx.store, &stats.rq_active),
            stats,
            outlier,
            health_checker,
            tls,
            original_dst,
            socket_matches,
            on_demand: self.on_demand_for(c, old),
        }
    }

    fn apply_endpoints(&mut self, u: &client::Update) -> Result<(), String> {
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for r in &u.resources {
            // Plain assignments skip the JSON round trip.
            if let Some((name, l)) = bootstrap::eds_proto::endpoints_from_any(&r.body) {
                loaded.push((name, l, r.body.clone()));
                continue;
            }
            let json = match mesh_xds::convert::any_to_json(&r.body) {
                Ok(j) => j,
                Err(e) => {
                    errors.push(format!("endpoints {:?}: {e}", r.name));
                    continue;
                }
            };
            match bootstrap::endpoints_from_json(&json) {
                Ok((name, l)) => loaded.push((name, l, r.body.clone())),
                Err(e) => errors.push(format!("endpoints {:?}: {}", r.name, short_errors(&e))),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let mut changed: Vec<(String, Vec<LocalityLbEndpoints>)> = Vec::new();
        for (name, l, json) in loaded {
            if self.cx.lazy_eds && !self.lazy.wanted.contains(&name) {
                continue;
            }
            self.remember(types::ENDPOINT, &name, &u.version, json);
            self.assignments.insert(name.clone(), l.clone());
            changed.push((name, l));
        }
        for name in &u.removed {
            self.assignments.remove(name);
            self.forget(types::ENDPOINT, name);
            changed.push((name.clone(), Vec::new()));
        }
        let mut by_service: HashMap<&str, Vec<&Arc<ClusterEntry>>> = HashMap::new();
        for e in self.cm.iter() {
            if let DiscoveryType::Eds { service_name, .. } = &e.config.discovery {
                by_service.entry(service_name).or_default().push(e);
            }
        }
        for (service, localities) in changed {
            for e in by_service.get(service.as_str()).into_iter().flatten() {
                set_endpoints(&e.config, &e.balancer, &e.stats, localities.clone());
                if let Some(od) = &e.on_demand {
                    od.mark_ready();
                    self.lazy.deadlines.remove(&e.config.name);
                }
            }
        }
        self.rewarm();
        Ok(())
    }

    // ---- routes ----

    fn apply_routes(&mut self, u: &client::Update) -> Result<(), String> {
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for r in &u.resources {
            let json = match mesh_xds::convert::any_to_json(&r.body) {
                Ok(j) => j,
                Err(e) => {
                    errors.push(format!("route configuration {:?}: {e}", r.name));
                    continue;
                }
            };
            match bootstrap::route_config_from_json(&json) {
                Ok(rc) => match mesh_core::router::RouteTable::new(&rc) {
                    Ok(_) => loaded.push((rc, r.body.clone())),
                    Err(e) => errors.push(format!(
                        "route configuration {:?}: {}: {}",
                        r.name, e.path, e.message
                    )),
                },
                Err(e) => errors.push(format!(
                    "route configuration {:?}: {}",
                    r.name,
                    short_errors(&e)
                )),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        for (rc, json) in loaded {
            self.remember(types::ROUTE, &rc.name, &u.version, json);
            self.routes.insert(rc.name.clone(), rc);
        }
        for name in &u.removed {
            self.routes.remove(name);
            self.forget(types::ROUTE, name);
        }
        // Listeners that waited for these routes go live.
        self.activate_ready_listeners()?;
        self.refresh_terminals();
        Ok(())
    }

    /// Starts the warming listeners that now have their routes and secrets.
    fn activate_ready_listeners(&mut self) -> Result<(), String> {
        let ready: Vec<String> = self
            .warming_listeners
            .iter()
            .filter(|(_, (l, _))| self.listener_ready(l))
            .map(|(n, _)| n.clone())
            .collect();
        for n in ready {
            if let Some((l, _)) = self.warming_listeners.remove(&n) {
                self.activate(l)?;
            }
        }
        Ok(())
    }

    /// Whether a listener has its route configuration (RDS) and SDS
    /// secrets.
    fn listener_ready(&self, l: &Listener) -> bool {
        rds_of(l).all(|r| self.routes.contains_key(&r.route_config_name))
            && listener_tls(l).all(|c| secrets_ready(&self.cx.secrets, c))
    }

    /// How long a listener that is not ready warms (`None`: forever).
    fn listener_warm_timeout(&self, l: &Listener) -> Option<Duration> {
        let mut pending = Vec::new();
        for r in rds_of(l) {
            if !self.routes.contains_key(&r.route_config_name) {
                pending.push(r.config_source.initial_fetch_timeout);
            }
        }
        for c in listener_tls(l) {
            pending.extend(missing_secrets(&self.cx.secrets, c));
        }
        longest(pending)
    }

    // ---- secrets ----

    /// SDS: each secret is checked and published in the secret store, so
    /// new handshakes use it at once; a refused one leaves the previous
    /// version serving. Listeners and clusters waiting for secrets warm.
    /// A secret the server removes keeps serving (as in Envoy).
    fn apply_secrets(&mut self, u: &client::Update) -> Result<(), String> {
        let mut errors = Vec::new();
        for r in &u.resources {
            if self.secret_bodies.get(&r.name) == Some(&r.body) {
                continue;
            }
            let json = match mesh_xds::convert::any_to_json(&r.body) {
                Ok(j) => j,
                Err(e) => {
                    errors.push(format!("secret {:?}: {e}", r.name));
                    continue;
                }
            };
            let secret = match bootstrap::secret_from_json(&json) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(format!("secret {:?}: {}", r.name, short_errors(&e)));
                    continue;
                }
            };
            if let Err(e) = self.cx.secrets.update(&secret) {
                errors.push(format!("secret {:?}: {e}", secret.name));
                continue;
            }
            self.secret_bodies.insert(r.name.clone(), r.body.clone());
            self.remember(types::SECRET, &secret.name, &u.version, redacted(json));
        }
        for name in &u.removed {
            tracing::warn!(secret = %name, "the server removed an SDS secret; its last version keeps serving");
        }
        self.rewarm();
        self.activate_ready_listeners()?;
        let statics = &self.cx.static_secrets;
        if statics
            .iter()
            .all(|(n, _)| self.cx.secrets.get(n).is_some())
        {
            self.first.remove(types::SECRET);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    // ---- listeners ----

    fn apply_listeners(&mut self, u: &client::Update) -> Result<(), String> {
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for r in &u.resources {
            let json = match mesh_xds::convert::any_to_json(&r.body) {
                Ok(j) => j,
                Err(e) => {
                    errors.push(format!("listener {:?}: {e}", r.name));
                    continue;
                }
            };
            match bootstrap::listener_from_json(&json) {
                Ok(l) => {
                    let bad_routes = l.filter_chains.iter().enumerate().find_map(|(ci, c)| {
                        let NetworkFilter::HttpConnectionManager(h) = &c.terminal else {
                            return None;
                        };
                        let e = mesh_core::router::RouteTable::new(&h.route_config).err()?;
                        h.rds.is_none().then(|| format!(
                            "listener {:?}: filter_chains[{ci}].filters[-1].typed_config.route_config.{}: {}",
                            l.name, e.path, e.message
                        ))
                    });
                    if let Some(e) = bad_routes {
                        errors.push(e);
                        continue;
                    }
                    if let Err(e) = self.check_listener(&l) {
                        errors.push(format!("listener {:?}: {e}", l.name));
                        continue;
                    }
                    loaded.push((l, r.body.clone()))
                }
                Err(e) => errors.push(format!("listener {:?}: {}", r.name, short_errors(&e))),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let mut removed: BTreeSet<String> = u.removed.iter().cloned().collect();
        if u.state_of_the_world {
            let present: BTreeSet<&str> = loaded.iter().map(|(l, _)| l.name.as_str()).collect();
            removed.extend(
                self.listeners
                    .keys()
                    .chain(self.warming_listeners.keys())
                    .filter(|n| !present.contains(n.as_str()))
                    .cloned(),
            );
        }
        for name in &removed {
            self.warming_listeners.remove(name);
            if let Some(old) = self.listeners.remove(name) {
                tracing::info!(listener = %name, "listener removed; draining");
                self.cx.handoff.remove(name);
                old.drain.signal();
                self.runtime.lock().listeners.remove(name);
            }
            self.forget(types::LISTENER, name);
        }
        for (l, json) in loaded {
            self.remember(types::LISTENER, &l.name, &u.version, json);
            if self.listeners.get(&l.name).is_some_and(|a| a.config == l) {
                continue;
            }
            if !self.listener_ready(&l) {
                let deadline = self.listener_warm_timeout(&l);
                self.warming_listeners
                    .insert(l.name.clone(), (l, deadline.map(|d| Instant::now() + d)));
                continue;
            }
            self.activate(l)?;
        }
        self.subscribe_routes()?;
        self.subscribe_secrets()?;
        Ok(())
    }

    /// Refuses a listener whose TLS contexts or network RBAC cannot be
    /// built (the error names the field; SDS secrets may arrive later).
    fn check_listener(&self, l: &Listener) -> Result<(), String> {
        for (ci, c) in l.filter_chains.iter().enumerate() {
            if let Some(t) = &c.tls {
                ServerTls::new(t, Some(self.cx.secrets.clone()), TlsStats::detached()).map_err(
                    |e| format!("filter_chains[{ci}].transport_socket.typed_config.{e}"),
                )?;
            }
            if let Some(r) = &c.rbac {
                crate::rbac::network_rbac(r, &self.cx.store)
                    .map_err(|e| format!("filter_chains[{ci}].filters[0].typed_config.{e}"))?;
            }
        }
        Ok(())
    }

    /// Starts `l`, or updates the running listener of the same name: in
    /// place when only its filters changed, otherwise by starting the new
    /// one and draining the old.
    fn activate(&mut self, l: Listener) -> Result<(), String> {
        if let Some(old) = self.listeners.get_mut(&l.name) {
            if same_socket(&old.config, &l) {
                let built = build_terminals(
                    &l,
                    &self.cm,
                    &self.routes,
                    &self.cx.store,
                    &self.cx.rpc_codecs,
                    &mut self.worker_clusters,
                )?;
                if !store_terminals(&old.chains, built) {
                    return Err(format!("listener {:?}: terminal filter changed", l.name));
                }
                old.config = l;
                return Ok(());
            }
        }
        let new = self.spawn_listener(&l)?;
        tracing::info!(listener = %l.name, address = %new.addr, "listener started");
        self.runtime
            .lock()
            .listeners
            .insert(l.name.clone(), new.addr);
        if let Some(old) = self.listeners.insert(l.name.clone(), new) {
            tracing::info!(listener = %l.name, "listener replaced; draining the old one");
            old.drain.signal();
        }
        Ok(())
    }

    fn spawn_listener(&mut self, l: &Listener) -> Result<ActiveListener, String> {
        let built = build_terminals(
            l,
            &self.cm,
            &self.routes,
            &self.cx.store,
            &self.cx.rpc_codecs,
            &mut self.worker_clusters,
        )?;
        let bind = |addr: SocketAddr| {
            bind_tcp(addr)
                .map_err(|e| format!("listener {:?}: address: binding {addr}: {e}", l.name))
        };
        let (addr, mut sockets) = if l.bind_to_port {
            let first = bind(l.address)?;
            let addr = first
                .local_addr()
                .map_err(|e| format!("listener {:?}: {e}", l.name))?;
            if l.original_dst || l.use_original_dst {
                crate::original_dst::register_capture_listener(addr);
            }
            (addr, vec![first])
        } else {
            // `bind_to_port: false`: only receives hand-offs.
            (l.address, Vec::new())
        };
        for _ in 1..self.cx.workers.len() {
            if !l.bind_to_port {
                break;
            }
            sockets.push(bind(addr)?);
        }
        let drain = Drain::new();
        {
            // The proxy's own drain (shutdown) drains this listener too.
            let global = self.cx.drain.clone();
            let d = drain.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = global.signalled() => d.signal(),
                    _ = d.signalled() => {}
                }
            });
        }
        let stats = ListenerStats::new(&self.cx.store, addr);
        let limiter = l
            .connection_limit
            .as_ref()
            .map(|c| ConnectionLimiter::new(c.max_connections as usize, c.delay));
        let label = [(
            "envoy_listener_address",
            format!("{}_{}", addr.ip(), addr.port()),
        )];
        let mut chains = Vec::new();
        let mut active = Vec::new();
        for (ci, (chain, built)) in l.filter_chains.iter().zip(built).enumerate() {
            let swapping = match built {
                Built::Http(proxies, server) => Swapping::Http(
                    proxies
                        .into_iter()
                        .map(|p| Arc::new(ArcSwap::new(p)))
                        .collect(),
                    server,
                ),
                Built::Tcp(t) => Swapping::Tcp(Arc::new(ArcSwap::new(t))),
                Built::Rpc(workers) => Swapping::Rpc(
                    workers
                        .into_iter()
                        .map(|w| Arc::new(ArcSwap::new(w)))
                        .collect(),
                ),
            };
            let tls = match &chain.tls {
                None => None,
                Some(t) => {
                    let stats = TlsStats::new(&self.cx.store, "listener", &label);
                    let tls = ServerTls::new(t, Some(self.cx.secrets.clone()), stats)
                        .map_err(|e| {
                            format!(
                                "listener {:?}: filter_chains[{ci}].transport_socket.typed_config.{e}",
                                l.name
                            )
                        })?;
                    let tls = Arc::new(tls);
                    self.cx.tls.add_server(tls.clone());
                    Some(tls)
                }
            };
            let rbac = match &chain.rbac {
                None => None,
                Some(r) => Some(crate::rbac::network_rbac(r, &self.cx.store).map_err(|e| {
                    format!(
                        "listener {:?}: filter_chains[{ci}].filters[0].typed_config.{e}",
                        l.name
                    )
                })?),
            };
            active.push(swapping.clone());
            chains.push(Chain {
                terminal: Terminal::Swapping(swapping),
                tls,
                handshake_timeout: chain.handshake_timeout,
                rbac,
                rate_limit: chain
                    .local_ratelimit
                    .as_ref()
                    .map(|c| ConnectionRateLimiter::new(c, &self.cx.store)),
            });
        }
        let (selector, default_chain) = crate::downstream::chain_selector(l);
        let shared = Arc::new(
            Chains::new(
                chains,
                selector,
                l.tls_inspector,
                l.listener_filters_timeout,
                l.continue_on_listener_filters_timeout,
                &self.cx.store,
                addr,
            )
            .with_protocol_inspector(l.http_inspector, l.protocol_inspector, &self.cx.store)
            .with_default_chain(default_chain)
            .with_capture(crate::original_dst::Capture {
                restore: l.original_dst,
                hand_off: l.use_original_dst.then(|| self.cx.handoff.clone()),
            })
            .with_access_log(&l.access_log, &self.cx.store)
            .map_err(|e| format!("listener {:?}: access_log{e}", l.name))?,
        );
        let views: Vec<Arc<WorkerChains>> = (0..self.cx.workers.len())
            .map(|w| {
                Arc::new(WorkerChains::for_worker(
                    shared.clone(),
                    &self.cm,
                    drain.token(),
                    w,
                ))
            })
            .collect();
        self.cx.handoff.publish(&l.name, addr, views.clone());
        for (w, sock) in sockets.into_iter().enumerate() {
            let chains = views[w].clone();
            let drain = drain.clone();
            let global = self.cx.drain.clone();
            let limiter = limiter.clone();
            let stats = stats.clone();
            self.cx.workers[w].spawn(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(sock) else {
                    tracing::error!("worker could not register a listener");
                    return;
                };
                accept_loop(listener, limiter, drain, stats, move |a: Accepted| {
                    global.track(chains.clone().serve(a))
                })
                .await;
            });
        }
        Ok(ActiveListener {
            config: l.clone(),
            addr,
            drain,
            chains: active,
        })
    }

    /// Rebuilds every listener's terminal over the current clusters and
    /// routes (after CDS or RDS changes) and drops worker pools of clusters
    /// that left.
    fn refresh_terminals(&mut self) {
        for w in &mut self.worker_clusters {
            w.retain(|name, wc| self.cm.get(name).is_some_and(|e| Arc::ptr_eq(e, &wc.entry)));
        }
        let names: Vec<String> = self.listeners.keys().cloned().collect();
        for name in names {
            let Some(l) = self.listeners.get(&name) else {
                continue;
            };
            let config = l.config.clone();
            match build_terminals(
                &config,
                &self.cm,
                &self.routes,
                &self.cx.store,
                &self.cx.rpc_codecs,
                &mut self.worker_clusters,
            ) {
                Ok(built) => {
                    let Some(l) = self.listeners.get(&name) else {
                        continue;
                    };
                    store_terminals(&l.chains, built);
                }
                Err(e) => {
                    tracing::warn!(listener = %name, error = %e, "listener keeps its previous configuration")
                }
            }
        }
    }
}

enum Built {
    Http(Vec<Arc<HttpProxy>>, ServerConfig),
    Tcp(Arc<TcpProxyShared>),
    Rpc(Vec<Arc<RpcWorker>>),
}

/// Publishes rebuilt terminals into a running listener's slots (one per
/// chain).
fn store_terminals(active: &[Swapping], built: Vec<Built>) -> bool {
    if active.len() != built.len() {
        return false;
    }
    for (a, b) in active.iter().zip(built) {
        match (a, b) {
            (Swapping::Http(slots, _), Built::Http(proxies, _)) => {
                for (s, p) in slots.iter().zip(proxies) {
                    s.store(p);
                }
            }
            (Swapping::Tcp(slot), Built::Tcp(t)) => slot.store(t),
            (Swapping::Rpc(slots), Built::Rpc(workers)) => {
                for (s, w) in slots.iter().zip(workers) {
                    s.store(w);
                }
            }
            _ => return false,
        }
    }
    true
}

/// The TLS contexts of a listener's filter chains.
fn listener_tls(l: &Listener) -> impl Iterator<Item = &CommonTlsContext> {
    l.filter_chains
        .iter()
        .filter_map(|c| c.tls.as_ref().map(|t| &t.common))
}

/// Whether every SDS secret over xDS that `common` names is in the store.
fn secrets_ready(store: &SecretStore, common: &CommonTlsContext) -> bool {
    xds_secrets(common)
        .iter()
        .all(|(n, _)| store.get(n).is_some())
}

/// The `initial_fetch_timeout` of each xDS secret `common` names that has
/// not arrived.
fn missing_secrets(store: &SecretStore, common: &CommonTlsContext) -> Vec<Option<Duration>> {
    xds_secrets(common)
        .into_iter()
        .filter(|(n, _)| store.get(n).is_none())
        .map(|(_, s)| s.initial_fetch_timeout)
        .collect()
}

/// The longest of some warming timeouts, `None` (forever) if any is.
fn longest(timeouts: impl IntoIterator<Item = Option<Duration>>) -> Option<Duration> {
    timeouts
        .into_iter()
        .try_fold(Duration::ZERO, |a, t| t.map(|t| a.max(t)))
}

/// An SDS secret as `/config_dump` shows it: inline private keys replaced
/// by `[redacted]`, as Envoy does.
fn redacted(mut json: Value) -> mesh_xds::pb::google::protobuf::Any {
    if let Some(Value::Object(key)) = json.pointer_mut("/tls_certificate/private_key") {
        if key.contains_key("inline_bytes") {
            // base64 of "[redacted]".
            key.insert("inline_bytes".into(), json!("W3JlZGFjdGVkXQ=="));
        }
        if key.contains_key("inline_string") {
            key.insert("inline_string".into(), json!("[redacted]"));
        }
    }
    mesh_xds::convert::json_to_any(types::SECRET, &json).unwrap_or_default()
}

/// The `rds` of every HCM of a listener.
fn rds_of(l: &Listener) -> impl Iterator<Item = &mesh_core::config::Rds> {
    l.filter_chains.iter().filter_map(|c| match &c.terminal {
        NetworkFilter::HttpConnectionManager(h) => h.rds.as_ref(),
        _ => None,
    })
}

/// Whether `new` can take over `old`'s sockets: same address, connection
/// limit and listener filters, and chain by chain the same match, TLS,
/// RBAC, terminal kind and downstream connection settings (what changes
/// in place is what the terminals do: routes, clusters).
fn same_socket(old: &Listener, new: &Listener) -> bool {
    let chain = |c: &mesh_core::config::FilterChain| {
        let server = match &c.terminal {
            NetworkFilter::HttpConnectionManager(h) => (
                0,
                Some((
                    h.codec_type,
                    h.max_request_headers_kb,
                    h.request_headers_timeout,
                    h.idle_timeout,
                )),
            ),
            NetworkFilter::TcpProxy(_) => (1, None),
            NetworkFilter::Rpc(_) => (2, None),
        };
        (
            server,
            c.tls.clone(),
            c.handshake_timeout,
            c.rbac.clone(),
            c.filter_chain_match.clone(),
            c.local_ratelimit.clone(),
        )
    };
    let chains = |l: &Listener| l.filter_chains.iter().map(chain).collect::<Vec<_>>();
    old.address == new.address
        && old.connection_limit == new.connection_limit
        && old.tls_inspector == new.tls_inspector
        && old.listener_filters_timeout == new.listener_filters_timeout
        && old.continue_on_listener_filters_timeout == new.continue_on_listener_filters_timeout
        && old.http_inspector == new.http_inspector
        && old.protocol_inspector == new.protocol_inspector
        && old.original_dst == new.original_dst
        && old.use_original_dst == new.use_original_dst
        && old.bind_to_port == new.bind_to_port
        && old.default_filter_chain == new.default_filter_chain
        && chains(old) == chains(new)
}

/// The terminals of every filter chain of `l`.
fn build_terminals(
    l: &Listener,
    cm: &ClusterManager,
    routes: &HashMap<String, RouteConfiguration>,
    store: &Store,
    codecs: &crate::rpc::CodecRegistry,
    worker_clusters: &mut [HashMap<Arc<str>, Arc<WorkerCluster>>],
) -> Result<Vec<Built>, String> {
    if l.filter_chains.is_empty() {
        return Err(format!("listener {:?}: no filter chain", l.name));
    }
    let mut out = Vec::new();
    for (ci, chain) in l.filter_chains.iter().enumerate() {
        out.push(
            build_terminal(chain, cm, routes, store, codecs, worker_clusters)
                .map_err(|e| format!("listener {:?}: filter_chains[{ci}] {e}", l.name))?,
        );
    }
    Ok(out)
}

fn build_terminal(
    chain: &mesh_core::config::FilterChain,
    cm: &ClusterManager,
    routes: &HashMap<String, RouteConfiguration>,
    store: &Store,
    codecs: &crate::rpc::CodecRegistry,
    worker_clusters: &mut [HashMap<Arc<str>, Arc<WorkerCluster>>],
) -> Result<Built, String> {
    match &chain.terminal {
        NetworkFilter::HttpConnectionManager(h) => {
            let shared = Arc::new(build_hcm(h, routes, store).map_err(|e| format!("HCM: {e}"))?);
            let proxies = worker_clusters
                .iter_mut()
                .map(|cache| {
                    let mut clusters = HashMap::new();
                    for name in shared.routes.referenced_clusters() {
                        let Some(entry) = cm.get(&name) else { continue };
                        let wc = match cache.get(&name) {
                            Some(wc) if Arc::ptr_eq(&wc.entry, entry) => wc.clone(),
                            _ => {
                                let wc = Arc::new(WorkerCluster::new(entry.clone()));
                                cache.insert(name.clone(), wc.clone());
                                wc
                            }
                        };
                        clusters.insert(name, wc);
                    }
                    Arc::new(HttpProxy::with_clusters(shared.clone(), clusters))
                })
                .collect();
            let server = ServerConfig {
                codec: h.codec_type,
                max_request_headers_bytes: h.max_request_headers_kb as usize * 1024,
                request_headers_timeout: h.request_headers_timeout,
                idle_timeout: h.idle_timeout,
            };
            Ok(Built::Http(proxies, server))
        }
        NetworkFilter::TcpProxy(t) => Ok(Built::Tcp(Arc::new(
            TcpProxyShared::new(t, cm, store).map_err(|e| format!("tcp_proxy: {e}"))?,
        ))),
        NetworkFilter::Rpc(r) => {
            let shared = Arc::new(RpcShared::new(r, cm, store, codecs).map_err(|e| e.to_string())?);
            Ok(Built::Rpc(
                worker_clusters
                    .iter()
                    .map(|_| Arc::new(RpcWorker::new(shared.clone(), cm)))
                    .collect(),
            ))
        }
    }
}

fn build_hcm(
    h: &HttpConnectionManager,
    routes: &HashMap<String, RouteConfiguration>,
    store: &Store,
) -> Result<HcmShared, String> {
    match &h.rds {
        Some(rds) => {
            let mut cfg = h.clone();
            cfg.route_config = routes
                .get(&rds.route_config_name)
                .cloned()
                .unwrap_or_default();
            HcmShared::new(&cfg, store)
        }
        None => HcmShared::new(h, store),
    }
}

fn set_endpoints(
    c: &Cluster,
    balancer: &Balancer,
    stats: &ClusterStats,
    localities: Vec<LocalityLbEndpoints>,
) {
    let mut with = c.clone();
    with.localities = localities;
    match dns::static_endpoints(&with) {
        Ok(eps) => {
            balancer.update(eps);
            stats
                .membership_total
                .set(balancer.endpoints().endpoints.len() as i64);
        }
        Err(e) => tracing::warn!(cluster = %c.name, error = %e, "endpoints refused"),
    }
}
