//! Load-balancing configuration: the cluster settings that shape endpoint
//! selection beyond the policy name (Envoy's `common_lb_config`, the
//! per-policy `*_lb_config` messages, `lb_subset_config`, the load
//! assignment `policy`), endpoint metadata, and the route's `hash_policy`.
//!
//! Re-exported from [`crate::config`]; kept in its own file so the
//! load-balancing model can grow without touching the rest of the config
//! model.

use std::collections::BTreeMap;
use std::time::Duration;

/// One value of endpoint or route metadata (`google.protobuf.Value`, the
/// scalar kinds). Numbers are kept in their shortest decimal form so that
/// `1` and `1.0` compare equal, as protobuf doubles do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetadataValue {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A number, as the shortest decimal text of its `f64` value.
    Number(String),
    /// A string.
    String(String),
}

impl MetadataValue {
    /// A number value.
    pub fn number(n: f64) -> Self {
        MetadataValue::Number(format!("{n}"))
    }
}

impl From<&str> for MetadataValue {
    fn from(s: &str) -> Self {
        MetadataValue::String(s.to_owned())
    }
}

/// Load-balancing metadata: the `envoy.lb` namespace of an endpoint's
/// `metadata.filter_metadata`, or of a route's `metadata_match`.
pub type LbMetadata = BTreeMap<String, MetadataValue>;

/// Cluster load-balancing settings (everything but the policy itself).
#[derive(Debug, Clone, PartialEq)]
pub struct LbConfig {
    /// `least_request_lb_config.choice_count` (default 2, at least 2).
    pub choice_count: u32,
    /// `least_request_lb_config.active_request_bias` (default 1.0): with
    /// uneven weights an endpoint's effective weight is
    /// `weight / (active + 1) ^ bias`.
    pub active_request_bias: f64,
    /// `ring_hash_lb_config.minimum_ring_size` (default 1024).
    pub minimum_ring_size: u64,
    /// `ring_hash_lb_config.maximum_ring_size` (default 8M).
    pub maximum_ring_size: u64,
    /// `maglev_lb_config.table_size` (default 65537, prime).
    pub maglev_table_size: u64,
    /// `consistent_hashing_lb_config.use_hostname_for_hashing`: ring hash
    /// and Maglev hash the host name instead of `ip:port`.
    pub use_hostname_for_hashing: bool,
    /// Peak EWMA: the latency assumed for an endpoint with no sample yet
    /// (default 30 ms, as linkerd).
    pub ewma_default_rtt: Duration,
    /// Peak EWMA: the decay time constant (default 10 s, as linkerd).
    pub ewma_decay: Duration,
    /// `common_lb_config.healthy_panic_threshold` in percent (default 50):
    /// below this share of healthy endpoints a priority level uses all of
    /// its endpoints.
    pub healthy_panic_threshold: f64,
    /// `load_assignment.policy.overprovisioning_factor` in percent
    /// (default 140).
    pub overprovisioning_factor: u32,
    /// `load_assignment.policy.weighted_priority_health`: level health is
    /// computed from weights rather than endpoint counts.
    pub weighted_priority_health: bool,
    /// `common_lb_config.locality_weighted_lb_config`: pick a locality by
    /// its `load_balancing_weight` first.
    pub locality_weighted: bool,
    /// `common_lb_config.zone_aware_lb_config`.
    pub zone_aware: Option<ZoneAwareConfig>,
    /// `lb_subset_config`.
    pub subset: Option<SubsetConfig>,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            choice_count: 2,
            active_request_bias: 1.0,
            minimum_ring_size: 1024,
            maximum_ring_size: 8 * 1024 * 1024,
            maglev_table_size: 65537,
            use_hostname_for_hashing: false,
            ewma_default_rtt: Duration::from_millis(30),
            ewma_decay: Duration::from_secs(10),
            healthy_panic_threshold: 50.0,
            overprovisioning_factor: 140,
            weighted_priority_health: false,
            locality_weighted: false,
            zone_aware: None,
            subset: None,
        }
    }
}

/// Envoy `Cluster.CommonLbConfig.ZoneAwareLbConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneAwareConfig {
    /// `routing_enabled` in percent (default 100): the share of requests
    /// that use zone-aware routing.
    pub routing_enabled: f64,
    /// `min_cluster_size` (default 6): below this many endpoints in the
    /// level, no zone-aware routing.
    pub min_cluster_size: u64,
    /// `fail_traffic_on_panic`: in panic mode, fail requests rather than
    /// send them to every endpoint.
    pub fail_traffic_on_panic: bool,
}

impl Default for ZoneAwareConfig {
    fn default() -> Self {
        ZoneAwareConfig {
            routing_enabled: 100.0,
            min_cluster_size: 6,
            fail_traffic_on_panic: false,
        }
    }
}

/// Envoy `Cluster.LbSubsetConfig`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubsetConfig {
    /// `subset_selectors[].keys`, each sorted.
    pub selectors: Vec<Vec<String>>,
    /// `fallback_policy` (default `NO_FALLBACK`).
    pub fallback_policy: SubsetFallback,
    /// `default_subset`: the endpoints used by `DEFAULT_SUBSET`.
    pub default_subset: LbMetadata,
}

/// Envoy `LbSubsetConfig.LbSubsetFallbackPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubsetFallback {
    /// `NO_FALLBACK`: no endpoint (503 `UH`).
    #[default]
    NoFallback,
    /// `ANY_ENDPOINT`: any endpoint of the cluster.
    AnyEndpoint,
    /// `DEFAULT_SUBSET`: the endpoints matching `default_subset`.
    DefaultSubset,
}

/// One route `hash_policy` entry (Envoy `config.route.v3.RouteAction.HashPolicy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    /// What is hashed.
    pub kind: HashPolicyKind,
    /// `terminal`: when this policy produced a hash, later ones are skipped.
    pub terminal: bool,
}

/// The source of a request hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashPolicyKind {
    /// `header.header_name` (lower-case).
    Header(String),
    /// `cookie`: the cookie's value; with a `ttl`, a missing cookie is
    /// generated and set on the response.
    Cookie {
        /// `name`.
        name: String,
        /// `ttl` (a `0s` ttl makes a session cookie).
        ttl: Option<Duration>,
        /// `path`.
        path: Option<String>,
    },
    /// `connection_properties.source_ip`.
    SourceIp,
    /// `query_parameter.name`.
    QueryParameter(String),
}

/// Envoy `config.core.v3.HealthStatus` of an endpoint, as given by
/// discovery (`lb_endpoints[].health_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HealthStatus {
    /// `UNKNOWN` (the default): healthy until checked.
    #[default]
    Unknown,
    /// `HEALTHY`.
    Healthy,
    /// `UNHEALTHY`, `DRAINING` or `TIMEOUT`: not used (except in panic).
    Unhealthy,
    /// `DEGRADED`: used only when healthy endpoints do not suffice.
    Degraded,
}
