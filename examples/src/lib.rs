//! Runnable examples of mesh used as a library; see `embedded_router.rs`
//! (`cargo run -p mesh-examples --example embedded_router`).
