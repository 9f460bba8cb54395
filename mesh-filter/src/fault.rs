//! Fault injection (`envoy.filters.http.fault`): delay and/or abort a share
//! of requests, to test how callers cope with a slow or failing service
//! without breaking the service.
//!
//! A request first may be delayed (`delay.fixed_delay`, or the
//! `x-envoy-fault-delay-request` header in milliseconds with
//! `header_delay`), then may be aborted (`abort.http_status` /
//! `grpc_status`, or `x-envoy-fault-abort-request` /
//! `x-envoy-fault-abort-grpc-request` with `header_abort`), each with its
//! own percentage (`x-envoy-fault-*-request-percentage` may lower it for
//! header faults). `max_active_faults` caps faults in flight across all
//! workers with one atomic count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use mesh_core::policy::{AbortKind, FaultConfig, FractionalPercent};
use mesh_core::router::CompiledHeaderMatcher;
use mesh_core::stats::{Counter, Gauge, Store};

/// `x-envoy-fault-delay-request`.
pub const DELAY_HEADER: &str = "x-envoy-fault-delay-request";
/// `x-envoy-fault-delay-request-percentage`.
pub const DELAY_PERCENTAGE_HEADER: &str = "x-envoy-fault-delay-request-percentage";
/// `x-envoy-fault-abort-request`.
pub const ABORT_HEADER: &str = "x-envoy-fault-abort-request";
/// `x-envoy-fault-abort-grpc-request`.
pub const ABORT_GRPC_HEADER: &str = "x-envoy-fault-abort-grpc-request";
/// `x-envoy-fault-abort-request-percentage`.
pub const ABORT_PERCENTAGE_HEADER: &str = "x-envoy-fault-abort-request-percentage";
/// `x-envoy-fault-throughput-response`: the response bandwidth in KiB/s
/// (`response_rate_limit.header_limit`).
pub const THROUGHPUT_HEADER: &str = "x-envoy-fault-throughput-response";
/// `x-envoy-fault-throughput-response-percentage`.
pub const THROUGHPUT_PERCENTAGE_HEADER: &str = "x-envoy-fault-throughput-response-percentage";

/// Envoy's fault stats (`http.<stat_prefix>.fault.*`).
#[derive(Debug, Clone, Default)]
pub struct FaultStats {
    /// `delays_injected`.
    pub delays_injected: Counter,
    /// `aborts_injected`.
    pub aborts_injected: Counter,
    /// `response_rl_injected`: responses slowed by `response_rate_limit`.
    pub response_rl_injected: Counter,
    /// `faults_overflow`: faults not injected because of
    /// `max_active_faults`.
    pub faults_overflow: Counter,
    /// `active_faults`.
    pub active_faults: Gauge,
}

impl FaultStats {
    /// Registers the stats of the HCM `stat_prefix`.
    pub fn new(store: &Store, stat_prefix: &str) -> Self {
        let l = vec![("envoy_http_conn_manager_prefix", stat_prefix.to_owned())];
        FaultStats {
            delays_injected: store.counter("envoy_http_fault_delays_injected", &l),
            aborts_injected: store.counter("envoy_http_fault_aborts_injected", &l),
            faults_overflow: store.counter("envoy_http_fault_faults_overflow", &l),
            response_rl_injected: store.counter("envoy_http_fault_response_rl_injected", &l),
            active_faults: store.gauge("envoy_http_fault_active_faults", &l),
        }
    }
}

/// An abort to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// An HTTP status.
    Http(StatusCode),
    /// A gRPC status (HTTP 200, trailers-only).
    Grpc(u32),
}

/// What to do to one request.
#[derive(Debug, Default)]
pub struct Fault {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then answer with this.
    pub abort: Option<Abort>,
    /// Deliver the response body at this many KiB per second
    /// ([`crate::throttle::ThrottledBody`]).
    pub response_kbps: Option<u64>,
    /// Counts the fault as active while held.
    pub active: Option<ActiveFault>,
}

/// One active fault, counted until dropped.
#[derive(Debug)]
pub struct ActiveFault {
    injector: Arc<FaultInjector>,
}

impl Drop for ActiveFault {
    fn drop(&mut self) {
        self.injector.active.fetch_sub(1, Ordering::Relaxed);
        self.injector.stats.active_faults.dec();
    }
}

/// A compiled fault configuration.
#[derive(Debug)]
pub struct FaultInjector {
    config: FaultConfig,
    headers: Vec<CompiledHeaderMatcher>,
    active: AtomicU64,
    stats: FaultStats,
}

/// Whether a request falls within `p`.
pub(crate) fn roll(p: FractionalPercent) -> bool {
    if p.numerator >= p.denominator {
        return true;
    }
    p.numerator > 0 && fastrand::u32(0..p.denominator) < p.numerator
}

/// The configured percentage, lowered by a percentage header (a numerator
/// over the same denominator) for header-controlled faults.
fn percentage(configured: FractionalPercent, header: Option<&str>) -> FractionalPercent {
    match header.and_then(|v| v.trim().parse::<u32>().ok()) {
        Some(n) => FractionalPercent {
            numerator: n.min(configured.numerator),
            denominator: configured.denominator,
        },
        None => configured,
    }
}

/// A request or response seen through its headers only (no method, path or
/// authority), for header matchers.
pub(crate) struct View<'a>(pub(crate) &'a HeaderMap);

impl mesh_core::view::RequestView for View<'_> {
    fn method(&self) -> &str {
        ""
    }
    fn path(&self) -> &str {
        ""
    }
    fn query(&self) -> Option<&str> {
        None
    }
    fn authority(&self) -> Option<&str> {
        None
    }
    fn scheme(&self) -> Option<&str> {
        None
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

impl FaultInjector {
    /// Compiles `config`, counting in `stats`.
    pub fn new(config: &FaultConfig, stats: FaultStats) -> Result<Arc<Self>, String> {
        let headers = config
            .headers
            .iter()
            .enumerate()
            .map(|(i, m)| {
                CompiledHeaderMatcher::compile(m, &format!("headers[{i}]"))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(FaultInjector {
            config: config.clone(),
            headers,
            active: AtomicU64::new(0),
            stats,
        }))
    }

    /// Decides the fault of a request with `headers` routed to `cluster`.
    pub fn decide(self: &Arc<Self>, headers: &HeaderMap, cluster: Option<&str>) -> Fault {
        let c = &self.config;
        if let Some(want) = &c.upstream_cluster {
            if cluster != Some(want.as_str()) {
                return Fault::default();
            }
        }
        if !self.headers.is_empty() {
            let view = View(headers);
            if !self.headers.iter().all(|m| m.matches(&view)) {
                return Fault::default();
            }
        }
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let delay = c.delay.and_then(|d| {
            let (length, pct) = match d.fixed {
                Some(t) => (Some(t), d.percentage),
                None => (
                    text(DELAY_HEADER)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_millis),
                    percentage(d.percentage, text(DELAY_PERCENTAGE_HEADER)),
                ),
            };
            length.filter(|_| roll(pct))
        });
        let abort = c.abort.and_then(|a| {
            let (abort, pct) = match a.kind {
                AbortKind::Http(s) => (StatusCode::from_u16(s).ok().map(Abort::Http), a.percentage),
                AbortKind::Grpc(g) => (Some(Abort::Grpc(g)), a.percentage),
                AbortKind::Header => {
                    let http = text(ABORT_HEADER)
                        .and_then(|v| v.trim().parse::<u16>().ok())
                        .filter(|s| (200..600).contains(s))
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .map(Abort::Http);
                    let grpc = text(ABORT_GRPC_HEADER)
                        .and_then(|v| v.trim().parse::<u32>().ok())
                        .map(Abort::Grpc);
                    (
                        http.or(grpc),
                        percentage(a.percentage, text(ABORT_PERCENTAGE_HEADER)),
                    )
                }
            };
            abort.filter(|_| roll(pct))
        });
        let response_kbps = c.response_rate_limit.and_then(|r| {
            let (kbps, pct) = match r.limit_kbps {
                Some(k) => (Some(k), r.percentage),
                None => (
                    text(THROUGHPUT_HEADER)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .filter(|k| *k > 0),
                    percentage(r.percentage, text(THROUGHPUT_PERCENTAGE_HEADER)),
                ),
            };
            kbps.filter(|_| roll(pct))
        });
        if delay.is_none() && abort.is_none() && response_kbps.is_none() {
            return Fault::default();
        }
        if let Some(max) = c.max_active_faults {
            if self.active.load(Ordering::Relaxed) >= u64::from(max) {
                self.stats.faults_overflow.inc();
                return Fault::default();
            }
        }
        self.active.fetch_add(1, Ordering::Relaxed);
        self.stats.active_faults.inc();
        if delay.is_some() {
            self.stats.delays_injected.inc();
        }
        if abort.is_some() {
            self.stats.aborts_injected.inc();
        }
        if response_kbps.is_some() {
            self.stats.response_rl_injected.inc();
        }
        Fault {
            delay,
            abort,
            response_kbps,
            active: Some(ActiveFault {
                injector: self.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::policy::{FaultAbort, FaultDelay};

    fn pct(n: u32) -> FractionalPercent {
        FractionalPercent {
            numerator: n,
            denominator: 100,
        }
    }

    #[test]
    fn percentages_hold_within_tolerance() {
        let f = FaultInjector::new(
            &FaultConfig {
                abort: Some(FaultAbort {
                    kind: AbortKind::Http(503),
                    percentage: pct(30),
                }),
                ..FaultConfig::default()
            },
            FaultStats::default(),
        )
        .unwrap();
        let h = HeaderMap::new();
        let n = (0..10_000)
            .filter(|_| f.decide(&h, None).abort.is_some())
            .count();
        assert!((2700..3300).contains(&n), "{n}");
    }

    #[test]
    fn header_faults_and_max_active() {
        let f = FaultInjector::new(
            &FaultConfig {
                delay: Some(FaultDelay {
                    fixed: None,
                    percentage: pct(100),
                }),
                abort: Some(FaultAbort {
                    kind: AbortKind::Header,
                    percentage: pct(100),
                }),
                max_active_faults: Some(1),
                ..FaultConfig::default()
            },
            FaultStats::default(),
        )
        .unwrap();
        let mut h = HeaderMap::new();
        assert!(f.decide(&h, None).active.is_none());
        h.insert(DELAY_HEADER, "250".parse().unwrap());
        h.insert(ABORT_HEADER, "418".parse().unwrap());
        let first = f.decide(&h, None);
        assert_eq!(first.delay, Some(Duration::from_millis(250)));
        assert_eq!(first.abort, Some(Abort::Http(StatusCode::IM_A_TEAPOT)));
        // One fault active: the next request gets none.
        assert!(f.decide(&h, None).active.is_none());
        drop(first);
        h.insert(ABORT_PERCENTAGE_HEADER, "0".parse().unwrap());
        let second = f.decide(&h, None);
        assert!(second.abort.is_none());
        assert!(second.delay.is_some());
    }
}
