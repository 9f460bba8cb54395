//! One policy over one flat list of endpoints (a priority level's healthy
//! endpoints, one locality, one subset...). Built lazily on first use, so
//! an endpoint-set update only pays for the lists that are picked from.
//!
//! | policy | structure | pick |
//! |---|---|---|
//! | round robin | smooth weighted schedule | one atomic increment |
//! | random | the same schedule | one random index |
//! | least request, equal weights | — | `choice_count` random endpoints, fewest active wins |
//! | least request, uneven weights | EDF queue (Envoy's) | pop/push, O(log n), under a mutex |
//! | peak EWMA | weighted schedule | two weighted-random candidates, lower `rtt * (active+1)` wins |
//! | ring hash | sorted ring | binary search |
//! | Maglev | lookup table | `table[hash % M]` |

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use mesh_core::config::LbPolicy;

use crate::maglev::Maglev;
use crate::ring_hash::Ring;
use crate::{Endpoint, Settings};

/// The longest round-robin schedule we precompute for small sets; larger
/// weight sums are scaled down (never below one slot per endpoint).
const MAX_SCHEDULE: u64 = 1 << 14;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A smooth weighted schedule: index `i` appears `weights[i]` times (after
/// scaling), spread out — with 3:1 weights `0 0 1 0`, never `0 0 0 1`.
/// Built as earliest-deadline-first with deadlines `(k + 1/2) / w`: O(total
/// log n), and O(n) when all weights are equal.
pub(crate) fn smooth_schedule(weights: &[u64]) -> Vec<u32> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let g = weights.iter().fold(0, |g, w| gcd(g, (*w).max(1)));
    let mut w: Vec<u64> = weights.iter().map(|x| (*x).max(1) / g.max(1)).collect();
    if w.iter().all(|x| *x == w[0]) {
        return (0..n as u32).collect();
    }
    let sum: u64 = w.iter().sum();
    let target = MAX_SCHEDULE.max(n as u64);
    if sum > target {
        for x in &mut w {
            *x = ((*x as u128 * target as u128 / sum as u128) as u64).max(1);
        }
    }
    let total: u64 = w.iter().sum();
    // Deadline of the k-th slot of i: (2k + 1) / (2 w_i), compared exactly.
    #[derive(PartialEq, Eq)]
    struct Slot {
        num: u64,
        den: u64,
        idx: u32,
    }
    impl Ord for Slot {
        fn cmp(&self, o: &Self) -> CmpOrdering {
            (u128::from(self.num) * u128::from(o.den))
                .cmp(&(u128::from(o.num) * u128::from(self.den)))
                .then(self.idx.cmp(&o.idx))
        }
    }
    impl PartialOrd for Slot {
        fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
            Some(self.cmp(o))
        }
    }
    let mut heap: BinaryHeap<Reverse<Slot>> = w
        .iter()
        .enumerate()
        .map(|(i, x)| {
            Reverse(Slot {
                num: 1,
                den: 2 * x,
                idx: i as u32,
            })
        })
        .collect();
    let mut out = Vec::with_capacity(total as usize);
    while (out.len() as u64) < total {
        let Some(Reverse(mut s)) = heap.pop() else {
            break;
        };
        out.push(s.idx);
        s.num += 2;
        heap.push(Reverse(s));
    }
    out
}

/// Envoy's EDF scheduler for least request with uneven weights: the
/// endpoint with the earliest deadline is picked and rescheduled at
/// `now + 1 / effective weight`, the effective weight being
/// `weight / (active + 1) ^ bias` at that moment.
#[derive(Debug)]
struct Edf {
    now: f64,
    order: u64,
    heap: BinaryHeap<Reverse<EdfEntry>>,
}

#[derive(Debug, PartialEq)]
struct EdfEntry {
    deadline: f64,
    order: u64,
    idx: u32,
}
impl Eq for EdfEntry {}
impl Ord for EdfEntry {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        self.deadline
            .total_cmp(&o.deadline)
            .then(self.order.cmp(&o.order))
    }
}
impl PartialOrd for EdfEntry {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}

fn effective_weight(e: &Endpoint, bias: f64) -> f64 {
    let w = f64::from(e.weight.max(1));
    let active = e.stats.rq_active.get().max(0) as f64;
    if bias == 0.0 {
        w
    } else if bias == 1.0 {
        w / (active + 1.0)
    } else {
        w / (active + 1.0).powf(bias)
    }
}

/// The built selection structure.
#[derive(Debug)]
enum Built {
    Schedule {
        schedule: Vec<u32>,
        next: AtomicUsize,
    },
    LeastRequestEven,
    LeastRequestEdf(Mutex<Edf>),
    Ewma {
        schedule: Vec<u32>,
    },
    Ring(Ring),
    Maglev(Maglev),
}

/// One policy over one list of endpoints, built on first pick.
#[derive(Debug)]
pub(crate) struct Picker {
    pub(crate) hosts: Vec<Arc<Endpoint>>,
    built: OnceLock<Built>,
}

impl Picker {
    pub(crate) fn new(hosts: Vec<Arc<Endpoint>>) -> Self {
        Picker {
            hosts,
            built: OnceLock::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Builds the structure now (off the request path).
    pub(crate) fn warm(&self, s: &Settings) {
        if !self.hosts.is_empty() {
            self.built(s);
        }
    }

    fn built(&self, s: &Settings) -> &Built {
        self.built.get_or_init(|| self.build(s))
    }

    fn build(&self, s: &Settings) -> Built {
        let weights = || -> Vec<u64> {
            self.hosts
                .iter()
                .map(|h| u64::from(h.weight.max(1)))
                .collect()
        };
        match s.policy {
            LbPolicy::RoundRobin | LbPolicy::Random => Built::Schedule {
                schedule: smooth_schedule(&weights()),
                // Start at a random place, so that every worker or proxy
                // does not hit the first endpoint first.
                next: AtomicUsize::new(fastrand::usize(..)),
            },
            LbPolicy::LeastRequest => {
                let w0 = self.hosts[0].weight.max(1);
                if self.hosts.iter().all(|h| h.weight.max(1) == w0) {
                    Built::LeastRequestEven
                } else {
                    let mut heap = BinaryHeap::with_capacity(self.hosts.len());
                    for (i, h) in self.hosts.iter().enumerate() {
                        heap.push(Reverse(EdfEntry {
                            deadline: 1.0 / effective_weight(h, s.config.active_request_bias),
                            order: i as u64,
                            idx: i as u32,
                        }));
                    }
                    Built::LeastRequestEdf(Mutex::new(Edf {
                        now: 0.0,
                        order: self.hosts.len() as u64,
                        heap,
                    }))
                }
            }
            LbPolicy::PeakEwma => Built::Ewma {
                schedule: smooth_schedule(&weights()),
            },
            LbPolicy::RingHash => Built::Ring(Ring::build(
                &self.hosts,
                s.config.minimum_ring_size,
                s.config.maximum_ring_size,
                s.config.use_hostname_for_hashing,
            )),
            LbPolicy::Maglev => Built::Maglev(Maglev::build(
                &self.hosts,
                s.config.maglev_table_size,
                s.config.use_hostname_for_hashing,
            )),
        }
    }

    /// Picks one endpoint. `hash` is used by the hashing policies (a
    /// missing hash picks at random, as Envoy).
    pub(crate) fn pick(&self, s: &Settings, hash: Option<u64>) -> Option<&Arc<Endpoint>> {
        let n = self.hosts.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return self.hosts.first();
        }
        let idx = match self.built(s) {
            Built::Schedule { schedule, next } => {
                let slot = match s.policy {
                    LbPolicy::Random => fastrand::usize(..schedule.len()),
                    _ => next.fetch_add(1, Ordering::Relaxed) % schedule.len(),
                };
                schedule[slot] as usize
            }
            Built::LeastRequestEven => {
                let mut best = fastrand::usize(..n);
                for _ in 1..s.config.choice_count.max(2) {
                    let c = fastrand::usize(..n);
                    if self.hosts[c].stats.rq_active.get() < self.hosts[best].stats.rq_active.get()
                    {
                        best = c;
                    }
                }
                best
            }
            Built::LeastRequestEdf(edf) => {
                let mut q = edf.lock().unwrap_or_else(|e| e.into_inner());
                let Reverse(top) = q.heap.pop()?;
                q.now = top.deadline;
                let w =
                    effective_weight(&self.hosts[top.idx as usize], s.config.active_request_bias);
                let order = q.order;
                q.order += 1;
                let deadline = q.now + 1.0 / w.max(1e-9);
                q.heap.push(Reverse(EdfEntry {
                    deadline,
                    order,
                    idx: top.idx,
                }));
                top.idx as usize
            }
            Built::Ewma { schedule } => {
                let now = tokio::time::Instant::now();
                let a = schedule[fastrand::usize(..schedule.len())] as usize;
                let mut b = schedule[fastrand::usize(..schedule.len())] as usize;
                if a == b {
                    b = (a + 1 + fastrand::usize(..n - 1)) % n;
                }
                let cost = |i: usize| {
                    let h = &self.hosts[i];
                    h.rtt.estimate_at(now) * (h.stats.rq_active.get().max(0) as f64 + 1.0)
                };
                // Equal costs (no samples yet) keep the first candidate,
                // which was drawn by weight, so weights hold on a cold start.
                let (ca, cb) = (cost(a), cost(b));
                if cb < ca * 0.999 {
                    b
                } else {
                    a
                }
            }
            Built::Ring(r) => r.pick(hash.unwrap_or_else(|| fastrand::u64(..)))?,
            Built::Maglev(m) => m.pick(hash.unwrap_or_else(|| fastrand::u64(..)))?,
        };
        self.hosts.get(idx)
    }
}
