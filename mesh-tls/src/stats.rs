//! Handshake stats with Envoy's `ssl.*` names, in a listener's or a
//! cluster's scope.

use mesh_core::stats::{Counter, Store};

use std::future::Future;
use std::time::Duration;

use crate::{HandshakeError, HandshakeFailure, PeerIdentity};

/// Envoy's `<scope>.ssl.*` stats plus mesh's per-reason failure counters.
#[derive(Debug, Clone)]
pub struct TlsStats {
    /// `ssl.handshake`: completed handshakes.
    pub handshake: Counter,
    /// `ssl.connection_error`: failed handshakes other than certificate
    /// verification failures (Envoy counts those separately).
    pub connection_error: Counter,
    /// `ssl.fail_verify_no_cert`: a required peer certificate was missing.
    pub fail_verify_no_cert: Counter,
    /// `ssl.fail_verify_error`: the peer certificate did not verify.
    pub fail_verify_error: Counter,
    /// `ssl.fail_verify_san`: no SAN matched.
    pub fail_verify_san: Counter,
    /// `ssl.versions.TLSv1.2`.
    pub tls12: Counter,
    /// `ssl.versions.TLSv1.3`.
    pub tls13: Counter,
    /// `mesh_<scope>_ssl_handshake_error{reason}`: failures by reason.
    reasons: [Counter; 8],
}

const REASONS: [HandshakeFailure; 8] = [
    HandshakeFailure::Timeout,
    HandshakeFailure::NotTls,
    HandshakeFailure::NoCertificate,
    HandshakeFailure::VerifyError,
    HandshakeFailure::VerifySan,
    HandshakeFailure::Protocol,
    HandshakeFailure::Io,
    HandshakeFailure::NoLocalCertificate,
];

impl TlsStats {
    /// Registers the stats of scope `scope` (`listener` or `cluster`) with
    /// its labels: `envoy_<scope>_ssl_handshake{labels}`, ...
    pub fn new(store: &Store, scope: &str, labels: &[(&'static str, String)]) -> Self {
        let c = |name: &str| store.counter(&format!("envoy_{scope}_ssl_{name}"), labels);
        let reasons = REASONS.map(|r| {
            let mut l = labels.to_vec();
            l.push(("reason", r.as_str().to_string()));
            store.counter(&format!("mesh_{scope}_ssl_handshake_error"), &l)
        });
        TlsStats {
            handshake: c("handshake"),
            connection_error: c("connection_error"),
            fail_verify_no_cert: c("fail_verify_no_cert"),
            fail_verify_error: c("fail_verify_error"),
            fail_verify_san: c("fail_verify_san"),
            tls12: c("versions_TLSv1_2"),
            tls13: c("versions_TLSv1_3"),
            reasons,
        }
    }

    /// Stats that are counted nowhere (for library use without a store).
    pub fn detached() -> Self {
        Self::new(&Store::new(), "detached", &[])
    }

    pub(crate) fn success(&self, version: &str) {
        self.handshake.inc();
        match version {
            "TLSv1.3" => self.tls13.inc(),
            "TLSv1.2" => self.tls12.inc(),
            _ => {}
        }
    }

    pub(crate) fn failure(&self, reason: HandshakeFailure) {
        // As Envoy: verification failures have their own counters and are
        // not connection errors.
        match reason {
            HandshakeFailure::NoCertificate => self.fail_verify_no_cert.inc(),
            HandshakeFailure::VerifyError | HandshakeFailure::VerifySan => {}
            _ => self.connection_error.inc(),
        }
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.reasons[i].inc();
        }
    }

    /// A handshake failure for `reason`, counted.
    pub(crate) fn fail(&self, reason: HandshakeFailure, message: String) -> HandshakeError {
        self.failure(reason);
        HandshakeError { reason, message }
    }

    /// Runs `handshake` to its end, failing after `timeout`, and counts the
    /// outcome; `identity` reads the peer from the finished stream.
    pub(crate) async fn handshake<S>(
        &self,
        handshake: impl Future<Output = std::io::Result<S>>,
        timeout: Option<Duration>,
        identity: impl FnOnce(&S) -> PeerIdentity,
    ) -> Result<(S, PeerIdentity), HandshakeError> {
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, handshake).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(self.fail(
                        HandshakeFailure::Timeout,
                        format!("no handshake within {t:?}"),
                    ))
                }
            },
            None => handshake.await,
        };
        match result {
            Ok(stream) => {
                let id = identity(&stream);
                self.success(id.tls_version);
                Ok((stream, id))
            }
            Err(e) => Err(self.fail(classify(&e), e.to_string())),
        }
    }

    /// Failures counted for `reason`.
    pub fn failures(&self, reason: HandshakeFailure) -> u64 {
        REASONS
            .iter()
            .position(|r| *r == reason)
            .map(|i| self.reasons[i].get())
            .unwrap_or(0)
    }
}

/// Classifies a handshake I/O error.
pub(crate) fn classify(e: &std::io::Error) -> HandshakeFailure {
    use rustls::Error as E;
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => HandshakeFailure::NoCertificate,
        Some(E::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)) => {
            HandshakeFailure::VerifySan
        }
        Some(E::InvalidCertificate(_)) => HandshakeFailure::VerifyError,
        Some(E::InvalidMessage(rustls::InvalidMessage::InvalidContentType))
        | Some(E::InvalidMessage(rustls::InvalidMessage::UnknownProtocolVersion)) => {
            HandshakeFailure::NotTls
        }
        Some(E::AlertReceived(rustls::AlertDescription::CertificateRequired)) => {
            HandshakeFailure::NoCertificate
        }
        Some(E::AlertReceived(
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::CertificateExpired,
        )) => HandshakeFailure::VerifyError,
        Some(_) => HandshakeFailure::Protocol,
        None => match e.kind() {
            std::io::ErrorKind::InvalidData => HandshakeFailure::Protocol,
            _ => HandshakeFailure::Io,
        },
    }
}
