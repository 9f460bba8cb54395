//! The RPC proxy filters in the bootstrap loader: Envoy's thrift_proxy and
//! dubbo_proxy and mesh's rpc_proxy become route configurations the HTTP
//! router matches; unsupported fields are refused by their path.

use mesh_bin::bootstrap::load_str;
use mesh_core::config::{HeaderMatchKind, NetworkFilter, RpcCodec, RpcProxy, ThriftProtocol};
use serde_json::{json, Value};

fn doc(filter: Value) -> String {
    json!({
        "static_resources": {
            "listeners": [{
                "name": "l",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [filter]}]
            }],
            "clusters": [
                {"name": "a", "load_assignment": {"cluster_name": "a", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]}},
                {"name": "b", "load_assignment": {"cluster_name": "b", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 2}}}}]}]}}
            ]
        }
    })
    .to_string()
}

fn rpc(filter: Value) -> RpcProxy {
    let b = load_str(&doc(filter)).unwrap_or_else(|e| panic!("{e}"));
    match &b.listeners[0].filter_chains[0].terminal {
        NetworkFilter::Rpc(r) => (**r).clone(),
        other => panic!("not an RPC filter: {other:?}"),
    }
}

fn errors(filter: Value) -> Vec<String> {
    match load_str(&doc(filter)) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

const BASE: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";

#[test]
fn thrift_proxy_routes_become_method_matchers() {
    let r = rpc(json!({
        "name": "envoy.filters.network.thrift_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy",
            "stat_prefix": "t",
            "transport": "FRAMED",
            "protocol": "COMPACT",
            "route_config": {"name": "r", "routes": [
                {"match": {"method_name": "add", "invert": true}, "route": {"cluster": "a"}},
                {"match": {"service_name": "Calc"}, "route": {"weighted_clusters": {"clusters": [
                    {"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}}}
            ]}
        }
    }));
    assert_eq!(
        r.codec,
        RpcCodec::Thrift {
            framed: Some(true),
            protocol: Some(ThriftProtocol::Compact),
            header: false,
            lowercase_header_keys: true,
        }
    );
    let routes = &r.route_config.virtual_hosts[0].routes;
    let m0 = &routes[0].matcher.headers[0];
    assert_eq!((m0.name.as_str(), m0.invert), (":method", true));
    assert_eq!(m0.kind, HeaderMatchKind::Exact("add".into()));
    assert_eq!(
        routes[1].matcher.headers[0].kind,
        HeaderMatchKind::Prefix("Calc:".into())
    );
}

#[test]
fn dubbo_interfaces_are_virtual_hosts_with_group_and_version() {
    let r = rpc(json!({
        "name": "envoy.filters.network.dubbo_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy",
            "stat_prefix": "d",
            "route_config": [
                {"name": "x", "interface": "com.example.*", "group": "g", "version": "1.0",
                 "routes": [{"match": {"method": {"name": {"exact": "m"}},
                                       "headers": [{"name": "k", "exact_match": "v"}]},
                             "route": {"cluster": "a"}}]}
            ]
        }
    }));
    assert_eq!(r.codec, RpcCodec::Dubbo);
    let vh = &r.route_config.virtual_hosts[0];
    assert_eq!(vh.domains, vec!["com.example.*".to_string()]);
    let names: Vec<&str> = vh.routes[0]
        .matcher
        .headers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(names, vec![":group", ":version", ":method", "k"]);
}

#[test]
fn thrift_proxy_takes_the_header_transport() {
    let r = rpc(json!({
        "name": "envoy.filters.network.thrift_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy",
            "stat_prefix": "t",
            "transport": "HEADER",
            "protocol": "AUTO_PROTOCOL",
            "header_keys_preserve_case": true,
            "route_config": {"routes": [
                {"match": {"method_name": "", "headers": [
                    {"name": "x-route", "string_match": {"exact": "b"}}]}, "route": {"cluster": "b"}}
            ]}
        }
    }));
    assert_eq!(
        r.codec,
        RpcCodec::Thrift {
            framed: None,
            protocol: None,
            header: true,
            lowercase_header_keys: false,
        }
    );
    let m = &r.route_config.virtual_hosts[0].routes[0].matcher.headers[0];
    assert_eq!(m.name, "x-route");
}

#[test]
fn unsupported_fields_are_refused_by_path() {
    let e = errors(json!({
        "name": "envoy.filters.network.thrift_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy",
            "stat_prefix": "t",
            "protocol": "TWITTER",
            "route_config": {"routes": [
                {"match": {"method_name": "x"}, "route": {"cluster": "a", "strip_service_name": true}}
            ]}
        }
    }));
    assert!(
        e.iter()
            .any(|m| m.starts_with(&format!("unsupported: {BASE}.protocol"))),
        "{e:?}"
    );
    assert!(
        e.iter().any(|m| m.starts_with(&format!(
            "unsupported: {BASE}.route_config.routes[0].route.strip_service_name"
        ))),
        "{e:?}"
    );
    let e = errors(json!({
        "name": "envoy.filters.network.dubbo_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy",
            "stat_prefix": "d",
            "route_config": [{"interface": "x", "routes": [
                {"match": {"method": {"name": {"exact": "m"}, "params_match": {"0": {"exact_match": "1"}}}},
                 "route": {"cluster": "nope"}}]}]
        }
    }));
    assert!(
        e.iter().any(|m| m.starts_with(&format!(
            "unsupported: {BASE}.route_config[0].routes[0].match.method.params_match"
        ))),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.contains("nope")), "{e:?}");
}

#[test]
fn generic_proxy_needs_a_known_codec() {
    let r = rpc(json!({
        "name": "mesh.filters.network.rpc_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/mesh.filters.network.rpc_proxy.v1.RpcProxy",
            "stat_prefix": "g",
            "codec": "bolt",
            "max_frame_size": 1024,
            "route_config": {"routes": [
                {"match": {"service": {"exact": "s"}, "method": {"prefix": "say"}},
                 "route": {"cluster": "a", "timeout": "1.5s"}}]}
        }
    }));
    assert_eq!(r.codec, RpcCodec::Bolt);
    assert_eq!(r.max_frame_size, 1024);
    let e = errors(json!({
        "name": "mesh.filters.network.rpc_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/mesh.filters.network.rpc_proxy.v1.RpcProxy",
            "stat_prefix": "g",
            "codec": "grpc",
            "route_config": {"routes": []}
        }
    }));
    assert!(
        e.iter().any(|m| m.starts_with(&format!("{BASE}.codec"))),
        "{e:?}"
    );
}

#[test]
fn thrift_mirror_policies_are_read_and_their_unknown_fields_refused() {
    let r = rpc(json!({
        "name": "envoy.filters.network.thrift_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy",
            "stat_prefix": "t",
            "route_config": {"routes": [
                {"match": {"method_name": ""}, "route": {"cluster": "a", "request_mirror_policies": [
                    {"cluster": "b"},
                    {"cluster": "a", "runtime_fraction": {"runtime_key": "k",
                        "default_value": {"numerator": 25, "denominator": "TEN_THOUSAND"}}}]}}
            ]}
        }
    }));
    let mirrors = &r.route_config.virtual_hosts[0].routes[0]
        .policy
        .request_mirror_policies;
    let got: Vec<_> = mirrors
        .iter()
        .map(|m| {
            (
                m.cluster.as_str(),
                m.fraction.numerator,
                m.fraction.denominator,
            )
        })
        .collect();
    assert_eq!(got, vec![("b", 100, 100), ("a", 25, 10_000)]);
    // Envoy's Thrift mirror policy has no shadow host suffix; an unknown
    // mirror cluster is refused like any other cluster reference.
    let e = errors(json!({
        "name": "mesh.filters.network.rpc_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/mesh.filters.network.rpc_proxy.v1.RpcProxy",
            "stat_prefix": "g",
            "codec": "dubbo",
            "route_config": {"routes": [
                {"match": {}, "route": {"cluster": "a", "request_mirror_policies": [
                    {"cluster": "b", "disable_shadow_host_suffix_append": true},
                    {"cluster": "nope"}]}}]}
        }
    }));
    assert!(
        e.iter().any(|m| m.starts_with(&format!(
            "unsupported: {BASE}.route_config.routes[0].route.request_mirror_policies[0].disable_shadow_host_suffix_append"
        ))),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.contains("nope")), "{e:?}");
}

#[test]
fn metadata_mutation_is_read_and_refused_for_thrift() {
    let filter = |codec: &str| {
        json!({
            "name": "mesh.filters.network.rpc_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/mesh.filters.network.rpc_proxy.v1.RpcProxy",
                "stat_prefix": "g",
                "codec": codec,
                "route_config": {"routes": [{"match": {}, "route": {"cluster": "a",
                    "metadata_mutation": {"set": [{"key": "x-Env", "value": "canary"}],
                                          "remove": ["x-debug"]}}}]}
            }
        })
    };
    let r = rpc(filter("dubbo"));
    let m = &r.route_config.virtual_hosts[0].routes[0]
        .policy
        .metadata_mutation;
    assert_eq!(m.set, vec![("x-Env".to_owned(), "canary".to_owned())]);
    assert_eq!(m.remove, vec!["x-debug".to_owned()]);
    let e = errors(filter("thrift"));
    assert!(
        e.iter().any(|m| m.starts_with(&format!(
            "{BASE}.route_config.routes[0].route.metadata_mutation"
        ))),
        "{e:?}"
    );
}

#[test]
fn missing_and_contradictory_route_fields_name_their_path() {
    let thrift = |routes: Value| {
        errors(json!({
            "name": "envoy.filters.network.thrift_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy",
                "stat_prefix": "t",
                "route_config": {"routes": routes}
            }
        }))
    };
    let e = thrift(json!([
        {"match": {"method_name": "", "invert": true}, "route": {"cluster": "a"}},
        {"match": {"service_name": "", "invert": true}, "route": {"cluster": "a"}},
        {"route": {"cluster": "a"}},
        {"match": {"method_name": "m"}}
    ]));
    let rc = format!("{BASE}.route_config.routes");
    for want in [
        format!("{rc}[0].match: invert cannot be combined with an empty method_name"),
        format!("{rc}[1].match: invert cannot be combined with an empty service_name"),
        format!("{rc}[2].match: missing required field"),
        format!("{rc}[3].route: missing required field"),
    ] {
        assert!(e.contains(&want), "{want:?} not in {e:?}");
    }
    let e = errors(json!({
        "name": "mesh.filters.network.rpc_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/mesh.filters.network.rpc_proxy.v1.RpcProxy",
            "stat_prefix": "r",
            "codec": "bolt",
            "local_rate_limit": {}
        }
    }));
    for want in [
        format!("{BASE}.route_config: missing required field"),
        format!("{BASE}.local_rate_limit.token_bucket: missing required field"),
    ] {
        assert!(e.contains(&want), "{want:?} not in {e:?}");
    }
}
