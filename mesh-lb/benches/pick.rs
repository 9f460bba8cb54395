//! Pick cost of each balancer at 10, 1,000 and 10,000 endpoints, and the
//! cost of applying an endpoint-set update of 10,000 endpoints.
//!
//! `cargo bench -p mesh-lb -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use mesh_core::config::LbPolicy;
use mesh_lb::{Balancer, EndpointSpec, PickContext};

fn specs(n: usize, uneven: bool) -> Vec<EndpointSpec> {
    (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080));
            let w = if uneven { 1 + (i % 3) as u32 } else { 1 };
            EndpointSpec::new(addr).with_weight(w)
        })
        .collect()
}

const POLICIES: [(&str, LbPolicy); 6] = [
    ("round_robin", LbPolicy::RoundRobin),
    ("random", LbPolicy::Random),
    ("least_request", LbPolicy::LeastRequest),
    ("peak_ewma", LbPolicy::PeakEwma),
    ("ring_hash", LbPolicy::RingHash),
    ("maglev", LbPolicy::Maglev),
];

fn pick(c: &mut Criterion) {
    for uneven in [false, true] {
        let mut g = c.benchmark_group(if uneven { "pick_weighted" } else { "pick" });
        for (name, policy) in POLICIES {
            for n in [10usize, 1_000, 10_000] {
                let b = Balancer::new(policy);
                b.update(specs(n, uneven));
                let mut key = 0u64;
                g.bench_with_input(BenchmarkId::new(name, n), &n, |bench, _| {
                    bench.iter(|| {
                        key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                        let ctx = PickContext::new().with_hash(Some(key));
                        black_box(b.pick_with(&ctx))
                    })
                });
            }
        }
        g.finish();
    }
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("update_10000");
    g.sample_size(10);
    for (name, policy) in [
        ("round_robin", LbPolicy::RoundRobin),
        ("least_request", LbPolicy::LeastRequest),
        ("ring_hash", LbPolicy::RingHash),
        ("maglev", LbPolicy::Maglev),
    ] {
        let all = specs(10_000, false);
        // From nothing to 10,000 endpoints.
        g.bench_function(BenchmarkId::new(format!("{name}/fresh"), 10_000), |bench| {
            bench.iter_batched(
                || (Balancer::new(policy), all.clone()),
                |(b, s)| {
                    b.update(s);
                    b
                },
                BatchSize::LargeInput,
            )
        });
        // One endpoint of 10,000 replaced: the others keep their state.
        let mut changed = all.clone();
        changed[0].addr = SocketAddr::from(([192, 168, 0, 1], 8080));
        g.bench_function(
            BenchmarkId::new(format!("{name}/one_changed"), 10_000),
            |bench| {
                bench.iter_batched(
                    || {
                        let b = Balancer::new(policy);
                        b.update(all.clone());
                        (b, changed.clone())
                    },
                    |(b, s)| {
                        b.update(s);
                        b
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

criterion_group!(benches, pick, update);
criterion_main!(benches);
