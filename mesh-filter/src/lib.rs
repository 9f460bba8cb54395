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
//! | [`local_ratelimit`]: `LocalRateLimitLayer`, `TokenBucket` (one per rule, shared by all threads) | `envoy.filters.http.local_ratelimit` |
//!
//! Every proxy-made response from these layers carries its Envoy response
//! flag (`URX`, `UO`, `RL`, `FI`, `DI`, `UT`) as a response extension
//! (`mesh_core::ResponseFlag`), which the access log and stats read.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod circuit_breaker;
pub mod local_ratelimit;
pub mod retry;
