//! mesh-tls: TLS and workload identity on rustls.
//!
//! Not built yet: this crate is the home of the TLS and identity work. The
//! intended API, usable without the proxy to give any tokio service mTLS with
//! rotating certificates:
//!
//! - `SecretProvider`: a watchable source of certificates and trust bundles
//!   (files watched for changes now, SDS over xDS later); new handshakes use
//!   a new secret the moment it loads, established connections are kept, a
//!   bad secret is refused and the previous one keeps serving.
//! - `ServerTls` / `ClientTls`: `tokio_rustls` acceptor and connector built
//!   from Envoy's `DownstreamTlsContext` / `UpstreamTlsContext` (one crypto
//!   provider, `ring`), ALPN `h2`/`http/1.1`, SNI, `require_client_certificate`,
//!   `match_typed_subject_alt_names`.
//! - `PeerIdentity`: the verified peer's SPIFFE ID and SANs, attached to each
//!   connection so that filters (RBAC) and the access log can read it.
//! - Filter-chain selection by SNI / ALPN / transport protocol
//!   (`filter_chain_match` with `envoy.filters.listener.tls_inspector`),
//!   which is why the loader refuses a second filter chain today.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
