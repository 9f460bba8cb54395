//! The HTTP connection manager (`envoy.filters.network.http_connection_manager`
//! with `envoy.filters.http.router`): for each request, route, then answer
//! locally (direct response, redirect, proxy-made error) or forward to an
//! endpoint of the chosen cluster and stream the response back.
//!
//! Per request the path is: [`HttpProxy::handle`] -> `RouteTable::route`
//! (mesh-core) -> action -> `Balancer::pick` (mesh-lb) -> header work ->
//! `EndpointPool::send` (mesh-codec) -> response header work. Proxy-made
//! errors carry Envoy's response flag in stats and logs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, LOCATION};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use mesh_codec::http::body::{OnEnd, UpstreamBody};
use mesh_codec::http::client::{ConnectionLocal, FailureKind, UpstreamError};
use mesh_codec::http::{hop, ProxyBody};
use mesh_core::config::HttpConnectionManager;
use mesh_core::flags::ResponseFlag;
use mesh_core::headers::CompiledMutations;
use mesh_core::headers::StreamInfo;
use mesh_core::router::{
    redirect_location, CompiledAction, CompiledRouteAction, RouteMatch, RouteTable,
};
use mesh_core::stats::{Counter, Gauge, GaugeGuard, StatusClassCounters, Store};

use mesh_core::policy::RetryOn;
use mesh_filter::retry::{
    CompiledRetryPolicy, Decision, Outcome, ReplayError, ReplaySource, RetryState,
    X_ENVOY_ATTEMPT_COUNT, X_ENVOY_RETRY_GRPC_ON, X_ENVOY_RETRY_ON,
};

use crate::access_log::flags::FlagSet;
use crate::access_log::listener::upstream_failure_reason;
use crate::access_log::{
    AccessLogger, HttpLogEntry, LocalDetails, PendingHttpLog, UpstreamFailure,
};
use crate::cluster::{ClusterManager, WorkerCluster};
use crate::filters::{Decision as FilterDecision, FilterChain};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
static X_ENVOY_EXPECTED_RQ_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");

/// Envoy's `http.<stat_prefix>.*` stats.
#[derive(Debug, Clone)]
pub struct HttpStats {
    /// `downstream_rq_total`.
    pub rq_total: Counter,
    /// `downstream_rq_xx`.
    pub rq_xx: StatusClassCounters,
    /// `downstream_rq_active`.
    pub rq_active: Gauge,
    /// `downstream_cx_total`.
    pub cx_total: Counter,
    /// `downstream_cx_active`.
    pub cx_active: Gauge,
    /// `no_route`.
    pub no_route: Counter,
    /// `rq_direct_response`.
    pub rq_direct_response: Counter,
    /// `rq_redirect`.
    pub rq_redirect: Counter,
    /// `mesh_http_downstream_rq_response_flag{flag=..}`: proxy-made
    /// responses by Envoy response flag (mesh's own stat).
    flags: Vec<Counter>,
}

impl HttpStats {
    /// Registers the stats of an HCM with this `stat_prefix`.
    pub fn new(store: &Store, prefix: &str) -> Self {
        let l = vec![("envoy_http_conn_manager_prefix", prefix.to_owned())];
        HttpStats {
            rq_total: store.counter("envoy_http_downstream_rq_total", &l),
            rq_xx: StatusClassCounters::new(store, "envoy_http_downstream_rq_xx", &l),
            rq_active: store.gauge("envoy_http_downstream_rq_active", &l),
            cx_total: store.counter("envoy_http_downstream_cx_total", &l),
            cx_active: store.gauge("envoy_http_downstream_cx_active", &l),
            no_route: store.counter("envoy_http_no_route", &l),
            rq_direct_response: store.counter("envoy_http_rq_direct_response", &l),
            rq_redirect: store.counter("envoy_http_rq_redirect", &l),
            flags: ResponseFlag::ALL
                .iter()
                .map(|f| {
                    let mut l = l.clone();
                    l.push(("flag", f.as_str().to_owned()));
                    store.counter("mesh_http_downstream_rq_response_flag", &l)
                })
                .collect(),
        }
    }

    fn flag(&self, f: ResponseFlag) {
        self.flags[f.index()].inc();
    }
}

/// What one HCM shares across workers.
#[derive(Debug)]
pub struct HcmShared {
    /// The HCM configuration.
    pub config: HttpConnectionManager,
    /// The compiled routes.
    pub routes: RouteTable,
    /// Stats.
    pub stats: HttpStats,
    server_name: HeaderValue,
    access_log: Option<AccessLogger>,
    /// The HTTP filters besides the router.
    pub filters: FilterChain,
    /// `envoy.filters.http.rbac`, checked before routing.
    rbac: Option<mesh_filter::rbac::RbacFilter>,
    /// `istio.alpn`: the ALPN upstream TLS connections offer.
    istio_alpn: Option<crate::istio::alpn::AlpnOverrides>,
    /// `envoy.filters.http.grpc_stats`.
    grpc_stats: Option<Arc<crate::grpc_stats::GrpcStats>>,
    /// `istio.metadata_exchange`: peer metadata headers.
    istio_mx: Option<crate::istio::metadata::PeerExchange>,
    /// `istio.stats`: Istio's standard request metrics.
    istio_stats: Option<Arc<crate::istio::stats::IstioStats>>,
}

impl HcmShared {
    /// Compiles an HCM; errors carry the route-config-relative field path.
    pub fn new(config: &HttpConnectionManager, store: &Store) -> Result<Self, String> {
        let routes = RouteTable::new(&config.route_config)
            .map_err(|e| format!("route_config.{}: {}", e.path, e.message))?;
        let server_name = HeaderValue::from_str(config.server_name.as_deref().unwrap_or("mesh"))
            .map_err(|_| "server_name: not a valid header value".to_owned())?;
        let access_log =
            AccessLogger::new(&config.access_log, store).map_err(|e| format!("access_log: {e}"))?;
        let filters = FilterChain::new(config, &routes, store)?;
        let rbac = crate::rbac::http_rbac(config, store)?;
        Ok(HcmShared {
            istio_alpn: crate::istio::alpn::from_filters(&config.http_filters),
            grpc_stats: crate::grpc_stats::GrpcStats::from_filters(&config.http_filters, store),
            istio_mx: crate::istio::metadata::from_filters(&config.http_filters)?,
            istio_stats: crate::istio::stats::from_filters(&config.http_filters, store),
            filters,
            rbac,
            access_log,
            stats: HttpStats::new(store, &config.stat_prefix),
            config: config.clone(),
            routes,
            server_name,
        })
    }
}

/// One worker's HTTP proxy for one HCM.
#[derive(Debug)]
pub struct HttpProxy {
    shared: Arc<HcmShared>,
    clusters: HashMap<Arc<str>, Arc<WorkerCluster>>,
}

impl HttpProxy {
    /// A worker-local proxy with its own connection pools.
    pub fn new(shared: Arc<HcmShared>, cm: &ClusterManager) -> Self {
        let clusters = shared
            .routes
            .referenced_clusters()
            .into_iter()
            .filter_map(|name| {
                cm.get(&name)
                    .map(|e| (name.clone(), Arc::new(WorkerCluster::new(e.clone()))))
            })
            .collect();
        HttpProxy { shared, clusters }
    }

    /// A worker-local proxy over the given worker clusters, which other
    /// proxies of the same worker may share: their connection pools then
    /// survive a configuration change (xDS).
    pub fn with_clusters(
        shared: Arc<HcmShared>,
        clusters: HashMap<Arc<str>, Arc<WorkerCluster>>,
    ) -> Self {
        HttpProxy { shared, clusters }
    }

    /// The shared part.
    pub fn shared(&self) -> &Arc<HcmShared> {
        &self.shared
    }

    /// Handles one request from a downstream connection.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        info: StreamInfo,
    ) -> Response<ProxyBody> {
        let stats = &self.shared.stats;
        stats.rq_total.inc();
        let _active = GaugeGuard::new(&stats.rq_active);
        if let Some(resp) = self.reject_malformed(&req) {
            stats.rq_xx.record(resp.status().as_u16());
            return crate::istio::stats::local_reply(&self.shared.istio_stats, &mut req, resp);
        }
        if let Some(resp) = self.normalize_path(&mut req) {
            stats.rq_xx.record(resp.status().as_u16());
            return crate::istio::stats::local_reply(&self.shared.istio_stats, &mut req, resp);
        }
        if self.shared.config.generate_request_id && !req.headers().contains_key(&X_REQUEST_ID) {
            req.headers_mut().insert(X_REQUEST_ID.clone(), request_id());
        }
        let logger = self.shared.access_log.as_ref();
        let mut log = PendingHttpLog::new(
            logger,
            logger.map(|l| {
                let mut e = l.capture(&req, &info, !self.shared.config.use_remote_address);
                if http_body::Body::is_end_stream(req.body()) {
                    e.request_duration = Some(e.started.elapsed());
                }
                e
            }),
        );
        let mut exchange = self
            .shared
            .istio_mx
            .as_ref()
            .map(|mx| mx.on_request(req.headers_mut()));
        let istio_stats = self
            .shared
            .istio_stats
            .as_ref()
            .map(|s| s.on_request(&mut req));
        let grpc = is_grpc(req.headers());
        let grpc_call = match &self.shared.grpc_stats {
            Some(g) if grpc => {
                let call = g.begin(req.uri().path());
                req.extensions_mut().insert(call.clone());
                Some(call)
            }
            _ => None,
        };
        let denied = self.shared.rbac.as_ref().and_then(|rbac| {
            crate::rbac::deny_reply(rbac, &req, &info, &self.shared.server_name, grpc)
        });
        let mut resp = match denied {
            Some(resp) => resp,
            None => self.route_and_forward(req, &info, &mut log.entry).await,
        };
        if grpc
            && resp.extensions().get::<ResponseFlag>().is_some()
            && resp.extensions().get::<GrpcReplyDone>().is_none()
        {
            resp = grpc_local_reply(resp);
        }
        if let Some(call) = grpc_call {
            resp = call.response(resp);
        }
        if let (Some(mx), Some(ex)) = (&self.shared.istio_mx, exchange.as_mut()) {
            mx.on_response(ex, resp.headers_mut());
        }
        stats.rq_xx.record(resp.status().as_u16());
        if let (Some(mut entry), Some(logger)) = (log.entry.take(), logger) {
            // Not handed to a streaming upstream body: the response is complete.
            let flag = resp.extensions().get::<ResponseFlag>().copied();
            let upstream = resp.extensions().get::<UpstreamHost>().map(|h| h.0);
            if let Some(more) = resp.extensions().get::<FlagSet>() {
                entry.flags = entry.flags.union(*more);
            }
            if let Some(r) = resp.extensions_mut().remove::<UpstreamFailure>() {
                entry.upstream_failure = Some(r.0);
            }
            let sent = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
            logger.capture_response(&mut entry, resp.headers());
            let details = match resp.extensions().get::<LocalDetails>() {
                Some(d) => d.0.into(),
                None => crate::access_log::failure_details(flag, entry.upstream_failure.as_deref()),
            };
            logger.log_http(
                &entry,
                &crate::access_log::HttpEnd {
                    status: resp.status().as_u16(),
                    details: &details,
                    flag,
                    bytes_sent: sent,
                    upstream,
                    trailers: &[],
                },
            );
        }
        if let (Some(s), Some(st)) = (&self.shared.istio_stats, istio_stats) {
            resp = s.on_response(st, exchange.as_ref(), resp);
        }
        resp
    }

    /// Requests Envoy refuses before routing, answered the same way:
    /// HTTP/1.0 (426), HTTP/1.1 without `Host` (400), `Content-Length` with
    /// `Transfer-Encoding` (400: a request-smuggling vector), a request
    /// target that is not a path (400), and headers over
    /// `max_request_headers_kb` (431). The connection closes after a 400.
    fn reject_malformed(&self, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
        let bad = |status: StatusCode, body: &'static str| {
            let mut r = self.local_reply(status, body, ResponseFlag::DownstreamProtocolError);
            r.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            Some(r)
        };
        let headers = req.headers();
        match req.version() {
            http::Version::HTTP_09 | http::Version::HTTP_10 => {
                return bad(StatusCode::UPGRADE_REQUIRED, "");
            }
            http::Version::HTTP_11 => {
                if req.uri().authority().is_none() && !headers.contains_key(HOST) {
                    return bad(StatusCode::BAD_REQUEST, "");
                }
                if headers.contains_key(http::header::CONTENT_LENGTH)
                    && headers.contains_key(http::header::TRANSFER_ENCODING)
                {
                    return bad(StatusCode::BAD_REQUEST, "");
                }
            }
            _ => {}
        }
        if req.method() != http::Method::CONNECT {
            let path = req.uri().path();
            let ok =
                path.starts_with('/') || (path == "*" && req.method() == http::Method::OPTIONS);
            if !ok || req.uri().path_and_query().is_none() {
                return bad(StatusCode::BAD_REQUEST, "");
            }
        }
        let limit = self.shared.config.max_request_headers_kb as usize * 1024;
        let mut size = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        for (name, value) in headers {
            size += name.as_str().len() + value.len();
        }
        if size > limit {
            return bad(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
            );
        }
        None
    }

    /// `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`:
    /// rewrites the path the request is routed and forwarded with, or answers
    /// 400 (rejected) / 307 (`UNESCAPE_AND_REDIRECT`) as Envoy does.
    fn normalize_path(&self, req: &mut Request<Incoming>) -> Option<Response<ProxyBody>> {
        use crate::path_normalize::{normalize, Outcome};
        let cfg = &self.shared.config.path_normalization;
        if *cfg == Default::default() || req.method() == http::Method::CONNECT {
            return None;
        }
        let pq = req.uri().path_and_query()?.as_str();
        let new = match normalize(cfg, pq) {
            Outcome::Continue(None) => return None,
            Outcome::Continue(Some(p)) => p,
            Outcome::Reject => {
                return Some(self.local_reply(
                    StatusCode::BAD_REQUEST,
                    "",
                    ResponseFlag::DownstreamProtocolError,
                ));
            }
            Outcome::Redirect(location) => {
                let mut r = self.local_reply(
                    StatusCode::TEMPORARY_REDIRECT,
                    "",
                    ResponseFlag::DownstreamProtocolError,
                );
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(http::header::LOCATION, v);
                }
                return Some(r);
            }
        };
        let mut parts = req.uri().clone().into_parts();
        match new.parse() {
            Ok(p) => parts.path_and_query = Some(p),
            Err(_) => {
                return Some(self.local_reply(
                    StatusCode::BAD_REQUEST,
                    "",
                    ResponseFlag::DownstreamProtocolError,
                ))
            }
        }
        match http::Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => {
                return Some(self.local_reply(
                    StatusCode::BAD_REQUEST,
                    "",
                    ResponseFlag::DownstreamProtocolError,
                ))
            }
        }
        None
    }

    fn local_reply(
        &self,
        status: StatusCode,
        body: &'static str,
        flag: ResponseFlag,
    ) -> Response<ProxyBody> {
        self.shared.stats.flag(flag);
        tracing::debug!(
            status = status.as_u16(),
            flag = flag.as_str(),
            "proxy-made response"
        );
        let mut resp = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
        *resp.status_mut() = status;
        if !body.is_empty() {
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        resp.headers_mut()
            .insert(http::header::SERVER, self.shared.server_name.clone());
        resp.extensions_mut().insert(flag);
        resp
    }

    async fn route_and_forward(
        &self,
        req: Request<Incoming>,
        info: &StreamInfo,
        log: &mut Option<HttpLogEntry>,
    ) -> Response<ProxyBody> {
        let upgrade = if req.version() == http::Version::HTTP_11 {
            hop::upgrade_type(req.headers())
        } else {
            None
        };
        if let Some(u) = &upgrade {
            if !self.shared.config.upgrade_types.iter().any(|t| t == u) {
                return self.local_reply(
                    StatusCode::FORBIDDEN,
                    "",
                    ResponseFlag::DownstreamProtocolError,
                );
            }
        }
        let shared = self.shared.clone();
        let route = shared.routes.route(&req);
        // `max_stream_duration` (route, else HCM) bounds the whole stream:
        // the filters, the upstream exchange and the response body.
        let limit = mesh_core::policy::MaxStreamDuration::limit(
            route
                .as_ref()
                .and_then(|m| m.route.policy.max_stream_duration.as_ref()),
            shared.config.max_stream_duration,
            req.headers()
                .get("grpc-timeout")
                .and_then(|v| parse_grpc_timeout(v.as_bytes())),
        );
        let Some(limit) = limit else {
            return self
                .after_route(req, route, upgrade.is_some(), info, log)
                .await;
        };
        let deadline = tokio::time::Instant::now() + limit;
        let grpc = is_grpc(req.headers());
        match tokio::time::timeout_at(
            deadline,
            self.after_route(req, route, upgrade.is_some(), info, log),
        )
        .await
        {
            Ok(mut resp) => {
                // Past the deadline the stream is reset, as in Envoy.
                if !http_body::Body::is_end_stream(resp.body()) {
                    let body = std::mem::take(resp.body_mut());
                    *resp.body_mut() = ProxyBody::Boxed(Box::pin(DurationBody {
                        inner: body,
                        deadline: Box::pin(tokio::time::sleep_until(deadline)),
                    }));
                }
                resp
            }
            Err(_) => {
                let resp = self.local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "downstream duration timeout",
                    ResponseFlag::DurationTimeout,
                );
                if !grpc {
                    return resp;
                }
                let mut resp = grpc_local_reply(resp);
                resp.headers_mut()
                    .insert("grpc-status", HeaderValue::from(4u16)); // DEADLINE_EXCEEDED
                resp.extensions_mut().insert(GrpcReplyDone);
                resp
            }
        }
    }

    /// Everything after route selection: the HTTP filters, then the route's
    /// action.
    async fn after_route(
        &self,
        mut req: Request<Incoming>,
        route: Option<RouteMatch<'_>>,
        upgrade: bool,
        info: &StreamInfo,
        log: &mut Option<HttpLogEntry>,
    ) -> Response<ProxyBody> {
        let shared = self.shared.clone();
        // The HTTP filters run before the router (also for requests with no
        // route, as in Envoy).
        let mut filter_headers = None;
        let mut _active_fault = None;
        let mut throttle = None;
        let mut start = 0;
        while !shared.filters.is_empty() {
            match shared.filters.on_request(route.as_ref(), info, &req, start) {
                FilterDecision::Continue => break,
                FilterDecision::ContinueWith(h) => {
                    filter_headers = Some(h);
                    break;
                }
                FilterDecision::Respond(r) => return self.filter_reply(r),
                FilterDecision::Fault {
                    delay,
                    abort,
                    resume,
                    active,
                    response_kbps,
                } => {
                    _active_fault = active;
                    throttle = response_kbps.or(throttle);
                    if let Some(d) = delay {
                        shared.stats.flag(ResponseFlag::DelayInjected);
                        if let Some(e) = log.as_mut() {
                            e.flags.insert(ResponseFlag::DelayInjected);
                        }
                        tokio::time::sleep(d).await;
                    }
                    if let Some(r) = abort {
                        return self.filter_reply(r);
                    }
                    start = resume;
                }
            }
        }
        let Some(m) = route else {
            shared.stats.no_route.inc();
            return self.local_reply(StatusCode::NOT_FOUND, "", ResponseFlag::NoRouteFound);
        };
        let mut resp = match &m.route.action {
            CompiledAction::DirectResponse { status, body } => {
                shared.stats.rq_direct_response.inc();
                let mut resp = Response::new(match body {
                    Some(b) => ProxyBody::full(b.clone()),
                    None => ProxyBody::Empty,
                });
                *resp.status_mut() = *status;
                if body.as_ref().is_some_and(|b| !b.is_empty()) {
                    resp.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                }
                self.finish_routed_local(resp, &m, info)
            }
            CompiledAction::Redirect(r) => {
                shared.stats.rq_redirect.inc();
                let location = redirect_location(r, &m, &req, "http");
                let mut resp = Response::new(ProxyBody::Empty);
                *resp.status_mut() =
                    StatusCode::from_u16(r.response_code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(LOCATION, v);
                }
                self.finish_routed_local(resp, &m, info)
            }
            CompiledAction::Route(_) => {
                let down_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
                self.forward(req, &m, info, down_upgrade, log).await
            }
        };
        if let Some(h) = filter_headers {
            h.apply(resp.headers_mut());
        }
        if let Some(kbps) = throttle {
            // The fault stays active while the slowed body drains.
            let guard = _active_fault
                .take()
                .map(|a| Box::new(a) as Box<dyn std::any::Any + Send>);
            let body = std::mem::take(resp.body_mut());
            *resp.body_mut() = ProxyBody::Boxed(Box::pin(
                mesh_filter::throttle::ThrottledBody::new(body, kbps, guard),
            ));
        }
        resp
    }

    /// The reply made by an HTTP filter (429 of a rate limit, a fault's
    /// abort).
    fn filter_reply(&self, r: crate::filters::LocalReply) -> Response<ProxyBody> {
        let mut resp = match (r.grpc_status, r.flag) {
            (None, Some(flag)) => self.local_reply(r.status, r.body, flag),
            (None, None) => {
                // A CORS preflight answer: no flag, no body.
                let mut resp = Response::new(ProxyBody::Empty);
                *resp.status_mut() = r.status;
                resp.headers_mut()
                    .insert(http::header::SERVER, self.shared.server_name.clone());
                resp
            }
            (Some(g), flag) => {
                // A gRPC abort: trailers-only, as Envoy's fault filter sends.
                if let Some(f) = flag {
                    self.shared.stats.flag(f);
                }
                let mut resp = Response::new(ProxyBody::Empty);
                let h = resp.headers_mut();
                h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                h.insert("grpc-status", HeaderValue::from(g));
                h.insert(http::header::SERVER, self.shared.server_name.clone());
                resp.extensions_mut().insert(GrpcReplyDone);
                if let Some(f) = flag {
                    resp.extensions_mut().insert(f);
                }
                resp
            }
        };
        resp.headers_mut().extend(r.headers);
        resp
    }

    /// A direct response or redirect gets its route's response mutations and
    /// the `server` header.
    fn finish_routed_local(
        &self,
        mut resp: Response<ProxyBody>,
        m: &RouteMatch<'_>,
        info: &StreamInfo,
    ) -> Response<ProxyBody> {
        for level in m.mutation_levels() {
            level.response.apply(resp.headers_mut(), info);
        }
        resp.headers_mut()
            .insert(http::header::SERVER, self.shared.server_name.clone());
        resp
    }

    /// Turns the downstream request head into the upstream one: authority
    /// and path (rewrites), forwarding headers, header mutations, and the
    /// request line for HTTP/1.1 (origin form + `Host`) or HTTP/2 (absolute
    /// URI). False when the rewritten target is not a valid URI.
    #[allow(clippy::too_many_arguments)]
    fn prepare_upstream_head(
        &self,
        parts: &mut http::request::Parts,
        m: &RouteMatch<'_>,
        action: &CompiledRouteAction,
        timeout: Option<std::time::Duration>,
        choice_headers: Option<&CompiledMutations>,
        info: &StreamInfo,
        endpoint: SocketAddr,
        h2: bool,
    ) -> bool {
        // Authority and path as the upstream will see them.
        let authority: Option<HeaderValue> = match &action.host_rewrite {
            Some(h) => Some(h.clone()),
            None => match parts.uri.authority() {
                Some(a) => HeaderValue::from_str(a.as_str()).ok(),
                None => parts.headers.get(HOST).cloned(),
            },
        };
        let original_pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let rewritten = m.rewritten_path(original_pq);
        let pq: &str = rewritten.as_deref().unwrap_or(original_pq);

        // Forwarding headers.
        let cfg = &self.shared.config;
        if cfg.use_remote_address && !cfg.skip_xff_append {
            let ip = info.downstream_remote.ip().to_string();
            let value = match parts
                .headers
                .get(&X_FORWARDED_FOR)
                .and_then(|v| v.to_str().ok())
            {
                Some(existing) if !existing.is_empty() => format!("{existing},{ip}"),
                _ => ip,
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                parts.headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
        if !parts.headers.contains_key(&X_FORWARDED_PROTO) {
            let tls = parts
                .extensions
                .get::<Arc<mesh_core::identity::PeerIdentity>>()
                .is_some();
            parts.headers.insert(
                X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static(if tls { "https" } else { "http" }),
            );
        }
        // As Envoy's router does by default: tell the upstream its deadline.
        if let Some(t) = timeout {
            parts.headers.insert(
                X_ENVOY_EXPECTED_RQ_TIMEOUT_MS.clone(),
                HeaderValue::from(t.as_millis() as u64),
            );
        }
        if let Some(h) = choice_headers {
            h.request.apply(&mut parts.headers, info);
        }
        for level in m.mutation_levels() {
            level.request.apply(&mut parts.headers, info);
        }

        // The upstream request line.
        if h2 {
            let auth = authority
                .as_ref()
                .and_then(|a| a.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_else(|| endpoint.to_string());
            parts.uri = match Uri::builder()
                .scheme("http")
                .authority(auth.as_str())
                .path_and_query(pq)
                .build()
            {
                Ok(u) => u,
                Err(_) => return false,
            };
            parts.headers.remove(HOST);
            parts.version = http::Version::HTTP_2;
        } else {
            if rewritten.is_some() || parts.uri.authority().is_some() {
                parts.uri = match pq.parse() {
                    Ok(u) => u,
                    Err(_) => return false,
                };
            }
            match authority {
                Some(a) => {
                    parts.headers.insert(HOST, a);
                }
                None => {
                    if let Ok(v) = HeaderValue::from_str(&endpoint.to_string()) {
                        parts.headers.insert(HOST, v);
                    }
                }
            }
            parts.version = http::Version::HTTP_11;
        }
        true
    }

    /// The proxy-made response for a request that got no upstream response,
    /// with its stats, flag and the endpoint it was about.
    fn failure_reply(
        &self,
        failure: Failure,
        cluster: &WorkerCluster,
        endpoint: &mesh_lb::Endpoint,
        flag_override: Option<ResponseFlag>,
    ) -> Response<ProxyBody> {
        let cstats = &cluster.entry.stats;
        if let Failure::Upstream(e) = &failure {
            if e.kind() == FailureKind::Overflow {
                return self.overflow_reply();
            }
        }
        let (status, body, flag): (StatusCode, &'static str, ResponseFlag) = match &failure {
            Failure::Timeout(Expiry::Route) => {
                cstats.rq_timeout.inc();
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    ResponseFlag::UpstreamRequestTimeout,
                )
            }
            Failure::Timeout(Expiry::PerTry) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout",
                ResponseFlag::UpstreamRequestTimeout,
            ),
            Failure::Timeout(Expiry::StreamIdle) => (
                StatusCode::GATEWAY_TIMEOUT,
                "stream timeout",
                ResponseFlag::StreamIdleTimeout,
            ),
            Failure::Upstream(e) => match e.kind() {
                FailureKind::Connect => {
                    cstats.cx_connect_fail.inc();
                    endpoint.stats.cx_connect_fail.inc();
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        reset_body::CONNECTION_FAILURE,
                        ResponseFlag::UpstreamConnectionFailure,
                    )
                }
                FailureKind::UpstreamProtocol => (
                    StatusCode::BAD_GATEWAY,
                    reset_body::PROTOCOL_ERROR,
                    ResponseFlag::UpstreamProtocolError,
                ),
                FailureKind::DownstreamBody => (
                    StatusCode::BAD_REQUEST,
                    "",
                    ResponseFlag::DownstreamProtocolError,
                ),
                FailureKind::RequestTimeout => (
                    StatusCode::REQUEST_TIMEOUT,
                    "request timeout",
                    ResponseFlag::DownstreamProtocolError,
                ),
                FailureKind::Reset => {
                    cstats.rq_rx_reset.inc();
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        reset_body::CONNECTION_TERMINATION,
                        ResponseFlag::UpstreamConnectionTermination,
                    )
                }
                FailureKind::Overflow => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    crate::resilience::OVERFLOW_BODY,
                    ResponseFlag::UpstreamOverflow,
                ),
            },
        };
        cluster.entry.outlier_failure(endpoint, flag);
        // The downstream's own faults are not charged to the upstream.
        let downstream_fault = flag == ResponseFlag::DownstreamProtocolError;
        if !downstream_fault {
            endpoint.stats.rq_error.inc();
            cstats.record_status(status.as_u16());
        }
        if let Failure::Upstream(e) = &failure {
            tracing::debug!(cluster = %cluster.entry.config.name, endpoint = %endpoint.addr, error = %e, flag = flag.as_str(), "upstream request failed");
        }
        // The try's own flag, and the one the retry decision added (`URX`,
        // `UO`), as Envoy logs both.
        let mut resp = self.local_reply(status, body, flag);
        if let Some(extra) = flag_override {
            self.shared.stats.flag(extra);
            resp.extensions_mut().insert(FlagSet::of(Some(extra)));
        }
        resp.extensions_mut().insert(UpstreamHost(endpoint.addr));
        if matches!(failure, Failure::Timeout(Expiry::PerTry)) {
            resp.extensions_mut()
                .insert(LocalDetails("upstream_per_try_timeout"));
        }
        if let (Failure::Upstream(UpstreamError::Connect(e)), Some(_)) =
            (&failure, &self.shared.access_log)
        {
            if let Some(reason) = upstream_failure_reason(e) {
                resp.extensions_mut().insert(UpstreamFailure(reason));
            }
        }
        if downstream_fault {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// Forwards a routed request: circuit breaker check, endpoint pick,
    /// then tries (one, or more under a retry policy) until a response is
    /// final, and streams that response back.
    ///
    /// A try ends with response headers or a failure; under a retry policy
    /// the outcome is judged by `mesh_filter::retry::RetryState` and a
    /// retry waits for a permit of the cluster's retry limit or budget and a
    /// jittered back-off. The route timeout bounds all tries together,
    /// `per_try_timeout` each one. Requests without a retry policy take the
    /// same loop once, with no copy of the request head or body.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        m: &RouteMatch<'_>,
        info: &StreamInfo,
        down_upgrade: Option<hyper::upgrade::OnUpgrade>,
        log: &mut Option<HttpLogEntry>,
    ) -> Response<ProxyBody> {
        let CompiledAction::Route(action) = &m.route.action else {
            return self.local_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "",
                ResponseFlag::NoRouteFound,
            );
        };
        let choice = action.choose_cluster();
        let Some(cluster) = self.clusters.get(choice.name) else {
            return self.local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "",
                ResponseFlag::NoClusterFound,
            );
        };
        if let Some(e) = log.as_mut() {
            e.routed(m.route, choice.name);
        }
        // Only chains with `istio.stats` / `grpc_stats` look for their
        // per-request state: no extension lookups on the others.
        if self.shared.istio_stats.is_some() {
            if let Some(p) = req.extensions().get::<crate::istio::stats::Pending>() {
                p.routed(&cluster.entry);
            }
        }
        let grpc_call = match self.shared.grpc_stats {
            Some(_) => req.extensions_mut().remove::<crate::grpc_stats::Call>(),
            None => None,
        };
        if let Some(c) = &grpc_call {
            c.routed(choice.name);
        }
        let cstats = &cluster.entry.stats;
        let cpolicy = &cluster.entry.policy;
        let resources = cpolicy.resources(m.route.policy.priority);
        // The `max_requests` circuit breaker.
        if !resources.requests.can_create() {
            cpolicy.rq_active_overflow.inc();
            return self.overflow_reply();
        }
        let lb_hash = if action.hash_policy.is_empty() {
            mesh_lb::hash::RequestHash::default()
        } else {
            mesh_lb::hash::request_hash(
                &action.hash_policy,
                &req,
                info.downstream_remote,
                info.downstream_local,
            )
        };
        let pick = mesh_lb::PickContext::new()
            .with_hash(lb_hash.hash)
            .with_metadata_match(choice.metadata_match);
        if let Some(od) = &cluster.entry.on_demand {
            od.ready().await;
        }
        let picked = match &cluster.entry.original_dst {
            Some(hosts) => crate::original_dst::http_host(hosts, &req),
            None => cluster.entry.balancer.pick_with(&pick),
        };
        let Some(mut endpoint) = picked else {
            cstats.cx_none_healthy.inc();
            return self.local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
                ResponseFlag::NoHealthyUpstream,
            );
        };
        let h2 = cluster.uses_h2(req.version());
        let down_version = req.version();
        let (mut parts, body) = req.into_parts();
        let is_upgrade = down_upgrade.is_some();
        hop::strip(&mut parts.headers, is_upgrade);

        // The retry policy: the route's, else the virtual host's; the
        // `x-envoy-retry-*` request headers are honoured from trusted
        // downstreams only, and removed in any case.
        let cfg = &self.shared.config;
        let policy = match m.route.retry.as_deref().or(m.vhost.retry.as_deref()) {
            Some(p) => Some(p),
            // No policy: the request headers alone may ask for retries.
            None if parts.headers.contains_key(&X_ENVOY_RETRY_ON)
                || parts.headers.contains_key(&X_ENVOY_RETRY_GRPC_ON) =>
            {
                Some(&*NO_RETRY_POLICY)
            }
            None => None,
        };
        let mut retry = match policy {
            Some(p) if !is_upgrade => {
                let trusted = is_internal_request(
                    cfg,
                    info.downstream_remote.ip(),
                    parts.headers.contains_key(&X_FORWARDED_FOR),
                );
                RetryState::new(p, &mut parts.headers, trusted)
            }
            _ => None,
        };

        // With grpc_timeout_header_max (max_grpc_timeout), a gRPC request's
        // grpc-timeout replaces the route timeout, as in Envoy.
        let timeout = match m.route.policy.grpc_timeout_max {
            Some(max) if is_grpc(&parts.headers) => {
                let asked = parts
                    .headers
                    .get("grpc-timeout")
                    .and_then(|v| parse_grpc_timeout(v.as_bytes()))
                    .map(|t| {
                        t.saturating_sub(m.route.policy.grpc_timeout_offset.unwrap_or_default())
                    });
                match (asked, max.is_zero()) {
                    (Some(t), true) => Some(t),
                    (Some(t), false) => Some(t.min(max)),
                    (None, true) => None,
                    (None, false) => Some(max),
                }
                .filter(|t| !t.is_zero())
            }
            _ => action.timeout,
        };
        if !self.prepare_upstream_head(
            &mut parts,
            m,
            action,
            timeout,
            choice.headers,
            info,
            endpoint.addr,
            h2,
        ) {
            return self.local_reply(
                StatusCode::BAD_REQUEST,
                "",
                ResponseFlag::DownstreamProtocolError,
            );
        }
        // The HCM request timeout bounds the arrival of the request body.
        let body = match cfg.request_timeout {
            Some(t) if !http_body::Body::is_end_stream(&body) => {
                ProxyBody::Deadline(body, Box::pin(tokio::time::sleep(t)))
            }
            _ if http_body::Body::is_end_stream(&body) && retry.is_some() => ProxyBody::Empty,
            _ => ProxyBody::Incoming(body),
        };
        let body = match &grpc_call {
            Some(c) => c.request_body(body),
            None => body,
        };
        let body = match (log.as_mut(), &self.shared.access_log) {
            (Some(e), Some(l)) => l.watch_body(e, body),
            _ => body,
        };
        let body = match self.shared.istio_stats {
            Some(_) => crate::istio::stats::watch_request(&parts, body),
            None => body,
        };
        let buffer_limit = m
            .route
            .policy
            .per_request_buffer_limit_bytes
            .or(m.vhost.policy.per_request_buffer_limit_bytes)
            .unwrap_or(DEFAULT_BUFFER_LIMIT);
        // Request mirroring: the shadows get the head as sent upstream and
        // a copy of the body, taken while the primary reads it.
        let body = if m.route.policy.request_mirror_policies.is_empty() || is_upgrade {
            body
        } else {
            self.start_mirrors(m, &parts, body, down_version, buffer_limit, timeout)
        };
        // Under a retry policy a request body is kept for replay, up to the
        // buffer limit.
        let mut body = match (&retry, body) {
            (Some(_), ProxyBody::Empty) => TryBody::Empty,
            (Some(_), b) => TryBody::Replay(ReplaySource::new(b, buffer_limit as usize)),
            (None, b) => TryBody::Once(Some(b)),
        };
        let attempt_header = m.vhost.policy.include_request_attempt_count;
        let mut parts = Some(parts);
        // The upstream connection's local address, only for a log that
        // reads it.
        let want_local = log.is_some()
            && self
                .shared
                .access_log
                .as_ref()
                .is_some_and(AccessLogger::wants_upstream_local);

        // Waiting for response headers is bounded by the route timeout, the
        // stream idle timeout (route `idle_timeout` overrides the HCM's) and
        // the HCM request timeout, whichever ends first; under a retry
        // policy also by `per_try_timeout`.
        let now = tokio::time::Instant::now();
        let deadline = timeout.map(|t| now + t);
        let idle = action.idle_timeout.or(cfg.stream_idle_timeout);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt: u32 = 0;
        let mut last_try_start;
        // Held from a retry's scheduling until its try ends, as in Envoy.
        let mut retry_permit = None;
        let (resp, pool_end, rq_active, ep_active, final_flag) = loop {
            attempt += 1;
            if let Some(e) = log.as_mut() {
                e.attempts = Some(attempt);
                e.upstream_host = Some(endpoint.addr);
            }
            let try_body = match &mut body {
                TryBody::Once(b) => b.take().unwrap_or_default(),
                TryBody::Empty => ProxyBody::Empty,
                TryBody::Replay(src) => match src.body() {
                    Some(b) => ProxyBody::Boxed(Box::pin(http_body_util::BodyExt::map_err(
                        b,
                        |e| match e {
                            ReplayError::Source(e) => e,
                            ReplayError::Superseded => {
                                mesh_codec::http::body::BodyError::Superseded
                            }
                        },
                    ))),
                    None => ProxyBody::Empty,
                },
            };
            let mut head = match (&retry, parts.take()) {
                (Some(_), Some(p)) if is_upgrade => {
                    let head = p.clone();
                    parts = Some(p);
                    head
                }
                // This try sends the head itself; later tries get a copy
                // without the extensions, which describe the downstream
                // connection and were read before (cloning them costs an
                // allocation per entry on every request).
                (Some(_), Some(p)) => {
                    let (mut again, ()) = Request::new(()).into_parts();
                    again.method = p.method.clone();
                    again.uri = p.uri.clone();
                    again.version = p.version;
                    again.headers = p.headers.clone();
                    parts = Some(again);
                    p
                }
                (_, Some(p)) => p,
                // Unreachable: without a retry policy there is one try.
                (_, None) => {
                    return self.local_reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "",
                        ResponseFlag::NoRouteFound,
                    )
                }
            };
            if attempt_header {
                head.headers
                    .insert(X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(attempt));
            }
            let upstream_req = Request::from_parts(head, try_body);

            let alpn = self
                .shared
                .istio_alpn
                .as_ref()
                .and_then(|a| a.for_request(cluster.entry.config.protocol, down_version, h2));
            let Some(pool) = cluster.pool_with_alpn(&endpoint, h2, alpn) else {
                // `max_connection_pools`: Envoy's router finds no pool and
                // answers as with no healthy upstream.
                return self.local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream",
                    ResponseFlag::NoHealthyUpstream,
                );
            };
            cstats.rq_total.inc();
            endpoint.stats.rq_total.inc();
            let rq_active = resources.requests.acquire();
            let ep_active = GaugeGuard::new(&endpoint.stats.rq_active);
            let try_start = tokio::time::Instant::now();
            last_try_start = try_start;
            let mut wait = deadline.map(|d| (d, Expiry::Route));
            if let Some(t) = idle {
                let d = try_start + t;
                if wait.is_none_or(|(w, _)| d < w) {
                    wait = Some((d, Expiry::StreamIdle));
                }
            }
            if let Some(st) = &retry {
                for t in [st.per_try_timeout(), st.per_try_idle_timeout()]
                    .into_iter()
                    .flatten()
                {
                    let d = try_start + t;
                    if wait.is_none_or(|(w, _)| d < w) {
                        wait = Some((d, Expiry::PerTry));
                    }
                }
            }
            let sent = pool.send_traced(upstream_req, is_upgrade, want_local);
            let result = match wait {
                Some((d, why)) => tokio::time::timeout_at(d, sent).await.map_err(|_| why),
                None => Ok(sent.await),
            };
            let Some(st) = retry.as_mut() else {
                // No retry policy: the one try is final.
                match result {
                    Err(why) => {
                        return self.failure_reply(Failure::Timeout(why), cluster, &endpoint, None)
                    }
                    Ok(Err(e)) => {
                        return self.failure_reply(Failure::Upstream(e), cluster, &endpoint, None)
                    }
                    Ok(Ok((resp, pool_end))) => break (resp, pool_end, rq_active, ep_active, None),
                }
            };
            drop(retry_permit.take());
            let outcome = match &result {
                Ok(Ok((resp, _))) => Outcome::Response(resp.status(), resp.headers()),
                Ok(Err(e)) => match e.kind() {
                    FailureKind::Connect => Outcome::ConnectFailure,
                    FailureKind::Overflow => Outcome::Fatal,
                    FailureKind::Reset if e.is_refused_stream() => Outcome::RefusedStream,
                    FailureKind::Reset | FailureKind::UpstreamProtocol => Outcome::Reset,
                    FailureKind::DownstreamBody | FailureKind::RequestTimeout => Outcome::Fatal,
                },
                Err(Expiry::PerTry) => Outcome::PerTryTimeout,
                Err(Expiry::Route | Expiry::StreamIdle) => Outcome::Fatal,
            };
            let mut flag = None;
            match st.decide(outcome) {
                Decision::No => {
                    if st.retried() {
                        cpolicy.retry_stats.retry_success.inc();
                    }
                }
                Decision::LimitExceeded => {
                    cpolicy.retry_stats.retry_limit_exceeded.inc();
                    flag = Some(ResponseFlag::UpstreamRetryLimitExceeded);
                }
                Decision::Retry => {
                    if !body.can_replay() {
                        // The body went past the buffer limit: the try
                        // stands.
                    } else if let Some(permit) = resources.try_retry() {
                        retry_permit = Some(permit);
                        cpolicy.retry_stats.retry.inc();
                        if matches!(result, Err(Expiry::PerTry)) {
                            cpolicy.rq_per_try_timeout.inc();
                        }
                        self.count_try_failure(&result, cluster, &endpoint);
                        drop(result);
                        drop(rq_active);
                        drop(ep_active);
                        let wait = st.start_retry();
                        if !wait.is_zero() {
                            cpolicy.retry_stats.retry_backoff_exponential.inc();
                            let until = tokio::time::Instant::now() + wait;
                            if deadline.is_some_and(|d| d <= until) {
                                if let Some(d) = deadline {
                                    tokio::time::sleep_until(d).await;
                                }
                                return self.failure_reply(
                                    Failure::Timeout(Expiry::Route),
                                    cluster,
                                    &endpoint,
                                    None,
                                );
                            }
                            tokio::time::sleep_until(until).await;
                        }
                        tried.push(endpoint.addr);
                        let again = match cluster.entry.original_dst {
                            // The destination does not change between tries.
                            Some(_) => Some(endpoint.clone()),
                            None => self.pick_for_retry(cluster, st, &tried, &pick),
                        };
                        endpoint = match again {
                            Some(e) => e,
                            None => {
                                cstats.cx_none_healthy.inc();
                                return self.local_reply(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "no healthy upstream",
                                    ResponseFlag::NoHealthyUpstream,
                                );
                            }
                        };
                        continue;
                    } else {
                        cpolicy.retry_stats.retry_overflow.inc();
                        flag = Some(ResponseFlag::UpstreamOverflow);
                    }
                }
            }
            match result {
                Err(why) => {
                    if matches!(why, Expiry::PerTry) {
                        cpolicy.rq_per_try_timeout.inc();
                    }
                    return self.failure_reply(Failure::Timeout(why), cluster, &endpoint, flag);
                }
                Ok(Err(e)) => {
                    return self.failure_reply(Failure::Upstream(e), cluster, &endpoint, flag)
                }
                Ok(Ok((resp, pool_end))) => break (resp, pool_end, rq_active, ep_active, flag),
            }
        };
        if let Some(f) = final_flag {
            self.shared.stats.flag(f);
        }
        let status = resp.status();
        let service_time_ms = now.elapsed().as_millis() as u64;
        endpoint.observe_rtt(last_try_start.elapsed());
        cstats.record_status(status.as_u16());
        cluster.entry.outlier_status(&endpoint, status.as_u16());
        if status.is_server_error() {
            endpoint.stats.rq_error.inc();
        }

        let mut resp = resp;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(down) = down_upgrade {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(bridge_upgrade(down, up));
            }
        }
        let (mut rparts, rbody) = resp.into_parts();
        hop::strip(
            &mut rparts.headers,
            status == StatusCode::SWITCHING_PROTOCOLS,
        );
        if let Some(h) = choice.headers {
            h.response.apply(&mut rparts.headers, info);
        }
        for level in m.mutation_levels() {
            level.response.apply(&mut rparts.headers, info);
        }
        rparts
            .headers
            .insert(http::header::SERVER, self.shared.server_name.clone());
        rparts.headers.remove(&X_ENVOY_OVERLOADED);
        // A generated hash-policy cookie, so the client sticks from now on.
        if let Some(c) = lb_hash
            .set_cookie
            .and_then(|c| HeaderValue::from_str(&c).ok())
        {
            rparts.headers.append(http::header::SET_COOKIE, c);
        }
        rparts.headers.insert(
            X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
            HeaderValue::from(service_time_ms),
        );
        if m.vhost.policy.include_attempt_count_in_response {
            rparts
                .headers
                .insert(X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(attempt));
        }
        let log = log.take().and_then(|mut e| {
            let l = self.shared.access_log.clone()?;
            l.capture_response(&mut e, &rparts.headers);
            e.upstream_local = rparts.extensions.get::<ConnectionLocal>().map(|c| c.0);
            e.response_duration = Some(std::time::Duration::from_millis(service_time_ms));
            Some((e, l, status.as_u16(), endpoint.addr))
        });
        // Trailers are captured only when a format or filter reads them.
        let trailer_slot = log
            .as_ref()
            .filter(|l| l.1.wants_trailers())
            .map(|_| Arc::new(std::sync::OnceLock::new()));
        let trailer_capture = log.as_ref().map(|l| l.1.clone()).zip(trailer_slot.clone());
        let on_end = OnEnd::new(move |completed, bytes| {
            if let Some(mut p) = pool_end {
                p.fire(completed, bytes);
            }
            drop(rq_active);
            drop(ep_active);
            if let Some((mut entry, logger, status, upstream)) = log {
                let flag = if completed {
                    final_flag
                } else {
                    entry.flags = entry.flags.union(FlagSet::of(final_flag));
                    Some(ResponseFlag::DownstreamConnectionTermination)
                };
                logger.log_http(
                    &entry,
                    &crate::access_log::HttpEnd {
                        status,
                        details: crate::access_log::response_code_details(flag, true),
                        flag,
                        bytes_sent: bytes,
                        upstream: Some(upstream),
                        trailers: trailer_slot
                            .as_ref()
                            .and_then(|s| s.get())
                            .map(Vec::as_slice)
                            .unwrap_or(&[]),
                    },
                );
            }
        });
        let body_deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        let body_idle = match retry.as_ref().and_then(|r| r.per_try_idle_timeout()) {
            Some(t) => Some(idle.map_or(t, |i| i.min(t))),
            None => idle,
        };
        let mut body =
            UpstreamBody::new(rbody, Some(on_end), body_deadline).with_idle_timeout(body_idle);
        if let Some((logger, slot)) = trailer_capture {
            body = body.with_trailers(move |t| {
                let _ = slot.set(logger.capture_trailers(t));
            });
        }
        Response::from_parts(rparts, ProxyBody::Upstream(body))
    }

    /// Starts the shadows of the route's sampled mirror policies and
    /// returns the body the primary reads (a tee when there is a body).
    fn start_mirrors(
        &self,
        m: &RouteMatch<'_>,
        head: &http::request::Parts,
        body: ProxyBody,
        down_version: http::Version,
        buffer_limit: u32,
        timeout: Option<std::time::Duration>,
    ) -> ProxyBody {
        let shadows: Vec<crate::mirror::Shadow> = m
            .route
            .policy
            .request_mirror_policies
            .iter()
            .filter(|p| mesh_filter::mirror::sampled(p.fraction))
            .filter_map(|p| {
                self.clusters
                    .get(p.cluster.as_str())
                    .map(|c| crate::mirror::Shadow {
                        cluster: c.clone(),
                        suffix: !p.disable_shadow_host_suffix_append,
                    })
            })
            .collect();
        if shadows.is_empty() {
            return body;
        }
        let (body, shadow_body) = if http_body::Body::is_end_stream(&body) {
            (body, crate::mirror::ShadowBody::Ready(Bytes::new()))
        } else {
            let (tee, rx) = mesh_filter::mirror::TeeBody::new(body, buffer_limit as usize);
            (
                ProxyBody::Boxed(Box::pin(tee)),
                crate::mirror::ShadowBody::Tee(rx),
            )
        };
        crate::mirror::spawn(
            shadows,
            head.clone(),
            shadow_body,
            down_version,
            m.route.policy.priority,
            timeout,
        );
        body
    }

    /// Picks the endpoint of a retry: with the previous-hosts predicate,
    /// up to `host_selection_retry_max_attempts` more picks avoid the
    /// endpoints already tried, then the last pick is used (as Envoy does).
    fn pick_for_retry(
        &self,
        cluster: &WorkerCluster,
        st: &RetryState<'_>,
        tried: &[SocketAddr],
        pick: &mesh_lb::PickContext<'_>,
    ) -> Option<Arc<mesh_lb::Endpoint>> {
        let (previous_hosts, attempts) = st.host_selection();
        let mut ep = cluster.entry.balancer.pick_with(pick)?;
        if previous_hosts {
            for _ in 0..attempts {
                if !tried.contains(&ep.addr) {
                    break;
                }
                ep = cluster.entry.balancer.pick_with(pick)?;
            }
        }
        Some(ep)
    }

    /// Counts a try that is about to be retried as the failure it was
    /// (the downstream never sees it).
    fn count_try_failure(
        &self,
        result: &TryResult,
        cluster: &WorkerCluster,
        endpoint: &mesh_lb::Endpoint,
    ) {
        let cstats = &cluster.entry.stats;
        match result {
            Ok(Ok((resp, _))) => {
                cstats.record_status(resp.status().as_u16());
                cluster
                    .entry
                    .outlier_status(endpoint, resp.status().as_u16());
                if resp.status().is_server_error() {
                    endpoint.stats.rq_error.inc();
                }
            }
            Ok(Err(e)) => {
                match e.kind() {
                    FailureKind::Connect | FailureKind::Reset | FailureKind::UpstreamProtocol => {
                        cluster
                            .entry
                            .outlier_failure(endpoint, ResponseFlag::UpstreamConnectionFailure);
                    }
                    _ => {}
                }
                // A retried try never failed on a circuit breaker (that
                // failure is final).
                crate::mirror::count_failure(cluster, endpoint, e);
            }
            Err(_) => {
                endpoint.stats.rq_error.inc();
                cluster
                    .entry
                    .outlier_failure(endpoint, ResponseFlag::UpstreamRequestTimeout);
                cstats.record_status(504);
            }
        }
    }

    /// The reply to a request refused by a circuit breaker: 503, `UO`,
    /// `x-envoy-overloaded: true`.
    fn overflow_reply(&self) -> Response<ProxyBody> {
        let mut r = self.local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            crate::resilience::OVERFLOW_BODY,
            ResponseFlag::UpstreamOverflow,
        );
        r.headers_mut()
            .insert(X_ENVOY_OVERLOADED.clone(), HeaderValue::from_static("true"));
        r
    }
}

/// The result of one try: response headers, a failure, or a timeout.
type TryResult = Result<
    Result<mesh_codec::http::client::PooledResponse, mesh_codec::http::client::UpstreamError>,
    Expiry,
>;

/// The request body as the tries see it.
enum TryBody {
    /// No retry policy: the body goes to the one try.
    Once(Option<ProxyBody>),
    /// No body: every try sends none.
    Empty,
    /// A body kept for replay.
    Replay(ReplaySource<ProxyBody>),
}

impl TryBody {
    fn can_replay(&self) -> bool {
        match self {
            TryBody::Once(_) => false,
            TryBody::Empty => true,
            TryBody::Replay(s) => s.can_replay(),
        }
    }
}

/// The policy of a route without `retry_policy`: no condition, one retry;
/// `x-envoy-retry-on` / `x-envoy-retry-grpc-on` add conditions.
static NO_RETRY_POLICY: std::sync::LazyLock<CompiledRetryPolicy> =
    std::sync::LazyLock::new(|| CompiledRetryPolicy::simple(RetryOn::NONE, 1));

/// Envoy's default listener `per_connection_buffer_limit_bytes` (1 MiB),
/// the retry buffer limit when no `per_request_buffer_limit_bytes` is set.
const DEFAULT_BUFFER_LIMIT: u32 = 1 << 20;

/// Whether a request from `peer` is internal, as Envoy decides it: the HCM
/// uses the remote address, the peer is in `internal_address_config`, and
/// the request came with no `x-forwarded-for` of its own. Only internal
/// requests may steer the proxy with `x-envoy-*` headers.
fn is_internal_request(cfg: &HttpConnectionManager, peer: std::net::IpAddr, xff: bool) -> bool {
    cfg.use_remote_address
        && !xff
        && cfg
            .internal_address_config
            .iter()
            .any(|(net, len)| in_cidr(peer, *net, *len))
}

fn in_cidr(ip: std::net::IpAddr, net: std::net::IpAddr, len: u8) -> bool {
    use std::net::IpAddr;
    let ip = match (ip, net) {
        (IpAddr::V6(v6), IpAddr::V4(_)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => return false,
        },
        _ => ip,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// A `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`).
fn parse_grpc_timeout(v: &[u8]) -> Option<std::time::Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// True for a gRPC request (`content-type: application/grpc*`).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Envoy's mapping of a proxy-made HTTP status to a gRPC status.
fn grpc_status_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// Turns a proxy-made reply to a gRPC request into a gRPC trailers-only
/// response, as Envoy does: HTTP 200, `grpc-status` mapped from the HTTP
/// status, and the reply's text in `grpc-message` (percent-encoded as the
/// gRPC spec asks), so a gRPC client sees the proxy's reason.
pub(crate) fn grpc_local_reply(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let text = match body {
        ProxyBody::Full(Some(b)) => b,
        _ => Bytes::new(),
    };
    let mut message = String::with_capacity(text.len());
    for &b in text.iter() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            message.push(b as char);
        } else {
            message.push_str(&format!("%{b:02X}"));
        }
    }
    let grpc_status = grpc_status_for(parts.status);
    parts.status = StatusCode::OK;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    parts
        .headers
        .insert("grpc-status", HeaderValue::from(u16::from(grpc_status)));
    if let Ok(v) = HeaderValue::from_str(&message) {
        if !message.is_empty() {
            parts.headers.insert("grpc-message", v);
        }
    }
    Response::from_parts(parts, ProxyBody::Empty)
}

/// A response body cut at the stream's `max_stream_duration`: past the
/// deadline it fails, which resets the stream (h2) or closes the
/// connection (HTTP/1.1), as Envoy does once the response has started.
struct DurationBody {
    inner: ProxyBody,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for DurationBody {
    type Data = Bytes;
    type Error = mesh_codec::http::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let std::task::Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return std::task::Poll::Ready(f);
        }
        match self.deadline.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                std::task::Poll::Ready(Some(Err(mesh_codec::http::body::BodyError::Timeout)))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Marks a proxy-made reply that is already a gRPC trailers-only response.
#[derive(Debug, Clone, Copy)]
struct GrpcReplyDone;

/// The endpoint a proxy-made response is about (for `%UPSTREAM_HOST%`).
#[derive(Debug, Clone, Copy)]
struct UpstreamHost(SocketAddr);

/// Why a forwarded request got no upstream response.
enum Failure {
    /// A timeout ended the wait for response headers.
    Timeout(Expiry),
    /// The upstream exchange failed.
    Upstream(mesh_codec::http::client::UpstreamError),
}

/// Envoy's bodies for local replies after an upstream reset.
mod reset_body {
    pub const CONNECTION_FAILURE: &str =
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
    pub const PROTOCOL_ERROR: &str =
        "upstream connect error or disconnect/reset before headers. reset reason: protocol error";
    pub const CONNECTION_TERMINATION: &str =
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
}

/// Which timeout ended the wait for response headers.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    /// Route `timeout`: 504, `UT`.
    Route,
    /// Stream idle timeout: 504 `stream timeout`, `SI` (as Envoy answers when
    /// the upstream stays silent).
    StreamIdle,
    /// The retry policy's `per_try_timeout` (or `per_try_idle_timeout`):
    /// retriable; when final, 504, `UT`.
    PerTry,
}

/// Copies bytes between the two sides of an upgraded (e.g. WebSocket)
/// connection until either closes.
async fn bridge_upgrade(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let down = hyper_util::rt::TokioIo::new(down);
    let up = hyper_util::rt::TokioIo::new(up);
    if let Err(e) = mesh_codec::tcp::proxy(down, up, None).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

/// A random UUID v4 in its text form.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = [0u8; 36];
    let mut j = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[j] = b'-';
            j += 1;
        }
        out[j] = HEX[(b >> 4) as usize];
        out[j + 1] = HEX[(b & 0xf) as usize];
        j += 2;
    }
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The hyper service of one downstream connection.
#[derive(Debug, Clone)]
pub struct ConnService {
    proxy: Arc<HttpProxy>,
    /// When set, each request uses the proxy current at its start (routes
    /// and clusters replaced at runtime by xDS).
    current: Option<Arc<arc_swap::ArcSwap<HttpProxy>>>,
    peer: SocketAddr,
    local: SocketAddr,
    tls: Option<Arc<mesh_core::identity::PeerIdentity>>,
    id: u64,
    /// The original destination restored by the listener filter.
    original_dst: Option<SocketAddr>,
}

impl ConnService {
    /// A service for a connection from `peer` arriving on `local`.
    pub fn new(proxy: Arc<HttpProxy>, peer: SocketAddr, local: SocketAddr) -> Self {
        ConnService {
            proxy,
            current: None,
            peer,
            local,
            tls: None,
            id: crate::access_log::next_connection_id(),
            original_dst: None,
        }
    }

    /// A service whose requests each take the proxy in `current` at the
    /// time they start; requests in flight keep the one they started with.
    pub fn swapping(
        current: Arc<arc_swap::ArcSwap<HttpProxy>>,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Self {
        ConnService {
            proxy: current.load_full(),
            current: Some(current),
            peer,
            local,
            tls: None,
            id: crate::access_log::next_connection_id(),
            original_dst: None,
        }
    }

    /// Uses `id` as the connection's `%CONNECTION_ID%` (the listener's
    /// access log numbered it first).
    pub fn with_connection_id(mut self, id: u64) -> Self {
        self.id = id;
        self
    }

    /// Marks the connection as TLS: every request carries `identity` as an
    /// extension (`Arc<PeerIdentity>`), for RBAC and the access log.
    pub fn with_tls(mut self, identity: Arc<mesh_core::identity::PeerIdentity>) -> Self {
        self.tls = Some(identity);
        self
    }

    /// The connection's original destination, when the listener filter
    /// restored it: every request carries it as a
    /// [`crate::original_dst::RestoredDestination`] extension, for
    /// ORIGINAL_DST clusters.
    pub fn with_original_dst(mut self, original_dst: Option<SocketAddr>) -> Self {
        self.original_dst = original_dst;
        self
    }
}

/// The future of [`ConnService`].
pub type ConnFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ConnFuture;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(id) = &self.tls {
            req.extensions_mut().insert(id.clone());
        }
        if let Some(dst) = self.original_dst {
            req.extensions_mut()
                .insert(crate::original_dst::RestoredDestination(dst));
        }
        let info = StreamInfo {
            downstream_remote: self.peer,
            downstream_local: self.local,
            protocol: req.version(),
            connection_id: self.id,
        };
        let proxy = match &self.current {
            Some(c) => c.load_full(),
            None => self.proxy.clone(),
        };
        Box::pin(async move { Ok(proxy.handle(req, info).await) })
    }
}

impl tower::Service<Request<Incoming>> for ConnService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ConnFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        hyper::service::Service::call(self, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_made_grpc_replies_are_trailers_only() {
        let mut resp = Response::new(ProxyBody::full(Bytes::from_static(
            b"no healthy upstream 100%",
        )));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let r = grpc_local_reply(resp);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no healthy upstream 100%25");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/grpc");
        assert!(http_body::Body::is_end_stream(r.body()));
        assert_eq!(grpc_status_for(StatusCode::NOT_FOUND), 12);
        assert_eq!(grpc_status_for(StatusCode::GATEWAY_TIMEOUT), 14);
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_says() {
        use std::time::Duration;
        assert_eq!(
            parse_grpc_timeout(b"300m"),
            Some(Duration::from_millis(300))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"-1S"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(request_id(), request_id());
    }
}
