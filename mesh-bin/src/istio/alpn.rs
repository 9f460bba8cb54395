//! `istio.alpn`: on an upstream TLS connection made for an HTTP request,
//! offer the ALPN list configured for the request's upstream protocol
//! instead of the cluster's own (Istio's outbound HCMs map HTTP/1.0,
//! HTTP/1.1 and HTTP/2 to `istio-http/1.0`, `istio-http/1.1`, `istio-h2`,
//! each followed by `istio` and the standard value, so the peer sidecar's
//! inbound filter chains can match `application_protocols` on them).
//!
//! Connections with a different ALPN list cannot be shared, so the list is
//! part of the worker's pool key (`WorkerCluster::pool_with_alpn`); a
//! plain-text pool is unaffected by it.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_codec::transport::{BoxIo, Carried, ConnectFuture, Connector};
use mesh_core::config::istio::{AlpnOverride, UpstreamProtocol};
use mesh_core::config::UpstreamProtocol as ClusterProtocol;
use mesh_tls::ClientTls;
use tokio::net::TcpStream;

/// One HCM's compiled `istio.alpn`: the list for each upstream protocol.
#[derive(Debug, Clone, Default)]
pub struct AlpnOverrides {
    http10: Option<Arc<[String]>>,
    http11: Option<Arc<[String]>>,
    http2: Option<Arc<[String]>>,
}

impl AlpnOverrides {
    /// Compiles the filter's configuration.
    pub fn new(config: &AlpnOverride) -> Self {
        let get = |p| config.for_protocol(p).map(Arc::from);
        AlpnOverrides {
            http10: get(UpstreamProtocol::Http10),
            http11: get(UpstreamProtocol::Http11),
            http2: get(UpstreamProtocol::Http2),
        }
    }

    /// The list for a request of `version` sent to a cluster speaking
    /// `cluster` (HTTP/2 when `h2`). As Envoy's
    /// `upstreamHttpProtocol`: HTTP/1.0 only where the cluster follows the
    /// downstream protocol, HTTP/1.1 otherwise.
    pub fn for_request(
        &self,
        cluster: ClusterProtocol,
        version: http::Version,
        h2: bool,
    ) -> Option<&Arc<[String]>> {
        if h2 {
            self.http2.as_ref()
        } else if cluster == ClusterProtocol::Downstream && version == http::Version::HTTP_10 {
            self.http10.as_ref()
        } else {
            self.http11.as_ref()
        }
    }
}

/// A TLS connector offering exactly `alpn`.
pub fn connector(tls: Arc<ClientTls>, alpn: Arc<[String]>) -> Arc<dyn Connector> {
    Arc::new(AlpnTlsConnector { tls, alpn })
}

#[derive(Debug)]
struct AlpnTlsConnector {
    tls: Arc<ClientTls>,
    alpn: Arc<[String]>,
}

impl Connector for AlpnTlsConnector {
    fn connect(&self, tcp: TcpStream, peer: SocketAddr, _carried: Carried) -> ConnectFuture {
        let (tls, alpn) = (self.tls.clone(), self.alpn.clone());
        Box::pin(async move {
            match tls.connect_with_alpn(tcp, &alpn, peer.ip(), None).await {
                Ok((stream, _)) => Ok(Box::new(stream) as BoxIo),
                Err(e) => Err(crate::tls::handshake_failed(peer, &e)),
            }
        })
    }
}

/// The compiled `istio.alpn` of an HCM's filters, if it has one.
pub fn from_filters(filters: &[mesh_core::config::HttpFilter]) -> Option<AlpnOverrides> {
    filters.iter().find_map(|f| match f {
        mesh_core::config::HttpFilter::IstioAlpn(c) => Some(AlpnOverrides::new(c)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn istio() -> AlpnOverrides {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        AlpnOverrides::new(&AlpnOverride {
            overrides: vec![
                (
                    UpstreamProtocol::Http10,
                    list(&["istio-http/1.0", "istio", "http/1.0"]),
                ),
                (
                    UpstreamProtocol::Http11,
                    list(&["istio-http/1.1", "istio", "http/1.1"]),
                ),
                (UpstreamProtocol::Http2, list(&["istio-h2", "istio", "h2"])),
            ],
        })
    }

    /// The upstream protocol picks the list as Envoy's
    /// `upstreamHttpProtocol` does: HTTP/1.0 only when the cluster follows
    /// the downstream protocol.
    #[test]
    fn list_follows_the_upstream_protocol() {
        let o = istio();
        let first = |c, v, h2| o.for_request(c, v, h2).map(|l| l[0].clone());
        use http::Version as V;
        use ClusterProtocol as C;
        assert_eq!(
            first(C::Http1, V::HTTP_11, false).as_deref(),
            Some("istio-http/1.1")
        );
        assert_eq!(
            first(C::Http1, V::HTTP_10, false).as_deref(),
            Some("istio-http/1.1")
        );
        assert_eq!(
            first(C::Downstream, V::HTTP_10, false).as_deref(),
            Some("istio-http/1.0")
        );
        assert_eq!(
            first(C::Http2, V::HTTP_11, true).as_deref(),
            Some("istio-h2")
        );
        let none = AlpnOverrides::new(&AlpnOverride::default());
        assert!(none.for_request(C::Http1, V::HTTP_11, false).is_none());
    }
}
