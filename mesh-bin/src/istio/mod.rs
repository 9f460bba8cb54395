//! Istio's own extensions, which istiod puts in nearly every sidecar
//! listener and cluster: [`alpn`] (`istio.alpn`, the upstream ALPN
//! override that lets the peer sidecar's inbound chains tell HTTP from TCP
//! by `istio-http/1.1`, `istio-h2`, ...) and [`metadata`]
//! (`istio.metadata_exchange` over HTTP: peer workload metadata in
//! headers; [`tcp_exchange`] over TCP, `istio-peer-exchange`), [`stats`] (`istio.stats`: Istio's request
//! metrics) and [`tcp_stats`] (its TCP metrics). The configuration model is `mesh_core::config::istio`; the
//! loader is `bootstrap::istio`.

pub mod alpn;
pub mod metadata;
pub mod stats;
pub mod tcp_exchange;
pub mod tcp_stats;
