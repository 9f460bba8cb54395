//! Traffic policy fields: route and virtual-host `retry_policy`, cluster
//! `circuit_breakers`, `typed_per_filter_config`, and the HCM's
//! `http_filters` chain (Envoy `config.route.v3.RetryPolicy`,
//! `config.cluster.v3.CircuitBreakers`, `HttpFilter`).

use std::net::IpAddr;
use std::time::Duration;

use mesh_core::config::HttpFilter;
use mesh_core::policy::{AbortKind, FaultAbort, FaultConfig, FaultDelay};
use mesh_core::policy::{
    CircuitBreakers, FilterOverride, FractionalPercent, HttpFilterMeta, LocalRateLimitConfig,
    PerFilterConfig, RetryBudget, RetryOn, RetryPolicy, RoutingPriority, Thresholds,
    TokenBucketConfig,
};

use super::reader::{as_int, Ctx, Obj};
use super::route::header_matcher;
use super::{select_extension, Known};

const ROUTER: &str = "envoy.filters.http.router";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_HOSTS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";
const FILTER_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.FilterConfig";

const FAULT: &str = "envoy.filters.http.fault";
const FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const LOCAL_RATELIMIT: &str = "envoy.filters.http.local_ratelimit";
const LOCAL_RATELIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

const CORS: &str = "envoy.filters.http.cors";
const CORS_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors";
const CORS_POLICY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";

const RBAC: &str = "envoy.filters.http.rbac";
const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const ISTIO_ALPN: &str = "istio.alpn";
const ISTIO_MX: &str = "istio.metadata_exchange";
const ISTIO_STATS: &str = "istio.stats";

/// The HTTP filters mesh knows, by canonical name and type URL.
const HTTP_FILTERS: &[Known] = &[
    Known {
        name: RBAC,
        type_url: RBAC_TYPE,
    },
    Known {
        name: ROUTER,
        type_url: ROUTER_TYPE,
    },
    Known {
        name: LOCAL_RATELIMIT,
        type_url: LOCAL_RATELIMIT_TYPE,
    },
    Known {
        name: FAULT,
        type_url: FAULT_TYPE,
    },
    Known {
        name: CORS,
        type_url: CORS_TYPE,
    },
    Known {
        name: ISTIO_ALPN,
        type_url: super::istio::ALPN_TYPE,
    },
    Known {
        name: ISTIO_MX,
        type_url: super::istio::PEER_METADATA_TYPE,
    },
    Known {
        name: ISTIO_STATS,
        type_url: super::istio::STATS_TYPE,
    },
    Known {
        name: super::grpc_stats::NAME,
        type_url: super::grpc_stats::TYPE,
    },
];

/// A `retry_policy` (route or virtual host).
pub(crate) fn retry_policy(cx: &mut Ctx, mut o: Obj<'_>) -> RetryPolicy {
    let mut p = RetryPolicy::default();
    let on_path = o.at("retry_on");
    if let Some(list) = o.string(cx, "retry_on") {
        let (on, unknown) = RetryOn::parse(&list, false);
        // Envoy logs unknown tokens and ignores them; mesh refuses them so a
        // typo never silently disables retries.
        if !unknown.is_empty() {
            cx.error(
                &on_path,
                format!(
                    "unknown retry_on condition(s) {}; known: {}",
                    unknown.join(", "),
                    RetryOn::HTTP_TOKENS
                        .iter()
                        .chain(RetryOn::GRPC_TOKENS.iter())
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        p.retry_on = on;
    }
    if let Some(n) = o.u32(cx, "num_retries") {
        p.num_retries = n;
    }
    p.per_try_timeout = o.duration(cx, "per_try_timeout").filter(|d| !d.is_zero());
    p.per_try_idle_timeout = o
        .duration(cx, "per_try_idle_timeout")
        .filter(|d| !d.is_zero());
    for (path, v) in o.list(cx, "retriable_status_codes") {
        if let Some(c) = as_int(cx, &path, v, 100, 599) {
            p.retriable_status_codes.push(c as u16);
        }
    }
    for (path, v) in o.list(cx, "retriable_headers") {
        if let Some(h) = Obj::new(cx, path, v) {
            p.retriable_headers.push(header_matcher(cx, h));
        }
    }
    for (path, v) in o.list(cx, "retriable_request_headers") {
        if let Some(h) = Obj::new(cx, path, v) {
            p.retriable_request_headers.push(header_matcher(cx, h));
        }
    }
    if let Some(mut b) = o.obj(cx, "retry_back_off") {
        let base_path = b.at("base_interval");
        match b.duration(cx, "base_interval") {
            Some(d) if d.is_zero() => cx.error(&base_path, "must be greater than 0s"),
            Some(d) => {
                p.base_interval = d;
                p.max_interval = d * 10;
            }
            None => {
                if !b.has("base_interval") {
                    cx.missing(&base_path);
                }
            }
        }
        let max_path = b.at("max_interval");
        match b.duration(cx, "max_interval") {
            Some(d) if d.is_zero() => cx.error(&max_path, "must be greater than 0s"),
            Some(d) if d < p.base_interval => {
                cx.error(&max_path, "must be greater than or equal to base_interval")
            }
            Some(d) => p.max_interval = d,
            None => {}
        }
        b.finish(cx);
    }
    host_selection(cx, &mut o, &mut p);
    o.refuse(cx, "retry_priority", "retry priorities are not supported");
    o.refuse(
        cx,
        "rate_limited_retry_back_off",
        "rate-limited back-off is not supported",
    );
    o.refuse(
        cx,
        "retry_options_predicates",
        "retry options predicates are not supported",
    );
    o.finish(cx);
    p
}

/// `retry_host_predicate` (only `previous_hosts`) and
/// `host_selection_retry_max_attempts` of a retry policy (HTTP or RPC).
pub(crate) fn host_selection(cx: &mut Ctx, o: &mut Obj<'_>, p: &mut RetryPolicy) {
    for (path, v) in o.list(cx, "retry_host_predicate") {
        let Some(mut pred) = Obj::new(cx, path, v) else {
            continue;
        };
        let known = [Known {
            name: PREVIOUS_HOSTS,
            type_url: PREVIOUS_HOSTS_TYPE,
        }];
        if let Some((_, tc)) = select_extension(cx, &mut pred, "retry host predicate", &known) {
            if let Some(tc) = tc {
                tc.finish(cx);
            }
            p.previous_hosts = true;
        }
        pred.finish(cx);
    }
    let attempts_path = o.at("host_selection_retry_max_attempts");
    if let Some(v) = o.take("host_selection_retry_max_attempts") {
        if let Some(n) = as_int(cx, &attempts_path, v, i64::MIN.into(), i64::MAX.into()) {
            // Envoy treats anything below 1 as 1.
            p.host_selection_retry_max_attempts = n.clamp(1, 100) as u32;
        }
    }
}

/// A route's `priority` (`DEFAULT` or `HIGH`).
pub(crate) fn routing_priority(cx: &mut Ctx, o: &mut Obj<'_>) -> RoutingPriority {
    o.enumeration(
        cx,
        "priority",
        &[
            ("DEFAULT", RoutingPriority::Default),
            ("HIGH", RoutingPriority::High),
        ],
        &[],
    )
    .unwrap_or_default()
}

/// A cluster's `circuit_breakers`.
pub(crate) fn circuit_breakers(cx: &mut Ctx, mut o: Obj<'_>) -> CircuitBreakers {
    let mut out = CircuitBreakers::default();
    out.high.priority = RoutingPriority::High;
    let mut seen = [false; 2];
    for (path, v) in o.list(cx, "thresholds") {
        let Some(t) = Obj::new(cx, path.clone(), v) else {
            continue;
        };
        let t = thresholds(cx, t);
        let slot = match t.priority {
            RoutingPriority::Default => 0,
            RoutingPriority::High => 1,
        };
        if seen[slot] {
            cx.error(
                &path,
                format!(
                    "a second thresholds entry for priority {}",
                    t.priority.as_str().to_ascii_uppercase()
                ),
            );
        }
        seen[slot] = true;
        match t.priority {
            RoutingPriority::Default => out.default = t,
            RoutingPriority::High => out.high = t,
        }
    }
    o.refuse(
        cx,
        "per_host_thresholds",
        "per-host thresholds are not supported",
    );
    o.finish(cx);
    out
}

fn thresholds(cx: &mut Ctx, mut o: Obj<'_>) -> Thresholds {
    let mut t = Thresholds {
        priority: routing_priority(cx, &mut o),
        ..Thresholds::default()
    };
    if let Some(n) = o.u32(cx, "max_connections") {
        t.max_connections = n.into();
    }
    if let Some(n) = o.u32(cx, "max_pending_requests") {
        t.max_pending_requests = n.into();
    }
    if let Some(n) = o.u32(cx, "max_requests") {
        t.max_requests = n.into();
    }
    if let Some(n) = o.u32(cx, "max_retries") {
        t.max_retries = n.into();
    }
    t.max_connection_pools = o.u32(cx, "max_connection_pools").map(u64::from);
    t.track_remaining = o.bool(cx, "track_remaining").unwrap_or(false);
    if let Some(mut b) = o.obj(cx, "retry_budget") {
        let mut budget = RetryBudget::default();
        if let Some(mut p) = b.obj(cx, "budget_percent") {
            let path = p.at("value");
            match p.take("value") {
                Some(v) => match v.as_f64() {
                    Some(f) if (0.0..=100.0).contains(&f) => budget.budget_percent = f,
                    Some(f) => cx.error(&path, format!("must be from 0 to 100, found {f}")),
                    None => cx.error(&path, "expected a number"),
                },
                None => budget.budget_percent = 0.0,
            }
            p.finish(cx);
        }
        // A `UInt32Value`: a plain number in JSON.
        if let Some(n) = b.u32(cx, "min_retry_concurrency") {
            budget.min_retry_concurrency = n;
        }
        b.finish(cx);
        t.retry_budget = Some(budget);
    }
    o.finish(cx);
    t
}

/// `typed_per_filter_config` of a virtual host or route.
pub(crate) fn per_filter_configs(cx: &mut Ctx, o: &mut Obj<'_>) -> Vec<PerFilterConfig> {
    let mut out = Vec::new();
    let Some(mut m) = o.obj(cx, "typed_per_filter_config") else {
        return out;
    };
    for (name, path, v) in m.take_all() {
        let Some(mut any) = Obj::new(cx, path.clone(), v) else {
            continue;
        };
        let ty_path = any.at("@type");
        let Some(ty) = any.string(cx, "@type") else {
            if !any.has("@type") {
                cx.missing(&ty_path);
            }
            continue;
        };
        let mut entry = PerFilterConfig {
            filter: name.to_owned(),
            disabled: false,
            config: None,
        };
        if ty == FILTER_CONFIG_TYPE {
            // `FilterConfig {config, is_optional, disabled}`.
            entry.disabled = any.bool(cx, "disabled").unwrap_or(false);
            let optional = any.bool(cx, "is_optional").unwrap_or(false);
            if let Some(mut inner) = any.obj(cx, "config") {
                let before = cx.errors.len();
                let ipath = inner.at("@type");
                match inner.string(cx, "@type") {
                    Some(t) => {
                        entry.config = filter_override(cx, &mut inner, &t);
                        if entry.config.is_none() && optional {
                            // Envoy skips an optional per-route config it
                            // does not know.
                            cx.errors.truncate(before);
                            inner.take_all();
                        }
                    }
                    None => cx.missing(&ipath),
                }
                inner.finish(cx);
            }
        } else {
            entry.config = filter_override(cx, &mut any, &ty);
        }
        any.finish(cx);
        out.push(entry);
    }
    m.finish(cx);
    out
}

/// A per-route filter configuration by its `@type`; unknown types are
/// unsupported.
fn filter_override(cx: &mut Ctx, o: &mut Obj<'_>, ty: &str) -> Option<FilterOverride> {
    if ty == ROUTER_TYPE {
        return Some(FilterOverride::Router);
    }
    if ty == FAULT_TYPE {
        return Some(FilterOverride::Fault(Box::new(fault(cx, o))));
    }
    if ty == CORS_POLICY_TYPE {
        return Some(FilterOverride::Cors(Box::new(cors_policy(cx, o))));
    }
    if ty == LOCAL_RATELIMIT_TYPE {
        return Some(FilterOverride::LocalRateLimit(Box::new(local_ratelimit(
            cx, o,
        ))));
    }
    let short = ty.strip_prefix("type.googleapis.com/").unwrap_or(ty);
    cx.unsupported(o.path(), Some(&format!("per-route configuration {short}")));
    o.take_all();
    None
}

/// The HCM's `http_filters`: every filter mesh knows, in order, with the
/// router last. A filter mesh does not know is unsupported unless it is
/// `is_optional` (then skipped, as Envoy skips an optional filter it does
/// not have).
pub(crate) fn http_filters(
    cx: &mut Ctx,
    o: &mut Obj<'_>,
) -> (Vec<HttpFilter>, Vec<HttpFilterMeta>) {
    let path = o.at("http_filters");
    let entries = o.list(cx, "http_filters");
    let count = entries.len();
    let mut out = Vec::new();
    let mut meta = Vec::new();
    let mut last_is_router = false;
    let mut last_unsupported = false;
    for (i, (fpath, v)) in entries.into_iter().enumerate() {
        let Some(mut f) = Obj::new(cx, fpath, v) else {
            continue;
        };
        let optional = f.bool(cx, "is_optional").unwrap_or(false);
        let disabled = f.bool(cx, "disabled").unwrap_or(false);
        let name = f
            .peek("name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        let before = cx.errors.len();
        let selected = select_extension(cx, &mut f, "HTTP filter", HTTP_FILTERS);
        let unknown = selected.is_none()
            && cx.errors[before..].iter().all(|e| e.is_unsupported())
            && cx.errors.len() == before + 1
            && cx.errors[before].path == f.path();
        match selected {
            Some((idx, tc)) => {
                let name = if name.is_empty() {
                    HTTP_FILTERS[idx].name.to_owned()
                } else {
                    name
                };
                match HTTP_FILTERS[idx].name {
                    ROUTER => {
                        if let Some(tc) = tc {
                            // The router's options (suppress_envoy_headers,
                            // ...) are not supported: each is reported by
                            // `finish`.
                            tc.finish(cx);
                        }
                        if disabled {
                            cx.error(f.path(), "the router cannot be disabled");
                        }
                        if i + 1 == count {
                            last_is_router = true;
                        } else {
                            cx.error(
                                f.path(),
                                "envoy.filters.http.router must be the last HTTP filter",
                            );
                        }
                        out.push(HttpFilter::Router);
                    }
                    FAULT => {
                        let c = match tc {
                            Some(mut tc) => {
                                let c = fault(cx, &mut tc);
                                tc.finish(cx);
                                c
                            }
                            None => FaultConfig::default(),
                        };
                        out.push(HttpFilter::Fault(Box::new(c)));
                    }
                    CORS => {
                        if let Some(tc) = tc {
                            // `Cors` has no fields: the policies are per route.
                            tc.finish(cx);
                        }
                        out.push(HttpFilter::Cors);
                    }
                    RBAC => match tc {
                        Some(tc) => {
                            out.push(HttpFilter::Rbac(Box::new(super::rbac::rbac(cx, tc, false))))
                        }
                        None => {
                            cx.missing(&f.at("typed_config"));
                            continue;
                        }
                    },
                    LOCAL_RATELIMIT => match tc {
                        Some(mut tc) => {
                            let c = local_ratelimit(cx, &mut tc);
                            tc.finish(cx);
                            out.push(HttpFilter::LocalRateLimit(Box::new(c)));
                        }
                        None => {
                            cx.missing(&f.at("typed_config"));
                            continue;
                        }
                    },
                    super::grpc_stats::NAME => {
                        let c = match tc {
                            Some(mut tc) => {
                                let c = super::grpc_stats::filter_config(cx, &mut tc);
                                tc.finish(cx);
                                c
                            }
                            None => Default::default(),
                        };
                        if disabled {
                            cx.unsupported(&f.at("disabled"), Some("a disabled grpc_stats"));
                        }
                        out.push(HttpFilter::GrpcStats(Box::new(c)));
                    }
                    ISTIO_ALPN | ISTIO_MX | ISTIO_STATS => {
                        let what = HTTP_FILTERS[idx].name;
                        let built = match tc {
                            Some(tc) => super::istio::http_filter(cx, what, tc),
                            None => {
                                cx.missing(&f.at("typed_config"));
                                None
                            }
                        };
                        let Some(built) = built else { continue };
                        if disabled {
                            cx.unsupported(&f.at("disabled"), Some(&format!("a disabled {what}")));
                        }
                        out.push(built);
                    }
                    _ => {
                        if let Some(tc) = tc {
                            tc.finish(cx);
                        }
                        continue;
                    }
                }
                meta.push(HttpFilterMeta { name, disabled });
            }
            None => {
                if unknown && optional {
                    // Envoy: an optional filter it does not know is skipped.
                    cx.errors.truncate(before);
                    f.take_all();
                    tracing::debug!(filter = %name, "optional HTTP filter skipped: not supported");
                } else {
                    last_unsupported = i + 1 == count && cx.errors.len() > before;
                }
            }
        }
        f.finish(cx);
    }
    if !last_is_router && !last_unsupported {
        cx.error(
            &path,
            "envoy.filters.http.router is required as the last HTTP filter",
        );
    }
    (out, meta)
}

/// `per_request_buffer_limit_bytes` of a route or virtual host.
pub(crate) fn buffer_limit(cx: &mut Ctx, o: &mut Obj<'_>) -> Option<u32> {
    o.u32(cx, "per_request_buffer_limit_bytes")
}

/// The HCM's `internal_address_config`: `cidr_ranges` only.
pub(crate) fn internal_address_config(cx: &mut Ctx, mut o: Obj<'_>) -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    if o.bool(cx, "unix_sockets") == Some(true) {
        cx.unsupported(
            &o.at("unix_sockets"),
            Some("mesh has no Unix socket listeners"),
        );
    }
    for (path, v) in o.list(cx, "cidr_ranges") {
        let Some(mut r) = Obj::new(cx, path, v) else {
            continue;
        };
        let apath = r.at("address_prefix");
        let addr = r
            .req_string(cx, "address_prefix")
            .and_then(|a| match a.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    cx.error(&apath, format!("expected an IP address, found {a:?}"));
                    None
                }
            });
        let lpath = r.at("prefix_len");
        let len = r.u32(cx, "prefix_len").unwrap_or(0);
        r.finish(cx);
        if let Some(ip) = addr {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if len > max {
                cx.error(&lpath, format!("must be at most {max}"));
            } else {
                out.push((ip, len as u8));
            }
        }
    }
    o.finish(cx);
    out
}

/// A `LocalRateLimit` (filter or per-route); the caller finishes `o`.
fn local_ratelimit(cx: &mut Ctx, o: &mut Obj<'_>) -> LocalRateLimitConfig {
    let mut c = LocalRateLimitConfig {
        stat_prefix: o.req_string(cx, "stat_prefix").unwrap_or_default(),
        ..LocalRateLimitConfig::default()
    };
    if let Some(b) = o.obj(cx, "token_bucket") {
        c.token_bucket = token_bucket(cx, b);
    }
    if let Some(p) = o.obj(cx, "filter_enabled") {
        c.filter_enabled = runtime_fraction(cx, p);
    }
    if let Some(p) = o.obj(cx, "filter_enforced") {
        c.filter_enforced = runtime_fraction(cx, p);
    }
    if let Some(mut st) = o.obj(cx, "status") {
        let path = st.at("code");
        if let Some(v) = st.take("code") {
            c.status = match v {
                serde_json::Value::String(name) => match status_by_name(name) {
                    Some(code) => code,
                    None => {
                        cx.error(&path, format!("unknown HTTP status {name:?}"));
                        429
                    }
                },
                v => as_int(cx, &path, v, 200, 599).map_or(429, |n| n as u16),
            };
        }
        st.finish(cx);
    }
    c.x_ratelimit_headers = o
        .enumeration(
            cx,
            "enable_x_ratelimit_headers",
            &[("OFF", false), ("DRAFT_VERSION_03", true)],
            &[],
        )
        .unwrap_or(false);
    c.response_headers_to_add = super::headers::header_options(cx, o, "response_headers_to_add");
    if o.bool(cx, "local_rate_limit_per_downstream_connection") == Some(true) {
        cx.unsupported(
            &o.at("local_rate_limit_per_downstream_connection"),
            Some("mesh's buckets are shared by all connections"),
        );
    }
    c.always_consume_default_token_bucket = o
        .bool(cx, "always_consume_default_token_bucket")
        .unwrap_or(true);
    let stage_path = o.at("stage");
    c.stage = o.u32(cx, "stage").unwrap_or(0);
    if c.stage > 10 {
        cx.error(&stage_path, "must be at most 10");
    }
    c.descriptors = local_descriptors(cx, o);
    c.vh_rate_limits = o
        .enumeration(
            cx,
            "vh_rate_limits",
            &[
                ("OVERRIDE", mesh_core::policy::VhRateLimits::Override),
                ("INCLUDE", mesh_core::policy::VhRateLimits::Include),
                ("IGNORE", mesh_core::policy::VhRateLimits::Ignore),
            ],
            &[],
        )
        .unwrap_or_default();
    o.empty_list(
        cx,
        "rate_limits",
        "rate limits in the filter configuration are not supported; set them on the route",
    );
    o.empty_list(
        cx,
        "request_headers_to_add_when_not_enforced",
        "not supported yet",
    );
    c
}

/// A `type.v3.TokenBucket`; `None` (with errors reported) when invalid.
pub(crate) fn token_bucket(cx: &mut Ctx, mut b: Obj<'_>) -> Option<TokenBucketConfig> {
    let max_path = b.at("max_tokens");
    let max_tokens = match b.u32(cx, "max_tokens") {
        Some(0) => {
            cx.error(&max_path, "must be greater than 0");
            None
        }
        Some(n) => Some(n),
        None => {
            if !b.has("max_tokens") {
                cx.missing(&max_path);
            }
            None
        }
    };
    let fill_path = b.at("tokens_per_fill");
    let tokens_per_fill = match b.u32(cx, "tokens_per_fill") {
        Some(0) => {
            cx.error(&fill_path, "must be greater than 0");
            1
        }
        Some(n) => n,
        None => 1,
    };
    let interval_path = b.at("fill_interval");
    let fill_interval = match b.duration(cx, "fill_interval") {
        Some(d) if d.is_zero() => {
            cx.error(&interval_path, "must be greater than 0s");
            None
        }
        Some(d) => Some(d),
        None => {
            if !b.has("fill_interval") {
                cx.missing(&interval_path);
            }
            None
        }
    };
    b.finish(cx);
    Some(TokenBucketConfig {
        max_tokens: max_tokens?,
        tokens_per_fill,
        fill_interval: fill_interval?,
    })
}

/// A route's or virtual host's `rate_limits`.
pub(crate) fn rate_limits(
    cx: &mut Ctx,
    o: &mut Obj<'_>,
) -> Vec<mesh_core::policy::RateLimitPolicy> {
    let mut out = Vec::new();
    for (path, v) in o.list(cx, "rate_limits") {
        let Some(mut r) = Obj::new(cx, path, v) else {
            continue;
        };
        let stage_path = r.at("stage");
        let stage = r.u32(cx, "stage").unwrap_or(0);
        if stage > 10 {
            cx.error(&stage_path, "must be at most 10");
        }
        r.string(cx, "disable_key");
        r.refuse(
            cx,
            "limit",
            "dynamic rate limit overrides are not supported",
        );
        r.refuse(cx, "hits_addend", "hits_addend is not supported");
        r.refuse(
            cx,
            "apply_on_stream_done",
            "apply_on_stream_done is not supported",
        );
        let actions_path = r.at("actions");
        let mut actions = Vec::new();
        for (apath, av) in r.list(cx, "actions") {
            let Some(mut a) = Obj::new(cx, apath, av) else {
                continue;
            };
            if let Some(action) = rate_limit_action(cx, &mut a) {
                actions.push(action);
            }
            a.finish(cx);
        }
        if actions.is_empty() && !cx.errors.iter().any(|e| e.path.starts_with(&actions_path)) {
            cx.error(&actions_path, "at least one action is required");
        }
        r.finish(cx);
        out.push(mesh_core::policy::RateLimitPolicy { stage, actions });
    }
    out
}

/// One `RateLimit.Action` (exactly one kind of action).
fn rate_limit_action(cx: &mut Ctx, a: &mut Obj<'_>) -> Option<mesh_core::policy::RateLimitAction> {
    use mesh_core::policy::RateLimitAction as A;
    const KINDS: [&str; 5] = [
        "request_headers",
        "remote_address",
        "generic_key",
        "header_value_match",
        "destination_cluster",
    ];
    let kind = super::reader::one_of(cx, a, &KINDS, false);
    let Some(kind) = kind else {
        // Another kind (source_cluster, metadata, ...) is reported by
        // `finish`; none at all is an error.
        if a.is_empty() {
            cx.error(a.path(), "an action is required");
        }
        return None;
    };
    let mut b = a.obj(cx, kind)?;
    let out = match kind {
        "request_headers" => {
            let header_name = b
                .req_string(cx, "header_name")
                .unwrap_or_default()
                .to_ascii_lowercase();
            let descriptor_key = b.req_string(cx, "descriptor_key").unwrap_or_default();
            let skip_if_absent = b.bool(cx, "skip_if_absent").unwrap_or(false);
            A::RequestHeaders {
                header_name,
                descriptor_key,
                skip_if_absent,
            }
        }
        "remote_address" => A::RemoteAddress,
        "destination_cluster" => A::DestinationCluster,
        "generic_key" => {
            let descriptor_value = b.req_string(cx, "descriptor_value").unwrap_or_default();
            let descriptor_key = b
                .string(cx, "descriptor_key")
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| "generic_key".to_owned());
            A::GenericKey {
                descriptor_key,
                descriptor_value,
            }
        }
        _ => {
            let descriptor_value = b.req_string(cx, "descriptor_value").unwrap_or_default();
            let descriptor_key = b
                .string(cx, "descriptor_key")
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| "header_match".to_owned());
            let expect_match = b.bool(cx, "expect_match").unwrap_or(true);
            let headers_path = b.at("headers");
            let mut headers = Vec::new();
            for (path, v) in b.list(cx, "headers") {
                if let Some(h) = Obj::new(cx, path, v) {
                    headers.push(header_matcher(cx, h));
                }
            }
            if headers.is_empty() {
                cx.error(&headers_path, "at least one header matcher is required");
            }
            A::HeaderValueMatch {
                descriptor_key,
                descriptor_value,
                expect_match,
                headers,
            }
        }
    };
    b.finish(cx);
    Some(out)
}

/// `LocalRateLimit.descriptors`.
fn local_descriptors(
    cx: &mut Ctx,
    o: &mut Obj<'_>,
) -> Vec<mesh_core::policy::LocalRateLimitDescriptor> {
    let mut out: Vec<mesh_core::policy::LocalRateLimitDescriptor> = Vec::new();
    for (path, v) in o.list(cx, "descriptors") {
        let Some(mut d) = Obj::new(cx, path.clone(), v) else {
            continue;
        };
        let entries_path = d.at("entries");
        let mut entries = Vec::new();
        for (epath, ev) in d.list(cx, "entries") {
            let Some(mut e) = Obj::new(cx, epath, ev) else {
                continue;
            };
            let key = e.req_string(cx, "key").unwrap_or_default();
            let value_path = e.at("value");
            let value = e.string(cx, "value").unwrap_or_default();
            if value.is_empty() {
                cx.unsupported(
                    &value_path,
                    Some("descriptor entries without a value (one bucket per value) are not supported"),
                );
            }
            e.finish(cx);
            entries.push((key, value));
        }
        if entries.is_empty() {
            cx.error(&entries_path, "at least one entry is required");
        }
        let bucket_path = d.at("token_bucket");
        let bucket = match d.obj(cx, "token_bucket") {
            Some(b) => token_bucket(cx, b),
            None => {
                if !d.has("token_bucket") {
                    cx.missing(&bucket_path);
                }
                None
            }
        };
        d.finish(cx);
        if out.iter().any(|o| o.entries == entries) {
            cx.error(
                &path,
                "duplicate descriptor (same entries as an earlier one)",
            );
        }
        if let Some(token_bucket) = bucket {
            out.push(mesh_core::policy::LocalRateLimitDescriptor {
                entries,
                token_bucket,
            });
        }
    }
    out
}

/// A `CorsPolicy` (per route or virtual host); the caller finishes `o`.
fn cors_policy(cx: &mut Ctx, o: &mut Obj<'_>) -> mesh_core::policy::CorsPolicy {
    let mut c = mesh_core::policy::CorsPolicy::default();
    for (path, v) in o.list(cx, "allow_origin_string_match") {
        if let Some(m) = Obj::new(cx, path, v) {
            if let Some(kind) = super::route::string_matcher(cx, m) {
                c.allow_origin.push(mesh_core::config::HeaderMatcher {
                    name: "origin".to_owned(),
                    kind,
                    invert: false,
                    treat_missing_as_empty: false,
                });
            }
        }
    }
    c.allow_methods = o.string(cx, "allow_methods");
    c.allow_headers = o.string(cx, "allow_headers");
    c.expose_headers = o.string(cx, "expose_headers");
    c.max_age = o.string(cx, "max_age");
    c.allow_credentials = o.bool(cx, "allow_credentials");
    c.allow_private_network_access = o.bool(cx, "allow_private_network_access");
    c.forward_not_matching_preflights = o.bool(cx, "forward_not_matching_preflights");
    c.filter_enabled = o.obj(cx, "filter_enabled").map(|p| runtime_fraction(cx, p));
    c.shadow_enabled = o.obj(cx, "shadow_enabled").map(|p| runtime_fraction(cx, p));
    c
}

/// `envoy.filters.network.local_ratelimit`'s typed config.
pub(crate) fn network_local_ratelimit(
    cx: &mut Ctx,
    mut o: Obj<'_>,
) -> Option<mesh_core::policy::NetworkLocalRateLimit> {
    let stat_prefix = o.req_string(cx, "stat_prefix").unwrap_or_default();
    let bucket_path = o.at("token_bucket");
    let bucket = match o.obj(cx, "token_bucket") {
        Some(b) => token_bucket(cx, b),
        None => {
            if !o.has("token_bucket") {
                cx.missing(&bucket_path);
            }
            None
        }
    };
    if let Some(b) = bucket.filter(|b| b.fill_interval < Duration::from_millis(50)) {
        // Envoy refuses faster refills for connection limits.
        cx.error(
            &format!("{bucket_path}.fill_interval"),
            format!("must be at least 50ms, found {:?}", b.fill_interval),
        );
    }
    let mut enabled = true;
    if let Some(mut f) = o.obj(cx, "runtime_enabled") {
        // A `RuntimeFeatureFlag`: mesh has no runtime layer, so the
        // default applies.
        f.req_string(cx, "runtime_key");
        let value_path = f.at("default_value");
        match f.bool(cx, "default_value") {
            Some(v) => enabled = v,
            None => {
                if !f.has("default_value") {
                    cx.missing(&value_path);
                }
            }
        }
        f.finish(cx);
    }
    let share_path = o.at("share_key");
    if o.string(cx, "share_key").is_some_and(|k| !k.is_empty()) {
        cx.unsupported(
            &share_path,
            Some("token buckets shared between filter chains are not supported"),
        );
    }
    o.finish(cx);
    Some(mesh_core::policy::NetworkLocalRateLimit {
        stat_prefix,
        token_bucket: bucket?,
        enabled,
    })
}

/// A `RuntimeFractionalPercent`: its `default_value` (runtime keys are
/// accepted; mesh has no runtime layer, so the default always applies).
fn runtime_fraction(cx: &mut Ctx, mut o: Obj<'_>) -> FractionalPercent {
    o.string(cx, "runtime_key");
    let out = match o.obj(cx, "default_value") {
        Some(d) => fractional_percent(cx, d),
        None => {
            cx.missing(&o.at("default_value"));
            FractionalPercent::ZERO
        }
    };
    o.finish(cx);
    out
}

/// A `type.v3.FractionalPercent`; the numerator may not exceed the
/// denominator.
pub(crate) fn fractional_percent(cx: &mut Ctx, mut o: Obj<'_>) -> FractionalPercent {
    let num_path = o.at("numerator");
    let numerator = o.u32(cx, "numerator").unwrap_or(0);
    let denominator = o
        .enumeration(
            cx,
            "denominator",
            &[
                ("HUNDRED", 100),
                ("TEN_THOUSAND", 10_000),
                ("MILLION", 1_000_000),
            ],
            &[],
        )
        .unwrap_or(100);
    o.finish(cx);
    if numerator > denominator {
        cx.error(
            &num_path,
            format!("{numerator} is over the denominator {denominator} (more than 100%)"),
        );
        return FractionalPercent {
            numerator: denominator,
            denominator,
        };
    }
    FractionalPercent {
        numerator,
        denominator,
    }
}

/// Envoy's `type.v3.StatusCode` names for the statuses a limiter might
/// answer with.
fn status_by_name(name: &str) -> Option<u16> {
    Some(match name {
        "TooManyRequests" => 429,
        "ServiceUnavailable" => 503,
        "Forbidden" => 403,
        "BadRequest" => 400,
        "InternalServerError" => 500,
        "OK" => 200,
        _ => return None,
    })
}

/// An `HTTPFault` (filter or per-route); the caller finishes `o`.
fn fault(cx: &mut Ctx, o: &mut Obj<'_>) -> FaultConfig {
    let mut c = FaultConfig::default();
    if let Some(mut d) = o.obj(cx, "delay") {
        let fixed = match super::reader::one_of(cx, &d, &["fixed_delay", "header_delay"], true) {
            Some("fixed_delay") => d.duration(cx, "fixed_delay").map(Some),
            Some(_) => {
                d.empty_obj(cx, "header_delay");
                Some(None)
            }
            None => None,
        };
        let percentage = d
            .obj(cx, "percentage")
            .map(|p| fractional_percent(cx, p))
            .unwrap_or(FractionalPercent::ZERO);
        d.finish(cx);
        if let Some(fixed) = fixed {
            c.delay = Some(FaultDelay { fixed, percentage });
        }
    }
    if let Some(mut a) = o.obj(cx, "abort") {
        let keys = ["http_status", "grpc_status", "header_abort"];
        let kind = match super::reader::one_of(cx, &a, &keys, true) {
            Some("http_status") => {
                let path = a.at("http_status");
                a.take("http_status")
                    .and_then(|v| as_int(cx, &path, v, 200, 599))
                    .map(|s| AbortKind::Http(s as u16))
            }
            Some("grpc_status") => a.u32(cx, "grpc_status").map(AbortKind::Grpc),
            Some(_) => {
                a.empty_obj(cx, "header_abort");
                Some(AbortKind::Header)
            }
            None => None,
        };
        let percentage = a
            .obj(cx, "percentage")
            .map(|p| fractional_percent(cx, p))
            .unwrap_or(FractionalPercent::ZERO);
        a.finish(cx);
        if let Some(kind) = kind {
            c.abort = Some(FaultAbort { kind, percentage });
        }
    }
    c.max_active_faults = o.u32(cx, "max_active_faults");
    for (path, v) in o.list(cx, "headers") {
        if let Some(h) = Obj::new(cx, path, v) {
            c.headers.push(header_matcher(cx, h));
        }
    }
    c.upstream_cluster = o.string(cx, "upstream_cluster").filter(|s| !s.is_empty());
    if let Some(mut r) = o.obj(cx, "response_rate_limit") {
        let kind = super::reader::one_of(cx, &r, &["fixed_limit", "header_limit"], true);
        let limit = match kind {
            Some("fixed_limit") => r.obj(cx, "fixed_limit").map(|mut f| {
                let path = f.at("limit_kbps");
                let kbps = match f.u64(cx, "limit_kbps") {
                    Some(0) => {
                        cx.error(&path, "must be at least 1");
                        None
                    }
                    Some(k) => Some(k),
                    None => {
                        if !f.has("limit_kbps") {
                            cx.missing(&path);
                        }
                        None
                    }
                };
                f.finish(cx);
                kbps
            }),
            Some(_) => {
                r.empty_obj(cx, "header_limit");
                Some(None)
            }
            None => None,
        };
        let percentage = r
            .obj(cx, "percentage")
            .map(|p| fractional_percent(cx, p))
            .unwrap_or(FractionalPercent::ZERO);
        r.finish(cx);
        match limit {
            Some(Some(k)) => {
                c.response_rate_limit = Some(mesh_core::policy::FaultRateLimit {
                    limit_kbps: Some(k),
                    percentage,
                })
            }
            Some(None) if kind == Some("header_limit") => {
                c.response_rate_limit = Some(mesh_core::policy::FaultRateLimit {
                    limit_kbps: None,
                    percentage,
                })
            }
            _ => {}
        }
    }
    o.empty_list(cx, "downstream_nodes", "downstream nodes are not supported");
    for key in [
        "delay_percent_runtime",
        "abort_percent_runtime",
        "delay_duration_runtime",
        "abort_http_status_runtime",
        "max_active_faults_runtime",
        "response_rate_limit_percent_runtime",
        "abort_grpc_status_runtime",
    ] {
        o.string(cx, key);
    }
    o.bool(cx, "disable_downstream_cluster_stats");
    c
}

/// `max_grpc_timeout` / `grpc_timeout_offset` and `max_stream_duration` of
/// a route action.
pub(crate) fn grpc_timeouts(cx: &mut Ctx, o: &mut Obj<'_>, p: &mut mesh_core::policy::RoutePolicy) {
    p.grpc_timeout_max = o.duration(cx, "max_grpc_timeout");
    p.grpc_timeout_offset = o.duration(cx, "grpc_timeout_offset");
    if let Some(mut m) = o.obj(cx, "max_stream_duration") {
        p.max_stream_duration = Some(mesh_core::policy::MaxStreamDuration {
            max_stream_duration: m.duration(cx, "max_stream_duration"),
            grpc_timeout_header_max: m.duration(cx, "grpc_timeout_header_max"),
            grpc_timeout_header_offset: m.duration(cx, "grpc_timeout_header_offset"),
        });
        m.finish(cx);
    }
}

/// `RouteAction.request_mirror_policies`.
pub(crate) fn mirror_policies(
    cx: &mut Ctx,
    o: &mut Obj<'_>,
) -> Vec<mesh_core::policy::RequestMirrorPolicy> {
    mirror_policy_list(cx, o, true)
}

/// `request_mirror_policies` of an HTTP route, or (`http` false) of a
/// Thrift or RPC route, whose policies have no
/// `disable_shadow_host_suffix_append`.
pub(crate) fn mirror_policy_list(
    cx: &mut Ctx,
    o: &mut Obj<'_>,
    http: bool,
) -> Vec<mesh_core::policy::RequestMirrorPolicy> {
    let mut out = Vec::new();
    for (path, v) in o.list(cx, "request_mirror_policies") {
        let Some(mut m) = Obj::new(cx, path, v) else {
            continue;
        };
        let cluster_path = m.at("cluster");
        let cluster = m.req_string(cx, "cluster").unwrap_or_default();
        if !cluster.is_empty() {
            cx.cluster_ref(cluster_path, cluster.clone());
        }
        // Envoy mirrors every request when no fraction is given.
        let fraction = m
            .obj(cx, "runtime_fraction")
            .map(|f| runtime_fraction(cx, f))
            .unwrap_or(FractionalPercent::HUNDRED);
        let disable_shadow_host_suffix_append = http
            && m.bool(cx, "disable_shadow_host_suffix_append")
                .unwrap_or(false);
        m.finish(cx);
        if !cluster.is_empty() {
            out.push(mesh_core::policy::RequestMirrorPolicy {
                cluster,
                fraction,
                disable_shadow_host_suffix_append,
            });
        }
    }
    out
}
