//! Health checker state machine under paused time, with a scripted probe.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;

use mesh_core::config::{HealthChecker as Kind, LbPolicy, TcpHealthCheck};
use tokio::time::Instant;

use super::*;
use crate::EndpointSpec;

/// Answers per port: a fixed result, or never (a hang).
#[derive(Default)]
struct Script {
    results: Mutex<HashMap<u16, ProbeResult>>,
    hang: Mutex<HashSet<u16>>,
    calls: Mutex<Vec<(u16, Instant)>>,
}

impl Script {
    fn set(&self, port: u16, r: ProbeResult) {
        self.results.lock().unwrap().insert(port, r);
    }
    fn calls(&self, port: u16) -> Vec<Instant> {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|c| c.0 == port).map(|c| c.1).collect()
    }
}

impl Probe for Arc<Script> {
    fn probe(&self, endpoint: &Arc<Endpoint>) -> ProbeFuture {
        let port = endpoint.addr.port();
        self.calls.lock().unwrap().push((port, Instant::now()));
        if self.hang.lock().unwrap().contains(&port) {
            return Box::pin(std::future::pending());
        }
        let r = self
            .results
            .lock()
            .unwrap()
            .get(&port)
            .cloned()
            .unwrap_or(ProbeResult::Healthy);
        Box::pin(async move { r })
    }
    fn kind(&self) -> &'static str {
        "TEST"
    }
}

fn spec(port: u16) -> EndpointSpec {
    EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn config() -> HealthCheck {
    let s = Duration::from_secs(1);
    HealthCheck {
        timeout: Duration::from_millis(500),
        interval: s,
        initial_jitter: Duration::ZERO,
        interval_jitter: Duration::ZERO,
        interval_jitter_percent: 0,
        unhealthy_threshold: 3,
        healthy_threshold: 2,
        no_traffic_interval: s,
        unhealthy_interval: s,
        unhealthy_edge_interval: s,
        healthy_edge_interval: s,
        always_log_health_check_failures: false,
        event_log_path: None,
        transport_socket_match_criteria: None,
        tls_alpn: Vec::new(),
        checker: Kind::Tcp(TcpHealthCheck::default()),
    }
}

struct Fixture {
    balancer: Arc<Balancer>,
    script: Arc<Script>,
    checker: Arc<HealthChecker>,
    stop: CancellationToken,
}

async fn start(config: HealthCheck, ports: &[u16], script: Arc<Script>) -> Fixture {
    let balancer = Arc::new(Balancer::with_endpoints(
        LbPolicy::RoundRobin,
        ports.iter().map(|p| spec(*p)).collect(),
    ));
    let checker = Arc::new(HealthChecker::new(
        "c",
        config,
        balancer.clone(),
        Arc::new(script.clone()),
        HealthCheckStats::default(),
    ));
    let stop = CancellationToken::new();
    checker.clone().start(stop.clone()).await;
    Fixture {
        balancer,
        script,
        checker,
        stop,
    }
}

impl Fixture {
    fn flags(&self, port: u16) -> String {
        let set = self.balancer.endpoints();
        let e = set
            .endpoints
            .iter()
            .find(|e| e.addr.port() == port)
            .unwrap();
        e.health.render()
    }
    fn picks(&self, n: usize) -> HashSet<u16> {
        (0..n)
            .filter_map(|_| self.balancer.pick())
            .map(|e| e.addr.port())
            .collect()
    }
}

async fn advance(d: Duration) {
    // Step in small increments so every timer that falls due runs.
    let step = Duration::from_millis(50);
    let mut left = d;
    while left > Duration::ZERO {
        let s = left.min(step);
        tokio::time::sleep(s).await;
        left -= s;
    }
}

#[tokio::test(start_paused = true)]
async fn first_probe_decides_then_thresholds_count() {
    let script = Arc::new(Script::default());
    script.set(2, ProbeResult::NetworkFailure("refused".into()));
    let f = start(config(), &[1, 2], script).await;
    // The first probe decides at once, both ways.
    assert_eq!(f.flags(1), "healthy");
    assert_eq!(f.flags(2), "/failed_active_hc");
    assert_eq!(f.picks(10), HashSet::from([1]));
    assert_eq!(f.checker.stats().healthy.get(), 1);

    // Network failures on a healthy endpoint: unhealthy after 3 in a row.
    f.script
        .set(1, ProbeResult::NetworkFailure("refused".into()));
    advance(Duration::from_millis(1100)).await;
    assert_eq!(f.flags(1), "healthy", "1 failure of 3");
    advance(Duration::from_secs(1)).await;
    assert_eq!(f.flags(1), "healthy", "2 failures of 3");
    advance(Duration::from_secs(1)).await;
    assert_eq!(f.flags(1), "/failed_active_hc", "3 failures of 3");
    assert_eq!(f.checker.stats().healthy.get(), 0);
    // All unhealthy: the balancer still serves (panic mode).
    assert_eq!(f.picks(10), HashSet::from([1, 2]));

    // Back: two successes needed.
    f.script.set(1, ProbeResult::Healthy);
    advance(Duration::from_secs(1)).await;
    assert_eq!(f.flags(1), "/failed_active_hc", "1 success of 2");
    advance(Duration::from_secs(1)).await;
    assert_eq!(f.flags(1), "healthy", "2 successes of 2");
    assert_eq!(f.picks(10), HashSet::from([1]));

    // A failure the endpoint reports itself counts at once.
    f.script.set(1, ProbeResult::Unhealthy("status 503".into()));
    advance(Duration::from_secs(1)).await;
    assert_eq!(f.flags(1), "/failed_active_hc");
    let st = f.checker.stats();
    assert!(st.network_failure.get() >= 3);
    assert_eq!(st.attempt.get(), st.success.get() + st.failure.get());
    f.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_hanging_probe_times_out_as_a_network_failure() {
    let script = Arc::new(Script::default());
    let mut c = config();
    c.unhealthy_threshold = 1;
    let f = start(c, &[1], script).await;
    assert_eq!(f.flags(1), "healthy");
    f.script.hang.lock().unwrap().insert(1);
    advance(Duration::from_millis(1600)).await;
    assert_eq!(f.flags(1), "/failed_active_hc/active_hc_timeout");
    f.script.hang.lock().unwrap().clear();
    advance(Duration::from_secs(1)).await;
    assert_eq!(
        f.flags(1),
        "/failed_active_hc",
        "a check that answers clears the timeout flag"
    );
    assert_eq!(f.checker.stats().network_failure.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn added_endpoints_start_unhealthy_and_survivors_keep_state() {
    let script = Arc::new(Script::default());
    script.set(2, ProbeResult::Unhealthy("bad".into()));
    let f = start(config(), &[1, 2], script).await;
    assert_eq!(f.flags(2), "/failed_active_hc");
    // Port 3 will fail its probes; port 1 stays; port 2 leaves.
    f.script.set(3, ProbeResult::Unhealthy("bad".into()));
    f.balancer.update(vec![spec(1), spec(3)]);
    assert_eq!(
        f.flags(3),
        "/failed_active_hc",
        "new endpoints start failed"
    );
    assert_eq!(f.picks(10), HashSet::from([1]));
    advance(Duration::from_millis(300)).await;
    assert!(!f.script.calls(3).is_empty(), "the new endpoint is probed");
    assert_eq!(f.flags(1), "healthy", "the survivor keeps its state");
    let probes_of_2 = f.script.calls(2).len();
    advance(Duration::from_secs(3)).await;
    assert_eq!(
        f.script.calls(2).len(),
        probes_of_2,
        "a removed endpoint is no longer probed"
    );
    // Port 3 recovers; past its first probe it needs healthy_threshold (2).
    f.script.set(3, ProbeResult::Healthy);
    advance(Duration::from_secs(1)).await;
    assert_eq!(f.flags(3), "/failed_active_hc");
    advance(Duration::from_secs(1)).await;
    assert_eq!(f.flags(3), "healthy");
    assert_eq!(f.checker.stats().healthy.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn no_traffic_interval_until_the_cluster_is_used() {
    let script = Arc::new(Script::default());
    let mut c = config();
    c.no_traffic_interval = Duration::from_secs(10);
    let f = start(c, &[1], script).await;
    advance(Duration::from_secs(25)).await;
    // Probes at 0, 10, 20.
    assert_eq!(f.script.calls(1).len(), 3);
    f.balancer.pick().unwrap().stats.rq_total.inc();
    advance(Duration::from_secs(10)).await;
    // The probe at 30 sees traffic; from then on every second: 31 ..= 40.
    advance(Duration::from_secs(5)).await;
    let n = f.script.calls(1).len();
    assert!((13..=14).contains(&n), "{n}");
}

#[tokio::test(start_paused = true)]
async fn jitter_stays_within_its_bounds() {
    let script = Arc::new(Script::default());
    let mut c = config();
    c.interval_jitter = Duration::from_millis(500);
    c.interval_jitter_percent = 50;
    c.initial_jitter = Duration::from_secs(2);
    let start_time = Instant::now();
    let f = start(c, &[1], script).await;
    let first = f.script.calls(1)[0];
    advance(Duration::from_secs(60)).await;
    let calls = f.script.calls(1);
    for w in calls.windows(2) {
        let gap = w[1] - w[0];
        // interval 1s + up to 50% + up to 500ms.
        assert!(gap >= Duration::from_secs(1), "{gap:?}");
        assert!(gap < Duration::from_secs(2), "{gap:?}");
    }
    let gaps: HashSet<u128> = calls
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert!(gaps.len() > 5, "jitter varies the interval: {gaps:?}");
    assert!(first >= start_time);
}

#[tokio::test(start_paused = true)]
async fn edge_intervals_while_a_threshold_is_counting() {
    let script = Arc::new(Script::default());
    script.set(1, ProbeResult::Unhealthy("503".into()));
    let mut c = config();
    c.healthy_threshold = 3;
    c.unhealthy_interval = Duration::from_secs(10);
    c.healthy_edge_interval = Duration::from_secs(2);
    c.interval = Duration::from_secs(5);
    let f = start(c, &[1], script).await;
    f.balancer.pick().unwrap().stats.rq_total.inc();
    assert_eq!(f.flags(1), "/failed_active_hc");
    f.script.set(1, ProbeResult::Healthy);
    // 0: fails (no traffic seen yet: no_traffic_interval, 1s) -> 1: pass 1/3
    // -> healthy_edge_interval 2s -> 3: pass 2/3 -> 2s -> 5: pass 3/3,
    // healthy -> interval 5s -> 10 -> 15.
    advance(Duration::from_millis(15_500)).await;
    f.script.set(1, ProbeResult::Unhealthy("503".into()));
    // 20: fails, unhealthy -> unhealthy_interval 10s -> 30.
    advance(Duration::from_secs(15)).await;
    let t0 = f.script.calls(1)[0];
    let at: Vec<u64> = f
        .script
        .calls(1)
        .iter()
        .map(|t| (*t - t0).as_secs())
        .collect();
    assert_eq!(at, vec![0, 1, 3, 5, 10, 15, 20, 30]);
    assert_eq!(f.flags(1), "/failed_active_hc");
}
