//! mesh-lb: from a changing set of endpoints to one endpoint per request.
//!
//! - [`Endpoint`]: one upstream address with its weight, locality, priority
//!   and live stats (active requests, totals, connect failures); the same
//!   `Arc<Endpoint>` survives endpoint-set updates that keep its address, so
//!   its stats (and, later, its health and latency state) are not reset.
//! - [`Balancer`]: picks an endpoint. Round robin is *smooth* weighted round
//!   robin (nginx's algorithm, precomputed into a schedule), so uneven
//!   weights interleave instead of bursting to one endpoint; picking is one
//!   atomic increment. Random is weighted random over the same schedule.
//!   Only the highest priority level that has endpoints is used (priority
//!   spill-over by health arrives with health checking).
//! - [`dns`]: STRICT_DNS and LOGICAL_DNS discovery that feeds a balancer.
//!
//! The balancer is read-copy-update: an update builds a new endpoint set and
//! swaps it in; picks in flight keep the set they started with.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dns;
pub mod health;
pub mod health_check;
pub mod outlier;

pub use health::HealthFlags;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::config::{LbPolicy, Locality};
use mesh_core::stats::{Counter, Gauge};

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
    /// Live counters.
    pub stats: EndpointStats,
    /// Health flags (active health checking, outlier detection, discovery).
    pub health: HealthFlags,
    /// Outlier-detection counters, updated on the request path.
    pub outlier: outlier::EndpointOutlier,
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
}

/// An immutable set of endpoints with its pick schedule.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// Every endpoint, all priorities.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Indices into `endpoints`, in smooth-WRR order, for the priority level in use.
    schedule: Vec<u32>,
}

/// The longest schedule we precompute; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 1 << 14;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl EndpointSet {
    fn build(endpoints: Vec<Arc<Endpoint>>) -> Self {
        // Healthy endpoints of the highest priority level that has any; when
        // none is healthy anywhere, every endpoint (panic mode).
        let any_healthy = endpoints.iter().any(|e| e.health.is_healthy());
        let usable = |e: &Endpoint| !any_healthy || e.health.is_healthy();
        let Some(top) = endpoints
            .iter()
            .filter(|e| usable(e))
            .map(|e| e.priority)
            .min()
        else {
            return EndpointSet {
                endpoints,
                schedule: Vec::new(),
            };
        };
        let level: Vec<(usize, u64)> = endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.priority == top && usable(e))
            .map(|(i, e)| (i, u64::from(e.weight.max(1))))
            .collect();
        let g = level.iter().fold(0, |g, (_, w)| gcd(g, *w));
        let mut weights: Vec<u64> = level.iter().map(|(_, w)| w / g.max(1)).collect();
        let sum: u64 = weights.iter().sum();
        if sum > MAX_SCHEDULE {
            let scale = sum as f64 / MAX_SCHEDULE as f64;
            for w in &mut weights {
                *w = ((*w as f64 / scale).round() as u64).max(1);
            }
        }
        let total: i64 = weights.iter().sum::<u64>() as i64;
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (j, w) in weights.iter().enumerate() {
                current[j] += *w as i64;
                if current[j] > current[best] {
                    best = j;
                }
            }
            current[best] -= total;
            schedule.push(level[best].0 as u32);
        }
        EndpointSet {
            endpoints,
            schedule,
        }
    }

    /// True when no endpoint can be picked.
    pub fn is_empty(&self) -> bool {
        self.schedule.is_empty()
    }
}

/// Picks endpoints by a policy over a swappable endpoint set.
#[derive(Debug)]
pub struct Balancer {
    policy: LbPolicy,
    set: ArcSwap<EndpointSet>,
    next: AtomicUsize,
    /// [`HealthFlags`] bits that endpoints added by [`Balancer::update`]
    /// start with (`/failed_active_hc` when the cluster is health checked).
    new_endpoint_health: AtomicU8,
}

impl Balancer {
    /// A balancer with no endpoints yet.
    pub fn new(policy: LbPolicy) -> Self {
        Balancer {
            policy,
            set: ArcSwap::from_pointee(EndpointSet::default()),
            next: AtomicUsize::new(0),
            new_endpoint_health: AtomicU8::new(0),
        }
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
        self.policy
    }

    /// Picks one endpoint, or `None` when there is none.
    #[inline]
    pub fn pick(&self) -> Option<Arc<Endpoint>> {
        let set = self.set.load();
        let len = set.schedule.len();
        if len == 0 {
            return None;
        }
        let slot = match self.policy {
            LbPolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % len,
            LbPolicy::Random => fastrand::usize(0..len),
        };
        Some(set.endpoints[set.schedule[slot] as usize].clone())
    }

    /// The current endpoint set.
    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.set.load_full()
    }

    /// Recomputes the pick schedule after an endpoint's [`HealthFlags`]
    /// changed (called by health checking and outlier detection).
    pub fn health_changed(&self) {
        let old = self.set.load_full();
        self.set
            .store(Arc::new(EndpointSet::build(old.endpoints.clone())));
    }

    /// Replaces the endpoint set. Endpoints whose address and metadata stay
    /// the same keep their `Arc<Endpoint>` (and stats). Returns whether
    /// anything changed.
    pub fn update(&self, specs: Vec<EndpointSpec>) -> bool {
        let old = self.set.load_full();
        let same = old.endpoints.len() == specs.len()
            && old.endpoints.iter().zip(&specs).all(|(e, s)| {
                e.addr == s.addr
                    && e.weight == s.weight.max(1)
                    && e.priority == s.priority
                    && e.locality == s.locality
                    && e.hostname == s.hostname
            });
        if same {
            return false;
        }
        let endpoints = specs
            .into_iter()
            .map(|s| {
                let existing = old.endpoints.iter().find(|e| {
                    e.addr == s.addr
                        && e.weight == s.weight.max(1)
                        && e.priority == s.priority
                        && e.locality == s.locality
                        && e.hostname == s.hostname
                });
                match existing {
                    Some(e) => e.clone(),
                    None => Arc::new(Endpoint {
                        addr: s.addr,
                        hostname: s.hostname,
                        weight: s.weight.max(1),
                        priority: s.priority,
                        locality: s.locality,
                        stats: EndpointStats::default(),
                        health: HealthFlags::new(self.new_endpoint_health.load(Ordering::Relaxed)),
                        outlier: Default::default(),
                    }),
                }
            })
            .collect();
        self.set.store(Arc::new(EndpointSet::build(endpoints)));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16, weight: u32, priority: u32) -> EndpointSpec {
        EndpointSpec {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            hostname: "127.0.0.1".into(),
            weight,
            priority,
            locality: Locality::default(),
        }
    }

    #[test]
    fn round_robin_cycles_evenly() {
        let b = Balancer::with_endpoints(
            LbPolicy::RoundRobin,
            vec![spec(1, 1, 0), spec(2, 1, 0), spec(3, 1, 0)],
        );
        let ports: Vec<u16> = (0..6).map(|_| b.pick().unwrap().addr.port()).collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3]);
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
        assert_eq!(b.endpoints().schedule.len(), 2, "all unhealthy: panic mode");
        assert!(b.update(vec![]));
        assert!(b.pick().is_none());
    }
}
