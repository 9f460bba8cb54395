//! Endpoint discovery for STATIC, STRICT_DNS and LOGICAL_DNS clusters.
//!
//! STATIC endpoints are IP literals taken as they are. STRICT_DNS resolves
//! every host name and makes an endpoint of every address; LOGICAL_DNS keeps
//! one endpoint per host name (its first address). Both re-resolve every
//! `dns_refresh_rate`; a failed resolution keeps the previous endpoints, as
//! Envoy does, so a DNS outage does not empty a cluster.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::config::socket_match::resolve_transport_socket;
use mesh_core::config::{Cluster, DiscoveryType, DnsLookupFamily, LbEndpoint, LocalityLbEndpoints};

use crate::{Balancer, EndpointSpec};

/// The endpoints of a STATIC cluster. Errors name the endpoint whose address
/// is not an IP literal.
pub fn static_endpoints(cluster: &Cluster) -> Result<Vec<EndpointSpec>, String> {
    let mut out = Vec::new();
    for (li, loc) in cluster.localities.iter().enumerate() {
        for (ei, ep) in loc.lb_endpoints.iter().enumerate() {
            let ip: IpAddr = ep.host.parse().map_err(|_| {
                format!(
                    "load_assignment.endpoints[{li}].lb_endpoints[{ei}]: {:?} is not an IP address (use type STRICT_DNS for host names)",
                    ep.host
                )
            })?;
            out.push(spec(cluster, loc, ep, SocketAddr::new(ip, ep.port)));
        }
    }
    Ok(out)
}

/// The endpoint at `addr` made of `ep` (a host name may give several).
fn spec(
    cluster: &Cluster,
    loc: &LocalityLbEndpoints,
    ep: &LbEndpoint,
    addr: SocketAddr,
) -> EndpointSpec {
    EndpointSpec {
        addr,
        hostname: ep.host.clone(),
        weight: ep.weight,
        priority: loc.priority,
        locality: loc.locality.clone(),
        locality_weight: loc.load_balancing_weight,
        metadata: ep.metadata.clone(),
        health_status: ep.health_status,
        transport_socket: socket(cluster, loc, ep),
    }
}

/// The `transport_socket_matches` entry an endpoint uses.
fn socket(cluster: &Cluster, loc: &LocalityLbEndpoints, ep: &LbEndpoint) -> Option<u32> {
    if cluster.transport_socket_matches.is_empty() {
        return None;
    }
    resolve_transport_socket(
        &cluster.transport_socket_matches,
        &ep.socket_match,
        &loc.socket_match,
    )
}

fn family_filter(family: DnsLookupFamily, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    match family {
        DnsLookupFamily::V4Only => addrs.into_iter().filter(SocketAddr::is_ipv4).collect(),
        DnsLookupFamily::V6Only => addrs.into_iter().filter(SocketAddr::is_ipv6).collect(),
        DnsLookupFamily::V4Preferred | DnsLookupFamily::Auto => {
            let preferred_v4 = family == DnsLookupFamily::V4Preferred;
            let (v4, v6): (Vec<_>, Vec<_>) = addrs.into_iter().partition(SocketAddr::is_ipv4);
            match (preferred_v4, v4.is_empty(), v6.is_empty()) {
                (true, false, _) | (false, false, true) => v4,
                (_, _, false) if !preferred_v4 => v6,
                _ => {
                    if v4.is_empty() {
                        v6
                    } else {
                        v4
                    }
                }
            }
        }
        DnsLookupFamily::All => addrs,
    }
}

/// Resolves a DNS cluster's host names once. `Err` when any host fails to
/// resolve (the caller keeps the previous endpoints).
pub async fn resolve(cluster: &Cluster) -> Result<Vec<EndpointSpec>, String> {
    let logical = cluster.discovery == DiscoveryType::LogicalDns;
    let mut out = Vec::new();
    for loc in &cluster.localities {
        for ep in &loc.lb_endpoints {
            let addrs: Vec<SocketAddr> = match ep.host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, ep.port)],
                Err(_) => tokio::net::lookup_host((ep.host.as_str(), ep.port))
                    .await
                    .map_err(|e| format!("resolving {:?}: {e}", ep.host))?
                    .collect(),
            };
            let mut addrs = family_filter(cluster.dns_lookup_family, addrs);
            let mut seen = std::collections::HashSet::new();
            addrs.retain(|a| seen.insert(*a));
            if logical {
                addrs.truncate(1);
            }
            out.extend(addrs.into_iter().map(|addr| spec(cluster, loc, ep, addr)));
        }
    }
    Ok(out)
}

/// Re-resolves a DNS cluster every `dns_refresh_rate` until `stop` fires,
/// updating `balancer` when the answer changes and then calling
/// `on_change` with the new number of endpoints.
pub async fn refresh_loop(
    cluster: Cluster,
    balancer: Arc<Balancer>,
    stop: tokio_util::sync::CancellationToken,
    on_change: impl Fn(usize) + Send + 'static,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cluster.dns_refresh_rate) => {}
            _ = stop.cancelled() => return,
        }
        match resolve(&cluster).await {
            Ok(specs) => {
                if balancer.update(specs) {
                    on_change(balancer.endpoints().endpoints.len());
                    tracing::info!(cluster = %cluster.name, "DNS answer changed; endpoints updated");
                }
            }
            Err(e) => {
                tracing::warn!(cluster = %cluster.name, error = %e, "DNS refresh failed; keeping the previous endpoints");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::{LbEndpoint, LocalityLbEndpoints};
    use std::time::Duration;

    fn cluster(discovery: DiscoveryType, hosts: &[&str]) -> Cluster {
        Cluster {
            name: "c".into(),
            discovery,
            connect_timeout: Duration::from_secs(1),
            lb_policy: Default::default(),
            localities: vec![LocalityLbEndpoints {
                lb_endpoints: hosts
                    .iter()
                    .map(|h| LbEndpoint {
                        host: h.to_string(),
                        port: 80,
                        weight: 1,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            protocol: Default::default(),
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: DnsLookupFamily::V4Only,
            idle_timeout: None,
            per_connection_buffer_limit_bytes: 1 << 20,
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
        }
    }

    #[test]
    fn static_needs_ip_literals() {
        assert_eq!(
            static_endpoints(&cluster(DiscoveryType::Static, &["10.0.0.1"]))
                .unwrap()
                .len(),
            1
        );
        let e = static_endpoints(&cluster(DiscoveryType::Static, &["example.com"])).unwrap_err();
        assert!(e.contains("lb_endpoints[0]"), "{e}");
    }

    /// Each endpoint carries the `transport_socket_matches` entry its
    /// metadata selects; a different one makes a new endpoint on update.
    #[test]
    fn endpoints_carry_their_transport_socket_match() {
        use mesh_core::config::{LbMetadata, MetadataValue, TransportSocketMatch};
        let istio: LbMetadata = [("tlsMode".to_string(), MetadataValue::from("istio"))].into();
        let mut c = cluster(DiscoveryType::Static, &["10.0.0.1", "10.0.0.2"]);
        c.transport_socket_matches = vec![
            TransportSocketMatch {
                name: "tlsMode-istio".into(),
                labels: istio.clone(),
                tls: None,
            },
            TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                labels: LbMetadata::new(),
                tls: None,
            },
        ];
        c.localities[0].lb_endpoints[0].socket_match = istio.clone();
        let eps = static_endpoints(&c).unwrap();
        let sockets: Vec<Option<u32>> = eps.iter().map(|e| e.transport_socket).collect();
        assert_eq!(sockets, [Some(0), Some(1)]);

        let b = Balancer::new(Default::default());
        b.update(eps);
        let first = b.endpoints().endpoints[0].clone();
        // The label moves to the other endpoint (an EDS update).
        c.localities[0].lb_endpoints[0].socket_match = LbMetadata::new();
        c.localities[0].lb_endpoints[1].socket_match = istio;
        assert!(b.update(static_endpoints(&c).unwrap()));
        let set = b.endpoints();
        assert_eq!(set.endpoints[0].transport_socket, Some(1));
        assert_eq!(set.endpoints[1].transport_socket, Some(0));
        assert!(!Arc::ptr_eq(&set.endpoints[0], &first));
    }

    #[tokio::test]
    async fn strict_dns_resolves_localhost() {
        let eps = resolve(&cluster(DiscoveryType::StrictDns, &["localhost"]))
            .await
            .unwrap();
        assert!(!eps.is_empty());
        assert!(eps
            .iter()
            .all(|e| e.addr.ip().is_loopback() && e.hostname == "localhost"));
        let eps = resolve(&cluster(DiscoveryType::LogicalDns, &["localhost"]))
            .await
            .unwrap();
        assert_eq!(eps.len(), 1);
        assert!(resolve(&cluster(
            DiscoveryType::StrictDns,
            &["no-such-host.invalid"]
        ))
        .await
        .is_err());
    }
}
