//! The router: virtual host selection, route matching and the route's
//! decision (which cluster, which rewrites, which header mutations).
//!
//! A [`RouteTable`] is compiled once per route-configuration version
//! (regexes built, header names parsed, domains indexed) and then only read,
//! so it can be shared by every worker and swapped whole when configuration
//! changes. Matching follows Envoy's documented semantics, which mesh's
//! differential tests check against Envoy itself:
//!
//! - virtual hosts: exact domain, then the longest `*suffix` wildcard, then
//!   the longest `prefix*` wildcard, then `*`; host names compare
//!   case-insensitively and a port in `Host` is part of the name;
//! - routes: in order, first match wins; `prefix` tests the path with its
//!   query, `path` and `safe_regex` the path without query, a regex must match
//!   the whole path;
//! - headers and query parameters: every matcher must match.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;

use crate::config::{
    Action, ClusterSpecifier, HashPolicy, HeaderMatchKind, HeaderMatcher, LbMetadata, PathMatch,
    QueryParameterMatcher, RedirectAction, RedirectPath, Route, RouteConfiguration, VirtualHost,
};
use crate::headers::CompiledMutations;
use crate::view::RequestView;

/// A route configuration compiled for matching.
#[derive(Debug)]
pub struct RouteTable {
    name: String,
    vhosts: Vec<CompiledVirtualHost>,
    exact: HashMap<String, usize>,
    /// `*suffix` wildcards, longest suffix first.
    suffixes: Vec<(String, usize)>,
    /// `prefix*` wildcards, longest prefix first.
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
    headers: CompiledMutations,
}

/// A compiled virtual host.
#[derive(Debug)]
pub struct CompiledVirtualHost {
    /// `name`.
    pub name: String,
    routes: Vec<Arc<CompiledRoute>>,
    /// Virtual-host-level header mutations.
    pub headers: CompiledMutations,
    /// Retry policy, per-filter configuration and other traffic policy.
    pub policy: Arc<crate::policy::VhostPolicy>,
    /// The compiled `retry_policy`.
    pub retry: Option<Arc<crate::policy::CompiledRetryPolicy>>,
}

/// A compiled route.
#[derive(Debug)]
pub struct CompiledRoute {
    /// `name`.
    pub name: String,
    matcher: Matcher,
    /// What the route does.
    pub action: CompiledAction,
    /// Route-level header mutations.
    pub headers: CompiledMutations,
    /// Retry policy, per-filter configuration and other traffic policy.
    pub policy: Arc<crate::policy::RoutePolicy>,
    /// The compiled `route.retry_policy`.
    pub retry: Option<Arc<crate::policy::CompiledRetryPolicy>>,
}

#[derive(Debug)]
struct Matcher {
    path: CompiledPath,
    case_sensitive: bool,
    headers: Vec<CompiledHeaderMatcher>,
    query: Vec<CompiledQueryMatcher>,
    grpc: bool,
}

#[derive(Debug)]
enum CompiledPath {
    Prefix(String),
    Exact(String),
    Regex(Regex),
    SeparatedPrefix(String),
}

#[derive(Debug)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
    Present(bool),
    Range(i64, i64),
}

/// A compiled [`HeaderMatcher`] (also used by RBAC's `header` rules).
#[derive(Debug)]
pub struct CompiledHeaderMatcher {
    name: String,
    kind: StringMatch,
    ignore_case: bool,
    invert: bool,
    treat_missing_as_empty: bool,
}

#[derive(Debug)]
struct CompiledQueryMatcher {
    name: String,
    kind: StringMatch,
    ignore_case: bool,
}

/// A compiled route action.
#[derive(Debug)]
pub enum CompiledAction {
    /// Forward upstream.
    Route(CompiledRouteAction),
    /// Answer locally with this status and body.
    DirectResponse {
        /// Status code.
        status: http::StatusCode,
        /// Body.
        body: Option<bytes::Bytes>,
    },
    /// Answer with a redirect.
    Redirect(RedirectAction),
}

/// A compiled `route` action.
#[derive(Debug)]
pub struct CompiledRouteAction {
    clusters: Clusters,
    /// `prefix_rewrite`.
    pub prefix_rewrite: Option<String>,
    regex_rewrite: Option<(Regex, String)>,
    /// `host_rewrite_literal`, as a header value.
    pub host_rewrite: Option<http::HeaderValue>,
    /// `timeout`; `None` = no timeout.
    pub timeout: Option<Duration>,
    /// `idle_timeout`.
    pub idle_timeout: Option<Duration>,
    /// `hash_policy`.
    pub hash_policy: Vec<HashPolicy>,
    metadata_match: LbMetadata,
}

#[derive(Debug)]
enum Clusters {
    One(Arc<str>),
    Weighted {
        total: u64,
        choices: Vec<(Arc<str>, u64, CompiledMutations, LbMetadata)>,
    },
}

/// The chosen upstream cluster of one request.
#[derive(Debug, Clone, Copy)]
pub struct ClusterChoice<'a> {
    /// The cluster name.
    pub name: &'a Arc<str>,
    /// Header mutations of a weighted-cluster choice (applied first).
    pub headers: Option<&'a CompiledMutations>,
    /// The endpoint subset wanted (`metadata_match`, `envoy.lb`): the
    /// route's, with a weighted-cluster choice's keys over it.
    pub metadata_match: &'a LbMetadata,
}

impl CompiledVirtualHost {
    /// The routes, in matching order.
    pub fn routes(&self) -> &[Arc<CompiledRoute>] {
        &self.routes
    }
}

impl CompiledRouteAction {
    /// Picks the cluster for one request (weighted random for
    /// `weighted_clusters`).
    pub fn choose_cluster(&self) -> ClusterChoice<'_> {
        match &self.clusters {
            Clusters::One(name) => ClusterChoice {
                name,
                headers: None,
                metadata_match: &self.metadata_match,
            },
            Clusters::Weighted { total, choices } => {
                let mut pick = fastrand::u64(0..*total);
                for (name, weight, headers, metadata_match) in choices {
                    if pick < *weight {
                        return ClusterChoice {
                            name,
                            headers: Some(headers),
                            metadata_match,
                        };
                    }
                    pick -= weight;
                }
                // Unreachable when weights sum to `total`; fall back to the last.
                let (name, _, headers, metadata_match) = &choices[choices.len() - 1];
                ClusterChoice {
                    name,
                    headers: Some(headers),
                    metadata_match,
                }
            }
        }
    }

    /// Every cluster this action may send to.
    pub fn cluster_names(&self) -> Vec<Arc<str>> {
        match &self.clusters {
            Clusters::One(n) => vec![n.clone()],
            Clusters::Weighted { choices, .. } => choices.iter().map(|c| c.0.clone()).collect(),
        }
    }
}

/// A matched route: the virtual host and route it came from.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'a> {
    /// The route table (for its configuration-level header mutations).
    pub table: &'a RouteTable,
    /// The matched virtual host.
    pub vhost: &'a CompiledVirtualHost,
    /// The matched route.
    pub route: &'a Arc<CompiledRoute>,
}

impl RouteMatch<'_> {
    /// The header-mutation levels in Envoy's default application order:
    /// route, virtual host, route configuration (so that the most general
    /// level wins a conflict). A weighted-cluster level comes before these.
    pub fn mutation_levels(&self) -> [&CompiledMutations; 3] {
        [
            &self.route.headers,
            &self.vhost.headers,
            &self.table.headers,
        ]
    }

    /// The path the request should carry upstream after `prefix_rewrite` /
    /// `regex_rewrite`, or `None` when unchanged. `path_and_query` is the
    /// request's original `:path`.
    pub fn rewritten_path(&self, path_and_query: &str) -> Option<String> {
        let CompiledAction::Route(action) = &self.route.action else {
            return None;
        };
        let (path, query) = match path_and_query.find('?') {
            Some(i) => (&path_and_query[..i], &path_and_query[i..]),
            None => (path_and_query, ""),
        };
        if let Some(new_prefix) = &action.prefix_rewrite {
            let matched_len = match &self.route.matcher.path {
                CompiledPath::Prefix(p) | CompiledPath::SeparatedPrefix(p) => p.len(),
                CompiledPath::Exact(_) | CompiledPath::Regex(_) => path.len(),
            };
            let matched_len = matched_len.min(path.len());
            return Some(format!("{new_prefix}{}{query}", &path[matched_len..]));
        }
        if let Some((re, sub)) = &action.regex_rewrite {
            let new_path = re.replace_all(path, sub.as_str());
            return Some(format!("{new_path}{query}"));
        }
        None
    }
}

/// Why a route table could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct RouteError {
    /// Field path relative to the route configuration.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn err(path: String, message: impl Into<String>) -> RouteError {
    RouteError {
        path,
        message: message.into(),
    }
}

/// A header-mutation error (`field[i]...: message`) placed under `path`.
fn mutation_err(path: &str, e: String) -> RouteError {
    let (field, message) = e.split_once(": ").unwrap_or(("", e.as_str()));
    let full = match (path.is_empty(), field.is_empty()) {
        (true, _) => field.to_owned(),
        (false, true) => path.to_owned(),
        (false, false) => format!("{path}.{field}"),
    };
    err(full, message.to_owned())
}

fn compile_regex(pattern: &str, path: &str) -> Result<Regex, RouteError> {
    // Envoy's safe_regex must match the whole input.
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| err(path.to_owned(), format!("invalid regex: {e}")))
}

fn compile_string_match(
    kind: &HeaderMatchKind,
    path: &str,
) -> Result<(StringMatch, bool), RouteError> {
    Ok(match kind {
        HeaderMatchKind::Exact(s) => (StringMatch::Exact(s.clone()), false),
        HeaderMatchKind::Prefix(s) => (StringMatch::Prefix(s.clone()), false),
        HeaderMatchKind::Suffix(s) => (StringMatch::Suffix(s.clone()), false),
        HeaderMatchKind::Contains(s) => (StringMatch::Contains(s.clone()), false),
        HeaderMatchKind::Regex(r) => (StringMatch::Regex(compile_regex(r, path)?), false),
        HeaderMatchKind::Present(p) => (StringMatch::Present(*p), false),
        HeaderMatchKind::Range { start, end } => (StringMatch::Range(*start, *end), false),
        HeaderMatchKind::IgnoreCase(inner) => {
            let (m, _) = compile_string_match(inner, path)?;
            let lowered = match m {
                StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
                StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
                StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
                StringMatch::Contains(s) => StringMatch::Contains(s.to_ascii_lowercase()),
                other => other,
            };
            (lowered, true)
        }
    })
}

impl StringMatch {
    fn matches(&self, value: &str, ignore_case: bool) -> bool {
        let value: Cow<'_, str> = if ignore_case {
            Cow::Owned(value.to_ascii_lowercase())
        } else {
            Cow::Borrowed(value)
        };
        match self {
            StringMatch::Exact(s) => *value == **s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Contains(s) => value.contains(s.as_str()),
            StringMatch::Regex(r) => r.is_match(&value),
            StringMatch::Present(_) => true,
            StringMatch::Range(start, end) => value
                .parse::<i64>()
                .map(|v| v >= *start && v < *end)
                .unwrap_or(false),
        }
    }
}

impl CompiledHeaderMatcher {
    /// Compiles `m`; `path` names it in errors.
    pub fn compile(m: &HeaderMatcher, path: &str) -> Result<Self, RouteError> {
        let (kind, ignore_case) = compile_string_match(&m.kind, path)?;
        Ok(CompiledHeaderMatcher {
            name: m.name.to_ascii_lowercase(),
            kind,
            ignore_case,
            invert: m.invert,
            treat_missing_as_empty: m.treat_missing_as_empty,
        })
    }

    /// Whether the headers of `req` satisfy the matcher.
    pub fn matches(&self, req: &impl RequestView) -> bool {
        let value = req.pseudo_or_header(&self.name);
        let value = match value {
            Some(v) => v,
            None if self.treat_missing_as_empty => Cow::Borrowed(""),
            None => {
                // Envoy: an absent header matches only `present_match: false`
                // (or an inverted `present_match: true`); every other
                // matcher fails on it, inverted or not.
                return match self.kind {
                    StringMatch::Present(expected) => expected == self.invert,
                    _ => false,
                };
            }
        };
        let matched = match self.kind {
            StringMatch::Present(expected) => expected,
            _ => self.kind.matches(&value, self.ignore_case),
        };
        matched != self.invert
    }
}

impl CompiledQueryMatcher {
    fn matches(&self, query: Option<&str>) -> bool {
        let value = query.and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == self.name).then_some(v)
            })
        });
        match (value, &self.kind) {
            (None, StringMatch::Present(p)) => !p,
            (None, _) => false,
            (Some(_), StringMatch::Present(p)) => *p,
            (Some(v), kind) => kind.matches(v, self.ignore_case),
        }
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

impl Matcher {
    fn compile(r: &crate::config::RouteMatch, path: &str) -> Result<Self, RouteError> {
        let compiled_path = match &r.path {
            PathMatch::Prefix(p) => CompiledPath::Prefix(p.clone()),
            PathMatch::Exact(p) => CompiledPath::Exact(p.clone()),
            PathMatch::Regex(re) => {
                CompiledPath::Regex(compile_regex(re, &format!("{path}.safe_regex.regex"))?)
            }
            PathMatch::SeparatedPrefix(p) => CompiledPath::SeparatedPrefix(p.clone()),
        };
        let mut headers = Vec::with_capacity(r.headers.len());
        for (i, h) in r.headers.iter().enumerate() {
            headers.push(CompiledHeaderMatcher::compile(
                h,
                &format!("{path}.headers[{i}]"),
            )?);
        }
        let mut query = Vec::with_capacity(r.query_parameters.len());
        for (i, q) in r.query_parameters.iter().enumerate() {
            query.push(compile_query(q, &format!("{path}.query_parameters[{i}]"))?);
        }
        Ok(Matcher {
            path: compiled_path,
            case_sensitive: r.case_sensitive,
            headers,
            query,
            grpc: r.grpc,
        })
    }

    fn matches(&self, req: &impl RequestView) -> bool {
        let path = req.path();
        let path_ok = match &self.path {
            CompiledPath::Prefix(p) => {
                if p.contains('?') {
                    let full = req.pseudo_or_header(":path").unwrap_or(Cow::Borrowed(path));
                    self.prefix_matches(&full, p)
                } else {
                    self.prefix_matches(path, p)
                }
            }
            CompiledPath::Exact(p) => {
                if self.case_sensitive {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            CompiledPath::Regex(re) => re.is_match(path),
            CompiledPath::SeparatedPrefix(p) => {
                self.prefix_matches(path, p)
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
        };
        if !path_ok {
            return false;
        }
        if self.grpc
            && !req
                .header("content-type")
                .is_some_and(|ct| ct.starts_with("application/grpc"))
        {
            return false;
        }
        if !self.headers.iter().all(|h| h.matches(req)) {
            return false;
        }
        if !self.query.is_empty() {
            let q = req.query();
            if !self.query.iter().all(|m| m.matches(q)) {
                return false;
            }
        }
        true
    }

    fn prefix_matches(&self, path: &str, prefix: &str) -> bool {
        if self.case_sensitive {
            path.starts_with(prefix)
        } else {
            starts_with_ignore_case(path, prefix)
        }
    }
}

fn compile_query(
    q: &QueryParameterMatcher,
    path: &str,
) -> Result<CompiledQueryMatcher, RouteError> {
    let (kind, ignore_case) = compile_string_match(&q.kind, path)?;
    Ok(CompiledQueryMatcher {
        name: q.name.clone(),
        kind,
        ignore_case,
    })
}

/// Envoy's substitution syntax uses `\1`; the regex crate uses `${1}`.
fn convert_substitution(sub: &str) -> String {
    let mut out = String::with_capacity(sub.len());
    let mut chars = sub.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                out.push_str(&format!("${{{digits}}}"));
            }
            '$' => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

fn compile_route(r: &Route, path: &str) -> Result<CompiledRoute, RouteError> {
    let matcher = Matcher::compile(&r.matcher, &format!("{path}.match"))?;
    let action = match &r.action {
        Action::Route(a) => {
            let apath = format!("{path}.route");
            let clusters = match &a.cluster {
                ClusterSpecifier::Cluster(name) => Clusters::One(Arc::from(name.as_str())),
                ClusterSpecifier::Weighted(ws) => {
                    let mut choices = Vec::new();
                    let mut total = 0u64;
                    for (i, w) in ws.iter().enumerate() {
                        let h = CompiledMutations::compile(&w.headers).map_err(|m| {
                            mutation_err(&format!("{apath}.weighted_clusters.clusters[{i}]"), m)
                        })?;
                        if w.weight > 0 {
                            total += u64::from(w.weight);
                            let mut metadata = a.metadata_match.clone();
                            metadata.extend(w.metadata_match.clone());
                            choices.push((
                                Arc::from(w.name.as_str()),
                                u64::from(w.weight),
                                h,
                                metadata,
                            ));
                        }
                    }
                    if total == 0 {
                        return Err(err(
                            format!("{apath}.weighted_clusters"),
                            "the weights of the clusters sum to 0",
                        ));
                    }
                    Clusters::Weighted { total, choices }
                }
            };
            let regex_rewrite = match &a.regex_rewrite {
                Some((pattern, sub)) => Some((
                    Regex::new(pattern).map_err(|e| {
                        err(
                            format!("{apath}.regex_rewrite.pattern.regex"),
                            format!("invalid regex: {e}"),
                        )
                    })?,
                    convert_substitution(sub),
                )),
                None => None,
            };
            let host_rewrite =
                match &a.host_rewrite_literal {
                    Some(h) => Some(http::HeaderValue::from_str(h).map_err(|_| {
                        err(format!("{apath}.host_rewrite_literal"), "invalid host")
                    })?),
                    None => None,
                };
            CompiledAction::Route(CompiledRouteAction {
                clusters,
                prefix_rewrite: a.prefix_rewrite.clone(),
                regex_rewrite,
                host_rewrite,
                timeout: a.timeout,
                idle_timeout: a.idle_timeout,
                hash_policy: a.hash_policy.clone(),
                metadata_match: a.metadata_match.clone(),
            })
        }
        Action::DirectResponse { status, body } => CompiledAction::DirectResponse {
            status: http::StatusCode::from_u16(*status).map_err(|_| {
                err(
                    format!("{path}.direct_response.status"),
                    format!("invalid status {status}"),
                )
            })?,
            body: body.clone(),
        },
        Action::Redirect(r) => CompiledAction::Redirect(r.clone()),
    };
    Ok(CompiledRoute {
        name: r.name.clone(),
        matcher,
        action,
        headers: CompiledMutations::compile(&r.headers).map_err(|m| mutation_err(path, m))?,
        policy: Arc::new(r.policy.clone()),
        retry: compile_retry(
            r.policy.retry_policy.as_ref(),
            &format!("{path}.route.retry_policy"),
        )?,
    })
}

fn compile_retry(
    p: Option<&crate::policy::RetryPolicy>,
    path: &str,
) -> Result<Option<Arc<crate::policy::CompiledRetryPolicy>>, RouteError> {
    p.map(|p| {
        crate::policy::CompiledRetryPolicy::new(p)
            .map(Arc::new)
            .map_err(|e| err(path.to_owned(), e))
    })
    .transpose()
}

impl RouteTable {
    /// Compiles a route configuration. Errors carry the field path relative
    /// to the route configuration (e.g. `virtual_hosts[0].routes[1].match`).
    pub fn new(cfg: &RouteConfiguration) -> Result<Self, RouteError> {
        let mut table = RouteTable {
            name: cfg.name.clone(),
            vhosts: Vec::with_capacity(cfg.virtual_hosts.len()),
            exact: HashMap::new(),
            suffixes: Vec::new(),
            prefixes: Vec::new(),
            any: None,
            headers: CompiledMutations::compile(&cfg.headers).map_err(|m| mutation_err("", m))?,
        };
        for (vi, vh) in cfg.virtual_hosts.iter().enumerate() {
            let vpath = format!("virtual_hosts[{vi}]");
            table.add_vhost(vh, vi, &vpath)?;
        }
        table.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        table.prefixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Ok(table)
    }

    fn add_vhost(&mut self, vh: &VirtualHost, vi: usize, vpath: &str) -> Result<(), RouteError> {
        let mut routes = Vec::with_capacity(vh.routes.len());
        for (ri, r) in vh.routes.iter().enumerate() {
            routes.push(Arc::new(compile_route(
                r,
                &format!("{vpath}.routes[{ri}]"),
            )?));
        }
        for (di, d) in vh.domains.iter().enumerate() {
            let d = d.to_ascii_lowercase();
            let dpath = format!("{vpath}.domains[{di}]");
            let dup = if d == "*" {
                self.any.replace(vi).is_some()
            } else if let Some(suffix) = d.strip_prefix('*') {
                let dup = self.suffixes.iter().any(|(s, _)| s == suffix);
                self.suffixes.push((suffix.to_owned(), vi));
                dup
            } else if let Some(prefix) = d.strip_suffix('*') {
                let dup = self.prefixes.iter().any(|(s, _)| s == prefix);
                self.prefixes.push((prefix.to_owned(), vi));
                dup
            } else {
                self.exact.insert(d.clone(), vi).is_some()
            };
            if dup {
                return Err(err(
                    dpath,
                    format!("domain {d:?} is already used by another virtual host"),
                ));
            }
        }
        self.vhosts.push(CompiledVirtualHost {
            name: vh.name.clone(),
            routes,
            headers: CompiledMutations::compile(&vh.headers).map_err(|m| mutation_err(vpath, m))?,
            policy: Arc::new(vh.policy.clone()),
            retry: compile_retry(
                vh.policy.retry_policy.as_ref(),
                &format!("{vpath}.retry_policy"),
            )?,
        });
        Ok(())
    }

    /// Every virtual host, in configuration order.
    pub fn virtual_hosts(&self) -> &[CompiledVirtualHost] {
        &self.vhosts
    }

    /// The route configuration's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The virtual host serving `authority` (case-insensitive).
    pub fn virtual_host(&self, authority: &str) -> Option<&CompiledVirtualHost> {
        let host: Cow<'_, str> = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(authority.to_ascii_lowercase())
        } else {
            Cow::Borrowed(authority)
        };
        if let Some(&i) = self.exact.get(host.as_ref()) {
            return Some(&self.vhosts[i]);
        }
        // A wildcard must cover at least one character.
        for (suffix, i) in &self.suffixes {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(&self.vhosts[*i]);
            }
        }
        for (prefix, i) in &self.prefixes {
            if host.len() > prefix.len() && host.starts_with(prefix.as_str()) {
                return Some(&self.vhosts[*i]);
            }
        }
        self.any.map(|i| &self.vhosts[i])
    }

    /// Finds the route for a request: its virtual host, then the first
    /// route of that host that matches.
    pub fn route<R: RequestView>(&self, req: &R) -> Option<RouteMatch<'_>> {
        let vhost = self.virtual_host(req.authority().unwrap_or(""))?;
        let route = vhost.routes.iter().find(|r| r.matcher.matches(req))?;
        Some(RouteMatch {
            table: self,
            vhost,
            route,
        })
    }

    /// Every cluster name any route may send to.
    pub fn referenced_clusters(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self
            .vhosts
            .iter()
            .flat_map(|v| v.routes.iter())
            .filter_map(|r| match &r.action {
                CompiledAction::Route(a) => Some(
                    a.cluster_names().into_iter().chain(
                        r.policy
                            .request_mirror_policies
                            .iter()
                            .map(|p| Arc::from(p.cluster.as_str())),
                    ),
                ),
                _ => None,
            })
            .flatten()
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Builds the `Location` of a redirect for a request.
pub fn redirect_location(
    redirect: &RedirectAction,
    route: &RouteMatch<'_>,
    req: &impl RequestView,
    downstream_scheme: &str,
) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(downstream_scheme);
    let authority = req.authority().unwrap_or("");
    let (orig_host, orig_port) = split_host_port(authority);
    let host = redirect.host.as_deref().unwrap_or(orig_host);
    let port: Option<String> = match (redirect.port, &redirect.host, redirect.scheme.as_deref()) {
        (Some(p), _, _) => Some(p.to_string()),
        // A new host or a scheme change drops the original port unless it
        // was non-default for the original scheme (Envoy keeps it then only
        // when the scheme is unchanged).
        (None, Some(_), _) => None,
        (None, None, Some(s)) if s != downstream_scheme => None,
        (None, None, _) => orig_port.map(str::to_owned),
    };
    let port =
        port.filter(|p| !((scheme == "http" && p == "80") || (scheme == "https" && p == "443")));
    let original = req.pseudo_or_header(":path").unwrap_or(Cow::Borrowed("/"));
    let (orig_path, orig_query) = match original.find('?') {
        Some(i) => (&original[..i], &original[i..]),
        None => (&original[..], ""),
    };
    let mut path = match &redirect.path {
        None => format!("{orig_path}{orig_query}"),
        Some(RedirectPath::Path(p)) => {
            if p.contains('?') {
                p.clone()
            } else {
                format!("{p}{orig_query}")
            }
        }
        Some(RedirectPath::PrefixRewrite(new_prefix)) => {
            let matched = match &route.route.matcher.path {
                CompiledPath::Prefix(p) | CompiledPath::SeparatedPrefix(p) => p.len(),
                _ => orig_path.len(),
            }
            .min(orig_path.len());
            format!("{new_prefix}{}{orig_query}", &orig_path[matched..])
        }
    };
    if redirect.strip_query {
        if let Some(i) = path.find('?') {
            path.truncate(i);
        }
    }
    match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        if let Some(end) = authority.find(']') {
            let host = &authority[..=end];
            let port = authority[end + 1..].strip_prefix(':');
            return (host, port);
        }
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty() => (h, Some(p)),
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests;
