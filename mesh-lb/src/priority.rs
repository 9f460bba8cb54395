//! Priority levels, panic mode, locality weights and zone-aware routing on
//! top of any policy, following Envoy's `LoadBalancerBase`.
//!
//! **Priority load.** Each level's *health* is
//! `min(100, overprovisioning_factor * healthy / total)` (in percent, the
//! factor 140 by default), and the same for degraded endpoints. Load (out
//! of 100) goes to levels in priority order by health, normalized by the
//! total availability `min(100, Σ health + degraded)`: with the factor 1.4,
//! a level with 72% healthy endpoints still takes all traffic, and at 50% it
//! keeps 70% of it and spills the rest to the next level. A request picks a
//! level with `hash % 100` (random without a hash).
//!
//! **Panic.** A level whose healthy (plus degraded) share is below
//! `healthy_panic_threshold` (50%) is *in panic*: its traffic goes to all of
//! its endpoints, healthy or not, since a mostly-failed health signal is
//! more likely wrong than the whole level down. When no level has any
//! available endpoint, every level is in panic and load follows endpoint
//! counts. A threshold of 0 disables panic: no healthy endpoint, no pick.
//!
//! **Localities.** With `locality_weighted_lb_config`, a locality is chosen
//! first by `load_balancing_weight * min(1, factor * healthy / total)` of
//! that locality, then an endpoint in it.
//!
//! **Zone-aware routing.** With `zone_aware_lb_config` and the proxy's own
//! zone known, priority 0 (not in panic, at least `min_cluster_size`
//! endpoints) prefers the local zone. Envoy sizes the preference from the
//! local cluster's spread over zones; mesh has no local cluster and assumes
//! the proxies are spread over zones like the upstream's endpoints. So while
//! the local zone's share of healthy endpoints is at least its share of all
//! endpoints, every request stays in the zone; when the zone loses
//! endpoints, the excess moves to the other zones in proportion to their
//! spare capacity (Envoy's residual routing).
//!
//! Hashing policies (ring hash, Maglev) pick one flat ring per level, as
//! Envoy's thread-aware balancers do: no locality or zone step.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mesh_core::config::{LbPolicy, Locality};

use crate::picker::{smooth_schedule, Picker};
use crate::{Endpoint, HealthFlags, Settings};

fn is_healthy(e: &Endpoint) -> bool {
    let b = e.health.bits();
    b & (HealthFlags::UNHEALTHY_MASK | HealthFlags::DEGRADED) == 0
}

fn is_degraded(e: &Endpoint) -> bool {
    let b = e.health.bits();
    b & HealthFlags::UNHEALTHY_MASK == 0 && b & HealthFlags::DEGRADED != 0
}

/// How a source of endpoints picks: flat, by locality weight, or zone-aware.
#[derive(Debug)]
enum Mode {
    Flat,
    Localities {
        pickers: Vec<Picker>,
        schedule: Vec<u32>,
        next: AtomicUsize,
    },
    Zone {
        local: Picker,
        /// Share of requests kept in the local zone, out of 10000.
        local_share: u64,
        /// Other zones with spare capacity: (picker, cumulative weight).
        residual: Vec<(Picker, u64)>,
    },
}

/// One set of endpoints of a level (healthy, degraded or all).
#[derive(Debug)]
pub(crate) struct Source {
    all: Picker,
    mode: Mode,
}

impl Source {
    fn flat(hosts: Vec<Arc<Endpoint>>) -> Self {
        Source {
            all: Picker::new(hosts),
            mode: Mode::Flat,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    fn warm(&self, s: &Settings) {
        match &self.mode {
            Mode::Flat => self.all.warm(s),
            Mode::Localities { pickers, .. } => pickers.iter().for_each(|p| p.warm(s)),
            Mode::Zone {
                local, residual, ..
            } => {
                self.all.warm(s);
                local.warm(s);
                residual.iter().for_each(|(p, _)| p.warm(s));
            }
        }
    }

    fn pick(&self, s: &Settings, hash: Option<u64>) -> Option<&Arc<Endpoint>> {
        match &self.mode {
            Mode::Flat => self.all.pick(s, hash),
            Mode::Localities {
                pickers,
                schedule,
                next,
            } => {
                if schedule.is_empty() {
                    return None;
                }
                let slot = match s.policy {
                    LbPolicy::RoundRobin => next.fetch_add(1, Ordering::Relaxed) % schedule.len(),
                    _ => fastrand::usize(..schedule.len()),
                };
                pickers[schedule[slot] as usize].pick(s, hash)
            }
            Mode::Zone {
                local,
                local_share,
                residual,
            } => {
                let enabled = s.config.zone_aware.as_ref().is_none_or(|z| {
                    z.routing_enabled >= 100.0 || fastrand::f64() * 100.0 < z.routing_enabled
                });
                if !enabled {
                    return self.all.pick(s, hash);
                }
                if *local_share >= 10000 || fastrand::u64(..10000) < *local_share {
                    if let Some(e) = local.pick(s, hash) {
                        return Some(e);
                    }
                }
                let total = residual.last().map(|r| r.1).unwrap_or(0);
                if total == 0 {
                    return self.all.pick(s, hash);
                }
                let r = fastrand::u64(..total);
                let i = residual.partition_point(|(_, cum)| *cum <= r);
                residual
                    .get(i)
                    .and_then(|(p, _)| p.pick(s, hash))
                    .or_else(|| self.all.pick(s, hash))
            }
        }
    }
}

/// One priority level.
#[derive(Debug)]
struct Level {
    healthy: Source,
    degraded: Source,
    all: Source,
}

/// Which endpoints of a level a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Healthy,
    Degraded,
}

/// A set of endpoints with everything needed to pick among them: the
/// whole cluster, or one subset.
#[derive(Debug)]
pub(crate) struct HostGroup {
    levels: Vec<Level>,
    healthy_load: Vec<u32>,
    degraded_load: Vec<u32>,
    panic: Vec<bool>,
    /// When one level takes all the load: that level, so a pick needs no
    /// random number.
    single: Option<(usize, Kind)>,
    /// Nothing can ever be picked.
    empty: bool,
}

impl HostGroup {
    pub(crate) fn build(hosts: &[Arc<Endpoint>], s: &Settings) -> HostGroup {
        let mut by_prio: BTreeMap<u32, Vec<Arc<Endpoint>>> = BTreeMap::new();
        for h in hosts {
            by_prio.entry(h.priority).or_default().push(h.clone());
        }
        let n_levels = by_prio
            .keys()
            .next_back()
            .map(|p| *p as usize + 1)
            .unwrap_or(0);
        let mut per_level: Vec<Vec<Arc<Endpoint>>> = vec![Vec::new(); n_levels];
        for (p, v) in by_prio {
            per_level[p as usize] = v;
        }
        let factor = u64::from(s.config.overprovisioning_factor);
        let weight = |v: &[Arc<Endpoint>], f: &dyn Fn(&Endpoint) -> bool| -> u64 {
            if s.config.weighted_priority_health {
                v.iter()
                    .filter(|e| f(e))
                    .map(|e| u64::from(e.weight.max(1)))
                    .sum()
            } else {
                v.iter().filter(|e| f(e)).count() as u64
            }
        };
        let mut health = vec![0u32; n_levels];
        let mut degraded = vec![0u32; n_levels];
        let mut panic = vec![false; n_levels];
        let threshold = s.config.healthy_panic_threshold;
        for (p, v) in per_level.iter().enumerate() {
            let total = weight(v, &|_| true);
            if total == 0 {
                panic[p] = threshold > 0.0;
                continue;
            }
            let h = weight(v, &is_healthy);
            let d = weight(v, &is_degraded);
            health[p] = (factor * h / total).min(100) as u32;
            degraded[p] = (factor * d / total).min(100) as u32;
            let count = v.len() as f64;
            let hp = 100.0 * v.iter().filter(|e| is_healthy(e)).count() as f64 / count;
            let dp = 100.0 * v.iter().filter(|e| is_degraded(e)).count() as f64 / count;
            panic[p] = hp + dp < threshold;
        }
        let mut healthy_load = vec![0u32; n_levels];
        let mut degraded_load = vec![0u32; n_levels];
        let normalized: u32 = health
            .iter()
            .zip(&degraded)
            .map(|(h, d)| h + d)
            .sum::<u32>()
            .min(100);
        if n_levels > 0 {
            if normalized == 0 {
                if threshold > 0.0 {
                    // Total panic: load by endpoint count.
                    panic.iter_mut().for_each(|p| *p = true);
                    let total: usize = per_level.iter().map(Vec::len).sum();
                    let mut left = 100u32;
                    for (p, v) in per_level.iter().enumerate() {
                        let l = (100 * v.len() / total.max(1)) as u32;
                        healthy_load[p] = l;
                        left -= l;
                    }
                    if let Some(first) = per_level.iter().position(|v| !v.is_empty()) {
                        healthy_load[first] += left;
                    }
                } else {
                    healthy_load[0] = 100;
                    panic.iter_mut().for_each(|p| *p = false);
                }
            } else {
                let distribute = |load: &mut [u32], avail: &[u32], mut total: u32| {
                    let mut first = None;
                    for i in 0..avail.len() {
                        if first.is_none() && avail[i] > 0 {
                            first = Some(i);
                        }
                        load[i] = total.min(avail[i] * 100 / normalized);
                        total -= load[i];
                    }
                    (first, total)
                };
                let (first_h, left) = distribute(&mut healthy_load, &health, 100);
                let (first_d, left) = distribute(&mut degraded_load, &degraded, left);
                if left > 0 {
                    match (first_h, first_d) {
                        (Some(i), _) => healthy_load[i] += left,
                        (None, Some(i)) => degraded_load[i] += left,
                        (None, None) => {}
                    }
                }
            }
        }

        let mut levels = Vec::with_capacity(n_levels);
        for (p, v) in per_level.into_iter().enumerate() {
            let healthy: Vec<_> = v.iter().filter(|e| is_healthy(e)).cloned().collect();
            let deg: Vec<_> = v.iter().filter(|e| is_degraded(e)).cloned().collect();
            let zone_ok = p == 0 && !panic[p];
            levels.push(Level {
                healthy: source(healthy, &v, s, zone_ok),
                degraded: source(deg, &v, s, false),
                all: source(v.clone(), &v, s, false),
            });
        }
        let single = {
            let hl: Vec<usize> = (0..n_levels).filter(|i| healthy_load[*i] > 0).collect();
            let dl: Vec<usize> = (0..n_levels).filter(|i| degraded_load[*i] > 0).collect();
            match (hl.as_slice(), dl.as_slice()) {
                ([p], []) => Some((*p, Kind::Healthy)),
                ([], [p]) => Some((*p, Kind::Degraded)),
                _ => None,
            }
        };
        let empty = levels.iter().all(|l| l.all.is_empty());
        let g = HostGroup {
            levels,
            healthy_load,
            degraded_load,
            panic,
            single,
            empty,
        };
        g.warm(s);
        g
    }

    /// Builds the structures that take load now.
    fn warm(&self, s: &Settings) {
        for (p, l) in self.levels.iter().enumerate() {
            if self.healthy_load[p] + self.degraded_load[p] == 0 {
                continue;
            }
            if self.panic[p] {
                l.all.warm(s);
            } else {
                if self.healthy_load[p] > 0 {
                    l.healthy.warm(s);
                }
                if self.degraded_load[p] > 0 {
                    l.degraded.warm(s);
                }
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.empty
    }

    pub(crate) fn pick(&self, s: &Settings, hash: Option<u64>) -> Option<&Arc<Endpoint>> {
        if self.empty {
            return None;
        }
        let (p, kind) = match self.single {
            Some(x) => x,
            None => {
                let h = hash.unwrap_or_else(|| fastrand::u64(..));
                let mut r = (h % 100) as u32;
                let mut chosen = None;
                for (p, l) in self.healthy_load.iter().enumerate() {
                    if r < *l {
                        chosen = Some((p, Kind::Healthy));
                        break;
                    }
                    r -= l;
                }
                if chosen.is_none() {
                    for (p, l) in self.degraded_load.iter().enumerate() {
                        if r < *l {
                            chosen = Some((p, Kind::Degraded));
                            break;
                        }
                        r -= l;
                    }
                }
                chosen?
            }
        };
        let level = self.levels.get(p)?;
        if self.panic[p] {
            if s.config
                .zone_aware
                .as_ref()
                .is_some_and(|z| z.fail_traffic_on_panic)
            {
                return None;
            }
            return level.all.pick(s, hash);
        }
        match kind {
            Kind::Healthy => level.healthy.pick(s, hash),
            Kind::Degraded => level.degraded.pick(s, hash),
        }
    }
}

fn is_hashing(p: LbPolicy) -> bool {
    matches!(p, LbPolicy::RingHash | LbPolicy::Maglev)
}

/// The source for `hosts` (a subset of the level's endpoints `level`).
fn source(
    hosts: Vec<Arc<Endpoint>>,
    level: &[Arc<Endpoint>],
    s: &Settings,
    zone_ok: bool,
) -> Source {
    if hosts.is_empty() || is_hashing(s.policy) {
        return Source::flat(hosts);
    }
    if s.config.locality_weighted {
        return by_locality(hosts, level, s);
    }
    if zone_ok && s.config.zone_aware.is_some() {
        if let Some(src) = zone_aware(&hosts, level, s) {
            return src;
        }
    }
    Source::flat(hosts)
}

fn by_locality(hosts: Vec<Arc<Endpoint>>, level: &[Arc<Endpoint>], s: &Settings) -> Source {
    let factor = u64::from(s.config.overprovisioning_factor);
    let mut index: HashMap<&Locality, usize> = HashMap::new();
    let mut groups: Vec<(&Locality, Vec<Arc<Endpoint>>)> = Vec::new();
    for h in &hosts {
        let i = *index.entry(&h.locality).or_insert_with(|| {
            groups.push((&h.locality, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(h.clone());
    }
    let mut totals: HashMap<&Locality, u64> = HashMap::new();
    for e in level {
        *totals.entry(&e.locality).or_default() += 1;
    }
    let mut pickers = Vec::new();
    let mut weights = Vec::new();
    for (loc, v) in groups {
        let total = totals.get(loc).copied().unwrap_or(0);
        let lw = u64::from(v[0].locality_weight);
        // Availability in 1/10000, capped at 1.
        let avail = (factor * 100 * v.len() as u64 / total.max(1)).min(10000);
        let w = lw * avail;
        if w > 0 {
            weights.push(w);
            pickers.push(Picker::new(v));
        }
    }
    let schedule = smooth_schedule(&weights);
    Source {
        all: Picker::new(hosts),
        mode: Mode::Localities {
            pickers,
            schedule,
            next: AtomicUsize::new(fastrand::usize(..)),
        },
    }
}

fn zone_aware(hosts: &[Arc<Endpoint>], level: &[Arc<Endpoint>], s: &Settings) -> Option<Source> {
    let zone = s.local_zone.as_deref()?;
    let za = s.config.zone_aware.as_ref()?;
    if (level.len() as u64) < za.min_cluster_size {
        return None;
    }
    let mut zones: BTreeMap<&str, (u64, Vec<Arc<Endpoint>>)> = BTreeMap::new();
    for e in level {
        zones.entry(e.locality.zone.as_str()).or_default().0 += 1;
    }
    for h in hosts {
        zones
            .entry(h.locality.zone.as_str())
            .or_default()
            .1
            .push(h.clone());
    }
    let total_all = level.len() as u64;
    let total_healthy = hosts.len() as u64;
    let (local_all, local_hosts) = zones.get(zone).map(|(a, h)| (*a, h.clone()))?;
    if local_all == 0 {
        return None;
    }
    // Shares in 1/10000: where the proxies are (assumed: like the
    // endpoints) and where the healthy endpoints are.
    let local_pct = local_all * 10000 / total_all;
    let upstream_pct = local_hosts.len() as u64 * 10000 / total_healthy;
    let (local_share, residual) = if upstream_pct >= local_pct {
        (10000, Vec::new())
    } else {
        let share = upstream_pct * 10000 / local_pct;
        let mut cum = 0u64;
        let mut residual = Vec::new();
        for (z, (all, hs)) in &zones {
            if *z == zone || hs.is_empty() {
                continue;
            }
            let up = hs.len() as u64 * 10000 / total_healthy;
            let here = all * 10000 / total_all;
            if up > here {
                cum += up - here;
                residual.push((Picker::new(hs.clone()), cum));
            }
        }
        (share, residual)
    };
    Some(Source {
        all: Picker::new(hosts.to_vec()),
        mode: Mode::Zone {
            local: Picker::new(local_hosts),
            local_share,
            residual,
        },
    })
}
