//! Istio's own extensions in listeners and clusters (`istio.alpn`,
//! `istio.metadata_exchange`, `istio.stats`) and the `TypedStruct` wrapper
//! istiod puts some of them in. Each typed config is read field by field
//! like Envoy's, so a field Istio's proto does not have is refused with its
//! path. The model is `mesh_core::config::istio`.

use std::sync::OnceLock;

use mesh_core::config::istio::{
    AlpnOverride, IstioHeaders, IstioService, MetricOverride, PeerDiscovery, PeerMetadata, Stats,
    StatsReporter, TcpMetadataExchange, UpstreamProtocol,
};
use mesh_core::config::HttpFilter;
use serde_json::Value;

use super::reader::{one_of, Ctx, Obj};

/// `istio.alpn`'s `@type`.
pub(crate) const ALPN_TYPE: &str =
    "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig";
/// The HTTP `istio.metadata_exchange`'s `@type` (Istio 1.19 on).
pub(crate) const PEER_METADATA_TYPE: &str =
    "type.googleapis.com/io.istio.http.peer_metadata.Config";
/// The network and cluster `istio.metadata_exchange`'s `@type`.
pub(crate) const TCP_MX_TYPE: &str =
    "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange";
/// `istio.stats`'s `@type` (HTTP and network filter).
pub(crate) const STATS_TYPE: &str = "type.googleapis.com/stats.PluginConfig";

const TYPED_STRUCTS: &[&str] = &[
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];

/// Unwraps a `TypedStruct` typed config (`{"@type": ".../TypedStruct",
/// "type_url": T, "value": {...}}`) into its `value` and type `T`, as
/// Envoy looks extensions up by the inner type URL. Anything else is
/// returned as it is. `None` when the wrapper itself is malformed (reported).
pub(crate) fn typed_struct<'a>(
    cx: &mut Ctx,
    mut tc: Obj<'a>,
    ty: String,
    ty_path: String,
) -> Option<(Obj<'a>, String, String)> {
    if !TYPED_STRUCTS.contains(&ty.as_str()) {
        return Some((tc, ty, ty_path));
    }
    let inner_path = tc.at("type_url");
    let inner = tc.req_string(cx, "type_url");
    let value_path = tc.at("value");
    let value = match tc.take("value") {
        Some(v) => Obj::new(cx, value_path, v),
        None => Obj::new(cx, value_path, empty_map()),
    };
    tc.finish(cx);
    Some((value?, inner?, inner_path))
}

fn empty_map() -> &'static Value {
    static EMPTY: OnceLock<Value> = OnceLock::new();
    EMPTY.get_or_init(|| Value::Object(Default::default()))
}

/// `istio.alpn`'s `FilterConfig`.
pub(crate) fn alpn(cx: &mut Ctx, mut o: Obj<'_>) -> AlpnOverride {
    let mut out = AlpnOverride::default();
    for (path, v) in o.list(cx, "alpn_override") {
        let Some(mut e) = Obj::new(cx, path, v) else {
            continue;
        };
        let protocol = e
            .enumeration(
                cx,
                "upstream_protocol",
                &[
                    ("HTTP10", UpstreamProtocol::Http10),
                    ("HTTP11", UpstreamProtocol::Http11),
                    ("HTTP2", UpstreamProtocol::Http2),
                ],
                &[],
            )
            .or_else(|| (!e.has("upstream_protocol")).then_some(UpstreamProtocol::Http10));
        let list: Vec<String> = e
            .strings(cx, "alpn_override")
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        e.finish(cx);
        if let Some(p) = protocol {
            out.overrides.push((p, list));
        }
    }
    o.finish(cx);
    out
}

/// The HTTP `istio.metadata_exchange`'s `io.istio.http.peer_metadata.Config`.
pub(crate) fn peer_metadata(cx: &mut Ctx, mut o: Obj<'_>) -> PeerMetadata {
    let downstream_discovery = discovery(cx, &mut o, "downstream_discovery");
    let upstream_discovery = discovery(cx, &mut o, "upstream_discovery");
    let downstream_propagation = propagation(cx, &mut o, "downstream_propagation");
    let upstream_propagation = propagation(cx, &mut o, "upstream_propagation");
    let shared_with_upstream = o.bool(cx, "shared_with_upstream").unwrap_or(false);
    let additional_labels = o
        .strings(cx, "additional_labels")
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    o.finish(cx);
    PeerMetadata {
        downstream_discovery,
        upstream_discovery,
        downstream_propagation,
        upstream_propagation,
        shared_with_upstream,
        additional_labels,
    }
}

fn istio_headers(cx: &mut Ctx, mut o: Obj<'_>) -> IstioHeaders {
    let path = o.at("skip_external_clusters");
    let skip_external_clusters = o.bool(cx, "skip_external_clusters").unwrap_or(false);
    if skip_external_clusters {
        cx.unsupported(
            &path,
            Some("leaving out the headers to clusters outside the mesh is not implemented yet"),
        );
    }
    o.finish(cx);
    IstioHeaders {
        skip_external_clusters,
    }
}

fn discovery(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Vec<PeerDiscovery> {
    let mut out = Vec::new();
    for (path, v) in o.list(cx, key) {
        let Some(mut m) = Obj::new(cx, path, v) else {
            continue;
        };
        let keys = ["istio_headers", "workload_discovery", "baggage"];
        match one_of(cx, &m, &keys, true) {
            Some("istio_headers") => {
                if let Some(h) = m.obj(cx, "istio_headers") {
                    // Only the propagation side reads skip_external_clusters.
                    istio_headers(cx, h);
                }
                out.push(PeerDiscovery::IstioHeaders);
            }
            Some("workload_discovery") => {
                m.empty_obj(cx, "workload_discovery");
                out.push(PeerDiscovery::WorkloadDiscovery);
            }
            Some(_) => {
                m.empty_obj(cx, "baggage");
                out.push(PeerDiscovery::Baggage);
            }
            None => {}
        }
        m.finish(cx);
    }
    out
}

fn propagation(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Option<IstioHeaders> {
    let mut out = None;
    for (path, v) in o.list(cx, key) {
        let Some(mut m) = Obj::new(cx, path, v) else {
            continue;
        };
        if one_of(cx, &m, &["istio_headers"], true).is_some() {
            if let Some(h) = m.obj(cx, "istio_headers") {
                out = Some(istio_headers(cx, h));
            }
        }
        m.finish(cx);
    }
    out
}

/// The network/cluster `istio.metadata_exchange`'s `MetadataExchange`.
pub(crate) fn tcp_metadata_exchange(cx: &mut Ctx, mut o: Obj<'_>) -> TcpMetadataExchange {
    let protocol = o.string(cx, "protocol").unwrap_or_default();
    let enable_discovery = o.bool(cx, "enable_discovery").unwrap_or(false);
    let additional_labels = o
        .strings(cx, "additional_labels")
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    o.finish(cx);
    TcpMetadataExchange {
        protocol,
        enable_discovery,
        additional_labels,
    }
}

/// `istio.stats`'s `stats.PluginConfig`.
pub(crate) fn stats(cx: &mut Ctx, mut o: Obj<'_>) -> Stats {
    let disable_host_header_fallback = o.bool(cx, "disable_host_header_fallback").unwrap_or(false);
    let tcp_reporting_duration = o.duration(cx, "tcp_reporting_duration");
    let rescoping_duration = o.duration(cx, "rescoping_duration");
    let scope_grace_period_duration = o.duration(cx, "scope_grace_period_duration");
    let reporter = o
        .enumeration(
            cx,
            "reporter",
            &[
                ("UNSPECIFIED", StatsReporter::Unspecified),
                ("SERVER_GATEWAY", StatsReporter::ServerGateway),
            ],
            &[],
        )
        .unwrap_or_default();
    let mut metrics = Vec::new();
    let metrics_path = o.at("metrics");
    for (path, v) in o.list(cx, "metrics") {
        let Some(mut m) = Obj::new(cx, path, v) else {
            continue;
        };
        let name = m.string(cx, "name").unwrap_or_default();
        let mut dimensions = Vec::new();
        if let Some(mut d) = m.obj(cx, "dimensions") {
            for (k, p, v) in d.take_all() {
                if let Some(s) = super::reader::as_str(cx, &p, v) {
                    dimensions.push((k.to_owned(), s));
                }
            }
        }
        let tags_to_remove = m
            .strings(cx, "tags_to_remove")
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        m.refuse(cx, "match", "not implemented in Istio either");
        let drop = m.bool(cx, "drop").unwrap_or(false);
        m.finish(cx);
        metrics.push(MetricOverride {
            name,
            dimensions,
            tags_to_remove,
            drop,
        });
    }
    if !metrics.is_empty() {
        // istiod sends none by default; tag overrides need CEL values.
        cx.unsupported(
            &metrics_path,
            Some("istio.stats: metric overrides (tag changes, drops) are not implemented yet"),
        );
    }
    o.empty_list(cx, "definitions", "custom metric definitions (CEL values)");
    o.finish(cx);
    Stats {
        disable_host_header_fallback,
        tcp_reporting_duration,
        metrics,
        reporter,
        rescoping_duration,
        scope_grace_period_duration,
        traffic_direction: Default::default(),
    }
}

/// The first of istiod's `filter_metadata.istio.services` in a cluster's
/// `metadata` (read again, leniently, by the metadata loader).
pub(crate) fn cluster_service(metadata: &Value) -> Option<IstioService> {
    let s = metadata
        .get("filter_metadata")?
        .get("istio")?
        .get("services")?
        .get(0)?;
    let field = |k: &str| {
        s.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    Some(IstioService {
        host: field("host"),
        name: field("name"),
        namespace: field("namespace"),
    })
}

/// Tells the `istio.stats` HTTP filters of a listener's chains the
/// listener's `traffic_direction` (their reporter depends on it).
pub(crate) fn set_stats_direction(
    chains: &mut [mesh_core::config::FilterChain],
    direction: mesh_core::config::TrafficDirection,
) {
    for chain in chains {
        if let mesh_core::config::NetworkFilter::HttpConnectionManager(hcm) = &mut chain.terminal {
            for f in &mut hcm.http_filters {
                if let HttpFilter::IstioStats(s) = f {
                    s.traffic_direction = direction;
                }
            }
        }
        if let mesh_core::config::NetworkFilter::TcpProxy(t) = &mut chain.terminal {
            if let Some(s) = &mut t.istio_stats {
                s.traffic_direction = direction;
            }
        }
    }
}

/// An Istio HTTP filter (`what` is its canonical name): its typed config is
/// read and checked.
pub(crate) fn http_filter(cx: &mut Ctx, what: &str, tc: Obj<'_>) -> Option<HttpFilter> {
    Some(match what {
        "istio.alpn" => HttpFilter::IstioAlpn(Box::new(alpn(cx, tc))),
        "istio.metadata_exchange" => HttpFilter::IstioPeerMetadata(Box::new(peer_metadata(cx, tc))),
        _ => HttpFilter::IstioStats(Box::new(stats(cx, tc))),
    })
}

/// An Istio network filter's config, read and checked.
pub(crate) enum IstioNetwork {
    /// `istio.metadata_exchange`.
    Mx(TcpMetadataExchange),
    /// `istio.stats`.
    Stats(Stats),
}

/// An Istio network filter before the terminal one, or a cluster's
/// upstream filter (`istio.metadata_exchange`, `istio.stats`; `what` is
/// its canonical name).
pub(crate) fn network_filter(cx: &mut Ctx, what: &str, tc: Obj<'_>) -> IstioNetwork {
    match what {
        "istio.metadata_exchange" => IstioNetwork::Mx(tcp_metadata_exchange(cx, tc)),
        _ => IstioNetwork::Stats(stats(cx, tc)),
    }
}

/// A cluster's `filters` (upstream network filters): istiod puts
/// `istio.metadata_exchange` there; any other filter is unsupported.
pub(crate) fn cluster_filters(cx: &mut Ctx, o: &mut Obj<'_>) -> Option<TcpMetadataExchange> {
    let mut out = None;
    const KNOWN: &[super::Known] = &[super::Known {
        name: "istio.metadata_exchange",
        type_url: TCP_MX_TYPE,
    }];
    for (path, v) in o.list(cx, "filters") {
        let Some(mut f) = Obj::new(cx, path, v) else {
            continue;
        };
        match super::select_extension(cx, &mut f, "upstream network filter", KNOWN) {
            Some((_, Some(tc))) => out = Some(tcp_metadata_exchange(cx, tc)),
            Some((_, None)) => cx.missing(&f.at("typed_config")),
            None => {}
        }
        f.finish(cx);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{cluster_from_json, listener_from_json, load_str};
    use mesh_xds::convert::{any_to_json, json_to_any};
    use mesh_xds::types;
    use serde_json::Value;

    static FIXTURE: &str = include_str!("../../../tests/fixtures/istiod_sidecar.json");

    fn over_xds(type_url: &str, v: &Value) -> Value {
        any_to_json(&json_to_any(type_url, v).unwrap()).unwrap()
    }

    fn errors<T>(r: Result<T, crate::bootstrap::ConfigErrors>) -> Vec<String> {
        match r {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// istiod's untrimmed sidecar LDS/CDS decodes over xDS (Istio's
    /// descriptors, TypedStruct unwrapped), every field is read and
    /// nothing is refused (the network `istio.stats` included).
    #[test]
    fn istiod_fixture_decodes_and_nothing_is_refused() {
        let doc: Value = serde_json::from_str(FIXTURE).unwrap();
        let mut all = Vec::new();
        for l in doc["listeners"].as_array().unwrap() {
            let name = l["name"].as_str().unwrap();
            for e in errors(listener_from_json(&over_xds(types::LISTENER, l))) {
                all.push(format!("{name}: {e}"));
            }
        }
        for c in doc["clusters"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            for e in errors(cluster_from_json(&over_xds(types::CLUSTER, c))) {
                all.push(format!("{name}: {e}"));
            }
        }
        assert_eq!(all, Vec::<String>::new());
    }

    /// `istio.stats` learns its listener's direction (its reporter), and
    /// istiod's cluster metadata names the destination service.
    #[test]
    fn istio_stats_direction_and_cluster_service() {
        let b = load_str(
            r#"
static_resources:
  listeners:
  - name: l
    traffic_direction: INBOUND
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          route_config: {virtual_hosts: [{name: a, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: c}}]}]}
          http_filters:
          - name: istio.stats
            typed_config:
              "@type": type.googleapis.com/stats.PluginConfig
              disable_host_header_fallback: true
          - name: envoy.filters.http.router
  clusters:
  - name: c
    load_assignment: {cluster_name: c, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}]}]}
    metadata: {filter_metadata: {istio: {services: [{host: r.d.svc.cluster.local, name: r, namespace: d}]}}}
"#,
        )
        .unwrap();
        let mesh_core::config::NetworkFilter::HttpConnectionManager(h) =
            &b.listeners[0].filter_chains[0].terminal
        else {
            panic!("expected an HCM");
        };
        let Some(mesh_core::config::HttpFilter::IstioStats(s)) = h.http_filters.first() else {
            panic!("expected istio.stats: {:?}", h.http_filters);
        };
        assert_eq!(
            s.traffic_direction,
            mesh_core::config::TrafficDirection::Inbound
        );
        assert!(s.disable_host_header_fallback);
        let svc = b.clusters[0].istio_service.as_ref().unwrap();
        assert_eq!(
            (svc.host.as_str(), svc.name.as_str(), svc.namespace.as_str()),
            ("r.d.svc.cluster.local", "r", "d")
        );
    }

    /// The network `istio.stats` goes with the `tcp_proxy` after it and
    /// learns the listener's direction; before another terminal filter it
    /// is refused by path.
    #[test]
    fn network_istio_stats_goes_with_tcp_proxy_only() {
        let config = |terminal: &str| {
            format!(
                r#"
static_resources:
  listeners:
  - name: l
    traffic_direction: OUTBOUND
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: istio.stats
        typed_config:
          "@type": type.googleapis.com/stats.PluginConfig
          tcp_reporting_duration: 2s
      {terminal}
  clusters:
  - name: c
    load_assignment: {{cluster_name: c, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]}}
"#
            )
        };
        let tcp = "- name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c";
        let b = load_str(&config(tcp)).unwrap();
        let mesh_core::config::NetworkFilter::TcpProxy(t) =
            &b.listeners[0].filter_chains[0].terminal
        else {
            panic!("expected a tcp_proxy");
        };
        let s = t
            .istio_stats
            .as_ref()
            .expect("istio.stats on the tcp_proxy");
        assert_eq!(
            s.traffic_direction,
            mesh_core::config::TrafficDirection::Outbound
        );
        assert_eq!(
            s.tcp_reporting_duration,
            Some(std::time::Duration::from_secs(2))
        );
        let hcm = "- name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: h
          route_config: {virtual_hosts: [{name: a, domains: [\"*\"], routes: [{match: {prefix: /}, route: {cluster: c}}]}]}
          http_filters: [{name: envoy.filters.http.router, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]";
        let errs = errors(load_str(&config(hcm)));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("filter_chains[0].filters[0]")
                && errs[0].contains("istio.stats runs before envoy.filters.network.tcp_proxy only"),
            "{errs:?}"
        );
    }

    /// A field Istio's protos do not have is refused with its path, inside
    /// a TypedStruct too; the TypedStruct itself needs its `type_url`.
    #[test]
    fn unknown_fields_of_istio_configs_are_named() {
        let errs = errors(load_str(
            r#"
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: istio.metadata_exchange
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange
          value: {protocol: istio-peer-exchange, bogus: 1}
      - name: istio.stats
        typed_config:
          "@type": type.googleapis.com/xds.type.v3.TypedStruct
          value: {}
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c
  clusters:
  - name: c
    connect_timeout: 1s
    filters:
    - name: istio.alpn
      typed_config:
        "@type": type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig
"#,
        ));
        let has = |s: &str| errs.iter().any(|e| e.contains(s));
        assert!(
            has("static_resources.listeners[0].filter_chains[0].filters[0].typed_config.value.bogus"),
            "{errs:#?}"
        );
        assert!(
            has("static_resources.listeners[0].filter_chains[0].filters[1].typed_config.type_url: missing required field"),
            "{errs:#?}"
        );
        assert!(
            has("static_resources.clusters[0].filters[0] (upstream network filter istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig)"),
            "{errs:#?}"
        );
    }
}
