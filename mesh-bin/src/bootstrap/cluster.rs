//! Clusters (Envoy `config.cluster.v3.Cluster`): discovery type, endpoints,
//! load-balancing policy and upstream protocol options.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use mesh_core::config::{
    Cluster, DiscoveryType, DnsLookupFamily, LbConfig, LbEndpoint, LbPolicy, LocalityLbEndpoints,
    UpstreamProtocol,
};

use super::listener::{DEFAULT_BUFFER_LIMIT, ONE_HOUR};
use super::reader::{one_of, Ctx, Obj};
use super::{endpoint_address, locality};

/// Envoy's default `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Envoy's default `dns_refresh_rate`.
const DNS_REFRESH_RATE: Duration = Duration::from_secs(5);

const HTTP_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_OPTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

const LB_REASON: &str = "use load_balancing_policy or a named lb_policy";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Static,
    StrictDns,
    LogicalDns,
    Eds,
    OriginalDst,
}

/// `static_resources.clusters`.
pub(crate) fn clusters(cx: &mut Ctx, sr: &mut Obj<'_>) -> Vec<Cluster> {
    let mut out = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, (path, v)) in sr.list(cx, "clusters").into_iter().enumerate() {
        let Some(o) = Obj::new(cx, path, v) else {
            continue;
        };
        out.extend(cluster(cx, o, i, &mut names));
    }
    out
}

fn cluster(
    cx: &mut Ctx,
    mut o: Obj<'_>,
    i: usize,
    names: &mut HashMap<String, usize>,
) -> Option<Cluster> {
    let name = o.req_string(cx, "name");
    if let Some(name) = &name {
        if let Some(first) = names.get(name) {
            cx.error(
                &o.at("name"),
                format!("duplicate cluster name {name:?} (also clusters[{first}])"),
            );
        } else {
            names.insert(name.clone(), i);
        }
    }
    let kind = o
        .enumeration(
            cx,
            "type",
            &[
                ("STATIC", Kind::Static),
                ("STRICT_DNS", Kind::StrictDns),
                ("LOGICAL_DNS", Kind::LogicalDns),
                ("EDS", Kind::Eds),
                ("ORIGINAL_DST", Kind::OriginalDst),
            ],
            &[],
        )
        .unwrap_or(Kind::Static);

    let eds_path = o.at("eds_cluster_config");
    let mut service_name = None;
    let mut source = None;
    if let Some(mut eds) = o.obj(cx, "eds_cluster_config") {
        if kind != Kind::Eds {
            cx.error(&eds_path, "only EDS clusters take eds_cluster_config");
        }
        service_name = eds.string(cx, "service_name").filter(|s| !s.is_empty());
        if let Some(src) = eds.obj(cx, "eds_config") {
            source = Some(super::xds::config_source(cx, src));
        }
        eds.finish(cx);
    }
    let discovery = match kind {
        Kind::Static => DiscoveryType::Static,
        Kind::StrictDns => DiscoveryType::StrictDns,
        Kind::LogicalDns => DiscoveryType::LogicalDns,
        Kind::Eds => DiscoveryType::Eds {
            service_name: service_name.unwrap_or_else(|| name.clone().unwrap_or_default()),
            source: source.unwrap_or_default(),
        },
        Kind::OriginalDst => DiscoveryType::OriginalDst(super::original_dst::cluster(cx, &mut o)),
    };
    if kind != Kind::OriginalDst {
        super::original_dst::refuse_cluster_fields(cx, &mut o);
    }

    let ct_path = o.at("connect_timeout");
    let connect_timeout = o.duration(cx, "connect_timeout").unwrap_or(CONNECT_TIMEOUT);
    if connect_timeout.is_zero() {
        cx.error(&ct_path, "must be greater than 0s");
    }
    let refused: Vec<(&str, &str)> = ["CLUSTER_PROVIDED", "LOAD_BALANCING_POLICY_CONFIG"]
        .iter()
        .map(|p| (*p, LB_REASON))
        .collect();
    let lb_policy = if kind == Kind::OriginalDst {
        super::original_dst::lb_policy(cx, &mut o);
        None
    } else {
        o.enumeration(
            cx,
            "lb_policy",
            &[
                ("ROUND_ROBIN", LbPolicy::RoundRobin),
                ("RANDOM", LbPolicy::Random),
                ("LEAST_REQUEST", LbPolicy::LeastRequest),
                ("RING_HASH", LbPolicy::RingHash),
                ("MAGLEV", LbPolicy::Maglev),
            ],
            &refused,
        )
    }
    .unwrap_or_default();
    let (lb_policy, mut lb) = super::lb::cluster_lb(cx, &mut o, lb_policy);

    let la_path = o.at("load_assignment");
    let localities = if kind == Kind::Eds {
        o.refuse(
            cx,
            "load_assignment",
            "EDS clusters receive their endpoints over xDS",
        );
        Vec::new()
    } else if kind == Kind::OriginalDst {
        super::original_dst::refuse_load_assignment(cx, &mut o);
        Vec::new()
    } else {
        match o.obj(cx, "load_assignment") {
            Some(la) => load_assignment(cx, la, kind, &mut lb),
            None => Vec::new(),
        }
    };
    let pipe = cx.pipe_endpoint.take();
    if kind == Kind::LogicalDns {
        let endpoints: usize = localities.iter().map(|l| l.lb_endpoints.len()).sum();
        if localities.len() != 1 || endpoints != 1 {
            cx.error(
                &la_path,
                "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
            );
        }
    }

    let typed_path = o.at("typed_extension_protocol_options");
    let typed = o
        .obj(cx, "typed_extension_protocol_options")
        .map(|t| protocol_options(cx, t));
    let h2_path = o.at("http2_protocol_options");
    let legacy_h2 = o.empty_obj(cx, "http2_protocol_options");
    let (mut protocol, idle_timeout, max_requests_per_connection) =
        typed.unwrap_or((None, Some(ONE_HOUR), None));
    if legacy_h2 {
        if protocol.is_some() {
            cx.error(
                &h2_path,
                format!("only one of http2_protocol_options and {typed_path} may be set"),
            );
        }
        protocol = Some(UpstreamProtocol::Http2);
    }

    let rate_path = o.at("dns_refresh_rate");
    let dns_refresh_rate = o
        .duration(cx, "dns_refresh_rate")
        .unwrap_or(DNS_REFRESH_RATE);
    if dns_refresh_rate < Duration::from_millis(1) {
        cx.error(&rate_path, "must be at least 1ms");
    }
    let dns_lookup_family = o
        .enumeration(
            cx,
            "dns_lookup_family",
            &[
                ("AUTO", DnsLookupFamily::Auto),
                ("V4_ONLY", DnsLookupFamily::V4Only),
                ("V6_ONLY", DnsLookupFamily::V6Only),
                ("V4_PREFERRED", DnsLookupFamily::V4Preferred),
                ("ALL", DnsLookupFamily::All),
            ],
            &[],
        )
        .unwrap_or_default();
    let per_connection_buffer_limit_bytes = o
        .u32(cx, "per_connection_buffer_limit_bytes")
        .unwrap_or(DEFAULT_BUFFER_LIMIT);
    let tls = o
        .obj(cx, "transport_socket")
        .and_then(|t| super::tls::upstream_socket(cx, t));
    let transport_socket_matches = super::socket_match::transport_socket_matches(cx, &mut o);
    // Cluster metadata (Istio's `istio.services`) is data for filters mesh
    // does not run, read by no load-balancing decision: accepted as on
    // endpoints.
    let istio_service = o.peek("metadata").and_then(super::istio::cluster_service);
    if let Some(m) = o.obj(cx, "metadata") {
        super::lb::lb_metadata(cx, m);
    }
    let health_check = super::health::health_checks(cx, &mut o);
    let outlier_detection = o
        .obj(cx, "outlier_detection")
        .map(|od| super::health::outlier_detection(cx, od));
    let mrpc_path = o.at("max_requests_per_connection");
    let cluster_mrpc = o.u32(cx, "max_requests_per_connection");
    if cluster_mrpc.is_some() && max_requests_per_connection.is_some() {
        cx.error(
            &mrpc_path,
            "only one of max_requests_per_connection and common_http_protocol_options.max_requests_per_connection may be set",
        );
    }
    let max_requests_per_connection = max_requests_per_connection
        .or(cluster_mrpc)
        .filter(|n| *n > 0);
    let circuit_breakers = o
        .obj(cx, "circuit_breakers")
        .map(|c| super::policy::circuit_breakers(cx, c))
        .unwrap_or_default();
    let upstream_bind = o
        .obj(cx, "upstream_bind_config")
        .and_then(|b| super::original_dst::bind_config(cx, b));
    let istio_metadata_exchange = super::istio::cluster_filters(cx, &mut o);
    o.finish(cx);
    Some(Cluster {
        name: name?,
        discovery,
        connect_timeout,
        lb_policy,
        localities,
        protocol: protocol.unwrap_or_default(),
        dns_refresh_rate,
        dns_lookup_family,
        idle_timeout,
        per_connection_buffer_limit_bytes,
        tls,
        transport_socket_matches,
        lb,
        health_check,
        outlier_detection,
        max_requests_per_connection,
        circuit_breakers,
        pipe,
        upstream_bind,
        istio_service,
        istio_metadata_exchange,
    })
}

pub(crate) fn load_assignment(
    cx: &mut Ctx,
    mut o: Obj<'_>,
    kind: Kind,
    lb: &mut LbConfig,
) -> Vec<LocalityLbEndpoints> {
    o.req_string(cx, "cluster_name");
    if let Some(mut p) = o.obj(cx, "policy") {
        let path = p.at("overprovisioning_factor");
        let factor = match p.peek("overprovisioning_factor") {
            Some(serde_json::Value::Object(_)) => {
                p.obj(cx, "overprovisioning_factor").and_then(|mut w| {
                    let v = w.u32(cx, "value");
                    w.finish(cx);
                    v
                })
            }
            _ => p.u32(cx, "overprovisioning_factor"),
        };
        match factor {
            Some(0) => cx.error(&path, "must be greater than 0"),
            Some(f) => lb.overprovisioning_factor = f,
            None => {}
        }
        if let Some(b) = p.bool(cx, "weighted_priority_health") {
            lb.weighted_priority_health = b;
        }
        p.empty_list(cx, "drop_overloads", "drop_overloads is not supported");
        p.finish(cx);
    }
    let mut seen: HashMap<(String, u16), String> = HashMap::new();
    let mut out = Vec::new();
    for (path, v) in o.list(cx, "endpoints") {
        let Some(mut l) = Obj::new(cx, path, v) else {
            continue;
        };
        let loc = l
            .obj(cx, "locality")
            .map(|x| locality(cx, x))
            .unwrap_or_default();
        let prio_path = l.at("priority");
        let priority = l.u32(cx, "priority").unwrap_or(0);
        if priority > 128 {
            cx.error(&prio_path, "must be at most 128");
        }
        let weight_path = l.at("load_balancing_weight");
        let load_balancing_weight = l.u32(cx, "load_balancing_weight");
        if load_balancing_weight == Some(0) {
            cx.error(&weight_path, "must be at least 1");
        }
        let socket_match = l
            .obj(cx, "metadata")
            .map(|m| super::lb::endpoint_metadata(cx, m).1)
            .unwrap_or_default();
        let mut lb_endpoints = Vec::new();
        for (epath, ev) in l.list(cx, "lb_endpoints") {
            if let Some(e) = Obj::new(cx, epath.clone(), ev) {
                if let Some(ep) = lb_endpoint(cx, e, kind) {
                    // The same address twice would double its share and
                    // split its state; Envoy keeps one host per address.
                    let key = (ep.host.clone(), ep.port);
                    if let Some(first) = seen.get(&key) {
                        cx.error(
                            &epath,
                            format!("duplicate endpoint {}:{} (also {first})", ep.host, ep.port),
                        );
                        continue;
                    }
                    seen.insert(key, epath);
                    lb_endpoints.push(ep);
                }
            }
        }
        l.finish(cx);
        out.push(LocalityLbEndpoints {
            locality: loc,
            priority,
            load_balancing_weight,
            lb_endpoints,
            socket_match,
        });
    }
    o.finish(cx);
    out
}

fn lb_endpoint(cx: &mut Ctx, mut o: Obj<'_>, kind: Kind) -> Option<LbEndpoint> {
    let endpoint = match o.obj(cx, "endpoint") {
        Some(mut ep) => {
            let addr_path = ep.at("address");
            let addr = match ep.obj(cx, "address") {
                Some(mut a) if a.has("pipe") => {
                    if let Some(mut p) = a.obj(cx, "pipe") {
                        cx.pipe_endpoint = p.req_string(cx, "path");
                        p.u32(cx, "mode");
                        p.finish(cx);
                    }
                    a.finish(cx);
                    None
                }
                Some(a) => endpoint_address(cx, a).filter(|(_, port, _)| {
                    // Port 0 would only fail at connect time: refuse it here.
                    if *port == 0 {
                        cx.error(
                            &format!("{addr_path}.socket_address.port_value"),
                            "an endpoint needs a port from 1 to 65535",
                        );
                    }
                    *port != 0
                }),
                None => {
                    if !ep.has("address") {
                        cx.missing(&ep.at("address"));
                    }
                    None
                }
            };
            ep.finish(cx);
            addr
        }
        None => {
            if !o.has("endpoint") {
                cx.missing(&o.at("endpoint"));
            }
            None
        }
    };
    let weight_path = o.at("load_balancing_weight");
    let weight = o.u32(cx, "load_balancing_weight").unwrap_or(1);
    if weight == 0 {
        cx.error(&weight_path, "must be at least 1");
    }
    let (metadata, socket_match) = match o.obj(cx, "metadata") {
        Some(m) => super::lb::endpoint_metadata(cx, m),
        None => Default::default(),
    };
    let health_status = super::lb::health_status(cx, &mut o);
    o.finish(cx);
    let (host, port, host_path) = endpoint?;
    if kind == Kind::Static && host.parse::<IpAddr>().is_err() {
        cx.error(
            &host_path,
            format!("STATIC clusters need an IP address, found {host:?} (use STRICT_DNS or LOGICAL_DNS for host names)"),
        );
        return None;
    }
    Some(LbEndpoint {
        host,
        port,
        weight,
        metadata,
        health_status,
        socket_match,
    })
}

/// `typed_extension_protocol_options`: the upstream protocol and idle
/// timeout from `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`.
fn protocol_options(
    cx: &mut Ctx,
    mut o: Obj<'_>,
) -> (Option<UpstreamProtocol>, Option<Duration>, Option<u32>) {
    let mut protocol = None;
    let mut idle_timeout = Some(ONE_HOUR);
    let mut max_requests = None;
    for (key, path, v) in o.take_all() {
        if key != HTTP_OPTIONS_KEY {
            cx.unsupported(&path, None);
            continue;
        }
        let Some(mut h) = Obj::new(cx, path, v) else {
            continue;
        };
        let ty_path = h.at("@type");
        match h.string(cx, "@type") {
            Some(t) if t == HTTP_OPTIONS_TYPE => {}
            Some(t) => cx.error(
                &ty_path,
                format!("expected @type {HTTP_OPTIONS_TYPE} for {HTTP_OPTIONS_KEY}, found {t:?}"),
            ),
            None => {
                if !h.has("@type") {
                    cx.missing(&ty_path);
                }
            }
        }
        h.refuse(
            cx,
            "auto_config",
            "ALPN protocol selection arrives with TLS",
        );
        let keys = ["explicit_http_config", "use_downstream_protocol_config"];
        let required = !h.has("auto_config");
        protocol = match one_of(cx, &h, &keys, required) {
            Some("explicit_http_config") => h.obj(cx, "explicit_http_config").and_then(|mut e| {
                let p = match one_of(
                    cx,
                    &e,
                    &["http_protocol_options", "http2_protocol_options"],
                    !e.has("http3_protocol_options"),
                ) {
                    Some("http_protocol_options") => {
                        e.empty_obj(cx, "http_protocol_options");
                        Some(UpstreamProtocol::Http1)
                    }
                    Some(_) => {
                        e.empty_obj(cx, "http2_protocol_options");
                        Some(UpstreamProtocol::Http2)
                    }
                    None => {
                        e.take("http_protocol_options");
                        e.take("http2_protocol_options");
                        None
                    }
                };
                e.finish(cx);
                p
            }),
            Some(_) => h.obj(cx, "use_downstream_protocol_config").map(|mut d| {
                d.empty_obj(cx, "http_protocol_options");
                d.empty_obj(cx, "http2_protocol_options");
                d.finish(cx);
                UpstreamProtocol::Downstream
            }),
            None => {
                for k in keys {
                    h.take(k);
                }
                None
            }
        };
        if let Some(mut c) = h.obj(cx, "common_http_protocol_options") {
            idle_timeout = c.timeout(cx, "idle_timeout", Some(ONE_HOUR));
            max_requests = c.u32(cx, "max_requests_per_connection");
            c.finish(cx);
        }
        h.finish(cx);
    }
    o.finish(cx);
    (protocol, idle_timeout, max_requests)
}
