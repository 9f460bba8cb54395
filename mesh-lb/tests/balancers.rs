//! Distribution and behaviour of every balancer, through the public API.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::{
    LbConfig, LbMetadata, LbPolicy, Locality, MetadataValue, SubsetConfig, SubsetFallback,
    ZoneAwareConfig,
};
use mesh_lb::{Balancer, Endpoint, EndpointSpec, HealthFlags, PickContext};

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8000 + i))
}

fn spec(i: u16) -> EndpointSpec {
    EndpointSpec::new(addr(i))
}

fn shares(b: &Balancer, n: usize, ctx: impl Fn(usize) -> Option<u64>) -> HashMap<SocketAddr, f64> {
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for i in 0..n {
        let e = b
            .pick_with(&PickContext::new().with_hash(ctx(i)))
            .expect("an endpoint");
        *counts.entry(e.addr).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(a, c)| (a, c as f64 / n as f64))
        .collect()
}

fn key_hash(i: usize) -> Option<u64> {
    Some(mesh_lb::hash::xxhash64(format!("key-{i}").as_bytes()))
}

/// Every policy honours 3:1 weights within ±3% over 40k picks.
#[test]
fn weighted_3_to_1_for_every_policy() {
    for policy in [
        LbPolicy::RoundRobin,
        LbPolicy::Random,
        LbPolicy::LeastRequest,
        LbPolicy::PeakEwma,
        LbPolicy::RingHash,
        LbPolicy::Maglev,
    ] {
        let b = Balancer::with_config(policy, LbConfig::default());
        b.update(vec![spec(1).with_weight(3), spec(2).with_weight(1)]);
        let s = shares(&b, 40_000, key_hash);
        let heavy = s.get(&addr(1)).copied().unwrap_or(0.0);
        // Hashing policies place keys by hash, so their share is the
        // share of ring/table space; the others follow the weights.
        assert!(
            (0.72..=0.78).contains(&heavy),
            "{policy:?}: heavy endpoint got {heavy}"
        );
    }
}

#[test]
fn round_robin_equal_weights_cycle_exactly() {
    let b = Balancer::new(LbPolicy::RoundRobin);
    b.update((1..=5).map(spec).collect());
    let s = shares(&b, 5000, |_| None);
    for i in 1..=5 {
        assert_eq!(s[&addr(i)], 0.2);
    }
}

/// Adding an 11th endpoint moves about 1/11 of the keys; ≤ 15% allowed.
fn keys_moved(policy: LbPolicy) -> f64 {
    let b = Balancer::new(policy);
    b.update((1..=10).map(spec).collect());
    let n = 20_000;
    let before: Vec<SocketAddr> = (0..n)
        .map(|i| {
            b.pick_with(&PickContext::new().with_hash(key_hash(i)))
                .unwrap()
                .addr
        })
        .collect();
    b.update((1..=11).map(spec).collect());
    let moved = (0..n)
        .filter(|i| {
            b.pick_with(&PickContext::new().with_hash(key_hash(*i)))
                .unwrap()
                .addr
                != before[*i]
        })
        .count();
    moved as f64 / n as f64
}

/// The new endpoint takes 1/11 of the ring; and because the ring keeps its
/// size (Envoy's sizing: 103 points per endpoint for 10, 94 for 11), each
/// old endpoint gives up its last 9 points too: about 16% of keys move in
/// all, the price of matching Envoy's ring exactly.
#[test]
fn ring_hash_adding_one_of_ten_moves_few_keys() {
    let moved = keys_moved(LbPolicy::RingHash);
    assert!(moved <= 0.17, "{moved}");
    assert!(moved > 0.03, "the new endpoint takes some keys: {moved}");
}

#[test]
fn maglev_adding_one_of_ten_moves_few_keys_and_spreads_evenly() {
    let moved = keys_moved(LbPolicy::Maglev);
    assert!(moved <= 0.15, "{moved}");
    let b = Balancer::new(LbPolicy::Maglev);
    b.update((1..=10).map(spec).collect());
    let s = shares(&b, 50_000, key_hash);
    for (a, share) in &s {
        assert!((0.08..=0.12).contains(share), "{a}: {share}");
    }
}

#[test]
fn hashing_is_sticky_and_spreads() {
    for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
        let b = Balancer::new(policy);
        b.update((1..=4).map(spec).collect());
        let mut used = HashSet::new();
        for i in 0..200 {
            let ctx = PickContext::new().with_hash(key_hash(i));
            let first = b.pick_with(&ctx).unwrap().addr;
            for _ in 0..3 {
                assert_eq!(b.pick_with(&ctx).unwrap().addr, first);
            }
            used.insert(first);
        }
        assert_eq!(used.len(), 4, "{policy:?}");
    }
}

/// Envoy's ring for one endpoint `127.0.0.1:80` and min ring size 4: the
/// points are xxh64("127.0.0.1:80_0".."_3"); a hash just above the largest
/// point wraps to the first. Checked by hand against the formula, so the
/// layout matches Envoy's and a shared hash reaches the same endpoint.
#[test]
fn ring_hash_keys_follow_envoy() {
    let config = LbConfig {
        minimum_ring_size: 4,
        ..LbConfig::default()
    };
    let b = Balancer::with_config(LbPolicy::RingHash, config);
    let a: SocketAddr = "127.0.0.1:80".parse().unwrap();
    let c: SocketAddr = "127.0.0.2:80".parse().unwrap();
    b.update(vec![EndpointSpec::new(a), EndpointSpec::new(c)]);
    let point = |s: &str| mesh_lb::hash::xxhash64(s.as_bytes());
    for i in 0..2 {
        let pa = point(&format!("127.0.0.1:80_{i}"));
        let pc = point(&format!("127.0.0.2:80_{i}"));
        assert_eq!(
            b.pick_with(&PickContext::new().with_hash(Some(pa)))
                .unwrap()
                .addr,
            a
        );
        assert_eq!(
            b.pick_with(&PickContext::new().with_hash(Some(pc)))
                .unwrap()
                .addr,
            c
        );
    }
}

/// P2C sends almost nothing to an endpoint with many requests in flight.
#[test]
fn least_request_avoids_the_busy_endpoint() {
    let b = Balancer::new(LbPolicy::LeastRequest);
    b.update((1..=3).map(spec).collect());
    let busy = b.endpoints().endpoints[0].clone();
    busy.stats.rq_active.set(50);
    let s = shares(&b, 9000, |_| None);
    let to_busy = s.get(&busy.addr).copied().unwrap_or(0.0);
    // Only when both random candidates are the busy one: 1/9.
    assert!(to_busy < 0.15, "{to_busy}");
    assert!(to_busy > 0.05, "{to_busy}");
}

/// Uneven weights: Envoy's weight / (active + 1)^bias.
#[test]
fn least_request_weighted_divides_by_active() {
    let b = Balancer::new(LbPolicy::LeastRequest);
    b.update(vec![spec(1).with_weight(2), spec(2).with_weight(1)]);
    let heavy = b.endpoints().endpoints[0].clone();
    // Idle: 2:1.
    let s = shares(&b, 30_000, |_| None);
    assert!((0.63..0.70).contains(&s[&heavy.addr]), "{}", s[&heavy.addr]);
    // With 3 active the heavy one weighs 2/4 against 1/1: 1:2.
    heavy.stats.rq_active.set(3);
    let s = shares(&b, 30_000, |_| None);
    assert!((0.30..0.37).contains(&s[&heavy.addr]), "{}", s[&heavy.addr]);
    // Bias 0: weights only.
    let b = Balancer::with_config(
        LbPolicy::LeastRequest,
        LbConfig {
            active_request_bias: 0.0,
            ..LbConfig::default()
        },
    );
    b.update(vec![spec(1).with_weight(2), spec(2).with_weight(1)]);
    b.endpoints().endpoints[0].stats.rq_active.set(3);
    let s = shares(&b, 30_000, |_| None);
    assert!((0.63..0.70).contains(&s[&addr(1)]));
}

/// Peak EWMA: a 50 ms endpoint loses its traffic to 1 ms ones.
#[tokio::test(start_paused = true)]
async fn peak_ewma_moves_traffic_off_the_slow_endpoint() {
    let b = Balancer::new(LbPolicy::PeakEwma);
    b.update((1..=3).map(spec).collect());
    let eps = b.endpoints().endpoints.clone();
    let slow = eps[0].addr;
    let mut to_slow = 0;
    let rounds = 3000;
    for _ in 0..rounds {
        let e = b.pick().unwrap();
        let rtt = if e.addr == slow {
            to_slow += 1;
            Duration::from_millis(50)
        } else {
            Duration::from_millis(1)
        };
        tokio::time::advance(Duration::from_millis(1)).await;
        e.observe_rtt(rtt);
    }
    let share = to_slow as f64 / rounds as f64;
    assert!(share < 0.05, "slow endpoint share {share}");
    // In-flight requests count too: load on the fast ones pushes some back.
    let s: HashSet<_> = (0..50).map(|_| b.pick().unwrap().addr).collect();
    assert!(!s.contains(&slow) || s.len() == 3);
}

fn set_health(e: &Arc<Endpoint>, flag: u8) {
    e.health.set(flag);
}

/// Priority spill-over with the 1.4 overprovisioning factor.
#[test]
fn priority_spills_over_by_overprovisioned_health() {
    let b = Balancer::new(LbPolicy::RoundRobin);
    let mut specs: Vec<_> = (1..=10).map(spec).collect();
    specs.extend((11..=20).map(|i| spec(i).with_priority(1)));
    b.update(specs);
    let eps = b.endpoints().endpoints.clone();
    let p0_share = |b: &Balancer| {
        let s = shares(b, 20_000, |_| None);
        s.iter()
            .filter(|(a, _)| a.port() - 8000 <= 10)
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    assert!(p0_share(&b) > 0.9999);
    // 8 of 10 healthy: 1.4 * 80% > 100%: P0 keeps everything.
    for e in &eps[..2] {
        set_health(e, HealthFlags::FAILED_ACTIVE_HC);
    }
    b.health_changed();
    assert!(p0_share(&b) > 0.9999);
    // 5 of 10: health 70, P0 takes 70%, P1 30%.
    for e in &eps[2..5] {
        set_health(e, HealthFlags::FAILED_OUTLIER_CHECK);
    }
    b.health_changed();
    let s = p0_share(&b);
    assert!((0.67..0.73).contains(&s), "{s}");
    // Every P0 endpoint down: all to P1.
    for e in &eps[5..10] {
        set_health(e, HealthFlags::FAILED_ACTIVE_HC);
    }
    b.health_changed();
    assert!(p0_share(&b) < 0.0001);
}

/// Below the panic threshold a level uses all its endpoints; at 0 the
/// threshold is off and an all-unhealthy cluster has nothing to pick.
#[test]
fn panic_threshold() {
    let b = Balancer::new(LbPolicy::RoundRobin);
    b.update((1..=4).map(spec).collect());
    let eps = b.endpoints().endpoints.clone();
    for e in &eps[..3] {
        set_health(e, HealthFlags::FAILED_ACTIVE_HC);
    }
    b.health_changed();
    // 25% healthy < 50%: panic, traffic to all four.
    assert_eq!(shares(&b, 4000, |_| None).len(), 4);
    let off = Balancer::with_config(
        LbPolicy::RoundRobin,
        LbConfig {
            healthy_panic_threshold: 0.0,
            ..LbConfig::default()
        },
    );
    off.update((1..=4).map(spec).collect());
    let eps = off.endpoints().endpoints.clone();
    for e in &eps[..3] {
        set_health(e, HealthFlags::FAILED_ACTIVE_HC);
    }
    off.health_changed();
    assert_eq!(shares(&off, 1000, |_| None).len(), 1);
    set_health(&eps[3], HealthFlags::FAILED_ACTIVE_HC);
    off.health_changed();
    assert!(off.pick().is_none());
}

#[test]
fn degraded_endpoints_serve_only_when_needed() {
    let b = Balancer::new(LbPolicy::Random);
    b.update((1..=4).map(spec).collect());
    let eps = b.endpoints().endpoints.clone();
    set_health(&eps[0], HealthFlags::DEGRADED);
    b.health_changed();
    // 3 of 4 healthy: 1.4*75% > 100%, the degraded one gets nothing.
    assert!(!shares(&b, 4000, |_| None).contains_key(&eps[0].addr));
}

fn loc(zone: &str) -> Locality {
    Locality {
        region: "r".into(),
        zone: zone.into(),
        sub_zone: String::new(),
    }
}

#[test]
fn locality_weights() {
    let b = Balancer::with_config(
        LbPolicy::RoundRobin,
        LbConfig {
            locality_weighted: true,
            ..LbConfig::default()
        },
    );
    let mut specs = Vec::new();
    for i in 1..=2 {
        let mut s = spec(i).with_locality(loc("a"));
        s.locality_weight = Some(1);
        specs.push(s);
    }
    for i in 3..=4 {
        let mut s = spec(i).with_locality(loc("b"));
        s.locality_weight = Some(3);
        specs.push(s);
    }
    b.update(specs);
    let s = shares(&b, 40_000, |_| None);
    let a = s[&addr(1)] + s[&addr(2)];
    assert!((0.22..0.28).contains(&a), "{a}");
}

#[test]
fn zone_aware_prefers_the_local_zone_and_spills_when_it_fails() {
    let b = Balancer::with_config(
        LbPolicy::RoundRobin,
        LbConfig {
            zone_aware: Some(ZoneAwareConfig {
                min_cluster_size: 2,
                ..ZoneAwareConfig::default()
            }),
            ..LbConfig::default()
        },
    )
    .with_local_zone("a");
    let mut specs = Vec::new();
    for i in 1..=3 {
        specs.push(spec(i).with_locality(loc("a")));
    }
    for i in 4..=6 {
        specs.push(spec(i).with_locality(loc("b")));
    }
    b.update(specs);
    let local = |b: &Balancer| {
        let s = shares(b, 20_000, |_| None);
        (1..=3)
            .map(|i| s.get(&addr(i)).copied().unwrap_or(0.0))
            .sum::<f64>()
    };
    assert!(local(&b) > 0.9999);
    // One of three local endpoints fails: the zone holds 2/5 of the healthy
    // endpoints but 1/2 of the proxies: 80% stay, 20% go to zone b.
    set_health(&b.endpoints().endpoints[0], HealthFlags::FAILED_ACTIVE_HC);
    b.health_changed();
    let l = local(&b);
    assert!((0.77..0.83).contains(&l), "{l}");
}

fn md(pairs: &[(&str, &str)]) -> LbMetadata {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), MetadataValue::from(*v)))
        .collect()
}

#[test]
fn subsets_by_metadata_with_fallbacks() {
    let subset = |fallback| SubsetConfig {
        selectors: vec![vec!["version".to_string()]],
        fallback_policy: fallback,
        default_subset: md(&[("version", "v1")]),
    };
    let specs = vec![
        spec(1).with_metadata(md(&[("version", "v1")])),
        spec(2).with_metadata(md(&[("version", "v2")])),
        spec(3).with_metadata(md(&[("version", "v2")])),
        spec(4),
    ];
    for fallback in [
        SubsetFallback::NoFallback,
        SubsetFallback::AnyEndpoint,
        SubsetFallback::DefaultSubset,
    ] {
        let b = Balancer::with_config(
            LbPolicy::RoundRobin,
            LbConfig {
                subset: Some(subset(fallback)),
                ..LbConfig::default()
            },
        );
        b.update(specs.clone());
        let v2 = md(&[("version", "v2")]);
        let picked: HashSet<_> = (0..100)
            .map(|_| {
                b.pick_with(&PickContext::new().with_metadata_match(&v2))
                    .unwrap()
                    .addr
            })
            .collect();
        assert_eq!(picked, HashSet::from([addr(2), addr(3)]));
        let v9 = md(&[("version", "v9")]);
        let other: HashSet<_> = (0..100)
            .filter_map(|_| b.pick_with(&PickContext::new().with_metadata_match(&v9)))
            .map(|e| e.addr)
            .collect();
        let none: HashSet<_> = (0..100).filter_map(|_| b.pick()).map(|e| e.addr).collect();
        match fallback {
            SubsetFallback::NoFallback => {
                assert!(other.is_empty());
                assert!(none.is_empty());
            }
            SubsetFallback::AnyEndpoint => {
                assert_eq!(other.len(), 4);
                assert_eq!(none.len(), 4);
            }
            SubsetFallback::DefaultSubset => {
                assert_eq!(other, HashSet::from([addr(1)]));
                assert_eq!(none, HashSet::from([addr(1)]));
            }
        }
    }
}

#[test]
fn updates_keep_endpoint_state_and_handle_large_sets() {
    let b = Balancer::new(LbPolicy::LeastRequest);
    b.update((1..=1000).map(spec).collect());
    let e = b.endpoints().endpoints[500].clone();
    e.stats.rq_total.add(9);
    e.health.set(HealthFlags::FAILED_OUTLIER_CHECK);
    assert!(b.update((1..=1001).map(spec).collect()));
    let again = b
        .endpoints()
        .endpoints
        .iter()
        .find(|x| x.addr == e.addr)
        .unwrap()
        .clone();
    assert!(Arc::ptr_eq(&again, &e));
    assert!(!again.health.is_healthy());
    assert!(b.update(Vec::new()));
    assert!(b.pick().is_none());
}
