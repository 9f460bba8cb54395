//! TLS, filter-chain matching and secret configuration (Envoy's
//! `extensions.transport_sockets.tls.v3` and `config.listener.v3.FilterChainMatch`).
//!
//! These are the typed forms of `DownstreamTlsContext` (a listener filter
//! chain's `transport_socket`), `UpstreamTlsContext` (a cluster's
//! `transport_socket`), the secrets they name over SDS, and the criteria that
//! choose a filter chain for a connection. `mesh-tls` builds rustls
//! configurations from them.

use std::net::IpAddr;
use std::time::Duration;

/// Envoy `config.core.v3.DataSource`: bytes from a file or inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// `filename`: read when the secret is loaded (and again when the file
    /// changes, for secrets that are watched).
    Filename(String),
    /// `inline_string` or `inline_bytes` (base64-decoded).
    Inline(Vec<u8>),
}

/// Envoy `extensions.transport_sockets.tls.v3.TlsCertificate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCertificate {
    /// `certificate_chain` (PEM, leaf first).
    pub certificate_chain: DataSource,
    /// `private_key` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub private_key: DataSource,
}

/// How a [`StringMatcher`] compares (Envoy `type.matcher.v3.StringMatcher`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    /// `exact`.
    Exact(String),
    /// `prefix`.
    Prefix(String),
    /// `suffix`.
    Suffix(String),
    /// `contains`.
    Contains(String),
    /// `safe_regex.regex`: the whole value matches.
    Regex(String),
}

/// Envoy `type.matcher.v3.StringMatcher` with `ignore_case`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StringMatcher {
    /// What to compare.
    pub kind: StringMatch,
    /// `ignore_case` (not for regexes).
    pub ignore_case: bool,
}

/// `SubjectAltNameMatcher.san_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanType {
    /// `DNS`.
    Dns,
    /// `URI` (for example a SPIFFE ID `spiffe://cluster.local/ns/default/sa/web`).
    Uri,
    /// `EMAIL`.
    Email,
    /// `IP_ADDRESS` (compared in its text form).
    IpAddress,
}

/// Envoy `SubjectAltNameMatcher`: one entry of `match_typed_subject_alt_names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanMatcher {
    /// `san_type`.
    pub san_type: SanType,
    /// `matcher`.
    pub matcher: StringMatcher,
}

/// Envoy `CertificateValidationContext`: how the peer's certificate is
/// checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationContext {
    /// `trusted_ca` (PEM bundle). Without it the peer certificate is not
    /// verified (as in Envoy).
    pub trusted_ca: Option<DataSource>,
    /// `match_typed_subject_alt_names`: when not empty, the peer certificate
    /// must have a SAN matching one of them.
    pub match_typed_subject_alt_names: Vec<SanMatcher>,
}

/// Where an SDS secret comes from (`sds_config` of an `SdsSecretConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdsSource {
    /// No `sds_config`: a secret of `static_resources.secrets`.
    Static,
    /// `path_config_source.path` (or the older `path`): a file holding a
    /// discovery response (`resources: [Secret...]`), watched for changes.
    Path(String),
    /// `ads: {}` or `api_config_source`: delivered over xDS (SDS), on the
    /// ADS stream or a stream of its own, with the source's
    /// `initial_fetch_timeout` (how long a listener or cluster naming the
    /// secret warms before going live without it).
    Xds(super::ConfigSource),
}

/// Envoy `SdsSecretConfig`: a secret by name, from a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsSecretConfig {
    /// `name`.
    pub name: String,
    /// `sds_config`.
    pub source: SdsSource,
}

/// A named secret (Envoy `extensions.transport_sockets.tls.v3.Secret`), as
/// delivered by SDS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// `name`.
    pub name: String,
    /// What the secret holds.
    pub kind: SecretKind,
}

/// The payload of a [`Secret`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretKind {
    /// `tls_certificate`.
    TlsCertificate(TlsCertificate),
    /// `validation_context`.
    ValidationContext(ValidationContext),
}

/// How the peer is validated: inline, from SDS, or both combined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidationSource {
    /// `validation_context`.
    Static(ValidationContext),
    /// `validation_context_sds_secret_config`.
    Sds(SdsSecretConfig),
    /// `combined_validation_context`: the SDS secret's trust bundle with the
    /// default context's SAN matchers (and its `trusted_ca` if the secret has
    /// none).
    Combined {
        /// `default_validation_context`.
        default: ValidationContext,
        /// `validation_context_sds_secret_config`.
        sds: SdsSecretConfig,
    },
}

/// A TLS protocol version (`TlsParameters.TlsProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// `TLSv1_2`.
    V1_2,
    /// `TLSv1_3`.
    V1_3,
}

/// Envoy `TlsParameters`, restricted to what rustls implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    /// `tls_minimum_protocol_version` (`TLS_AUTO`, `TLSv1_0` and `TLSv1_1`
    /// mean TLS 1.2, the oldest version rustls speaks).
    pub min_version: TlsVersion,
    /// `tls_maximum_protocol_version` (`TLS_AUTO` means TLS 1.3).
    pub max_version: TlsVersion,
    /// `cipher_suites` (BoringSSL names of TLS 1.2 suites; empty = rustls'
    /// defaults). TLS 1.3 suites are not configurable, as in Envoy.
    pub cipher_suites: Vec<String>,
}

impl Default for TlsParams {
    fn default() -> Self {
        TlsParams {
            min_version: TlsVersion::V1_2,
            max_version: TlsVersion::V1_3,
            cipher_suites: Vec::new(),
        }
    }
}

/// Envoy `CommonTlsContext`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommonTlsContext {
    /// `tls_params`.
    pub tls_params: TlsParams,
    /// `tls_certificates` (mesh uses the first).
    pub tls_certificates: Vec<TlsCertificate>,
    /// `tls_certificate_sds_secret_configs` (mesh uses the first).
    pub tls_certificate_sds: Vec<SdsSecretConfig>,
    /// `validation_context`, `validation_context_sds_secret_config` or
    /// `combined_validation_context`.
    pub validation: Option<ValidationSource>,
    /// `alpn_protocols`, in preference order.
    pub alpn_protocols: Vec<String>,
}

/// Envoy `DownstreamTlsContext`: TLS termination on a filter chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownstreamTlsContext {
    /// `common_tls_context`.
    pub common: CommonTlsContext,
    /// `require_client_certificate`.
    pub require_client_certificate: bool,
}

/// Envoy `UpstreamTlsContext`: TLS origination to a cluster's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsContext {
    /// `common_tls_context`.
    pub common: CommonTlsContext,
    /// `sni`: the server name sent; none sends no SNI.
    pub sni: Option<String>,
}

/// One CIDR range (`config.core.v3.CidrRange`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrRange {
    /// `address_prefix`.
    pub address: IpAddr,
    /// `prefix_len`.
    pub prefix_len: u8,
}

impl CidrRange {
    /// Whether `ip` is inside the range (an IPv4 address never matches an
    /// IPv6 range or the reverse, except IPv4-mapped IPv6 addresses, which
    /// are compared as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let len = u32::from(self.prefix_len.min(32));
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let len = u32::from(self.prefix_len.min(128));
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Envoy `config.listener.v3.FilterChainMatch`: which connections a filter
/// chain serves. Empty criteria match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterChainMatch {
    /// `destination_port`.
    pub destination_port: Option<u16>,
    /// `prefix_ranges`: the local (destination) address.
    pub prefix_ranges: Vec<CidrRange>,
    /// `server_names` (lower-cased; `*.example.com` wildcards allowed).
    pub server_names: Vec<String>,
    /// `transport_protocol`: `tls` or `raw_buffer` (empty = any).
    pub transport_protocol: String,
    /// `application_protocols` (ALPN offered by the client).
    pub application_protocols: Vec<String>,
    /// `direct_source_prefix_ranges`: the peer address of the connection.
    pub direct_source_prefix_ranges: Vec<CidrRange>,
    /// `source_prefix_ranges`: the client address.
    pub source_prefix_ranges: Vec<CidrRange>,
    /// `source_ports`.
    pub source_ports: Vec<u16>,
}

/// Default TLS handshake timeout of a filter chain
/// (`transport_socket_connect_timeout`), 10 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
