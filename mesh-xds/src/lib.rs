//! mesh-xds: configuration from a control plane.
//!
//! Not built yet: this crate is the home of the xDS work. Intended API:
//!
//! - `XdsClient`: an ADS (and per-type) client over tonic with the Envoy v3
//!   protos of the `envoy-types` crate, state-of-the-world and delta, sending
//!   `node` as Envoy does, ACKing applied versions and NACKing with the field
//!   path of what was refused. It converts LDS/RDS/CDS/EDS/SDS resources into
//!   the same `mesh_core::config` types the YAML loader produces, so nothing
//!   downstream knows where configuration came from.
//! - `SnapshotServer`: a snapshot-cache management server (like
//!   go-control-plane's `SnapshotCache`) for tests, examples and Rust
//!   control planes.
//!
//! Until then, `mesh` refuses `dynamic_resources`, `rds`, and EDS clusters at
//! start with a message naming the field.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
