//! Peer certificate verification as Envoy does it: the chain is verified
//! against `trusted_ca` when one is configured, the SAN matchers are applied
//! to the leaf, and the host name is *not* checked against the SNI (Envoy
//! checks names only through `match_typed_subject_alt_names`).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::material::LoadedValidation;
use crate::stats::TlsStats;

fn check_sans(
    validation: &LoadedValidation,
    leaf: &CertificateDer<'_>,
    stats: &TlsStats,
) -> Result<(), Error> {
    if validation.sans.is_empty() {
        return Ok(());
    }
    let sans = crate::material::cert_info(leaf.as_ref())
        .map(|i| i.sans)
        .unwrap_or_default();
    if validation.sans.accepts(&sans) {
        Ok(())
    } else {
        stats.fail_verify_san.inc();
        Err(Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// Verifies upstream server certificates.
#[derive(Debug)]
pub(crate) struct UpstreamVerifier {
    pub(crate) validation: Option<Arc<LoadedValidation>>,
    pub(crate) provider: Arc<CryptoProvider>,
    pub(crate) stats: TlsStats,
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(v) = &self.validation else {
            return Ok(ServerCertVerified::assertion());
        };
        if let Some(roots) = &v.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            if let Err(e) = rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            ) {
                self.stats.fail_verify_error.inc();
                return Err(e);
            }
        }
        check_sans(v, end_entity, &self.stats)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies downstream client certificates: webpki against the trust
/// bundle, then the SAN matchers.
#[derive(Debug)]
pub(crate) struct DownstreamVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) validation: Arc<LoadedValidation>,
    pub(crate) stats: TlsStats,
}

impl ClientCertVerifier for DownstreamVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            self.stats.fail_verify_error.inc();
            return Err(e);
        }
        check_sans(&self.validation, end_entity, &self.stats)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
