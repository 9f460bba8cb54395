//! mesh-filter: per-request policy as `tower` layers.
//!
//! Each policy is usable on its own in any tower stack, configured in
//! `mesh` from the Envoy v3 field named beside it. The proxy in `mesh-bin`
//! runs the same logic on its fast path (the decisions, budgets and limits
//! below are plain types the layers and the proxy share), so the proxy pays
//! no boxing per layer.
//!
//! | module | Envoy configuration |
//! |---|---|
//! | [`retry`]: `RetryLayer`, `RetryState`, `ReplayBody` | route / virtual host `retry_policy` |
//! | [`circuit_breaker`]: `ResourceManager` (limits and the retry budget) | cluster `circuit_breakers.thresholds` |
//! | [`fault`]: `FaultInjector` (delay / abort, header-controlled faults, `max_active_faults`) | `envoy.filters.http.fault` |
//! | [`local_ratelimit`]: `LocalRateLimitLayer`, `TokenBucket` (one per rule, shared by all threads) | `envoy.filters.http.local_ratelimit` |
//! | [`descriptors`]: `RateLimitEntry` (what `rate_limits` actions make of a request) | route / virtual host `rate_limits` |
//! | [`throttle`]: `ThrottledBody` (a response body at a bandwidth) | `envoy.filters.http.fault` `response_rate_limit` |
//! | [`cors`]: `Cors` (preflight answers, `access-control-*` headers) | `envoy.filters.http.cors`, `CorsPolicy` per route |
//! | [`mirror`]: `TeeBody`, `sampled`, `shadow_authority` | route `request_mirror_policies` |
//!
//! Every proxy-made response from these layers carries its Envoy response
//! flag (`URX`, `UO`, `RL`, `FI`, `DI`, `UT`) as a response extension
//! (`mesh_core::ResponseFlag`), which the access log and stats read.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod circuit_breaker;
pub mod cors;
pub mod descriptors;
pub mod fault;
pub mod local_ratelimit;
pub mod mirror;
pub mod rbac;
pub mod retry;
pub mod throttle;
