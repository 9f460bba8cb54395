//! Per-endpoint transport sockets at run time (a cluster's
//! `transport_socket_matches`, Istio's auto-mTLS).
//!
//! The loader keeps each match's TLS context; [`mesh_lb::dns`] resolves
//! which match every endpoint uses when its endpoint set is built (from
//! STATIC `load_assignment`, DNS answers or EDS), and stores the index in
//! `Endpoint::transport_socket`. Nothing is looked up per request: a
//! worker's connection pools are keyed by that index as well as by the
//! address, so an endpoint whose metadata flips over EDS gets a new pool
//! with the other connector while connections already open finish on the
//! old one. A cluster without matches builds no [`SocketMatches`] entries
//! and its pools are made exactly as before.
//!
//! Every new connection of a cluster with matches is counted in
//! `mesh_cluster_transport_socket_match_cx_total{envoy_cluster_name,
//! transport_socket_match}`, `transport_socket_match` being the match name
//! or `default` (the cluster's own `transport_socket`, Envoy's name for it).

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_codec::transport::{BoxIo, Carried, ConnectFuture, Connector};
use mesh_core::config::Cluster;
use mesh_core::stats::{Counter, Store};
use mesh_tls::{ClientTls, SecretStore, TlsStats};
use tokio::net::TcpStream;

use crate::tls::TlsConnector;

/// The stat counting new connections per match.
const CX_TOTAL: &str = "mesh_cluster_transport_socket_match_cx_total";

/// A cluster's built upstream transport: its own `transport_socket` (TLS
/// or plain text) and its `transport_socket_matches`.
pub type UpstreamSockets = (Option<Arc<ClientTls>>, SocketMatches);

/// One built `transport_socket_matches` entry.
#[derive(Debug, Clone)]
pub struct MatchedSocket {
    /// `name`.
    pub name: String,
    /// Its TLS context (`None`: plain text).
    pub tls: Option<Arc<ClientTls>>,
    connections: Counter,
}

/// A cluster's built `transport_socket_matches` (empty for most clusters).
#[derive(Debug, Default, Clone)]
pub struct SocketMatches {
    entries: Vec<MatchedSocket>,
    /// The first match with an empty `match`, for endpoints that carry no
    /// resolved index (ORIGINAL_DST hosts, which have no metadata).
    unlabelled: Option<u32>,
    /// Connections that use the cluster's own `transport_socket`.
    default_connections: Counter,
}

impl SocketMatches {
    /// Builds the TLS context of every match of `c`, resolving SDS secrets
    /// in `secrets`. Errors name the field relative to the cluster.
    pub fn build(
        c: &Cluster,
        secrets: Option<Arc<SecretStore>>,
        store: &Store,
    ) -> Result<Self, String> {
        if c.transport_socket_matches.is_empty() {
            return Ok(SocketMatches::default());
        }
        let labels = |m: &str| {
            vec![
                ("envoy_cluster_name", c.name.clone()),
                ("transport_socket_match", m.to_owned()),
            ]
        };
        let mut entries = Vec::with_capacity(c.transport_socket_matches.len());
        for (i, m) in c.transport_socket_matches.iter().enumerate() {
            let tls = match &m.tls {
                None => None,
                Some(t) => {
                    let stats =
                        TlsStats::new(store, "cluster", &[("envoy_cluster_name", c.name.clone())]);
                    Some(Arc::new(
                        ClientTls::new(t, secrets.clone(), stats).map_err(|e| {
                            format!(
                                "transport_socket_matches[{i}].transport_socket.typed_config.{e}"
                            )
                        })?,
                    ))
                }
            };
            entries.push(MatchedSocket {
                name: m.name.clone(),
                tls,
                connections: store.counter(CX_TOTAL, &labels(&m.name)),
            });
        }
        let unlabelled = c
            .transport_socket_matches
            .iter()
            .position(|m| m.labels.is_empty())
            .and_then(|i| u32::try_from(i).ok());
        Ok(SocketMatches {
            entries,
            unlabelled,
            default_connections: store.counter(CX_TOTAL, &labels("default")),
        })
    }

    /// Whether the cluster has no matches.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The built matches, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &MatchedSocket> {
        self.entries.iter()
    }

    /// The TLS context (or plain text) and connection counter of match `i`.
    /// `None` is the first match with an empty `match` (it fits an endpoint
    /// without metadata, such as an ORIGINAL_DST host; an endpoint whose
    /// metadata no match fits implies there is none), else the cluster's own
    /// `transport_socket`, as is an index a newer cluster version no longer
    /// has.
    fn select<'a>(
        &'a self,
        i: Option<u32>,
        default: &'a Option<Arc<ClientTls>>,
    ) -> (&'a Option<Arc<ClientTls>>, &'a Counter) {
        match i
            .or(self.unlabelled)
            .and_then(|i| self.entries.get(i as usize))
        {
            Some(m) => (&m.tls, &m.connections),
            None => (default, &self.default_connections),
        }
    }

    /// The connector of a pool to an endpoint using match `i`, given the
    /// cluster's own TLS context. Without matches: that context, as
    /// always; with them, a connector that also counts connections.
    pub fn connector(
        &self,
        i: Option<u32>,
        default: &Option<Arc<ClientTls>>,
    ) -> Option<Arc<dyn Connector>> {
        self.connector_with(i, default, |t| Arc::new(TlsConnector(t)))
    }

    /// [`SocketMatches::connector`] with the TLS connector made by `make`
    /// (Istio's ALPN override wraps the context).
    pub fn connector_with(
        &self,
        i: Option<u32>,
        default: &Option<Arc<ClientTls>>,
        make: impl Fn(Arc<ClientTls>) -> Arc<dyn Connector>,
    ) -> Option<Arc<dyn Connector>> {
        let tls = |t: &Option<Arc<ClientTls>>| t.clone().map(&make);
        if self.is_empty() {
            return tls(default);
        }
        let (t, connections) = self.select(i, default);
        Some(Arc::new(CountingConnector {
            inner: tls(t),
            connections: connections.clone(),
        }))
    }

    /// The TLS context of match `i` without counting a connection (health
    /// check probes, which are not traffic).
    pub fn tls_of<'a>(
        &'a self,
        i: Option<u32>,
        default: &'a Option<Arc<ClientTls>>,
    ) -> &'a Option<Arc<ClientTls>> {
        self.select(i, default).0
    }

    /// The TLS context for one new connection to an endpoint using match
    /// `i` (TCP proxying, which has no pool), counting the connection.
    pub fn connection_tls<'a>(
        &'a self,
        i: Option<u32>,
        default: &'a Option<Arc<ClientTls>>,
    ) -> &'a Option<Arc<ClientTls>> {
        if self.is_empty() {
            return default;
        }
        let (t, connections) = self.select(i, default);
        connections.inc();
        t
    }
}

/// Counts each new connection, then wraps it with the match's connector
/// (or leaves it plain).
#[derive(Debug)]
struct CountingConnector {
    inner: Option<Arc<dyn Connector>>,
    connections: Counter,
}

impl Connector for CountingConnector {
    fn connect(&self, tcp: TcpStream, peer: SocketAddr, carried: Carried) -> ConnectFuture {
        self.connections.inc();
        match &self.inner {
            Some(c) => c.connect(tcp, peer, carried),
            None => Box::pin(async move { Ok(Box::new(tcp) as BoxIo) }),
        }
    }
}
