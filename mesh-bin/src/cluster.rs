//! The cluster manager: every configured cluster with its balancer,
//! discovery and stats, shared by all workers; and each worker's
//! connection pools to those clusters' endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mesh_codec::http::client::{EndpointPool, PoolConfig, PoolProtocol};
use mesh_core::config::{Cluster, DiscoveryType, UpstreamProtocol};
use mesh_core::policy::RoutingPriority;
use mesh_core::stats::{Counter, Gauge, StatusClassCounters, StatusCodeCounters, Store};
use mesh_filter::circuit_breaker::Permit;
use mesh_lb::health_check::{EventLog, HealthCheckStats, HealthChecker};
use mesh_lb::outlier::{OutlierDetector, OutlierStats};
use mesh_lb::{dns, Balancer, Endpoint, HealthFlags};
use tokio_util::sync::CancellationToken;

/// Envoy's `cluster.<name>.*` stats.
#[derive(Debug, Clone)]
pub struct ClusterStats {
    /// `upstream_rq_total`.
    pub rq_total: Counter,
    /// `upstream_rq_xx` by status class.
    pub rq_xx: StatusClassCounters,
    /// `upstream_rq_<code>` by exact status.
    pub rq_code: StatusCodeCounters,
    /// `upstream_rq_active`.
    pub rq_active: Gauge,
    /// `upstream_rq_timeout`.
    pub rq_timeout: Counter,
    /// `upstream_cx_connect_fail`.
    pub cx_connect_fail: Counter,
    /// `upstream_cx_none_healthy`: requests that found no endpoint.
    pub cx_none_healthy: Counter,
    /// `upstream_rq_rx_reset`: upstream reset/closed before a response.
    pub rq_rx_reset: Counter,
    /// `upstream_cx_tx_bytes_total` for TCP proxying.
    pub cx_tx_bytes: Counter,
    /// `upstream_cx_rx_bytes_total` for TCP proxying.
    pub cx_rx_bytes: Counter,
    /// `membership_total`.
    pub membership_total: Gauge,
}

impl ClusterStats {
    /// Counts an upstream response (or a proxy-made one charged to the
    /// upstream, as Envoy does for resets and timeouts) by class and code.
    #[inline]
    pub fn record_status(&self, status: u16) {
        self.rq_xx.record(status);
        self.rq_code.record(status);
    }

    /// The stats of cluster `name` (the same series when called again).
    pub fn new(store: &Store, name: &str) -> Self {
        let l = vec![("envoy_cluster_name", name.to_owned())];
        ClusterStats {
            rq_total: store.counter("envoy_cluster_upstream_rq_total", &l),
            rq_xx: StatusClassCounters::new(store, "envoy_cluster_upstream_rq_xx", &l),
            rq_code: StatusCodeCounters::new(store, "envoy_cluster_upstream_rq", &l),
            rq_active: store.gauge("envoy_cluster_upstream_rq_active", &l),
            rq_timeout: store.counter("envoy_cluster_upstream_rq_timeout", &l),
            cx_connect_fail: store.counter("envoy_cluster_upstream_cx_connect_fail", &l),
            cx_none_healthy: store.counter("envoy_cluster_upstream_cx_none_healthy", &l),
            rq_rx_reset: store.counter("envoy_cluster_upstream_rq_rx_reset", &l),
            cx_tx_bytes: store.counter("envoy_cluster_upstream_cx_tx_bytes_total", &l),
            cx_rx_bytes: store.counter("envoy_cluster_upstream_cx_rx_bytes_total", &l),
            membership_total: store.gauge("envoy_cluster_membership_total", &l),
        }
    }
}

/// One cluster: configuration, balancer and stats.
#[derive(Debug)]
pub struct ClusterEntry {
    /// The configuration it was built from.
    pub config: Cluster,
    /// Picks endpoints.
    pub balancer: Arc<Balancer>,
    /// Stats.
    pub stats: ClusterStats,
    /// Upstream TLS (`transport_socket`), if configured.
    pub tls: Option<Arc<mesh_tls::ClientTls>>,
    /// `transport_socket_matches`: per-endpoint transport sockets.
    pub socket_matches: crate::socket_match::SocketMatches,
    /// Outlier detection, when configured.
    pub outlier: Option<Arc<OutlierDetector>>,
    /// Active health checking, when configured.
    pub health_checker: Option<Arc<HealthChecker>>,
    /// Circuit breakers and retry stats.
    pub policy: crate::resilience::ClusterPolicy,
    /// The hosts of an ORIGINAL_DST cluster (its balancer only shows
    /// them).
    pub original_dst: Option<Arc<crate::original_dst::OriginalDstHosts>>,
    /// On-demand EDS (`--lazy-eds`): the first request waits here for the
    /// endpoints; `None` for every other cluster.
    pub on_demand: Option<Arc<crate::lazy_eds::OnDemandEndpoints>>,
}

/// Every cluster by name.
#[derive(Debug, Default, Clone)]
pub struct ClusterManager {
    clusters: HashMap<Arc<str>, Arc<ClusterEntry>>,
    order: Vec<Arc<str>>,
}

impl ClusterManager {
    /// Builds every cluster and runs its first discovery (DNS resolution),
    /// so that a listener using it starts with endpoints. DNS clusters keep
    /// re-resolving on the current runtime until `stop` fires.
    pub async fn build(
        clusters: &[Cluster],
        store: &Store,
        stop: &CancellationToken,
    ) -> Result<Self, String> {
        Self::build_with(clusters, "", store, stop, false).await
    }

    /// [`ClusterManager::build_with_secrets`] with a fresh secret store
    /// (clusters whose TLS names SDS secrets then fail to handshake until
    /// the secrets are published).
    pub async fn build_with(
        clusters: &[Cluster],
        zone: &str,
        store: &Store,
        stop: &CancellationToken,
        xds: bool,
    ) -> Result<Self, String> {
        let secrets = mesh_tls::SecretStore::new(None);
        Self::build_with_secrets(clusters, zone, store, stop, xds, &secrets).await
    }

    /// [`ClusterManager::build`] for a proxy in `zone` (zone-aware routing
    /// prefers endpoints there; empty: unknown). With `xds`, EDS clusters
    /// are accepted and start empty until their endpoints arrive. Upstream
    /// TLS secrets are resolved in `secrets`.
    pub async fn build_with_secrets(
        clusters: &[Cluster],
        zone: &str,
        store: &Store,
        stop: &CancellationToken,
        xds: bool,
        secrets: &Arc<mesh_tls::SecretStore>,
    ) -> Result<Self, String> {
        let mut cm = ClusterManager::default();
        let mut first_checks = Vec::new();
        for (i, c) in clusters.iter().enumerate() {
            let balancer =
                Arc::new(Balancer::with_config(c.lb_policy, c.lb.clone()).with_local_zone(zone));
            let stats = ClusterStats::new(store, &c.name);
            match &c.discovery {
                DiscoveryType::Static => {
                    let eps = dns::static_endpoints(c)
                        .map_err(|e| format!("static_resources.clusters[{i}].{e}"))?;
                    balancer.update(eps);
                }
                DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
                    match dns::resolve(c).await {
                        Ok(eps) => {
                            balancer.update(eps);
                        }
                        Err(e) => tracing::warn!(cluster = %c.name, error = %e,
                            "initial DNS resolution failed; the cluster starts empty and keeps retrying"),
                    }
                    let membership = stats.membership_total.clone();
                    tokio::spawn(dns::refresh_loop(
                        c.clone(),
                        balancer.clone(),
                        stop.clone(),
                        move |n| membership.set(n as i64),
                    ));
                }
                DiscoveryType::OriginalDst(_) => {
                    // Hosts are created on demand (`original_dst.rs`).
                }
                DiscoveryType::Eds { .. } if xds => {
                    // Endpoints arrive over xDS (`dynamic.rs`).
                }
                DiscoveryType::Eds { .. } => {
                    return Err(format!(
                        "static_resources.clusters[{i}].type: EDS needs an xDS source, which this build does not have yet (unsupported)"
                    ));
                }
            }
            stats
                .membership_total
                .set(balancer.endpoints().endpoints.len() as i64);
            let tls = match &c.tls {
                None => None,
                Some(t) => Some(Arc::new(
                    mesh_tls::ClientTls::new(
                        t,
                        Some(secrets.clone()),
                        mesh_tls::TlsStats::new(
                            store,
                            "cluster",
                            &[("envoy_cluster_name", c.name.clone())],
                        ),
                    )
                    .map_err(|e| {
                        format!("static_resources.clusters[{i}].transport_socket.typed_config.{e}")
                    })?,
                )),
            };
            let socket_matches =
                crate::socket_match::SocketMatches::build(c, Some(secrets.clone()), store)
                    .map_err(|e| format!("static_resources.clusters[{i}].{e}"))?;
            let (outlier, health_checker, first) =
                health_for(c, &balancer, store, stop, (&tls, &socket_matches))
                    .map_err(|e| format!("static_resources.clusters[{i}].{e}"))?;
            first_checks.extend(first);
            let balancer_for_hosts = balancer.clone();
            let name: Arc<str> = Arc::from(c.name.as_str());
            cm.order.push(name.clone());
            cm.clusters.insert(
                name,
                Arc::new(ClusterEntry {
                    config: c.clone(),
                    balancer,
                    policy: crate::resilience::ClusterPolicy::new(c, store, &stats.rq_active),
                    stats,
                    tls,
                    socket_matches,
                    outlier,
                    health_checker,
                    original_dst: match &c.discovery {
                        DiscoveryType::OriginalDst(od) => {
                            Some(crate::original_dst::OriginalDstHosts::start(
                                od.clone(),
                                balancer_for_hosts,
                                stop,
                            ))
                        }
                        _ => None,
                    },
                    on_demand: None,
                }),
            );
        }
        // As Envoy, a health-checked cluster is ready once each endpoint has
        // had its first probe (each bounded by the probe timeout).
        for f in first_checks {
            f.await;
        }
        Ok(cm)
    }

    /// Adds or replaces a cluster (xDS); a new one goes last in order.
    pub fn insert(&mut self, entry: Arc<ClusterEntry>) {
        let name: Arc<str> = Arc::from(entry.config.name.as_str());
        if self.clusters.insert(name.clone(), entry).is_none() {
            self.order.push(name);
        }
    }

    /// Removes a cluster (xDS). Requests holding its entry finish with it.
    pub fn remove(&mut self, name: &str) -> Option<Arc<ClusterEntry>> {
        let e = self.clusters.remove(name)?;
        self.order.retain(|n| &**n != name);
        Some(e)
    }

    /// Removes several clusters (xDS) with one pass over the order, so a
    /// state-of-the-world update that drops thousands of clusters stays
    /// linear. Returns how many were present.
    pub fn remove_many<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) -> usize {
        let removed = names
            .into_iter()
            .filter(|n| self.clusters.remove(*n).is_some())
            .count();
        if removed > 0 {
            let clusters = &self.clusters;
            self.order.retain(|n| clusters.contains_key(n));
        }
        removed
    }

    /// A cluster by name.
    pub fn get(&self, name: &str) -> Option<&Arc<ClusterEntry>> {
        self.clusters.get(name)
    }

    /// Every cluster, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ClusterEntry>> {
        self.order.iter().filter_map(|n| self.clusters.get(n))
    }
}

/// The first-round future of a cluster's health checker.
type FirstRound = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A cluster's outlier detector, health checker and the checker's first round.
type ClusterHealth = (
    Option<Arc<OutlierDetector>>,
    Option<Arc<HealthChecker>>,
    Option<FirstRound>,
);

/// Starts a cluster's outlier detection and active health checking on the
/// current runtime, until `stop` fires. A balancer that is reused from a
/// cluster that had them loses the flags they set.
/// `sockets`: the cluster's built `transport_socket` and
/// `transport_socket_matches`, which probes connect through.
pub(crate) fn health_for(
    c: &Cluster,
    balancer: &Arc<Balancer>,
    store: &Store,
    stop: &CancellationToken,
    sockets: (
        &Option<Arc<mesh_tls::ClientTls>>,
        &crate::socket_match::SocketMatches,
    ),
) -> Result<ClusterHealth, String> {
    let mut stale = 0;
    if c.health_check.is_none() {
        balancer.set_new_endpoint_health(0);
        stale |= HealthFlags::FAILED_ACTIVE_HC | HealthFlags::ACTIVE_HC_TIMEOUT;
    }
    if c.outlier_detection.is_none() {
        stale |= HealthFlags::FAILED_OUTLIER_CHECK;
    }
    let mut changed = false;
    for e in &balancer.endpoints().endpoints {
        changed |= e.health.clear(stale);
    }
    if changed {
        balancer.health_changed();
    }
    let outlier = c.outlier_detection.as_ref().map(|od| {
        let d = Arc::new(OutlierDetector::new(
            &c.name,
            od.clone(),
            balancer.clone(),
            OutlierStats::new(store, &c.name),
        ));
        tokio::spawn(d.clone().run(stop.clone()));
        d
    });
    let Some(hc) = &c.health_check else {
        return Ok((outlier, None, None));
    };
    let mut checker = HealthChecker::new(
        &c.name,
        hc.clone(),
        balancer.clone(),
        crate::health::probe(
            &c.name,
            &hc.checker,
            crate::health::ProbeTransport {
                tls: sockets.0.clone(),
                matches: sockets.1.clone(),
                source: c.upstream_bind,
                criteria: hc.transport_socket_match_criteria.as_ref().map(|labels| {
                    c.transport_socket_matches
                        .iter()
                        .position(|m| m.matches(labels))
                        .and_then(|i| u32::try_from(i).ok())
                }),
                alpn: hc.tls_alpn.clone(),
            },
        ),
        HealthCheckStats::new(store, &c.name),
    );
    if let Some(d) = &outlier {
        let d = d.clone();
        checker = checker.on_healthy(Box::new(move |e| d.health_check_passed(e)));
    }
    if let Some(path) = &hc.event_log_path {
        let log = EventLog::open(path)
            .map_err(|e| format!("health_checks[0].event_log_path: cannot open {path:?}: {e}"))?;
        checker = checker.event_log(log);
    }
    let checker = Arc::new(checker);
    let bound = hc.timeout + hc.initial_jitter + std::time::Duration::from_secs(1);
    let first = checker.clone().start(stop.clone());
    let first: FirstRound = Box::pin(async move {
        let _ = tokio::time::timeout(bound, first).await;
    });
    Ok((outlier, Some(checker), Some(first)))
}

/// One worker's view of a cluster: the shared entry plus this worker's
/// connection pools.
#[derive(Debug)]
pub struct WorkerCluster {
    /// The shared cluster.
    pub entry: Arc<ClusterEntry>,
    /// Each pool with its `max_connection_pools` permit.
    pools: Mutex<HashMap<PoolKey, (Arc<EndpointPool>, Permit)>>,
}

/// A worker's pool key: the endpoint, whether it speaks HTTP/2, the
/// `transport_socket_matches` entry its connections use, and the ALPN list
/// Istio's `istio.alpn` makes them offer (HCMs with different overrides
/// share worker clusters under xDS).
type PoolKey = (SocketAddr, bool, Option<u32>, Option<Arc<[String]>>);

impl WorkerCluster {
    /// A worker-local handle on `entry`.
    pub fn new(entry: Arc<ClusterEntry>) -> Self {
        WorkerCluster {
            entry,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// Whether requests to this cluster use HTTP/2, given the downstream
    /// request's version.
    pub fn uses_h2(&self, downstream: http::Version) -> bool {
        match self.entry.config.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Downstream => downstream == http::Version::HTTP_2,
        }
    }

    /// The pool for `endpoint` speaking HTTP/2 or not, created on first use
    /// with the endpoint's transport socket.
    /// Creating one also drops the pools of endpoints no longer in the
    /// cluster. `None` when a new pool would exceed the cluster's
    /// `max_connection_pools` (all workers' pools together, `DEFAULT`
    /// priority) and no pool of this worker is idle to make room, as in
    /// Envoy (counted in `upstream_cx_pool_overflow`).
    pub fn pool(&self, endpoint: &Endpoint, h2: bool) -> Option<Arc<EndpointPool>> {
        self.pool_with_alpn(endpoint, h2, None)
    }

    /// [`WorkerCluster::pool`] whose TLS connections offer `alpn` instead
    /// of the context's list (`istio.alpn`); plain-text pools ignore it.
    pub fn pool_with_alpn(
        &self,
        endpoint: &Endpoint,
        h2: bool,
        alpn: Option<&Arc<[String]>>,
    ) -> Option<Arc<EndpointPool>> {
        let (addr, socket) = (endpoint.addr, endpoint.transport_socket);
        let key = (addr, h2, socket, alpn.cloned());
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, _)) = pools.get(&key) {
            return Some(p.clone());
        }
        // A new endpoint appeared: drop the pools of endpoints that left the
        // cluster (DNS answers change) or changed transport socket (EDS
        // metadata), closing their idle connections.
        let current = self.entry.balancer.endpoints();
        pools.retain(|(a, _, s, _), _| {
            current
                .endpoints
                .iter()
                .any(|e| e.addr == *a && e.transport_socket == *s)
        });
        let limit = &self
            .entry
            .policy
            .resources(RoutingPriority::Default)
            .connection_pools;
        let permit = match limit.try_acquire() {
            Some(p) => p,
            None => {
                // Make room by dropping one pool that has no connection and
                // no request using it.
                let idle = pools
                    .iter()
                    .find(|(_, (p, _))| Arc::strong_count(p) == 1 && p.is_idle())
                    .map(|(k, _)| k.clone());
                if let Some(k) = idle {
                    pools.remove(&k);
                }
                match limit.try_acquire() {
                    Some(p) => p,
                    None => {
                        self.entry.policy.cx_pool_overflow.inc();
                        return None;
                    }
                }
            }
        };
        let connector = match alpn {
            Some(list) => {
                self.entry
                    .socket_matches
                    .connector_with(socket, &self.entry.tls, |tls| {
                        crate::istio::alpn::connector(tls, list.clone())
                    })
            }
            None => self.entry.socket_matches.connector(socket, &self.entry.tls),
        };
        let p = EndpointPool::with_source(
            addr,
            PoolConfig {
                protocol: if h2 {
                    PoolProtocol::Http2
                } else {
                    PoolProtocol::Http1
                },
                connect_timeout: self.entry.config.connect_timeout,
                max_idle: 1024,
                idle_timeout: self.entry.config.idle_timeout,
                max_requests_per_connection: self.entry.config.max_requests_per_connection,
            },
            Some(self.entry.policy.pool_limits.clone()),
            connector,
            self.entry.config.upstream_bind,
        );
        pools.insert(key, (p.clone(), permit));
        Some(p)
    }
}
