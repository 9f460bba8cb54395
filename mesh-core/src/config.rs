//! The typed, validated configuration model.
//!
//! Every front end that produces configuration (the Envoy v3 YAML/JSON loader
//! in `mesh-bin`, the xDS converter in `mesh-xds`, a Rust program building a
//! proxy by hand) produces these plain types. Nothing downstream of this
//! module sees YAML, JSON or protobuf, and nothing here is a string map: each
//! field that Envoy spells as a duration is a [`Duration`], each enum an enum.
//!
//! Field names follow Envoy's v3 API so that a reader who knows an Envoy
//! bootstrap can find their way; the doc comment of each type names the
//! Envoy message it models.

use std::net::SocketAddr;
use std::time::Duration;

pub mod grpc_stats;
pub mod istio;
pub mod rbac;
pub mod socket_match;
pub mod tls;
pub use crate::health_config::{
    GrpcHealthCheck, HealthCheck, HealthChecker, HttpHealthCheck, OutlierDetection, TcpHealthCheck,
};
pub use crate::lb_config::*;
pub use socket_match::TransportSocketMatch;

/// A whole proxy configuration (Envoy `config.bootstrap.v3.Bootstrap`, the
/// subset mesh supports).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bootstrap {
    /// `node`: the identity the proxy reports (to control planes, later).
    pub node: Node,
    /// `static_resources.listeners`.
    pub listeners: Vec<Listener>,
    /// `static_resources.clusters`.
    pub clusters: Vec<Cluster>,
    /// `admin`: the admin HTTP listener, if any.
    pub admin: Option<Admin>,
    /// `static_resources.secrets`.
    pub secrets: Vec<tls::Secret>,
    /// `dynamic_resources`: listeners and clusters from a control plane.
    pub dynamic_resources: Option<DynamicResources>,
}

/// Envoy `config.core.v3.Node`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// `node.id`.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// `node.locality`.
    pub locality: Locality,
    /// `node.metadata` as JSON text (empty: none); sent to the management
    /// server, which Istio needs (its `ISTIO_VERSION`, `LABELS`, ... keys).
    pub metadata_json: String,
}

/// Envoy `config.core.v3.Locality`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// `region`.
    pub region: String,
    /// `zone`.
    pub zone: String,
    /// `sub_zone`.
    pub sub_zone: String,
}

/// Envoy `config.bootstrap.v3.Admin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// `admin.address.socket_address`.
    pub address: SocketAddr,
}

/// Envoy `config.listener.v3.Listener`.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// `name`; unique among listeners.
    pub name: String,
    /// `address.socket_address`.
    pub address: SocketAddr,
    /// `filter_chains`. mesh uses the first chain; filter-chain matching
    /// arrives with TLS.
    pub filter_chains: Vec<FilterChain>,
    /// Maximum concurrent downstream connections (from the
    /// `envoy.filters.network.connection_limit` network filter). Connections
    /// over the limit are closed as soon as they are accepted.
    pub connection_limit: Option<ConnectionLimit>,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB as in Envoy).
    pub per_connection_buffer_limit_bytes: u32,
    /// `listener_filters` has `envoy.filters.listener.tls_inspector`: the
    /// ClientHello is peeked (not consumed) for SNI and ALPN before a filter
    /// chain is chosen.
    pub tls_inspector: bool,
    /// `listener_filters_timeout` (Envoy default 15 s; `0s` disables): how
    /// long the listener filters (TLS, HTTP and protocol inspectors) wait
    /// for the bytes that decide.
    pub listener_filters_timeout: Option<Duration>,
    /// `continue_on_listener_filters_timeout`: when the listener filters
    /// time out, choose a filter chain as for a plain-text connection with no
    /// application protocol instead of closing it (Envoy's default is to
    /// close).
    pub continue_on_listener_filters_timeout: bool,
    /// `traffic_direction` (Istio sets it to tell inbound from outbound
    /// listeners; recorded, it does not change how connections are served).
    pub traffic_direction: TrafficDirection,
    /// `listener_filters` has `envoy.filters.listener.http_inspector`: a
    /// plain-text connection's first bytes set its application protocol to
    /// `http/1.0`, `http/1.1` or `h2c` for `application_protocols` matches.
    pub http_inspector: bool,
    /// `listener_filters` has `mesh.filters.listener.protocol_inspector`:
    /// as the HTTP inspector, and also `dubbo`, `bolt` or `thrift`.
    pub protocol_inspector: bool,
    /// `listener_filters` has `envoy.filters.listener.original_dst`: the
    /// connection's destination before an iptables `REDIRECT`
    /// (`SO_ORIGINAL_DST`) becomes its local address for filter chain
    /// matching, logs and ORIGINAL_DST clusters.
    pub original_dst: bool,
    /// `use_original_dst`: a connection whose original destination is
    /// another listener's address (exact, else `0.0.0.0:<port>`) is handed
    /// to that listener.
    pub use_original_dst: bool,
    /// `bind_to_port` (default true): false makes a listener that binds no
    /// socket and only receives connections handed off by a
    /// `use_original_dst` listener.
    pub bind_to_port: bool,
    /// `default_filter_chain` is set: it is the last of `filter_chains`,
    /// never matched, and serves connections no other chain matches.
    pub default_filter_chain: bool,
    /// `access_log`: one line per downstream connection when it closes,
    /// also for connections closed before a network filter ran (no filter
    /// chain matches: flag `NR`; listener filter timeout; TLS handshake
    /// failure).
    pub access_log: Vec<AccessLog>,
}

/// Envoy `config.core.v3.TrafficDirection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficDirection {
    /// `UNSPECIFIED` (the default).
    #[default]
    Unspecified,
    /// `INBOUND`: the listener takes traffic for the local workload.
    Inbound,
    /// `OUTBOUND`: the listener takes traffic the local workload sends out.
    Outbound,
}

/// Envoy `extensions.filters.network.connection_limit.v3.ConnectionLimit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimit {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `max_connections`.
    pub max_connections: u64,
    /// `delay`: how long to wait before closing a rejected connection.
    pub delay: Option<Duration>,
}

/// Envoy `config.listener.v3.FilterChain`.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterChain {
    /// `name` (optional in Envoy).
    pub name: String,
    /// The terminal network filter of the chain.
    pub terminal: NetworkFilter,
    /// `filter_chain_match`.
    pub filter_chain_match: tls::FilterChainMatch,
    /// `transport_socket` `envoy.transport_sockets.tls`: TLS termination.
    pub tls: Option<tls::DownstreamTlsContext>,
    /// `transport_socket_connect_timeout`: how long the TLS handshake may
    /// take (mesh's default 10 s).
    pub handshake_timeout: Option<Duration>,
    /// `envoy.filters.network.rbac`, checked once per connection (after the
    /// TLS handshake) before the terminal filter.
    pub rbac: Option<rbac::Rbac>,
    /// `envoy.filters.network.local_ratelimit`: one token per accepted
    /// connection, checked right after the chain is chosen.
    pub local_ratelimit: Option<crate::policy::NetworkLocalRateLimit>,
}

/// The terminal network filter of a filter chain.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkFilter {
    /// `envoy.filters.network.http_connection_manager`.
    HttpConnectionManager(Box<HttpConnectionManager>),
    /// `envoy.filters.network.tcp_proxy`.
    TcpProxy(TcpProxy),
    /// An L7 RPC proxy: `envoy.filters.network.thrift_proxy`,
    /// `envoy.filters.network.dubbo_proxy` or mesh's generic
    /// `mesh.filters.network.rpc_proxy`.
    Rpc(Box<RpcProxy>),
}

/// An L7 RPC proxy (Envoy `ThriftProxy`, `DubboProxy`, or mesh's generic
/// `RpcProxy` for any codec). Its routes are expressed in the same
/// [`RouteConfiguration`] HTTP uses: the request's service is its path and
/// authority, its method is `:method`, attachments are headers, and the
/// pseudo keys `:service`, `:version` and `:group` are matchable.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcProxy {
    /// Which filter the configuration came from (for names in logs).
    pub filter: RpcFilter,
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// The protocol.
    pub codec: RpcCodec,
    /// The routes, translated into a route configuration.
    pub route_config: RouteConfiguration,
    /// The largest frame accepted in either direction (default 8 MiB).
    pub max_frame_size: u32,
    /// Close a downstream connection idle this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// `access_log`.
    pub access_log: Vec<AccessLog>,
    /// `local_rate_limit.token_bucket` (`rpc_proxy` only): requests over
    /// the rate get the protocol's overloaded error (`None`: no limit).
    pub local_rate_limit: Option<crate::policy::TokenBucketConfig>,
    /// `fault` (`rpc_proxy` only): injected delays and aborts.
    pub fault: RpcFault,
}

/// Fault injection on an [`RpcProxy`]: a share of requests waits
/// `delay` before routing, a share is answered with the protocol's error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RpcFault {
    /// `delay.fixed_delay` (`None`: no delay).
    pub delay: Option<Duration>,
    /// `delay.percentage` (0-100).
    pub delay_percent: u32,
    /// `abort.percentage` (0-100; 0: no abort).
    pub abort_percent: u32,
}

/// The configuration an [`RpcProxy`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcFilter {
    /// `envoy.filters.network.thrift_proxy`.
    Thrift,
    /// `envoy.filters.network.dubbo_proxy`.
    Dubbo,
    /// `mesh.filters.network.rpc_proxy`.
    Generic,
}

/// The protocol of an [`RpcProxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcCodec {
    /// Apache Thrift; `None` transport/protocol: detected per frame.
    Thrift {
        /// `transport`: `Some(true)` framed, `Some(false)` unframed.
        framed: Option<bool>,
        /// `protocol`.
        protocol: Option<ThriftProtocol>,
        /// `transport: HEADER` (`THeaderTransport`; `framed` is then
        /// `None`).
        header: bool,
        /// Lower-case header transport info header keys (Envoy's
        /// `thrift_proxy` does unless `header_keys_preserve_case`).
        lowercase_header_keys: bool,
    },
    /// Apache Dubbo (dubbo2, Hessian2).
    Dubbo,
    /// SOFA Bolt v1.
    Bolt,
    /// Dubbo, Bolt or Thrift, detected from each frame's first bytes.
    Auto,
    /// A codec a Rust program registers by this name
    /// (`mesh_bin::ProxyOptions::rpc_codecs`); not reachable from YAML.
    Custom(String),
}

/// Envoy `thrift_proxy.v3.ProtocolType` (the supported subset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThriftProtocol {
    /// `BINARY`.
    Binary,
    /// `LAX_BINARY`.
    LaxBinary,
    /// `COMPACT`.
    Compact,
}

/// Envoy `HttpConnectionManager.CodecType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CodecType {
    /// HTTP/1.1 or HTTP/2 (prior knowledge) chosen per connection from the
    /// first bytes.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only (h2c prior knowledge on cleartext listeners).
    Http2,
}

/// Envoy `extensions.filters.network.http_connection_manager.v3.HttpConnectionManager`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConnectionManager {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `codec_type`.
    pub codec_type: CodecType,
    /// `route_config` (inline; RDS arrives with xDS).
    pub route_config: RouteConfiguration,
    /// `http_filters`, in order. The last one is `envoy.filters.http.router`.
    pub http_filters: Vec<HttpFilter>,
    /// `stream_idle_timeout` (Envoy default 5 minutes; `0s` disables).
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout` (default disabled).
    pub request_timeout: Option<Duration>,
    /// `request_headers_timeout` (default disabled).
    pub request_headers_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_stream_duration`: how long a stream
    /// may live, from its request headers (none: unbounded). A route's
    /// `max_stream_duration` overrides it.
    pub max_stream_duration: Option<Duration>,
    /// `common_http_protocol_options.idle_timeout` for downstream connections
    /// (Envoy default 1 hour).
    pub idle_timeout: Option<Duration>,
    /// `max_request_headers_kb` (Envoy default 60).
    pub max_request_headers_kb: u32,
    /// `use_remote_address`: when true the proxy appends the peer address to
    /// `x-forwarded-for` (unless `skip_xff_append`).
    pub use_remote_address: bool,
    /// `skip_xff_append`.
    pub skip_xff_append: bool,
    /// `generate_request_id` (default true): add `x-request-id` when absent.
    pub generate_request_id: bool,
    /// `server_name` (default "envoy" in Envoy; mesh uses "mesh" unless set).
    pub server_name: Option<String>,
    /// `access_log`.
    pub access_log: Vec<AccessLog>,
    /// `upgrade_configs[].upgrade_type`, lower-cased (e.g. `websocket`).
    /// Upgrade requests of other types are refused with 403, as Envoy does.
    pub upgrade_types: Vec<String>,
    /// `internal_address_config.cidr_ranges` (address, prefix length): with
    /// `use_remote_address`, a peer in these ranges (with no
    /// `x-forwarded-for` of its own) sends internal requests, whose
    /// `x-envoy-*` control headers (e.g. `x-envoy-retry-on`) are honoured.
    pub internal_address_config: Vec<(std::net::IpAddr, u8)>,
    /// Name and `disabled` of each entry of `http_filters` (same order).
    pub http_filter_meta: Vec<crate::policy::HttpFilterMeta>,
    /// `rds`: the route configuration comes over xDS by this name; then
    /// `route_config` is empty until it arrives.
    pub rds: Option<Rds>,
    /// `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`.
    pub path_normalization: PathNormalization,
}

/// How the HCM rewrites a request's path before routing (and forwarding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathNormalization {
    /// `normalize_path`: RFC 3986 normalisation (dot segments removed,
    /// unreserved characters percent-decoded, other escapes kept,
    /// backslashes made slashes).
    pub normalize_path: bool,
    /// `merge_slashes`: runs of `/` become one.
    pub merge_slashes: bool,
    /// `path_with_escaped_slashes_action` for `%2F` / `%5C` in the path.
    pub escaped_slashes: EscapedSlashesAction,
}

/// Envoy `HttpConnectionManager.PathWithEscapedSlashesAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashesAction {
    /// `KEEP_UNCHANGED` (and the default `IMPLEMENTATION_SPECIFIC_DEFAULT`).
    #[default]
    KeepUnchanged,
    /// `REJECT_REQUEST`: answered 400.
    RejectRequest,
    /// `UNESCAPE_AND_REDIRECT`: answered 307 to the unescaped path.
    UnescapeAndRedirect,
    /// `UNESCAPE_AND_FORWARD`: unescaped, then routed and forwarded.
    UnescapeAndForward,
}

/// One entry of `http_filters`.
#[derive(Debug, Clone, PartialEq)]
pub enum HttpFilter {
    /// `envoy.filters.http.router`: the terminal filter.
    Router,
    /// `envoy.filters.http.local_ratelimit`.
    LocalRateLimit(Box<crate::policy::LocalRateLimitConfig>),
    /// `envoy.filters.http.fault`.
    Fault(Box<crate::policy::FaultConfig>),
    /// `envoy.filters.http.rbac`.
    Rbac(Box<rbac::Rbac>),
    /// `envoy.filters.http.cors` (its policies come from
    /// `typed_per_filter_config`).
    Cors,
    /// `istio.alpn`: the ALPN list of upstream TLS connections.
    IstioAlpn(Box<istio::AlpnOverride>),
    /// `envoy.filters.http.grpc_stats`: per-cluster gRPC call counters.
    GrpcStats(Box<grpc_stats::GrpcStats>),
    /// `istio.metadata_exchange`: peer workload metadata in headers.
    IstioPeerMetadata(Box<istio::PeerMetadata>),
    /// `istio.stats`: Istio's standard request metrics.
    IstioStats(Box<istio::Stats>),
}

/// One access log (Envoy `config.accesslog.v3.AccessLog`): where lines go,
/// their format (Envoy's default without one) and which streams are logged.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    /// The sink.
    pub sink: AccessLogSink,
    /// `typed_config.log_format`; Envoy's default format when `None`.
    pub format: Option<crate::access_log::LogFormat>,
    /// `filter`; every stream is logged when `None`.
    pub filter: Option<crate::access_log::AccessLogFilter>,
}

impl From<AccessLogSink> for AccessLog {
    fn from(sink: AccessLogSink) -> Self {
        AccessLog {
            sink,
            format: None,
            filter: None,
        }
    }
}

/// Where an [`AccessLog`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogSink {
    /// `envoy.access_loggers.stdout`.
    Stdout,
    /// `envoy.access_loggers.stderr`.
    Stderr,
    /// `envoy.access_loggers.file` with `path`.
    File(String),
}

/// Envoy `extensions.filters.network.tcp_proxy.v3.TcpProxy`.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpProxy {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `cluster` or `weighted_clusters`.
    pub cluster: ClusterSpecifier,
    /// `idle_timeout` (Envoy default 1 hour; `0s` disables).
    pub idle_timeout: Option<Duration>,
    /// `access_log`.
    pub access_log: Vec<AccessLog>,
    /// `hash_policy` (only `source_ip`).
    pub hash_policy: Vec<HashPolicy>,
    /// An `istio.metadata_exchange` network filter before the proxy: the
    /// TCP peer metadata exchange on downstream connections.
    pub istio_metadata_exchange: Option<istio::TcpMetadataExchange>,
    /// An `istio.stats` network filter before the proxy: Istio's TCP
    /// metrics (`istio_tcp_*`).
    pub istio_stats: Option<Box<istio::Stats>>,
}

/// Envoy `config.route.v3.RouteConfiguration`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteConfiguration {
    /// `name`.
    pub name: String,
    /// `virtual_hosts`.
    pub virtual_hosts: Vec<VirtualHost>,
    /// `request_headers_to_add`, `request_headers_to_remove`,
    /// `response_headers_to_add`, `response_headers_to_remove`.
    pub headers: HeaderMutations,
}

/// Header mutations at one level (route configuration, virtual host or
/// route). As in Envoy's default (`most_specific_header_mutations_wins:
/// false`), levels apply from the most specific to the most general
/// (weighted cluster, route, virtual host, route configuration), so the most
/// general level wins when two overwrite the same header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMutations {
    /// `request_headers_to_add`.
    pub request_add: Vec<HeaderValueOption>,
    /// `request_headers_to_remove`.
    pub request_remove: Vec<String>,
    /// `response_headers_to_add`.
    pub response_add: Vec<HeaderValueOption>,
    /// `response_headers_to_remove`.
    pub response_remove: Vec<String>,
}

impl HeaderMutations {
    /// True when no mutation is configured at this level.
    pub fn is_empty(&self) -> bool {
        self.request_add.is_empty()
            && self.request_remove.is_empty()
            && self.response_add.is_empty()
            && self.response_remove.is_empty()
    }
}

/// Envoy `config.core.v3.HeaderValueOption`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderValueOption {
    /// `header.key` (lower-cased).
    pub key: String,
    /// `header.value`.
    pub value: String,
    /// `append_action` (or the deprecated `append` flag).
    pub append_action: AppendAction,
    /// `keep_empty_value`.
    pub keep_empty_value: bool,
}

/// Envoy `HeaderValueOption.HeaderAppendAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppendAction {
    /// Append a value, adding the header if absent (Envoy's default).
    #[default]
    AppendIfExistsOrAdd,
    /// Add only when the header is absent.
    AddIfAbsent,
    /// Replace every existing value, or add.
    OverwriteIfExistsOrAdd,
    /// Replace only when present.
    OverwriteIfExists,
}

/// Envoy `config.route.v3.VirtualHost`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VirtualHost {
    /// `name`.
    pub name: String,
    /// `domains`: exact host names, `*`, `*.suffix` / `*suffix` or
    /// `prefix.*` / `prefix*` wildcards. Matching ignores case; as in Envoy,
    /// a `Host` with a port matches only a domain that names the port (or a
    /// wildcard that covers it).
    pub domains: Vec<String>,
    /// `routes`, matched in order; the first match wins.
    pub routes: Vec<Route>,
    /// Header mutations at the virtual-host level.
    pub headers: HeaderMutations,
    /// `retry_policy`, `typed_per_filter_config` and other traffic policy.
    pub policy: crate::policy::VhostPolicy,
}

/// Envoy `config.route.v3.Route`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// `name`.
    pub name: String,
    /// `match`.
    pub matcher: RouteMatch,
    /// `route`, `direct_response` or `redirect`.
    pub action: Action,
    /// Header mutations at the route level.
    pub headers: HeaderMutations,
    /// `route.retry_policy`, `typed_per_filter_config` and other traffic
    /// policy.
    pub policy: crate::policy::RoutePolicy,
}

/// Envoy `config.route.v3.RouteMatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    /// `prefix`, `path` or `safe_regex`.
    pub path: PathMatch,
    /// `case_sensitive` (default true) for `prefix` and `path`.
    pub case_sensitive: bool,
    /// `headers`: all must match.
    pub headers: Vec<HeaderMatcher>,
    /// `query_parameters`: all must match.
    pub query_parameters: Vec<QueryParameterMatcher>,
    /// `grpc`: match only gRPC requests (`content-type: application/grpc*`).
    pub grpc: bool,
}

/// The path part of a [`RouteMatch`].
#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    /// `prefix`: the path (without query) starts with this.
    Prefix(String),
    /// `path`: the path (without query) equals this.
    Exact(String),
    /// `safe_regex.regex`: the whole path (without query) matches.
    Regex(String),
    /// `path_separated_prefix`: the path equals this or continues with `/`.
    SeparatedPrefix(String),
}

/// Envoy `config.route.v3.HeaderMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatcher {
    /// `name` (lower-cased). Pseudo-headers `:path`, `:method`,
    /// `:authority`, `:scheme` are matched too.
    pub name: String,
    /// What the value must satisfy.
    pub kind: HeaderMatchKind,
    /// `invert_match`.
    pub invert: bool,
    /// `treat_missing_header_as_empty`.
    pub treat_missing_as_empty: bool,
}

/// How a [`HeaderMatcher`] tests a value.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderMatchKind {
    /// `exact_match` or `string_match.exact`.
    Exact(String),
    /// `prefix_match` or `string_match.prefix`.
    Prefix(String),
    /// `suffix_match` or `string_match.suffix`.
    Suffix(String),
    /// `contains_match` or `string_match.contains`.
    Contains(String),
    /// `safe_regex_match` or `string_match.safe_regex`: the whole value
    /// matches.
    Regex(String),
    /// `present_match`: true = header present, false = absent.
    Present(bool),
    /// `range_match`: the value is an integer in `[start, end)`.
    Range {
        /// `start` (inclusive).
        start: i64,
        /// `end` (exclusive).
        end: i64,
    },
    /// `string_match` with `ignore_case: true` (exact/prefix/suffix/contains).
    IgnoreCase(Box<HeaderMatchKind>),
}

/// Envoy `config.route.v3.QueryParameterMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryParameterMatcher {
    /// `name`.
    pub name: String,
    /// `string_match` (exact/prefix/suffix/contains/regex, optional
    /// ignore_case), or `present_match` (`Present(true)`).
    pub kind: HeaderMatchKind,
}

/// What a matched route does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `route`: forward to a cluster.
    Route(RouteAction),
    /// `direct_response`: answer locally.
    DirectResponse {
        /// `status`.
        status: u16,
        /// `body.inline_string` / `body.inline_bytes`.
        body: Option<bytes::Bytes>,
    },
    /// `redirect`.
    Redirect(RedirectAction),
}

/// Envoy `config.route.v3.RouteAction`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteAction {
    /// `cluster` or `weighted_clusters`.
    pub cluster: ClusterSpecifier,
    /// `prefix_rewrite`: replaces the matched prefix (or the whole matched
    /// path for `path` matches).
    pub prefix_rewrite: Option<String>,
    /// `regex_rewrite` (pattern, substitution).
    pub regex_rewrite: Option<(String, String)>,
    /// `host_rewrite_literal`.
    pub host_rewrite_literal: Option<String>,
    /// `timeout` (Envoy default 15 s; `0s` disables).
    pub timeout: Option<Duration>,
    /// `idle_timeout` per stream.
    pub idle_timeout: Option<Duration>,
    /// `hash_policy`: how the request hash for ring hash / Maglev is made.
    pub hash_policy: Vec<HashPolicy>,
    /// `metadata_match.filter_metadata["envoy.lb"]`: the endpoint subset.
    pub metadata_match: LbMetadata,
}

impl RouteAction {
    /// An action sending to `cluster` with Envoy's defaults: the 15 s route
    /// timeout, no rewrites, no idle timeout, no hashing, no subset.
    pub fn new(cluster: ClusterSpecifier) -> Self {
        RouteAction {
            cluster,
            prefix_rewrite: None,
            regex_rewrite: None,
            host_rewrite_literal: None,
            timeout: Some(Duration::from_secs(15)),
            idle_timeout: None,
            hash_policy: Vec::new(),
            metadata_match: Default::default(),
        }
    }
}

/// Which cluster(s) a route or TCP proxy sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSpecifier {
    /// One cluster by name.
    Cluster(String),
    /// `weighted_clusters.clusters`: a weighted random choice per request.
    Weighted(Vec<WeightedCluster>),
}

/// One entry of `weighted_clusters.clusters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedCluster {
    /// `name`.
    pub name: String,
    /// `weight`.
    pub weight: u32,
    /// Header mutations of this choice (`request_headers_to_add`, ...).
    pub headers: HeaderMutations,
    /// `metadata_match` (`envoy.lb`), merged over the route's.
    pub metadata_match: LbMetadata,
}

/// Envoy `config.route.v3.RedirectAction`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectAction {
    /// `https_redirect` (scheme `https`) or `scheme_redirect`.
    pub scheme: Option<String>,
    /// `host_redirect`.
    pub host: Option<String>,
    /// `port_redirect`.
    pub port: Option<u16>,
    /// `path_redirect` or `prefix_rewrite`.
    pub path: Option<RedirectPath>,
    /// `response_code` (301 default, 302, 303, 307, 308).
    pub response_code: u16,
    /// `strip_query`.
    pub strip_query: bool,
}

/// How a redirect changes the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedirectPath {
    /// `path_redirect`: the whole path (and query, when it has one).
    Path(String),
    /// `prefix_rewrite`: replace the matched prefix.
    PrefixRewrite(String),
}

/// Envoy `config.cluster.v3.Cluster.DiscoveryType`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryType {
    /// `STATIC`: the endpoints are IP addresses in `load_assignment`.
    Static,
    /// `STRICT_DNS`: every address every host name resolves to is an
    /// endpoint, re-resolved every `dns_refresh_rate`.
    StrictDns,
    /// `LOGICAL_DNS`: one endpoint per host name, connecting to its first
    /// address, re-resolved every `dns_refresh_rate`.
    LogicalDns,
    /// `EDS`: endpoints arrive over xDS (`eds_cluster_config.service_name`).
    Eds {
        /// `eds_cluster_config.service_name` (defaults to the cluster name).
        service_name: String,
        /// `eds_cluster_config.eds_config`.
        source: ConfigSource,
    },
    /// `ORIGINAL_DST` (with `lb_policy: CLUSTER_PROVIDED`): the endpoint is
    /// the downstream connection's original destination, created on demand.
    OriginalDst(OriginalDst),
}

/// The settings of an `ORIGINAL_DST` cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalDst {
    /// `cleanup_interval` (Envoy default 5 s): hosts unused for this long
    /// are removed.
    pub cleanup_interval: Duration,
    /// `original_dst_lb_config.use_http_header`: an HTTP request may name
    /// its destination in `header`.
    pub use_http_header: bool,
    /// `original_dst_lb_config.http_header_name` (default
    /// `x-envoy-original-dst-host`), lower case.
    pub header: String,
    /// `original_dst_lb_config.upstream_port_override`.
    pub port_override: Option<u16>,
}

/// Envoy `config.cluster.v3.Cluster.LbPolicy` (the ones mesh has today).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// `ROUND_ROBIN`: weighted round robin when endpoint weights differ.
    #[default]
    RoundRobin,
    /// `RANDOM`: weighted random.
    Random,
    /// `LEAST_REQUEST`: power of two (`choice_count`) choices by active
    /// requests; weighted as Envoy when weights differ.
    LeastRequest,
    /// `RING_HASH`: consistent hashing on a ring (ketama).
    RingHash,
    /// `MAGLEV`: consistent hashing with a Maglev lookup table.
    Maglev,
    /// Peak EWMA of response latency (linkerd's balancer), typed extension
    /// `mesh.load_balancing_policies.peak_ewma`.
    PeakEwma,
}

/// The protocol used to talk to a cluster's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (Envoy's default).
    #[default]
    Http1,
    /// HTTP/2 (h2c prior knowledge on cleartext), from
    /// `typed_extension_protocol_options` `explicit_http_config.http2_protocol_options`
    /// or the deprecated `http2_protocol_options`.
    Http2,
    /// Whatever the downstream request used (`use_downstream_protocol_config`).
    Downstream,
}

/// Envoy `config.cluster.v3.Cluster`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// `name`; unique among clusters.
    pub name: String,
    /// `type`.
    pub discovery: DiscoveryType,
    /// `connect_timeout` (Envoy default 5 s).
    pub connect_timeout: Duration,
    /// `lb_policy`.
    pub lb_policy: LbPolicy,
    /// `load_assignment.endpoints`.
    pub localities: Vec<LocalityLbEndpoints>,
    /// The upstream HTTP protocol.
    pub protocol: UpstreamProtocol,
    /// `dns_refresh_rate` (Envoy default 5 s).
    pub dns_refresh_rate: Duration,
    /// `dns_lookup_family` restricts resolved addresses.
    pub dns_lookup_family: DnsLookupFamily,
    /// Upstream connection idle timeout
    /// (`common_http_protocol_options.idle_timeout`, Envoy default 1 hour).
    pub idle_timeout: Option<Duration>,
    /// `per_connection_buffer_limit_bytes`.
    pub per_connection_buffer_limit_bytes: u32,
    /// `transport_socket` `envoy.transport_sockets.tls`: TLS to the endpoints.
    pub tls: Option<tls::UpstreamTlsContext>,
    /// `transport_socket_matches`: per-endpoint transport sockets chosen by
    /// endpoint metadata (see [`socket_match`]); empty for most clusters.
    pub transport_socket_matches: Vec<TransportSocketMatch>,
    /// Load-balancing settings (`common_lb_config`, `*_lb_config`,
    /// `lb_subset_config`, `load_assignment.policy`).
    pub lb: LbConfig,
    /// `health_checks` (Envoy runs at most one).
    pub health_check: Option<HealthCheck>,
    /// `outlier_detection`.
    pub outlier_detection: Option<OutlierDetection>,
    /// `max_requests_per_connection`: requests an upstream connection
    /// carries before it is closed (none: unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// `circuit_breakers`.
    pub circuit_breakers: crate::policy::CircuitBreakers,
    /// An endpoint's `address.pipe.path`: the Unix socket of a management
    /// server (Istio's `xds-grpc` and `sds-grpc` clusters). Such a cluster
    /// may only be named by an `envoy_grpc.cluster_name`.
    pub pipe: Option<String>,
    /// `upstream_bind_config.source_address`: the local address upstream
    /// connections are made from (Istio binds its inbound passthrough to
    /// 127.0.0.6 so iptables can tell that traffic apart).
    pub upstream_bind: Option<SocketAddr>,
    /// `metadata.filter_metadata.istio.services[0]`: the service istiod
    /// made this cluster for (`istio.stats`' `destination_service`).
    pub istio_service: Option<istio::IstioService>,
    /// `filters[]`'s `istio.metadata_exchange`: the TCP peer metadata
    /// exchange on upstream connections (outbound sidecar clusters).
    pub istio_metadata_exchange: Option<istio::TcpMetadataExchange>,
}

/// Envoy `Cluster.DnsLookupFamily`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DnsLookupFamily {
    /// `AUTO`: IPv6 addresses when there are any, else IPv4 (Envoy's rule).
    #[default]
    Auto,
    /// `V4_ONLY`.
    V4Only,
    /// `V6_ONLY`.
    V6Only,
    /// `V4_PREFERRED`.
    V4Preferred,
    /// `ALL`.
    All,
}

/// Envoy `config.endpoint.v3.LocalityLbEndpoints`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalityLbEndpoints {
    /// `locality`.
    pub locality: Locality,
    /// `priority` (0 is the highest).
    pub priority: u32,
    /// `load_balancing_weight` of the locality.
    pub load_balancing_weight: Option<u32>,
    /// `metadata.filter_metadata["envoy.transport_socket_match"]` of the
    /// locality (consulted when no match fits an endpoint's own).
    pub socket_match: LbMetadata,
    /// `lb_endpoints`.
    pub lb_endpoints: Vec<LbEndpoint>,
}

/// Envoy `config.endpoint.v3.LbEndpoint`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbEndpoint {
    /// `endpoint.address.socket_address.address`: an IP for STATIC
    /// clusters, a host name for DNS clusters.
    pub host: String,
    /// `endpoint.address.socket_address.port_value`.
    pub port: u16,
    /// `load_balancing_weight` (default 1).
    pub weight: u32,
    /// `metadata.filter_metadata["envoy.lb"]`.
    pub metadata: LbMetadata,
    /// `health_status`.
    pub health_status: HealthStatus,
    /// `metadata.filter_metadata["envoy.transport_socket_match"]`: picks the
    /// cluster's `transport_socket_matches` entry.
    pub socket_match: LbMetadata,
}

/// Envoy `config.bootstrap.v3.Bootstrap.DynamicResources`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DynamicResources {
    /// `ads_config`: the aggregated stream that `ads: {}` sources use.
    pub ads_config: Option<ApiConfigSource>,
    /// `cds_config`: where clusters come from.
    pub cds_config: Option<ConfigSource>,
    /// `lds_config`: where listeners come from.
    pub lds_config: Option<ConfigSource>,
}

/// Envoy `config.core.v3.ConfigSource` (the gRPC subset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    /// `ads: {}` or `api_config_source`.
    pub kind: ConfigSourceKind,
    /// `initial_fetch_timeout` (Envoy default 15 s; `0s` waits forever):
    /// how long a resource being warmed (a cluster's endpoints, a
    /// listener's routes) is waited for before going live without it.
    pub initial_fetch_timeout: Option<Duration>,
}

impl Default for ConfigSource {
    fn default() -> Self {
        ConfigSource {
            kind: ConfigSourceKind::Ads,
            initial_fetch_timeout: Some(Duration::from_secs(15)),
        }
    }
}

/// Where a [`ConfigSource`] points.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConfigSourceKind {
    /// `ads: {}`: the bootstrap's `ads_config` stream.
    #[default]
    Ads,
    /// `api_config_source`: a stream of its own.
    Api(ApiConfigSource),
}

/// Envoy `config.core.v3.ApiConfigSource` with one `envoy_grpc` service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiConfigSource {
    /// `api_type`: `DELTA_GRPC` (true) or `GRPC` (false).
    pub delta: bool,
    /// `grpc_services[0].envoy_grpc.cluster_name`: a static cluster that
    /// reaches the management server (HTTP/2).
    pub cluster_name: String,
}

/// Envoy `extensions.filters.network.http_connection_manager.v3.Rds`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rds {
    /// `route_config_name`.
    pub route_config_name: String,
    /// `config_source`.
    pub config_source: ConfigSource,
}
