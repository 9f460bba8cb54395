//! Runnable examples of mesh used as a library; see `embedded_router.rs`
//! (`cargo run -p mesh-examples --example embedded_router`) and
//! `custom_protocol.rs`, a new RPC protocol in one codec
//! (`cargo run -p mesh-examples --example custom_protocol`).
