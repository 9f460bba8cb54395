//! Loader tests for TLS transport sockets, filter chain matching, secrets
//! and RBAC: what is read, and what is refused with which path.

use mesh_core::config::rbac::{Permission, Principal, RbacAction};
use mesh_core::config::tls::{DataSource, SdsSource, SecretKind, TlsVersion, ValidationSource};
use mesh_core::config::HttpFilter;

use super::{load_str, parse_sds_file};

fn config(chain_extra: &str, cluster_extra: &str, top_extra: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c
{chain_extra}
  clusters:
  - name: c
    load_assignment:
      cluster_name: c
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]
{cluster_extra}
{top_extra}
"#
    )
}

const TS: &str = r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_params: {tls_minimum_protocol_version: TLSv1_3, cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256]}
            tls_certificate_sds_secret_configs:
            - name: server
              sds_config: {path_config_source: {path: /etc/sds.yaml}, resource_api_version: V3}
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names:
                - san_type: URI
                  matcher: {prefix: "spiffe://cluster.local/"}
              validation_context_sds_secret_config: {name: ca}
      transport_socket_connect_timeout: 2s
      filter_chain_match:
        server_names: ["*.example.com", API.example.com]
        transport_protocol: tls
        source_prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]"#;

const CA_SECRET: &str = r#"  secrets:
  - name: ca
    validation_context: {trusted_ca: {inline_string: "PEM"}}"#;

fn errors(text: &str) -> Vec<String> {
    match load_str(text) {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn downstream_tls_context_and_match_are_read() {
    let b = load_str(&config(TS, "", CA_SECRET)).unwrap();
    let chain = &b.listeners[0].filter_chains[0];
    let tls = chain.tls.as_ref().unwrap();
    assert!(tls.require_client_certificate);
    assert_eq!(tls.common.alpn_protocols, vec!["h2", "http/1.1"]);
    assert_eq!(tls.common.tls_params.min_version, TlsVersion::V1_3);
    assert_eq!(
        tls.common.tls_certificate_sds[0].source,
        SdsSource::Path("/etc/sds.yaml".into())
    );
    match &tls.common.validation {
        Some(ValidationSource::Combined { default, sds }) => {
            assert_eq!(default.match_typed_subject_alt_names.len(), 1);
            assert_eq!((sds.name.as_str(), &sds.source), ("ca", &SdsSource::Static));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        chain.handshake_timeout,
        Some(std::time::Duration::from_secs(2))
    );
    let m = &chain.filter_chain_match;
    assert_eq!(m.server_names, vec!["*.example.com", "api.example.com"]);
    assert_eq!(m.transport_protocol, "tls");
    assert_eq!(m.source_prefix_ranges[0].prefix_len, 8);
    assert_eq!(b.secrets[0].name, "ca");
    assert!(
        matches!(&b.secrets[0].kind, SecretKind::ValidationContext(v)
        if v.trusted_ca == Some(DataSource::Inline(b"PEM".to_vec())))
    );
}

#[test]
fn tls_refusals_name_their_field() {
    let bad = TS
        .replace("ECDHE-RSA-AES128-GCM-SHA256", "AES128-SHA")
        .replace(
            "tls_minimum_protocol_version: TLSv1_3",
            "tls_maximum_protocol_version: TLSv1_1",
        )
        .replace(
            "resource_api_version: V3",
            "resource_api_version: V3, api_config_source: {}",
        )
        .replace("\"*.example.com\"", "\"a.*.com\"");
    let errs = errors(&config(&bad, "", ""));
    let chain = "static_resources.listeners[0].filter_chains[0]";
    let ctx = format!("{chain}.transport_socket.typed_config.common_tls_context");
    for want in [
        format!("unsupported: {ctx}.tls_params.tls_maximum_protocol_version (TLSv1_1: rustls implements TLS 1.2 and 1.3 only)"),
        format!("{chain}.filter_chain_match.server_names[0]: expected a host name or a *.suffix wildcard"),
        format!("{ctx}.combined_validation_context.validation_context_sds_secret_config.name: unknown secret \"ca\" (no sds_config, and not in static_resources.secrets)"),
    ] {
        assert!(errs.contains(&want), "{want}\nnot in\n{errs:#?}");
    }
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("unsupported: {ctx}.tls_params.cipher_suites[0]"))),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.contains("api_config_source")),
        "{errs:#?}"
    );
}

#[test]
fn duplicate_chain_matches_are_refused() {
    let chain = r#"    - filter_chain_match: {server_names: [a.com]}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c"#;
    let text = config(&format!("{chain}\n{chain}"), "", "");
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.ends_with("filter_chain_match is the same as filter_chains[1]'s")),
        "{errs:#?}"
    );
}

#[test]
fn upstream_tls_and_sds_files() {
    let cluster = r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: api.internal
        common_tls_context:
          tls_certificates: [{certificate_chain: {filename: /c.pem}, private_key: {filename: /k.pem}}]"#;
    let b = load_str(&config("", cluster, "")).unwrap();
    let t = b.clusters[0].tls.as_ref().unwrap();
    assert_eq!(t.sni.as_deref(), Some("api.internal"));
    assert_eq!(
        t.common.tls_certificates[0].certificate_chain,
        DataSource::Filename("/c.pem".into())
    );
    let secrets = parse_sds_file(
        br#"
version_info: "1"
resources:
- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
  name: server
  tls_certificate: {certificate_chain: {filename: /c.pem}, private_key: {inline_string: KEY}}
"#,
    )
    .unwrap();
    assert_eq!(secrets[0].name, "server");
    let err = parse_sds_file(b"resources: [{name: x, tls_certificate: {}, bogus: 1}]").unwrap_err();
    assert!(err.contains("resources[0].bogus"), "{err}");
    assert!(
        err.contains("certificate_chain: missing required field"),
        "{err}"
    );
}

#[test]
fn rbac_filters_are_read() {
    let hcm_chain = r#"    - filters:
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: net
          rules:
            action: DENY
            policies:
              p: {permissions: [{destination_port: 9}], principals: [{not_id: {authenticated: {}}}]}
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: h
          route_config: {virtual_hosts: [{name: v, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: c}}]}]}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                policies:
                  q:
                    permissions: [{url_path: {path: {prefix: /api}}}]
                    principals: [{authenticated: {principal_name: {exact: "spiffe://x"}}}]
              shadow_rules: {action: LOG, policies: {}}
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
      filter_chain_match: {destination_port: 8080}"#;
    let b = load_str(&config(hcm_chain, "", "")).unwrap();
    let chain = &b.listeners[0].filter_chains[1];
    let net = chain.rbac.as_ref().unwrap();
    assert_eq!(net.stat_prefix, "net");
    let rules = net.rules.as_ref().unwrap();
    assert_eq!(rules.action, RbacAction::Deny);
    assert_eq!(
        rules.policies[0].1.permissions,
        vec![Permission::DestinationPort(9)]
    );
    assert!(
        matches!(&rules.policies[0].1.principals[0], Principal::Not(p)
        if **p == Principal::Authenticated(None))
    );
    let mesh_core::config::NetworkFilter::HttpConnectionManager(hcm) = &chain.terminal else {
        panic!("not an HCM");
    };
    assert!(matches!(&hcm.http_filters[0], HttpFilter::Rbac(r)
        if r.rules.as_ref().is_some_and(|r| r.action == RbacAction::Allow)
            && r.shadow_rules.as_ref().is_some_and(|r| r.action == RbacAction::Log)));

    let bad = hcm_chain.replace(
        "principals: [{not_id: {authenticated: {}}}]",
        "principals: []",
    );
    let errs = errors(&config(&bad, "", ""));
    assert!(
        errs.iter().any(|e| e.ends_with("rules.policies.p.principals: at least one principal is required")),
        "{errs:#?}"
    );
}
