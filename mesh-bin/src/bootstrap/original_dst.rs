//! The cluster fields of `type: ORIGINAL_DST` (Istio's `PassthroughCluster`
//! and `InboundPassthroughClusterIpv4`): `lb_policy: CLUSTER_PROVIDED`,
//! `cleanup_interval` and `original_dst_lb_config`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mesh_core::config::OriginalDst;

use super::reader::{Ctx, Obj};

/// Envoy's default `cleanup_interval` (5 s).
const CLEANUP_INTERVAL: Duration = Duration::from_secs(5);

/// Envoy's default `original_dst_lb_config.http_header_name`.
pub(crate) const DEFAULT_HEADER: &str = "x-envoy-original-dst-host";

/// The ORIGINAL_DST settings of a cluster.
pub(crate) fn cluster(cx: &mut Ctx, o: &mut Obj<'_>) -> OriginalDst {
    let ci_path = o.at("cleanup_interval");
    let cleanup_interval = o
        .duration(cx, "cleanup_interval")
        .unwrap_or(CLEANUP_INTERVAL);
    if cleanup_interval < Duration::from_millis(1) {
        cx.error(&ci_path, "must be at least 1ms");
    }
    let mut out = OriginalDst {
        cleanup_interval,
        use_http_header: false,
        header: DEFAULT_HEADER.to_owned(),
        port_override: None,
    };
    if let Some(mut c) = o.obj(cx, "original_dst_lb_config") {
        out.use_http_header = c.bool(cx, "use_http_header").unwrap_or(false);
        let name_path = c.at("http_header_name");
        if let Some(h) = c.string(cx, "http_header_name").filter(|h| !h.is_empty()) {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                cx.error(&name_path, format!("{h:?} is not a valid header name"));
            }
            out.header = h.to_ascii_lowercase();
        }
        let port_path = c.at("upstream_port_override");
        match c.u32(cx, "upstream_port_override") {
            Some(p) if (1..=65535).contains(&p) => out.port_override = u16::try_from(p).ok(),
            Some(_) => cx.error(&port_path, "must be a port from 1 to 65535"),
            None => {}
        }
        c.refuse(
            cx,
            "metadata_key",
            "the destination from dynamic metadata is not supported",
        );
        c.finish(cx);
    }
    out
}

/// Fields only ORIGINAL_DST clusters take.
pub(crate) fn refuse_cluster_fields(cx: &mut Ctx, o: &mut Obj<'_>) {
    for key in ["original_dst_lb_config", "cleanup_interval"] {
        if o.take(key).is_some() {
            cx.error(&o.at(key), "only ORIGINAL_DST clusters take this field");
        }
    }
}

/// An ORIGINAL_DST cluster takes only `lb_policy: CLUSTER_PROVIDED` (as
/// Envoy; the loader's lb_policy reading then sees no value).
pub(crate) fn lb_policy(cx: &mut Ctx, o: &mut Obj<'_>) {
    let path = o.at("lb_policy");
    match o.take("lb_policy").and_then(|v| v.as_str()) {
        Some("CLUSTER_PROVIDED") => {}
        Some(p) => cx.error(
            &path,
            format!(
                "{p} is not valid for an ORIGINAL_DST cluster: only CLUSTER_PROVIDED is allowed"
            ),
        ),
        None => cx.error(
            &path,
            "an ORIGINAL_DST cluster needs lb_policy: CLUSTER_PROVIDED",
        ),
    }
}

/// `upstream_bind_config`: the source address of upstream connections.
pub(crate) fn bind_config(cx: &mut Ctx, mut o: Obj<'_>) -> Option<SocketAddr> {
    let path = o.at("source_address");
    let addr = match o.obj(cx, "source_address") {
        Some(mut sa) => {
            let ip = sa.req_string(cx, "address");
            let port_path = sa.at("port_value");
            let port = sa.u32(cx, "port_value").unwrap_or(0);
            let port = u16::try_from(port).ok().or_else(|| {
                cx.error(&port_path, "must be a port from 0 to 65535");
                None
            });
            sa.finish(cx);
            let ip_path = format!("{path}.address");
            match ip.map(|ip| (ip.parse::<IpAddr>(), ip)) {
                Some((Ok(ip), _)) => port.map(|p| SocketAddr::new(ip, p)),
                Some((Err(_), ip)) => {
                    cx.error(&ip_path, format!("expected an IP address, found {ip:?}"));
                    None
                }
                None => None,
            }
        }
        None => {
            if !o.has("source_address") {
                cx.missing(&path);
            }
            None
        }
    };
    if o.peek("freebind").and_then(|v| v.as_bool()) == Some(false) {
        o.take("freebind");
    }
    o.finish(cx);
    addr
}

/// ORIGINAL_DST clusters create their hosts; configured ones are refused.
pub(crate) fn refuse_load_assignment(cx: &mut Ctx, o: &mut Obj<'_>) {
    let path = o.at("load_assignment");
    if let Some(la) = o.take("load_assignment") {
        let empty = la
            .get("endpoints")
            .and_then(|e| e.as_array())
            .is_none_or(|e| e.is_empty());
        if !empty {
            cx.error(&path, "ORIGINAL_DST clusters must have no endpoints");
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::config::{DiscoveryType, OriginalDst};
    use serde_json::{json, Value};

    fn load(v: &Value) -> Result<mesh_core::config::Bootstrap, Vec<String>> {
        super::super::load_str(&v.to_string())
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/istio_capture.yaml"
        );
        yaml_serde::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Istio's capture listeners and clusters load whole, as Istio means
    /// them.
    #[test]
    fn istio_capture_fixture_loads_whole() {
        let b = load(&fixture()).unwrap();
        let by_name = |n: &str| b.listeners.iter().find(|l| l.name == n).unwrap();
        let out = by_name("virtualOutbound");
        assert!(out.original_dst && out.use_original_dst && out.bind_to_port);
        // The blackhole chain, then the catch-all `default_filter_chain`.
        assert!(out.default_filter_chain);
        assert_eq!(out.filter_chains.len(), 2);
        assert_eq!(out.filter_chains[1].name, "virtualOutbound-catchall-tcp");
        let port = by_name("0.0.0.0_8080");
        assert!(!port.bind_to_port && !port.use_original_dst && !port.original_dst);
        let inbound = by_name("virtualInbound");
        assert!(inbound.original_dst && !inbound.use_original_dst);
        let pass = b
            .clusters
            .iter()
            .find(|c| c.name == "PassthroughCluster")
            .unwrap();
        assert_eq!(
            pass.discovery,
            DiscoveryType::OriginalDst(OriginalDst {
                cleanup_interval: std::time::Duration::from_secs(5),
                use_http_header: false,
                header: "x-envoy-original-dst-host".into(),
                port_override: None,
            })
        );
        let inbound = b
            .clusters
            .iter()
            .find(|c| c.name == "inbound|8080||")
            .unwrap();
        let DiscoveryType::OriginalDst(od) = &inbound.discovery else {
            panic!("ORIGINAL_DST");
        };
        assert_eq!(od.cleanup_interval, std::time::Duration::from_secs(60));
        assert_eq!(inbound.upstream_bind, Some("127.0.0.6:0".parse().unwrap()));
    }

    fn cluster(extra: Value) -> Value {
        let mut c = json!({"name": "o", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "1s"});
        if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
            c.extend(extra);
        }
        json!({"static_resources": {"clusters": [c]}})
    }

    #[test]
    fn original_dst_lb_config() {
        let b = load(&cluster(json!({"original_dst_lb_config": {
            "use_http_header": true, "http_header_name": "X-Dst", "upstream_port_override": 9000}})))
        .unwrap();
        assert_eq!(
            b.clusters[0].discovery,
            DiscoveryType::OriginalDst(OriginalDst {
                cleanup_interval: std::time::Duration::from_secs(5),
                use_http_header: true,
                header: "x-dst".into(),
                port_override: Some(9000),
            })
        );
    }

    #[test]
    fn original_dst_errors_name_the_field() {
        let p = "static_resources.clusters[0]";
        let cases = [
            (
                json!({"lb_policy": "ROUND_ROBIN"}),
                format!("{p}.lb_policy: ROUND_ROBIN is not valid for an ORIGINAL_DST cluster: only CLUSTER_PROVIDED is allowed"),
            ),
            (
                json!({"lb_policy": null}),
                format!("{p}.lb_policy: an ORIGINAL_DST cluster needs lb_policy: CLUSTER_PROVIDED"),
            ),
            (
                json!({"load_assignment": {"cluster_name": "o", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}}}]}]}}),
                format!("{p}.load_assignment: ORIGINAL_DST clusters must have no endpoints"),
            ),
            (
                json!({"original_dst_lb_config": {"upstream_port_override": 70000}}),
                format!("{p}.original_dst_lb_config.upstream_port_override: must be a port from 1 to 65535"),
            ),
            (
                json!({"original_dst_lb_config": {"metadata_key": {"key": "k"}}}),
                format!("unsupported: {p}.original_dst_lb_config.metadata_key (the destination from dynamic metadata is not supported)"),
            ),
            (
                json!({"cleanup_interval": "0s"}),
                format!("{p}.cleanup_interval: must be at least 1ms"),
            ),
            (
                json!({"upstream_bind_config": {"source_address": {"address": "localhost"}}}),
                format!("{p}.upstream_bind_config.source_address.address: expected an IP address, found \"localhost\""),
            ),
            (
                json!({"upstream_bind_config": {"source_address": {"address": "127.0.0.6"}, "freebind": true}}),
                format!("unsupported: {p}.upstream_bind_config.freebind"),
            ),
            (
                json!({"upstream_bind_config": {}}),
                format!("{p}.upstream_bind_config.source_address: missing required field"),
            ),
        ];
        for (extra, want) in cases {
            let errs = load(&cluster(extra.clone())).unwrap_err();
            assert_eq!(errs, vec![want], "{extra}");
        }
        let mut v = cluster(json!({}));
        v["static_resources"]["clusters"][0]["type"] = json!("STATIC");
        v["static_resources"]["clusters"][0]["cleanup_interval"] = json!("1s");
        v["static_resources"]["clusters"][0]["lb_policy"] = json!("ROUND_ROBIN");
        assert_eq!(
            load(&v).unwrap_err(),
            vec![format!(
                "{p}.cleanup_interval: only ORIGINAL_DST clusters take this field"
            )]
        );
    }

    #[test]
    fn listener_filter_twice_is_an_error() {
        let mut v = fixture();
        let f = v["static_resources"]["listeners"][0]["listener_filters"][0].clone();
        v["static_resources"]["listeners"][0]["listener_filters"]
            .as_array_mut()
            .unwrap()
            .push(f);
        assert_eq!(
            load(&v).unwrap_err(),
            vec![
                "static_resources.listeners[0].listener_filters[1]: envoy.filters.listener.original_dst is listed twice"
                    .to_string()
            ]
        );
    }
}
