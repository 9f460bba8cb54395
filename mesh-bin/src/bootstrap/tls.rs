//! TLS transport sockets (`DownstreamTlsContext` on a filter chain,
//! `UpstreamTlsContext` on a cluster), `filter_chain_match`, SDS secret
//! references, `static_resources.secrets`, and the SDS file format read by
//! the secret file watcher.

use std::net::IpAddr;

use mesh_core::config::tls::{
    CidrRange, CommonTlsContext, DataSource, DownstreamTlsContext, FilterChainMatch, SanMatcher,
    SanType, SdsSecretConfig, SdsSource, Secret, SecretKind, StringMatch, StringMatcher,
    TlsCertificate, TlsParams, TlsVersion, UpstreamTlsContext, ValidationContext, ValidationSource,
};
use mesh_core::config::HeaderMatchKind;
use serde_json::Value;

use super::reader::{one_of, Ctx, Obj};
use super::route::{base64_decode, string_matcher};
use super::{select_extension, Known};

const TRANSPORT_SOCKETS_DOWN: &[Known] = &[
    Known {
        name: "envoy.transport_sockets.tls",
        type_url:
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
    },
    Known {
        name: "envoy.transport_sockets.raw_buffer",
        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
    },
];

const TRANSPORT_SOCKETS_UP: &[Known] = &[
    Known {
        name: "envoy.transport_sockets.tls",
        type_url:
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    },
    Known {
        name: "envoy.transport_sockets.raw_buffer",
        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
    },
];

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A filter chain's `transport_socket`: `Some` for TLS, `None` for
/// `raw_buffer` (or an error).
pub(crate) fn downstream_socket(cx: &mut Ctx, mut o: Obj<'_>) -> Option<DownstreamTlsContext> {
    let chosen = select_extension(cx, &mut o, "transport socket", TRANSPORT_SOCKETS_DOWN);
    o.finish(cx);
    let (which, tc) = chosen?;
    let mut tc = tc?;
    if which == 1 {
        tc.finish(cx);
        return None;
    }
    let common = tc
        .obj(cx, "common_tls_context")
        .map(|c| common(cx, c))
        .unwrap_or_default();
    let require_client_certificate = tc.bool(cx, "require_client_certificate").unwrap_or(false);
    tc.finish(cx);
    Some(DownstreamTlsContext {
        common,
        require_client_certificate,
    })
}

/// A cluster's `transport_socket`.
pub(crate) fn upstream_socket(cx: &mut Ctx, mut o: Obj<'_>) -> Option<UpstreamTlsContext> {
    let chosen = select_extension(cx, &mut o, "transport socket", TRANSPORT_SOCKETS_UP);
    o.finish(cx);
    let (which, tc) = chosen?;
    let mut tc = tc?;
    if which == 1 {
        tc.finish(cx);
        return None;
    }
    let common = tc
        .obj(cx, "common_tls_context")
        .map(|c| common(cx, c))
        .unwrap_or_default();
    let sni = tc.string(cx, "sni").filter(|s| !s.is_empty());
    if tc.bool(cx, "allow_renegotiation") == Some(true) {
        cx.unsupported(
            &tc.at("allow_renegotiation"),
            Some("rustls never renegotiates"),
        );
    }
    tc.finish(cx);
    Some(UpstreamTlsContext { common, sni })
}

fn common(cx: &mut Ctx, mut o: Obj<'_>) -> CommonTlsContext {
    let mut out = CommonTlsContext::default();
    if let Some(p) = o.obj(cx, "tls_params") {
        out.tls_params = tls_params(cx, p);
    }
    for (path, v) in o.list(cx, "tls_certificates") {
        if let Some(c) = Obj::new(cx, path, v) {
            if let Some(c) = tls_certificate(cx, c) {
                out.tls_certificates.push(c);
            }
        }
    }
    for (path, v) in o.list(cx, "tls_certificate_sds_secret_configs") {
        if let Some(s) = Obj::new(cx, path, v).and_then(|s| sds_secret_config(cx, s)) {
            out.tls_certificate_sds.push(s);
        }
    }
    let certs_path = o.at("tls_certificates");
    if out.tls_certificates.len() + out.tls_certificate_sds.len() > 1 {
        cx.unsupported(&certs_path, Some("only one certificate per context"));
    }
    let keys = [
        "validation_context",
        "validation_context_sds_secret_config",
        "combined_validation_context",
    ];
    out.validation = match one_of(cx, &o, &keys, false) {
        Some("validation_context") => o
            .obj(cx, "validation_context")
            .map(|v| ValidationSource::Static(validation_context(cx, v))),
        Some("validation_context_sds_secret_config") => o
            .obj(cx, "validation_context_sds_secret_config")
            .and_then(|s| sds_secret_config(cx, s))
            .map(ValidationSource::Sds),
        Some(_) => o.obj(cx, "combined_validation_context").and_then(|mut c| {
            let default = c
                .obj(cx, "default_validation_context")
                .map(|v| validation_context(cx, v))
                .unwrap_or_default();
            let sds_path = c.at("validation_context_sds_secret_config");
            let sds = c
                .obj(cx, "validation_context_sds_secret_config")
                .and_then(|s| sds_secret_config(cx, s));
            if sds.is_none() && !c.has("validation_context_sds_secret_config") {
                cx.missing(&sds_path);
            }
            c.finish(cx);
            Some(ValidationSource::Combined { default, sds: sds? })
        }),
        None => {
            for k in keys {
                o.take(k);
            }
            None
        }
    };
    for (path, p) in o.strings(cx, "alpn_protocols") {
        if p.is_empty() || p.len() > 255 {
            cx.error(&path, "an ALPN protocol name is 1 to 255 bytes");
        } else {
            out.alpn_protocols.push(p);
        }
    }
    o.finish(cx);
    out
}

fn tls_params(cx: &mut Ctx, mut o: Obj<'_>) -> TlsParams {
    let mut out = TlsParams::default();
    let older = "rustls implements TLS 1.2 and 1.3 only";
    if let Some(v) = o.enumeration(
        cx,
        "tls_minimum_protocol_version",
        &[
            ("TLS_AUTO", TlsVersion::V1_2),
            ("TLSv1_0", TlsVersion::V1_2),
            ("TLSv1_1", TlsVersion::V1_2),
            ("TLSv1_2", TlsVersion::V1_2),
            ("TLSv1_3", TlsVersion::V1_3),
        ],
        &[],
    ) {
        out.min_version = v;
    }
    let max_path = o.at("tls_maximum_protocol_version");
    if let Some(v) = o.enumeration(
        cx,
        "tls_maximum_protocol_version",
        &[
            ("TLS_AUTO", TlsVersion::V1_3),
            ("TLSv1_2", TlsVersion::V1_2),
            ("TLSv1_3", TlsVersion::V1_3),
        ],
        &[("TLSv1_0", older), ("TLSv1_1", older)],
    ) {
        out.max_version = v;
    }
    if out.min_version > out.max_version {
        cx.error(
            &max_path,
            "the maximum version is below the minimum version",
        );
    }
    for (path, s) in o.strings(cx, "cipher_suites") {
        if mesh_tls_suite_known(&s) {
            out.cipher_suites.push(s);
        } else {
            cx.unsupported(
                &path,
                Some(&format!(
                    "{s:?}: mesh (rustls) offers ECDHE-{{ECDSA,RSA}}-AES128-GCM-SHA256, ECDHE-{{ECDSA,RSA}}-AES256-GCM-SHA384 and ECDHE-{{ECDSA,RSA}}-CHACHA20-POLY1305"
                )),
            );
        }
    }
    o.finish(cx);
    out
}

fn mesh_tls_suite_known(name: &str) -> bool {
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
    .contains(&name)
}

fn tls_certificate(cx: &mut Ctx, mut o: Obj<'_>) -> Option<TlsCertificate> {
    let chain_path = o.at("certificate_chain");
    let key_path = o.at("private_key");
    let chain = o
        .obj(cx, "certificate_chain")
        .and_then(|d| data_source(cx, d));
    let key = o.obj(cx, "private_key").and_then(|d| data_source(cx, d));
    if chain.is_none() && !o.has("certificate_chain") {
        cx.missing(&chain_path);
    }
    if key.is_none() && !o.has("private_key") {
        cx.missing(&key_path);
    }
    o.finish(cx);
    Some(TlsCertificate {
        certificate_chain: chain?,
        private_key: key?,
    })
}

/// A `config.core.v3.DataSource` holding PEM: `filename` is kept as a name
/// (read when the context is built or the secret reloaded).
fn data_source(cx: &mut Ctx, mut o: Obj<'_>) -> Option<DataSource> {
    let keys = ["filename", "inline_string", "inline_bytes"];
    let given = one_of(cx, &o, &keys, !o.has("environment_variable"));
    o.refuse(
        cx,
        "environment_variable",
        "secrets from environment variables are not supported",
    );
    let out = match given {
        Some("filename") => o.req_string(cx, "filename").map(DataSource::Filename),
        Some("inline_string") => o
            .string(cx, "inline_string")
            .map(|s| DataSource::Inline(s.into_bytes())),
        Some(_) => {
            let path = o.at("inline_bytes");
            o.string(cx, "inline_bytes").and_then(|s| {
                let d = base64_decode(&s);
                if d.is_none() {
                    cx.error(&path, "invalid base64");
                }
                d.map(DataSource::Inline)
            })
        }
        None => {
            for k in keys {
                o.take(k);
            }
            None
        }
    };
    o.finish(cx);
    out
}

fn validation_context(cx: &mut Ctx, mut o: Obj<'_>) -> ValidationContext {
    let trusted_ca = o.obj(cx, "trusted_ca").and_then(|d| data_source(cx, d));
    let mut sans = Vec::new();
    for (path, v) in o.list(cx, "match_typed_subject_alt_names") {
        let Some(mut m) = Obj::new(cx, path, v) else {
            continue;
        };
        let ty_path = m.at("san_type");
        let san_type = m.enumeration(
            cx,
            "san_type",
            &[
                ("DNS", SanType::Dns),
                ("URI", SanType::Uri),
                ("EMAIL", SanType::Email),
                ("IP_ADDRESS", SanType::IpAddress),
            ],
            &[("OTHER_NAME", "otherName SANs are not supported")],
        );
        if san_type.is_none() && !m.has("san_type") {
            cx.missing(&ty_path);
        }
        let mpath = m.at("matcher");
        let matcher = m.obj(cx, "matcher").and_then(|s| string_matcher(cx, s));
        if matcher.is_none() && !m.has("matcher") {
            cx.missing(&mpath);
        }
        m.finish(cx);
        if let (Some(san_type), Some(kind)) = (san_type, matcher) {
            if let Some(matcher) = to_string_matcher(kind) {
                sans.push(SanMatcher { san_type, matcher });
            }
        }
    }
    // The deprecated `match_subject_alt_names` (older Istio releases print
    // it): a matcher that any SAN may satisfy, whatever its type, as Envoy
    // checks it.
    for (path, v) in o.list(cx, "match_subject_alt_names") {
        let Some(kind) = Obj::new(cx, path, v).and_then(|s| string_matcher(cx, s)) else {
            continue;
        };
        if let Some(matcher) = to_string_matcher(kind) {
            for san_type in [
                SanType::Dns,
                SanType::Uri,
                SanType::Email,
                SanType::IpAddress,
            ] {
                sans.push(SanMatcher {
                    san_type,
                    matcher: matcher.clone(),
                });
            }
        }
    }
    o.finish(cx);
    ValidationContext {
        trusted_ca,
        match_typed_subject_alt_names: sans,
    }
}

/// A header matcher's string match as a [`StringMatcher`] (`None` for
/// the kinds that are not string matches: present, range...).
pub(super) fn to_string_matcher(kind: HeaderMatchKind) -> Option<StringMatcher> {
    let (kind, ignore_case) = match kind {
        HeaderMatchKind::IgnoreCase(k) => (*k, true),
        k => (k, false),
    };
    let kind = match kind {
        HeaderMatchKind::Exact(s) => StringMatch::Exact(s),
        HeaderMatchKind::Prefix(s) => StringMatch::Prefix(s),
        HeaderMatchKind::Suffix(s) => StringMatch::Suffix(s),
        HeaderMatchKind::Contains(s) => StringMatch::Contains(s),
        HeaderMatchKind::Regex(s) => StringMatch::Regex(s),
        _ => return None,
    };
    Some(StringMatcher { kind, ignore_case })
}

fn sds_secret_config(cx: &mut Ctx, mut o: Obj<'_>) -> Option<SdsSecretConfig> {
    let name = o.req_string(cx, "name");
    let source = match o.obj(cx, "sds_config") {
        None => SdsSource::Static,
        // `ads: {}` or `api_config_source`: SDS over xDS, read as any other
        // config source.
        Some(c) if !c.has("path_config_source") && !c.has("path") => {
            SdsSource::Xds(super::xds::config_source(cx, c))
        }
        Some(mut c) => {
            let keys = ["path_config_source", "path", "ads", "api_config_source"];
            let given = one_of(cx, &c, &keys, true);
            c.enumeration(
                cx,
                "resource_api_version",
                &[("V3", ())],
                &[("AUTO", "only V3"), ("V2", "only V3")],
            );
            c.duration(cx, "initial_fetch_timeout");
            let s = match given {
                Some("path_config_source") => c.obj(cx, "path_config_source").and_then(|mut p| {
                    let path = p.req_string(cx, "path");
                    p.refuse(
                        cx,
                        "watched_directory",
                        "mesh polls the file and the files it names, which follows symlink swaps",
                    );
                    p.finish(cx);
                    path.map(SdsSource::Path)
                }),
                Some("path") => c.req_string(cx, "path").map(SdsSource::Path),
                _ => {
                    for k in keys {
                        c.take(k);
                    }
                    None
                }
            };
            c.finish(cx);
            s?
        }
    };
    let name_path = o.at("name");
    o.finish(cx);
    if let (SdsSource::Static, Some(n)) = (&source, &name) {
        cx.secret_refs.push((name_path, n.clone()));
    }
    Some(SdsSecretConfig {
        name: name?,
        source,
    })
}

/// One `Secret` (in `static_resources.secrets` or an SDS file).
pub(crate) fn secret(cx: &mut Ctx, mut o: Obj<'_>) -> Option<Secret> {
    if let Some(ty) = o.string(cx, "@type") {
        if ty != SECRET_TYPE {
            cx.error(&o.at("@type"), format!("expected {SECRET_TYPE}"));
        }
    }
    let name = o.req_string(cx, "name");
    let keys = ["tls_certificate", "validation_context"];
    let kind = match one_of(
        cx,
        &o,
        &keys,
        !o.has("session_ticket_keys") && !o.has("generic_secret"),
    ) {
        Some("tls_certificate") => o
            .obj(cx, "tls_certificate")
            .and_then(|c| tls_certificate(cx, c))
            .map(SecretKind::TlsCertificate),
        Some(_) => o
            .obj(cx, "validation_context")
            .map(|v| SecretKind::ValidationContext(validation_context(cx, v))),
        None => {
            for k in keys {
                o.take(k);
            }
            None
        }
    };
    o.finish(cx);
    Some(Secret {
        name: name?,
        kind: kind?,
    })
}

/// `static_resources.secrets`.
pub(crate) fn static_secrets(cx: &mut Ctx, sr: &mut Obj<'_>) -> Vec<Secret> {
    let mut out: Vec<Secret> = Vec::new();
    for (path, v) in sr.list(cx, "secrets") {
        if let Some(s) = Obj::new(cx, path.clone(), v).and_then(|o| secret(cx, o)) {
            if out.iter().any(|o| o.name == s.name) {
                cx.error(&path, format!("duplicate secret name {:?}", s.name));
            }
            out.push(s);
        }
    }
    out
}

/// Reads an SDS file (`path_config_source`): a discovery response whose
/// `resources` are `Secret`s, as YAML or JSON.
pub fn parse_sds_file(bytes: &[u8]) -> Result<Vec<Secret>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let value: Value = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
    let mut cx = Ctx::default();
    let mut out = Vec::new();
    if let Some(mut top) = Obj::new(&mut cx, String::new(), &value) {
        top.string(&mut cx, "version_info");
        top.string(&mut cx, "type_url");
        for (path, v) in top.list(&mut cx, "resources") {
            if let Some(s) = Obj::new(&mut cx, path, v).and_then(|o| secret(&mut cx, o)) {
                out.push(s);
            }
        }
        top.finish(&mut cx);
    }
    if cx.errors.is_empty() {
        Ok(out)
    } else {
        Err(cx
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; "))
    }
}

/// `filter_chain_match`.
pub(crate) fn filter_chain_match(cx: &mut Ctx, mut o: Obj<'_>) -> FilterChainMatch {
    let mut m = FilterChainMatch::default();
    let port_path = o.at("destination_port");
    if let Some(p) = o.u32(cx, "destination_port") {
        match u16::try_from(p) {
            Ok(p) if p > 0 => m.destination_port = Some(p),
            _ => cx.error(&port_path, "expected a port from 1 to 65535"),
        }
    }
    m.prefix_ranges = cidr_list(cx, &mut o, "prefix_ranges");
    m.direct_source_prefix_ranges = cidr_list(cx, &mut o, "direct_source_prefix_ranges");
    m.source_prefix_ranges = cidr_list(cx, &mut o, "source_prefix_ranges");
    for (path, v) in o.list(cx, "source_ports") {
        match super::reader::as_u32(cx, &path, v).map(u16::try_from) {
            Some(Ok(p)) => m.source_ports.push(p),
            Some(Err(_)) => cx.error(&path, "expected a port from 0 to 65535"),
            None => {}
        }
    }
    o.enumeration(
        cx,
        "source_type",
        &[("ANY", ())],
        &[
            (
                "SAME_IP_OR_LOOPBACK",
                "source_type matching is not supported",
            ),
            ("EXTERNAL", "source_type matching is not supported"),
        ],
    );
    for (path, n) in o.strings(cx, "server_names") {
        let n = n.to_ascii_lowercase();
        if n.is_empty()
            || (n.contains('*') && !(n.starts_with("*.") && n.matches('*').count() == 1))
        {
            cx.error(&path, "expected a host name or a *.suffix wildcard");
        } else {
            m.server_names.push(n);
        }
    }
    let tp_path = o.at("transport_protocol");
    if let Some(tp) = o.string(cx, "transport_protocol") {
        if tp == "tls" || tp == "raw_buffer" || tp.is_empty() {
            m.transport_protocol = tp;
        } else {
            cx.error(&tp_path, "expected tls or raw_buffer");
        }
    }
    m.application_protocols = o
        .strings(cx, "application_protocols")
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    o.finish(cx);
    m
}

fn cidr_list(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Vec<CidrRange> {
    let mut out = Vec::new();
    for (path, v) in o.list(cx, key) {
        let Some(mut c) = Obj::new(cx, path, v) else {
            continue;
        };
        let apath = c.at("address_prefix");
        let addr = c.req_string(cx, "address_prefix");
        let lpath = c.at("prefix_len");
        let len = c.u32(cx, "prefix_len").unwrap_or(0);
        c.finish(cx);
        let Some(addr) = addr else { continue };
        match addr.parse::<IpAddr>() {
            Ok(ip) => {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                if len > max {
                    cx.error(&lpath, format!("must be at most {max}"));
                } else {
                    out.push(CidrRange {
                        address: ip,
                        prefix_len: len as u8,
                    });
                }
            }
            Err(_) => cx.error(&apath, format!("{addr:?} is not an IP address")),
        }
    }
    out
}
