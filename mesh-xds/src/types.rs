//! Type URLs of the xDS resources and the gRPC methods that carry them.

/// `envoy.config.listener.v3.Listener` (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// `envoy.config.route.v3.RouteConfiguration` (RDS).
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// `envoy.config.cluster.v3.Cluster` (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// `envoy.extensions.transport_sockets.tls.v3.Secret` (SDS).
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// `envoy.service.discovery.v3.Resource`: a wrapper some servers put around
/// state-of-the-world resources.
pub const RESOURCE_WRAPPER: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// The five resource types in the order Envoy subscribes to them over ADS:
/// clusters before their endpoints, listeners before their routes.
pub const ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// Whether a type is subscribed by wildcard (every resource the server has
/// for the node) rather than by name: listeners and clusters.
pub fn is_wildcard(type_url: &str) -> bool {
    type_url == LISTENER || type_url == CLUSTER
}

/// The short name of a type (`LDS`, `RDS`, `CDS`, `EDS`, `SDS`), or the type
/// URL itself for another type.
pub fn short(type_url: &str) -> &str {
    match type_url {
        LISTENER => "LDS",
        ROUTE => "RDS",
        CLUSTER => "CDS",
        ENDPOINT => "EDS",
        SECRET => "SDS",
        other => other,
    }
}

/// Which gRPC service a stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `AggregatedDiscoveryService`: every type on one stream.
    Aggregated,
    /// The type's own discovery service (`ClusterDiscoveryService`, ...).
    PerType(&'static str),
}

/// Whether a stream is state-of-the-world or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// `GRPC`: every response carries every resource of the type.
    #[default]
    StateOfTheWorld,
    /// `DELTA_GRPC`: responses carry changed resources and removed names.
    Delta,
}

/// The gRPC method path for a stream.
pub fn method_path(service: Service, protocol: Protocol) -> &'static str {
    use Protocol::*;
    match (service, protocol) {
        (Service::Aggregated, StateOfTheWorld) => {
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
        }
        (Service::Aggregated, Delta) => {
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
        }
        (Service::PerType(t), p) => match (t, p) {
            (LISTENER, StateOfTheWorld) => {
                "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners"
            }
            (LISTENER, Delta) => {
                "/envoy.service.listener.v3.ListenerDiscoveryService/DeltaListeners"
            }
            (ROUTE, StateOfTheWorld) => {
                "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes"
            }
            (ROUTE, Delta) => "/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes",
            (ENDPOINT, StateOfTheWorld) => {
                "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints"
            }
            (ENDPOINT, Delta) => {
                "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints"
            }
            (SECRET, StateOfTheWorld) => {
                "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
            }
            (SECRET, Delta) => "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets",
            (_, StateOfTheWorld) => {
                "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters"
            }
            (_, Delta) => "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters",
        },
    }
}

/// The name of an xDS resource: field 1 of every one of the five types
/// (`name`, or `cluster_name` for a `ClusterLoadAssignment`), read without
/// decoding the rest.
pub fn resource_name(bytes: &[u8]) -> Result<String, prost::DecodeError> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Named {
        #[prost(string, tag = "1")]
        name: String,
    }
    <Named as prost::Message>::decode(bytes).map(|n| n.name)
}
