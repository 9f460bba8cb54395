//! A direct path from an EDS `ClusterLoadAssignment` received over xDS to
//! its endpoints, for the plain assignments a control plane sends by the
//! thousand (addresses, ports, weights, priorities, localities, health).
//!
//! The general path turns every resource into proto3 JSON and reads it with
//! the configuration loader ([`super::xds::endpoints_from_json`]), which
//! names every field it refuses. At 100,000 endpoints that round trip is
//! most of the cost of applying EDS. Here the resource is decoded into the
//! generated protobuf types instead, and only an assignment whose every
//! field is one this path reads, with values the loader accepts, is taken.
//! Anything else (metadata, hostnames, health check config, named ports,
//! pipes, a policy, an invalid or duplicate address, an empty name, bytes
//! that do not decode, ...) returns `None` and goes the general way, so
//! errors and every less common field are handled by one loader only.
//! Every message is destructured without `..`: a field added to the
//! protobuf types breaks the build here until this path decides about it.

use std::collections::HashSet;
use std::net::IpAddr;

use mesh_core::config::{HealthStatus, LbEndpoint, Locality, LocalityLbEndpoints};
use mesh_xds::pb::envoy::config::core::v3 as core;
use mesh_xds::pb::envoy::config::endpoint::v3 as ep;
use mesh_xds::pb::google::protobuf::Any;
use prost::Message;

/// The type URL this path decodes.
const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The highest `priority` the loader accepts.
const MAX_PRIORITY: u32 = 128;

/// The `cluster_name` and endpoints of a plain assignment, exactly as
/// [`super::xds::endpoints_from_json`] reads them; `None` when the
/// assignment needs the general path.
pub fn endpoints_from_any(any: &Any) -> Option<(String, Vec<LocalityLbEndpoints>)> {
    if any.type_url != ENDPOINT {
        return None;
    }
    let ep::ClusterLoadAssignment {
        cluster_name,
        endpoints,
        named_endpoints,
        policy,
    } = ep::ClusterLoadAssignment::decode(any.value.as_slice()).ok()?;
    if cluster_name.is_empty() || !named_endpoints.is_empty() || policy.is_some() {
        return None;
    }
    let mut seen = HashSet::new();
    let localities = endpoints
        .into_iter()
        .map(|l| locality_endpoints(l, &mut seen))
        .collect::<Option<Vec<_>>>()?;
    Some((cluster_name, localities))
}

fn locality_endpoints(
    l: ep::LocalityLbEndpoints,
    seen: &mut HashSet<(IpAddr, u16)>,
) -> Option<LocalityLbEndpoints> {
    let ep::LocalityLbEndpoints {
        locality,
        metadata,
        lb_endpoints,
        load_balancing_weight,
        priority,
        proximity,
        lb_config,
    } = l;
    if metadata.is_some() || proximity.is_some() || lb_config.is_some() {
        return None;
    }
    if priority > MAX_PRIORITY {
        return None;
    }
    let load_balancing_weight = match load_balancing_weight.map(|w| w.value) {
        Some(0) => return None,
        w => w,
    };
    let locality = match locality {
        None => Locality::default(),
        Some(core::Locality {
            region,
            zone,
            sub_zone,
        }) => Locality {
            region,
            zone,
            sub_zone,
        },
    };
    let lb_endpoints = lb_endpoints
        .into_iter()
        .map(|e| lb_endpoint(e, seen))
        .collect::<Option<Vec<_>>>()?;
    Some(LocalityLbEndpoints {
        locality,
        priority,
        load_balancing_weight,
        socket_match: Default::default(),
        lb_endpoints,
    })
}

fn lb_endpoint(e: ep::LbEndpoint, seen: &mut HashSet<(IpAddr, u16)>) -> Option<LbEndpoint> {
    let ep::LbEndpoint {
        health_status,
        metadata,
        load_balancing_weight,
        host_identifier,
    } = e;
    if metadata.is_some() {
        return None;
    }
    let weight = match load_balancing_weight.map(|w| w.value) {
        Some(0) => return None,
        Some(w) => w,
        None => 1,
    };
    let health_status = match core::HealthStatus::try_from(health_status).ok()? {
        core::HealthStatus::Unknown => HealthStatus::Unknown,
        core::HealthStatus::Healthy => HealthStatus::Healthy,
        core::HealthStatus::Unhealthy
        | core::HealthStatus::Draining
        | core::HealthStatus::Timeout => HealthStatus::Unhealthy,
        core::HealthStatus::Degraded => HealthStatus::Degraded,
    };
    let Some(ep::lb_endpoint::HostIdentifier::Endpoint(endpoint)) = host_identifier else {
        return None;
    };
    let ep::Endpoint {
        address,
        health_check_config,
        hostname,
        additional_addresses,
        observability_name,
    } = endpoint;
    if health_check_config.is_some()
        || !hostname.is_empty()
        || !additional_addresses.is_empty()
        || !observability_name.is_empty()
    {
        return None;
    }
    let Some(core::address::Address::SocketAddress(sa)) = address?.address else {
        return None;
    };
    let core::SocketAddress {
        protocol,
        address: host,
        resolver_name,
        ipv4_compat,
        network_namespace_filepath,
        port_specifier,
    } = sa;
    if protocol != core::socket_address::Protocol::Tcp as i32
        || !resolver_name.is_empty()
        || ipv4_compat
        || !network_namespace_filepath.is_empty()
    {
        return None;
    }
    let Some(core::socket_address::PortSpecifier::PortValue(port)) = port_specifier else {
        return None;
    };
    let port = u16::try_from(port).ok().filter(|p| *p != 0)?;
    // The loader refuses host names here (EDS endpoints are IP addresses)
    // and the same address twice.
    let ip: IpAddr = host.parse().ok()?;
    if !seen.insert((ip, port)) {
        return None;
    }
    Some(LbEndpoint {
        host,
        port,
        weight,
        metadata: Default::default(),
        health_status,
        socket_match: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_xds::convert::{any_to_json, json_to_any};
    use serde_json::{json, Value};

    fn any(v: Value) -> Any {
        json_to_any(ENDPOINT, &v).unwrap()
    }

    /// What the general path makes of the same resource.
    fn general(a: &Any) -> Result<(String, Vec<LocalityLbEndpoints>), String> {
        super::super::xds::endpoints_from_json(&any_to_json(a).unwrap())
            .map_err(|e| format!("{e:?}"))
    }

    fn sa(host: &str, port: u32) -> Value {
        json!({"address": {"socket_address": {"address": host, "port_value": port}}})
    }

    /// Assignments this path takes give exactly what the loader gives.
    #[test]
    fn plain_assignments_match_the_loader() {
        let cases = [
            json!({"cluster_name": "c", "endpoints": [{"lb_endpoints": [
                {"endpoint": sa("127.0.0.1", 80)}, {"endpoint": sa("127.0.0.2", 80)},
                {"endpoint": sa("::1", 8080)}]}]}),
            json!({"cluster_name": "c", "endpoints": [
                {"locality": {"region": "r", "zone": "z", "sub_zone": "s"}, "priority": 1,
                 "load_balancing_weight": 7, "lb_endpoints": [
                    {"endpoint": sa("10.0.0.1", 1), "load_balancing_weight": 3,
                     "health_status": "DRAINING"},
                    {"endpoint": sa("10.0.0.2", 65535), "health_status": "DEGRADED"},
                    {"endpoint": sa("10.0.0.3", 9), "health_status": "HEALTHY"},
                    {"endpoint": sa("10.0.0.4", 9), "health_status": "TIMEOUT"},
                    {"endpoint": sa("10.0.0.5", 9), "health_status": "UNHEALTHY"}]},
                {"locality": {}, "priority": 128, "lb_endpoints": []}]}),
            json!({"cluster_name": "empty"}),
        ];
        for c in cases {
            let a = any(c.clone());
            let fast = endpoints_from_any(&a).unwrap_or_else(|| panic!("not taken: {c}"));
            assert_eq!(Ok(fast), general(&a), "{c}");
        }
    }

    /// Everything else goes the general way, errors included.
    #[test]
    fn other_assignments_take_the_general_path() {
        let one = |ep: Value| json!({"cluster_name": "c", "endpoints": [{"lb_endpoints": [ep]}]});
        let cases = [
            json!({"endpoints": [{"lb_endpoints": [{"endpoint": sa("10.0.0.1", 80)}]}]}),
            json!({"cluster_name": "c", "policy": {"overprovisioning_factor": 140}}),
            json!({"cluster_name": "c", "endpoints": [{"priority": 129, "lb_endpoints": []}]}),
            json!({"cluster_name": "c", "endpoints": [{"load_balancing_weight": 0}]}),
            json!({"cluster_name": "c", "endpoints": [{"metadata": {"filter_metadata": {
                "envoy.transport_socket_match": {"tlsMode": "istio"}}}}]}),
            json!({"cluster_name": "c", "endpoints": [
                {"lb_endpoints": [{"endpoint": sa("10.0.0.1", 80)}]},
                {"priority": 1, "lb_endpoints": [{"endpoint": sa("10.0.0.1", 80)}]}]}),
            one(json!({"endpoint": sa("10.0.0.1", 0)})),
            one(json!({"endpoint": sa("example.com", 80)})),
            one(json!({"endpoint": sa("10.0.0.1", 80), "load_balancing_weight": 0})),
            one(
                json!({"endpoint": sa("10.0.0.1", 80), "metadata": {"filter_metadata": {
                "envoy.lb": {"canary": true}}}}),
            ),
            one(json!({"endpoint": {"address": {"socket_address": {
                "address": "10.0.0.1", "port_value": 80}}, "hostname": "h"}})),
            one(json!({"endpoint": {"address": {"socket_address": {
                "address": "10.0.0.1", "named_port": "http"}}}})),
            one(json!({"endpoint": {"address": {"socket_address": {
                "address": "10.0.0.1", "port_value": 80, "protocol": "UDP"}}}})),
            one(json!({"endpoint": {"address": {"pipe": {"path": "/tmp/s"}}}})),
            one(json!({"endpoint": {}})),
            one(json!({"endpoint_name": "named"})),
        ];
        for c in cases {
            assert_eq!(endpoints_from_any(&any(c.clone())), None, "{c}");
        }
        // Not an assignment, or not decodable: the general path reports it.
        let mut a = any(json!({"cluster_name": "c"}));
        a.value = vec![0xff, 0xff, 0xff];
        assert_eq!(endpoints_from_any(&a), None);
        a.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(endpoints_from_any(&a), None);
    }
}
