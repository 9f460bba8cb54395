//! mesh-filter: per-request policy as `tower` layers.
//!
//! Not built yet: this crate is the home of the resilience and traffic
//! policy work. Each policy will be a `tower::Layer` usable on its own in any
//! tower stack, configured in `mesh` from the Envoy v3 field named beside it,
//! and applied to every protocol through `mesh_core::view::RequestView`:
//!
//! | layer | Envoy configuration |
//! |---|---|
//! | `Retry` with a `RetryBudget` | route `retry_policy`, cluster `circuit_breakers.thresholds.retry_budget` |
//! | `Timeout` (per try, per request, idle) | route `timeout`, `per_try_timeout`, `idle_timeout`; HCM `request_timeout`, `stream_idle_timeout` |
//! | `CircuitBreaker` | cluster `circuit_breakers.thresholds` (`max_connections`, `max_pending_requests`, `max_requests`, `max_retries`) |
//! | `LocalRateLimit` (keyed token buckets shared by all workers) | `envoy.filters.http.local_ratelimit`, `envoy.filters.network.local_ratelimit` |
//! | `FaultInjection` | `envoy.filters.http.fault` |
//! | `Mirror` | route `request_mirror_policies` |
//! | `HeaderMutation` | `request_headers_to_add` / `_remove` (today in `mesh_core::headers`) |
//! | `Rbac` | `envoy.filters.http.rbac`, `envoy.filters.network.rbac` |
//! | `AccessLog` (formatter) | `access_log` with `log_format` (today mesh-bin writes Envoy's default format) |
//!
//! The intended shape, following `tower::timeout`:
//!
//! ```text
//! pub struct RetryLayer { policy: Arc<RetryPolicy>, budget: Arc<RetryBudget> }
//! impl<S> Layer<S> for RetryLayer { type Service = Retry<S>; ... }
//! impl<S, B> Service<http::Request<B>> for Retry<S> where S: Service<..> + Clone { ... }
//! ```
//!
//! Every proxy-made response from these layers carries its Envoy response
//! flag (`URX`, `UO`, `RL`, `FI`, `DI`, `UT`) as a response extension
//! (`mesh_core::ResponseFlag`), which the access log and stats read.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod rbac;
