//! A cluster's resilience state shared by every worker: its circuit
//! breakers (one [`ResourceManager`] per routing priority), retry stats,
//! and the overflow counters; and the proxy-made overflow reply.

use std::sync::Arc;

use mesh_codec::http::client::{LimitPermit, PoolLimits};
use mesh_core::config::Cluster;
use mesh_core::policy::RoutingPriority;
use mesh_core::stats::{Counter, Gauge, Store};
use mesh_filter::circuit_breaker::{ResourceGauges, ResourceManager, RetryStats};

/// What a cluster shares across workers for retries and circuit breaking.
#[derive(Debug)]
pub struct ClusterPolicy {
    /// `DEFAULT` and `HIGH` priority resources.
    resources: [Arc<ResourceManager>; 2],
    /// `upstream_rq_retry*`.
    pub retry_stats: RetryStats,
    /// `upstream_rq_pending_overflow`: requests refused by
    /// `max_pending_requests`.
    pub rq_pending_overflow: Counter,
    /// `upstream_rq_active_overflow`: requests refused by `max_requests`.
    pub rq_active_overflow: Counter,
    /// `upstream_cx_overflow`: connections refused by `max_connections`.
    pub cx_overflow: Counter,
    /// `upstream_rq_per_try_timeout`.
    pub rq_per_try_timeout: Counter,
    /// `upstream_cx_pool_overflow`: requests that found no connection
    /// pool because of `max_connection_pools`.
    pub cx_pool_overflow: Counter,
    /// `upstream_rq_pending_active`.
    pub rq_pending_active: Gauge,
    /// What the cluster's connection pools obey (`max_connections`,
    /// `max_pending_requests` of the `DEFAULT` priority).
    pub pool_limits: Arc<dyn PoolLimits>,
}

impl ClusterPolicy {
    /// Builds the state of cluster `c`; the `DEFAULT` priority's request
    /// count is the cluster's `upstream_rq_active` gauge `rq_active`.
    pub fn new(c: &Cluster, store: &Store, rq_active: &Gauge) -> Self {
        let l = vec![("envoy_cluster_name", c.name.clone())];
        let rq_pending_active = store.gauge("envoy_cluster_upstream_rq_pending_active", &l);
        let default_gauges = ResourceGauges {
            requests: rq_active.clone(),
            pending_requests: rq_pending_active.clone(),
            connections: store.gauge("envoy_cluster_upstream_cx_active", &l),
            ..ResourceGauges::default()
        };
        let stats = Some((store, c.name.as_str()));
        let default = Arc::new(ResourceManager::new(
            &c.circuit_breakers.default,
            default_gauges,
            stats,
        ));
        let cx_overflow = store.counter("envoy_cluster_upstream_cx_overflow", &l);
        let rq_pending_overflow = store.counter("envoy_cluster_upstream_rq_pending_overflow", &l);
        ClusterPolicy {
            pool_limits: Arc::new(ClusterPoolLimits {
                resources: default.clone(),
                cx_overflow: cx_overflow.clone(),
                rq_pending_overflow: rq_pending_overflow.clone(),
            }),
            resources: [
                default,
                Arc::new(ResourceManager::new(
                    &c.circuit_breakers.high,
                    ResourceGauges::default(),
                    stats,
                )),
            ],
            retry_stats: RetryStats::new(store, &c.name),
            rq_pending_overflow,
            rq_active_overflow: store.counter("envoy_cluster_upstream_rq_active_overflow", &l),
            cx_overflow,
            rq_per_try_timeout: store.counter("envoy_cluster_upstream_rq_per_try_timeout", &l),
            cx_pool_overflow: store.counter("envoy_cluster_upstream_cx_pool_overflow", &l),
            rq_pending_active,
        }
    }

    /// The resources of a routing priority.
    #[inline]
    pub fn resources(&self, p: RoutingPriority) -> &Arc<ResourceManager> {
        match p {
            RoutingPriority::Default => &self.resources[0],
            RoutingPriority::High => &self.resources[1],
        }
    }
}

/// The `max_connections` / `max_pending_requests` breakers as the pools
/// see them.
#[derive(Debug)]
struct ClusterPoolLimits {
    resources: Arc<ResourceManager>,
    cx_overflow: Counter,
    rq_pending_overflow: Counter,
}

impl PoolLimits for ClusterPoolLimits {
    fn try_connection(&self) -> Option<LimitPermit> {
        match self.resources.connections.try_acquire() {
            Some(p) => Some(Box::new(p)),
            None => {
                self.cx_overflow.inc();
                None
            }
        }
    }

    fn try_pending(&self) -> Option<LimitPermit> {
        match self.resources.pending_requests.try_acquire() {
            Some(p) => Some(Box::new(p)),
            None => {
                self.rq_pending_overflow.inc();
                None
            }
        }
    }
}

/// Envoy's body for a request refused by a circuit breaker.
pub const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";
