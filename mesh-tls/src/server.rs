//! TLS termination: [`ServerTls`] turns an accepted connection into a TLS
//! stream with the peer's identity, under a handshake timeout.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::tls::DownstreamTlsContext;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::material::provider_for;
use crate::rebuild::Rebuilt;
use crate::secret::Sources;
use crate::stats::TlsStats;
use crate::verify::DownstreamVerifier;
use crate::{HandshakeError, HandshakeFailure, PeerIdentity, SecretStore, TlsError};

/// A downstream TLS context (Envoy `DownstreamTlsContext`) ready to accept
/// connections. Cheap to share (`Arc`) between workers.
#[derive(Debug)]
pub struct ServerTls {
    ctx: DownstreamTlsContext,
    sources: Sources,
    stats: TlsStats,
    built: Rebuilt<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Builds the context. Certificates named inline or by file are loaded
    /// now (errors name the field); SDS secrets are looked up in `secrets`
    /// at each handshake after the store changed.
    pub fn new(
        ctx: &DownstreamTlsContext,
        secrets: Option<Arc<SecretStore>>,
        stats: TlsStats,
    ) -> Result<Self, TlsError> {
        let sources = Sources::new(&ctx.common, secrets)?;
        let tls = ServerTls {
            ctx: ctx.clone(),
            sources,
            stats,
            built: Rebuilt::unbuilt("TLS context"),
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

    fn build(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let common = &self.ctx.common;
        let cert = self.sources.cert()?.ok_or_else(|| {
            TlsError::Invalid(
                "common_tls_context: a TLS listener needs tls_certificates or tls_certificate_sds_secret_configs".into(),
            )
        })?;
        let validation = self.sources.validation()?;
        let (provider, versions) = provider_for(&common.tls_params)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| TlsError::Invalid(format!("tls_params: {e}")))?;
        let builder = match validation {
            Some(v) if v.roots.is_some() => {
                let roots = v.roots.clone().ok_or_else(|| {
                    TlsError::Invalid("validation_context.trusted_ca: missing".into())
                })?;
                let mut b = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
                if !self.ctx.require_client_certificate {
                    b = b.allow_unauthenticated();
                }
                let inner = b
                    .build()
                    .map_err(|e| TlsError::Invalid(format!("validation_context: {e}")))?;
                builder.with_client_cert_verifier(Arc::new(DownstreamVerifier {
                    inner,
                    validation: v,
                    stats: self.stats.clone(),
                }))
            }
            Some(v) if !v.sans.is_empty() => {
                return Err(TlsError::Invalid(
                    "validation_context: match_typed_subject_alt_names needs trusted_ca".into(),
                ))
            }
            _ if self.ctx.require_client_certificate => {
                return Err(TlsError::Invalid(
                    "require_client_certificate needs validation_context.trusted_ca".into(),
                ))
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(
            rustls::sign::SingleCertAndKey::from(cert.key.clone()),
        ));
        config.alpn_protocols = common
            .alpn_protocols
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        Ok(Arc::new(config))
    }

    /// The configuration new handshakes use, rebuilt first when a secret it
    /// depends on changed. A rebuild that fails keeps the previous
    /// configuration (logged).
    pub fn config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.built
            .get(self.sources.generation(), || self.build(), Arc::clone)
    }

    /// Runs the server handshake on `io`, failing after `timeout`. Counts
    /// the outcome in the stats.
    pub async fn accept<IO>(
        &self,
        io: IO,
        timeout: Option<Duration>,
    ) -> Result<(crate::ServerTlsStream<IO>, PeerIdentity), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.config().map_err(|e| {
            self.stats
                .fail(HandshakeFailure::NoLocalCertificate, e.to_string())
        })?;
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(io);
        self.stats
            .handshake(accept, timeout, |s| {
                let conn = s.get_ref().1;
                crate::identity_of(conn, conn.server_name())
            })
            .await
    }
}
