//! mesh-lb: from a changing set of endpoints to one endpoint per request.
//!
//! - [`Endpoint`]: one upstream address with its weight, locality, priority,
//!   metadata and live state (active requests, totals, health flags, peak
//!   EWMA latency); the same `Arc<Endpoint>` survives endpoint-set updates
//!   that keep it, so its state is not reset.
//! - [`Balancer`]: picks an endpoint for a request, by Envoy's policies
//!   ([`LbPolicy`]): smooth weighted round robin, weighted random, least
//!   request (power of two choices, Envoy's weighting), ring hash and Maglev
//!   (the same hashes as Envoy, so the same key reaches the same endpoint),
//!   and peak EWMA latency (linkerd's). On top of any policy: priority
//!   levels with Envoy's overprovisioning factor and panic threshold,
//!   locality weights, zone-aware routing (the rules are in the source of
//!   the `priority` module) and subsets by endpoint metadata
//!   (`lb_subset_config`).
//! - [`hash`]: the request hash of a route's `hash_policy` (header, cookie,
//!   source IP, query parameter).
//! - [`dns`]: STRICT_DNS and LOGICAL_DNS discovery that feeds a balancer.
//! - [`HealthFlags`]: per-endpoint health written by health checking and
//!   outlier detection, read by the balancer.
//!
//! The balancer is read-copy-update: an update builds a new endpoint set and
//! swaps it in; picks in flight keep the set they started with. No pick is
//! linear in the number of endpoints (see the table in the `picker` module).
//!
//! # Using mesh-lb on its own
//!
//! A Rust service can balance its own outbound calls:
//!
//! ```
//! use std::time::Duration;
//! use mesh_lb::{Balancer, EndpointSpec, PickContext};
//! use mesh_core::config::{LbConfig, LbPolicy};
//!
//! let backends = Balancer::with_config(LbPolicy::RingHash, LbConfig::default());
//! backends.update(vec![
//!     EndpointSpec::new("10.0.0.1:8080".parse().unwrap()),
//!     EndpointSpec::new("10.0.0.2:8080".parse().unwrap()).with_weight(2),
//! ]);
//! // The same user always reaches the same backend.
//! let key = mesh_lb::hash::xxhash64(b"user-42");
//! let ctx = PickContext::new().with_hash(Some(key));
//! let first = backends.pick_with(&ctx).unwrap();
//! assert_eq!(backends.pick_with(&ctx).unwrap().addr, first.addr);
//!
//! // Report latency and load so least-request / peak EWMA can use them.
//! let _in_flight = first.stats.rq_active.get();
//! first.observe_rtt(Duration::from_millis(3));
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dns;
pub mod ewma;
pub mod hash;
pub mod health;
pub mod health_check;
mod maglev;
pub mod outlier;
mod picker;
mod priority;
mod ring_hash;
mod subset;

pub use ewma::RttEstimate;
pub use health::HealthFlags;
pub use maglev::is_prime;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::config::{HealthStatus, LbConfig, LbMetadata, LbPolicy, Locality, SubsetFallback};
use mesh_core::stats::{Counter, Gauge};

use priority::HostGroup;
use subset::Subsets;

/// Live per-endpoint counters, shown on the admin `/clusters` page.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Requests in flight to this endpoint.
    pub rq_active: Gauge,
    /// Requests sent.
    pub rq_total: Counter,
    /// Requests that got a 5xx or failed.
    pub rq_error: Counter,
    /// Connect failures.
    pub cx_connect_fail: Counter,
}

/// One upstream endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The configured host name (DNS clusters) or the IP as text.
    pub hostname: String,
    /// Load-balancing weight (>= 1).
    pub weight: u32,
    /// Priority level (0 is the highest).
    pub priority: u32,
    /// Locality.
    pub locality: Locality,
    /// The locality's `load_balancing_weight` (0 when not set).
    pub locality_weight: u32,
    /// `metadata.filter_metadata["envoy.lb"]`, for subsets.
    pub metadata: LbMetadata,
    /// Live counters.
    pub stats: EndpointStats,
    /// Health flags (active health checking, outlier detection, discovery).
    pub health: HealthFlags,
    /// Peak EWMA of the time to response headers.
    pub rtt: RttEstimate,
    /// Outlier-detection counters, updated on the request path.
    pub outlier: outlier::EndpointOutlier,
    /// Which of the cluster's `transport_socket_matches` its connections
    /// use (`None`: the cluster's `transport_socket`).
    pub transport_socket: Option<u32>,
}

impl Endpoint {
    /// Records the time from sending a request to its response headers,
    /// for the peak EWMA balancer. Call it when the response headers
    /// arrive.
    pub fn observe_rtt(&self, rtt: Duration) {
        self.rtt.observe_at(rtt, tokio::time::Instant::now());
    }

    fn new(s: EndpointSpec, config: &LbConfig, health_bits: u8) -> Self {
        let health_status = s.health_status;
        let e = Endpoint {
            addr: s.addr,
            hostname: s.hostname,
            weight: s.weight.max(1),
            priority: s.priority,
            locality: s.locality,
            locality_weight: s.locality_weight.unwrap_or(0),
            metadata: s.metadata,
            stats: EndpointStats::default(),
            health: HealthFlags::new(health_bits),
            outlier: Default::default(),
            rtt: RttEstimate::new(config.ewma_default_rtt, config.ewma_decay),
            transport_socket: s.transport_socket,
        };
        e.apply_health_status(health_status);
        e
    }

    /// Sets the discovery-reported health flags; true when they changed.
    fn apply_health_status(&self, h: HealthStatus) -> bool {
        let (failed, degraded) = match h {
            HealthStatus::Unknown | HealthStatus::Healthy => (false, false),
            HealthStatus::Unhealthy => (true, false),
            HealthStatus::Degraded => (false, true),
        };
        let mut changed = false;
        for (flag, on) in [
            (HealthFlags::FAILED_EDS_HEALTH, failed),
            (HealthFlags::DEGRADED, degraded),
        ] {
            changed |= if on {
                self.health.set(flag)
            } else {
                self.health.clear(flag)
            };
        }
        changed
    }

    fn same(&self, s: &EndpointSpec) -> bool {
        self.addr == s.addr
            && self.weight == s.weight.max(1)
            && self.priority == s.priority
            && self.locality == s.locality
            && self.hostname == s.hostname
            && self.locality_weight == s.locality_weight.unwrap_or(0)
            && self.metadata == s.metadata
            && self.transport_socket == s.transport_socket
    }
}

/// The description of an endpoint, before it becomes an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The configured host name or IP text.
    pub hostname: String,
    /// Load-balancing weight (0 is treated as 1).
    pub weight: u32,
    /// Priority level.
    pub priority: u32,
    /// Locality.
    pub locality: Locality,
    /// The locality's `load_balancing_weight`.
    pub locality_weight: Option<u32>,
    /// `metadata.filter_metadata["envoy.lb"]`.
    pub metadata: LbMetadata,
    /// The health discovery reports (`health_status`): sets or clears
    /// [`HealthFlags::FAILED_EDS_HEALTH`] and [`HealthFlags::DEGRADED`].
    pub health_status: HealthStatus,
    /// The cluster's `transport_socket_matches` entry its metadata selects
    /// (`None`: the cluster's `transport_socket`).
    pub transport_socket: Option<u32>,
}

impl EndpointSpec {
    /// An endpoint at `addr` with weight 1, priority 0, no locality.
    pub fn new(addr: SocketAddr) -> Self {
        EndpointSpec {
            addr,
            hostname: addr.ip().to_string(),
            weight: 1,
            priority: 0,
            locality: Locality::default(),
            locality_weight: None,
            metadata: LbMetadata::new(),
            health_status: HealthStatus::Unknown,
            transport_socket: None,
        }
    }

    /// With load-balancing weight `w`.
    pub fn with_weight(mut self, w: u32) -> Self {
        self.weight = w;
        self
    }

    /// At priority level `p`.
    pub fn with_priority(mut self, p: u32) -> Self {
        self.priority = p;
        self
    }

    /// In locality `l`.
    pub fn with_locality(mut self, l: Locality) -> Self {
        self.locality = l;
        self
    }

    /// With subset metadata `m`.
    pub fn with_metadata(mut self, m: LbMetadata) -> Self {
        self.metadata = m;
        self
    }

    /// With the health discovery reports.
    pub fn with_health_status(mut self, h: HealthStatus) -> Self {
        self.health_status = h;
        self
    }

    /// Using the cluster's `transport_socket_matches` entry `i`.
    pub fn with_transport_socket(mut self, i: Option<u32>) -> Self {
        self.transport_socket = i;
        self
    }
}

/// What a request brings to a pick besides itself.
#[derive(Debug, Default, Clone, Copy)]
#[non_exhaustive]
pub struct PickContext<'a> {
    /// The request hash (route `hash_policy`) for ring hash and Maglev;
    /// also chooses the priority level. `None` picks at random.
    pub hash: Option<u64>,
    /// The subset wanted (route `metadata_match`, `envoy.lb`).
    pub metadata_match: Option<&'a LbMetadata>,
}

impl<'a> PickContext<'a> {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// With a request hash.
    pub fn with_hash(mut self, hash: Option<u64>) -> Self {
        self.hash = hash;
        self
    }

    /// With a subset to pick from.
    pub fn with_metadata_match(mut self, m: &'a LbMetadata) -> Self {
        self.metadata_match = Some(m);
        self
    }
}

/// The balancer's fixed settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) policy: LbPolicy,
    pub(crate) config: LbConfig,
    pub(crate) local_zone: Option<String>,
}

/// An immutable set of endpoints with its pick structures.
#[derive(Debug)]
pub struct EndpointSet {
    /// Every endpoint, all priorities.
    pub endpoints: Vec<Arc<Endpoint>>,
    root: HostGroup,
    subsets: Option<Subsets>,
}

impl EndpointSet {
    fn build(endpoints: Vec<Arc<Endpoint>>, s: &Settings) -> Self {
        let root = HostGroup::build(&endpoints, s);
        let subsets = s
            .config
            .subset
            .as_ref()
            .map(|c| Subsets::build(&endpoints, c, s));
        EndpointSet {
            endpoints,
            root,
            subsets,
        }
    }

    /// True when no endpoint can be picked (without a subset).
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }
}

/// Picks endpoints by a policy over a swappable endpoint set.
#[derive(Debug)]
pub struct Balancer {
    settings: Settings,
    set: ArcSwap<EndpointSet>,
    /// [`HealthFlags`] bits that endpoints added by [`Balancer::update`]
    /// start with (`/failed_active_hc` when the cluster is health checked).
    new_endpoint_health: AtomicU8,
}

impl Balancer {
    /// A balancer with no endpoints yet and default settings.
    pub fn new(policy: LbPolicy) -> Self {
        Self::with_config(policy, LbConfig::default())
    }

    /// A balancer with no endpoints yet.
    pub fn with_config(policy: LbPolicy, config: LbConfig) -> Self {
        let settings = Settings {
            policy,
            config,
            local_zone: None,
        };
        let set = EndpointSet::build(Vec::new(), &settings);
        Balancer {
            settings,
            set: ArcSwap::from_pointee(set),
            new_endpoint_health: AtomicU8::new(0),
        }
    }

    /// Sets the proxy's own zone, for zone-aware routing (call before the
    /// first update).
    pub fn with_local_zone(mut self, zone: impl Into<String>) -> Self {
        let z: String = zone.into();
        self.settings.local_zone = (!z.is_empty()).then_some(z);
        self
    }

    /// Sets the [`HealthFlags`] bits that endpoints added by later updates
    /// start with (active health checking marks new endpoints
    /// `/failed_active_hc` until their first probe, as Envoy does).
    pub fn set_new_endpoint_health(&self, bits: u8) {
        self.new_endpoint_health.store(bits, Ordering::Relaxed);
    }

    /// A balancer over `specs`.
    pub fn with_endpoints(policy: LbPolicy, specs: Vec<EndpointSpec>) -> Self {
        let b = Balancer::new(policy);
        b.update(specs);
        b
    }

    /// The load-balancing policy.
    pub fn policy(&self) -> LbPolicy {
        self.settings.policy
    }

    /// The settings the balancer was made with.
    pub fn config(&self) -> &LbConfig {
        &self.settings.config
    }

    /// Picks one endpoint for a request that brings nothing (no hash, no
    /// subset), or `None` when there is none.
    #[inline]
    pub fn pick(&self) -> Option<Arc<Endpoint>> {
        self.pick_with(&PickContext::default())
    }

    /// Picks one endpoint for a request with a hash and/or subset.
    pub fn pick_with(&self, ctx: &PickContext<'_>) -> Option<Arc<Endpoint>> {
        let set = self.set.load();
        let s = &self.settings;
        let group = match &set.subsets {
            None => &set.root,
            Some(subsets) => match subsets.find(ctx.metadata_match) {
                Some(g) => g,
                None => match s.config.subset.as_ref().map(|c| c.fallback_policy) {
                    Some(SubsetFallback::AnyEndpoint) | None => &set.root,
                    Some(SubsetFallback::DefaultSubset) => subsets.default_group()?,
                    Some(SubsetFallback::NoFallback) => return None,
                },
            },
        };
        group.pick(s, ctx.hash).cloned()
    }

    /// The current endpoint set.
    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.set.load_full()
    }

    /// Recomputes priority loads, panic state and pick structures after an
    /// endpoint's [`HealthFlags`] changed (called by health checking and
    /// outlier detection).
    pub fn health_changed(&self) {
        let old = self.set.load_full();
        self.set.store(Arc::new(EndpointSet::build(
            old.endpoints.clone(),
            &self.settings,
        )));
    }

    /// Replaces the endpoint set. Endpoints whose address and attributes
    /// stay the same keep their `Arc<Endpoint>` (stats, health, latency).
    /// Returns whether anything changed.
    pub fn update(&self, specs: Vec<EndpointSpec>) -> bool {
        let old = self.set.load_full();
        let same = old.endpoints.len() == specs.len()
            && old.endpoints.iter().zip(&specs).all(|(e, s)| e.same(s));
        if same {
            // Only health reported by discovery may have changed.
            let mut changed = false;
            for (e, s) in old.endpoints.iter().zip(&specs) {
                changed |= e.apply_health_status(s.health_status);
            }
            if changed {
                self.health_changed();
            }
            return changed;
        }
        let mut by_addr: HashMap<SocketAddr, Vec<&Arc<Endpoint>>> = HashMap::new();
        for e in &old.endpoints {
            by_addr.entry(e.addr).or_default().push(e);
        }
        let endpoints = specs
            .into_iter()
            .map(|s| {
                let existing = by_addr.get_mut(&s.addr).and_then(|v| {
                    let i = v.iter().position(|e| e.same(&s))?;
                    Some(v.swap_remove(i))
                });
                match existing {
                    Some(e) => {
                        e.apply_health_status(s.health_status);
                        e.clone()
                    }
                    None => Arc::new(Endpoint::new(
                        s,
                        &self.settings.config,
                        self.new_endpoint_health.load(Ordering::Relaxed),
                    )),
                }
            })
            .collect();
        self.set
            .store(Arc::new(EndpointSet::build(endpoints, &self.settings)));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16, weight: u32, priority: u32) -> EndpointSpec {
        EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], port)))
            .with_weight(weight)
            .with_priority(priority)
    }

    #[test]
    fn round_robin_cycles_evenly() {
        let b = Balancer::with_endpoints(
            LbPolicy::RoundRobin,
            vec![spec(1, 1, 0), spec(2, 1, 0), spec(3, 1, 0)],
        );
        let ports: Vec<u16> = (0..6).map(|_| b.pick().unwrap().addr.port()).collect();
        // Starts anywhere (so that workers do not all start on the first
        // endpoint), then cycles.
        let start = ports[0];
        let expected: Vec<u16> = (0..6).map(|i| (start - 1 + i) % 3 + 1).collect();
        assert_eq!(ports, expected);
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_exact() {
        let b = Balancer::with_endpoints(LbPolicy::RoundRobin, vec![spec(1, 3, 0), spec(2, 1, 0)]);
        let ports: Vec<u16> = (0..8).map(|_| b.pick().unwrap().addr.port()).collect();
        // 3:1 with no two picks of the light endpoint in a row and no run of
        // more than 3 of the heavy one.
        assert_eq!(ports.iter().filter(|p| **p == 1).count(), 6);
        assert!(!ports.windows(2).any(|w| w == [2, 2]));
        assert!(!ports.windows(4).any(|w| w.iter().all(|p| *p == 1)));
    }

    #[test]
    fn weighted_random_follows_weights() {
        let b = Balancer::with_endpoints(LbPolicy::Random, vec![spec(1, 3, 0), spec(2, 1, 0)]);
        let n = 40_000;
        let ones = (0..n)
            .filter(|_| b.pick().unwrap().addr.port() == 1)
            .count();
        let share = ones as f64 / n as f64;
        assert!((0.72..0.78).contains(&share), "{share}");
    }

    #[test]
    fn highest_priority_level_serves() {
        let b = Balancer::with_endpoints(
            LbPolicy::RoundRobin,
            vec![spec(1, 1, 1), spec(2, 1, 0), spec(3, 1, 1)],
        );
        assert!((0..5).all(|_| b.pick().unwrap().addr.port() == 2));
    }

    #[test]
    fn update_keeps_surviving_endpoints() {
        let b = Balancer::with_endpoints(LbPolicy::RoundRobin, vec![spec(1, 1, 0), spec(2, 1, 0)]);
        let first = b.endpoints().endpoints[0].clone();
        first.stats.rq_total.add(7);
        assert!(b.update(vec![spec(1, 1, 0), spec(3, 1, 0)]));
        let set = b.endpoints();
        assert!(Arc::ptr_eq(&set.endpoints[0], &first));
        assert_eq!(set.endpoints[0].stats.rq_total.get(), 7);
        assert!(!b.update(vec![spec(1, 1, 0), spec(3, 1, 0)]));
        set.endpoints[0].health.set(HealthFlags::FAILED_ACTIVE_HC);
        b.health_changed();
        assert!((0..4).all(|_| b.pick().unwrap().addr.port() == 3));
        set.endpoints[1]
            .health
            .set(HealthFlags::FAILED_OUTLIER_CHECK);
        b.health_changed();
        let picked: std::collections::HashSet<u16> =
            (0..20).map(|_| b.pick().unwrap().addr.port()).collect();
        assert_eq!(picked.len(), 2, "all unhealthy: panic mode serves both");
        assert!(b.update(vec![]));
        assert!(b.pick().is_none());
    }
}
