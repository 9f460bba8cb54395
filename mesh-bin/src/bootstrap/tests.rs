//! Loader tests: a realistic configuration end to end, one test per
//! supported feature group, and error tests asserting exact paths.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::config::*;
use serde_json::{json, Value};

use super::{load_file, load_str, ConfigError, ConfigErrors};

/// Envoy's own bench configuration (placeholders filled in).
const BENCH: &str = r#"
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: 19901 }
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: { address: 127.0.0.1, port_value: 10040 }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: upstream }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options: {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions", "explicit_http_config": {"http2_protocol_options": {}}}}
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: 18080 }
"#;

const HCM_PATH: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
const ROUTE_PATH: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0]";
const CLUSTER_PATH: &str = "static_resources.clusters[0]";

/// The bench configuration as a JSON tree, for tests to modify.
fn bench() -> Value {
    yaml_serde::from_str(BENCH).expect("the bench config parses")
}

fn load_value(v: &Value) -> Result<Bootstrap, ConfigErrors> {
    load_str(&v.to_string())
}

fn ok(v: &Value) -> Bootstrap {
    match load_value(v) {
        Ok(b) => b,
        Err(e) => panic!("expected the config to load, got:\n{e}"),
    }
}

/// The errors of a configuration that must fail, as displayed.
fn errs(v: &Value) -> Vec<String> {
    errs_str(&v.to_string())
}

fn errs_str(text: &str) -> Vec<String> {
    match load_str(text) {
        Ok(b) => panic!("expected errors, the config loaded: {b:?}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

fn hcm_of(b: &Bootstrap) -> &HttpConnectionManager {
    match &b.listeners[0].filter_chains[0].terminal {
        NetworkFilter::HttpConnectionManager(h) => h,
        other => panic!("expected an HCM, got {other:?}"),
    }
}

fn hcm_json(v: &mut Value) -> &mut Value {
    &mut v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
}

fn route_json(v: &mut Value) -> &mut Value {
    &mut hcm_json(v)["route_config"]["virtual_hosts"][0]["routes"][0]
}

fn cluster_json(v: &mut Value) -> &mut Value {
    &mut v["static_resources"]["clusters"][0]
}

fn first_route(b: &Bootstrap) -> &Route {
    &hcm_of(b).route_config.virtual_hosts[0].routes[0]
}

fn route_action(b: &Bootstrap) -> &RouteAction {
    match &first_route(b).action {
        Action::Route(a) => a,
        other => panic!("expected a route action, got {other:?}"),
    }
}

/// A second cluster named `name`, to reference from routes.
fn add_cluster(v: &mut Value, name: &str) {
    let mut c = cluster_json(v).clone();
    c["name"] = json!(name);
    c["load_assignment"]["cluster_name"] = json!(name);
    v["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters list")
        .push(c);
}

fn tcp_listener(v: &mut Value, tcp: Value) {
    v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"] = json!([{
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": tcp,
    }]);
}

const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

#[test]
fn bench_config_loads() {
    let b = load_str(BENCH).expect("bench config");
    let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
    assert_eq!(
        b.admin,
        Some(Admin {
            address: addr("127.0.0.1:19901")
        })
    );
    assert_eq!(b.node, Node::default());
    assert_eq!(b.listeners.len(), 1);
    let l = &b.listeners[0];
    assert_eq!(l.name, "ingress");
    assert_eq!(l.address, addr("127.0.0.1:10040"));
    assert_eq!(l.connection_limit, None);
    assert_eq!(l.per_connection_buffer_limit_bytes, 1024 * 1024);
    assert_eq!(l.filter_chains.len(), 1);
    assert_eq!(l.filter_chains[0].name, "");
    let expected_hcm = HttpConnectionManager {
        stat_prefix: "ingress".into(),
        codec_type: CodecType::Auto,
        route_config: RouteConfiguration {
            name: "local".into(),
            virtual_hosts: vec![VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    name: String::new(),
                    matcher: RouteMatch {
                        path: PathMatch::Prefix("/".into()),
                        case_sensitive: true,
                        headers: vec![],
                        query_parameters: vec![],
                        grpc: false,
                    },
                    action: Action::Route(RouteAction::new(ClusterSpecifier::Cluster(
                        "upstream".into(),
                    ))),
                    headers: HeaderMutations::default(),
                    policy: Default::default(),
                }],
                headers: HeaderMutations::default(),
                policy: Default::default(),
            }],
            headers: HeaderMutations::default(),
        },
        http_filters: vec![HttpFilter::Router],
        stream_idle_timeout: Some(Duration::from_secs(300)),
        request_timeout: None,
        request_headers_timeout: None,
        max_stream_duration: None,
        idle_timeout: Some(Duration::from_secs(3600)),
        max_request_headers_kb: 60,
        use_remote_address: false,
        skip_xff_append: false,
        generate_request_id: true,
        server_name: None,
        access_log: vec![],
        upgrade_types: vec![],
        internal_address_config: vec![],
        http_filter_meta: vec![mesh_core::policy::HttpFilterMeta {
            name: "envoy.filters.http.router".into(),
            disabled: false,
        }],
        rds: None,
        path_normalization: Default::default(),
    };
    assert_eq!(hcm_of(&b), &expected_hcm);
    assert_eq!(
        b.clusters,
        vec![Cluster {
            name: "upstream".into(),
            discovery: DiscoveryType::Static,
            connect_timeout: Duration::from_secs(1),
            lb_policy: LbPolicy::RoundRobin,
            localities: vec![LocalityLbEndpoints {
                locality: Locality::default(),
                priority: 0,
                load_balancing_weight: None,
                lb_endpoints: vec![LbEndpoint {
                    host: "127.0.0.1".into(),
                    port: 18080,
                    weight: 1,
                    metadata: Default::default(),
                    health_status: Default::default(),
                    socket_match: Default::default(),
                }],
                socket_match: Default::default(),
            }],
            protocol: UpstreamProtocol::Http2,
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: DnsLookupFamily::Auto,
            idle_timeout: Some(Duration::from_secs(3600)),
            per_connection_buffer_limit_bytes: 1024 * 1024,
            tls: None,
            transport_socket_matches: Vec::new(),
            lb: Default::default(),
            health_check: None,
            outlier_detection: None,
            max_requests_per_connection: None,
            circuit_breakers: Default::default(),
            pipe: None,
            upstream_bind: None,
            istio_service: None,
            istio_metadata_exchange: None,
        }]
    );
}

#[test]
fn node_and_admin() {
    let mut v = bench();
    v["node"] = json!({"id": "n1", "cluster": "c1",
        "locality": {"region": "r", "zone": "z", "sub_zone": "s"}});
    v["admin"]["access_log_path"] = json!("/dev/null");
    v["admin"]["access_log"] = json!([]);
    let b = ok(&v);
    assert_eq!(b.node.id, "n1");
    assert_eq!(b.node.cluster, "c1");
    assert_eq!(b.node.locality.sub_zone, "s");

    v["node"]["metadata"] = json!({"a": 1, "LABELS": {"app": "x"}});
    assert_eq!(ok(&v).node.metadata_json, r#"{"LABELS":{"app":"x"},"a":1}"#);

    v["admin"]["access_log_path"] = json!("/tmp/admin.log");
    v["node"]["metadata"] = json!("text");
    assert_eq!(
        errs(&v),
        vec![
            "node.metadata: expected an object",
            "unsupported: admin.access_log_path (the admin access log is not written; only /dev/null is accepted)",
        ]
    );

    // An admin without an address runs no admin listener, as in Envoy.
    let mut v = bench();
    v["admin"] = json!({});
    assert_eq!(ok(&v).admin, None);
}

#[test]
fn unknown_top_level_fields_are_unsupported() {
    let mut v = bench();
    v["overload_manager"] = json!({});
    v["layered_runtime"] = json!({});
    v["static_resources"]["stats_sinks"] = json!([]);
    assert_eq!(
        errs(&v),
        vec![
            "unsupported: static_resources.stats_sinks",
            "unsupported: layered_runtime",
            "unsupported: overload_manager",
        ]
    );
}

#[test]
fn unknown_cluster_field_is_unsupported_with_exact_path() {
    let mut v = bench();
    add_cluster(&mut v, "second");
    v["static_resources"]["clusters"][1]["lrs_server"] = json!({});
    let e = load_value(&v).expect_err("must fail");
    assert_eq!(
        e.0,
        vec![ConfigError::unsupported(
            "static_resources.clusters[1].lrs_server",
            None
        )]
    );
    assert!(e.0[0].is_unsupported());
    assert_eq!(
        e.to_string(),
        "unsupported: static_resources.clusters[1].lrs_server"
    );
}

#[test]
fn unknown_cluster_reference() {
    let mut v = bench();
    route_json(&mut v)["route"]["cluster"] = json!("foo");
    assert_eq!(
        errs(&v),
        vec![format!(
            "{ROUTE_PATH}.route.cluster: unknown cluster \"foo\""
        )]
    );
}

#[test]
fn all_errors_are_collected_one_per_line() {
    let mut v = bench();
    route_json(&mut v)["route"]["cluster"] = json!("foo");
    cluster_json(&mut v)["connect_timeout"] = json!("soon");
    cluster_json(&mut v)["lrs_server"] = json!({});
    let e = load_value(&v).expect_err("must fail");
    assert_eq!(e.0.len(), 3);
    assert_eq!(e.to_string().lines().count(), 3);
}

#[test]
fn wrong_types_name_the_path_and_expected_type() {
    let mut v = bench();
    v["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] =
        json!("http");
    cluster_json(&mut v)["load_assignment"] = json!([]);
    hcm_json(&mut v)["use_remote_address"] = json!("yes");
    v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["route_config"]["virtual_hosts"][0]["domains"] = json!("*");
    assert_eq!(
        errs(&v),
        vec![
            "static_resources.listeners[0].address.socket_address.port_value: expected an integer, found \"http\"".to_string(),
            format!("{HCM_PATH}.route_config.virtual_hosts[0].domains: expected a list, found a string"),
            format!("{HCM_PATH}.use_remote_address: expected a boolean, found a string"),
            format!("{CLUSTER_PATH}.load_assignment: expected a map, found a list"),
        ]
    );
}

#[test]
fn integers_may_be_strings_and_are_range_checked() {
    let mut v = bench();
    v["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] =
        json!("8080");
    cluster_json(&mut v)["per_connection_buffer_limit_bytes"] = json!("32768");
    let b = ok(&v);
    assert_eq!(b.listeners[0].address.port(), 8080);
    assert_eq!(b.clusters[0].per_connection_buffer_limit_bytes, 32768);

    v["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = json!(70000);
    assert_eq!(
        errs(&v),
        vec!["static_resources.listeners[0].address.socket_address.port_value: expected an integer from 0 to 65535, found 70000"]
    );
}

#[test]
fn durations() {
    let mut v = bench();
    cluster_json(&mut v)["connect_timeout"] = json!("0.25s");
    cluster_json(&mut v)["dns_refresh_rate"] = json!({"seconds": 2, "nanos": 500});
    route_json(&mut v)["route"]["timeout"] = json!("1.000000001s");
    route_json(&mut v)["route"]["idle_timeout"] = json!("0s");
    hcm_json(&mut v)["stream_idle_timeout"] = json!("0s");
    hcm_json(&mut v)["request_timeout"] = json!("30s");
    let b = ok(&v);
    assert_eq!(b.clusters[0].connect_timeout, Duration::from_millis(250));
    assert_eq!(b.clusters[0].dns_refresh_rate, Duration::new(2, 500));
    assert_eq!(route_action(&b).timeout, Some(Duration::new(1, 1)));
    assert_eq!(route_action(&b).idle_timeout, None);
    assert_eq!(hcm_of(&b).stream_idle_timeout, None);
    assert_eq!(hcm_of(&b).request_timeout, Some(Duration::from_secs(30)));

    route_json(&mut v)["route"]["timeout"] = json!("0s");
    assert_eq!(route_action(&ok(&v)).timeout, None);
}

#[test]
fn bad_durations() {
    let mut v = bench();
    cluster_json(&mut v)["connect_timeout"] = json!("5ms");
    route_json(&mut v)["route"]["timeout"] = json!("-1s");
    hcm_json(&mut v)["request_timeout"] = json!(5);
    assert_eq!(
        errs(&v),
        vec![
            format!("{ROUTE_PATH}.route.timeout: invalid duration \"-1s\": must not be negative"),
            format!("{HCM_PATH}.request_timeout: expected a duration string like \"5s\", found a number"),
            format!("{CLUSTER_PATH}.connect_timeout: invalid duration \"5ms\": expected seconds with an \"s\" suffix, like \"5s\" or \"0.25s\""),
        ]
    );
    cluster_json(&mut v)["connect_timeout"] = json!("0s");
    route_json(&mut v)["route"]["timeout"] = json!("1s");
    hcm_json(&mut v)["request_timeout"] = json!("1.1234567891s");
    assert_eq!(
        errs(&v),
        vec![
            format!("{HCM_PATH}.request_timeout: invalid duration \"1.1234567891s\": expected seconds with an \"s\" suffix, like \"5s\" or \"0.25s\""),
            format!("{CLUSTER_PATH}.connect_timeout: must be greater than 0s"),
        ]
    );
}

#[test]
fn bad_regex_is_reported_at_its_path() {
    let mut v = bench();
    route_json(&mut v)["match"] = json!({"safe_regex": {"google_re2": {}, "regex": "/(abc"}});
    let e = errs(&v);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with(&format!(
            "{ROUTE_PATH}.match.safe_regex.regex: invalid regex \"/(abc\": "
        )),
        "{e:?}"
    );
    assert!(!e[0].contains('\n'));

    route_json(&mut v)["match"] = json!({"safe_regex": {"regex": "/api/v[0-9]+/.*"}});
    assert_eq!(
        first_route(&ok(&v)).matcher.path,
        PathMatch::Regex("/api/v[0-9]+/.*".into())
    );
}

#[test]
fn duplicate_names() {
    let mut v = bench();
    add_cluster(&mut v, "upstream");
    assert_eq!(
        errs(&v),
        vec!["static_resources.clusters[1].name: duplicate cluster name \"upstream\" (also clusters[0])"]
    );

    let mut v = bench();
    let mut l = v["static_resources"]["listeners"][0].clone();
    l["address"]["socket_address"]["port_value"] = json!(10041);
    v["static_resources"]["listeners"]
        .as_array_mut()
        .expect("list")
        .push(l.clone());
    assert_eq!(
        errs(&v),
        vec!["static_resources.listeners[1].name: duplicate listener name \"ingress\" (also listeners[0])"]
    );
    l["name"] = json!("other");
    l["address"]["socket_address"]["port_value"] = json!(10040);
    v["static_resources"]["listeners"][1] = l;
    assert_eq!(
        errs(&v),
        vec!["static_resources.listeners[1].address: duplicate address 127.0.0.1:10040 (also listener \"ingress\")"]
    );
}

#[test]
fn missing_required_fields() {
    let mut v = bench();
    let l = &mut v["static_resources"]["listeners"][0];
    l.as_object_mut().expect("map").remove("name");
    hcm_json(&mut v)
        .as_object_mut()
        .expect("map")
        .remove("stat_prefix");
    cluster_json(&mut v)["name"] = json!("");
    assert_eq!(
        errs(&v),
        vec![
            "static_resources.listeners[0].name: missing required field".to_string(),
            format!("{HCM_PATH}.stat_prefix: missing required field"),
            format!("{CLUSTER_PATH}.name: must not be empty"),
            format!("{ROUTE_PATH}.route.cluster: unknown cluster \"upstream\""),
        ]
    );
}

#[test]
fn bad_yaml_and_empty_input_do_not_panic() {
    let e = load_str("static_resources:\n  listeners: [\n").expect_err("bad yaml");
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].path, "");
    assert!(e.0[0].message.contains("line"), "{}", e.0[0].message);

    for text in ["", "   \n", "# only a comment\n"] {
        assert_eq!(errs_str(text), vec!["the configuration is empty"]);
    }
    assert_eq!(
        errs_str("just a string"),
        vec!["expected a map, found a string"]
    );
    assert_eq!(errs_str("[1, 2]"), vec!["expected a map, found a list"]);
    // A list where a map is expected, deep inside, and nulls.
    assert_eq!(
        errs_str("static_resources: {listeners: [3, null]}"),
        vec![
            "static_resources.listeners[0]: expected a map, found a number",
            "static_resources.listeners[1]: expected a map, found null",
        ]
    );
}

#[test]
fn load_file_yaml_json_and_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = dir.path().join("envoy.yaml");
    std::fs::write(&yaml, BENCH).expect("write");
    let from_yaml = load_file(&yaml).expect("yaml file");
    let json_path = dir.path().join("envoy.json");
    std::fs::write(&json_path, bench().to_string()).expect("write");
    assert_eq!(load_file(&json_path).expect("json file"), from_yaml);

    std::fs::write(&json_path, "{\"admin\": ").expect("write");
    let e = load_file(&json_path).expect_err("bad json");
    assert_eq!(e.0[0].path, json_path.display().to_string());
    assert!(e.0[0].message.contains("line 1"), "{}", e.0[0].message);

    let missing = dir.path().join("nope.yaml");
    let e = load_file(&missing).expect_err("missing file");
    assert_eq!(e.0[0].path, missing.display().to_string());
}

#[test]
fn listener_options_and_connection_limit() {
    let mut v = bench();
    let l = &mut v["static_resources"]["listeners"][0];
    l["per_connection_buffer_limit_bytes"] = json!(65536);
    l["listener_filters"] = json!([]);
    l["filter_chains"][0]["name"] = json!("main");
    let hcm = l["filter_chains"][0]["filters"][0].clone();
    l["filter_chains"][0]["filters"] = json!([{
        "name": "envoy.filters.network.connection_limit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
            "stat_prefix": "limit", "max_connections": 100, "delay": "0.5s"
        }
    }, hcm]);
    let b = ok(&v);
    let l = &b.listeners[0];
    assert_eq!(l.per_connection_buffer_limit_bytes, 65536);
    assert_eq!(l.filter_chains[0].name, "main");
    assert_eq!(
        l.connection_limit,
        Some(ConnectionLimit {
            stat_prefix: "limit".into(),
            max_connections: 100,
            delay: Some(Duration::from_millis(500)),
        })
    );
}

#[test]
fn listener_refusals() {
    let mut v = bench();
    let l = &mut v["static_resources"]["listeners"][0];
    l["traffic_direction"] = json!("INBOUND");
    l["listener_filters"] = json!([{"name": "envoy.filters.listener.tls_inspector"}]);
    let chain = l["filter_chains"][0].clone();
    l["filter_chains"][0]["filter_chain_match"] = json!({"server_names": ["a"]});
    l["filter_chains"].as_array_mut().expect("list").push(chain);
    let b = ok(&v);
    let l = &b.listeners[0];
    assert_eq!(l.traffic_direction, TrafficDirection::Inbound);
    assert!(!l.continue_on_listener_filters_timeout);
    let l = &mut v["static_resources"]["listeners"][0];
    l["traffic_direction"] = json!("SIDEWAYS");
    l["continue_on_listener_filters_timeout"] = json!(true);
    assert_eq!(errs(&v).len(), 1);
    assert!(errs(&v)[0].contains("listeners[0].traffic_direction"));
}

#[test]
fn network_filter_order_and_type_checks() {
    let mut v = bench();
    let filters = &mut v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"];
    let hcm = filters[0].clone();
    filters.as_array_mut().expect("list").push(json!({
        "name": "envoy.filters.network.redis_proxy",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy"}
    }));
    let base = "static_resources.listeners[0].filter_chains[0].filters";
    assert_eq!(
        errs(&v),
        vec![
            format!("{base}[0]: envoy.filters.network.http_connection_manager is a terminal filter and must be the last filter"),
            format!("unsupported: {base}[1] (network filter envoy.extensions.filters.network.redis_proxy.v3.RedisProxy)"),
        ]
    );

    // The @type must agree with a known extension name.
    let mut wrong = hcm.clone();
    wrong["name"] = json!("envoy.filters.network.tcp_proxy");
    v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"] = json!([wrong]);
    assert_eq!(
        errs(&v),
        vec![format!("{base}[0].typed_config.@type: expected @type {TCP_PROXY_TYPE} for envoy.filters.network.tcp_proxy, found \"type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\"")]
    );

    // Any name works when the @type is known; no filters at all is an error.
    let mut renamed = hcm;
    renamed["name"] = json!("my-hcm");
    v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"] = json!([renamed]);
    ok(&v);
    v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"] = json!([]);
    assert_eq!(
        errs(&v),
        vec![format!("{base}: the last filter must be envoy.filters.network.http_connection_manager, envoy.filters.network.tcp_proxy, envoy.filters.network.thrift_proxy, envoy.filters.network.dubbo_proxy or mesh.filters.network.rpc_proxy")]
    );
}

#[test]
fn tcp_proxy() {
    let mut v = bench();
    add_cluster(&mut v, "b");
    tcp_listener(
        &mut v,
        json!({"@type": TCP_PROXY_TYPE, "stat_prefix": "tcp", "cluster": "upstream",
               "idle_timeout": "0s",
               "access_log": [{"name": "envoy.access_loggers.stderr"}]}),
    );
    let b = ok(&v);
    assert_eq!(
        b.listeners[0].filter_chains[0].terminal,
        NetworkFilter::TcpProxy(TcpProxy {
            stat_prefix: "tcp".into(),
            cluster: ClusterSpecifier::Cluster("upstream".into()),
            idle_timeout: None,
            access_log: vec![AccessLogSink::Stderr.into()],
            hash_policy: vec![],
            istio_metadata_exchange: None,
            istio_stats: None,
        })
    );

    tcp_listener(
        &mut v,
        json!({"@type": TCP_PROXY_TYPE, "stat_prefix": "tcp",
               "weighted_clusters": {"clusters": [
                   {"name": "upstream", "weight": 3}, {"name": "b", "weight": "1"}]}}),
    );
    let b = ok(&v);
    let NetworkFilter::TcpProxy(t) = &b.listeners[0].filter_chains[0].terminal else {
        panic!("tcp proxy expected");
    };
    assert_eq!(t.idle_timeout, Some(Duration::from_secs(3600)));
    let ClusterSpecifier::Weighted(w) = &t.cluster else {
        panic!("weighted expected");
    };
    assert_eq!(
        w.iter()
            .map(|c| (c.name.as_str(), c.weight))
            .collect::<Vec<_>>(),
        vec![("upstream", 3), ("b", 1)]
    );

    tcp_listener(
        &mut v,
        json!({"@type": TCP_PROXY_TYPE, "stat_prefix": "tcp", "cluster": "nope"}),
    );
    assert_eq!(
        errs(&v),
        vec![format!("{HCM_PATH}.cluster: unknown cluster \"nope\"")]
    );
}

#[test]
fn hcm_options() {
    let mut v = bench();
    let h = hcm_json(&mut v);
    h["codec_type"] = json!("HTTP1");
    h["request_headers_timeout"] = json!("10s");
    h["common_http_protocol_options"] = json!({"idle_timeout": "0s"});
    h["max_request_headers_kb"] = json!(96);
    h["use_remote_address"] = json!(true);
    h["skip_xff_append"] = json!(true);
    h["generate_request_id"] = json!(false);
    h["server_name"] = json!("edge");
    h["upgrade_configs"] = json!([{"upgrade_type": "WebSocket"}]);
    h["http_protocol_options"] = json!({});
    h["http2_protocol_options"] = json!({});
    h["access_log"] = json!([
        {"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}},
        {"name": "anything", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/var/log/access.log"}},
    ]);
    let b = ok(&v);
    let h = hcm_of(&b);
    assert_eq!(h.codec_type, CodecType::Http1);
    assert_eq!(h.request_headers_timeout, Some(Duration::from_secs(10)));
    assert_eq!(h.idle_timeout, None);
    assert_eq!(h.max_request_headers_kb, 96);
    assert!(h.use_remote_address && h.skip_xff_append && !h.generate_request_id);
    assert_eq!(h.server_name.as_deref(), Some("edge"));
    assert_eq!(h.upgrade_types, vec!["websocket"]);
    assert_eq!(
        h.access_log,
        vec![
            AccessLogSink::Stdout.into(),
            AccessLogSink::File("/var/log/access.log".into()).into()
        ]
    );
}

#[test]
fn hcm_refusals() {
    let mut v = bench();
    let h = hcm_json(&mut v);
    h["codec_type"] = json!("HTTP3");
    h["max_request_headers_kb"] = json!(9000);
    h["http2_protocol_options"] = json!({"max_concurrent_streams": 10});
    h["access_log"] = json!([{"name": "envoy.access_loggers.stdout", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        "log_format": {"text_format": "%START_TIME% %BOGUS%"}}}]);
    let router = h["http_filters"][0].clone();
    h["http_filters"] = json!([router, {"name": "envoy.filters.http.buffer"}]);
    assert_eq!(
        errs(&v),
        vec![
            format!("unsupported: {HCM_PATH}.codec_type (HTTP3: HTTP/3 is not supported yet)"),
            format!("{HCM_PATH}.http_filters[0]: envoy.filters.http.router must be the last HTTP filter"),
            format!("unsupported: {HCM_PATH}.http_filters[1] (HTTP filter envoy.filters.http.buffer)"),
            format!("{HCM_PATH}.max_request_headers_kb: must be from 1 to 8192, found 9000"),
            format!("{HCM_PATH}.access_log[0].typed_config.log_format.text_format: unsupported command operator %BOGUS%"),
            format!("unsupported: {HCM_PATH}.http2_protocol_options.max_concurrent_streams"),
        ]
    );

    let mut v = bench();
    hcm_json(&mut v)["http_filters"] = json!([]);
    hcm_json(&mut v)["http_filters"] = json!([]);
    assert_eq!(
        errs(&v),
        vec![format!(
            "{HCM_PATH}.http_filters: envoy.filters.http.router is required as the last HTTP filter"
        )]
    );
    // The router selected by name alone, as Envoy allows.
    hcm_json(&mut v)["http_filters"] = json!([{"name": "envoy.filters.http.router"}]);
    assert_eq!(hcm_of(&ok(&v)).http_filters, vec![HttpFilter::Router]);
    // Router options are not supported.
    hcm_json(&mut v)["http_filters"][0]["typed_config"] = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        "suppress_envoy_headers": true});
    assert_eq!(
        errs(&v),
        vec![format!(
            "unsupported: {HCM_PATH}.http_filters[0].typed_config.suppress_envoy_headers"
        )]
    );
}

#[test]
fn route_matchers() {
    let mut v = bench();
    route_json(&mut v)["match"] = json!({
        "path": "/Exact", "case_sensitive": false, "grpc": {},
        "headers": [
            {"name": "X-Exact", "exact_match": "a"},
            {"name": "x-p", "prefix_match": "b", "invert_match": true},
            {"name": "x-range", "range_match": {"start": "1", "end": 10}},
            {"name": "x-present", "present_match": false},
            {"name": "x-any"},
            {"name": "x-s", "string_match": {"suffix": "c", "ignore_case": true},
             "treat_missing_header_as_empty": true},
            {"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}},
        ],
        "query_parameters": [
            {"name": "q", "string_match": {"exact": "1"}},
            {"name": "debug", "present_match": true},
        ],
    });
    let b = ok(&v);
    let m = &first_route(&b).matcher;
    assert_eq!(m.path, PathMatch::Exact("/Exact".into()));
    assert!(!m.case_sensitive && m.grpc);
    let hm = |name: &str, kind, invert, tm| HeaderMatcher {
        name: name.into(),
        kind,
        invert,
        treat_missing_as_empty: tm,
    };
    assert_eq!(
        m.headers,
        vec![
            hm("x-exact", HeaderMatchKind::Exact("a".into()), false, false),
            hm("x-p", HeaderMatchKind::Prefix("b".into()), true, false),
            hm(
                "x-range",
                HeaderMatchKind::Range { start: 1, end: 10 },
                false,
                false
            ),
            hm("x-present", HeaderMatchKind::Present(false), false, false),
            hm("x-any", HeaderMatchKind::Present(true), false, false),
            hm(
                "x-s",
                HeaderMatchKind::IgnoreCase(Box::new(HeaderMatchKind::Suffix("c".into()))),
                false,
                true
            ),
            hm(
                ":method",
                HeaderMatchKind::Regex("GET|HEAD".into()),
                false,
                false
            ),
        ]
    );
    assert_eq!(
        m.query_parameters,
        vec![
            QueryParameterMatcher {
                name: "q".into(),
                kind: HeaderMatchKind::Exact("1".into())
            },
            QueryParameterMatcher {
                name: "debug".into(),
                kind: HeaderMatchKind::Present(true)
            },
        ]
    );

    route_json(&mut v)["match"] = json!({"path_separated_prefix": "/api"});
    assert_eq!(
        first_route(&ok(&v)).matcher.path,
        PathMatch::SeparatedPrefix("/api".into())
    );
}

#[test]
fn route_matcher_errors() {
    let mut v = bench();
    route_json(&mut v)["match"] = json!({
        "prefix": "/", "path": "/x",
        "headers": [
            {"name": "a", "exact_match": "x", "prefix_match": "y"},
            {"name": "b", "string_match": {"safe_regex": {"regex": "x"}, "ignore_case": true}},
            {"name": "c", "string_match": {"contains": ""}},
        ],
        "runtime_fraction": {},
    });
    let m = format!("{ROUTE_PATH}.match");
    assert_eq!(
        errs(&v),
        vec![
            format!(
                "{m}: only one of prefix, path, safe_regex and path_separated_prefix may be set"
            ),
            format!("{m}.headers[0]: only one of exact_match, prefix_match may be set"),
            format!(
                "{m}.headers[1].string_match.ignore_case: ignore_case has no effect for safe_regex"
            ),
            format!("{m}.headers[2].string_match.contains: must not be empty"),
            format!("unsupported: {m}.runtime_fraction"),
        ]
    );
    route_json(&mut v)["match"] = json!({"path_separated_prefix": "/api/"});
    assert_eq!(
        errs(&v),
        vec![format!(
            "{m}.path_separated_prefix: must be non-empty, without ? or #, and not end with /"
        )]
    );
    route_json(&mut v)["match"] = json!({});
    assert_eq!(
        errs(&v),
        vec![format!(
            "{m}: one of prefix, path, safe_regex or path_separated_prefix is required"
        )]
    );
}

#[test]
fn route_actions() {
    let mut v = bench();
    add_cluster(&mut v, "b");
    route_json(&mut v)["route"] = json!({
        "weighted_clusters": {"total_weight": 100, "clusters": [
            {"name": "upstream", "weight": 90,
             "request_headers_to_add": [{"header": {"key": "X-Canary", "value": "no"}}]},
            {"name": "b", "weight": 10},
        ]},
        "regex_rewrite": {"pattern": {"regex": "^/old/(.*)$"}, "substitution": "/new/\\1"},
        "host_rewrite_literal": "example.com",
        "idle_timeout": "20s",
    });
    let b = ok(&v);
    let a = route_action(&b);
    let ClusterSpecifier::Weighted(w) = &a.cluster else {
        panic!("weighted expected");
    };
    assert_eq!(w[0].weight, 90);
    assert_eq!(w[0].headers.request_add[0].key, "x-canary");
    assert_eq!(w[1].name, "b");
    assert_eq!(
        a.regex_rewrite,
        Some(("^/old/(.*)$".into(), "/new/\\1".into()))
    );
    assert_eq!(a.host_rewrite_literal.as_deref(), Some("example.com"));
    assert_eq!(a.idle_timeout, Some(Duration::from_secs(20)));
    assert_eq!(a.timeout, Some(Duration::from_secs(15)));

    route_json(&mut v)["route"] = json!({"cluster": "b", "prefix_rewrite": "/v2/"});
    assert_eq!(
        route_action(&ok(&v)).prefix_rewrite.as_deref(),
        Some("/v2/")
    );

    route_json(&mut v)["route"] = json!({
        "weighted_clusters": {"total_weight": 50, "clusters": [
            {"name": "upstream", "weight": 90}, {"name": "zzz", "weight": 10}]},
        "internal_redirect_policy": {},
    });
    let r = format!("{ROUTE_PATH}.route");
    assert_eq!(
        errs(&v),
        vec![
            format!("{r}.weighted_clusters.total_weight: total_weight 50 is not the sum of the cluster weights (100)"),
            format!("unsupported: {r}.internal_redirect_policy"),
            format!("{r}.weighted_clusters.clusters[1].name: unknown cluster \"zzz\""),
        ]
    );
}

#[test]
fn direct_responses() {
    let mut v = bench();
    route_json(&mut v)
        .as_object_mut()
        .expect("map")
        .remove("route");
    route_json(&mut v)["direct_response"] =
        json!({"status": 200, "body": {"inline_string": "hello"}});
    assert_eq!(
        first_route(&ok(&v)).action,
        Action::DirectResponse {
            status: 200,
            body: Some(bytes::Bytes::from_static(b"hello"))
        }
    );
    route_json(&mut v)["direct_response"] =
        json!({"status": "503", "body": {"inline_bytes": "aGk/Pw=="}});
    assert_eq!(
        first_route(&ok(&v)).action,
        Action::DirectResponse {
            status: 503,
            body: Some(bytes::Bytes::from_static(b"hi??"))
        }
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("body.txt");
    std::fs::write(&file, "from a file").expect("write");
    route_json(&mut v)["direct_response"] =
        json!({"status": 404, "body": {"filename": file.display().to_string()}});
    assert_eq!(
        first_route(&ok(&v)).action,
        Action::DirectResponse {
            status: 404,
            body: Some(bytes::Bytes::from_static(b"from a file"))
        }
    );
    route_json(&mut v)["direct_response"] = json!({"status": 204});
    assert_eq!(
        first_route(&ok(&v)).action,
        Action::DirectResponse {
            status: 204,
            body: None
        }
    );

    route_json(&mut v)["direct_response"] = json!({"status": 700, "body": {"inline_bytes": "a"}});
    route_json(&mut v)["redirect"] = json!({});
    let d = ROUTE_PATH;
    assert_eq!(
        errs(&v),
        vec![format!(
            "{d}: only one of route, redirect and direct_response may be set"
        )]
    );
    route_json(&mut v)
        .as_object_mut()
        .expect("map")
        .remove("redirect");
    assert_eq!(
        errs(&v),
        vec![
            format!("{d}.direct_response.status: expected an integer from 100 to 599, found 700"),
            format!("{d}.direct_response.body.inline_bytes: invalid base64"),
        ]
    );
}

#[test]
fn redirects() {
    let mut v = bench();
    route_json(&mut v)
        .as_object_mut()
        .expect("map")
        .remove("route");
    route_json(&mut v)["redirect"] = json!({
        "https_redirect": true, "host_redirect": "example.com", "port_redirect": 8443,
        "prefix_rewrite": "/new", "response_code": "PERMANENT_REDIRECT", "strip_query": true});
    assert_eq!(
        first_route(&ok(&v)).action,
        Action::Redirect(RedirectAction {
            scheme: Some("https".into()),
            host: Some("example.com".into()),
            port: Some(8443),
            path: Some(RedirectPath::PrefixRewrite("/new".into())),
            response_code: 308,
            strip_query: true,
        })
    );
    route_json(&mut v)["redirect"] = json!({"path_redirect": "/x"});
    assert_eq!(
        first_route(&ok(&v)).action,
        Action::Redirect(RedirectAction {
            scheme: None,
            host: None,
            port: None,
            path: Some(RedirectPath::Path("/x".into())),
            response_code: 301,
            strip_query: false,
        })
    );
    route_json(&mut v)["redirect"] = json!({"response_code": "GONE", "scheme_redirect": "http",
        "https_redirect": true});
    let r = format!("{ROUTE_PATH}.redirect");
    assert_eq!(
        errs(&v),
        vec![
            format!("{r}: only one of https_redirect, scheme_redirect may be set"),
            format!("{r}.response_code: expected one of MOVED_PERMANENTLY, FOUND, SEE_OTHER, TEMPORARY_REDIRECT, PERMANENT_REDIRECT, found \"GONE\""),
        ]
    );
}

#[test]
fn header_mutations_at_every_level() {
    let mut v = bench();
    let rc = &mut hcm_json(&mut v)["route_config"];
    rc["validate_clusters"] = json!(false);
    rc["request_headers_to_add"] = json!([
        {"header": {"key": "X-A", "value": "1"}},
        {"header": {"key": "x-b", "value": "2"}, "append": false},
        {"header": {"key": "x-c", "value": ""}, "append_action": "ADD_IF_ABSENT", "keep_empty_value": true},
        {"header": {"key": "x-d", "value": "%DOWNSTREAM_REMOTE_ADDRESS%"}, "append_action": "OVERWRITE_IF_EXISTS"},
    ]);
    rc["response_headers_to_remove"] = json!(["Server"]);
    rc["virtual_hosts"][0]["request_headers_to_remove"] = json!(["x-internal"]);
    route_json(&mut v)["response_headers_to_add"] =
        json!([{"header": {"key": "x-route", "value": "r"}, "append": true}]);
    let b = ok(&v);
    let rc = &hcm_of(&b).route_config;
    let hvo = |key: &str, value: &str, append_action, keep_empty_value| HeaderValueOption {
        key: key.into(),
        value: value.into(),
        append_action,
        keep_empty_value,
    };
    assert_eq!(
        rc.headers.request_add,
        vec![
            hvo("x-a", "1", AppendAction::AppendIfExistsOrAdd, false),
            hvo("x-b", "2", AppendAction::OverwriteIfExistsOrAdd, false),
            hvo("x-c", "", AppendAction::AddIfAbsent, true),
            hvo(
                "x-d",
                "%DOWNSTREAM_REMOTE_ADDRESS%",
                AppendAction::OverwriteIfExists,
                false
            ),
        ]
    );
    assert_eq!(rc.headers.response_remove, vec!["server"]);
    assert_eq!(
        rc.virtual_hosts[0].headers.request_remove,
        vec!["x-internal"]
    );
    assert_eq!(
        first_route(&b).headers.response_add,
        vec![hvo(
            "x-route",
            "r",
            AppendAction::AppendIfExistsOrAdd,
            false
        )]
    );
}

#[test]
fn header_mutation_errors() {
    let mut v = bench();
    let rc = &mut hcm_json(&mut v)["route_config"];
    rc["request_headers_to_add"] = json!([
        {"header": {"key": ":path", "value": "/"}},
        {"header": {"key": "x-a", "value": "v"}, "append": true, "append_action": "ADD_IF_ABSENT"},
        {"header": {"key": "bad key", "value": "v"}},
        {"header": {"key": "x-ok", "value": "line\nbreak"}},
        {"header": {"value": "v"}},
    ]);
    rc["request_headers_to_remove"] = json!(["Host"]);
    let p = format!("{HCM_PATH}.route_config");
    assert_eq!(
        errs(&v),
        vec![
            format!("{p}.request_headers_to_add[0].header.key: :-prefixed or host headers may not be modified (\":path\")"),
            format!("{p}.request_headers_to_add[1]: only one of append and append_action may be set"),
            format!("{p}.request_headers_to_add[2].header.key: invalid header name \"bad key\""),
            format!("{p}.request_headers_to_add[3].header.value: invalid header value \"line\\nbreak\""),
            format!("{p}.request_headers_to_add[4].header.key: missing required field"),
            format!("{p}.request_headers_to_remove[0]: :-prefixed or host headers may not be removed (\"Host\")"),
        ]
    );
}

#[test]
fn virtual_host_domains() {
    let mut v = bench();
    let vh = hcm_json(&mut v)["route_config"]["virtual_hosts"][0].clone();
    let mut second = vh.clone();
    second["name"] = json!("api");
    second["domains"] = json!(["api.example.com", "API.example.com:8080", "*"]);
    hcm_json(&mut v)["route_config"]["virtual_hosts"] = json!([vh, second]);
    let p = format!("{HCM_PATH}.route_config.virtual_hosts[1].domains[2]");
    assert_eq!(
        errs(&v),
        vec![format!(
            "{p}: duplicate domain \"*\" (also in virtual host \"all\")"
        )]
    );
    hcm_json(&mut v)["route_config"]["virtual_hosts"][1]["domains"] = json!([]);
    assert_eq!(
        errs(&v),
        vec![format!(
            "{HCM_PATH}.route_config.virtual_hosts[1].domains: at least one domain is required"
        )]
    );
}

#[test]
fn cluster_options() {
    let mut v = bench();
    let c = cluster_json(&mut v);
    c["type"] = json!("STRICT_DNS");
    c["lb_policy"] = json!("RANDOM");
    c["dns_refresh_rate"] = json!("30s");
    c["dns_lookup_family"] = json!("V4_ONLY");
    c["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
            "common_http_protocol_options": {"idle_timeout": "60s"}}});
    c["load_assignment"]["endpoints"] = json!([
    {"locality": {"region": "eu", "zone": "a"}, "priority": 1, "load_balancing_weight": 5,
     "lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "backend.local", "port_value": 80}}},
         "load_balancing_weight": 3},
        {"endpoint": {"address": {"socket_address": {"address": "::1", "port_value": "81"}}}},
     ]}]);
    let b = ok(&v);
    let c = &b.clusters[0];
    assert_eq!(c.discovery, DiscoveryType::StrictDns);
    assert_eq!(c.lb_policy, LbPolicy::Random);
    assert_eq!(c.dns_refresh_rate, Duration::from_secs(30));
    assert_eq!(c.dns_lookup_family, DnsLookupFamily::V4Only);
    assert_eq!(c.protocol, UpstreamProtocol::Downstream);
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(60)));
    let l = &c.localities[0];
    assert_eq!(l.locality.region, "eu");
    assert_eq!((l.priority, l.load_balancing_weight), (1, Some(5)));
    assert_eq!(
        l.lb_endpoints,
        vec![
            LbEndpoint {
                host: "backend.local".into(),
                port: 80,
                weight: 3,
                metadata: Default::default(),
                health_status: Default::default(),
                socket_match: Default::default(),
            },
            LbEndpoint {
                host: "::1".into(),
                port: 81,
                weight: 1,
                metadata: Default::default(),
                health_status: Default::default(),
                socket_match: Default::default(),
            },
        ]
    );

    // Defaults: HTTP/1.1, no typed options; the deprecated field gives h2.
    let mut v = bench();
    cluster_json(&mut v)
        .as_object_mut()
        .expect("map")
        .remove("typed_extension_protocol_options");
    assert_eq!(ok(&v).clusters[0].protocol, UpstreamProtocol::Http1);
    cluster_json(&mut v)["http2_protocol_options"] = json!({});
    assert_eq!(ok(&v).clusters[0].protocol, UpstreamProtocol::Http2);
}

#[test]
fn eds_and_logical_dns_clusters() {
    let mut v = bench();
    let c = cluster_json(&mut v);
    c.as_object_mut().expect("map").remove("load_assignment");
    c["type"] = json!("EDS");
    c["eds_cluster_config"] = json!({"eds_config": {"ads": {}, "resource_api_version": "V3"}});
    assert_eq!(
        ok(&v).clusters[0].discovery,
        DiscoveryType::Eds {
            service_name: "upstream".into(),
            source: Default::default(),
        }
    );
    cluster_json(&mut v)["eds_cluster_config"]["service_name"] = json!("svc");
    assert_eq!(
        ok(&v).clusters[0].discovery,
        DiscoveryType::Eds {
            service_name: "svc".into(),
            source: Default::default(),
        }
    );
    cluster_json(&mut v)["eds_cluster_config"]["eds_config"] =
        json!({"api_config_source": {"api_type": "GRPC"}});
    assert_eq!(
        errs(&v),
        vec![format!(
            "{CLUSTER_PATH}.eds_cluster_config.eds_config.api_config_source.grpc_services: missing required field"
        )]
    );

    let mut v = bench();
    cluster_json(&mut v)["type"] = json!("LOGICAL_DNS");
    let b = ok(&v);
    assert_eq!(b.clusters[0].discovery, DiscoveryType::LogicalDns);
    let eps = cluster_json(&mut v)["load_assignment"]["endpoints"][0]["lb_endpoints"].clone();
    let mut two = eps.as_array().expect("list").clone();
    two.extend(eps.as_array().expect("list").iter().cloned());
    two[1]["endpoint"]["address"]["socket_address"]["port_value"] = json!(9999);
    cluster_json(&mut v)["load_assignment"]["endpoints"][0]["lb_endpoints"] = json!(two);
    assert_eq!(
        errs(&v),
        vec![format!("{CLUSTER_PATH}.load_assignment: LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint")]
    );
}

#[test]
fn cluster_errors() {
    let mut v = bench();
    let c = cluster_json(&mut v);
    c["lb_policy"] = json!("CLUSTER_PROVIDED");
    c["type"] = json!("STATIC");
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"]["address"] = json!("backend.local");
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["load_balancing_weight"] = json!(0);
    c["typed_extension_protocol_options"]["envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions"] =
        json!({});
    c["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["@type"] =
        json!("type.googleapis.com/envoy.extensions.upstreams.http.v3.Wrong");
    c["transport_socket"] = json!({"name": "envoy.transport_sockets.alts"});
    let ep = format!("{CLUSTER_PATH}.load_assignment.endpoints[0].lb_endpoints[0]");
    let t = format!("{CLUSTER_PATH}.typed_extension_protocol_options");
    assert_eq!(
        errs(&v),
        vec![
            format!("unsupported: {CLUSTER_PATH}.lb_policy (CLUSTER_PROVIDED: use load_balancing_policy or a named lb_policy)"),
            format!("{ep}.load_balancing_weight: must be at least 1"),
            format!("{ep}.endpoint.address.socket_address.address: STATIC clusters need an IP address, found \"backend.local\" (use STRICT_DNS or LOGICAL_DNS for host names)"),
            format!("{t}[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"].@type: expected @type type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions for envoy.extensions.upstreams.http.v3.HttpProtocolOptions, found \"type.googleapis.com/envoy.extensions.upstreams.http.v3.Wrong\""),
            format!("unsupported: {t}[\"envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions\"]"),
            format!("unsupported: {CLUSTER_PATH}.transport_socket (transport socket envoy.transport_sockets.alts)"),
        ]
    );
}

#[test]
fn listener_addresses_must_be_ip_literals() {
    let mut v = bench();
    let sa = &mut v["static_resources"]["listeners"][0]["address"]["socket_address"];
    sa["address"] = json!("localhost");
    sa["resolver_name"] = json!("x");
    sa["protocol"] = json!("UDP");
    let p = "static_resources.listeners[0].address.socket_address";
    assert_eq!(
        errs(&v),
        vec![
            format!("unsupported: {p}.protocol (UDP: UDP arrives later)"),
            format!("unsupported: {p}.resolver_name"),
            format!("{p}.address: expected an IP address, found \"localhost\""),
        ]
    );
    let mut v = bench();
    v["static_resources"]["listeners"][0]["address"] =
        json!({"socket_address": {"address": "::", "port_value": 0}});
    assert_eq!(
        ok(&v).listeners[0].address,
        "[::]:0".parse::<SocketAddr>().expect("addr")
    );
}

#[test]
fn base64_decoder() {
    use super::route::base64_decode;
    assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
    assert_eq!(base64_decode("Zg==").as_deref(), Some(&b"f"[..]));
    assert_eq!(base64_decode("Zm8").as_deref(), Some(&b"fo"[..]));
    assert_eq!(base64_decode("Zm9v").as_deref(), Some(&b"foo"[..]));
    assert_eq!(base64_decode("-_8=").as_deref(), Some(&[0xfb, 0xff][..]));
    assert_eq!(base64_decode("Z"), None);
    assert_eq!(base64_decode("Zm9v!"), None);
}

#[test]
fn error_display_shapes() {
    let e = ConfigError::unsupported("a.b", Some("why"));
    assert_eq!(e.to_string(), "unsupported: a.b (why)");
    let e = ConfigError {
        path: "a.b".into(),
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "a.b: bad");
    assert!(!e.is_unsupported());
}

#[test]
fn duplicate_keys_and_odd_yaml_are_errors() {
    assert_eq!(
        errs_str("static_resources:\n  clusters:\n  - name: a\n    name: b\n"),
        vec!["static_resources.clusters[0]: duplicate entry with key \"name\" at line 3 column 5"]
    );
    assert_eq!(
        errs_str("{\"admin\": {}, \"admin\": {}}"),
        vec!["duplicate entry with key \"admin\""]
    );
    assert_eq!(errs_str("123: x\n"), vec!["unsupported: 123"]);
    for text in [
        "? [a]\n: b\n",
        "a: &x [*x]\n",
        "static_resources: {clusters: [{name: a, per_connection_buffer_limit_bytes: 99999999999999999999999}]}",
    ] {
        assert_eq!(errs_str(text).len(), 1, "{text}");
    }
}

/// Replacing any node of the bench configuration by a value of another
/// type yields errors or a configuration, never a panic.
#[test]
fn mutations_never_panic() {
    fn paths(v: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match v {
            Value::Object(m) => m.iter().for_each(|(k, c)| {
                paths(
                    c,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                )
            }),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, c)| paths(c, format!("{at}/{i}"), out)),
            _ => {}
        }
    }
    let base = bench();
    let mut all = Vec::new();
    paths(&base, String::new(), &mut all);
    let replacements = [
        json!(null),
        json!(-1),
        json!(1.5),
        json!("x"),
        json!(""),
        json!(true),
        json!([]),
        json!([{}]),
        json!({}),
        json!({"unknown": 1}),
    ];
    let mut failures = 0;
    for p in all.iter().skip(1) {
        for r in &replacements {
            let mut v = base.clone();
            if let Some(slot) = v.pointer_mut(p) {
                *slot = r.clone();
            }
            if load_value(&v).is_err() {
                failures += 1;
            }
        }
    }
    assert!(failures > all.len());
}

/// Random damage to a valid config (values swapped for other types, keys
/// renamed or dropped, lists emptied) never panics the loader, and every
/// refusal names a field path that exists in the damaged file's shape.
#[test]
fn damaged_configs_never_panic_and_errors_have_paths() {
    fn nodes(v: &Value, path: Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
        out.push(path.clone());
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let mut p = path.clone();
                    p.push(PathStep::Key(k.clone()));
                    nodes(child, p, out);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    let mut p = path.clone();
                    p.push(PathStep::Index(i));
                    nodes(child, p, out);
                }
            }
            _ => {}
        }
    }
    #[derive(Clone)]
    enum PathStep {
        Key(String),
        Index(usize),
    }
    fn at<'a>(v: &'a mut Value, path: &[PathStep]) -> &'a mut Value {
        path.iter().fold(v, |v, step| match step {
            PathStep::Key(k) => &mut v[k.as_str()],
            PathStep::Index(i) => &mut v[*i],
        })
    }
    let base = bench();
    let mut all = Vec::new();
    nodes(&base, Vec::new(), &mut all);
    let mut rng = fastrand::Rng::with_seed(0x6d657368);
    let replacements = [
        json!(null),
        json!(true),
        json!(-1),
        json!(4294967296u64),
        json!("1s"),
        json!("x"),
        json!(""),
        json!([]),
        json!([1, "a"]),
        json!({}),
        json!({"unknown": 1}),
    ];
    let mut refused = 0;
    for _ in 0..3000 {
        let mut v = base.clone();
        let path = &all[rng.usize(..all.len())];
        let target = at(&mut v, path);
        match rng.u8(..3) {
            0 => *target = replacements[rng.usize(..replacements.len())].clone(),
            1 => {
                if let Value::Object(m) = target {
                    if let Some(k) = m.keys().nth(rng.usize(..m.len().max(1))).cloned() {
                        let child = m.remove(&k).unwrap_or(Value::Null);
                        if rng.bool() {
                            m.insert(format!("{k}_typo"), child);
                        }
                    }
                }
            }
            _ => {
                if let Value::Array(a) = target {
                    a.clear();
                }
            }
        }
        // Must return, not panic.
        if let Err(errors) = load_str(&v.to_string()) {
            refused += 1;
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(!e.message.is_empty(), "empty message at {:?}", e.path);
            }
        }
    }
    assert!(
        refused > 1000,
        "only {refused} of 3000 damaged configs were refused"
    );
}

mod grpc_stats;
mod lb;

#[test]
fn hcm_path_normalization_fields() {
    let mut v = bench();
    assert_eq!(
        hcm_of(&ok(&v)).path_normalization,
        PathNormalization::default()
    );
    let h = hcm_json(&mut v);
    h["normalize_path"] = json!(true);
    h["merge_slashes"] = json!(true);
    h["path_with_escaped_slashes_action"] = json!("UNESCAPE_AND_REDIRECT");
    assert_eq!(
        hcm_of(&ok(&v)).path_normalization,
        PathNormalization {
            normalize_path: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashesAction::UnescapeAndRedirect,
        }
    );
    hcm_json(&mut v)["path_with_escaped_slashes_action"] = json!("DROP");
    let e = errs(&v);
    assert_eq!(e.len(), 1);
    assert!(e[0].contains("typed_config.path_with_escaped_slashes_action"));
}

#[test]
fn access_log_formats_and_filters() {
    use mesh_core::access_log::{AccessLogFilter as F, Comparison, JsonNode, LogFormatKind};
    let mut v = bench();
    let h = hcm_json(&mut v);
    let cmp = |op: &str, n: u32| json!({"comparison": {"op": op, "value": {"default_value": n, "runtime_key": "k"}}});
    h["access_log"] = json!([
        {"name": "envoy.access_loggers.stdout",
         "filter": {"and_filter": {"filters": [
             {"status_code_filter": cmp("GE", 500)},
             {"or_filter": {"filters": [
                 {"duration_filter": cmp("LE", 10)},
                 {"response_flag_filter": {"flags": ["UF", "UH"]}},
                 {"grpc_status_filter": {"statuses": ["UNAVAILABLE"], "exclude": true}},
                 {"header_filter": {"header": {"name": "x-debug", "present_match": true}}},
                 {"not_health_check_filter": {}}]}}]}},
         "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": {"code": "%RESPONSE_CODE%", "n": 1,
                                           "nested": {"m": "%REQ(:METHOD)%"}},
                           "omit_empty_values": true}}},
        {"name": "envoy.access_loggers.stderr", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
            "log_format": {"text_format_source": {"inline_string": "%PROTOCOL%\n"}}}},
    ]);
    let b = ok(&v);
    let logs = &hcm_of(&b).access_log;
    assert_eq!(logs[0].sink, AccessLogSink::Stdout);
    let f = logs[0].format.as_ref().unwrap();
    assert!(f.omit_empty_values);
    let LogFormatKind::Json(fields) = &f.kind else {
        panic!("{f:?}")
    };
    assert_eq!(fields[1], ("n".to_owned(), JsonNode::Literal("1".into())));
    assert!(matches!(&fields[2].1, JsonNode::Object(o) if o[0].0 == "m"));
    let Some(F::And(and)) = &logs[0].filter else {
        panic!("{:?}", logs[0].filter)
    };
    assert_eq!(and[0], F::StatusCode(Comparison::Ge, 500));
    let F::Or(or) = &and[1] else { panic!() };
    assert_eq!(or[0], F::Duration(Comparison::Le, 10));
    assert_eq!(or[1], F::ResponseFlag(vec!["UF".into(), "UH".into()]));
    assert_eq!(or[2], F::GrpcStatus(vec![14], true));
    assert!(matches!(&or[3], F::Header(m) if m.name == "x-debug"));
    assert_eq!(or[4], F::NotHealthCheck);
    assert_eq!(logs[1].sink, AccessLogSink::Stderr);
    assert!(logs[1].filter.is_none());
}

#[test]
fn access_log_format_and_filter_errors_name_the_field() {
    let mut v = bench();
    let h = hcm_json(&mut v);
    let stdout = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
    h["access_log"] = json!([
        {"name": "envoy.access_loggers.stdout", "typed_config": {"@type": stdout,
            "log_format": {"json_format": {"a": "%REQ(x):y%", "b": [1]}}}},
        {"name": "envoy.access_loggers.stdout", "typed_config": {"@type": stdout,
            "log_format": {"text_format": "a", "json_format": {}}}},
        {"name": "envoy.access_loggers.stdout",
         "filter": {"response_flag_filter": {"flags": ["XX"]}}},
        {"name": "envoy.access_loggers.stdout",
         "filter": {"and_filter": {"filters": [{"not_health_check_filter": {}}]}}},
        {"name": "envoy.access_loggers.stdout", "filter": {"traceable_filter": {}}},
        {"name": "envoy.access_loggers.stdout",
         "filter": {"status_code_filter": {"comparison": {"op": "GT", "value": {"runtime_key": "k"}}}}},
        {"name": "envoy.access_loggers.stdout", "typed_config": {"@type": stdout,
            "log_format": {"text_format": "%START_TIME%", "formatters": [{}]}}},
    ]);
    let got = errs(&v);
    assert_eq!(got.len(), 8, "{got:#?}");
    let at = |i: usize, rest: &str| format!("{HCM_PATH}.access_log[{i}].{rest}");
    for want in [
        at(
            0,
            "typed_config.log_format.json_format.a: %REQ(...):y%: the length is not a number",
        ),
        format!(
            "unsupported: {} (lists in json_format)",
            at(0, "typed_config.log_format.json_format.b")
        ),
        at(
            1,
            "typed_config.log_format: only one of text_format, json_format may be set",
        ),
        at(
            2,
            "filter.response_flag_filter.flags[0]: unknown response flag \"XX\"",
        ),
        at(
            3,
            "filter.and_filter.filters: at least 2 filters are required",
        ),
        format!(
            "unsupported: {} (access log filter traceable_filter)",
            at(4, "filter.traceable_filter")
        ),
        at(
            5,
            "filter.status_code_filter.comparison.op: expected one of EQ, GE, LE, found \"GT\"",
        ),
        format!(
            "unsupported: {} (formatter extensions are not supported)",
            at(6, "typed_config.log_format.formatters")
        ),
    ] {
        assert!(
            got.iter().any(|e| e.starts_with(&want)),
            "missing {want:?} in {got:#?}"
        );
    }
}

#[test]
fn http_and_protocol_inspectors() {
    let mut v = bench();
    let l = &mut v["static_resources"]["listeners"][0];
    l["listener_filters"] = json!([
        {"name": "envoy.filters.listener.tls_inspector"},
        {"name": "envoy.filters.listener.http_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}},
        {"name": "mesh.filters.listener.protocol_inspector", "typed_config": {
            "@type": "type.googleapis.com/mesh.filters.listener.protocol_inspector.v1.ProtocolInspector"}},
    ]);
    let b = ok(&v);
    let l = &b.listeners[0];
    assert!(l.tls_inspector && l.http_inspector && l.protocol_inspector);
    let l = &mut v["static_resources"]["listeners"][0];
    l["listener_filters"] = json!([
        {"name": "envoy.filters.listener.http_inspector"},
        {"name": "envoy.filters.listener.http_inspector"},
        {"name": "mesh.filters.listener.protocol_inspector", "typed_config": {
            "@type": "type.googleapis.com/mesh.filters.listener.protocol_inspector.v1.ProtocolInspector",
            "protocols": ["dubbo"]}},
    ]);
    let e = errs(&v);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].contains("listeners[0].listener_filters[1]") && e[0].contains("listed twice"));
    assert!(
        e[1].contains(
            "unsupported: static_resources.listeners[0].listener_filters[2].typed_config.protocols"
        ),
        "{e:?}"
    );
    let b = ok(&bench());
    assert!(!b.listeners[0].http_inspector && !b.listeners[0].protocol_inspector);
}
