//! Active health checking: one [`HealthChecker`] per cluster probes every
//! endpoint on a timer and flips [`HealthFlags::FAILED_ACTIVE_HC`].
//!
//! The checker is protocol-neutral: what a probe does (an HTTP GET, a TCP
//! connect with send/receive bytes, a gRPC `Health/Check`) is a [`Probe`]
//! supplied by the caller, so a Rust program can health check its own
//! endpoints without the proxy. `mesh-bin` provides the HTTP, TCP and gRPC
//! probes.
//!
//! State machine of one endpoint (Envoy's semantics):
//!
//! ```text
//!             first probe passes, or healthy_threshold passes in a row
//!   unhealthy ───────────────────────────────────────────────────────► healthy
//!   (FAILED_ACTIVE_HC)                                                     │
//!       ▲   a failure the endpoint reports (bad status, NOT_SERVING,       │
//!       │   wrong TCP reply): at once; unhealthy_threshold network          │
//!       └───── failures (timeout, refused) in a row ────────────────────────┘
//! ```
//!
//! - Endpoints start unhealthy (`/failed_active_hc`) until their first
//!   probe: those present at start, and those that a later endpoint-set
//!   update adds (DNS, EDS), exactly as Envoy marks new hosts when a cluster
//!   has a health checker. An endpoint that stays across updates keeps its
//!   state (the balancer keeps its `Arc<Endpoint>`).
//! - The next probe comes after `interval` (healthy), `unhealthy_interval`
//!   (unhealthy), or the edge intervals while a threshold is being counted;
//!   `no_traffic_interval` while the cluster has not carried any request;
//!   plus `interval_jitter` and `interval_jitter_percent` at random. The very
//!   first probe waits a random part of `initial_jitter`.
//! - Each state change calls [`Balancer::health_changed`] so the balancer
//!   recomputes its pick schedule off the request path.
//!
//! Stats are Envoy's `cluster.<name>.health_check.*`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::HealthCheck;
use mesh_core::stats::{Counter, Gauge, Store};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::{Balancer, Endpoint, EndpointSet, HealthFlags};

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    /// The endpoint answered as a healthy one does.
    Healthy,
    /// The endpoint answered and said it is not healthy (an unexpected HTTP
    /// status, gRPC `NOT_SERVING`, a TCP reply without the expected bytes).
    /// Marks a healthy endpoint unhealthy at once (Envoy's `ACTIVE` failure).
    Unhealthy(String),
    /// No usable answer: refused, reset, not the protocol. Counts towards
    /// `unhealthy_threshold` (Envoy's `NETWORK` failure).
    NetworkFailure(String),
    /// No answer within the health check `timeout` (the checker reports
    /// this itself). A network failure that also sets
    /// [`HealthFlags::ACTIVE_HC_TIMEOUT`] (Envoy's `NETWORK_TIMEOUT`).
    TimedOut,
}

/// A boxed probe future.
pub type ProbeFuture = Pin<Box<dyn Future<Output = ProbeResult> + Send>>;

/// What one probe of an endpoint does. The checker bounds each probe by the
/// configured `timeout` (an expired probe is a network failure), so a probe
/// need not time itself.
pub trait Probe: Send + Sync + 'static {
    /// Probes `endpoint` once.
    fn probe(&self, endpoint: &Arc<Endpoint>) -> ProbeFuture;

    /// The name used in logs and the event log (`HTTP`, `TCP`, `GRPC`).
    fn kind(&self) -> &'static str;
}

/// Envoy's `cluster.<name>.health_check.*` stats.
#[derive(Debug, Clone, Default)]
pub struct HealthCheckStats {
    /// `attempt`: probes started.
    pub attempt: Counter,
    /// `success`: probes that passed.
    pub success: Counter,
    /// `failure`: probes that failed, for any reason.
    pub failure: Counter,
    /// `network_failure`: failures that were timeouts or connection errors.
    pub network_failure: Counter,
    /// `passive_failure`: endpoints marked unhealthy by the data path.
    pub passive_failure: Counter,
    /// `verify_cluster`: probes whose `x-envoy-upstream-healthchecked-cluster`
    /// was checked (stays 0: `service_name_matcher` is not supported).
    pub verify_cluster: Counter,
    /// `healthy`: endpoints currently passing.
    pub healthy: Gauge,
}

impl HealthCheckStats {
    /// The stats of cluster `cluster` in `store`.
    pub fn new(store: &Store, cluster: &str) -> Self {
        let l = [("envoy_cluster_name", cluster.to_owned())];
        let c = |n: &str| store.counter(&format!("envoy_cluster_health_check_{n}"), &l);
        HealthCheckStats {
            attempt: c("attempt"),
            success: c("success"),
            failure: c("failure"),
            network_failure: c("network_failure"),
            passive_failure: c("passive_failure"),
            verify_cluster: c("verify_cluster"),
            healthy: store.gauge("envoy_cluster_health_check_healthy", &l),
        }
    }
}

/// Envoy's health check event log (`event_log_path`): one JSON
/// `HealthCheckEvent` a line for each transition (and, with
/// `always_log_health_check_failures`, each failed probe).
pub struct EventLog {
    file: std::sync::Mutex<std::fs::File>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventLog")
    }
}

impl EventLog {
    /// Opens (creates, appends to) the log at `path`.
    pub fn open(path: &str) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(EventLog {
            file: std::sync::Mutex::new(file),
        })
    }

    fn write(&self, kind: &str, cluster: &str, endpoint: &Endpoint, event: &str) {
        use std::io::Write as _;
        let line = format!(
            "{{\"health_checker_type\":\"{kind}\",\"host\":{{\"socket_address\":{{\"protocol\":\"TCP\",\"address\":\"{}\",\"port_value\":{}}}}},\"cluster_name\":{},{event},\"timestamp\":\"{}\",\"locality\":{{\"region\":{},\"zone\":{},\"sub_zone\":{}}}}}\n",
            endpoint.addr.ip(),
            endpoint.addr.port(),
            json_string(cluster),
            rfc3339_now(),
            json_string(&endpoint.locality.region),
            json_string(&endpoint.locality.zone),
            json_string(&endpoint.locality.sub_zone),
        );
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "health check event log write failed");
        }
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The current UTC time as RFC 3339 with milliseconds
/// (`2026-11-22T09:10:00.123Z`), as protobuf JSON writes timestamps.
fn rfc3339_now() -> String {
    mesh_core::time::rfc3339_millis(std::time::SystemTime::now())
}

/// Called after every passing probe (outlier detection uses it to return
/// an ejected endpoint, Envoy's `successful_active_health_check_uneject_host`).
pub type OnHealthy = Box<dyn Fn(&Arc<Endpoint>) + Send + Sync>;

/// How often the checker looks for endpoint-set changes.
const RECONCILE_PERIOD: Duration = Duration::from_millis(200);

/// Whether a probe result changed the endpoint's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transition {
    Unchanged,
    Changed,
    /// The result differs from the state but a threshold is still counting.
    Pending,
}

/// Active health checking of one cluster.
pub struct HealthChecker {
    cluster: String,
    config: HealthCheck,
    balancer: Arc<Balancer>,
    probe: Arc<dyn Probe>,
    stats: HealthCheckStats,
    traffic_seen: AtomicBool,
    on_healthy: Option<OnHealthy>,
    event_log: Option<EventLog>,
}

impl std::fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecker")
            .field("cluster", &self.cluster)
            .field("kind", &self.probe.kind())
            .finish_non_exhaustive()
    }
}

/// The per-endpoint counters of a running session.
#[derive(Debug, Default)]
struct Session {
    first_check: bool,
    num_healthy: u32,
    num_unhealthy: u32,
}

/// Keeps the `healthy` gauge right when a session ends (endpoint removed,
/// checker stopped).
struct HealthyGuard {
    endpoint: Arc<Endpoint>,
    gauge: Gauge,
}

impl Drop for HealthyGuard {
    fn drop(&mut self) {
        if !self.endpoint.health.has(HealthFlags::FAILED_ACTIVE_HC) {
            self.gauge.dec();
        }
    }
}

impl HealthChecker {
    /// A checker for cluster `cluster` over `balancer`'s endpoints.
    pub fn new(
        cluster: &str,
        config: HealthCheck,
        balancer: Arc<Balancer>,
        probe: Arc<dyn Probe>,
        stats: HealthCheckStats,
    ) -> Self {
        HealthChecker {
            cluster: cluster.to_owned(),
            config,
            balancer,
            probe,
            stats,
            traffic_seen: AtomicBool::new(false),
            on_healthy: None,
            event_log: None,
        }
    }

    /// Writes health events to `log` (Envoy's `event_log_path`).
    pub fn event_log(mut self, log: EventLog) -> Self {
        self.event_log = Some(log);
        self
    }

    fn log_event(&self, endpoint: &Endpoint, event: &str) {
        if let Some(l) = &self.event_log {
            l.write(self.probe.kind(), &self.cluster, endpoint, event);
        }
    }

    /// Calls `f` after every passing probe.
    pub fn on_healthy(mut self, f: OnHealthy) -> Self {
        self.on_healthy = Some(f);
        self
    }

    /// The stats.
    pub fn stats(&self) -> &HealthCheckStats {
        &self.stats
    }

    /// Starts checking on the current tokio runtime until `stop` fires.
    ///
    /// Marks every current endpoint `/failed_active_hc` (and makes the
    /// balancer create later endpoints so), then probes each. The returned
    /// future completes when every endpoint present at start has had its
    /// first probe, which is when Envoy considers such a cluster
    /// initialized.
    pub fn start(self: Arc<Self>, stop: CancellationToken) -> impl Future<Output = ()> {
        self.balancer
            .set_new_endpoint_health(HealthFlags::FAILED_ACTIVE_HC);
        let set = self.balancer.endpoints();
        for e in &set.endpoints {
            e.health.set(HealthFlags::FAILED_ACTIVE_HC);
        }
        self.balancer.health_changed();
        let mut sessions: HashMap<usize, (Arc<Endpoint>, AbortHandle)> = HashMap::new();
        let mut first = Vec::new();
        for e in &set.endpoints {
            let (tx, rx) = oneshot::channel();
            first.push(rx);
            let h = tokio::spawn(self.clone().session(e.clone(), Some(tx)));
            sessions.insert(key(e), (e.clone(), h.abort_handle()));
        }
        tokio::spawn(self.clone().supervise(sessions, stop));
        async move {
            for rx in first {
                let _ = rx.await;
            }
        }
    }

    /// Follows endpoint-set updates: a session per endpoint, started when it
    /// appears and ended when it leaves.
    async fn supervise(
        self: Arc<Self>,
        mut sessions: HashMap<usize, (Arc<Endpoint>, AbortHandle)>,
        stop: CancellationToken,
    ) {
        let mut last: Option<Arc<EndpointSet>> = None;
        loop {
            let set = self.balancer.endpoints();
            if !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &set)) {
                self.reconcile(&set, &mut sessions);
                last = Some(set);
            }
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_PERIOD) => {}
                _ = stop.cancelled() => break,
            }
        }
        for (_, (_, h)) in sessions {
            h.abort();
        }
    }

    fn reconcile(
        self: &Arc<Self>,
        set: &EndpointSet,
        sessions: &mut HashMap<usize, (Arc<Endpoint>, AbortHandle)>,
    ) {
        let current: HashMap<usize, &Arc<Endpoint>> =
            set.endpoints.iter().map(|e| (key(e), e)).collect();
        sessions.retain(|k, (_, h)| {
            let keep = current.contains_key(k);
            if !keep {
                h.abort();
            }
            keep
        });
        for (k, e) in current {
            if let std::collections::hash_map::Entry::Vacant(v) = sessions.entry(k) {
                let h = tokio::spawn(self.clone().session(e.clone(), None));
                v.insert((e.clone(), h.abort_handle()));
            }
        }
    }

    /// Probes one endpoint forever (until aborted).
    async fn session(
        self: Arc<Self>,
        endpoint: Arc<Endpoint>,
        mut first: Option<oneshot::Sender<()>>,
    ) {
        let _guard = HealthyGuard {
            endpoint: endpoint.clone(),
            gauge: self.stats.healthy.clone(),
        };
        if !endpoint.health.has(HealthFlags::FAILED_ACTIVE_HC) {
            self.stats.healthy.inc();
        }
        let mut s = Session {
            first_check: true,
            ..Session::default()
        };
        if !self.config.initial_jitter.is_zero() {
            tokio::time::sleep(random_below(self.config.initial_jitter)).await;
        }
        loop {
            self.stats.attempt.inc();
            let result = match tokio::time::timeout(
                self.config.timeout,
                self.probe.probe(&endpoint),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => ProbeResult::TimedOut,
            };
            let next = self.record(&endpoint, &mut s, result);
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            tokio::time::sleep(next).await;
        }
    }

    /// Applies one probe result; returns the wait before the next probe.
    fn record(&self, endpoint: &Arc<Endpoint>, s: &mut Session, result: ProbeResult) -> Duration {
        let h = &endpoint.health;
        match result {
            ProbeResult::Healthy => {
                s.num_unhealthy = 0;
                h.clear(HealthFlags::ACTIVE_HC_TIMEOUT);
                let mut t = Transition::Unchanged;
                if h.has(HealthFlags::FAILED_ACTIVE_HC) {
                    s.num_healthy += 1;
                    if s.first_check || s.num_healthy >= self.config.healthy_threshold {
                        h.clear(HealthFlags::FAILED_ACTIVE_HC);
                        self.stats.healthy.inc();
                        t = Transition::Changed;
                        tracing::info!(cluster = %self.cluster, endpoint = %endpoint.addr, "health check passed; endpoint is healthy");
                        self.log_event(
                            endpoint,
                            &format!(
                                "\"add_healthy_event\":{{\"first_check\":{}}}",
                                s.first_check
                            ),
                        );
                    } else {
                        t = Transition::Pending;
                    }
                }
                self.stats.success.inc();
                s.first_check = false;
                if t == Transition::Changed {
                    self.balancer.health_changed();
                }
                if let Some(f) = &self.on_healthy {
                    f(endpoint);
                }
                self.interval(true, t)
            }
            failure => {
                let network = !matches!(failure, ProbeResult::Unhealthy(_));
                let why = match &failure {
                    ProbeResult::Unhealthy(w) | ProbeResult::NetworkFailure(w) => w.as_str(),
                    ProbeResult::TimedOut => "timed out",
                    ProbeResult::Healthy => "",
                };
                if failure == ProbeResult::TimedOut {
                    h.set(HealthFlags::ACTIVE_HC_TIMEOUT);
                }
                let failure_type = match failure {
                    ProbeResult::Unhealthy(_) => "ACTIVE",
                    ProbeResult::TimedOut => "NETWORK_TIMEOUT",
                    _ => "NETWORK",
                };
                s.num_healthy = 0;
                let mut t = Transition::Unchanged;
                if !h.has(HealthFlags::FAILED_ACTIVE_HC) {
                    s.num_unhealthy += 1;
                    if !network || s.num_unhealthy >= self.config.unhealthy_threshold {
                        h.set(HealthFlags::FAILED_ACTIVE_HC);
                        self.stats.healthy.dec();
                        t = Transition::Changed;
                        tracing::warn!(cluster = %self.cluster, endpoint = %endpoint.addr, reason = why, "health check failed; endpoint is unhealthy");
                        self.log_event(
                            endpoint,
                            &format!(
                                "\"eject_unhealthy_event\":{{\"failure_type\":\"{failure_type}\"}}"
                            ),
                        );
                    } else {
                        t = Transition::Pending;
                    }
                }
                if t != Transition::Changed {
                    if s.first_check || self.config.always_log_health_check_failures {
                        self.log_event(
                            endpoint,
                            &format!(
                                "\"health_check_failure_event\":{{\"failure_type\":\"{failure_type}\",\"first_check\":{}}}",
                                s.first_check
                            ),
                        );
                    }
                    if self.config.always_log_health_check_failures {
                        tracing::warn!(cluster = %self.cluster, endpoint = %endpoint.addr, reason = why, "health check failed");
                    } else {
                        tracing::debug!(cluster = %self.cluster, endpoint = %endpoint.addr, reason = why, "health check failed");
                    }
                }
                self.stats.failure.inc();
                if network {
                    self.stats.network_failure.inc();
                }
                s.first_check = false;
                if t == Transition::Changed {
                    self.balancer.health_changed();
                }
                self.interval(false, t)
            }
        }
    }

    /// Whether the cluster has carried any request yet (Envoy uses
    /// `no_traffic_interval` until it has).
    fn has_traffic(&self) -> bool {
        if self.traffic_seen.load(Ordering::Relaxed) {
            return true;
        }
        let seen = self
            .balancer
            .endpoints()
            .endpoints
            .iter()
            .any(|e| e.stats.rq_total.get() > 0);
        if seen {
            self.traffic_seen.store(true, Ordering::Relaxed);
        }
        seen
    }

    fn interval(&self, passed: bool, t: Transition) -> Duration {
        let c = &self.config;
        let base = if !self.has_traffic() {
            c.no_traffic_interval
        } else {
            match (passed, t == Transition::Pending) {
                (true, false) => c.interval,
                (true, true) => c.healthy_edge_interval,
                (false, false) => c.unhealthy_interval,
                (false, true) => c.unhealthy_edge_interval,
            }
        };
        jittered(base, c.interval_jitter, c.interval_jitter_percent)
    }
}

fn key(e: &Arc<Endpoint>) -> usize {
    Arc::as_ptr(e) as usize
}

/// A random duration in `[0, d)`.
fn random_below(d: Duration) -> Duration {
    let nanos = d.as_nanos().min(u64::MAX as u128) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(fastrand::u64(0..nanos))
}

/// `base` plus a random part of `jitter` and of `percent` % of `base`.
fn jittered(base: Duration, jitter: Duration, percent: u32) -> Duration {
    let mut d = base;
    if percent > 0 {
        d += random_below(base.mul_f64(f64::from(percent) / 100.0));
    }
    d + random_below(jitter)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod format_tests {
    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(super::json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = super::rfc3339_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }
}
