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
//! - **Listeners** (LDS): a new listener binds one `SO_REUSEPORT` socket per
//!   worker and runs the same accept loop as a static one. A changed
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
//! before it binds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_codec::http::server::{serve_connection, ServerConfig};
use mesh_core::config::{
    ApiConfigSource, Cluster, ConfigSourceKind, DiscoveryType, DynamicResources,
    HttpConnectionManager, Listener, LocalityLbEndpoints, NetworkFilter, Node, RouteConfiguration,
};
use mesh_core::listener::{
    accept_loop, bind_tcp, Accepted, ConnectionLimiter, Drain, ListenerStats,
};
use mesh_core::stats::{GaugeGuard, Store};
use mesh_filter::local_ratelimit::ConnectionRateLimiter;
use mesh_lb::{dns, Balancer};
use mesh_xds::client::{self, ClientConfig, Delivery, XdsHandle};
use mesh_xds::types::{self, Protocol, Service};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bootstrap;
use crate::cluster::{ClusterEntry, ClusterManager, ClusterStats, WorkerCluster};
use crate::http::{ConnService, HcmShared, HttpProxy};
use crate::rpc::{RpcShared, RpcWorker};
use crate::tcp::TcpProxyShared;

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
                                "last_updated": rfc3339(e.last_updated),
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
                    "last_update_attempt": rfc3339(n.at),
                })
            });
            configs.push(json!({
                "@type": format!("type.googleapis.com/envoy.admin.v3.{dump_type}"),
                "version_info": st.version,
                "last_updated": st.last_updated.map(rfc3339),
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
        json!({"configs": configs, "xds_streams": connected})
    }
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
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
    let workers = cx.workers.len();
    let mut m = Manager {
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
    m.check_initialized();
    tokio::spawn(m.run(rx));
    Ok(runtime)
}

/// A listener being served.
struct ActiveListener {
    config: Listener,
    addr: SocketAddr,
    drain: Drain,
    terminal: ActiveTerminal,
}

enum ActiveTerminal {
    /// One slot per worker.
    Http(Vec<Arc<ArcSwap<HttpProxy>>>),
    Tcp(Arc<ArcSwap<TcpProxyShared>>),
    /// One slot per worker.
    Rpc(Vec<Arc<ArcSwap<RpcWorker>>>),
}

struct Manager {
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
    async fn run(mut self, mut rx: mpsc::Receiver<Delivery>) {
        loop {
            let next = self.next_deadline();
            tokio::select! {
                d = rx.recv() => match d {
                    Some(d) => self.handle(d),
                    None => return,
                },
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
            tracing::warn!(cluster = %n, "initial fetch timeout: the cluster's endpoints did not arrive; it goes live without them");
            self.warming.remove(&n);
        }
        let expired: Vec<String> = self
            .warming_listeners
            .iter()
            .filter(|(_, (_, d))| d.is_some_and(|d| d <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for n in expired {
            if let Some((l, _)) = self.warming_listeners.remove(&n) {
                tracing::warn!(listener = %n, "initial fetch timeout: the route configuration did not arrive; the listener goes live without it");
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
    }

    fn handle(&mut self, d: Delivery) {
        let t = d.update.type_url.clone();
        let r = match t.as_str() {
            types::CLUSTER => self.apply_clusters(&d.update),
            types::ENDPOINT => self.apply_endpoints(&d.update),
            types::ROUTE => self.apply_routes(&d.update),
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
        let addr = entry
            .balancer
            .endpoints()
            .endpoints
            .first()
            .map(|e| e.addr)
            .ok_or_else(|| format!("xDS cluster {:?} has no endpoint", api.cluster_name))?;
        let mut node = client::node(&self.cx.node.id, &self.cx.node.cluster);
        let l = &self.cx.node.locality;
        if !(l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty()) {
            node.locality = Some(mesh_xds::pb::envoy::config::core::v3::Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            });
        }
        let mut config = ClientConfig::new(format!("http://{addr}"), node);
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
        tracing::info!(source = %key, server = %addr, "xDS stream started");
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
        for e in self.cm.iter() {
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
        // Sources that no longer have names get an empty set.
        let known: Vec<String> = self
            .subscribed
            .keys()
            .filter(|(_, t)| *t == types::ENDPOINT)
            .map(|(k, _)| k.clone())
            .collect();
        for k in known {
            if !by_source.contains_key(&k) {
                if let Some(h) = self.clients.get(&k) {
                    h.subscribe(types::ENDPOINT, BTreeSet::new());
                }
                self.subscribed.remove(&(k, types::ENDPOINT));
            }
        }
        for (_, (kind, names)) in by_source {
            self.subscribe(types::ENDPOINT, &kind, names)?;
        }
        Ok(())
    }

    /// Subscribes to the route configurations every listener names.
    fn subscribe_routes(&mut self) -> Result<(), String> {
        let mut by_source: BTreeMap<String, (ConfigSourceKind, BTreeSet<String>)> = BTreeMap::new();
        let hcms = self
            .listeners
            .values()
            .map(|l| &l.config)
            .chain(self.warming_listeners.values().map(|(l, _)| l))
            .filter_map(|l| match &l.filter_chains.first()?.terminal {
                NetworkFilter::HttpConnectionManager(h) => h.rds.clone(),
                _ => None,
            });
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
                Ok(c) if c.tls.is_some() => errors.push(format!(
                    "cluster {:?}: transport_socket (TLS) is static-only; over CDS it is not supported yet",
                    c.name
                )),
                Ok(c) => loaded.push((c, r.body.clone())),
                Err(e) => errors.push(format!("cluster {:?}: {}", r.name, short_errors(&e))),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let mut removed: BTreeSet<String> = u.removed.iter().cloned().collect();
        if u.state_of_the_world {
            let present: BTreeSet<&str> = loaded.iter().map(|(c, _)| c.name.as_str()).collect();
            removed.extend(
                self.dynamic_clusters
                    .iter()
                    .filter(|n| !present.contains(n.as_str()))
                    .cloned(),
            );
        }
        let mut cm = self.cm.clone();
        for name in &removed {
            if self.dynamic_clusters.remove(name) {
                cm.remove(name);
                self.warming.remove(name);
                if let Some(s) = self.dns_stops.remove(name) {
                    s.cancel();
                }
                self.forget(types::CLUSTER, name);
                tracing::info!(cluster = %name, "cluster removed");
            }
        }
        for (c, json) in loaded {
            self.remember(types::CLUSTER, &c.name, &u.version, json);
            let old = cm.get(&c.name).cloned();
            if old.as_ref().is_some_and(|o| o.config == c) {
                continue;
            }
            let entry = self.build_cluster(&c, old.as_deref());
            self.dynamic_clusters.insert(c.name.clone());
            cm.insert(Arc::new(entry));
        }
        self.cm = cm;
        self.runtime.clusters.store(Arc::new(self.cm.clone()));
        self.subscribe_endpoints()?;
        self.refresh_terminals();
        Ok(())
    }

    /// A cluster entry for `c`; an `old` entry of the same name gives its
    /// balancer (endpoints and their state) when the policy is unchanged.
    fn build_cluster(&mut self, c: &Cluster, old: Option<&ClusterEntry>) -> ClusterEntry {
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
            }
            DiscoveryType::Eds {
                service_name,
                source,
            } => {
                if let Some(l) = self.assignments.get(service_name).cloned() {
                    set_endpoints(c, &balancer, &stats, l);
                } else if old.is_none() {
                    self.warm(&c.name, source.initial_fetch_timeout);
                }
            }
        }
        stats
            .membership_total
            .set(balancer.endpoints().endpoints.len() as i64);
        let (outlier, health_checker) =
            match crate::cluster::health_for(c, &balancer, &self.cx.store, &cluster_stop) {
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
            // CDS clusters with TLS are refused in apply_clusters.
            tls: None,
        }
    }

    fn apply_endpoints(&mut self, u: &client::Update) -> Result<(), String> {
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for r in &u.resources {
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
        let mut warmed = Vec::new();
        for (service, localities) in changed {
            for e in by_service.get(service.as_str()).into_iter().flatten() {
                set_endpoints(&e.config, &e.balancer, &e.stats, localities.clone());
                warmed.push(e.config.name.clone());
            }
        }
        for n in warmed {
            self.warming.remove(&n);
        }
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
        let ready: Vec<String> = self
            .warming_listeners
            .iter()
            .filter(|(_, (l, _))| rds_name(l).is_none_or(|n| self.routes.contains_key(n)))
            .map(|(n, _)| n.clone())
            .collect();
        for n in ready {
            if let Some((l, _)) = self.warming_listeners.remove(&n) {
                self.activate(l)?;
            }
        }
        self.refresh_terminals();
        Ok(())
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
                    if let Some(NetworkFilter::HttpConnectionManager(h)) =
                        l.filter_chains.first().map(|c| &c.terminal)
                    {
                        if h.rds.is_none() {
                            if let Err(e) = mesh_core::router::RouteTable::new(&h.route_config) {
                                errors.push(format!(
                                    "listener {:?}: filter_chains[0].filters[-1].typed_config.route_config.{}: {}",
                                    l.name, e.path, e.message
                                ));
                                continue;
                            }
                        }
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
            let deadline = rds_of(&l).and_then(|r| r.config_source.initial_fetch_timeout);
            if rds_name(&l).is_some_and(|n| !self.routes.contains_key(n)) {
                self.warming_listeners
                    .insert(l.name.clone(), (l, deadline.map(|d| Instant::now() + d)));
                continue;
            }
            self.activate(l)?;
        }
        self.subscribe_routes()?;
        Ok(())
    }

    /// Starts `l`, or updates the running listener of the same name: in
    /// place when only its filters changed, otherwise by starting the new
    /// one and draining the old.
    fn activate(&mut self, l: Listener) -> Result<(), String> {
        if let Some(old) = self.listeners.get_mut(&l.name) {
            if same_socket(&old.config, &l) {
                let terminal = build_terminal(
                    &l,
                    &self.cm,
                    &self.routes,
                    &self.cx.store,
                    &self.cx.rpc_codecs,
                    &mut self.worker_clusters,
                )?;
                if !store_terminal(&old.terminal, terminal) {
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
        let built = build_terminal(
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
        let first = bind(l.address)?;
        let addr = first
            .local_addr()
            .map_err(|e| format!("listener {:?}: {e}", l.name))?;
        let mut sockets = vec![first];
        for _ in 1..self.cx.workers.len() {
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
        // `envoy.filters.network.local_ratelimit`: one bucket for every
        // worker, checked before the terminal filter runs.
        let rate_limit = l
            .filter_chains
            .first()
            .and_then(|c| c.local_ratelimit.as_ref())
            .map(|c| Arc::new(ConnectionRateLimiter::new(c, &self.cx.store)));
        let admit = move |peer: SocketAddr| {
            let ok = rate_limit.as_ref().is_none_or(|r| r.admit());
            if !ok {
                tracing::debug!(%peer, "local_ratelimit: connection over the limit; closing");
            }
            ok
        };
        let terminal = match built {
            Built::Http(proxies, server) => {
                let server = Arc::new(server);
                let mut slots = Vec::new();
                for (w, (sock, proxy)) in sockets.into_iter().zip(proxies).enumerate() {
                    let slot = Arc::new(ArcSwap::new(proxy));
                    slots.push(slot.clone());
                    let server = server.clone();
                    let drain = drain.clone();
                    let global = self.cx.drain.clone();
                    let limiter = limiter.clone();
                    let stats = stats.clone();
                    let admit = admit.clone();
                    self.cx.workers[w].spawn(async move {
                        let Ok(listener) = tokio::net::TcpListener::from_std(sock) else {
                            tracing::error!("worker could not register a listener");
                            return;
                        };
                        let token = drain.token();
                        accept_loop(listener, limiter, drain, stats, move |a: Accepted| {
                            let admitted = admit(a.peer);
                            let svc = ConnService::swapping(slot.clone(), a.peer, a.local);
                            let server = server.clone();
                            let token = token.clone();
                            let hstats = slot.load().shared().stats.clone();
                            global.track(async move {
                                if !admitted {
                                    return;
                                }
                                hstats.cx_total.inc();
                                let _cx = GaugeGuard::new(&hstats.cx_active);
                                serve_connection(a.stream, &server, svc, token).await;
                                drop(a.guard);
                            })
                        })
                        .await;
                    });
                }
                ActiveTerminal::Http(slots)
            }
            Built::Tcp(shared) => {
                let slot = Arc::new(ArcSwap::new(shared));
                for (w, sock) in sockets.into_iter().enumerate() {
                    let slot = slot.clone();
                    let drain = drain.clone();
                    let global = self.cx.drain.clone();
                    let limiter = limiter.clone();
                    let stats = stats.clone();
                    let admit = admit.clone();
                    self.cx.workers[w].spawn(async move {
                        let Ok(listener) = tokio::net::TcpListener::from_std(sock) else {
                            tracing::error!("worker could not register a listener");
                            return;
                        };
                        accept_loop(listener, limiter, drain, stats, move |a: Accepted| {
                            let admitted = admit(a.peer);
                            let tcp = slot.load_full();
                            global.track(async move {
                                if admitted {
                                    tcp.handle(a).await
                                }
                            })
                        })
                        .await;
                    });
                }
                ActiveTerminal::Tcp(slot)
            }
            Built::Rpc(workers) => {
                let mut slots = Vec::new();
                for (w, (sock, worker)) in sockets.into_iter().zip(workers).enumerate() {
                    let slot = Arc::new(ArcSwap::new(worker));
                    slots.push(slot.clone());
                    let drain = drain.clone();
                    let global = self.cx.drain.clone();
                    let limiter = limiter.clone();
                    let stats = stats.clone();
                    let admit = admit.clone();
                    self.cx.workers[w].spawn(async move {
                        let Ok(listener) = tokio::net::TcpListener::from_std(sock) else {
                            tracing::error!("worker could not register a listener");
                            return;
                        };
                        let token = drain.token();
                        accept_loop(listener, limiter, drain, stats, move |a: Accepted| {
                            let admitted = admit(a.peer);
                            let rpc = slot.load_full();
                            let token = token.clone();
                            global.track(async move {
                                if admitted {
                                    rpc.handle(a, token).await
                                }
                            })
                        })
                        .await;
                    });
                }
                ActiveTerminal::Rpc(slots)
            }
        };
        Ok(ActiveListener {
            config: l.clone(),
            addr,
            drain,
            terminal,
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
            match build_terminal(
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
                    store_terminal(&l.terminal, built);
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

/// Publishes a rebuilt terminal into a running listener's slots.
fn store_terminal(active: &ActiveTerminal, built: Built) -> bool {
    match (active, built) {
        (ActiveTerminal::Http(slots), Built::Http(proxies, _)) => {
            for (s, p) in slots.iter().zip(proxies) {
                s.store(p);
            }
        }
        (ActiveTerminal::Tcp(slot), Built::Tcp(t)) => slot.store(t),
        (ActiveTerminal::Rpc(slots), Built::Rpc(workers)) => {
            for (s, w) in slots.iter().zip(workers) {
                s.store(w);
            }
        }
        _ => return false,
    }
    true
}

fn rds_of(l: &Listener) -> Option<&mesh_core::config::Rds> {
    match &l.filter_chains.first()?.terminal {
        NetworkFilter::HttpConnectionManager(h) => h.rds.as_ref(),
        _ => None,
    }
}

fn rds_name(l: &Listener) -> Option<&str> {
    rds_of(l).map(|r| r.route_config_name.as_str())
}

/// Whether `new` can take over `old`'s sockets: same address, connection
/// limit, terminal kind and downstream connection settings.
fn same_socket(old: &Listener, new: &Listener) -> bool {
    let server = |l: &Listener| match &l.filter_chains.first()?.terminal {
        NetworkFilter::HttpConnectionManager(h) => Some((
            0,
            Some((
                h.codec_type,
                h.max_request_headers_kb,
                h.request_headers_timeout,
                h.idle_timeout,
            )),
        )),
        NetworkFilter::TcpProxy(_) => Some((1, None)),
        NetworkFilter::Rpc(_) => Some((2, None)),
    };
    let rate_limit = |l: &Listener| l.filter_chains.first()?.local_ratelimit.clone();
    old.address == new.address
        && old.connection_limit == new.connection_limit
        && rate_limit(old) == rate_limit(new)
        && server(old) == server(new)
}

fn build_terminal(
    l: &Listener,
    cm: &ClusterManager,
    routes: &HashMap<String, RouteConfiguration>,
    store: &Store,
    codecs: &crate::rpc::CodecRegistry,
    worker_clusters: &mut [HashMap<Arc<str>, Arc<WorkerCluster>>],
) -> Result<Built, String> {
    if l.filter_chains.len() > 1
        || l.tls_inspector
        || l.filter_chains
            .iter()
            .any(|c| c.tls.is_some() || c.rbac.is_some())
    {
        return Err(format!(
            "listener {:?}: TLS transport sockets, several filter chains, the TLS inspector and network RBAC are static-only; over LDS they are not supported yet",
            l.name
        ));
    }
    let chain = l
        .filter_chains
        .first()
        .ok_or_else(|| format!("listener {:?}: no filter chain", l.name))?;
    match &chain.terminal {
        NetworkFilter::HttpConnectionManager(h) => {
            let shared = Arc::new(
                build_hcm(h, routes, store)
                    .map_err(|e| format!("listener {:?}: filter_chains[0] HCM: {e}", l.name))?,
            );
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
            TcpProxyShared::new(t, cm, store)
                .map_err(|e| format!("listener {:?}: tcp_proxy: {e}", l.name))?,
        ))),
        NetworkFilter::Rpc(r) => {
            let shared = Arc::new(
                RpcShared::new(r, cm, store, codecs)
                    .map_err(|e| format!("listener {:?}: {e}", l.name))?,
            );
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
