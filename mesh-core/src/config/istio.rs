//! Istio's own extensions, as istiod puts them in a sidecar's LDS and CDS:
//! `istio.alpn` (ALPN override for upstream TLS), `istio.metadata_exchange`
//! (peer metadata, HTTP headers or the TCP `istio-peer-exchange`
//! protocol) and `istio.stats` (Istio's standard metrics).
//!
//! The field names are those of Istio's protos
//! (`istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`,
//! `io.istio.http.peer_metadata.Config`,
//! `envoy.tcp.metadataexchange.config.MetadataExchange`,
//! `stats.PluginConfig`).

use std::time::Duration;

/// The HTTP protocol of an upstream request (`FilterConfig.ProtocolType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// `HTTP10`.
    Http10,
    /// `HTTP11`.
    Http11,
    /// `HTTP2`.
    Http2,
}

/// `istio.alpn` (`FilterConfig`): the ALPN list offered on an upstream TLS
/// connection made for a request, by the request's upstream protocol.
/// A protocol with no entry keeps the cluster's own ALPN list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlpnOverride {
    /// `alpn_override[]`: (`upstream_protocol`, `alpn_override`).
    pub overrides: Vec<(UpstreamProtocol, Vec<String>)>,
}

impl AlpnOverride {
    /// The override for `protocol`, if any (the last entry for a protocol
    /// wins, as Istio's filter builds its map).
    pub fn for_protocol(&self, protocol: UpstreamProtocol) -> Option<&[String]> {
        self.overrides
            .iter()
            .rev()
            .find(|(p, _)| *p == protocol)
            .map(|(_, l)| l.as_slice())
    }
}

/// How peer metadata is discovered (`Config.DiscoveryMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerDiscovery {
    /// `istio_headers`: the `x-envoy-peer-metadata` headers.
    IstioHeaders,
    /// `workload_discovery`: the workload metadata xDS (not served by mesh:
    /// the lookup finds nothing and the next method is tried).
    WorkloadDiscovery,
    /// `baggage` (deprecated in Istio).
    Baggage,
}

/// How this proxy's metadata is propagated (`Config.PropagationMethod`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IstioHeaders {
    /// `skip_external_clusters`: no headers to clusters whose metadata says
    /// they are outside the mesh.
    pub skip_external_clusters: bool,
}

/// `istio.metadata_exchange` HTTP filter (`io.istio.http.peer_metadata.Config`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// `downstream_discovery[]`, in precedence order.
    pub downstream_discovery: Vec<PeerDiscovery>,
    /// `upstream_discovery[]`, in precedence order.
    pub upstream_discovery: Vec<PeerDiscovery>,
    /// `downstream_propagation[]`: headers on responses.
    pub downstream_propagation: Option<IstioHeaders>,
    /// `upstream_propagation[]`: headers on requests.
    pub upstream_propagation: Option<IstioHeaders>,
    /// `shared_with_upstream`.
    pub shared_with_upstream: bool,
    /// `additional_labels`.
    pub additional_labels: Vec<String>,
}

/// `istio.metadata_exchange` network or cluster filter
/// (`envoy.tcp.metadataexchange.config.MetadataExchange`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpMetadataExchange {
    /// `protocol`: the ALPN value that turns the exchange on
    /// (`istio-peer-exchange`).
    pub protocol: String,
    /// `enable_discovery`: fall back to workload discovery.
    pub enable_discovery: bool,
    /// `additional_labels`.
    pub additional_labels: Vec<String>,
}

/// `stats.PluginConfig.reporter`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatsReporter {
    /// `UNSPECIFIED`: from the listener direction (client or server sidecar).
    #[default]
    Unspecified,
    /// `SERVER_GATEWAY` (a waypoint).
    ServerGateway,
}

/// One `stats.PluginConfig.metrics[]` override.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricOverride {
    /// `name` (all metrics when empty).
    pub name: String,
    /// `dimensions`: tag name -> CEL expression.
    pub dimensions: Vec<(String, String)>,
    /// `tags_to_remove`.
    pub tags_to_remove: Vec<String>,
    /// `drop`.
    pub drop: bool,
}

/// `istio.stats` (`stats.PluginConfig`), HTTP or network filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `disable_host_header_fallback`.
    pub disable_host_header_fallback: bool,
    /// `tcp_reporting_duration` (Istio default 15 s).
    pub tcp_reporting_duration: Option<Duration>,
    /// `metrics[]`.
    pub metrics: Vec<MetricOverride>,
    /// `reporter`.
    pub reporter: StatsReporter,
    /// `rescoping_duration`.
    pub rescoping_duration: Option<Duration>,
    /// `scope_grace_period_duration`.
    pub scope_grace_period_duration: Option<Duration>,
}
