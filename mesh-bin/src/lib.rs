//! mesh-bin: the pieces of the mesh binary that are worth testing as a library.
//!
//! - [`bootstrap`]: the Envoy v3 bootstrap loader (YAML/JSON text into the
//!   typed [`mesh_core::config::Bootstrap`] model).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bootstrap;
