//! mesh-tls: TLS and workload identity on rustls, usable alone to give any
//! tokio service mTLS with rotating certificates.
//!
//! - [`ServerTls`] / [`ClientTls`]: handshakes built from Envoy's
//!   `DownstreamTlsContext` / `UpstreamTlsContext` (typed in
//!   [`mesh_core::config::tls`]): certificates from files or inline,
//!   `require_client_certificate`, trust bundles, SAN matchers (SPIFFE IDs),
//!   TLS 1.2/1.3 bounds and TLS 1.2 cipher suites, ALPN, upstream SNI, and a
//!   handshake timeout. Each handshake is counted in [`TlsStats`] (Envoy's
//!   `ssl.*` names), and its failure reason too.
//! - [`SecretStore`]: named certificates and trust bundles (Envoy SDS
//!   secrets). Anything may publish into it ([`SecretStore::update`]): the
//!   file watcher in [`watch`] today, the xDS SDS client later. A bad secret
//!   (unparsable, key mismatch, expired) is refused and the previous version
//!   keeps serving; a good one is used by the very next handshake, while
//!   established connections keep theirs.
//! - [`PeerIdentity`]: what a handshake established about the peer (URI and
//!   DNS SANs, subject, serial, TLS version, ALPN, SNI), for filters (RBAC)
//!   and access logs.
//! - [`inspect`]: Envoy's `tls_inspector`: SNI and ALPN peeked from a
//!   ClientHello without consuming it. [`chain_match`]: Envoy's
//!   `filter_chain_match` selection.
//!
//! Used alone, mTLS for any tokio service takes a few lines (the
//! certificates here are made with `rcgen`; a service would name PEM files
//! with `DataSource::Filename`, or SDS secrets in a [`SecretStore`] that
//! [`watch::SecretFile`] keeps current):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use mesh_core::config::tls::*;
//! use mesh_tls::{ClientTls, ServerTls, TlsStats, UpstreamAlpn};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! // A CA, a server certificate and a client certificate with a SPIFFE ID.
//! let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
//! ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
//! let ca_key = rcgen::KeyPair::generate().unwrap();
//! let ca = ca_params.self_signed(&ca_key).unwrap();
//! let issue = |dns: &str, uri: Option<&str>| {
//!     let mut p = rcgen::CertificateParams::new(vec![dns.to_string()]).unwrap();
//!     if let Some(u) = uri {
//!         p.subject_alt_names.push(rcgen::SanType::URI(u.try_into().unwrap()));
//!     }
//!     let key = rcgen::KeyPair::generate().unwrap();
//!     let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
//!     TlsCertificate {
//!         certificate_chain: DataSource::Inline(cert.pem().into_bytes()),
//!         private_key: DataSource::Inline(key.serialize_pem().into_bytes()),
//!     }
//! };
//! let trust = |sans: Vec<SanMatcher>| Some(ValidationSource::Static(ValidationContext {
//!     trusted_ca: Some(DataSource::Inline(ca.pem().into_bytes())),
//!     match_typed_subject_alt_names: sans,
//! }));
//! let web = "spiffe://cluster.local/ns/default/sa/web";
//!
//! let server = ServerTls::new(&DownstreamTlsContext {
//!     common: CommonTlsContext {
//!         tls_certificates: vec![issue("api.local", None)],
//!         validation: trust(vec![SanMatcher {
//!             san_type: SanType::Uri,
//!             matcher: StringMatcher { kind: StringMatch::Exact(web.into()), ignore_case: false },
//!         }]),
//!         ..Default::default()
//!     },
//!     require_client_certificate: true,
//! }, None, TlsStats::detached()).unwrap();
//! let client = ClientTls::new(&UpstreamTlsContext {
//!     common: CommonTlsContext {
//!         tls_certificates: vec![issue("web.local", Some(web))],
//!         validation: trust(vec![]),
//!         ..Default::default()
//!     },
//!     sni: Some("api.local".into()),
//! }, None, TlsStats::detached()).unwrap();
//!
//! let (a, b) = tokio::io::duplex(16 * 1024);
//! let serve = async {
//!     let (mut tls, peer) = server.accept(a, None).await.unwrap();
//!     assert_eq!(peer.principal(), Some(web));
//!     let mut buf = [0u8; 5];
//!     tls.read_exact(&mut buf).await.unwrap();
//!     tls.write_all(&buf).await.unwrap();
//!     tls.flush().await.unwrap();
//! };
//! let call = async {
//!     let peer_ip = "127.0.0.1".parse().unwrap();
//!     let (mut tls, _) = client.connect(b, UpstreamAlpn::Raw, peer_ip, None).await.unwrap();
//!     tls.write_all(b"hello").await.unwrap();
//!     tls.flush().await.unwrap();
//!     let mut buf = [0u8; 5];
//!     tls.read_exact(&mut buf).await.unwrap();
//!     assert_eq!(&buf, b"hello");
//! };
//! tokio::join!(serve, call);
//! # }
//! ```
//!
//! One crypto provider is used for the whole tree: `ring` (aws-lc-rs needs
//! cmake and lengthens a cold build; ring offers every suite mesh exposes).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chain_match;
mod client;
pub mod inspect;
mod material;
mod rebuild;
mod san;
mod secret;
mod server;
mod stats;
mod verify;
pub mod watch;

pub use client::{ClientTls, UpstreamAlpn};
pub use material::{cipher_suite, rfc3339, CertInfo, LoadedCert, LoadedValidation, SubjectAltName};
pub use san::SanMatchers;
pub use secret::{LoadedSecret, SecretStore};
pub use server::ServerTls;
pub use stats::TlsStats;

pub use tokio_rustls::client::TlsStream as ClientTlsStream;
pub use tokio_rustls::server::TlsStream as ServerTlsStream;

use std::sync::Arc;

/// Why TLS configuration or a secret could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// A file named by a data source could not be read.
    #[error("reading {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        message: String,
    },
    /// Certificate, key or trust material is not usable (field, reason).
    #[error("{0}")]
    Invalid(String),
    /// A secret named by the configuration has not been delivered.
    #[error("secret {0:?} is not available")]
    MissingSecret(String),
}

/// Why a handshake failed, as counted in [`TlsStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The handshake did not finish within the timeout.
    Timeout,
    /// The peer did not speak TLS (for example plain HTTP on a TLS port).
    NotTls,
    /// A client certificate was required and none was sent.
    NoCertificate,
    /// The peer certificate did not verify against the trusted CA.
    VerifyError,
    /// The peer certificate has no SAN accepted by the matchers.
    VerifySan,
    /// Another TLS protocol error (bad message, no shared cipher, ...).
    Protocol,
    /// The connection closed or failed during the handshake.
    Io,
    /// No certificate is loaded to serve with (its secret is missing).
    NoLocalCertificate,
}

impl HandshakeFailure {
    /// The stat label of this reason.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::VerifyError => "verify_error",
            HandshakeFailure::VerifySan => "verify_san",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
            HandshakeFailure::NoLocalCertificate => "no_local_certificate",
        }
    }
}

/// A failed handshake: the reason and the underlying error text.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed ({}): {message}", reason.as_str())]
pub struct HandshakeError {
    /// Why.
    pub reason: HandshakeFailure,
    /// The error text (for logs).
    pub message: String,
}

pub use mesh_core::identity::PeerIdentity;

/// Reads what a finished handshake established.
fn identity_of(conn: &rustls::CommonState, sni: Option<&str>) -> PeerIdentity {
    {
        let mut id = PeerIdentity {
            tls_version: match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "",
            },
            cipher: conn
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or_default()
                .to_string(),
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            sni: sni.map(str::to_owned),
            ..Default::default()
        };
        if let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) {
            id.peer_certificate = true;
            id.fingerprint_256 = material::sha256_hex(leaf.as_ref());
            if let Ok(info) = material::cert_info(leaf.as_ref()) {
                for san in info.sans {
                    match san {
                        SubjectAltName::Uri(u) => id.uri_sans.push(u),
                        SubjectAltName::Dns(d) => id.dns_sans.push(d),
                        _ => {}
                    }
                }
                id.subject = info.subject;
                id.serial = info.serial;
                id.issuer = info.issuer;
            }
        }
        id
    }
}

/// The crypto provider every mesh TLS configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}
