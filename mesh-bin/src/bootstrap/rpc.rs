//! RPC proxy network filters: Envoy's `envoy.filters.network.thrift_proxy`
//! and `envoy.filters.network.dubbo_proxy`, and mesh's generic
//! `mesh.filters.network.rpc_proxy` (any codec: `bolt`, `dubbo`, `thrift`).
//!
//! Each is translated into one [`RpcProxy`] whose routes are an ordinary
//! [`RouteConfiguration`], so the HTTP router matches RPC requests too:
//!
//! - Thrift: one virtual host `*`; `method_name` is an exact match on
//!   `:method` (the whole method name, `Service:method` when multiplexed),
//!   `service_name` a prefix match on `:method` with `Service:`; `invert`
//!   inverts that matcher; `headers` match Thrift headers.
//! - Dubbo: one virtual host per `interface` (its domain, wildcards
//!   allowed); `group` and `version` become exact matchers on `:group` and
//!   `:version`; `method.name` is a string matcher on `:method`; `headers`
//!   match attachments.
//! - Generic: `match` has `service` and `method` string matchers and
//!   `headers` (names are attachment keys or `:service`, `:method`,
//!   `:version`, `:group`); `route` may set a `timeout`, a `hash_policy`
//!   (`header` names read the same keys), a `metadata_match`, a
//!   `retry_policy` (`num_retries`, `retry_on`, `idempotent`, ...),
//!   `request_mirror_policies` (as Thrift routes have them) and a
//!   `metadata_mutation` (`set`, `remove`: attachments / Bolt headers).

use std::time::Duration;

use mesh_core::config::{
    Action, ClusterSpecifier, HeaderMatchKind, HeaderMatcher, PathMatch, Route, RouteAction,
    RouteConfiguration, RouteMatch, RpcCodec, RpcFault, RpcFilter, RpcProxy, ThriftProtocol,
    VirtualHost,
};
use mesh_core::policy::{MetadataMutation, RetryOn, RetryPolicy, TokenBucketConfig};

use super::listener::access_logs;
use super::policy::token_bucket;
use super::reader::{one_of, Ctx, Obj};
use super::route::{cluster_specifier, header_matcher, string_matcher};

/// The default largest frame (8 MiB).
pub(crate) const DEFAULT_MAX_FRAME: u32 = 8 * 1024 * 1024;

fn matcher(name: &str, kind: HeaderMatchKind, invert: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_owned(),
        kind,
        invert,
        treat_missing_as_empty: false,
    }
}

fn route(matchers: Vec<HeaderMatcher>, action: RouteAction) -> Route {
    Route {
        name: String::new(),
        matcher: RouteMatch {
            path: PathMatch::Prefix(String::new()),
            case_sensitive: true,
            headers: matchers,
            query_parameters: Vec::new(),
            grpc: false,
        },
        action: Action::Route(action),
        headers: Default::default(),
        policy: Default::default(),
    }
}

fn action(cluster: ClusterSpecifier, timeout: Option<Duration>) -> RouteAction {
    RouteAction {
        timeout,
        ..RouteAction::new(cluster)
    }
}

fn headers(cx: &mut Ctx, o: &mut Obj<'_>, out: &mut Vec<HeaderMatcher>) {
    for (path, v) in o.list(cx, "headers") {
        if let Some(h) = Obj::new(cx, path, v) {
            out.push(header_matcher(cx, h));
        }
    }
}

/// A filter list that may only hold the router (`thrift_filters`,
/// `dubbo_filters`).
fn router_only(cx: &mut Ctx, o: &mut Obj<'_>, key: &str, router: &str, type_url: &str) {
    let list = o.list(cx, key);
    let n = list.len();
    for (i, (path, v)) in list.into_iter().enumerate() {
        let Some(mut f) = Obj::new(cx, path, v) else {
            continue;
        };
        let name = f.string(cx, "name");
        let mut ok = name.as_deref() == Some(router);
        if let Some(mut tc) = f.obj(cx, "typed_config") {
            let ty = tc.string(cx, "@type");
            ok = ok || ty.as_deref() == Some(type_url);
            tc.finish(cx);
        }
        if !ok || i + 1 != n {
            cx.unsupported(
                f.path(),
                Some(&format!("only {router} is supported, as the last filter")),
            );
        }
        f.finish(cx);
    }
}

/// `envoy.filters.network.thrift_proxy`'s typed config.
pub(crate) fn thrift_proxy(cx: &mut Ctx, mut o: Obj<'_>) -> RpcProxy {
    let stat_prefix = o.req_string(cx, "stat_prefix").unwrap_or_default();
    // (framed, header)
    let (framed, header) = o
        .enumeration(
            cx,
            "transport",
            &[
                ("AUTO_TRANSPORT", (None, false)),
                ("FRAMED", (Some(true), false)),
                ("UNFRAMED", (Some(false), false)),
                ("HEADER", (None, true)),
            ],
            &[],
        )
        .unwrap_or_default();
    let protocol = o
        .enumeration(
            cx,
            "protocol",
            &[
                ("AUTO_PROTOCOL", None),
                ("BINARY", Some(ThriftProtocol::Binary)),
                ("LAX_BINARY", Some(ThriftProtocol::LaxBinary)),
                ("COMPACT", Some(ThriftProtocol::Compact)),
            ],
            &[("TWITTER", "the Twitter protocol is not supported")],
        )
        .flatten();
    o.refuse(cx, "trds", "TRDS arrives with xDS");
    router_only(
        cx,
        &mut o,
        "thrift_filters",
        "envoy.filters.thrift.router",
        "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.router.v3.Router",
    );
    // mesh always passes the payload through untouched.
    o.bool(cx, "payload_passthrough");
    o.refuse(cx, "max_requests_per_connection", "not supported yet");
    // Header transport keys are lower-cased unless asked to keep their
    // case (matches ignore it either way).
    let lowercase_header_keys = o.bool(cx, "header_keys_preserve_case") != Some(true);
    let access_log = access_logs(cx, &mut o);
    let mut routes = Vec::new();
    let mut rc_name = String::new();
    if let Some(mut rc) = o.req_obj(cx, "route_config") {
        rc_name = rc.string(cx, "name").unwrap_or_default();
        rc.bool(cx, "validate_clusters");
        for (path, v) in rc.list(cx, "routes") {
            if let Some(r) = Obj::new(cx, path, v) {
                if let Some(r) = thrift_route(cx, r) {
                    routes.push(r);
                }
            }
        }
        rc.finish(cx);
    }
    o.finish(cx);
    RpcProxy {
        filter: RpcFilter::Thrift,
        stat_prefix,
        codec: RpcCodec::Thrift {
            framed,
            protocol,
            header,
            lowercase_header_keys,
        },
        route_config: RouteConfiguration {
            name: rc_name,
            virtual_hosts: vec![VirtualHost {
                name: "thrift".into(),
                domains: vec!["*".into()],
                routes,
                headers: Default::default(),
                policy: Default::default(),
            }],
            headers: Default::default(),
        },
        max_frame_size: DEFAULT_MAX_FRAME,
        idle_timeout: None,
        access_log,
        local_rate_limit: None,
        fault: RpcFault::default(),
    }
}

fn thrift_route(cx: &mut Ctx, mut o: Obj<'_>) -> Option<Route> {
    let mut matchers = Vec::new();
    let mut mirrors = Vec::new();
    let mut m = o.req_obj(cx, "match");
    if let Some(m) = m.as_mut() {
        let invert = m.bool(cx, "invert").unwrap_or(false);
        // `method_name` matches the method; `service_name` the
        // `service:` prefix of a multiplexed method name.
        if let Some(key) = one_of(cx, m, &["method_name", "service_name"], true) {
            let mut name = m.string(cx, key).unwrap_or_default();
            if name.is_empty() {
                if invert {
                    cx.error(
                        m.path(),
                        format!("invert cannot be combined with an empty {key}"),
                    );
                }
            } else {
                let kind = if key == "method_name" {
                    HeaderMatchKind::Exact(name)
                } else {
                    if !name.ends_with(':') {
                        name.push(':');
                    }
                    HeaderMatchKind::Prefix(name)
                };
                matchers.push(matcher(":method", kind, invert));
            }
        }
        headers(cx, m, &mut matchers);
    }
    if let Some(m) = m {
        m.finish(cx);
    }
    let a = o.req_obj(cx, "route").map(|mut r| {
        let cluster = cluster_specifier(cx, &mut r, true);
        r.refuse(cx, "cluster_header", "not supported yet");
        let metadata_match = super::lb::metadata_match(cx, &mut r);
        r.refuse(cx, "rate_limits", "not supported yet");
        r.refuse(cx, "strip_service_name", "not supported yet");
        mirrors = super::policy::mirror_policy_list(cx, &mut r, false);
        r.finish(cx);
        let mut a = action(cluster, None);
        a.metadata_match = metadata_match;
        a
    });
    o.finish(cx);
    let mut r = route(matchers, a?);
    r.policy.request_mirror_policies = mirrors;
    Some(r)
}

/// `envoy.filters.network.dubbo_proxy`'s typed config.
pub(crate) fn dubbo_proxy(cx: &mut Ctx, mut o: Obj<'_>) -> RpcProxy {
    let stat_prefix = o.req_string(cx, "stat_prefix").unwrap_or_default();
    o.enumeration(cx, "protocol_type", &[("Dubbo", ())], &[]);
    o.enumeration(cx, "serialization_type", &[("Hessian2", ())], &[]);
    o.refuse(cx, "drds", "DRDS arrives with xDS");
    router_only(
        cx,
        &mut o,
        "dubbo_filters",
        "envoy.filters.dubbo.router",
        "type.googleapis.com/envoy.extensions.filters.network.dubbo_proxy.router.v3.Router",
    );
    let mut configs = Vec::new();
    let mut name = String::new();
    if o.has("route_config") && o.has("multiple_route_config") {
        cx.error(
            o.path(),
            "only one of route_config and multiple_route_config may be set",
        );
    }
    for (path, v) in o.list(cx, "route_config") {
        if let Some(rc) = Obj::new(cx, path, v) {
            configs.push(rc);
        }
    }
    if let Some(mut m) = o.obj(cx, "multiple_route_config") {
        name = m.string(cx, "name").unwrap_or_default();
        for (path, v) in m.list(cx, "route_config") {
            if let Some(rc) = Obj::new(cx, path, v) {
                configs.push(rc);
            }
        }
        m.finish(cx);
    }
    // One virtual host per interface; route configurations that share an
    // interface (different group/version) append to it in order.
    let mut vhosts: Vec<VirtualHost> = Vec::new();
    for mut rc in configs {
        let rc_name = rc.string(cx, "name").unwrap_or_default();
        let interface = rc.string(cx, "interface").unwrap_or_default();
        let domain = if interface.is_empty() {
            "*".to_owned()
        } else {
            interface
        };
        let mut level = Vec::new();
        if let Some(g) = rc.string(cx, "group").filter(|g| !g.is_empty()) {
            level.push(matcher(":group", HeaderMatchKind::Exact(g), false));
        }
        if let Some(v) = rc.string(cx, "version").filter(|v| !v.is_empty()) {
            level.push(matcher(":version", HeaderMatchKind::Exact(v), false));
        }
        let mut routes = Vec::new();
        for (path, v) in rc.list(cx, "routes") {
            if let Some(r) = Obj::new(cx, path, v) {
                if let Some(r) = dubbo_route(cx, r, &level) {
                    routes.push(r);
                }
            }
        }
        rc.finish(cx);
        match vhosts
            .iter_mut()
            .find(|v| v.domains[0].eq_ignore_ascii_case(&domain))
        {
            Some(v) => v.routes.extend(routes),
            None => vhosts.push(VirtualHost {
                name: if rc_name.is_empty() {
                    domain.clone()
                } else {
                    rc_name
                },
                domains: vec![domain],
                routes,
                headers: Default::default(),
                policy: Default::default(),
            }),
        }
    }
    let access_log = access_logs(cx, &mut o);
    o.finish(cx);
    RpcProxy {
        filter: RpcFilter::Dubbo,
        stat_prefix,
        codec: RpcCodec::Dubbo,
        route_config: RouteConfiguration {
            name,
            virtual_hosts: vhosts,
            headers: Default::default(),
        },
        max_frame_size: DEFAULT_MAX_FRAME,
        idle_timeout: None,
        access_log,
        local_rate_limit: None,
        fault: RpcFault::default(),
    }
}

fn dubbo_route(cx: &mut Ctx, mut o: Obj<'_>, level: &[HeaderMatcher]) -> Option<Route> {
    let mut matchers = level.to_vec();
    if let Some(mut m) = o.req_obj(cx, "match") {
        if let Some(mut method) = m.obj(cx, "method") {
            if let Some(n) = method.obj(cx, "name") {
                if let Some(k) = string_matcher(cx, n) {
                    matchers.push(matcher(":method", k, false));
                }
            }
            method.refuse(cx, "params_match", "matching on arguments is not supported");
            method.finish(cx);
        }
        headers(cx, &mut m, &mut matchers);
        m.finish(cx);
    }
    let a = o.req_obj(cx, "route").map(|mut r| {
        let cluster = cluster_specifier(cx, &mut r, true);
        let metadata_match = super::lb::metadata_match(cx, &mut r);
        r.finish(cx);
        let mut a = action(cluster, None);
        a.metadata_match = metadata_match;
        a
    });
    o.finish(cx);
    Some(route(matchers, a?))
}

/// `mesh.filters.network.rpc_proxy`'s typed config.
pub(crate) fn generic_proxy(cx: &mut Ctx, mut o: Obj<'_>) -> RpcProxy {
    let stat_prefix = o.req_string(cx, "stat_prefix").unwrap_or_default();
    let codec = match o.enumeration(
        cx,
        "codec",
        &[("auto", 0u8), ("bolt", 1), ("dubbo", 2), ("thrift", 3)],
        &[],
    ) {
        Some(0) => Some(RpcCodec::Auto),
        Some(1) => Some(RpcCodec::Bolt),
        Some(2) => Some(RpcCodec::Dubbo),
        Some(_) => Some(RpcCodec::Thrift {
            framed: None,
            protocol: None,
            header: false,
            lowercase_header_keys: false,
        }),
        None => {
            if !o.has("codec") {
                cx.missing(&o.at("codec"));
            }
            None
        }
    };
    let max_path = o.at("max_frame_size");
    let max_frame_size = match o.u32(cx, "max_frame_size") {
        Some(n) if n < 64 => {
            cx.error(&max_path, "must be at least 64");
            DEFAULT_MAX_FRAME
        }
        Some(n) => n,
        None => DEFAULT_MAX_FRAME,
    };
    let idle_timeout = o.timeout(cx, "idle_timeout", None);
    let access_log = access_logs(cx, &mut o);
    let local_rate_limit = o
        .obj(cx, "local_rate_limit")
        .and_then(|r| local_rate_limit(cx, r));
    let fault = o.obj(cx, "fault").map(|f| fault(cx, f)).unwrap_or_default();
    let mut routes = Vec::new();
    let mut rc_name = String::new();
    if let Some(mut rc) = o.req_obj(cx, "route_config") {
        rc_name = rc.string(cx, "name").unwrap_or_default();
        for (path, v) in rc.list(cx, "routes") {
            if let Some(r) = Obj::new(cx, path, v) {
                if let Some(r) = generic_route(cx, r, codec.as_ref()) {
                    routes.push(r);
                }
            }
        }
        rc.finish(cx);
    }
    o.finish(cx);
    RpcProxy {
        filter: RpcFilter::Generic,
        stat_prefix,
        codec: codec.unwrap_or(RpcCodec::Bolt),
        route_config: RouteConfiguration {
            name: rc_name,
            virtual_hosts: vec![VirtualHost {
                name: "rpc".into(),
                domains: vec!["*".into()],
                routes,
                headers: Default::default(),
                policy: Default::default(),
            }],
            headers: Default::default(),
        },
        max_frame_size,
        idle_timeout,
        access_log,
        local_rate_limit,
        fault,
    }
}

fn generic_route(cx: &mut Ctx, mut o: Obj<'_>, codec: Option<&RpcCodec>) -> Option<Route> {
    let mut matchers = Vec::new();
    if let Some(mut m) = o.obj(cx, "match") {
        for (key, pseudo) in [("service", ":service"), ("method", ":method")] {
            if let Some(s) = m.obj(cx, key) {
                if let Some(k) = string_matcher(cx, s) {
                    matchers.push(matcher(pseudo, k, false));
                }
            }
        }
        headers(cx, &mut m, &mut matchers);
        m.finish(cx);
    }
    let mut retry = None;
    let mut mirrors = Vec::new();
    let mut mutation = MetadataMutation::default();
    let a = o.req_obj(cx, "route").map(|mut r| {
        let cluster = cluster_specifier(cx, &mut r, true);
        let timeout = r.timeout(cx, "timeout", None);
        let hash_policy = super::lb::hash_policies(cx, &mut r, false);
        let metadata_match = super::lb::metadata_match(cx, &mut r);
        retry = r.obj(cx, "retry_policy").map(|p| retry_policy(cx, p));
        mirrors = super::policy::mirror_policy_list(cx, &mut r, false);
        let mutation_path = r.at("metadata_mutation");
        if let Some(m) = r.obj(cx, "metadata_mutation") {
            mutation = metadata_mutation(cx, m);
            if matches!(codec, Some(RpcCodec::Thrift { .. })) && !mutation.is_empty() {
                cx.error(
                    &mutation_path,
                    "Thrift binary and compact messages carry no headers to change",
                );
            }
        }
        r.finish(cx);
        let mut a = action(cluster, timeout);
        a.hash_policy = hash_policy;
        a.metadata_match = metadata_match;
        a
    });
    o.finish(cx);
    let mut r = route(matchers, a?);
    r.policy.retry_policy = retry;
    r.policy.request_mirror_policies = mirrors;
    r.policy.metadata_mutation = mutation;
    Some(r)
}

/// `metadata_mutation` of an `rpc_proxy` route: `set` [{`key`, `value`}]
/// and `remove` [keys], applied to the request's attachments (Dubbo) or
/// header map (Bolt) after routing.
fn metadata_mutation(cx: &mut Ctx, mut o: Obj<'_>) -> MetadataMutation {
    let mut m = MetadataMutation::default();
    for (path, key) in o.strings(cx, "remove") {
        if key.is_empty() {
            cx.error(&path, "must not be empty");
        } else {
            m.remove.push(key);
        }
    }
    for (path, v) in o.list(cx, "set") {
        let Some(mut kv) = Obj::new(cx, path, v) else {
            continue;
        };
        let key_path = kv.at("key");
        let key = kv.req_string(cx, "key").unwrap_or_default();
        let value = kv.string(cx, "value").unwrap_or_default();
        kv.finish(cx);
        if key.is_empty() {
            cx.error(&key_path, "must not be empty");
        } else {
            m.set.push((key, value));
        }
    }
    o.finish(cx);
    m
}

/// `fault` of an `rpc_proxy`: {`delay` {`fixed_delay`, `percentage`},
/// `abort` {`percentage`}}; percentages are whole numbers 0-100
/// (default 100).
fn fault(cx: &mut Ctx, mut o: Obj<'_>) -> RpcFault {
    fn percent(cx: &mut Ctx, o: &mut Obj<'_>) -> u32 {
        let path = o.at("percentage");
        match o.u32(cx, "percentage") {
            Some(p) if p > 100 => {
                cx.error(&path, "must be at most 100");
                0
            }
            Some(p) => p,
            None => 100,
        }
    }
    let mut f = RpcFault::default();
    if let Some(mut d) = o.obj(cx, "delay") {
        let path = d.at("fixed_delay");
        f.delay = d.duration(cx, "fixed_delay");
        if f.delay.is_none() && !d.has("fixed_delay") {
            cx.missing(&path);
        }
        f.delay_percent = percent(cx, &mut d);
        d.finish(cx);
    }
    if let Some(mut a) = o.obj(cx, "abort") {
        f.abort_percent = percent(cx, &mut a);
        a.finish(cx);
    }
    o.finish(cx);
    f
}

/// `local_rate_limit` of an `rpc_proxy`: {`token_bucket` {`max_tokens`
/// (> 0), `tokens_per_fill` (default 1), `fill_interval` (> 0)}}, one
/// bucket for every connection and worker of the listener.
fn local_rate_limit(cx: &mut Ctx, mut o: Obj<'_>) -> Option<TokenBucketConfig> {
    let out = o
        .req_obj(cx, "token_bucket")
        .and_then(|b| token_bucket(cx, b));
    o.finish(cx);
    out
}

/// The `retry_policy` of an `rpc_proxy` route: `num_retries` (default 1),
/// `retry_on` (comma-separated: `connect-failure`, `reset`),
/// `idempotent`, `per_try_timeout`, `retry_host_predicate`
/// (`previous_hosts`) and `host_selection_retry_max_attempts`, as on HTTP
/// routes. A connect failure is retried safely: the request was never
/// written. `reset` (the upstream connection closed before the response,
/// or a try passed its `per_try_timeout`) resends a request the upstream
/// may have run, so it needs the route to declare its methods
/// `idempotent: true`.
fn retry_policy(cx: &mut Ctx, mut o: Obj<'_>) -> RetryPolicy {
    let num_retries = o.u32(cx, "num_retries").unwrap_or(1);
    let idempotent = o.bool(cx, "idempotent").unwrap_or(false);
    let mut p = RetryPolicy {
        num_retries,
        per_try_timeout: o.duration(cx, "per_try_timeout").filter(|d| !d.is_zero()),
        ..RetryPolicy::default()
    };
    super::policy::host_selection(cx, &mut o, &mut p);
    let on_path = o.at("retry_on");
    let mut retry_on = RetryOn::NONE;
    match o.string(cx, "retry_on") {
        Some(list) => {
            for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                match token {
                    "connect-failure" => retry_on = retry_on | RetryOn::CONNECT_FAILURE,
                    "reset" if idempotent => retry_on = retry_on | RetryOn::RESET,
                    "reset" => cx.error(
                        &on_path,
                        "`reset` resends requests the upstream may have received: \
                         set `idempotent: true` if the route's methods are idempotent",
                    ),
                    other => cx.error(
                        &on_path,
                        format!("unknown RPC retry condition {other:?} (connect-failure, reset)"),
                    ),
                }
            }
        }
        None => cx.missing(&on_path),
    }
    o.finish(cx);
    p.retry_on = retry_on;
    p
}
