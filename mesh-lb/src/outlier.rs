//! Outlier detection (passive health checking): endpoints that fail
//! requests are ejected from the pick schedule for a while.
//!
//! The data path reports each upstream attempt's [`Outcome`] with
//! [`OutlierDetector::report`]: a few relaxed atomic operations on the
//! endpoint's [`EndpointOutlier`]. When a consecutive-error counter reaches
//! its threshold the endpoint is ejected at once (Envoy ejects from the
//! main thread right after; the effect is the same). Success-rate and
//! failure-percentage ejection, and un-ejection, run every `interval` on the
//! detector's own task.
//!
//! Envoy's rules, kept here:
//!
//! - Without `split_external_local_origin_errors`, a connect failure or
//!   reset counts as a 503 and a timeout as a 504; with it, they feed the
//!   separate `consecutive_local_origin_failure` counter and the
//!   local-origin success rate.
//! - 502, 503 and 504 are gateway failures (`consecutive_gateway_failure`,
//!   enforced 0 % by default: detected and counted, not ejected).
//! - An ejection happens only while `ejections_active + 1` stays within
//!   `max_ejection_percent` of the cluster's endpoints (or, with
//!   `always_eject_one_host`, when none is ejected); otherwise
//!   `ejections_overflow` counts it. Each detection is enforced with its
//!   `enforcing_*` probability.
//! - An ejected endpoint returns after `base_ejection_time` × the number of
//!   times it was ejected in a row, at most `max_ejection_time`, checked at
//!   each interval. Each interval an endpoint stays in after that long
//!   lowers the multiplier by one.
//!
//! Stats are Envoy's `cluster.<name>.outlier_detection.*`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::config::OutlierDetection;
use mesh_core::stats::{Counter, Gauge, Store};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Balancer, Endpoint, HealthFlags};

/// The result of one upstream attempt, as the data path saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this HTTP status.
    Status(u16),
    /// The connection could not be made, or was reset or broke before a
    /// response (Envoy's `LOCAL_ORIGIN_CONNECT_FAILED`).
    ConnectFailed,
    /// No response in time (Envoy's `LOCAL_ORIGIN_TIMEOUT`).
    Timeout,
    /// Connected, and no further result will follow (a TCP proxy
    /// connection; Envoy's `LOCAL_ORIGIN_CONNECT_SUCCESS_FINAL`).
    ConnectSuccessFinal,
}

/// Why an endpoint is ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionKind {
    /// `consecutive_5xx`.
    Consecutive5xx,
    /// `consecutive_gateway_failure`.
    ConsecutiveGatewayFailure,
    /// `consecutive_local_origin_failure`.
    ConsecutiveLocalOriginFailure,
    /// Success rate below the cluster's mean minus the deviation factor.
    SuccessRate,
    /// Local-origin success rate.
    LocalOriginSuccessRate,
    /// Failure percentage at or above `failure_percentage_threshold`.
    FailurePercentage,
    /// Local-origin failure percentage.
    FailurePercentageLocalOrigin,
}

impl EjectionKind {
    const ALL: [EjectionKind; 7] = [
        EjectionKind::Consecutive5xx,
        EjectionKind::ConsecutiveGatewayFailure,
        EjectionKind::ConsecutiveLocalOriginFailure,
        EjectionKind::SuccessRate,
        EjectionKind::LocalOriginSuccessRate,
        EjectionKind::FailurePercentage,
        EjectionKind::FailurePercentageLocalOrigin,
    ];

    /// Envoy's stat suffix (`ejections_enforced_<name>`).
    pub fn name(self) -> &'static str {
        match self {
            EjectionKind::Consecutive5xx => "consecutive_5xx",
            EjectionKind::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectionKind::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            EjectionKind::SuccessRate => "success_rate",
            EjectionKind::LocalOriginSuccessRate => "local_origin_success_rate",
            EjectionKind::FailurePercentage => "failure_percentage",
            EjectionKind::FailurePercentageLocalOrigin => "failure_percentage_local_origin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The ejection history of one endpoint.
#[derive(Debug, Default, Clone, Copy)]
struct Ejection {
    /// Times ejected in total.
    num_ejections: u32,
    /// The multiplier of `base_ejection_time` for the current/next ejection.
    backoff: u32,
    last_ejection: Option<Instant>,
    last_unejection: Option<Instant>,
}

/// Per-endpoint outlier counters, written on the request path.
#[derive(Debug)]
pub struct EndpointOutlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    external_total: AtomicU32,
    external_success: AtomicU32,
    local_total: AtomicU32,
    local_success: AtomicU32,
    /// The last interval's external success rate (f64 bits; negative when
    /// not computed).
    success_rate: AtomicU64,
    /// The last interval's local-origin success rate.
    local_success_rate: AtomicU64,
    ejection: Mutex<Ejection>,
}

impl Default for EndpointOutlier {
    fn default() -> Self {
        EndpointOutlier {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            external_total: AtomicU32::new(0),
            external_success: AtomicU32::new(0),
            local_total: AtomicU32::new(0),
            local_success: AtomicU32::new(0),
            success_rate: AtomicU64::new((-1.0f64).to_bits()),
            local_success_rate: AtomicU64::new((-1.0f64).to_bits()),
            ejection: Mutex::new(Ejection::default()),
        }
    }
}

impl EndpointOutlier {
    /// The success rate (percent) computed at the last interval, or -1 when
    /// the endpoint did not have `success_rate_request_volume` requests.
    pub fn success_rate(&self) -> f64 {
        f64::from_bits(self.success_rate.load(Ordering::Relaxed))
    }

    /// The local-origin success rate at the last interval, or -1.
    pub fn local_origin_success_rate(&self) -> f64 {
        f64::from_bits(self.local_success_rate.load(Ordering::Relaxed))
    }

    /// How many times the endpoint has been ejected.
    pub fn num_ejections(&self) -> u32 {
        self.lock().num_ejections
    }

    /// When the endpoint was last ejected.
    pub fn last_ejection(&self) -> Option<Instant> {
        self.lock().last_ejection
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ejection> {
        self.ejection.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }
}

/// Envoy's `cluster.<name>.outlier_detection.*` stats.
#[derive(Debug, Clone)]
pub struct OutlierStats {
    /// `ejections_active` (gauge).
    pub ejections_active: Gauge,
    /// `ejections_overflow`: ejections refused by `max_ejection_percent`.
    pub ejections_overflow: Counter,
    /// `ejections_enforced_total`.
    pub ejections_enforced_total: Counter,
    /// `ejections_total` (deprecated in Envoy; consecutive 5xx and success
    /// rate detections within the percentage limit).
    pub ejections_total: Counter,
    /// `ejections_consecutive_5xx` (deprecated in Envoy).
    pub ejections_consecutive_5xx: Counter,
    /// `ejections_enforced_<kind>`, by [`EjectionKind`].
    pub enforced: [Counter; 7],
    /// `ejections_detected_<kind>`, by [`EjectionKind`].
    pub detected: [Counter; 7],
}

impl OutlierStats {
    /// The stats of cluster `cluster` in `store`.
    pub fn new(store: &Store, cluster: &str) -> Self {
        let l = [("envoy_cluster_name", cluster.to_owned())];
        let c = |n: &str| store.counter(&format!("envoy_cluster_outlier_detection_{n}"), &l);
        OutlierStats {
            ejections_active: store.gauge("envoy_cluster_outlier_detection_ejections_active", &l),
            ejections_overflow: c("ejections_overflow"),
            ejections_enforced_total: c("ejections_enforced_total"),
            ejections_total: c("ejections_total"),
            ejections_consecutive_5xx: c("ejections_consecutive_5xx"),
            enforced: EjectionKind::ALL.map(|k| c(&format!("ejections_enforced_{}", k.name()))),
            detected: EjectionKind::ALL.map(|k| c(&format!("ejections_detected_{}", k.name()))),
        }
    }
}

/// Outlier detection of one cluster.
#[derive(Debug)]
pub struct OutlierDetector {
    cluster: String,
    config: OutlierDetection,
    balancer: Arc<Balancer>,
    stats: OutlierStats,
    /// Serializes ejection decisions (the percentage limit reads and
    /// updates `ejections_active`).
    decide: Mutex<()>,
    /// The last interval's mean success rate and ejection threshold (f64
    /// bits; -1 when not computed), for `/clusters`.
    success_rate_average: AtomicU64,
    success_rate_threshold: AtomicU64,
}

fn is_gateway_error(code: u16) -> bool {
    matches!(code, 502..=504)
}

impl OutlierDetector {
    /// A detector for cluster `cluster` over `balancer`'s endpoints.
    pub fn new(
        cluster: &str,
        config: OutlierDetection,
        balancer: Arc<Balancer>,
        stats: OutlierStats,
    ) -> Self {
        OutlierDetector {
            cluster: cluster.to_owned(),
            config,
            balancer,
            stats,
            decide: Mutex::new(()),
            success_rate_average: AtomicU64::new((-1.0f64).to_bits()),
            success_rate_threshold: AtomicU64::new((-1.0f64).to_bits()),
        }
    }

    /// The stats.
    pub fn stats(&self) -> &OutlierStats {
        &self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &OutlierDetection {
        &self.config
    }

    /// The mean success rate of the last interval, or -1.
    pub fn success_rate_average(&self) -> f64 {
        f64::from_bits(self.success_rate_average.load(Ordering::Relaxed))
    }

    /// The success-rate ejection threshold of the last interval, or -1.
    pub fn success_rate_ejection_threshold(&self) -> f64 {
        f64::from_bits(self.success_rate_threshold.load(Ordering::Relaxed))
    }

    /// Records the outcome of one attempt to `endpoint`. Cheap: relaxed
    /// atomics, plus an ejection when a consecutive-error threshold is hit.
    pub fn report(&self, endpoint: &Endpoint, outcome: Outcome) {
        let o = &endpoint.outlier;
        if self.config.split_external_local_origin_errors {
            match outcome {
                Outcome::ConnectFailed | Outcome::Timeout => {
                    o.local_total.fetch_add(1, Ordering::Relaxed);
                    let n = o.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == self.config.consecutive_local_origin_failure {
                        self.detected(endpoint, EjectionKind::ConsecutiveLocalOriginFailure);
                    }
                }
                Outcome::ConnectSuccessFinal => self.local_success(o),
                Outcome::Status(code) => {
                    // A response means the connection was made.
                    self.local_success(o);
                    self.put_status(endpoint, code);
                }
            }
        } else {
            let code = match outcome {
                Outcome::Status(code) => code,
                Outcome::ConnectFailed => 503,
                Outcome::Timeout => 504,
                Outcome::ConnectSuccessFinal => 200,
            };
            self.put_status(endpoint, code);
        }
    }

    fn local_success(&self, o: &EndpointOutlier) {
        o.local_total.fetch_add(1, Ordering::Relaxed);
        o.local_success.fetch_add(1, Ordering::Relaxed);
        if o.consecutive_local.load(Ordering::Relaxed) != 0 {
            o.consecutive_local.store(0, Ordering::Relaxed);
        }
    }

    fn put_status(&self, endpoint: &Endpoint, code: u16) {
        let o = &endpoint.outlier;
        o.external_total.fetch_add(1, Ordering::Relaxed);
        if (500..600).contains(&code) {
            if is_gateway_error(code) {
                let n = o.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
                if n == self.config.consecutive_gateway_failure {
                    self.detected(endpoint, EjectionKind::ConsecutiveGatewayFailure);
                }
            } else if o.consecutive_gateway.load(Ordering::Relaxed) != 0 {
                o.consecutive_gateway.store(0, Ordering::Relaxed);
            }
            let n = o.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            if n == self.config.consecutive_5xx {
                self.detected(endpoint, EjectionKind::Consecutive5xx);
            }
        } else {
            o.external_success.fetch_add(1, Ordering::Relaxed);
            if o.consecutive_5xx.load(Ordering::Relaxed) != 0 {
                o.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            if o.consecutive_gateway.load(Ordering::Relaxed) != 0 {
                o.consecutive_gateway.store(0, Ordering::Relaxed);
            }
        }
    }

    /// A detection: counts it, ejects if allowed, and restarts the counter
    /// that fired.
    fn detected(&self, endpoint: &Endpoint, kind: EjectionKind) {
        let _g = self.decide.lock().unwrap_or_else(|e| e.into_inner());
        let o = &endpoint.outlier;
        match kind {
            EjectionKind::Consecutive5xx => o.consecutive_5xx.store(0, Ordering::Relaxed),
            EjectionKind::ConsecutiveGatewayFailure => {
                o.consecutive_gateway.store(0, Ordering::Relaxed)
            }
            EjectionKind::ConsecutiveLocalOriginFailure => {
                o.consecutive_local.store(0, Ordering::Relaxed)
            }
            _ => {}
        }
        if endpoint.health.has(HealthFlags::FAILED_OUTLIER_CHECK) {
            return;
        }
        self.stats.detected[kind.index()].inc();
        if kind == EjectionKind::Consecutive5xx {
            self.stats.ejections_consecutive_5xx.inc();
        }
        self.eject(endpoint, kind, Instant::now());
    }

    fn enforcing(&self, kind: EjectionKind) -> u32 {
        let c = &self.config;
        match kind {
            EjectionKind::Consecutive5xx => c.enforcing_consecutive_5xx,
            EjectionKind::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            EjectionKind::ConsecutiveLocalOriginFailure => {
                c.enforcing_consecutive_local_origin_failure
            }
            EjectionKind::SuccessRate => c.enforcing_success_rate,
            EjectionKind::LocalOriginSuccessRate => c.enforcing_local_origin_success_rate,
            EjectionKind::FailurePercentage => c.enforcing_failure_percentage,
            EjectionKind::FailurePercentageLocalOrigin => {
                c.enforcing_failure_percentage_local_origin
            }
        }
    }

    /// Ejects `endpoint` if the percentage limit and the enforcement
    /// probability allow. The caller holds `decide`.
    fn eject(&self, endpoint: &Endpoint, kind: EjectionKind, now: Instant) {
        // Counted from the current set, so endpoints that discovery removed
        // while ejected no longer count.
        let set = self.balancer.endpoints();
        let total = set.endpoints.len().max(1) as f64;
        let active = set
            .endpoints
            .iter()
            .filter(|e| e.health.has(HealthFlags::FAILED_OUTLIER_CHECK))
            .count() as f64;
        let percent = 100.0 * (active + 1.0) / total;
        let allowed = percent <= f64::from(self.config.max_ejection_percent)
            || (self.config.always_eject_one_host && active == 0.0);
        if !allowed {
            self.stats.ejections_overflow.inc();
            return;
        }
        if matches!(
            kind,
            EjectionKind::Consecutive5xx | EjectionKind::SuccessRate
        ) {
            self.stats.ejections_total.inc();
        }
        let enforce = self.enforcing(kind);
        if enforce == 0 || (enforce < 100 && fastrand::u32(0..100) >= enforce) {
            tracing::debug!(cluster = %self.cluster, endpoint = %endpoint.addr, kind = kind.name(), "outlier detected, not enforced");
            return;
        }
        {
            let mut e = endpoint.outlier.lock();
            e.num_ejections += 1;
            let base = self.config.base_ejection_time;
            if base.saturating_mul(e.backoff) < self.config.max_ejection_time + base {
                e.backoff += 1;
            }
            e.last_ejection = Some(now);
        }
        endpoint.health.set(HealthFlags::FAILED_OUTLIER_CHECK);
        self.stats.ejections_active.set(active as i64 + 1);
        self.stats.ejections_enforced_total.inc();
        self.stats.enforced[kind.index()].inc();
        tracing::info!(cluster = %self.cluster, endpoint = %endpoint.addr, kind = kind.name(), "outlier ejected");
        self.balancer.health_changed();
    }

    /// Returns an ejected endpoint to service; the caller holds `decide`.
    fn uneject(&self, endpoint: &Endpoint, now: Instant) {
        if endpoint.health.clear(HealthFlags::FAILED_OUTLIER_CHECK) {
            self.stats
                .ejections_active
                .set((self.stats.ejections_active.get() - 1).max(0));
            endpoint.outlier.reset_consecutive();
            endpoint.outlier.lock().last_unejection = Some(now);
            tracing::info!(cluster = %self.cluster, endpoint = %endpoint.addr, "outlier returned to service");
            self.balancer.health_changed();
        }
    }

    /// Returns an ejected endpoint because an active health check passed
    /// (with `successful_active_health_check_uneject_host`, the default).
    pub fn health_check_passed(&self, endpoint: &Endpoint) {
        if self.config.successful_active_health_check_uneject_host
            && endpoint.health.has(HealthFlags::FAILED_OUTLIER_CHECK)
        {
            let _g = self.decide.lock().unwrap_or_else(|e| e.into_inner());
            self.uneject(endpoint, Instant::now());
        }
    }

    /// Runs the interval timer on the current runtime until `stop` fires.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = stop.cancelled() => return,
            }
            self.on_interval(Instant::now());
        }
    }

    /// One interval: returns endpoints whose ejection time has passed, then
    /// runs the success-rate and failure-percentage checks over the
    /// interval's counts and starts new counts.
    pub fn on_interval(&self, now: Instant) {
        let set = self.balancer.endpoints();
        let _g = self.decide.lock().unwrap_or_else(|e| e.into_inner());
        let base = self.config.base_ejection_time;
        for e in &set.endpoints {
            if !e.health.has(HealthFlags::FAILED_OUTLIER_CHECK) {
                let mut st = e.outlier.lock();
                if st.backoff > 0
                    && st
                        .last_unejection
                        .is_some_and(|t| now.duration_since(t) >= base)
                {
                    st.backoff -= 1;
                }
                continue;
            }
            let due = {
                let st = e.outlier.lock();
                let time = base
                    .saturating_mul(st.backoff.max(1))
                    .min(self.config.max_ejection_time);
                st.last_ejection
                    .is_none_or(|t| now.duration_since(t) >= time)
            };
            if due {
                self.uneject(e, now);
            }
        }
        let ejected = set
            .endpoints
            .iter()
            .filter(|e| e.health.has(HealthFlags::FAILED_OUTLIER_CHECK))
            .count();
        self.stats.ejections_active.set(ejected as i64);
        // Swap the interval's counts out.
        let counts: Vec<(&Arc<Endpoint>, u32, u32, u32, u32)> = set
            .endpoints
            .iter()
            .map(|e| {
                let o = &e.outlier;
                (
                    e,
                    o.external_success.swap(0, Ordering::Relaxed),
                    o.external_total.swap(0, Ordering::Relaxed),
                    o.local_success.swap(0, Ordering::Relaxed),
                    o.local_total.swap(0, Ordering::Relaxed),
                )
            })
            .collect();
        let external: Vec<(&Arc<Endpoint>, u32, u32)> =
            counts.iter().map(|c| (c.0, c.1, c.2)).collect();
        self.rate_checks(&external, false, now);
        if self.config.split_external_local_origin_errors {
            let local: Vec<(&Arc<Endpoint>, u32, u32)> =
                counts.iter().map(|c| (c.0, c.3, c.4)).collect();
            self.rate_checks(&local, true, now);
        }
    }

    fn rate_checks(&self, counts: &[(&Arc<Endpoint>, u32, u32)], local: bool, now: Instant) {
        let c = &self.config;
        let rate = |s: u32, t: u32| 100.0 * f64::from(s) / f64::from(t);
        // Success rate.
        let valid: Vec<(&Arc<Endpoint>, f64)> = counts
            .iter()
            .filter(|(e, _, t)| {
                *t > 0
                    && *t >= c.success_rate_request_volume
                    && !e.health.has(HealthFlags::FAILED_OUTLIER_CHECK)
            })
            .map(|(e, s, t)| (*e, rate(*s, *t)))
            .collect();
        for (e, s, t) in counts {
            let r = if *t > 0 && *t >= c.success_rate_request_volume {
                rate(*s, *t)
            } else {
                -1.0
            };
            let slot = if local {
                &e.outlier.local_success_rate
            } else {
                &e.outlier.success_rate
            };
            slot.store(r.to_bits(), Ordering::Relaxed);
        }
        let (avg, threshold) = if !valid.is_empty()
            && valid.len() >= c.success_rate_minimum_hosts as usize
        {
            let n = valid.len() as f64;
            let mean = valid.iter().map(|v| v.1).sum::<f64>() / n;
            let var = valid.iter().map(|v| (v.1 - mean).powi(2)).sum::<f64>() / n;
            let threshold = mean - var.sqrt() * (f64::from(c.success_rate_stdev_factor) / 1000.0);
            (mean, threshold)
        } else {
            (-1.0, -1.0)
        };
        if !local {
            self.success_rate_average
                .store(avg.to_bits(), Ordering::Relaxed);
            self.success_rate_threshold
                .store(threshold.to_bits(), Ordering::Relaxed);
        }
        if avg >= 0.0 {
            let kind = if local {
                EjectionKind::LocalOriginSuccessRate
            } else {
                EjectionKind::SuccessRate
            };
            for (e, r) in &valid {
                if *r < threshold && !e.health.has(HealthFlags::FAILED_OUTLIER_CHECK) {
                    self.stats.detected[kind.index()].inc();
                    self.eject(e, kind, now);
                }
            }
        }
        // Failure percentage.
        let valid: Vec<(&Arc<Endpoint>, f64)> = counts
            .iter()
            .filter(|(e, _, t)| {
                *t > 0
                    && *t >= c.failure_percentage_request_volume
                    && !e.health.has(HealthFlags::FAILED_OUTLIER_CHECK)
            })
            .map(|(e, s, t)| (*e, rate(*s, *t)))
            .collect();
        if !valid.is_empty() && valid.len() >= c.failure_percentage_minimum_hosts as usize {
            let kind = if local {
                EjectionKind::FailurePercentageLocalOrigin
            } else {
                EjectionKind::FailurePercentage
            };
            for (e, r) in valid {
                if 100.0 - r >= f64::from(c.failure_percentage_threshold)
                    && !e.health.has(HealthFlags::FAILED_OUTLIER_CHECK)
                {
                    self.stats.detected[kind.index()].inc();
                    self.eject(e, kind, now);
                }
            }
        }
    }

    /// The ejection time the endpoint's next (or current) ejection lasts.
    pub fn ejection_time(&self, endpoint: &Endpoint) -> Duration {
        let backoff = endpoint.outlier.lock().backoff.max(1);
        self.config
            .base_ejection_time
            .saturating_mul(backoff)
            .min(self.config.max_ejection_time)
    }
}

#[cfg(test)]
mod tests;
