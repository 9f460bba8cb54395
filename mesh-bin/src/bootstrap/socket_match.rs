//! A cluster's `transport_socket_matches` (Envoy
//! `config.cluster.v3.Cluster.TransportSocketMatch`): per-endpoint transport
//! sockets, as Istio's auto-mTLS uses them. Each entry's `transport_socket`
//! goes through the same loader as the cluster's own `transport_socket`.

use mesh_core::config::TransportSocketMatch;

use super::reader::{Ctx, Obj};

/// `transport_socket_matches`, and a refusal of the newer
/// `transport_socket_matcher` (a matcher tree, not supported).
pub(crate) fn transport_socket_matches(cx: &mut Ctx, o: &mut Obj<'_>) -> Vec<TransportSocketMatch> {
    o.refuse(
        cx,
        "transport_socket_matcher",
        "use transport_socket_matches (endpoint metadata matching)",
    );
    let mut out = Vec::new();
    for (path, v) in o.list(cx, "transport_socket_matches") {
        let Some(mut m) = Obj::new(cx, path, v) else {
            continue;
        };
        let name = m.string(cx, "name").unwrap_or_default();
        let labels = m
            .obj(cx, "match")
            .map(|s| super::lb::struct_values(cx, s))
            .unwrap_or_default();
        let socket_path = m.at("transport_socket");
        let tls = match m.obj(cx, "transport_socket") {
            Some(t) => super::tls::upstream_socket(cx, t),
            None => {
                if !m.has("transport_socket") {
                    cx.missing(&socket_path);
                }
                None
            }
        };
        m.finish(cx);
        out.push(TransportSocketMatch { name, labels, tls });
    }
    out
}

#[cfg(test)]
mod tests {
    use mesh_core::config::tls::{SanType, ValidationSource};
    use mesh_core::config::{MetadataValue, TransportSocketMatch};
    use mesh_xds::convert::{any_to_json, json_to_any};
    use mesh_xds::types;
    use serde_json::{json, Value};

    use crate::bootstrap::{cluster_from_json, endpoints_from_json, load_str};
    use crate::tls::xds_secrets;

    /// The fixture the end-to-end suite serves over CDS.
    const ISTIO_CLUSTER: &str = include_str!("../../../tests/fixtures/istio_outbound_cluster.json");

    fn over_xds(type_url: &str, v: Value) -> Value {
        any_to_json(&json_to_any(type_url, &v).unwrap()).unwrap()
    }

    fn errors(text: &str) -> Vec<String> {
        load_str(text)
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    /// Istio's outbound cluster, as `istioctl proxy-config cluster -o json`
    /// prints it, is accepted whole over CDS: mTLS for `tlsMode: istio`
    /// endpoints with its SDS secrets, plain text for the others.
    #[test]
    fn istio_outbound_cluster_loads_whole() {
        let v: Value = serde_json::from_str(ISTIO_CLUSTER).unwrap();
        let c = cluster_from_json(&over_xds(types::CLUSTER, v)).unwrap();
        let [istio, disabled] = &c.transport_socket_matches[..] else {
            panic!("two matches: {:?}", c.transport_socket_matches);
        };
        assert_eq!(istio.name, "tlsMode-istio");
        assert_eq!(
            istio.labels.get("tlsMode"),
            Some(&MetadataValue::from("istio"))
        );
        let tls = istio.tls.as_ref().unwrap();
        assert_eq!(
            tls.sni.as_deref(),
            Some("outbound_.9080_._.reviews.default.svc.cluster.local")
        );
        let names: Vec<String> = xds_secrets(&tls.common)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["default", "ROOTCA"]);
        assert_eq!(
            disabled,
            &TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                labels: Default::default(),
                tls: None,
            }
        );
        assert!(c.tls.is_none());
        assert_eq!(c.tls_contexts().count(), 1);
    }

    /// Istio's endpoints carry the label on each `lb_endpoint`.
    #[test]
    fn eds_endpoint_and_locality_metadata() {
        let cla = json!({
            "clusterName": "outbound|9080||reviews.default.svc.cluster.local",
            "endpoints": [{
                "locality": {"region": "r", "zone": "z"},
                "metadata": {"filterMetadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}},
                "lbEndpoints": [{
                    "endpoint": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 9080}}},
                    "metadata": {"filterMetadata": {
                        "envoy.transport_socket_match": {"tlsMode": "istio"},
                        "istio": {"workload": "reviews-v1;default;reviews;v1;cluster"}}},
                    "loadBalancingWeight": 1
                }]
            }]
        });
        let (_, l) = endpoints_from_json(&over_xds(types::ENDPOINT, cla)).unwrap();
        let istio = MetadataValue::from("istio");
        assert_eq!(l[0].socket_match.get("tlsMode"), Some(&istio));
        assert_eq!(
            l[0].lb_endpoints[0].socket_match.get("tlsMode"),
            Some(&istio)
        );
        assert!(l[0].lb_endpoints[0].metadata.is_empty());
    }

    /// Older Istio releases print the deprecated `match_subject_alt_names`:
    /// any SAN of any type may satisfy it.
    #[test]
    fn deprecated_subject_alt_names_match_any_san_type() {
        let v = json!({"name": "c", "type": "EDS", "transport_socket_matches": [{
            "name": "m", "match": {"tlsMode": "istio"},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"validation_context": {
                    "match_subject_alt_names": [{"exact": "spiffe://cluster.local/ns/default/sa/r"}]}}}}}]});
        let c = cluster_from_json(&over_xds(types::CLUSTER, v)).unwrap();
        let tls = c.transport_socket_matches[0].tls.as_ref().unwrap();
        let Some(ValidationSource::Static(vc)) = &tls.common.validation else {
            panic!("{:?}", tls.common.validation);
        };
        let types: Vec<SanType> = vc
            .match_typed_subject_alt_names
            .iter()
            .map(|m| m.san_type)
            .collect();
        assert_eq!(
            types,
            [
                SanType::Dns,
                SanType::Uri,
                SanType::Email,
                SanType::IpAddress
            ]
        );
    }

    #[test]
    fn bad_matches_are_refused_by_path() {
        let cluster = |extra: &str| {
            format!(
                r#"
static_resources:
  clusters:
  - name: c
    type: STATIC
    load_assignment:
      cluster_name: c
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]
{extra}"#
            )
        };
        let errs = errors(&cluster(
            "    transport_socket_matches:\n    - name: m\n      match: {tlsMode: istio}\n",
        ));
        assert_eq!(
            errs,
            ["static_resources.clusters[0].transport_socket_matches[0].transport_socket: missing required field"]
        );
        let errs = errors(&cluster(
            "    transport_socket_matches:\n    - name: m\n      match: {tlsMode: [a]}\n      transport_socket: {name: envoy.transport_sockets.raw_buffer}\n",
        ));
        assert!(
            errs.len() == 1 && errs[0].contains("transport_socket_matches[0].match.tlsMode"),
            "{errs:?}"
        );
        let errs = errors(&cluster(
            "    transport_socket_matches:\n    - name: m\n      transport_socket: {name: envoy.transport_sockets.quic}\n",
        ));
        assert!(
            errs.len() == 1
                && errs[0].starts_with("unsupported: static_resources.clusters[0].transport_socket_matches[0].transport_socket"),
            "{errs:?}"
        );
        let errs = errors(&cluster("    transport_socket_matcher: {}\n"));
        assert!(
            errs.len() == 1
                && errs[0].starts_with(
                    "unsupported: static_resources.clusters[0].transport_socket_matcher"
                ),
            "{errs:?}"
        );
    }
}
