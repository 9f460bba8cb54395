//! Circuit breakers: Envoy's per-cluster, per-priority resource limits
//! (`circuit_breakers.thresholds`).
//!
//! Why limits and not error-rate breakers? A limit on what is *in flight*
//! (connections, pending requests, requests, retries) stops a slow upstream
//! from absorbing every worker's resources the moment it slows down, with no
//! tuning of error windows; a request over a limit fails fast with 503 and
//! `x-envoy-overloaded: true` (response flag `UO`) instead of queueing.
//!
//! Each [`Resource`] is an atomic count shared by every worker thread (one
//! count per cluster and priority, never per thread), compared with its
//! maximum before an increment: the check and the increment are two atomic
//! operations, so concurrent callers may overshoot a limit by the number of
//! threads racing on it, as in Envoy. No lock is taken.
//!
//! The count of a resource is itself a stats gauge (for `requests` it is the
//! cluster's `upstream_rq_active`), so a permit costs one atomic add and one
//! subtract. Each resource also keeps Envoy's `circuit_breakers.<priority>.
//! <resource>_open` gauge (1 while the resource is at its limit) and, with
//! `track_remaining`, the `remaining_<resource>` gauge.
//!
//! The retry resource is special: with a `retry_budget` its limit is not a
//! constant but `max(min_retry_concurrency, budget_percent × (active
//! requests + pending requests))`, recomputed at each check.

use std::sync::Arc;

use mesh_core::policy::{RetryBudget, Thresholds};
use mesh_core::stats::{Counter, Gauge, Store};

/// One limited resource: a shared count and its maximum.
#[derive(Debug)]
pub struct Resource {
    max: u64,
    count: Gauge,
    open: Gauge,
    remaining: Option<Gauge>,
}

impl Resource {
    /// A resource limited to `max`, counting in `count`, reporting the open
    /// state in `open` and (optionally) the room left in `remaining`.
    pub fn new(max: u64, count: Gauge, open: Gauge, remaining: Option<Gauge>) -> Arc<Self> {
        if let Some(r) = &remaining {
            r.set(max as i64);
        }
        Arc::new(Resource {
            max,
            count,
            open,
            remaining,
        })
    }

    /// A resource with private gauges (for use outside a stats store).
    pub fn unregistered(max: u64) -> Arc<Self> {
        Resource::new(max, Gauge::default(), Gauge::default(), None)
    }

    /// The maximum.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// How many are in use.
    #[inline]
    pub fn count(&self) -> u64 {
        self.count.get().max(0) as u64
    }

    /// Whether one more may be taken under `max`.
    #[inline]
    pub fn can_create_under(&self, max: u64) -> bool {
        self.count() < max
    }

    /// Whether one more may be taken.
    #[inline]
    pub fn can_create(&self) -> bool {
        self.can_create_under(self.max)
    }

    /// Takes one unconditionally (the caller checked, or the resource is
    /// only counted); released when the permit drops.
    #[inline]
    pub fn acquire(self: &Arc<Self>) -> Permit {
        self.acquire_under(self.max)
    }

    fn acquire_under(self: &Arc<Self>, max: u64) -> Permit {
        let now = self.count.add_get(1);
        if now as u64 >= max {
            self.open.set(1);
        }
        if let Some(r) = &self.remaining {
            r.set(max.saturating_sub(now.max(0) as u64) as i64);
        }
        Permit(Some(self.clone()))
    }

    /// Takes one if under the limit.
    #[inline]
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.can_create().then(|| self.acquire())
    }

    fn release(&self) {
        let now = self.count.add_get(-1);
        if (now.max(0) as u64) < self.max && self.open.get() != 0 {
            self.open.set(0);
        }
        if let Some(r) = &self.remaining {
            r.set(self.max.saturating_sub(now.max(0) as u64) as i64);
        }
    }
}

/// One unit of a [`Resource`], given back on drop.
#[derive(Debug)]
pub struct Permit(Option<Arc<Resource>>);

impl Permit {
    /// A permit of no resource (nothing to give back).
    pub fn none() -> Self {
        Permit(None)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.release();
        }
    }
}

/// The resources of one cluster at one priority (Envoy's
/// `ResourceManager`).
#[derive(Debug)]
pub struct ResourceManager {
    /// `max_connections`: upstream connections.
    pub connections: Arc<Resource>,
    /// `max_pending_requests`: requests waiting for a connection.
    pub pending_requests: Arc<Resource>,
    /// `max_requests`: requests in flight.
    pub requests: Arc<Resource>,
    /// `max_retries` (or the retry budget): retries in flight.
    pub retries: Arc<Resource>,
    /// `max_connection_pools`.
    pub connection_pools: Arc<Resource>,
    budget: Option<RetryBudget>,
}

/// The gauges one [`ResourceManager`] counts in, so that a resource count
/// is also a stat (e.g. the cluster's `upstream_rq_active`).
#[derive(Debug, Clone, Default)]
pub struct ResourceGauges {
    /// Active connections (`upstream_cx_active`).
    pub connections: Gauge,
    /// Pending requests (`upstream_rq_pending_active`).
    pub pending_requests: Gauge,
    /// Active requests (`upstream_rq_active`).
    pub requests: Gauge,
    /// Active retries.
    pub retries: Gauge,
    /// Connection pools.
    pub connection_pools: Gauge,
}

impl ResourceManager {
    /// Builds the resources of `t`, counting in `gauges`, with Envoy's
    /// `circuit_breakers.<priority>.*` gauges registered in `store` under
    /// the cluster `cluster` (when given).
    pub fn new(t: &Thresholds, gauges: ResourceGauges, stats: Option<(&Store, &str)>) -> Self {
        let prio = t.priority.as_str();
        let make = |max: u64, count: Gauge, open: &str, remaining: &str| {
            let (open_g, rem_g) = match stats {
                Some((store, cluster)) => {
                    let l = vec![("envoy_cluster_name", cluster.to_owned())];
                    let open_g =
                        store.gauge(&format!("envoy_cluster_circuit_breakers_{prio}_{open}"), &l);
                    let rem_g = t.track_remaining.then(|| {
                        store.gauge(
                            &format!("envoy_cluster_circuit_breakers_{prio}_{remaining}"),
                            &l,
                        )
                    });
                    (open_g, rem_g)
                }
                None => (Gauge::default(), None),
            };
            Resource::new(max, count, open_g, rem_g)
        };
        ResourceManager {
            connections: make(
                t.max_connections,
                gauges.connections,
                "cx_open",
                "remaining_cx",
            ),
            pending_requests: make(
                t.max_pending_requests,
                gauges.pending_requests,
                "rq_pending_open",
                "remaining_pending",
            ),
            requests: make(t.max_requests, gauges.requests, "rq_open", "remaining_rq"),
            retries: make(
                t.max_retries,
                gauges.retries,
                "rq_retry_open",
                "remaining_retries",
            ),
            connection_pools: make(
                t.max_connection_pools.unwrap_or(u64::MAX),
                gauges.connection_pools,
                "cx_pool_open",
                "remaining_cx_pools",
            ),
            budget: t.retry_budget,
        }
    }

    /// Envoy's default thresholds with private gauges.
    pub fn unregistered(t: &Thresholds) -> Self {
        ResourceManager::new(t, ResourceGauges::default(), None)
    }

    /// How many retries may be in flight now: `max_retries`, or with a
    /// retry budget `max(min_retry_concurrency, budget_percent × (active +
    /// pending requests))`.
    pub fn max_retries_now(&self) -> u64 {
        match self.budget {
            None => self.retries.max,
            Some(b) => {
                let base = self.requests.count() + self.pending_requests.count();
                let budget = (base as f64 * b.budget_percent / 100.0) as u64;
                budget.max(u64::from(b.min_retry_concurrency))
            }
        }
    }

    /// A retry permit if the retry limit (or budget) allows one more retry.
    pub fn try_retry(&self) -> Option<Permit> {
        let max = self.max_retries_now();
        self.retries
            .can_create_under(max)
            .then(|| self.retries.acquire_under(max))
    }
}

/// Counters a retrying caller reports to (Envoy's cluster retry stats).
#[derive(Debug, Clone, Default)]
pub struct RetryStats {
    /// `upstream_rq_retry`: retries made.
    pub retry: Counter,
    /// `upstream_rq_retry_success`: requests that succeeded after a retry.
    pub retry_success: Counter,
    /// `upstream_rq_retry_overflow`: retries refused by the retry limit or
    /// budget.
    pub retry_overflow: Counter,
    /// `upstream_rq_retry_limit_exceeded`: retriable failures with no retry
    /// left.
    pub retry_limit_exceeded: Counter,
    /// `upstream_rq_retry_backoff_exponential`: retries that waited a
    /// back-off.
    pub retry_backoff_exponential: Counter,
}

impl RetryStats {
    /// Registers the stats of cluster `cluster`.
    pub fn new(store: &Store, cluster: &str) -> Self {
        let l = vec![("envoy_cluster_name", cluster.to_owned())];
        RetryStats {
            retry: store.counter("envoy_cluster_upstream_rq_retry", &l),
            retry_success: store.counter("envoy_cluster_upstream_rq_retry_success", &l),
            retry_overflow: store.counter("envoy_cluster_upstream_rq_retry_overflow", &l),
            retry_limit_exceeded: store
                .counter("envoy_cluster_upstream_rq_retry_limit_exceeded", &l),
            retry_backoff_exponential: store
                .counter("envoy_cluster_upstream_rq_retry_backoff_exponential", &l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_refuses_past_its_maximum_and_reports_open() {
        let r = Resource::unregistered(2);
        let a = r.try_acquire().unwrap();
        let b = r.try_acquire().unwrap();
        assert!(r.try_acquire().is_none());
        assert_eq!(r.open.get(), 1);
        drop(a);
        assert_eq!(r.open.get(), 0);
        let _c = r.try_acquire().unwrap();
        drop(b);
        assert_eq!(r.count(), 1);
    }

    #[test]
    fn the_retry_budget_scales_with_active_requests() {
        let t = Thresholds {
            retry_budget: Some(RetryBudget {
                budget_percent: 20.0,
                min_retry_concurrency: 1,
            }),
            ..Thresholds::default()
        };
        let m = ResourceManager::unregistered(&t);
        // No traffic: the floor.
        assert_eq!(m.max_retries_now(), 1);
        let active: Vec<_> = (0..20).map(|_| m.requests.acquire()).collect();
        assert_eq!(m.max_retries_now(), 4);
        let retries: Vec<_> = (0..4).map(|_| m.try_retry().unwrap()).collect();
        assert!(m.try_retry().is_none());
        drop(retries);
        drop(active);
        assert_eq!(m.max_retries_now(), 1);
    }

    #[test]
    fn without_a_budget_max_retries_applies() {
        let m = ResourceManager::unregistered(&Thresholds::default());
        let held: Vec<_> = (0..3).map(|_| m.try_retry().unwrap()).collect();
        assert!(m.try_retry().is_none());
        drop(held);
        assert!(m.try_retry().is_some());
    }
}
