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

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use mesh_core::config::{HeaderMutations, HttpConnectionManager, HttpFilter};
use mesh_core::headers::{CompiledMutations, StreamInfo};
use mesh_core::policy::{FilterOverride, LocalRateLimitConfig, PerFilterConfig};
use mesh_core::router::{RouteMatch, RouteTable};
use mesh_core::stats::Store;
use mesh_core::ResponseFlag;
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
    /// Response flag.
    pub flag: ResponseFlag,
    /// Extra headers.
    pub headers: HeaderMap,
}

/// The compiled filter chain of one HCM.
#[derive(Debug, Default)]
pub struct FilterChain {
    filters: Vec<Filter>,
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
                HttpFilter::Router => continue,
                HttpFilter::LocalRateLimit(c) => {
                    Kind::LocalRateLimit(RateLimit::new(c, store).map_err(|e| {
                        format!("http_filters[{i}].typed_config.response_headers_to_add: {e}")
                    })?)
                }
            };
            let mut overrides = HashMap::new();
            let mut add = |key: usize, per: &[PerFilterConfig]| -> Result<(), String> {
                if let Some(p) = per.iter().find(|p| p.filter == meta.name) {
                    let o = match (&p.config, &kind) {
                        _ if p.disabled => Override::Disabled,
                        (Some(FilterOverride::LocalRateLimit(c)), Kind::LocalRateLimit(_)) => {
                            Override::LocalRateLimit(RateLimit::new(c, store)?)
                        }
                        _ => Override::Enabled,
                    };
                    overrides.insert(key, o);
                }
                Ok(())
            };
            for vh in routes.virtual_hosts() {
                add(policy_key(&vh.policy), &vh.policy.per_filter)?;
                for r in vh.routes() {
                    add(policy_key(&r.policy), &r.policy.per_filter)?;
                }
            }
            filters.push(Filter {
                disabled: meta.disabled,
                kind,
                overrides,
            });
        }
        Ok(FilterChain { filters })
    }

    /// Whether there is no filter besides the router.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Runs the request side of every filter for a request that matched
    /// `m` (or no route).
    pub fn on_request(&self, m: Option<&RouteMatch<'_>>, info: &StreamInfo) -> Decision {
        let mut decision = Decision::Continue;
        for f in &self.filters {
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
            let Kind::LocalRateLimit(default) = &f.kind;
            let rl = match o {
                Some(Override::Disabled) => continue,
                Some(Override::Enabled) => default,
                Some(Override::LocalRateLimit(r)) => r,
                None if f.disabled => continue,
                None => default,
            };
            let verdict = rl.limiter.check();
            let rate_headers = rl.limiter.rate_limit_headers();
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
                    flag: ResponseFlag::RateLimited,
                    headers,
                });
            }
            if let (Some(h), Verdict::Allowed | Verdict::Shadowed) = (rate_headers, verdict) {
                decision = Decision::ContinueWith(ResponseHeaders(
                    h.into_iter()
                        .map(|(v, k)| (HeaderName::from_static(k), v))
                        .collect(),
                ));
            }
        }
        decision
    }
}
