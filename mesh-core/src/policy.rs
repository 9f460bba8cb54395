//! Traffic policy configuration: retries, circuit breakers, per-filter
//! configuration of routes and virtual hosts, and the HTTP filters mesh
//! runs besides the router.
//!
//! These are plain typed values (Envoy v3 field names, [`Duration`]s,
//! enums), produced by the bootstrap loader and xDS alike, and turned into
//! running layers by `mesh-filter`. They sit apart from [`crate::config`] so
//! that the model of listeners, routes and clusters stays readable; the
//! route, virtual-host and cluster types there carry one field of these.

use std::time::Duration;

use crate::config::HeaderMatcher;
use crate::router::CompiledHeaderMatcher;

/// `retry_on` conditions as a bit set (Envoy's `x-envoy-retry-on` and
/// `x-envoy-retry-grpc-on` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct RetryOn(pub u32);

impl RetryOn {
    /// `5xx`: any 5xx response, a reset, a connect failure or a per-try
    /// timeout.
    pub const FIVE_XX: RetryOn = RetryOn(1);
    /// `gateway-error`: 502, 503, 504, a reset, a connect failure or a
    /// per-try timeout.
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    /// `connect-failure`.
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 2);
    /// `retriable-4xx`: 409.
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 3);
    /// `refused-stream`: the HTTP/2 stream was refused (REFUSED_STREAM).
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 4);
    /// `retriable-status-codes`: a status in `retriable_status_codes` (or
    /// the `x-envoy-retriable-status-codes` request header).
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 5);
    /// `reset`: the upstream reset or closed before the response headers
    /// (or a per-try timeout).
    pub const RESET: RetryOn = RetryOn(1 << 6);
    /// `retriable-headers`: the response has a header matching
    /// `retriable_headers`.
    pub const RETRIABLE_HEADERS: RetryOn = RetryOn(1 << 7);
    /// `reset-before-request`: a reset before any request byte was sent.
    pub const RESET_BEFORE_REQUEST: RetryOn = RetryOn(1 << 8);
    /// `envoy-ratelimited`: the response has `x-envoy-ratelimited`.
    pub const ENVOY_RATELIMITED: RetryOn = RetryOn(1 << 9);
    /// gRPC `cancelled` (status 1).
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 16);
    /// gRPC `deadline-exceeded` (status 4).
    pub const GRPC_DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 17);
    /// gRPC `resource-exhausted` (status 8).
    pub const GRPC_RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 18);
    /// gRPC `unavailable` (status 14).
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 19);
    /// gRPC `internal` (status 13).
    pub const GRPC_INTERNAL: RetryOn = RetryOn(1 << 20);

    /// Every HTTP token with its bit.
    pub const HTTP_TOKENS: [(&'static str, RetryOn); 10] = [
        ("5xx", RetryOn::FIVE_XX),
        ("gateway-error", RetryOn::GATEWAY_ERROR),
        ("connect-failure", RetryOn::CONNECT_FAILURE),
        ("retriable-4xx", RetryOn::RETRIABLE_4XX),
        ("refused-stream", RetryOn::REFUSED_STREAM),
        ("retriable-status-codes", RetryOn::RETRIABLE_STATUS_CODES),
        ("reset", RetryOn::RESET),
        ("retriable-headers", RetryOn::RETRIABLE_HEADERS),
        ("reset-before-request", RetryOn::RESET_BEFORE_REQUEST),
        ("envoy-ratelimited", RetryOn::ENVOY_RATELIMITED),
    ];

    /// Every gRPC token with its bit.
    pub const GRPC_TOKENS: [(&'static str, RetryOn); 5] = [
        ("cancelled", RetryOn::GRPC_CANCELLED),
        ("deadline-exceeded", RetryOn::GRPC_DEADLINE_EXCEEDED),
        ("resource-exhausted", RetryOn::GRPC_RESOURCE_EXHAUSTED),
        ("unavailable", RetryOn::GRPC_UNAVAILABLE),
        ("internal", RetryOn::GRPC_INTERNAL),
    ];

    /// No condition.
    pub const NONE: RetryOn = RetryOn(0);

    /// Whether any bit of `other` is set.
    #[inline]
    pub fn any(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no condition is set.
    #[inline]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Parses a comma-separated list of tokens (HTTP and gRPC tokens both
    /// count, as in a route's `retry_on`). Returns the set and the tokens
    /// that are not known.
    pub fn parse(list: &str, grpc_only: bool) -> (RetryOn, Vec<&str>) {
        let mut out = RetryOn::NONE;
        let mut unknown = Vec::new();
        for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let http = (!grpc_only)
                .then(|| RetryOn::HTTP_TOKENS.iter().find(|(n, _)| *n == token))
                .flatten();
            let grpc = RetryOn::GRPC_TOKENS.iter().find(|(n, _)| *n == token);
            match http.or(grpc) {
                Some((_, bit)) => out = out | *bit,
                None => unknown.push(token),
            }
        }
        (out, unknown)
    }
}

impl std::ops::BitOr for RetryOn {
    type Output = RetryOn;
    fn bitor(self, rhs: RetryOn) -> RetryOn {
        RetryOn(self.0 | rhs.0)
    }
}

/// Envoy `config.route.v3.RetryPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// `retry_on`.
    pub retry_on: RetryOn,
    /// `num_retries` (default 1).
    pub num_retries: u32,
    /// `per_try_timeout` (default: none, the route timeout bounds every
    /// try).
    pub per_try_timeout: Option<Duration>,
    /// `per_try_idle_timeout`.
    pub per_try_idle_timeout: Option<Duration>,
    /// `retriable_status_codes`.
    pub retriable_status_codes: Vec<u16>,
    /// `retriable_headers`: a response header matching any of these makes
    /// the response retriable (with `retriable-headers`).
    pub retriable_headers: Vec<HeaderMatcher>,
    /// `retriable_request_headers`: when non-empty, only a request matching
    /// one of these is retried.
    pub retriable_request_headers: Vec<HeaderMatcher>,
    /// `retry_back_off.base_interval` (default 25 ms).
    pub base_interval: Duration,
    /// `retry_back_off.max_interval` (default 10 × the base interval).
    pub max_interval: Duration,
    /// `retry_host_predicate` has `envoy.retry_host_predicates.previous_hosts`:
    /// a retry avoids the endpoints already tried.
    pub previous_hosts: bool,
    /// `host_selection_retry_max_attempts` (default 1): how many times the
    /// balancer is asked for an endpoint that passes the host predicate.
    pub host_selection_retry_max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retry_on: RetryOn::NONE,
            num_retries: 1,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            previous_hosts: false,
            host_selection_retry_max_attempts: 1,
        }
    }
}

/// A route's retry policy, compiled (header matchers built).
#[derive(Debug)]
pub struct CompiledRetryPolicy {
    /// The configuration.
    pub config: RetryPolicy,
    /// `retriable_headers`, compiled.
    pub retriable_headers: Vec<CompiledHeaderMatcher>,
    /// `retriable_request_headers`, compiled.
    pub retriable_request_headers: Vec<CompiledHeaderMatcher>,
}

impl CompiledRetryPolicy {
    /// Compiles `config`; errors name the field.
    pub fn new(config: &RetryPolicy) -> Result<Self, String> {
        let compile = |list: &[HeaderMatcher], field: &str| {
            list.iter()
                .enumerate()
                .map(|(i, m)| {
                    CompiledHeaderMatcher::compile(m, &format!("{field}[{i}]"))
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(CompiledRetryPolicy {
            retriable_headers: compile(&config.retriable_headers, "retriable_headers")?,
            retriable_request_headers: compile(
                &config.retriable_request_headers,
                "retriable_request_headers",
            )?,
            config: config.clone(),
        })
    }

    /// A policy retrying on `retry_on` up to `num_retries` times.
    pub fn simple(retry_on: RetryOn, num_retries: u32) -> Self {
        CompiledRetryPolicy {
            config: RetryPolicy {
                retry_on,
                num_retries,
                ..RetryPolicy::default()
            },
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
        }
    }
}

/// Envoy `config.core.v3.RoutingPriority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum RoutingPriority {
    /// `DEFAULT`.
    #[default]
    Default,
    /// `HIGH`.
    High,
}

impl RoutingPriority {
    /// Envoy's lower-case name in stats (`default`, `high`).
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingPriority::Default => "default",
            RoutingPriority::High => "high",
        }
    }
}

/// Envoy `config.cluster.v3.CircuitBreakers.Thresholds` for one priority.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// `priority`.
    pub priority: RoutingPriority,
    /// `max_connections` (default 1024).
    pub max_connections: u64,
    /// `max_pending_requests` (default 1024).
    pub max_pending_requests: u64,
    /// `max_requests` (default 1024).
    pub max_requests: u64,
    /// `max_retries` (default 3).
    pub max_retries: u64,
    /// `max_connection_pools` (default unlimited).
    pub max_connection_pools: Option<u64>,
    /// `retry_budget`: when set, it replaces `max_retries`.
    pub retry_budget: Option<RetryBudget>,
    /// `track_remaining`: publish `remaining_*` gauges.
    pub track_remaining: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            priority: RoutingPriority::Default,
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            max_connection_pools: None,
            retry_budget: None,
            track_remaining: false,
        }
    }
}

/// Envoy `CircuitBreakers.Thresholds.RetryBudget`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// `budget_percent` (default 20 %): concurrent retries allowed as a
    /// percentage of active plus pending requests.
    pub budget_percent: f64,
    /// `min_retry_concurrency` (default 3): retries always allowed
    /// concurrently, whatever the budget.
    pub min_retry_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            budget_percent: 20.0,
            min_retry_concurrency: 3,
        }
    }
}

/// Envoy `config.cluster.v3.CircuitBreakers`: thresholds for the `DEFAULT`
/// and `HIGH` priorities (Envoy's defaults when not configured).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CircuitBreakers {
    /// The `DEFAULT` priority's thresholds.
    pub default: Thresholds,
    /// The `HIGH` priority's thresholds.
    pub high: Thresholds,
}

/// Policy of a virtual host: what applies to every route under it unless
/// the route says otherwise.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VhostPolicy {
    /// `retry_policy` (a route's own policy replaces it).
    pub retry_policy: Option<RetryPolicy>,
    /// `include_request_attempt_count`: send `x-envoy-attempt-count`
    /// upstream.
    pub include_request_attempt_count: bool,
    /// `include_attempt_count_in_response`: send `x-envoy-attempt-count`
    /// downstream.
    pub include_attempt_count_in_response: bool,
    /// `per_request_buffer_limit_bytes`.
    pub per_request_buffer_limit_bytes: Option<u32>,
    /// `typed_per_filter_config`.
    pub per_filter: Vec<PerFilterConfig>,
    /// `rate_limits`: the descriptors the local rate limit filter looks up.
    pub rate_limits: Vec<RateLimitPolicy>,
}

/// Policy of a route (besides what [`crate::config::RouteAction`] holds).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoutePolicy {
    /// `route.retry_policy`.
    pub retry_policy: Option<RetryPolicy>,
    /// `route.priority`.
    pub priority: RoutingPriority,
    /// `per_request_buffer_limit_bytes`.
    pub per_request_buffer_limit_bytes: Option<u32>,
    /// `typed_per_filter_config`.
    pub per_filter: Vec<PerFilterConfig>,
    /// `max_grpc_timeout`: when set, a gRPC request's `grpc-timeout`
    /// replaces the route timeout, capped at this (`ZERO`: no cap).
    pub grpc_timeout_max: Option<Duration>,
    /// `grpc_timeout_offset`: subtracted from `grpc-timeout`.
    pub grpc_timeout_offset: Option<Duration>,
    /// `max_stream_duration` of the route action.
    pub max_stream_duration: Option<MaxStreamDuration>,
    /// `route.request_mirror_policies`.
    pub request_mirror_policies: Vec<RequestMirrorPolicy>,
    /// `route.metadata_mutation` (RPC routes): attachment / header
    /// changes made to the request before it is sent upstream.
    pub metadata_mutation: MetadataMutation,
    /// `route.rate_limits`: the descriptors the local rate limit filter
    /// looks up.
    pub rate_limits: Vec<RateLimitPolicy>,
    /// `route.include_vh_rate_limits`: the virtual host's `rate_limits`
    /// apply too.
    pub include_vh_rate_limits: bool,
}

/// Changes an RPC route makes to a request's attachments (Dubbo) or
/// header map (SOFA Bolt) before sending it upstream. Keys are compared
/// ignoring ASCII case and keep the case they are written in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetadataMutation {
    /// `set`: each key's value replaces the existing entry of that key, or
    /// is appended when there is none.
    pub set: Vec<(String, String)>,
    /// `remove`: entries with these keys are dropped (before `set`).
    pub remove: Vec<String>,
}

impl MetadataMutation {
    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    /// Applies the removals, then the sets, to `headers`.
    pub fn apply(&self, headers: &mut Vec<(String, String)>) {
        headers.retain(|(k, _)| !self.remove.iter().any(|r| r.eq_ignore_ascii_case(k)));
        for (key, value) in &self.set {
            let mut found = false;
            headers.retain_mut(|(k, v)| {
                if !k.eq_ignore_ascii_case(key) {
                    return true;
                }
                // The first entry of the key takes the value; repeats go.
                let keep = !found;
                if keep {
                    *v = value.clone();
                }
                found = true;
                keep
            });
            if !found {
                headers.push((key.clone(), value.clone()));
            }
        }
    }
}

/// Envoy `config.route.v3.RateLimit`: one descriptor made of the entries
/// its actions produce (none when an action cannot produce its entry).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitPolicy {
    /// `stage` (default 0): only filters of the same stage use it.
    pub stage: u32,
    /// `actions`, in order.
    pub actions: Vec<RateLimitAction>,
}

/// One `RateLimit.Action`.
#[derive(Debug, Clone, PartialEq)]
pub enum RateLimitAction {
    /// `request_headers`: `(descriptor_key, value of header_name)`.
    RequestHeaders {
        /// `header_name`.
        header_name: String,
        /// `descriptor_key`.
        descriptor_key: String,
        /// `skip_if_absent`: a missing header drops only this entry, not
        /// the descriptor.
        skip_if_absent: bool,
    },
    /// `remote_address`: `("remote_address", peer IP)`.
    RemoteAddress,
    /// `generic_key`: `(descriptor_key or "generic_key", descriptor_value)`.
    GenericKey {
        /// `descriptor_key`.
        descriptor_key: String,
        /// `descriptor_value`.
        descriptor_value: String,
    },
    /// `header_value_match`: `(descriptor_key or "header_match",
    /// descriptor_value)` when the headers match (or not, per
    /// `expect_match`).
    HeaderValueMatch {
        /// `descriptor_key`.
        descriptor_key: String,
        /// `descriptor_value`.
        descriptor_value: String,
        /// `expect_match` (default true).
        expect_match: bool,
        /// `headers`.
        headers: Vec<crate::config::HeaderMatcher>,
    },
    /// `destination_cluster`: `("destination_cluster", the route's
    /// cluster)`.
    DestinationCluster,
}

/// `LocalRateLimit.vh_rate_limits`: how a virtual host's `rate_limits`
/// combine with the route's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VhRateLimits {
    /// `OVERRIDE` (default): the virtual host's apply when the route has
    /// none.
    #[default]
    Override,
    /// `INCLUDE`: both apply.
    Include,
    /// `IGNORE`: only the route's apply.
    Ignore,
}

/// One `LocalRateLimit.descriptors` entry: requests whose descriptors
/// include exactly these entries take tokens from this bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRateLimitDescriptor {
    /// `entries`: `(key, value)` pairs, in order.
    pub entries: Vec<(String, String)>,
    /// `token_bucket`.
    pub token_bucket: TokenBucketConfig,
}

/// Envoy `RouteAction.RequestMirrorPolicy`: a fraction of the route's
/// requests is copied to another cluster, fire-and-forget.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestMirrorPolicy {
    /// `cluster`: where the shadow copies go.
    pub cluster: String,
    /// `runtime_fraction.default_value` (default 100 %).
    pub fraction: FractionalPercent,
    /// `disable_shadow_host_suffix_append`: keep the authority as is
    /// instead of appending `-shadow`.
    pub disable_shadow_host_suffix_append: bool,
}

/// One entry of `typed_per_filter_config`: the filter name it is keyed by
/// and the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PerFilterConfig {
    /// The key: the `name` of an HTTP filter of the chain.
    pub filter: String,
    /// `FilterConfig.disabled`: the filter does not run for this route.
    pub disabled: bool,
    /// The configuration, when not just disabling.
    pub config: Option<FilterOverride>,
}

/// A route-level configuration for an HTTP filter.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterOverride {
    /// `envoy.filters.http.router` takes no per-route configuration; an
    /// empty `Router` config is accepted.
    Router,
    /// `envoy.filters.http.local_ratelimit`: the route's own limit (its own
    /// bucket).
    LocalRateLimit(Box<LocalRateLimitConfig>),
    /// `envoy.filters.http.fault`: the route's own faults.
    Fault(Box<FaultConfig>),
    /// `envoy.filters.http.cors`: the `CorsPolicy` of a route or virtual
    /// host.
    Cors(Box<CorsPolicy>),
}

/// Envoy `extensions.filters.http.cors.v3.CorsPolicy`. Unset fields take
/// the less specific level's value (a route's from its virtual host's).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CorsPolicy {
    /// `allow_origin_string_match` (as matchers on the `origin` header).
    pub allow_origin: Vec<crate::config::HeaderMatcher>,
    /// `allow_methods`.
    pub allow_methods: Option<String>,
    /// `allow_headers`.
    pub allow_headers: Option<String>,
    /// `expose_headers`.
    pub expose_headers: Option<String>,
    /// `max_age`.
    pub max_age: Option<String>,
    /// `allow_credentials`.
    pub allow_credentials: Option<bool>,
    /// `allow_private_network_access`.
    pub allow_private_network_access: Option<bool>,
    /// `forward_not_matching_preflights` (default true).
    pub forward_not_matching_preflights: Option<bool>,
    /// `filter_enabled.default_value` (default 100 %).
    pub filter_enabled: Option<FractionalPercent>,
    /// `shadow_enabled.default_value`: origins are checked and counted,
    /// nothing is added.
    pub shadow_enabled: Option<FractionalPercent>,
}

/// Envoy `extensions.filters.http.fault.v3.HTTPFault`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FaultConfig {
    /// `delay`.
    pub delay: Option<FaultDelay>,
    /// `abort`.
    pub abort: Option<FaultAbort>,
    /// `response_rate_limit`.
    pub response_rate_limit: Option<FaultRateLimit>,
    /// `max_active_faults` (default unlimited).
    pub max_active_faults: Option<u32>,
    /// `headers`: faults apply only to requests matching all of these.
    pub headers: Vec<crate::config::HeaderMatcher>,
    /// `upstream_cluster`: faults apply only to requests routed there.
    pub upstream_cluster: Option<String>,
}

/// `HTTPFault.delay` (`FaultDelay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultDelay {
    /// `fixed_delay`, or `None` for `header_delay` (the delay comes from
    /// `x-envoy-fault-delay-request`, in milliseconds).
    pub fixed: Option<Duration>,
    /// `percentage` (default 0 %, as Envoy's absent `FractionalPercent`).
    pub percentage: FractionalPercent,
}

/// What an abort answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortKind {
    /// `http_status`.
    Http(u16),
    /// `grpc_status`.
    Grpc(u32),
    /// `header_abort`: from `x-envoy-fault-abort-request` (or
    /// `x-envoy-fault-abort-grpc-request`).
    Header,
}

/// `HTTPFault.abort` (`FaultAbort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultAbort {
    /// The status.
    pub kind: AbortKind,
    /// `percentage`.
    pub percentage: FractionalPercent,
}

/// `HTTPFault.response_rate_limit` (`FaultRateLimit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRateLimit {
    /// `fixed_limit.limit_kbps`, or `None` for `header_limit`
    /// (`x-envoy-fault-throughput-response`).
    pub limit_kbps: Option<u64>,
    /// `percentage`.
    pub percentage: FractionalPercent,
}

/// Envoy `type.v3.FractionalPercent` (`numerator` out of 100, 10 000 or
/// 1 000 000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FractionalPercent {
    /// `numerator`.
    pub numerator: u32,
    /// `denominator` as a number (100 for `HUNDRED`).
    pub denominator: u32,
}

impl FractionalPercent {
    /// 0 %.
    pub const ZERO: FractionalPercent = FractionalPercent {
        numerator: 0,
        denominator: 100,
    };
    /// 100 %.
    pub const HUNDRED: FractionalPercent = FractionalPercent {
        numerator: 100,
        denominator: 100,
    };
}

/// Envoy `type.v3.TokenBucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucketConfig {
    /// `max_tokens` (> 0): the bucket's size, and its start.
    pub max_tokens: u32,
    /// `tokens_per_fill` (default 1).
    pub tokens_per_fill: u32,
    /// `fill_interval` (> 0).
    pub fill_interval: Duration,
}

/// Envoy `extensions.filters.http.local_ratelimit.v3.LocalRateLimit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRateLimitConfig {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `token_bucket`; without one, nothing is limited.
    pub token_bucket: Option<TokenBucketConfig>,
    /// `filter_enabled.default_value` (default 0 %: the filter does
    /// nothing, as in Envoy).
    pub filter_enabled: FractionalPercent,
    /// `filter_enforced.default_value` (default 0 %: over-limit requests
    /// are only counted).
    pub filter_enforced: FractionalPercent,
    /// `status.code` (default 429).
    pub status: u16,
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03`.
    pub x_ratelimit_headers: bool,
    /// `response_headers_to_add`: added to limited responses.
    pub response_headers_to_add: Vec<crate::config::HeaderValueOption>,
    /// `descriptors`: buckets for requests with matching descriptors.
    pub descriptors: Vec<LocalRateLimitDescriptor>,
    /// `always_consume_default_token_bucket` (default true): a request
    /// matching descriptors takes a default-bucket token too.
    pub always_consume_default_token_bucket: bool,
    /// `stage`: which route `rate_limits` entries apply.
    pub stage: u32,
    /// `vh_rate_limits`.
    pub vh_rate_limits: VhRateLimits,
}

impl Default for LocalRateLimitConfig {
    fn default() -> Self {
        LocalRateLimitConfig {
            stat_prefix: String::new(),
            token_bucket: None,
            filter_enabled: FractionalPercent::ZERO,
            filter_enforced: FractionalPercent::ZERO,
            status: 429,
            x_ratelimit_headers: false,
            response_headers_to_add: Vec::new(),
            descriptors: Vec::new(),
            always_consume_default_token_bucket: true,
            stage: 0,
            vh_rate_limits: VhRateLimits::Override,
        }
    }
}

/// Envoy `extensions.filters.network.local_ratelimit.v3.LocalRateLimit`:
/// a token bucket for the connections of one filter chain; a connection
/// finding it empty is closed at accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkLocalRateLimit {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `token_bucket` (required; `fill_interval` at least 50 ms).
    pub token_bucket: TokenBucketConfig,
    /// `runtime_enabled.default_value` (default true): false turns the
    /// filter off (mesh has no runtime layer, so the default applies).
    pub enabled: bool,
}

/// Name and switches of one entry of the HCM's `http_filters` (the entry
/// at the same index of `HttpConnectionManager::http_filters` says what the
/// filter is).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpFilterMeta {
    /// `name`: the key `typed_per_filter_config` uses.
    pub name: String,
    /// `disabled`: the filter runs only on routes that enable it through
    /// `typed_per_filter_config`.
    pub disabled: bool,
}

/// Envoy `config.route.v3.RouteAction.MaxStreamDuration`: how long a stream
/// on the route may live, counted from its request headers. When it runs
/// out the proxy answers 504 `downstream duration timeout` (a gRPC
/// request gets DEADLINE_EXCEEDED), or resets the stream if the response
/// has started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaxStreamDuration {
    /// `max_stream_duration` (`0s`: no limit, even if the HCM sets one;
    /// absent: the HCM's `common_http_protocol_options.max_stream_duration`).
    pub max_stream_duration: Option<Duration>,
    /// `grpc_timeout_header_max`: when set, a request's `grpc-timeout`
    /// header is the limit, capped at this (`0s`: no cap).
    pub grpc_timeout_header_max: Option<Duration>,
    /// `grpc_timeout_header_offset`: subtracted from the header's value.
    pub grpc_timeout_header_offset: Option<Duration>,
}

impl MaxStreamDuration {
    /// The stream's limit, as Envoy computes it: the `grpc-timeout` header
    /// (`grpc_timeout`) when `grpc_timeout_header_max` is set and the header
    /// is present, capped and less the offset; else the route's
    /// `max_stream_duration` (`0s`: none); else the HCM's (`hcm`).
    pub fn limit(
        route: Option<&MaxStreamDuration>,
        hcm: Option<Duration>,
        grpc_timeout: Option<Duration>,
    ) -> Option<Duration> {
        let hcm = hcm.filter(|d| !d.is_zero());
        let Some(r) = route else {
            return hcm;
        };
        match (grpc_timeout, r.grpc_timeout_header_max) {
            (Some(mut t), Some(max)) => {
                if !max.is_zero() && t > max {
                    t = max;
                }
                if let Some(offset) = r.grpc_timeout_header_offset.filter(|_| !t.is_zero()) {
                    t = t.saturating_sub(offset);
                }
                Some(t)
            }
            _ => match r.max_stream_duration {
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
                None => hcm,
            },
        }
    }
}

#[cfg(test)]
mod max_stream_duration_tests {
    use super::MaxStreamDuration;
    use std::time::Duration;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn limit_follows_envoys_order() {
        let hcm = Some(S(30));
        // No route setting: the HCM's.
        assert_eq!(MaxStreamDuration::limit(None, hcm, Some(S(1))), hcm);
        // Istio's shape: grpc-timeout used as is; without it, no limit.
        let istio = MaxStreamDuration {
            max_stream_duration: Some(S(0)),
            grpc_timeout_header_max: Some(S(0)),
            grpc_timeout_header_offset: None,
        };
        assert_eq!(
            MaxStreamDuration::limit(Some(&istio), hcm, Some(S(3))),
            Some(S(3))
        );
        assert_eq!(MaxStreamDuration::limit(Some(&istio), hcm, None), None);
        // A cap and an offset.
        let capped = MaxStreamDuration {
            max_stream_duration: Some(S(20)),
            grpc_timeout_header_max: Some(S(5)),
            grpc_timeout_header_offset: Some(S(1)),
        };
        assert_eq!(
            MaxStreamDuration::limit(Some(&capped), hcm, Some(S(9))),
            Some(S(4))
        );
        assert_eq!(
            MaxStreamDuration::limit(Some(&capped), hcm, Some(S(3))),
            Some(S(2))
        );
        assert_eq!(
            MaxStreamDuration::limit(Some(&capped), hcm, None),
            Some(S(20))
        );
        // Without grpc_timeout_header_max the header is ignored.
        let plain = MaxStreamDuration {
            max_stream_duration: None,
            ..Default::default()
        };
        assert_eq!(MaxStreamDuration::limit(Some(&plain), hcm, Some(S(1))), hcm);
        assert_eq!(
            MaxStreamDuration::limit(Some(&plain), None, Some(S(1))),
            None
        );
    }
}
