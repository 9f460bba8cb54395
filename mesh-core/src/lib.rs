//! mesh-core: what every other mesh crate speaks.
//!
//! - [`config`]: the typed configuration model (Envoy v3 field names, plain
//!   Rust types), produced by the YAML loader and the xDS converter alike;
//! - [`view`]: the protocol-neutral request view the router and filters read;
//! - [`policy`]: retry policies, circuit breakers and HTTP filter
//!   configuration;
//! - [`router`]: virtual host and route matching, weighted clusters,
//!   rewrites, redirects;
//! - [`headers`]: compiled header mutations;
//! - [`listener`]: binding, the accept loop, connection limits and drain;
//! - [`peek`]: looking at a connection's first bytes without consuming them;
//! - [`stats`]: counters and gauges with Envoy's Prometheus names;
//! - [`flags`]: Envoy response flags for proxy-made responses;
//! - [`identity`]: the TLS peer identity attached to requests;
//! - [`string_match`]: compiled `StringMatcher`s (RBAC, SAN matching);
//! - [`time`]: UTC calendar arithmetic for the timestamps mesh writes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod config;
pub mod flags;
pub mod headers;
pub mod health_config;
pub mod identity;
mod lb_config;
pub mod listener;
pub mod peek;
pub mod policy;
pub mod router;
pub mod stats;
pub mod string_match;
pub mod time;
pub mod view;

pub use flags::ResponseFlag;
