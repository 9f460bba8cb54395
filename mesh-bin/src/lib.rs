//! mesh-bin: the `mesh` proxy assembled from the mesh crates.
//!
//! - [`bootstrap`]: Envoy v3 bootstrap (YAML/JSON) -> `mesh_core::config::Bootstrap`,
//!   refusing every field outside the supported subset by its path;
//! - [`proxy`]: [`Proxy`] — configuration to running listeners, clusters and admin;
//! - [`http`]: the HTTP connection manager + router filter;
//! - [`filters`]: the HTTP filter chain (local rate limit, ...);
//! - [`tcp`]: the TCP proxy filter;
//! - [`resilience`]: per-cluster circuit breakers and retry stats;
//! - [`tls`]: secrets (static and watched SDS files), upstream TLS, `/certs`;
//! - [`rpc`]: the L7 RPC proxy (Thrift, Dubbo, SOFA Bolt);
//! - [`cluster`]: the cluster manager and per-worker connection pools;
//! - [`socket_match`]: per-endpoint transport sockets (`transport_socket_matches`);
//! - [`admin`]: the admin API;
//! - [`health`]: health-check probes and outlier-detection hooks;
//! - [`demo`]: demo upstreams for `mesh demo`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod bootstrap;
pub mod cluster;
pub mod demo;
mod downstream;
pub mod dynamic;
pub mod filters;
pub mod grpc_stats;
pub mod health;
pub mod http;
mod inspect;
pub mod istio;
pub mod lazy_eds;
mod mirror;
pub mod original_dst;
mod path_normalize;
pub mod proxy;
mod rbac;
pub mod resilience;
pub mod rpc;
pub mod socket_match;
pub mod tcp;
pub mod tls;

pub use proxy::{Proxy, ProxyOptions, RuntimeMode, StartError};
