//! The L7 RPC proxy: `envoy.filters.network.thrift_proxy`,
//! `envoy.filters.network.dubbo_proxy` and `mesh.filters.network.rpc_proxy`.
//!
//! Every protocol runs the same path; only the [`Codec`] differs:
//!
//! 1. [`mesh_codec::rpc::server::serve`] frames requests off the downstream
//!    connection (many in flight per connection) and answers heartbeats;
//! 2. each request goes through [`RpcService`], a `tower::Service` per
//!    request: the HTTP [`RouteTable`] matches it through the
//!    protocol-neutral request view (service, method, attachments), the
//!    route picks a cluster (weighted), the cluster's balancer an endpoint;
//! 3. [`EndpointClient`] sends it over the worker's multiplexed connection
//!    to that endpoint under the route's timeout, and the response (or the
//!    protocol's own error reply for a proxy error) goes back.
//!
//! Stats: `mesh_rpc_*{mesh_rpc_prefix, mesh_rpc_codec}` per filter,
//! `mesh_rpc_method_*` per service and method, and the cluster and
//! endpoint stats HTTP uses (an RPC success counts as a 2xx, an error
//! response as a 5xx).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use mesh_codec::rpc::client::{ClientConfig, ClientError, EndpointClient};
use mesh_codec::rpc::server::{serve, Closed, ServerConfig};
use mesh_codec::rpc::{Codec, Message, MessageKind, ProxyError};
use mesh_core::config::{RpcCodec, RpcFilter, RpcProxy, ThriftProtocol};
use mesh_core::flags::ResponseFlag;
use mesh_core::identity::PeerIdentity;
use mesh_core::listener::{Accepted, ConnectionGuard};
use mesh_core::policy::{RetryOn, RetryPolicy};
use mesh_core::router::{CompiledAction, CompiledRoute, RouteTable};
use mesh_core::stats::{Counter, Gauge, GaugeGuard, Store};
use mesh_filter::circuit_breaker::ResourceManager;
use mesh_filter::local_ratelimit::TokenBucket;
use mesh_lb::Endpoint;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::access_log::{format_time, AccessLogger, LogRecord, RpcRequest};
use crate::cluster::{ClusterEntry, ClusterManager};

mod mirror;

/// Distinct (service, method) pairs that get their own stats; the rest are
/// counted under service and method `other`.
const MAX_METHOD_STATS: usize = 1000;

/// RPC codecs a Rust program adds by name (see
/// [`RpcCodec::Custom`]): register them here and pass the registry in
/// [`ProxyOptions::rpc_codecs`](crate::ProxyOptions::rpc_codecs). No global
/// registration: each proxy sees exactly the codecs it was given.
#[derive(Clone, Default)]
pub struct CodecRegistry {
    codecs: HashMap<String, Arc<dyn Codec>>,
}

impl std::fmt::Debug for CodecRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.codecs.keys()).finish()
    }
}

impl CodecRegistry {
    /// Adds (or replaces) a codec under `name`.
    pub fn register(&mut self, name: impl Into<String>, codec: Arc<dyn Codec>) -> &mut Self {
        self.codecs.insert(name.into(), codec);
        self
    }

    /// The codec registered as `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Codec>> {
        self.codecs.get(name).cloned()
    }
}

/// The codec an [`RpcProxy`] configuration names (`None`: a custom codec
/// that is not in `registry`).
pub fn codec_for(config: &RpcProxy, registry: &CodecRegistry) -> Option<Arc<dyn Codec>> {
    use mesh_codec::rpc::{auto, bolt, dubbo, thrift};
    Some(match &config.codec {
        RpcCodec::Custom(name) => return registry.get(name),
        RpcCodec::Auto => Arc::new(auto::Auto::default()),
        RpcCodec::Dubbo => Arc::new(dubbo::Dubbo),
        RpcCodec::Bolt => Arc::new(bolt::Bolt),
        &RpcCodec::Thrift {
            framed,
            protocol,
            header,
            lowercase_header_keys,
        } => Arc::new(thrift::Thrift {
            transport: framed
                .map(|f| {
                    if f {
                        thrift::Transport::Framed
                    } else {
                        thrift::Transport::Unframed
                    }
                })
                .or(header.then_some(thrift::Transport::Header)),
            protocol: protocol.map(|p| match p {
                ThriftProtocol::Binary => thrift::Protocol::Binary,
                ThriftProtocol::LaxBinary => thrift::Protocol::LaxBinary,
                ThriftProtocol::Compact => thrift::Protocol::Compact,
            }),
            lowercase_header_keys,
        }),
    })
}

/// Stats of one RPC proxy filter.
#[derive(Debug, Clone)]
pub struct RpcStats {
    /// `mesh_rpc_downstream_cx_total`.
    pub cx_total: Counter,
    /// `mesh_rpc_downstream_cx_active`.
    pub cx_active: Gauge,
    /// `mesh_rpc_downstream_cx_protocol_error`: connections closed for an
    /// undecodable frame.
    pub cx_protocol_error: Counter,
    /// `mesh_rpc_request_total` (requests and oneways).
    pub rq_total: Counter,
    /// `mesh_rpc_request_oneway`.
    pub rq_oneway: Counter,
    /// `mesh_rpc_request_active`.
    pub rq_active: Gauge,
    /// `mesh_rpc_heartbeat`: heartbeats answered locally.
    pub heartbeat: Counter,
    /// `mesh_rpc_response_success`.
    pub response_success: Counter,
    /// `mesh_rpc_response_error`: error responses from upstreams.
    pub response_error: Counter,
    /// `mesh_rpc_local_reply{flag}`: errors the proxy answered itself.
    pub local_reply: Vec<(ResponseFlag, Counter)>,
    /// `mesh_rpc_fault_delays_injected`.
    pub fault_delays: Counter,
    /// Mirrored copies that could not be sent (no healthy endpoint in the
    /// mirror cluster): Envoy's
    /// `envoy_thrift_shadow_request_submit_failure{envoy_thrift_prefix}`
    /// for a `thrift_proxy`, `mesh_rpc_shadow_request_submit_failure`
    /// otherwise.
    pub shadow_submit_failure: Counter,
}

impl RpcStats {
    fn new(store: &Store, labels: &[(&'static str, String)], config: &RpcProxy) -> Self {
        let flags = [
            ResponseFlag::NoRouteFound,
            ResponseFlag::NoClusterFound,
            ResponseFlag::NoHealthyUpstream,
            ResponseFlag::UpstreamConnectionFailure,
            ResponseFlag::UpstreamConnectionTermination,
            ResponseFlag::UpstreamRequestTimeout,
            ResponseFlag::UpstreamProtocolError,
            ResponseFlag::UpstreamOverflow,
            ResponseFlag::RateLimited,
            ResponseFlag::FaultInjected,
        ];
        RpcStats {
            cx_total: store.counter("mesh_rpc_downstream_cx_total", labels),
            cx_active: store.gauge("mesh_rpc_downstream_cx_active", labels),
            cx_protocol_error: store.counter("mesh_rpc_downstream_cx_protocol_error", labels),
            rq_total: store.counter("mesh_rpc_request_total", labels),
            rq_oneway: store.counter("mesh_rpc_request_oneway", labels),
            rq_active: store.gauge("mesh_rpc_request_active", labels),
            heartbeat: store.counter("mesh_rpc_heartbeat", labels),
            response_success: store.counter("mesh_rpc_response_success", labels),
            response_error: store.counter("mesh_rpc_response_error", labels),
            fault_delays: store.counter("mesh_rpc_fault_delays_injected", labels),
            shadow_submit_failure: match config.filter {
                RpcFilter::Thrift => store.counter(
                    "envoy_thrift_shadow_request_submit_failure",
                    &[("envoy_thrift_prefix", config.stat_prefix.clone())],
                ),
                _ => store.counter("mesh_rpc_shadow_request_submit_failure", labels),
            },
            local_reply: flags
                .iter()
                .map(|f| {
                    let mut l = labels.to_vec();
                    l.push(("flag", f.as_str().to_owned()));
                    (*f, store.counter("mesh_rpc_local_reply", &l))
                })
                .collect(),
        }
    }

    fn local(&self, flag: ResponseFlag) {
        if let Some((_, c)) = self.local_reply.iter().find(|(f, _)| *f == flag) {
            c.inc();
        }
    }
}

/// Stats of one service method.
#[derive(Debug, Clone)]
pub struct MethodStats {
    /// `mesh_rpc_method_request_total`.
    pub rq_total: Counter,
    /// `mesh_rpc_method_response_success`.
    pub success: Counter,
    /// `mesh_rpc_method_response_error` (upstream errors and local replies).
    pub error: Counter,
}

/// One RPC proxy filter compiled for every worker.
#[derive(Debug)]
pub struct RpcShared {
    config: RpcProxy,
    codec: Arc<dyn Codec>,
    table: RouteTable,
    /// Stats.
    pub stats: RpcStats,
    labels: Vec<(&'static str, String)>,
    store: Store,
    methods: Mutex<HashMap<(String, String), MethodStats>>,
    access_log: Option<AccessLogger>,
    server: ServerConfig,
    /// `local_rate_limit`: one bucket for every worker.
    rate_limit: Option<TokenBucket>,
}

impl RpcShared {
    /// Compiles the routes and checks every cluster exists.
    pub fn new(
        config: &RpcProxy,
        cm: &ClusterManager,
        store: &Store,
        codecs: &CodecRegistry,
    ) -> Result<Self, String> {
        let table = RouteTable::new(&config.route_config)
            .map_err(|e| format!("route_config.{}: {}", e.path, e.message))?;
        for c in table.referenced_clusters() {
            if cm.get(&c).is_none() {
                return Err(format!("route_config: unknown cluster {c:?}"));
            }
        }
        let codec = codec_for(config, codecs).ok_or_else(|| match &config.codec {
            RpcCodec::Custom(n) => format!("codec: {n:?} is not a registered RPC codec"),
            other => format!("codec: {other:?} has no codec"),
        })?;
        let labels = vec![
            ("mesh_rpc_prefix", config.stat_prefix.clone()),
            ("mesh_rpc_codec", codec.name().to_owned()),
        ];
        let access_log = AccessLogger::new_own_default(&config.access_log, store)
            .map_err(|e| format!("access_log: {e}"))?;
        Ok(RpcShared {
            stats: RpcStats::new(store, &labels, config),
            server: ServerConfig {
                max_frame: config.max_frame_size as usize,
                idle_timeout: config.idle_timeout,
                ..ServerConfig::default()
            },
            config: config.clone(),
            codec,
            table,
            labels,
            store: store.clone(),
            methods: Mutex::new(HashMap::new()),
            access_log,
            rate_limit: config
                .local_rate_limit
                .map(|b| TokenBucket::new(b.max_tokens, b.tokens_per_fill, b.fill_interval)),
        })
    }

    /// The filter's name, for logs.
    pub fn filter_name(&self) -> &'static str {
        match self.config.filter {
            RpcFilter::Thrift => "thrift_proxy",
            RpcFilter::Dubbo => "dubbo_proxy",
            RpcFilter::Generic => "rpc_proxy",
        }
    }

    fn method_stats(&self, service: &str, method: &str) -> MethodStats {
        let mut m = self.methods.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = m.get(&(service.to_owned(), method.to_owned())) {
            return s.clone();
        }
        let (service, method) = if m.len() >= MAX_METHOD_STATS {
            ("other", "other")
        } else {
            (service, method)
        };
        m.entry((service.to_owned(), method.to_owned()))
            .or_insert_with(|| {
                let mut l = self.labels.clone();
                l.push(("service", service.to_owned()));
                l.push(("method", method.to_owned()));
                MethodStats {
                    rq_total: self.store.counter("mesh_rpc_method_request_total", &l),
                    success: self.store.counter("mesh_rpc_method_response_success", &l),
                    error: self.store.counter("mesh_rpc_method_response_error", &l),
                }
            })
            .clone()
    }
}

/// An endpoint client's key: the address and the
/// `transport_socket_matches` entry (`Endpoint::transport_socket`).
type ClientKey = (SocketAddr, Option<u32>);

/// One worker's clients to one cluster's endpoints.
#[derive(Debug)]
struct RpcCluster {
    entry: Arc<ClusterEntry>,
    /// Keyed by address and `transport_socket_matches` entry, as the HTTP
    /// pools are: an endpoint whose match changes gets a new client with
    /// the other connector.
    clients: Mutex<HashMap<ClientKey, Arc<EndpointClient>>>,
    codec: Arc<dyn Codec>,
    max_frame: usize,
}

impl RpcCluster {
    fn client(&self, endpoint: &Endpoint) -> Arc<EndpointClient> {
        let key = (endpoint.addr, endpoint.transport_socket);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        let entry = &self.entry;
        let c = Arc::new(EndpointClient::new(
            endpoint.addr,
            self.codec.clone(),
            ClientConfig {
                connect_timeout: entry.config.connect_timeout,
                max_frame: self.max_frame,
                connector: entry
                    .socket_matches
                    .connector(endpoint.transport_socket, &entry.tls),
                source: entry.config.upstream_bind,
                ..ClientConfig::default()
            },
        ));
        // A new endpoint: forget clients of endpoints that left the cluster.
        let current = entry.balancer.endpoints();
        clients.retain(|(a, t), _| {
            current
                .endpoints
                .iter()
                .any(|e| e.addr == *a && e.transport_socket == *t)
        });
        clients.insert(key, c.clone());
        c
    }
}

/// One worker's RPC proxy: the shared filter plus this worker's upstream
/// connections.
#[derive(Debug)]
pub struct RpcWorker {
    shared: Arc<RpcShared>,
    clusters: HashMap<Arc<str>, Arc<RpcCluster>>,
}

impl RpcWorker {
    /// A worker-local proxy.
    pub fn new(shared: Arc<RpcShared>, cm: &ClusterManager) -> Self {
        let clusters = shared
            .table
            .referenced_clusters()
            .into_iter()
            .filter_map(|name| {
                let entry = cm.get(&name)?.clone();
                Some((
                    name,
                    Arc::new(RpcCluster {
                        entry,
                        clients: Mutex::new(HashMap::new()),
                        codec: shared.codec.clone(),
                        max_frame: shared.server.max_frame,
                    }),
                ))
            })
            .collect();
        RpcWorker { shared, clusters }
    }

    /// Serves one accepted downstream connection to its end.
    pub async fn handle(self: Arc<Self>, accepted: Accepted, stop: CancellationToken) {
        let Accepted {
            stream,
            peer,
            local,
            guard,
            ..
        } = accepted;
        let conn = RpcConnection {
            peer,
            local,
            identity: None,
        };
        self.handle_io(stream, conn, guard, stop).await
    }

    /// Serves one downstream connection whose transport the listener has
    /// already set up (a TLS stream after its handshake, with the peer's
    /// identity), to its end.
    pub async fn handle_io<S>(
        self: Arc<Self>,
        stream: S,
        conn: RpcConnection,
        guard: ConnectionGuard,
        stop: CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = conn.peer;
        let stats = &self.shared.stats;
        stats.cx_total.inc();
        let _cx = GaugeGuard::new(&stats.cx_active);
        let svc = RpcService {
            worker: self.clone(),
            conn: Arc::new(conn),
        };
        let (closed, totals) = serve(
            stream,
            self.shared.codec.clone(),
            &self.shared.server,
            svc,
            stop,
        )
        .await;
        stats.heartbeat.add(totals.heartbeats);
        match &closed {
            Closed::Decode(reason) => {
                stats.cx_protocol_error.inc();
                tracing::info!(%peer, filter = self.shared.filter_name(), %reason, "closed a downstream connection: protocol error");
            }
            other => {
                tracing::debug!(%peer, filter = self.shared.filter_name(), closed = ?other, "downstream connection closed")
            }
        }
        drop(guard);
    }

    /// Handles one request: route, pick, send, answer.
    pub async fn call(&self, msg: Message, conn: &RpcConnection) -> Option<Message> {
        let (peer, local) = (conn.peer, conn.local);
        let shared = &self.shared;
        let start = SystemTime::now();
        let started = Instant::now();
        shared.stats.rq_total.inc();
        if msg.kind == MessageKind::Oneway {
            shared.stats.rq_oneway.inc();
        }
        let _active = GaugeGuard::new(&shared.stats.rq_active);
        let mstats = shared.method_stats(&msg.meta.service, &msg.meta.method);
        mstats.rq_total.inc();
        let received = msg.wire_len() as u64;
        // What an error reply and the log line need once `msg` is sent.
        let mut ctx = Message::new(msg.id, msg.kind);
        ctx.wire = msg.wire;
        ctx.header = msg.header.clone();
        ctx.meta.method = msg.meta.method.clone();
        ctx.meta.service = msg.meta.service.clone();
        let capture = shared.access_log.as_ref().map(|l| l.capture_rpc(&msg));
        let mut routed = None;
        let (result, upstream) = self.forward(msg, peer, local, &mut routed).await;
        let (reply, flag) = match result {
            Ok(Some(resp)) => {
                if resp.kind == MessageKind::Error {
                    shared.stats.response_error.inc();
                    mstats.error.inc();
                } else {
                    shared.stats.response_success.inc();
                    mstats.success.inc();
                }
                (Some(resp), None)
            }
            Ok(None) => (None, None),
            Err((err, flag, detail)) => {
                shared.stats.local(flag);
                mstats.error.inc();
                tracing::debug!(%peer, filter = shared.filter_name(), service = %ctx.meta.service, method = %ctx.meta.method, flag = flag.as_str(), %detail, "local RPC reply");
                (shared.codec.error_reply(&ctx, err, &detail), Some(flag))
            }
        };
        if let (Some(log), Some(capture)) = (&shared.access_log, &capture) {
            let req = RpcRequest {
                method: &ctx.meta.method,
                service: &ctx.meta.service,
                protocol: shared.codec.name(),
                capture,
            };
            let sent = reply.as_ref().map(|r| r.wire_len() as u64).unwrap_or(0);
            let (route, cluster) = match &routed {
                Some((r, c)) => (Some(r.name.as_str()), Some(c.config.name.as_str())),
                None => (None, None),
            };
            let rec = LogRecord {
                rpc: Some(&req),
                status: reply.as_ref().map(|r| r.status as u16).unwrap_or(0),
                details: reply
                    .as_ref()
                    .map(|_| crate::access_log::response_code_details(flag, true)),
                flag,
                bytes_received: received,
                bytes_sent: sent,
                upstream_host: upstream,
                upstream_cluster: cluster,
                route_name: route.filter(|r| !r.is_empty()),
                downstream_remote: Some(peer),
                downstream_direct_remote: Some(peer),
                downstream_local: Some(local),
                header_bits: capture.header_bits,
                tls: conn.identity.as_deref(),
                ..LogRecord::new(start, started.elapsed(), log.hostname())
            };
            log.log_own(&rec, || {
                let status = match &reply {
                    Some(r) if r.kind == MessageKind::Error => "error",
                    Some(_) => "ok",
                    None => "-",
                };
                format!(
                    "[{}] \"{} {} {}\" {} {} {} {} {} \"{}\" \"{}\"\n",
                    format_time(start),
                    if ctx.meta.method.is_empty() {
                        "-"
                    } else {
                        &ctx.meta.method
                    },
                    if ctx.meta.service.is_empty() {
                        "-"
                    } else {
                        &ctx.meta.service
                    },
                    shared.codec.name(),
                    status,
                    flag.map(ResponseFlag::as_str).unwrap_or("-"),
                    received,
                    sent,
                    rec.duration.as_millis(),
                    peer,
                    upstream
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "-".into()),
                )
            });
        }
        reply.map(|mut r| {
            r.id = ctx.id;
            r
        })
    }

    #[allow(clippy::type_complexity)]
    async fn forward(
        &self,
        mut msg: Message,
        peer: SocketAddr,
        local: SocketAddr,
        routed: &mut Option<(Arc<CompiledRoute>, Arc<ClusterEntry>)>,
    ) -> (
        Result<Option<Message>, (ProxyError, ResponseFlag, String)>,
        Option<SocketAddr>,
    ) {
        let shared = &self.shared;
        if let Some(bucket) = &shared.rate_limit {
            if !bucket.try_consume() {
                return (
                    Err((
                        ProxyError::Overloaded,
                        ResponseFlag::RateLimited,
                        "local rate limit".into(),
                    )),
                    None,
                );
            }
        }
        let fault = shared.config.fault;
        if let Some(delay) = fault.delay.filter(|_| roll(fault.delay_percent)) {
            shared.stats.fault_delays.inc();
            tokio::time::sleep(delay).await;
        }
        if roll(fault.abort_percent) {
            return (
                Err((
                    ProxyError::UpstreamUnavailable,
                    ResponseFlag::FaultInjected,
                    "fault filter abort".into(),
                )),
                None,
            );
        }
        let Some(m) = shared.table.route(&msg) else {
            return (
                Err((
                    ProxyError::NoRoute,
                    ResponseFlag::NoRouteFound,
                    format!(
                        "no route for method {:?} of service {:?}",
                        msg.meta.method, msg.meta.service
                    ),
                )),
                None,
            );
        };
        let CompiledAction::Route(action) = &m.route.action else {
            return (
                Err((
                    ProxyError::NoRoute,
                    ResponseFlag::NoRouteFound,
                    "the route has no cluster".into(),
                )),
                None,
            );
        };
        let choice = action.choose_cluster();
        let Some(cluster) = self.clusters.get(choice.name) else {
            return (
                Err((
                    ProxyError::UpstreamUnavailable,
                    ResponseFlag::NoClusterFound,
                    format!("unknown cluster {:?}", choice.name),
                )),
                None,
            );
        };
        *routed = Some((m.route.clone(), cluster.entry.clone()));
        // The route's attachment / header changes, written into the frame.
        let mutation = &m.route.policy.metadata_mutation;
        if !mutation.is_empty() {
            mutation.apply(&mut msg.meta.headers);
            if !shared.codec.write_headers(&mut msg) {
                tracing::debug!(codec = shared.codec.name(), method = %msg.meta.method, "this message has no headers to change");
            }
        }
        // Shadows of a routed request go out whatever happens to it.
        for p in &m.route.policy.request_mirror_policies {
            if !mesh_filter::mirror::sampled(p.fraction) {
                continue;
            }
            match self.clusters.get(p.cluster.as_str()) {
                Some(c) => mirror::submit(
                    c,
                    msg.clone(),
                    m.route.policy.priority,
                    action.timeout,
                    &shared.stats.shadow_submit_failure,
                ),
                None => shared.stats.shadow_submit_failure.inc(),
            }
        }
        let stats = &cluster.entry.stats;
        let cpolicy = &cluster.entry.policy;
        let resources = cpolicy.resources(m.route.policy.priority);
        // The `max_requests` circuit breaker. The `DEFAULT` priority's
        // request count is the cluster's `upstream_rq_active` gauge, so the
        // permit taken below is the only thing that moves that gauge.
        if !resources.requests.can_create() {
            cpolicy.rq_active_overflow.inc();
            return (
                Err((
                    ProxyError::Overloaded,
                    ResponseFlag::UpstreamOverflow,
                    "upstream overflow: max_requests circuit breaker".into(),
                )),
                None,
            );
        }
        // Ring hash / Maglev read the route's hash_policy from the message
        // metadata (a `header` policy names an attachment or `:service`,
        // `:method`, ...); subsets come from metadata_match.
        let hash = if action.hash_policy.is_empty() {
            None
        } else {
            mesh_lb::hash::request_hash(&action.hash_policy, &msg, peer, local).hash
        };
        let pick = mesh_lb::PickContext::new()
            .with_hash(hash)
            .with_metadata_match(choice.metadata_match);
        if let Some(od) = &cluster.entry.on_demand {
            od.ready().await;
        }
        // The RPC proxies do not route by original destination: an
        // ORIGINAL_DST cluster has no host for them (its hosts belong to
        // other connections).
        let picked = match cluster.entry.original_dst {
            Some(_) => None,
            None => cluster.entry.balancer.pick_with(&pick),
        };
        let Some(endpoint) = picked else {
            stats.cx_none_healthy.inc();
            return (
                Err((
                    ProxyError::NoHealthyUpstream,
                    ResponseFlag::NoHealthyUpstream,
                    "no healthy upstream".into(),
                )),
                None,
            );
        };
        let retry = m.route.retry.as_deref().map(|p| &p.config);
        // The route timeout bounds every try together; `current` is the
        // endpoint of the try in progress when it passes.
        let mut current = None;
        let tries = self.tries(
            cluster,
            resources,
            retry,
            msg,
            endpoint,
            &pick,
            &mut current,
        );
        let out = match action.timeout {
            Some(t) => match tokio::time::timeout(t, tries).await {
                Ok(out) => out,
                Err(_) => {
                    stats.rq_timeout.inc();
                    stats.record_status(504);
                    if let Some(e) = &current {
                        cluster
                            .entry
                            .outlier_failure(e, ResponseFlag::UpstreamRequestTimeout);
                    }
                    Err((
                        ProxyError::Timeout,
                        ResponseFlag::UpstreamRequestTimeout,
                        "upstream request timeout".into(),
                    ))
                }
            },
            None => tries.await,
        };
        (out, current.map(|e| e.addr))
    }

    /// Sends `msg` to `endpoint`, and under a retry policy again to newly
    /// picked endpoints while the failure is one the policy retries, the
    /// policy's `num_retries` is not used up and the cluster's
    /// `max_retries` (or retry budget) has room. Each try holds a
    /// `max_requests` permit (the cluster's `upstream_rq_active`); a retry
    /// holds a retry permit from its backoff until its try ends.
    #[allow(clippy::too_many_arguments)]
    async fn tries(
        &self,
        cluster: &RpcCluster,
        resources: &ResourceManager,
        retry: Option<&RetryPolicy>,
        mut msg: Message,
        mut endpoint: Arc<Endpoint>,
        pick: &mesh_lb::PickContext<'_>,
        current: &mut Option<Arc<Endpoint>>,
    ) -> RpcResult {
        let stats = &cluster.entry.stats;
        let cpolicy = &cluster.entry.policy;
        let mut retries = 0u32;
        let mut _retry_permit = None;
        let per_try = retry.and_then(|p| p.per_try_timeout);
        let mut tried = Vec::new();
        loop {
            *current = Some(endpoint.clone());
            stats.rq_total.inc();
            endpoint.stats.rq_total.inc();
            // Without a retry policy the message is sent as is; with one, a
            // copy (the body is shared `Bytes`) stays for the next try.
            let send = match retry {
                Some(_) => msg.clone(),
                None => std::mem::replace(&mut msg, Message::new(0, MessageKind::Request)),
            };
            // `None`: the try passed its `per_try_timeout`.
            let result = {
                let _a = resources.requests.acquire();
                let _b = GaugeGuard::new(&endpoint.stats.rq_active);
                let client = cluster.client(&endpoint);
                let call = client.call(send);
                match per_try {
                    Some(t) => tokio::time::timeout(t, call).await.ok(),
                    None => Some(call.await),
                }
            };
            _retry_permit = None;
            // A try that timed out may have run upstream, as after a reset.
            let retriable = match (&result, retry) {
                (Some(Err(ClientError::Connect(_))), Some(p)) => {
                    p.retry_on.any(RetryOn::CONNECT_FAILURE)
                }
                (Some(Err(ClientError::Reset)) | None, Some(p)) => p.retry_on.any(RetryOn::RESET),
                _ => false,
            };
            let out = match result {
                Some(result) => Self::outcome(cluster, &endpoint, result),
                None => Self::per_try_timeout(cluster, &endpoint),
            };
            let Some(policy) = retry.filter(|_| retriable) else {
                if retries > 0 && matches!(&out, Ok(Some(r)) if r.kind != MessageKind::Error) {
                    cpolicy.retry_stats.retry_success.inc();
                }
                return out;
            };
            if retries >= policy.num_retries {
                cpolicy.retry_stats.retry_limit_exceeded.inc();
                return out;
            }
            let Some(permit) = resources.try_retry() else {
                cpolicy.retry_stats.retry_overflow.inc();
                return out;
            };
            _retry_permit = Some(permit);
            cpolicy.retry_stats.retry.inc();
            retries += 1;
            // Envoy's jittered exponential backoff: a random wait up to
            // `base × (2^n − 1)`, capped at the maximum interval.
            let cap = policy
                .base_interval
                .saturating_mul((1u32 << retries.min(16)) - 1)
                .min(policy.max_interval);
            let cap_ms = cap.as_millis() as u64;
            if cap_ms > 0 {
                cpolicy.retry_stats.retry_backoff_exponential.inc();
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=cap_ms))).await;
            }
            tried.push(endpoint.addr);
            endpoint = match Self::pick_for_retry(cluster, policy, &tried, pick) {
                Some(e) => e,
                None => return out,
            };
        }
    }

    /// The endpoint of a retry: with the `previous_hosts` predicate, up to
    /// `host_selection_retry_max_attempts` more picks avoid the endpoints
    /// already tried, then the last pick is used (as Envoy and the HTTP
    /// router do).
    fn pick_for_retry(
        cluster: &RpcCluster,
        policy: &RetryPolicy,
        tried: &[SocketAddr],
        pick: &mesh_lb::PickContext<'_>,
    ) -> Option<Arc<Endpoint>> {
        let mut ep = cluster.entry.balancer.pick_with(pick)?;
        if policy.previous_hosts {
            for _ in 0..policy.host_selection_retry_max_attempts {
                if !tried.contains(&ep.addr) {
                    break;
                }
                ep = cluster.entry.balancer.pick_with(pick)?;
            }
        }
        Some(ep)
    }

    /// A try that passed the retry policy's `per_try_timeout`: counted in
    /// `upstream_rq_per_try_timeout`, as a 504 and as an outlier-detection
    /// timeout of its endpoint.
    fn per_try_timeout(cluster: &RpcCluster, endpoint: &Endpoint) -> RpcResult {
        cluster.entry.policy.rq_per_try_timeout.inc();
        cluster.entry.stats.record_status(504);
        endpoint.stats.rq_error.inc();
        cluster
            .entry
            .outlier_failure(endpoint, ResponseFlag::UpstreamRequestTimeout);
        Err((
            ProxyError::Timeout,
            ResponseFlag::UpstreamRequestTimeout,
            "upstream per-try timeout".into(),
        ))
    }

    /// Maps one try's result to the reply or proxy error, with the
    /// cluster, endpoint and outlier-detection accounting.
    fn outcome(
        cluster: &RpcCluster,
        endpoint: &Endpoint,
        result: Result<Option<Message>, ClientError>,
    ) -> RpcResult {
        let stats = &cluster.entry.stats;
        let out = match result {
            Ok(Some(resp)) => {
                // Outlier detection sees an RPC error as a 5xx, as Envoy's
                // Thrift and Dubbo routers report them.
                if resp.kind == MessageKind::Error {
                    stats.record_status(500);
                    endpoint.stats.rq_error.inc();
                    cluster.entry.outlier_status(endpoint, 500);
                } else {
                    stats.record_status(200);
                    cluster.entry.outlier_status(endpoint, 200);
                }
                Ok(Some(resp))
            }
            Ok(None) => Ok(None),
            Err(ClientError::Connect(e)) => {
                stats.cx_connect_fail.inc();
                endpoint.stats.cx_connect_fail.inc();
                stats.record_status(503);
                Err((
                    ProxyError::UpstreamUnavailable,
                    ResponseFlag::UpstreamConnectionFailure,
                    format!("upstream connect error: {e}"),
                ))
            }
            Err(ClientError::Reset) => {
                stats.rq_rx_reset.inc();
                stats.record_status(503);
                endpoint.stats.rq_error.inc();
                Err((
                    ProxyError::UpstreamReset,
                    ResponseFlag::UpstreamConnectionTermination,
                    "upstream connection closed before the response".into(),
                ))
            }
            Err(ClientError::Protocol(e)) => {
                stats.record_status(502);
                endpoint.stats.rq_error.inc();
                Err((
                    ProxyError::UpstreamProtocol,
                    ResponseFlag::UpstreamProtocolError,
                    format!("upstream protocol error: {e}"),
                ))
            }
        };
        if let Err((_, flag, _)) = &out {
            cluster.entry.outlier_failure(endpoint, *flag);
        }
        out
    }
}

/// Whether a request falls in `percent` % (0-100).
fn roll(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && fastrand::u32(0..100) < percent)
}

/// A reply (`None` for a oneway request) or a proxy error with its flag
/// and detail.
type RpcResult = Result<Option<Message>, (ProxyError, ResponseFlag, String)>;

/// The per-request `tower::Service` of an RPC proxy: one request in, its
/// answer (or `None` for oneway requests) out. Never fails: proxy errors
/// become the protocol's error reply.
#[derive(Debug, Clone)]
pub struct RpcService {
    worker: Arc<RpcWorker>,
    conn: Arc<RpcConnection>,
}

/// What the proxy knows of a downstream RPC connection.
#[derive(Debug, Clone)]
pub struct RpcConnection {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The local address the connection arrived on.
    pub local: SocketAddr,
    /// The peer's TLS identity, on a TLS chain.
    pub identity: Option<Arc<PeerIdentity>>,
}

impl tower::Service<Message> for RpcService {
    type Response = Option<Message>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Option<Message>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let worker = self.worker.clone();
        let conn = self.conn.clone();
        Box::pin(async move { Ok(worker.call(msg, &conn).await) })
    }
}
