//! HTTP/1.1 and HTTP/2 on hyper.

pub mod body;
pub mod client;
pub mod hop;
pub mod server;

pub use body::ProxyBody;
