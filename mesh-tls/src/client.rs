//! TLS origination: [`ClientTls`] wraps a new upstream connection in TLS,
//! with SNI, ALPN, an optional client certificate (mTLS) and Envoy's
//! validation rules.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::tls::UpstreamTlsContext;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::material::provider_for;
use crate::rebuild::Rebuilt;
use crate::secret::Sources;
use crate::stats::TlsStats;
use crate::verify::UpstreamVerifier;
use crate::{HandshakeError, HandshakeFailure, PeerIdentity, SecretStore, TlsError};

/// Which ALPN list a connection offers when the context configures none
/// (configured `alpn_protocols` always win).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAlpn {
    /// No ALPN unless configured (TCP proxying).
    Raw,
    /// `http/1.1` (an HTTP/1.1 pool).
    Http1,
    /// `h2` (an HTTP/2 pool).
    Http2,
}

/// An upstream TLS context (Envoy `UpstreamTlsContext`), shared by every
/// connection to a cluster.
#[derive(Debug)]
pub struct ClientTls {
    ctx: UpstreamTlsContext,
    sni: Option<ServerName<'static>>,
    sources: Sources,
    stats: TlsStats,
    built: Rebuilt<[Arc<ClientConfig>; 3]>,
}

impl ClientTls {
    /// Builds the context (see [`crate::ServerTls::new`] for how secrets
    /// are resolved).
    pub fn new(
        ctx: &UpstreamTlsContext,
        secrets: Option<Arc<SecretStore>>,
        stats: TlsStats,
    ) -> Result<Self, TlsError> {
        let sni = match &ctx.sni {
            None => None,
            Some(s) => Some(
                ServerName::try_from(s.clone())
                    .map_err(|e| TlsError::Invalid(format!("sni: {e}")))?,
            ),
        };
        let sources = Sources::new(&ctx.common, secrets)?;
        let tls = ClientTls {
            ctx: ctx.clone(),
            sni,
            sources,
            stats,
            built: Rebuilt::unbuilt("upstream TLS context"),
        };
        tls.built.first(tls.sources.generation(), tls.build())?;
        Ok(tls)
    }

    /// The handshake stats.
    pub fn stats(&self) -> &TlsStats {
        &self.stats
    }

    /// The certificate and trust bundle currently in use (for `/certs`);
    /// `None` where none is configured or its secret is missing.
    pub fn loaded(
        &self,
    ) -> (
        Option<Arc<crate::LoadedCert>>,
        Option<Arc<crate::LoadedValidation>>,
    ) {
        self.sources.loaded()
    }

    fn build(&self) -> Result<[Arc<ClientConfig>; 3], TlsError> {
        let common = &self.ctx.common;
        let cert = self.sources.cert()?;
        let validation = self.sources.validation()?;
        let (provider, versions) = provider_for(&common.tls_params)?;
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| TlsError::Invalid(format!("tls_params: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(UpstreamVerifier {
                validation,
                provider,
                stats: self.stats.clone(),
            }));
        let base = match cert {
            Some(c) => builder.with_client_cert_resolver(Arc::new(
                rustls::sign::SingleCertAndKey::from(c.key.clone()),
            )),
            None => builder.with_no_client_auth(),
        };
        let with_alpn = |fallback: &[&str]| {
            let mut c = base.clone();
            c.alpn_protocols = if common.alpn_protocols.is_empty() {
                fallback.iter().map(|p| p.as_bytes().to_vec()).collect()
            } else {
                common
                    .alpn_protocols
                    .iter()
                    .map(|p| p.as_bytes().to_vec())
                    .collect()
            };
            Arc::new(c)
        };
        Ok([with_alpn(&[]), with_alpn(&["http/1.1"]), with_alpn(&["h2"])])
    }

    fn config(&self, alpn: UpstreamAlpn) -> Result<Arc<ClientConfig>, TlsError> {
        let i = match alpn {
            UpstreamAlpn::Raw => 0,
            UpstreamAlpn::Http1 => 1,
            UpstreamAlpn::Http2 => 2,
        };
        self.built
            .get(self.sources.generation(), || self.build(), |c| c[i].clone())
    }

    /// [`ClientTls::connect`] offering exactly `alpn` instead of the
    /// context's list (Istio's `istio.alpn` override for HTTP requests).
    pub async fn connect_with_alpn<IO>(
        &self,
        io: IO,
        alpn: &[String],
        peer: IpAddr,
        timeout: Option<Duration>,
    ) -> Result<(crate::ClientTlsStream<IO>, PeerIdentity), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let base = self.config(UpstreamAlpn::Raw).map_err(|e| {
            self.stats
                .fail(HandshakeFailure::NoLocalCertificate, e.to_string())
        })?;
        let mut config = (*base).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        self.handshake(Arc::new(config), io, peer, timeout).await
    }

    /// Runs the client handshake on `io` (a connection to `peer`), failing
    /// after `timeout`. Without a configured `sni`, no SNI is sent.
    pub async fn connect<IO>(
        &self,
        io: IO,
        alpn: UpstreamAlpn,
        peer: IpAddr,
        timeout: Option<Duration>,
    ) -> Result<(crate::ClientTlsStream<IO>, PeerIdentity), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.config(alpn).map_err(|e| {
            self.stats
                .fail(HandshakeFailure::NoLocalCertificate, e.to_string())
        })?;
        self.handshake(config, io, peer, timeout).await
    }

    async fn handshake<IO>(
        &self,
        config: Arc<ClientConfig>,
        io: IO,
        peer: IpAddr,
        timeout: Option<Duration>,
    ) -> Result<(crate::ClientTlsStream<IO>, PeerIdentity), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self
            .sni
            .clone()
            .unwrap_or(ServerName::IpAddress(peer.into()));
        let connect = tokio_rustls::TlsConnector::from(config).connect(name, io);
        self.stats
            .handshake(connect, timeout, |s| {
                crate::identity_of(s.get_ref().1, None)
            })
            .await
    }
}
