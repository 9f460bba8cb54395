//! Outlier detection rules under paused time.

use std::collections::HashSet;
use std::net::SocketAddr;

use mesh_core::config::{LbConfig, LbPolicy};

use super::*;
use crate::EndpointSpec;

fn spec(port: u16) -> EndpointSpec {
    EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn detector(config: OutlierDetection, ports: &[u16]) -> (Arc<Balancer>, OutlierDetector) {
    // No panic threshold: these tests look at ejections alone (panic mode
    // has its own tests in the balancer).
    let b = Arc::new(Balancer::with_config(
        LbPolicy::RoundRobin,
        LbConfig {
            healthy_panic_threshold: 0.0,
            ..LbConfig::default()
        },
    ));
    b.update(ports.iter().map(|p| spec(*p)).collect());
    let store = Store::new();
    let d = OutlierDetector::new("c", config, b.clone(), OutlierStats::new(&store, "c"));
    (b, d)
}

fn ep(b: &Balancer, port: u16) -> Arc<Endpoint> {
    b.endpoints()
        .endpoints
        .iter()
        .find(|e| e.addr.port() == port)
        .unwrap()
        .clone()
}

fn picks(b: &Balancer) -> HashSet<u16> {
    (0..20)
        .filter_map(|_| b.pick())
        .map(|e| e.addr.port())
        .collect()
}

fn cfg() -> OutlierDetection {
    OutlierDetection {
        max_ejection_percent: 100,
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(10),
        ..OutlierDetection::default()
    }
}

#[tokio::test(start_paused = true)]
async fn consecutive_5xx_ejects_at_once_and_a_success_resets() {
    let (b, d) = detector(cfg(), &[1, 2, 3]);
    let e1 = ep(&b, 1);
    for _ in 0..4 {
        d.report(&e1, Outcome::Status(500));
    }
    d.report(&e1, Outcome::Status(200));
    for _ in 0..4 {
        d.report(&e1, Outcome::Status(500));
    }
    assert!(
        e1.health.is_healthy(),
        "a success in between restarts the count"
    );
    d.report(&e1, Outcome::Status(500));
    assert_eq!(e1.health.render(), "/failed_outlier_check");
    assert_eq!(picks(&b), HashSet::from([2, 3]));
    assert_eq!(d.stats().ejections_active.get(), 1);
    assert_eq!(
        d.stats().enforced[EjectionKind::Consecutive5xx.index()].get(),
        1
    );
    assert_eq!(
        d.stats().detected[EjectionKind::Consecutive5xx.index()].get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn ejection_time_grows_with_each_ejection_up_to_the_max() {
    let mut c = cfg();
    c.max_ejection_time = Duration::from_secs(25);
    let (b, d) = detector(c, &[1, 2]);
    let e1 = ep(&b, 1);
    let eject = |d: &OutlierDetector| {
        for _ in 0..5 {
            d.report(&e1, Outcome::ConnectFailed);
        }
    };
    // Returns after 10s, then 20s, then 25s (capped), checked each interval.
    for expected in [10u64, 20, 25] {
        eject(&d);
        assert!(!e1.health.is_healthy());
        let start = Instant::now();
        let mut secs = 0;
        while !e1.health.is_healthy() {
            tokio::time::advance(Duration::from_secs(1)).await;
            secs += 1;
            d.on_interval(Instant::now());
            assert!(secs <= 60);
        }
        assert_eq!(start.elapsed().as_secs(), expected);
    }
    assert_eq!(e1.outlier.num_ejections(), 3);
    assert_eq!(d.stats().ejections_active.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn multiplier_decays_while_the_endpoint_behaves() {
    let (b, d) = detector(cfg(), &[1, 2]);
    let e1 = ep(&b, 1);
    for _ in 0..2 {
        for _ in 0..5 {
            d.report(&e1, Outcome::Status(503));
        }
        while !e1.health.is_healthy() {
            tokio::time::advance(Duration::from_secs(1)).await;
            d.on_interval(Instant::now());
        }
    }
    assert_eq!(d.ejection_time(&e1), Duration::from_secs(20));
    // Healthy for long: each interval after base_ejection_time lowers it.
    for _ in 0..15 {
        tokio::time::advance(Duration::from_secs(1)).await;
        d.on_interval(Instant::now());
    }
    assert_eq!(d.ejection_time(&e1), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_limits_and_overflow_counts() {
    // Default 10%: with 2 endpoints none may be ejected.
    let (b, d) = detector(
        OutlierDetection {
            max_ejection_percent: 10,
            ..cfg()
        },
        &[1, 2],
    );
    let e1 = ep(&b, 1);
    for _ in 0..5 {
        d.report(&e1, Outcome::Status(500));
    }
    assert!(e1.health.is_healthy());
    assert_eq!(d.stats().ejections_overflow.get(), 1);
    // 50% of 4: two may go, not three.
    let (b, d) = detector(
        OutlierDetection {
            max_ejection_percent: 50,
            ..cfg()
        },
        &[1, 2, 3, 4],
    );
    for p in [1, 2, 3] {
        let e = ep(&b, p);
        for _ in 0..5 {
            d.report(&e, Outcome::Status(500));
        }
    }
    assert_eq!(d.stats().ejections_active.get(), 2);
    assert_eq!(picks(&b), HashSet::from([3, 4]));
    // always_eject_one_host overrides the limit for the first one.
    let (b, d) = detector(
        OutlierDetection {
            max_ejection_percent: 0,
            always_eject_one_host: true,
            ..cfg()
        },
        &[1, 2],
    );
    for p in [1, 2] {
        let e = ep(&b, p);
        for _ in 0..5 {
            d.report(&e, Outcome::Status(500));
        }
    }
    assert_eq!(d.stats().ejections_active.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn gateway_failures_detected_but_not_enforced_by_default() {
    let mut c = cfg();
    c.consecutive_5xx = 100;
    let (b, d) = detector(c.clone(), &[1, 2]);
    let e1 = ep(&b, 1);
    for _ in 0..5 {
        d.report(&e1, Outcome::Status(502));
    }
    assert!(e1.health.is_healthy());
    let k = EjectionKind::ConsecutiveGatewayFailure.index();
    assert_eq!(d.stats().detected[k].get(), 1);
    assert_eq!(d.stats().enforced[k].get(), 0);
    c.enforcing_consecutive_gateway_failure = 100;
    let (b, d) = detector(c, &[1, 2]);
    let e1 = ep(&b, 1);
    for _ in 0..4 {
        d.report(&e1, Outcome::Status(504));
    }
    d.report(&e1, Outcome::Status(500));
    d.report(&e1, Outcome::Status(503));
    assert!(
        e1.health.is_healthy(),
        "a non-gateway 5xx restarts the gateway count"
    );
    for _ in 0..4 {
        d.report(&e1, Outcome::Timeout);
    }
    assert!(!e1.health.is_healthy(), "timeouts count as 504");
}

#[tokio::test(start_paused = true)]
async fn split_local_origin_errors_count_apart() {
    let mut c = cfg();
    c.split_external_local_origin_errors = true;
    c.consecutive_local_origin_failure = 3;
    let (b, d) = detector(c, &[1, 2]);
    let e1 = ep(&b, 1);
    for _ in 0..4 {
        d.report(&e1, Outcome::Status(500));
    }
    d.report(&e1, Outcome::ConnectFailed);
    d.report(&e1, Outcome::ConnectFailed);
    assert!(e1.health.is_healthy(), "local failures do not count as 5xx");
    d.report(&e1, Outcome::Timeout);
    assert!(!e1.health.is_healthy());
    let k = EjectionKind::ConsecutiveLocalOriginFailure.index();
    assert_eq!(d.stats().enforced[k].get(), 1);
}

#[tokio::test(start_paused = true)]
async fn success_rate_ejects_the_outlier_per_interval() {
    let mut c = cfg();
    c.success_rate_request_volume = 50;
    c.consecutive_5xx = 1000;
    let ports: Vec<u16> = (1..=10).collect();
    let (b, d) = detector(c, &ports);
    for p in 1..=10 {
        let e = ep(&b, p);
        for i in 0..100 {
            // Port 10 fails half its requests, the others 1%: mean 94.1,
            // deviation 14.7, threshold 94.1 - 1.9 * 14.7 = 66.2.
            let bad = if p == 10 { i % 2 == 0 } else { i == 0 };
            d.report(&e, Outcome::Status(if bad { 500 } else { 200 }));
        }
    }
    d.on_interval(Instant::now());
    assert_eq!(picks(&b), (1..=9).collect());
    assert_eq!(ep(&b, 10).outlier.success_rate(), 50.0);
    assert_eq!(ep(&b, 1).outlier.success_rate(), 99.0);
    assert!(d.success_rate_average() > 80.0);
    assert_eq!(
        d.stats().enforced[EjectionKind::SuccessRate.index()].get(),
        1
    );
    // Too few requests: no success rate computed.
    d.report(&ep(&b, 1), Outcome::Status(500));
    d.on_interval(Instant::now());
    assert_eq!(ep(&b, 1).outlier.success_rate(), -1.0);
}

#[tokio::test(start_paused = true)]
async fn failure_percentage_ejects_when_enforced() {
    let mut c = cfg();
    c.enforcing_failure_percentage = 100;
    c.failure_percentage_minimum_hosts = 2;
    c.failure_percentage_request_volume = 10;
    c.failure_percentage_threshold = 50;
    c.consecutive_5xx = 1000;
    let (b, d) = detector(c, &[1, 2, 3]);
    for (p, fails) in [(1, 0), (2, 5), (3, 9)] {
        let e = ep(&b, p);
        for i in 0..10 {
            d.report(&e, Outcome::Status(if i < fails { 503 } else { 200 }));
        }
    }
    d.on_interval(Instant::now());
    assert_eq!(picks(&b), HashSet::from([1]));
}

#[tokio::test(start_paused = true)]
async fn a_passing_health_check_returns_an_ejected_endpoint() {
    let (b, d) = detector(cfg(), &[1, 2]);
    let e1 = ep(&b, 1);
    for _ in 0..5 {
        d.report(&e1, Outcome::ConnectFailed);
    }
    assert!(!e1.health.is_healthy());
    d.health_check_passed(&e1);
    assert!(e1.health.is_healthy());
    assert_eq!(d.stats().ejections_active.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_ejected_endpoint_that_leaves_no_longer_counts() {
    let (b, d) = detector(cfg(), &[1, 2, 3]);
    let e1 = ep(&b, 1);
    for _ in 0..5 {
        d.report(&e1, Outcome::Status(500));
    }
    assert_eq!(d.stats().ejections_active.get(), 1);
    b.update(vec![spec(2), spec(3)]);
    d.on_interval(Instant::now());
    assert_eq!(d.stats().ejections_active.get(), 0);
}
