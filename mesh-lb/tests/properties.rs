//! Randomized properties over many endpoint sets (seeded, so a failure
//! reproduces): picks never panic, always find an endpoint when the cluster
//! has one (panic mode guarantees it), keep to the top level while it is
//! fully healthy, and weighted round robin is exact over a cycle.

use std::collections::HashMap;
use std::net::SocketAddr;

use mesh_core::config::{LbConfig, LbPolicy};
use mesh_lb::{Balancer, EndpointSpec, HealthFlags, PickContext};

const POLICIES: [LbPolicy; 6] = [
    LbPolicy::RoundRobin,
    LbPolicy::Random,
    LbPolicy::LeastRequest,
    LbPolicy::PeakEwma,
    LbPolicy::RingHash,
    LbPolicy::Maglev,
];

fn random_specs(rng: &mut fastrand::Rng) -> Vec<EndpointSpec> {
    let n = rng.usize(1..40);
    (0..n)
        .map(|i| {
            EndpointSpec::new(SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80)))
                .with_weight(rng.u32(1..10))
                .with_priority(rng.u32(0..3))
        })
        .collect()
}

#[test]
fn picks_always_find_an_endpoint_and_respect_healthy_top_levels() {
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..150 {
        let policy = POLICIES[round % POLICIES.len()];
        let config = LbConfig {
            minimum_ring_size: 64,
            maglev_table_size: 251,
            ..LbConfig::default()
        };
        let b = Balancer::with_config(policy, config);
        let specs = random_specs(&mut rng);
        b.update(specs);
        let eps = b.endpoints().endpoints.clone();
        for e in &eps {
            match rng.u8(0..6) {
                0 => {
                    e.health.set(HealthFlags::FAILED_ACTIVE_HC);
                }
                1 => {
                    e.health.set(HealthFlags::DEGRADED);
                }
                _ => {}
            }
        }
        b.health_changed();
        let top = eps.iter().map(|e| e.priority).min().unwrap_or(0);
        let top_fully_healthy = eps
            .iter()
            .filter(|e| e.priority == top)
            .all(|e| e.health.bits() == 0);
        for i in 0..200u64 {
            let ctx = PickContext::new().with_hash(Some(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            let e = b
                .pick_with(&ctx)
                .unwrap_or_else(|| panic!("round {round} {policy:?}: no endpoint"));
            if top_fully_healthy {
                assert_eq!(e.priority, top, "round {round} {policy:?}");
            }
        }
    }
}

#[test]
fn weighted_round_robin_is_exact_over_a_cycle() {
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..100 {
        let n = rng.usize(1..20);
        let weights: Vec<u32> = (0..n).map(|_| rng.u32(1..20)).collect();
        let b = Balancer::new(LbPolicy::RoundRobin);
        b.update(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    EndpointSpec::new(SocketAddr::from(([10, 2, 0, i as u8], 80))).with_weight(*w)
                })
                .collect(),
        );
        let g = weights.iter().fold(0, |g, w| gcd(g, *w));
        let cycle: u32 = weights.iter().map(|w| w / g).sum();
        let mut counts: HashMap<u8, u32> = HashMap::new();
        for _ in 0..cycle {
            let e = b.pick().expect("endpoint");
            let SocketAddr::V4(a) = e.addr else { panic!() };
            *counts.entry(a.ip().octets()[3]).or_default() += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            assert_eq!(
                counts.get(&(i as u8)).copied().unwrap_or(0),
                w / g,
                "{weights:?}"
            );
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
