//! What a TLS handshake established about a downstream (or upstream)
//! connection: the peer's verified identity and the negotiated parameters.
//!
//! `mesh-tls` fills it in; the HTTP connection manager attaches it to every
//! request of the connection as a request extension (`Arc<PeerIdentity>`),
//! where RBAC (`authenticated.principal_name`), other filters and the access
//! log (`%DOWNSTREAM_PEER_URI_SAN%`, `%DOWNSTREAM_TLS_VERSION%`, ...) read it.
//! A request without the extension arrived over plain text.

/// The peer of a TLS connection and the session's parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// URI SANs of the peer certificate (SPIFFE IDs).
    pub uri_sans: Vec<String>,
    /// DNS SANs of the peer certificate.
    pub dns_sans: Vec<String>,
    /// The peer certificate's subject (RFC 4514 form), empty without one.
    pub subject: String,
    /// The peer certificate's serial number (lower-case hex), empty without one.
    pub serial: String,
    /// The peer certificate's issuer (RFC 4514 form), empty without one.
    pub issuer: String,
    /// Lower-case hex SHA-256 of the peer certificate (DER), empty without one.
    pub fingerprint_256: String,
    /// `TLSv1.2` or `TLSv1.3`.
    pub tls_version: &'static str,
    /// The negotiated cipher suite (IANA name).
    pub cipher: String,
    /// The negotiated ALPN protocol, if any.
    pub alpn: Option<String>,
    /// The SNI the client sent (server side), if any.
    pub sni: Option<String>,
    /// Whether the peer presented a certificate (verified when the context
    /// has a trust bundle).
    pub peer_certificate: bool,
}

impl PeerIdentity {
    /// The name RBAC's `authenticated.principal_name` matches, as Envoy
    /// picks it: the first URI SAN, else the first DNS SAN, else the subject.
    pub fn principal(&self) -> Option<&str> {
        if let Some(u) = self.uri_sans.first().or(self.dns_sans.first()) {
            return Some(u);
        }
        if self.subject.is_empty() {
            None
        } else {
            Some(&self.subject)
        }
    }
}
