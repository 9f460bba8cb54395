//! The HCM's HTTP filter chain as the proxy runs it.
//!
//! `http_filters` compile into a fixed enum per filter (no boxed service
//! per filter per request); each variant runs the same decision logic as
//! its `tower` layer in `mesh-filter`. Filters run in the configured order
//! before the router. A filter may be turned off (`disabled`) or given a
//! different configuration per virtual host or route
//! (`typed_per_filter_config`, keyed by the filter's `name`); the most
//! specific level wins (route, then virtual host, then the filter's own).

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use mesh_core::config::{HeaderMutations, HttpConnectionManager, HttpFilter};
use mesh_core::headers::{CompiledMutations, StreamInfo};
use mesh_core::policy::{
    FilterOverride, LocalRateLimitConfig, PerFilterConfig, RateLimitPolicy, VhRateLimits,
};
use mesh_core::router::CompiledAction;
use mesh_core::router::{RouteMatch, RouteTable};
use mesh_core::stats::Store;
use mesh_core::ResponseFlag;
use mesh_filter::cors::{Cors, CorsDecision, CorsStats};
use mesh_filter::descriptors::{Descriptor, RateLimitEntry, RequestFacts};
use mesh_filter::fault::{Abort, ActiveFault, FaultInjector, FaultStats};
use mesh_filter::local_ratelimit::{LocalRateLimitStats, LocalRateLimiter, Verdict};

/// A compiled local rate limit: the limiter and the headers of its 429s.
#[derive(Debug)]
struct RateLimit {
    limiter: LocalRateLimiter,
    limited_headers: CompiledMutations,
}

impl RateLimit {
    fn new(c: &LocalRateLimitConfig, store: &Store) -> Result<Arc<Self>, String> {
        Ok(Arc::new(RateLimit {
            limiter: LocalRateLimiter::new(c, LocalRateLimitStats::new(store, &c.stat_prefix)),
            limited_headers: CompiledMutations::compile(&HeaderMutations {
                response_add: c.response_headers_to_add.clone(),
                ..HeaderMutations::default()
            })?,
        }))
    }
}

#[derive(Debug)]
enum Kind {
    LocalRateLimit(Arc<RateLimit>),
    Fault(Arc<FaultInjector>),
    Cors(CorsStats),
}

#[derive(Debug)]
struct Filter {
    disabled: bool,
    kind: Kind,
    /// Per-route and per-virtual-host configurations, by the address of
    /// the route's or virtual host's policy (stable for the table's life).
    overrides: HashMap<usize, Override>,
}

#[derive(Debug)]
enum Override {
    Disabled,
    Enabled,
    LocalRateLimit(Arc<RateLimit>),
    Fault(Arc<FaultInjector>),
    Cors(Arc<Cors>),
}

/// What the chain decided for a request.
#[derive(Debug, Default)]
pub enum Decision {
    /// Go on; add these headers to the response.
    #[default]
    Continue,
    /// Go on, and add `x-ratelimit-*` headers to the response.
    ContinueWith(ResponseHeaders),
    /// Answer now.
    Respond(LocalReply),
    /// A fault: wait `delay`, then answer `abort` if any, else run the
    /// chain again from filter `resume`. The fault counts as active while
    /// `active` is held.
    Fault {
        /// How long to wait first.
        delay: Option<std::time::Duration>,
        /// The reply after the wait, if the fault aborts.
        abort: Option<LocalReply>,
        /// Where the chain goes on.
        resume: usize,
        /// The active-fault count.
        active: Option<ActiveFault>,
        /// `response_rate_limit`: the response body's bandwidth, KiB/s.
        response_kbps: Option<u64>,
    },
}

/// Headers a filter adds to the response of a request it let through.
#[derive(Debug)]
pub struct ResponseHeaders(Vec<(HeaderName, HeaderValue)>);

impl ResponseHeaders {
    /// Adds the headers to `headers`.
    pub fn apply(self, headers: &mut HeaderMap) {
        for (k, v) in self.0 {
            headers.insert(k, v);
        }
    }
}

/// A reply made by a filter.
#[derive(Debug)]
pub struct LocalReply {
    /// Status.
    pub status: StatusCode,
    /// Body text.
    pub body: &'static str,
    /// Response flag (none for a CORS preflight answer).
    pub flag: Option<ResponseFlag>,
    /// Extra headers.
    pub headers: HeaderMap,
    /// A gRPC status: the reply is HTTP 200, trailers-only, with it.
    pub grpc_status: Option<u32>,
}

/// The compiled filter chain of one HCM.
#[derive(Debug, Default)]
pub struct FilterChain {
    filters: Vec<Filter>,
    /// Compiled `rate_limits` of routes and virtual hosts, by the address
    /// of their policy (as `overrides`).
    rate_limits: HashMap<usize, Vec<RateLimitEntry>>,
}

/// Adds `h` to the headers the chain's decision puts on the response.
fn add_response_headers(decision: &mut Decision, h: Vec<(HeaderName, HeaderValue)>) {
    match decision {
        Decision::ContinueWith(ResponseHeaders(v)) => v.extend(h),
        _ => *decision = Decision::ContinueWith(ResponseHeaders(h)),
    }
}

fn policy_key<T>(p: &Arc<T>) -> usize {
    Arc::as_ptr(p) as usize
}

impl FilterChain {
    /// Compiles the chain of `config`, with the per-route configurations
    /// found in `routes`.
    pub fn new(
        config: &HttpConnectionManager,
        routes: &RouteTable,
        store: &Store,
    ) -> Result<Self, String> {
        let mut filters = Vec::new();
        for (i, f) in config.http_filters.iter().enumerate() {
            let meta = config.http_filter_meta.get(i).cloned().unwrap_or_default();
            let kind = match f {
                // RBAC runs before every other filter, in `HttpProxy::handle`;
                // `istio.alpn` acts where the router picks a pool, the
                // metadata exchange in `HttpProxy::handle`.
                // `grpc_stats` counts where the response is sent.
                HttpFilter::Router | HttpFilter::Rbac(_) | HttpFilter::GrpcStats(_) => continue,
                HttpFilter::IstioAlpn(_)
                | HttpFilter::IstioPeerMetadata(_)
                | HttpFilter::IstioStats(_) => {
                    // They cannot be turned off per route yet: refuse
                    // rather than ignore a route that says so.
                    let named = |per: &[PerFilterConfig]| per.iter().any(|p| p.filter == meta.name);
                    let per_route = routes.virtual_hosts().iter().any(|vh| {
                        named(&vh.policy.per_filter)
                            || vh.routes().iter().any(|r| named(&r.policy.per_filter))
                    });
                    if per_route || meta.disabled {
                        return Err(format!(
                            "http_filters[{i}]: turning {} off or on per route is not supported (unsupported)",
                            meta.name
                        ));
                    }
                    continue;
                }
                HttpFilter::Fault(c) => Kind::Fault(
                    FaultInjector::new(c, FaultStats::new(store, &config.stat_prefix))
                        .map_err(|e| format!("http_filters[{i}].typed_config.{e}"))?,
                ),
                HttpFilter::Cors => Kind::Cors(CorsStats::new(store, &config.stat_prefix)),
                HttpFilter::LocalRateLimit(c) => {
                    Kind::LocalRateLimit(RateLimit::new(c, store).map_err(|e| {
                        format!("http_filters[{i}].typed_config.response_headers_to_add: {e}")
                    })?)
                }
            };
            let mut overrides = HashMap::new();
            let mut add = |key: usize,
                           per: &[PerFilterConfig],
                           parent: &[PerFilterConfig]|
             -> Result<(), String> {
                if let Some(p) = per.iter().find(|p| p.filter == meta.name) {
                    let o = match (&p.config, &kind) {
                        _ if p.disabled => Override::Disabled,
                        (Some(FilterOverride::Cors(c)), Kind::Cors(stats)) => {
                            // Fields the route leaves unset come from its
                            // virtual host's policy.
                            let up =
                                parent.iter().find(|p| p.filter == meta.name).and_then(
                                    |p| match &p.config {
                                        Some(FilterOverride::Cors(c)) => Some(&**c),
                                        _ => None,
                                    },
                                );
                            Override::Cors(Arc::new(Cors::new(c, up, stats.clone())?))
                        }
                        (Some(FilterOverride::LocalRateLimit(c)), Kind::LocalRateLimit(_)) => {
                            Override::LocalRateLimit(RateLimit::new(c, store)?)
                        }
                        (Some(FilterOverride::Fault(c)), Kind::Fault(_)) => Override::Fault(
                            FaultInjector::new(c, FaultStats::new(store, &config.stat_prefix))?,
                        ),
                        _ => Override::Enabled,
                    };
                    overrides.insert(key, o);
                }
                Ok(())
            };
            for vh in routes.virtual_hosts() {
                add(policy_key(&vh.policy), &vh.policy.per_filter, &[])?;
                for r in vh.routes() {
                    add(
                        policy_key(&r.policy),
                        &r.policy.per_filter,
                        &vh.policy.per_filter,
                    )?;
                }
            }
            filters.push(Filter {
                disabled: meta.disabled,
                kind,
                overrides,
            });
        }
        let mut rate_limits = HashMap::new();
        let mut compile = |key: usize, policies: &[RateLimitPolicy], path: String| {
            if policies.is_empty() {
                return Ok(());
            }
            let compiled = policies
                .iter()
                .enumerate()
                .map(|(k, p)| RateLimitEntry::compile(p, &format!("{path}.rate_limits[{k}]")))
                .collect::<Result<Vec<_>, String>>()?;
            rate_limits.insert(key, compiled);
            Ok::<(), String>(())
        };
        for (v, vh) in routes.virtual_hosts().iter().enumerate() {
            compile(
                policy_key(&vh.policy),
                &vh.policy.rate_limits,
                format!("route_config.virtual_hosts[{v}]"),
            )?;
            for (r, route) in vh.routes().iter().enumerate() {
                compile(
                    policy_key(&route.policy),
                    &route.policy.rate_limits,
                    format!("route_config.virtual_hosts[{v}].routes[{r}].route"),
                )?;
            }
        }
        Ok(FilterChain {
            filters,
            rate_limits,
        })
    }

    /// The descriptors of a request for a limiter of `stage`: the route's
    /// `rate_limits`, and the virtual host's as `vh` (or the route's
    /// `include_vh_rate_limits`) says.
    fn descriptors<B>(
        &self,
        m: Option<&RouteMatch<'_>>,
        req: &Request<B>,
        info: &StreamInfo,
        stage: u32,
        vh: VhRateLimits,
    ) -> Vec<Descriptor> {
        let mut out = Vec::new();
        let Some(m) = m else {
            return out;
        };
        let CompiledAction::Route(action) = &m.route.action else {
            return out;
        };
        let names = action.cluster_names();
        let facts = RequestFacts {
            remote: info.downstream_remote,
            // A weighted route's cluster is chosen after the filters run.
            cluster: (names.len() == 1).then(|| &*names[0]),
        };
        let mut add = |key: usize| -> bool {
            let Some(entries) = self.rate_limits.get(&key) else {
                return false;
            };
            for e in entries.iter().filter(|e| e.stage() == stage) {
                out.extend(e.descriptor(req, facts));
            }
            true
        };
        let route_has = add(policy_key(&m.route.policy));
        let vh = if m.route.policy.include_vh_rate_limits {
            VhRateLimits::Include
        } else {
            vh
        };
        match vh {
            VhRateLimits::Include => {
                add(policy_key(&m.vhost.policy));
            }
            VhRateLimits::Override if !route_has => {
                add(policy_key(&m.vhost.policy));
            }
            _ => {}
        }
        out
    }

    /// Whether there is no filter besides the router.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Runs the request side of every filter for a request that matched
    /// `m` (or no route).
    pub fn on_request<B>(
        &self,
        m: Option<&RouteMatch<'_>>,
        info: &StreamInfo,
        req: &Request<B>,
        start: usize,
    ) -> Decision {
        let headers = req.headers();
        let mut decision = Decision::Continue;
        for (i, f) in self.filters.iter().enumerate().skip(start) {
            let o = m.and_then(|m| {
                let route = (!m.route.policy.per_filter.is_empty())
                    .then(|| f.overrides.get(&policy_key(&m.route.policy)))
                    .flatten();
                route.or_else(|| {
                    (!m.vhost.policy.per_filter.is_empty())
                        .then(|| f.overrides.get(&policy_key(&m.vhost.policy)))
                        .flatten()
                })
            });
            if matches!(o, Some(Override::Disabled)) || (o.is_none() && f.disabled) {
                continue;
            }
            let rl = match (&f.kind, o) {
                (Kind::Cors(_), o) => {
                    // Without a policy on the route or virtual host, CORS
                    // does nothing (as in Envoy).
                    let Some(Override::Cors(cors)) = o else {
                        continue;
                    };
                    match cors.decide(req.method(), headers) {
                        CorsDecision::Skip => {}
                        CorsDecision::Preflight(h) => {
                            return Decision::Respond(LocalReply {
                                status: StatusCode::OK,
                                body: "",
                                flag: None,
                                headers: h,
                                grpc_status: None,
                            })
                        }
                        CorsDecision::Actual(h) => add_response_headers(&mut decision, h),
                    }
                    continue;
                }
                (Kind::LocalRateLimit(_), Some(Override::LocalRateLimit(r))) => r,
                (Kind::LocalRateLimit(r), _) => r,
                (Kind::Fault(default), o) => {
                    let injector = match o {
                        Some(Override::Fault(x)) => x,
                        _ => default,
                    };
                    let cluster = m.and_then(|m| match &m.route.action {
                        CompiledAction::Route(a) => a.cluster_names().into_iter().next(),
                        _ => None,
                    });
                    let fault = injector.decide(headers, cluster.as_deref());
                    if fault.active.is_none() {
                        continue;
                    }
                    let abort = fault.abort.map(|a| match a {
                        Abort::Http(status) => LocalReply {
                            status,
                            body: "fault filter abort",
                            flag: Some(ResponseFlag::FaultInjected),
                            headers: HeaderMap::new(),
                            grpc_status: None,
                        },
                        Abort::Grpc(g) => LocalReply {
                            status: StatusCode::OK,
                            body: "fault filter abort",
                            flag: Some(ResponseFlag::FaultInjected),
                            headers: HeaderMap::new(),
                            grpc_status: Some(g),
                        },
                    });
                    return Decision::Fault {
                        delay: fault.delay,
                        abort,
                        resume: i + 1,
                        active: fault.active,
                        response_kbps: fault.response_kbps,
                    };
                }
            };
            let descriptors = if rl.limiter.has_descriptors() {
                let c = &rl.limiter.config;
                self.descriptors(m, req, info, c.stage, c.vh_rate_limits)
            } else {
                Vec::new()
            };
            let (verdict, bucket) = rl.limiter.check_descriptors(&descriptors);
            let rate_headers = rl.limiter.rate_limit_headers(bucket);
            if verdict == Verdict::Limited {
                let mut headers = HeaderMap::new();
                rl.limited_headers.response.apply(&mut headers, info);
                if let Some(h) = rate_headers {
                    for (v, k) in h {
                        headers.insert(HeaderName::from_static(k), v);
                    }
                }
                return Decision::Respond(LocalReply {
                    status: rl.limiter.status(),
                    body: "local_rate_limited",
                    flag: Some(ResponseFlag::RateLimited),
                    headers,
                    grpc_status: None,
                });
            }
            if let (Some(h), Verdict::Allowed | Verdict::Shadowed) = (rate_headers, verdict) {
                add_response_headers(
                    &mut decision,
                    h.into_iter()
                        .map(|(v, k)| (HeaderName::from_static(k), v))
                        .collect(),
                );
            }
        }
        decision
    }
}
