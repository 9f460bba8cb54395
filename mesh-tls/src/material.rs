//! Certificates, keys and trust bundles loaded from Envoy data sources, with
//! the checks a rotation relies on: the chain parses, the key parses and
//! matches the leaf, and the leaf has not expired.

use std::sync::Arc;

use mesh_core::config::tls::{
    DataSource, TlsCertificate, TlsParams, TlsVersion, ValidationContext,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::san::SanMatchers;
use crate::TlsError;

/// Reads a data source's bytes.
pub(crate) fn read(source: &DataSource) -> Result<Vec<u8>, TlsError> {
    match source {
        DataSource::Inline(b) => Ok(b.clone()),
        DataSource::Filename(p) => std::fs::read(p).map_err(|e| TlsError::Read {
            path: p.clone(),
            message: e.to_string(),
        }),
    }
}

fn describe(source: &DataSource) -> String {
    match source {
        DataSource::Filename(p) => p.clone(),
        DataSource::Inline(_) => "<inline>".into(),
    }
}

/// Parses every PEM certificate in `pem`.
pub(crate) fn parse_certs(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid(format!("{what}: not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{what}: no PEM certificate found"
        )));
    }
    Ok(certs)
}

/// One subject alternative name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectAltName {
    /// A DNS name.
    Dns(String),
    /// A URI (a SPIFFE ID in a mesh).
    Uri(String),
    /// An email address.
    Email(String),
    /// An IP address (text form).
    Ip(String),
}

/// What `/certs` and the expiry stats show of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject, RFC 4514 form.
    pub subject: String,
    /// Serial number, lower-case hex without separators.
    pub serial: String,
    /// Issuer, RFC 4514 form.
    pub issuer: String,
    /// Subject alternative names.
    pub sans: Vec<SubjectAltName>,
    /// `notBefore`, seconds since the Unix epoch.
    pub not_before: i64,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
    /// The file it was read from, if any.
    pub path: Option<String>,
}

/// Lower-case hex SHA-256 of `der` (a certificate's fingerprint).
pub(crate) fn sha256_hex(der: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut s = String::with_capacity(64);
    for b in digest.as_ref() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses the parts of a DER certificate that mesh reports.
pub(crate) fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        use x509_parser::extensions::GeneralName;
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(SubjectAltName::Dns(d.to_string())),
                GeneralName::URI(u) => sans.push(SubjectAltName::Uri(u.to_string())),
                GeneralName::RFC822Name(e) => sans.push(SubjectAltName::Email(e.to_string())),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b)
                            .ok()
                            .map(|a| std::net::IpAddr::from(a).to_string()),
                        16 => <[u8; 16]>::try_from(*b)
                            .ok()
                            .map(|a| std::net::IpAddr::from(a).to_string()),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.push(SubjectAltName::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }
    let serial = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: if serial.is_empty() {
            "0".into()
        } else {
            serial
        },
        sans,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        path: None,
    })
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A certificate chain with its private key, checked and ready to serve.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// The rustls form.
    pub key: Arc<CertifiedKey>,
    /// The leaf's details.
    pub info: CertInfo,
    /// Details of the rest of the chain.
    pub chain: Vec<CertInfo>,
}

impl LoadedCert {
    /// Loads and checks a `TlsCertificate`: the chain parses, the key
    /// parses and matches the leaf, and the leaf has not expired.
    pub fn load(cert: &TlsCertificate) -> Result<LoadedCert, TlsError> {
        let chain_pem = read(&cert.certificate_chain)?;
        let key_pem = read(&cert.private_key)?;
        Self::from_pem(
            &chain_pem,
            &key_pem,
            Some(describe(&cert.certificate_chain)),
        )
    }

    /// Builds from PEM bytes (`origin` names the chain's file for `/certs`).
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        origin: Option<String>,
    ) -> Result<LoadedCert, TlsError> {
        let chain = parse_certs(chain_pem, "certificate_chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsError::Invalid(format!("private_key: not a PEM private key: {e}")))?;
        let provider = crate::provider();
        let mut infos = Vec::new();
        for der in &chain {
            let mut info = cert_info(der.as_ref())
                .map_err(|e| TlsError::Invalid(format!("certificate_chain: {e}")))?;
            info.path = origin.clone().filter(|o| o != "<inline>");
            infos.push(info);
        }
        let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            TlsError::Invalid(format!(
                "private_key: does not match the certificate or cannot be used: {e}"
            ))
        })?;
        let info = infos.remove(0);
        if info.not_after < now_unix() {
            return Err(TlsError::Invalid(format!(
                "certificate_chain: the certificate (serial {}) expired at {}",
                info.serial,
                rfc3339(info.not_after)
            )));
        }
        Ok(LoadedCert {
            key: Arc::new(key),
            info,
            chain: infos,
        })
    }
}

/// A trust bundle and SAN matchers: how a peer is validated.
#[derive(Debug, Clone)]
pub struct LoadedValidation {
    /// The trusted CAs; `None` accepts any peer certificate (Envoy's
    /// behaviour without `trusted_ca`).
    pub roots: Option<Arc<RootCertStore>>,
    /// The CA certificates' details.
    pub ca_infos: Vec<CertInfo>,
    /// `match_typed_subject_alt_names`.
    pub sans: SanMatchers,
}

impl LoadedValidation {
    /// Loads a validation context.
    pub fn load(v: &ValidationContext) -> Result<LoadedValidation, TlsError> {
        let sans = SanMatchers::compile(&v.match_typed_subject_alt_names)?;
        let (roots, ca_infos) = match &v.trusted_ca {
            None => (None, Vec::new()),
            Some(src) => {
                let pem = read(src)?;
                let certs = parse_certs(&pem, "trusted_ca")?;
                let mut store = RootCertStore::empty();
                let mut infos = Vec::new();
                for c in certs {
                    if let Ok(mut i) = cert_info(c.as_ref()) {
                        i.path = match src {
                            DataSource::Filename(p) => Some(p.clone()),
                            DataSource::Inline(_) => None,
                        };
                        infos.push(i);
                    }
                    store
                        .add(c)
                        .map_err(|e| TlsError::Invalid(format!("trusted_ca: {e}")))?;
                }
                (Some(Arc::new(store)), infos)
            }
        };
        Ok(LoadedValidation {
            roots,
            ca_infos,
            sans,
        })
    }
}

/// The crypto provider restricted to `params` (TLS 1.2 cipher suites) and
/// the protocol versions to enable.
pub(crate) fn provider_for(
    params: &TlsParams,
) -> Result<
    (
        Arc<CryptoProvider>,
        Vec<&'static rustls::SupportedProtocolVersion>,
    ),
    TlsError,
> {
    let base = crate::provider();
    let mut versions = Vec::new();
    if params.min_version <= TlsVersion::V1_2 && params.max_version >= TlsVersion::V1_2 {
        versions.push(&rustls::version::TLS12);
    }
    if params.max_version >= TlsVersion::V1_3 {
        versions.push(&rustls::version::TLS13);
    }
    if versions.is_empty() {
        return Err(TlsError::Invalid(
            "tls_params: the minimum version is above the maximum".into(),
        ));
    }
    if params.cipher_suites.is_empty() {
        return Ok((base, versions));
    }
    let mut suites: Vec<rustls::SupportedCipherSuite> = base
        .cipher_suites
        .iter()
        .filter(|s| s.version() == &rustls::version::TLS13)
        .copied()
        .collect();
    for name in &params.cipher_suites {
        let suite = cipher_suite(name).ok_or_else(|| {
            TlsError::Invalid(format!(
                "tls_params.cipher_suites: {name:?} is not supported"
            ))
        })?;
        if let Some(s) = base.cipher_suites.iter().find(|s| s.suite() == suite) {
            suites.push(*s);
        }
    }
    let mut p = (*base).clone();
    p.cipher_suites = suites;
    Ok((Arc::new(p), versions))
}

/// The TLS 1.2 suites rustls (ring) implements, by their BoringSSL names
/// (as Envoy's `cipher_suites` spells them).
pub fn cipher_suite(name: &str) -> Option<rustls::CipherSuite> {
    use rustls::CipherSuite as C;
    Some(match name {
        "ECDHE-ECDSA-AES128-GCM-SHA256" => C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-RSA-AES128-GCM-SHA256" => C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-ECDSA-AES256-GCM-SHA384" => C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-RSA-AES256-GCM-SHA384" => C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-ECDSA-CHACHA20-POLY1305" => C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        "ECDHE-RSA-CHACHA20-POLY1305" => C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        _ => return None,
    })
}

/// `2026-11-22T08:00:00Z` for a Unix time.
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = mesh_core::time::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_340_000), "2026-11-22T09:33:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
