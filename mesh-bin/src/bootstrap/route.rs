//! Route configuration: virtual hosts, routes, matchers and actions (Envoy
//! `config.route.v3`). Header mutations are in `headers.rs`.

use std::collections::HashMap;
use std::time::Duration;

use mesh_core::config::{
    Action, ClusterSpecifier, HeaderMatchKind, HeaderMatcher, PathMatch, QueryParameterMatcher,
    RedirectAction, RedirectPath, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster,
};

use super::headers::header_mutations;
use super::policy;
use super::reader::{as_int, is_empty_list, one_of, Ctx, Obj};

/// Envoy's default route `timeout` (15 s).
const ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// Envoy's default `max_direct_response_body_size_bytes`.
const MAX_DIRECT_RESPONSE_BODY: usize = 4096;

/// An inline `route_config`.
pub(crate) fn route_config(cx: &mut Ctx, mut o: Obj<'_>) -> RouteConfiguration {
    let name = o.string(cx, "name").unwrap_or_default();
    // Static clusters are always validated; the flag is accepted as is.
    o.bool(cx, "validate_clusters");
    let headers = header_mutations(cx, &mut o);
    let mut domains: HashMap<String, String> = HashMap::new();
    let mut virtual_hosts = Vec::new();
    for (path, v) in o.list(cx, "virtual_hosts") {
        if let Some(vh) = Obj::new(cx, path, v) {
            virtual_hosts.push(virtual_host(cx, vh, &mut domains));
        }
    }
    o.finish(cx);
    RouteConfiguration {
        name,
        virtual_hosts,
        headers,
    }
}

/// One virtual host; `seen` maps lower-cased domains of the route
/// configuration to the virtual host that has them.
fn virtual_host(cx: &mut Ctx, mut o: Obj<'_>, seen: &mut HashMap<String, String>) -> VirtualHost {
    let name = o.req_string(cx, "name").unwrap_or_default();
    let domains_path = o.at("domains");
    let present = o.has("domains");
    let empty = o.peek("domains").is_some_and(is_empty_list);
    let mut domains = Vec::new();
    for (path, d) in o.strings(cx, "domains") {
        let key = d.to_ascii_lowercase();
        if let Some(other) = seen.get(&key) {
            cx.error(
                &path,
                format!("duplicate domain {d:?} (also in virtual host {other:?})"),
            );
        } else {
            seen.insert(key, name.clone());
        }
        domains.push(d);
    }
    if !present {
        cx.missing(&domains_path);
    } else if empty {
        cx.error(&domains_path, "at least one domain is required");
    }
    let mut routes = Vec::new();
    for (path, v) in o.list(cx, "routes") {
        if let Some(r) = Obj::new(cx, path, v).and_then(|r| route(cx, r)) {
            routes.push(r);
        }
    }
    let headers = header_mutations(cx, &mut o);
    let vh_policy = vhost_policy(cx, &mut o);
    o.finish(cx);
    VirtualHost {
        name,
        domains,
        routes,
        headers,
        policy: vh_policy,
    }
}

fn route(cx: &mut Ctx, mut o: Obj<'_>) -> Option<Route> {
    let name = o.string(cx, "name").unwrap_or_default();
    let matcher = match o.obj(cx, "match") {
        Some(m) => route_match(cx, m),
        None => {
            if !o.has("match") {
                cx.missing(&o.at("match"));
            }
            None
        }
    };
    let mut route_policy = mesh_core::policy::RoutePolicy::default();
    let kinds = ["route", "redirect", "direct_response"];
    let given = kinds.iter().filter(|k| o.has(k)).count();
    let action = if given > 1 {
        cx.error(
            o.path(),
            "only one of route, redirect and direct_response may be set",
        );
        for k in kinds {
            o.take(k);
        }
        None
    } else if let Some(a) = o.obj(cx, "route") {
        Some(Action::Route(route_action(cx, a, &mut route_policy)))
    } else if let Some(r) = o.obj(cx, "redirect") {
        Some(Action::Redirect(redirect(cx, r)))
    } else if let Some(d) = o.obj(cx, "direct_response") {
        direct_response(cx, d)
    } else {
        let other = o.has("filter_action") || o.has("non_forwarding_action");
        if given == 0 && !other {
            cx.error(
                o.path(),
                "one of route, redirect or direct_response is required",
            );
        }
        None
    };
    let headers = header_mutations(cx, &mut o);
    route_policy.per_filter = policy::per_filter_configs(cx, &mut o);
    route_policy.per_request_buffer_limit_bytes = policy::buffer_limit(cx, &mut o);
    super::decorator::read(cx, &mut o);
    o.finish(cx);
    Some(Route {
        name,
        matcher: matcher?,
        action: action?,
        headers,
        policy: route_policy,
    })
}

fn route_match(cx: &mut Ctx, mut o: Obj<'_>) -> Option<RouteMatch> {
    let specifiers = ["prefix", "path", "safe_regex", "path_separated_prefix"];
    let given = specifiers.iter().filter(|k| o.has(k)).count();
    let path = if given > 1 {
        cx.error(
            o.path(),
            "only one of prefix, path, safe_regex and path_separated_prefix may be set",
        );
        for k in specifiers {
            o.take(k);
        }
        None
    } else if o.has("prefix") {
        o.string(cx, "prefix").map(PathMatch::Prefix)
    } else if o.has("path") {
        o.string(cx, "path").map(PathMatch::Exact)
    } else if let Some(r) = o.obj(cx, "safe_regex") {
        regex_matcher(cx, r).map(PathMatch::Regex)
    } else if o.has("path_separated_prefix") {
        let p = o.string(cx, "path_separated_prefix");
        let ok = p
            .as_deref()
            .is_some_and(|p| !p.is_empty() && !p.ends_with('/') && !p.contains(['?', '#']));
        if p.is_some() && !ok {
            cx.error(
                &o.at("path_separated_prefix"),
                "must be non-empty, without ? or #, and not end with /",
            );
        }
        p.filter(|_| ok).map(PathMatch::SeparatedPrefix)
    } else {
        if given == 0 && !o.has("connect_matcher") && !o.has("path_match_policy") {
            cx.error(
                o.path(),
                "one of prefix, path, safe_regex or path_separated_prefix is required",
            );
        }
        None
    };
    let case_sensitive = o.bool(cx, "case_sensitive").unwrap_or(true);
    let mut headers = Vec::new();
    for (p, v) in o.list(cx, "headers") {
        if let Some(h) = Obj::new(cx, p, v) {
            headers.push(header_matcher(cx, h));
        }
    }
    let mut query_parameters = Vec::new();
    for (p, v) in o.list(cx, "query_parameters") {
        if let Some(q) = Obj::new(cx, p, v) {
            query_parameters.push(query_matcher(cx, q));
        }
    }
    let grpc = o.empty_obj(cx, "grpc");
    o.finish(cx);
    Some(RouteMatch {
        path: path?,
        case_sensitive,
        headers,
        query_parameters,
        grpc,
    })
}

/// A `RegexMatcher` (`{regex, google_re2: {}}`), validated by compiling it.
fn regex_matcher(cx: &mut Ctx, mut o: Obj<'_>) -> Option<String> {
    o.empty_obj(cx, "google_re2");
    let path = o.at("regex");
    let re = o.req_string(cx, "regex");
    o.finish(cx);
    let re = re?;
    match regex::Regex::new(&re) {
        Ok(_) => Some(re),
        Err(e) => {
            cx.error(&path, format!("invalid regex {re:?}: {}", one_line(&e)));
            None
        }
    }
}

/// The gist of a (multi-line) regex error on one line.
fn one_line(e: &regex::Error) -> String {
    let text = e.to_string();
    match text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: "))
    {
        Some(msg) => msg.to_string(),
        None => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

fn non_empty(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Option<String> {
    o.req_string(cx, key)
}

pub(crate) fn header_matcher(cx: &mut Ctx, mut o: Obj<'_>) -> HeaderMatcher {
    let name = o
        .req_string(cx, "name")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let keys = [
        "exact_match",
        "prefix_match",
        "suffix_match",
        "contains_match",
        "safe_regex_match",
        "present_match",
        "range_match",
        "string_match",
    ];
    let given = one_of(cx, &o, &keys, false);
    let kind = match given {
        Some("exact_match") => o.string(cx, "exact_match").map(HeaderMatchKind::Exact),
        Some("prefix_match") => non_empty(cx, &mut o, "prefix_match").map(HeaderMatchKind::Prefix),
        Some("suffix_match") => non_empty(cx, &mut o, "suffix_match").map(HeaderMatchKind::Suffix),
        Some("contains_match") => {
            non_empty(cx, &mut o, "contains_match").map(HeaderMatchKind::Contains)
        }
        Some("safe_regex_match") => o
            .obj(cx, "safe_regex_match")
            .and_then(|r| regex_matcher(cx, r))
            .map(HeaderMatchKind::Regex),
        Some("present_match") => o.bool(cx, "present_match").map(HeaderMatchKind::Present),
        Some("range_match") => o.obj(cx, "range_match").and_then(|r| range(cx, r)),
        Some(_) => o
            .obj(cx, "string_match")
            .and_then(|s| string_matcher(cx, s)),
        None => {
            for k in keys {
                o.take(k);
            }
            // Envoy: with no match specifier the header must be present.
            Some(HeaderMatchKind::Present(true))
        }
    };
    let invert = o.bool(cx, "invert_match").unwrap_or(false);
    let treat_missing_as_empty = o.bool(cx, "treat_missing_header_as_empty").unwrap_or(false);
    o.finish(cx);
    HeaderMatcher {
        name,
        kind: kind.unwrap_or(HeaderMatchKind::Present(true)),
        invert,
        treat_missing_as_empty,
    }
}

fn range(cx: &mut Ctx, mut o: Obj<'_>) -> Option<HeaderMatchKind> {
    let bound = |cx: &mut Ctx, o: &mut Obj<'_>, key: &str| {
        if o.has(key) {
            o.i64(cx, key)
        } else {
            o.take(key);
            Some(0)
        }
    };
    let start = bound(cx, &mut o, "start");
    let end = bound(cx, &mut o, "end");
    o.finish(cx);
    Some(HeaderMatchKind::Range {
        start: start?,
        end: end?,
    })
}

/// A `type.matcher.v3.StringMatcher`.
pub(crate) fn string_matcher(cx: &mut Ctx, mut o: Obj<'_>) -> Option<HeaderMatchKind> {
    let ignore_case = o.bool(cx, "ignore_case").unwrap_or(false);
    let keys = ["exact", "prefix", "suffix", "contains", "safe_regex"];
    let given = one_of(cx, &o, &keys, !o.has("custom"));
    let kind = match given {
        Some("exact") => o.string(cx, "exact").map(HeaderMatchKind::Exact),
        Some("prefix") => non_empty(cx, &mut o, "prefix").map(HeaderMatchKind::Prefix),
        Some("suffix") => non_empty(cx, &mut o, "suffix").map(HeaderMatchKind::Suffix),
        Some("contains") => non_empty(cx, &mut o, "contains").map(HeaderMatchKind::Contains),
        Some(_) => {
            if ignore_case {
                cx.error(
                    &o.at("ignore_case"),
                    "ignore_case has no effect for safe_regex",
                );
            }
            o.obj(cx, "safe_regex")
                .and_then(|r| regex_matcher(cx, r))
                .map(HeaderMatchKind::Regex)
        }
        None => {
            for k in keys {
                o.take(k);
            }
            None
        }
    };
    o.finish(cx);
    match kind? {
        k @ HeaderMatchKind::Regex(_) => Some(k),
        k if ignore_case => Some(HeaderMatchKind::IgnoreCase(Box::new(k))),
        k => Some(k),
    }
}

fn query_matcher(cx: &mut Ctx, mut o: Obj<'_>) -> QueryParameterMatcher {
    let name = o.req_string(cx, "name").unwrap_or_default();
    let kind = match one_of(cx, &o, &["string_match", "present_match"], false) {
        Some("string_match") => o
            .obj(cx, "string_match")
            .and_then(|s| string_matcher(cx, s)),
        _ => {
            // Envoy treats any present_match (and no specifier at all) as
            // "the parameter is present".
            o.bool(cx, "present_match");
            o.take("string_match");
            Some(HeaderMatchKind::Present(true))
        }
    };
    o.finish(cx);
    QueryParameterMatcher {
        name,
        kind: kind.unwrap_or(HeaderMatchKind::Present(true)),
    }
}

fn route_action(
    cx: &mut Ctx,
    mut o: Obj<'_>,
    route_policy: &mut mesh_core::policy::RoutePolicy,
) -> RouteAction {
    let other = [
        "cluster_header",
        "cluster_specifier_plugin",
        "inline_cluster_specifier_plugin",
    ]
    .iter()
    .any(|k| o.has(k));
    let cluster = cluster_specifier(cx, &mut o, !other);
    // With a safe_regex match, Envoy's prefix_rewrite replaces the whole path.
    let prefix_rewrite = o.string(cx, "prefix_rewrite");
    let regex_rewrite = o.obj(cx, "regex_rewrite").and_then(|mut r| {
        let pattern = match r.obj(cx, "pattern") {
            Some(p) => regex_matcher(cx, p),
            None => {
                if !r.has("pattern") {
                    cx.missing(&r.at("pattern"));
                }
                None
            }
        };
        let subst_path = r.at("substitution");
        let substitution = r.string(cx, "substitution");
        if substitution.is_none() && !r.has("substitution") {
            cx.missing(&subst_path);
        }
        r.finish(cx);
        Some((pattern?, substitution?))
    });
    if prefix_rewrite.is_some() && o.has("regex_rewrite") {
        cx.error(
            o.path(),
            "only one of prefix_rewrite and regex_rewrite may be set",
        );
    }
    let host_rewrite_literal = o.string(cx, "host_rewrite_literal");
    let timeout = o.timeout(cx, "timeout", Some(ROUTE_TIMEOUT));
    let idle_timeout = o.timeout(cx, "idle_timeout", None);
    let hash_policy = super::lb::hash_policies(cx, &mut o, false);
    let metadata_match = super::lb::metadata_match(cx, &mut o);
    route_policy.retry_policy = o
        .obj(cx, "retry_policy")
        .map(|r| policy::retry_policy(cx, r));
    route_policy.priority = policy::routing_priority(cx, &mut o);
    policy::grpc_timeouts(cx, &mut o, route_policy);
    route_policy.request_mirror_policies = policy::mirror_policies(cx, &mut o);
    route_policy.rate_limits = policy::rate_limits(cx, &mut o);
    route_policy.include_vh_rate_limits = o.bool(cx, "include_vh_rate_limits").unwrap_or(false);
    o.finish(cx);
    RouteAction {
        cluster,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite_literal,
        timeout,
        idle_timeout,
        hash_policy,
        metadata_match,
    }
}

/// `cluster` or `weighted_clusters` of a route action; `required` says
/// whether one of them must be set (no other cluster specifier is present).
pub(crate) fn cluster_specifier(cx: &mut Ctx, o: &mut Obj<'_>, required: bool) -> ClusterSpecifier {
    match one_of(cx, o, &["cluster", "weighted_clusters"], required) {
        Some("cluster") => {
            let path = o.at("cluster");
            let name = o.req_string(cx, "cluster").unwrap_or_default();
            if !name.is_empty() {
                cx.cluster_ref(path, name.clone());
            }
            ClusterSpecifier::Cluster(name)
        }
        Some(_) => match o.obj(cx, "weighted_clusters") {
            Some(w) => weighted_clusters(cx, w),
            None => ClusterSpecifier::Weighted(Vec::new()),
        },
        None => {
            o.take("cluster");
            o.take("weighted_clusters");
            ClusterSpecifier::Cluster(String::new())
        }
    }
}

pub(crate) fn weighted_clusters(cx: &mut Ctx, mut o: Obj<'_>) -> ClusterSpecifier {
    let clusters_path = o.at("clusters");
    let mut out = Vec::new();
    let mut sum: u64 = 0;
    for (path, v) in o.list(cx, "clusters") {
        let Some(mut c) = Obj::new(cx, path, v) else {
            continue;
        };
        let name = c.req_string(cx, "name").unwrap_or_default();
        if !name.is_empty() {
            cx.cluster_ref(c.at("name"), name.clone());
        }
        let weight = c.u32(cx, "weight").unwrap_or(0);
        sum += u64::from(weight);
        let headers = header_mutations(cx, &mut c);
        let metadata_match = super::lb::metadata_match(cx, &mut c);
        c.finish(cx);
        out.push(WeightedCluster {
            name,
            weight,
            headers,
            metadata_match,
        });
    }
    if out.is_empty() {
        cx.error(&clusters_path, "at least one cluster is required");
    } else if sum == 0 {
        cx.error(
            &clusters_path,
            "the sum of the weights must be greater than 0",
        );
    } else if sum > u64::from(u32::MAX) {
        cx.error(&clusters_path, "the sum of the weights must fit in 32 bits");
    }
    let total_path = o.at("total_weight");
    if let Some(total) = o.u32(cx, "total_weight") {
        if u64::from(total) != sum {
            cx.error(
                &total_path,
                format!("total_weight {total} is not the sum of the cluster weights ({sum})"),
            );
        }
    }
    o.finish(cx);
    ClusterSpecifier::Weighted(out)
}

fn redirect(cx: &mut Ctx, mut o: Obj<'_>) -> RedirectAction {
    let scheme = match one_of(cx, &o, &["https_redirect", "scheme_redirect"], false) {
        Some("https_redirect") => o
            .bool(cx, "https_redirect")
            .and_then(|b| b.then(|| "https".to_string())),
        Some(_) => o.string(cx, "scheme_redirect"),
        None => {
            o.take("https_redirect");
            o.take("scheme_redirect");
            None
        }
    };
    let host = o.string(cx, "host_redirect");
    let port_path = o.at("port_redirect");
    let port = o
        .take("port_redirect")
        .and_then(|v| as_int(cx, &port_path, v, 0, 65535))
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    let path = match one_of(cx, &o, &["path_redirect", "prefix_rewrite"], false) {
        Some("path_redirect") => o.string(cx, "path_redirect").map(RedirectPath::Path),
        Some(_) => o
            .string(cx, "prefix_rewrite")
            .map(RedirectPath::PrefixRewrite),
        None => {
            o.take("path_redirect");
            o.take("prefix_rewrite");
            None
        }
    };
    let response_code = o
        .enumeration(
            cx,
            "response_code",
            &[
                ("MOVED_PERMANENTLY", 301),
                ("FOUND", 302),
                ("SEE_OTHER", 303),
                ("TEMPORARY_REDIRECT", 307),
                ("PERMANENT_REDIRECT", 308),
            ],
            &[],
        )
        .unwrap_or(301);
    let strip_query = o.bool(cx, "strip_query").unwrap_or(false);
    o.finish(cx);
    RedirectAction {
        scheme,
        host,
        port,
        path,
        response_code,
        strip_query,
    }
}

fn direct_response(cx: &mut Ctx, mut o: Obj<'_>) -> Option<Action> {
    let status_path = o.at("status");
    let status = match o.take("status") {
        Some(v) => as_int(cx, &status_path, v, 100, 599).and_then(|s| u16::try_from(s).ok()),
        None => {
            cx.missing(&status_path);
            None
        }
    };
    let body = o.obj(cx, "body").and_then(|b| data_source(cx, b));
    o.finish(cx);
    Some(Action::DirectResponse {
        status: status?,
        body: body.map(bytes::Bytes::from),
    })
}

/// A `config.core.v3.DataSource` used as a direct-response body.
fn data_source(cx: &mut Ctx, mut o: Obj<'_>) -> Option<Vec<u8>> {
    let keys = ["inline_string", "inline_bytes", "filename"];
    let given = one_of(cx, &o, &keys, !o.has("environment_variable"));
    let data = match given {
        Some("inline_string") => o.string(cx, "inline_string").map(String::into_bytes),
        Some("inline_bytes") => {
            let path = o.at("inline_bytes");
            o.string(cx, "inline_bytes").and_then(|s| {
                let d = base64_decode(&s);
                if d.is_none() {
                    cx.error(&path, "invalid base64");
                }
                d
            })
        }
        Some(_) => {
            let path = o.at("filename");
            o.string(cx, "filename")
                .and_then(|f| match std::fs::read(&f) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        cx.error(&path, format!("cannot read {f:?}: {e}"));
                        None
                    }
                })
        }
        None => {
            for k in keys {
                o.take(k);
            }
            None
        }
    };
    let path = o.path().to_string();
    o.finish(cx);
    let data = data?;
    if data.len() > MAX_DIRECT_RESPONSE_BODY {
        cx.error(
            &path,
            format!(
                "the body is {} bytes; the maximum is {MAX_DIRECT_RESPONSE_BODY}",
                data.len()
            ),
        );
        return None;
    }
    Some(data)
}

/// Decodes base64 as protobuf JSON accepts it: the standard or the
/// URL-safe alphabet, padding optional.
pub(crate) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        buf = (buf << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    if s.len() % 4 == 1 {
        return None;
    }
    Some(out)
}

/// The traffic policy fields of a virtual host.
fn vhost_policy(cx: &mut Ctx, o: &mut Obj<'_>) -> mesh_core::policy::VhostPolicy {
    mesh_core::policy::VhostPolicy {
        retry_policy: o
            .obj(cx, "retry_policy")
            .map(|r| policy::retry_policy(cx, r)),
        include_request_attempt_count: o.bool(cx, "include_request_attempt_count").unwrap_or(false),
        include_attempt_count_in_response: o
            .bool(cx, "include_attempt_count_in_response")
            .unwrap_or(false),
        per_request_buffer_limit_bytes: policy::buffer_limit(cx, o),
        per_filter: policy::per_filter_configs(cx, o),
        rate_limits: policy::rate_limits(cx, o),
    }
}
