//! mesh-xds: configuration from a control plane, and a control plane to
//! give it.
//!
//! - [`client`]: an xDS client over gRPC (tonic) with the Envoy v3 types of
//!   the `envoy-types` crate. ADS or one type's own discovery service,
//!   state-of-the-world or delta; sends `node` as Envoy does, ACKs applied
//!   versions and NACKs refused ones with an `error_detail`, reconnects with
//!   jittered backoff and resubscribes with the versions it has. It does not
//!   interpret resources: the application receives [`client::Update`]s and
//!   answers each one, so a Rust service can take routes and endpoints from
//!   istiod without a sidecar (proxyless), and the `mesh` proxy feeds them
//!   to its Envoy configuration loader.
//!   Subscriptions can grow on demand ([`client::XdsHandle::subscribe_more`],
//!   [`client::XdsHandle::unsubscribe`]): fetch a cluster's endpoints only
//!   when the service first calls it.
//! - [`convert`]: received resources as proto3 JSON (the form of a YAML
//!   bootstrap) through the Envoy descriptors, and JSON back into resources.
//! - [`server`]: a snapshot-cache management server (go-control-plane's
//!   `SnapshotCache`): a versioned snapshot per node served over ADS,
//!   state-of-the-world and delta, with every ACK and NACK recorded.
//! - [`types`]: type URLs and method paths.
//!
//! ```no_run
//! # async fn demo() {
//! use mesh_xds::{client, types};
//! let config = client::ClientConfig::new("http://127.0.0.1:18000", client::node("app-1", "app"));
//! let (handle, mut updates) = client::start(config);
//! handle.subscribe(types::CLUSTER, Default::default()); // wildcard
//! while let Some(delivery) = updates.recv().await {
//!     for r in &delivery.update.resources {
//!         println!("{} {}", types::short(&delivery.update.type_url), r.name);
//!     }
//!     delivery.reply(Ok(())); // ACK
//! }
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod convert;
pub mod server;
pub mod types;

pub use envoy_types::pb;
