//! Configuration of active health checking (Envoy `config.core.v3.HealthCheck`)
//! and outlier detection (Envoy `config.cluster.v3.OutlierDetection`).
//!
//! These are plain values with Envoy's defaults already applied by the
//! loader; `mesh-lb` runs them.

use std::time::Duration;

/// Envoy `config.core.v3.HealthCheck`: one active health checker of a
/// cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// `timeout`: how long one probe may take; a probe that takes longer is a
    /// network failure.
    pub timeout: Duration,
    /// `interval`: between probes of a healthy endpoint.
    pub interval: Duration,
    /// `initial_jitter`: a random delay in `[0, initial_jitter)` before the
    /// first probe of each endpoint.
    pub initial_jitter: Duration,
    /// `interval_jitter`: a random extra in `[0, interval_jitter)` added to
    /// every interval.
    pub interval_jitter: Duration,
    /// `interval_jitter_percent`: a random extra in `[0, interval * pct / 100)`.
    pub interval_jitter_percent: u32,
    /// `unhealthy_threshold`: consecutive network failures (timeouts,
    /// refused connections) before a healthy endpoint is marked unhealthy.
    /// A failure the endpoint reports itself (an unexpected HTTP status, a
    /// wrong TCP reply, gRPC `NOT_SERVING`) marks it unhealthy at once.
    pub unhealthy_threshold: u32,
    /// `healthy_threshold`: consecutive successes before an unhealthy
    /// endpoint is healthy again. The first probe of a new endpoint needs one.
    pub healthy_threshold: u32,
    /// `no_traffic_interval` (default 60 s): the interval while the cluster
    /// has not yet carried any traffic.
    pub no_traffic_interval: Duration,
    /// `unhealthy_interval` (default `interval`): between probes of an
    /// unhealthy endpoint.
    pub unhealthy_interval: Duration,
    /// `unhealthy_edge_interval` (default `unhealthy_interval`): after a
    /// failure that has not yet reached `unhealthy_threshold`.
    pub unhealthy_edge_interval: Duration,
    /// `healthy_edge_interval` (default `interval`): after a success that
    /// has not yet reached `healthy_threshold`.
    pub healthy_edge_interval: Duration,
    /// `always_log_health_check_failures`: log every failed probe, not only
    /// state changes.
    pub always_log_health_check_failures: bool,
    /// `event_log_path`: a file that gets one JSON line per health
    /// transition.
    pub event_log_path: Option<String>,
    /// `transport_socket_match_criteria`: the labels that pick the
    /// cluster's `transport_socket_matches` entry probes use, in place of
    /// each endpoint's metadata (no entry matching: the cluster's
    /// `transport_socket`). `None`: the endpoint's own entry.
    pub transport_socket_match_criteria: Option<crate::lb_config::LbMetadata>,
    /// `tls_options.alpn_protocols`: the ALPN list TLS probes offer in
    /// place of the transport socket's (empty: the socket's own).
    pub tls_alpn: Vec<String>,
    /// What a probe does.
    pub checker: HealthChecker,
}

/// The kind of probe (the `health_checker` oneof).
#[derive(Debug, Clone, PartialEq)]
pub enum HealthChecker {
    /// `http_health_check`.
    Http(HttpHealthCheck),
    /// `tcp_health_check`.
    Tcp(TcpHealthCheck),
    /// `grpc_health_check`.
    Grpc(GrpcHealthCheck),
}

/// Envoy `HealthCheck.HttpHealthCheck`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpHealthCheck {
    /// `host`: the `:authority` sent (default: the cluster name).
    pub host: Option<String>,
    /// `path` (required).
    pub path: String,
    /// `expected_statuses`: half-open `[start, end)` ranges; default
    /// `[[200, 201)]`.
    pub expected_statuses: Vec<(u16, u16)>,
    /// `request_headers_to_add`: name and value pairs.
    pub request_headers_to_add: Vec<(String, String)>,
    /// `request_headers_to_remove`.
    pub request_headers_to_remove: Vec<String>,
    /// `codec_client_type`: `HTTP2` when true, else HTTP/1.1.
    pub http2: bool,
}

/// Envoy `HealthCheck.TcpHealthCheck`: connect, optionally send bytes and
/// expect bytes back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TcpHealthCheck {
    /// `send.text` decoded from hex; empty means connect only.
    pub send: Vec<u8>,
    /// `receive[].text` decoded from hex: every block must appear in the
    /// reply, in order.
    pub receive: Vec<Vec<u8>>,
}

/// Envoy `HealthCheck.GrpcHealthCheck`: `grpc.health.v1.Health/Check`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GrpcHealthCheck {
    /// `service_name`: the service asked about (empty: the whole server).
    pub service_name: String,
    /// `authority`: the `:authority` sent (default: the cluster name).
    pub authority: Option<String>,
}

/// Envoy `config.cluster.v3.OutlierDetection`, with Envoy's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// `consecutive_5xx` (default 5).
    pub consecutive_5xx: u32,
    /// `consecutive_gateway_failure` (default 5): 502, 503, 504 in a row.
    pub consecutive_gateway_failure: u32,
    /// `consecutive_local_origin_failure` (default 5), used with
    /// `split_external_local_origin_errors`.
    pub consecutive_local_origin_failure: u32,
    /// `split_external_local_origin_errors` (default false): count connect
    /// failures and timeouts apart from upstream 5xx responses.
    pub split_external_local_origin_errors: bool,
    /// `interval` (default 10 s): how often success rates are computed and
    /// ejected endpoints considered for return.
    pub interval: Duration,
    /// `base_ejection_time` (default 30 s), multiplied by the number of
    /// times the endpoint was ejected.
    pub base_ejection_time: Duration,
    /// `max_ejection_time` (default 300 s, at least `base_ejection_time`).
    pub max_ejection_time: Duration,
    /// `max_ejection_percent` (default 10).
    pub max_ejection_percent: u32,
    /// `always_eject_one_host` (default false): eject one endpoint even if
    /// that exceeds `max_ejection_percent`.
    pub always_eject_one_host: bool,
    /// `enforcing_consecutive_5xx` (default 100).
    pub enforcing_consecutive_5xx: u32,
    /// `enforcing_consecutive_gateway_failure` (default 0).
    pub enforcing_consecutive_gateway_failure: u32,
    /// `enforcing_consecutive_local_origin_failure` (default 100).
    pub enforcing_consecutive_local_origin_failure: u32,
    /// `enforcing_success_rate` (default 100).
    pub enforcing_success_rate: u32,
    /// `enforcing_local_origin_success_rate` (default 100).
    pub enforcing_local_origin_success_rate: u32,
    /// `success_rate_minimum_hosts` (default 5).
    pub success_rate_minimum_hosts: u32,
    /// `success_rate_request_volume` (default 100).
    pub success_rate_request_volume: u32,
    /// `success_rate_stdev_factor` (default 1900, divided by 1000).
    pub success_rate_stdev_factor: u32,
    /// `failure_percentage_threshold` (default 85).
    pub failure_percentage_threshold: u32,
    /// `enforcing_failure_percentage` (default 0).
    pub enforcing_failure_percentage: u32,
    /// `enforcing_failure_percentage_local_origin` (default 0).
    pub enforcing_failure_percentage_local_origin: u32,
    /// `failure_percentage_minimum_hosts` (default 5).
    pub failure_percentage_minimum_hosts: u32,
    /// `failure_percentage_request_volume` (default 50).
    pub failure_percentage_request_volume: u32,
    /// `successful_active_health_check_uneject_host` (default true): an
    /// active health check that passes returns an ejected endpoint.
    pub successful_active_health_check_uneject_host: bool,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            split_external_local_origin_errors: false,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            always_eject_one_host: false,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            enforcing_success_rate: 100,
            enforcing_local_origin_success_rate: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            failure_percentage_threshold: 85,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            successful_active_health_check_uneject_host: true,
        }
    }
}
