//! mesh-core: what every other mesh crate speaks.
//!
//! - [`config`]: the typed configuration model (Envoy v3 field names, plain
//!   Rust types).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
