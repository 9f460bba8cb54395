//! `envoy.filters.http.grpc_stats`: fields and the errors for bad ones.

use mesh_core::config::grpc_stats::{GrpcStats, MethodStats};

use super::*;

const TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";

fn with_filter(tc: Value) -> Value {
    let mut v = bench();
    let h = hcm_json(&mut v);
    let router = h["http_filters"][0].clone();
    h["http_filters"] =
        json!([{"name": "envoy.filters.http.grpc_stats", "typed_config": tc}, router]);
    v
}

fn loaded(tc: Value) -> GrpcStats {
    match &hcm_of(&ok(&with_filter(tc))).http_filters[0] {
        HttpFilter::GrpcStats(c) => (**c).clone(),
        other => panic!("expected grpc_stats, got {other:?}"),
    }
}

#[test]
fn istiod_and_allowlist_configs() {
    let c =
        loaded(json!({"@type": TYPE, "emit_filter_state": true, "stats_for_all_methods": false}));
    assert!(c.emit_filter_state);
    assert_eq!(c.methods, MethodStats::None);
    let c = loaded(json!({"@type": TYPE, "stats_for_all_methods": true,
        "replace_dots_in_grpc_service_name": true}));
    assert_eq!(c.methods, MethodStats::All);
    assert!(c.replace_dots_in_grpc_service_name);
    let c = loaded(
        json!({"@type": TYPE, "individual_method_stats_allowlist": {"services": [
        {"name": "a.S", "method_names": ["M", "N"]}]}}),
    );
    assert_eq!(
        c.methods,
        MethodStats::Allowlist(vec![("a.S".into(), "M".into()), ("a.S".into(), "N".into())])
    );
}

#[test]
fn bad_fields_named_by_path() {
    let tc = format!("{HCM_PATH}.http_filters[0].typed_config");
    let v = with_filter(json!({"@type": TYPE, "stats_for_all_methods": true,
        "individual_method_stats_allowlist": {}, "emit_filter_state": "yes", "bogus": 1}));
    assert_eq!(
        errs(&v),
        vec![
            format!("{tc}.emit_filter_state: expected a boolean, found a string"),
            format!("{tc}: only one of stats_for_all_methods, individual_method_stats_allowlist may be set"),
            format!("unsupported: {tc}.bogus"),
        ]
    );
    let v = with_filter(json!({"@type": TYPE, "enable_upstream_stats": true,
        "individual_method_stats_allowlist": {"services": [{"name": "S"}, {"method_names": ["M"], "x": 1}]}}));
    let list = format!("{tc}.individual_method_stats_allowlist.services");
    assert_eq!(
        errs(&v),
        vec![
            format!(
                "unsupported: {tc}.enable_upstream_stats (upstream gRPC request time histograms)"
            ),
            format!("{list}[0].method_names: at least one method name is required"),
            format!("{list}[1].name: missing required field"),
            format!("unsupported: {list}[1].x"),
        ]
    );
}

/// istiod's filter, as it arrives in an LDS listener (protobuf, then proto3
/// JSON), is accepted.
#[test]
fn istiod_filter_over_lds() {
    use mesh_xds::convert::{any_to_json, json_to_any};
    let listener = json!({
        "name": "l",
        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 15001}},
        "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "statPrefix": "s",
            "routeConfig": {"virtualHosts": [{"name": "v", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]},
            "httpFilters": [
                {"name": "envoy.filters.http.grpc_stats", "typedConfig": {"@type": TYPE,
                    "emitFilterState": true, "statsForAllMethods": false}},
                {"name": "envoy.filters.http.router", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
        }}]}]
    });
    let ty = mesh_xds::types::LISTENER;
    let v = any_to_json(&json_to_any(ty, &listener).expect("encodes")).expect("decodes");
    let l = crate::bootstrap::xds::listener_from_json(&v).expect("accepted");
    let NetworkFilter::HttpConnectionManager(h) = &l.filter_chains[0].terminal else {
        panic!("expected an HCM");
    };
    assert_eq!(
        h.http_filters[0],
        HttpFilter::GrpcStats(Box::new(GrpcStats {
            emit_filter_state: true,
            ..GrpcStats::default()
        }))
    );
}
