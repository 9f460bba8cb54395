//! Loader tests for `health_checks`, `outlier_detection` and
//! `max_requests_per_connection`.

use std::time::Duration;

use mesh_core::config::*;

use super::load_str;

const P: &str = "static_resources.clusters[0]";

/// A one-cluster bootstrap with `extra` (YAML flow-mapping entries) added to
/// the cluster.
fn config(extra: &str) -> String {
    format!(
        "static_resources:\n  clusters:\n  - name: web\n    load_assignment:\n      cluster_name: web\n      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 80}}}}}}}}]}}]\n{extra}"
    )
}

fn cluster(extra: &str) -> Cluster {
    match load_str(&config(extra)) {
        Ok(b) => b.clusters.into_iter().next().expect("one cluster"),
        Err(e) => panic!("expected the config to load, got:\n{e}"),
    }
}

fn errs(extra: &str) -> Vec<String> {
    match load_str(&config(extra)) {
        Ok(b) => panic!("expected errors, got {b:?}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn http_health_check_with_defaults() {
    let c = cluster(
        "    health_checks:\n    - timeout: 1s\n      interval: 2s\n      unhealthy_threshold: 3\n      healthy_threshold: 1\n      http_health_check: {path: /healthz, request_headers_to_add: [{header: {key: x-hc, value: '1'}}]}\n",
    );
    let hc = c.health_check.expect("a health check");
    assert_eq!(hc.timeout, Duration::from_secs(1));
    assert_eq!(hc.interval, Duration::from_secs(2));
    assert_eq!(hc.unhealthy_interval, Duration::from_secs(2));
    assert_eq!(hc.unhealthy_edge_interval, Duration::from_secs(2));
    assert_eq!(hc.healthy_edge_interval, Duration::from_secs(2));
    assert_eq!(hc.no_traffic_interval, Duration::from_secs(60));
    match hc.checker {
        HealthChecker::Http(h) => {
            assert_eq!(h.path, "/healthz");
            assert_eq!(h.expected_statuses, vec![(200, 201)]);
            assert_eq!(h.request_headers_to_add, vec![("x-hc".into(), "1".into())]);
            assert!(!h.http2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tcp_and_grpc_health_checks() {
    let c = cluster(
        "    health_checks:\n    - {timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {send: {text: '50494e47'}, receive: [{text: '504f4e47'}]}}\n",
    );
    match c.health_check.map(|h| h.checker) {
        Some(HealthChecker::Tcp(t)) => {
            assert_eq!(t.send, b"PING");
            assert_eq!(t.receive, vec![b"PONG".to_vec()]);
        }
        other => panic!("{other:?}"),
    }
    let c = cluster(
        "    health_checks:\n    - {timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, grpc_health_check: {service_name: svc, authority: a.b}}\n",
    );
    match c.health_check.map(|h| h.checker) {
        Some(HealthChecker::Grpc(g)) => {
            assert_eq!(g.service_name, "svc");
            assert_eq!(g.authority.as_deref(), Some("a.b"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_health_checks_name_the_field() {
    let hc = "    health_checks:\n    - ";
    let base = "timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1";
    let cases: Vec<(String, String)> = vec![
        (
            format!("{hc}{{timeout: 1s, interval: 0s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {{}}}}\n"),
            format!("{P}.health_checks[0].interval: must be greater than 0s"),
        ),
        (
            format!("{hc}{{timeout: 1s, interval: -1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {{}}}}\n"),
            format!("{P}.health_checks[0].interval: invalid duration \"-1s\": must not be negative"),
        ),
        (
            format!("{hc}{{timeout: 1s, interval: 1s, unhealthy_threshold: 0, healthy_threshold: 1, tcp_health_check: {{}}}}\n"),
            format!("{P}.health_checks[0].unhealthy_threshold: must be at least 1"),
        ),
        (
            format!("{hc}{{interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {{}}}}\n"),
            format!("{P}.health_checks[0].timeout: missing required field"),
        ),
        (
            format!("{hc}{{{base}}}\n"),
            format!("{P}.health_checks[0]: one of http_health_check, tcp_health_check, grpc_health_check is required"),
        ),
        (
            format!("{hc}{{{base}, redis_health_check: {{}}}}\n"),
            format!("unsupported: {P}.health_checks[0].redis_health_check"),
        ),
        (
            format!("{hc}{{{base}, custom_health_check: {{name: x}}}}\n"),
            format!("unsupported: {P}.health_checks[0].custom_health_check (only http_health_check, tcp_health_check and grpc_health_check are supported)"),
        ),
        (
            format!("{hc}{{{base}, http_health_check: {{path: /, expected_statuses: [{{start: 200, end: 700}}]}}}}\n"),
            format!("{P}.health_checks[0].http_health_check.expected_statuses[0]: invalid http expected status range: expecting end <= 600, but found 700"),
        ),
        (
            format!("{hc}{{{base}, tcp_health_check: {{send: {{text: 50494e47}}}}}}\n"),
            format!("{P}.health_checks[0].tcp_health_check.send.text: the hex payload was read as the number 5.0494e+51; quote it (text: \"...\")"),
        ),
        (
            format!("{hc}{{{base}, tcp_health_check: {{send: {{text: zz}}}}}}\n"),
            format!("{P}.health_checks[0].tcp_health_check.send.text: \"zz\" is not a non-empty hex string"),
        ),
        (
            format!("{hc}{{{base}, tcp_health_check: {{}}}}\n    - {{{base}, tcp_health_check: {{}}}}\n"),
            format!("{P}.health_checks: at most one health check is supported per cluster (as in Envoy)"),
        ),
    ];
    for (extra, want) in cases {
        let got = errs(&extra);
        assert!(
            got.contains(&want),
            "want {want:?}\ngot {got:?}\nfor {extra}"
        );
    }
}

#[test]
fn outlier_detection_defaults_and_fields() {
    let c = cluster("    outlier_detection: {}\n");
    assert_eq!(c.outlier_detection, Some(OutlierDetection::default()));
    let c = cluster(
        "    outlier_detection: {consecutive_5xx: 2, interval: 1s, base_ejection_time: 2s, max_ejection_percent: 100, split_external_local_origin_errors: true, enforcing_consecutive_gateway_failure: 100}\n",
    );
    let od = c.outlier_detection.expect("outlier detection");
    assert_eq!(od.consecutive_5xx, 2);
    assert_eq!(od.interval, Duration::from_secs(1));
    assert_eq!(od.base_ejection_time, Duration::from_secs(2));
    assert_eq!(od.max_ejection_percent, 100);
    assert!(od.split_external_local_origin_errors);
    assert_eq!(od.enforcing_consecutive_gateway_failure, 100);
}

#[test]
fn bad_outlier_detection_names_the_field() {
    for (extra, want) in [
        (
            "    outlier_detection: {max_ejection_percent: 101}\n",
            format!("{P}.outlier_detection.max_ejection_percent: must be at most 100, found 101"),
        ),
        (
            "    outlier_detection: {interval: 0s}\n",
            format!("{P}.outlier_detection.interval: must be greater than 0s"),
        ),
        (
            "    outlier_detection: {consecutive_5xx: 0}\n",
            format!("{P}.outlier_detection.consecutive_5xx: must be at least 1"),
        ),
        (
            "    outlier_detection: {enforcing_success_rate: 200}\n",
            format!("{P}.outlier_detection.enforcing_success_rate: must be at most 100, found 200"),
        ),
        (
            "    outlier_detection: {max_ejection_time_jitter: 1s}\n",
            format!("unsupported: {P}.outlier_detection.max_ejection_time_jitter"),
        ),
    ] {
        let got = errs(extra);
        assert!(got.contains(&want), "want {want:?}\ngot {got:?}");
    }
}

#[test]
fn max_requests_per_connection_from_either_place() {
    assert_eq!(
        cluster("    max_requests_per_connection: 3\n").max_requests_per_connection,
        Some(3)
    );
    let typed = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http_protocol_options: {}}\n        common_http_protocol_options: {max_requests_per_connection: 5}\n";
    assert_eq!(cluster(typed).max_requests_per_connection, Some(5));
    assert_eq!(cluster("").max_requests_per_connection, None);
}

#[test]
fn transport_socket_match_criteria_and_tls_options_are_read() {
    let c = cluster(
        "    health_checks:\n    - {timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}, transport_socket_match_criteria: {tlsMode: istio}}\n",
    );
    let criteria = c
        .health_check
        .and_then(|h| h.transport_socket_match_criteria)
        .expect("criteria");
    assert_eq!(
        criteria.get("tlsMode"),
        Some(&MetadataValue::String("istio".into()))
    );
    let c = cluster(
        "    health_checks:\n    - {timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}, tls_options: {alpn_protocols: [hc, h2]}}\n",
    );
    assert_eq!(
        c.health_check.map(|h| h.tls_alpn),
        Some(vec!["hc".into(), "h2".into()])
    );
    let e = errs(
        "    health_checks:\n    - {timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}, tls_options: {alpn_protocols: ['']}}\n",
    );
    assert!(
        e.iter()
            .any(|e| e.contains("health_checks[0].tls_options.alpn_protocols[0]")),
        "{e:?}"
    );
}
