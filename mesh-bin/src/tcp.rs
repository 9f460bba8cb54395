//! `envoy.filters.network.tcp_proxy`: each downstream connection is paired
//! with a new connection to an endpoint of the cluster and bytes are copied
//! both ways. A connect failure closes the downstream connection (there is
//! no protocol to carry an error), counted as `upstream_cx_connect_fail`.

use std::sync::Arc;

use mesh_core::config::{ClusterSpecifier, TcpProxy};
use mesh_core::flags::ResponseFlag;
use mesh_core::listener::Accepted;
use mesh_core::stats::{Counter, Gauge, GaugeGuard, Store};

use crate::access_log::listener::{connect_failure_reason, tls_failure_reason, TcpOutcome};
use crate::access_log::{AccessLogger, TcpConn};
use crate::cluster::{ClusterEntry, ClusterManager};
use crate::istio::tcp_exchange::{self, ExchangeStats, TcpExchange, TcpPeers};
use crate::istio::tcp_stats::{IstioTcpStats, Metered, TcpMeter};

/// Envoy's `tcp.<stat_prefix>.*` stats.
#[derive(Debug, Clone)]
pub struct TcpStats {
    /// `downstream_cx_total`.
    pub cx_total: Counter,
    /// `downstream_cx_no_route`.
    pub cx_no_route: Counter,
    /// `mesh_tcp_upstream_cx_active`: connections being proxied (mesh's own
    /// stat).
    pub cx_active: Gauge,
    /// `idle_timeout`.
    pub idle_timeout: Counter,
}

/// A compiled TCP proxy, shared by every worker.
#[derive(Debug)]
pub struct TcpProxyShared {
    config: TcpProxy,
    clusters: Vec<(Arc<ClusterEntry>, u32)>,
    total_weight: u64,
    stats: TcpStats,
    access_log: Option<AccessLogger>,
    /// The network filter `istio.metadata_exchange` (downstream side).
    istio_mx: Option<Arc<TcpExchange>>,
    /// The clusters' `istio.metadata_exchange` (upstream side).
    upstream_mx: Vec<(Arc<ClusterEntry>, Arc<TcpExchange>)>,
    /// The network filter `istio.stats`.
    istio_stats: Option<Arc<IstioTcpStats>>,
}

impl TcpProxyShared {
    /// Resolves the cluster names against `cm`.
    pub fn new(config: &TcpProxy, cm: &ClusterManager, store: &Store) -> Result<Self, String> {
        let wanted: Vec<(String, u32)> = match &config.cluster {
            ClusterSpecifier::Cluster(c) => vec![(c.clone(), 1)],
            ClusterSpecifier::Weighted(ws) => {
                ws.iter().map(|w| (w.name.clone(), w.weight)).collect()
            }
        };
        let mut clusters = Vec::new();
        for (name, weight) in wanted {
            let entry = cm
                .get(&name)
                .ok_or_else(|| format!("cluster: unknown cluster {name:?}"))?;
            if weight > 0 {
                clusters.push((entry.clone(), weight));
            }
        }
        let total_weight = clusters.iter().map(|c| u64::from(c.1)).sum();
        if total_weight == 0 {
            return Err("weighted_clusters: the weights sum to 0".into());
        }
        let mx_stats = || ExchangeStats::new(store);
        let istio_mx = config
            .istio_metadata_exchange
            .as_ref()
            .map(|c| Arc::new(TcpExchange::new(c, mx_stats())));
        let upstream_mx = clusters
            .iter()
            .filter_map(|(c, _)| {
                let mx = c.config.istio_metadata_exchange.as_ref()?;
                Some((c.clone(), Arc::new(TcpExchange::new(mx, mx_stats()))))
            })
            .collect();
        let l = vec![("envoy_tcp_prefix", config.stat_prefix.clone())];
        let access_log =
            AccessLogger::new(&config.access_log, store).map_err(|e| format!("access_log: {e}"))?;
        let istio_stats = config
            .istio_stats
            .as_ref()
            .map(|c| Arc::new(IstioTcpStats::new(c, store)));
        Ok(TcpProxyShared {
            access_log,
            istio_stats,
            istio_mx,
            upstream_mx,
            config: config.clone(),
            clusters,
            total_weight,
            stats: TcpStats {
                cx_total: store.counter("envoy_tcp_downstream_cx_total", &l),
                cx_no_route: store.counter("envoy_tcp_downstream_cx_no_route", &l),
                cx_active: store.gauge("mesh_tcp_upstream_cx_active", &l),
                idle_timeout: store.counter("envoy_tcp_idle_timeout", &l),
            },
        })
    }

    fn choose(&self) -> &Arc<ClusterEntry> {
        if self.clusters.len() == 1 {
            return &self.clusters[0].0;
        }
        let mut pick = fastrand::u64(0..self.total_weight);
        for (c, w) in &self.clusters {
            if pick < u64::from(*w) {
                return c;
            }
            pick -= u64::from(*w);
        }
        &self.clusters[self.clusters.len() - 1].0
    }

    /// Proxies one accepted connection to completion.
    pub async fn handle(self: Arc<Self>, accepted: Accepted) {
        let Accepted {
            stream,
            peer,
            local,
            guard,
        } = accepted;
        self.handle_captured(stream, peer, Some(local), None, None, guard)
            .await;
    }

    /// Proxies one downstream byte stream (a TCP connection, or the
    /// decrypted side of a TLS one) from `peer` to completion; `guard`
    /// keeps the connection counted until then.
    pub async fn handle_stream<S>(
        self: Arc<Self>,
        stream: S,
        peer: std::net::SocketAddr,
        guard: mesh_core::listener::ConnectionGuard,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.handle_captured(stream, peer, None, None, None, guard)
            .await;
    }

    /// [`TcpProxyShared::handle_stream`] with the local address (when
    /// known) and the downstream TLS session, for the access log, for a
    /// connection whose original destination the listener filter may have
    /// restored (`original_dst`): ORIGINAL_DST clusters connect there.
    /// Returns what happened, for the listener's access log.
    pub async fn handle_captured<S>(
        self: Arc<Self>,
        stream: S,
        peer: std::net::SocketAddr,
        local: Option<std::net::SocketAddr>,
        original_dst: Option<std::net::SocketAddr>,
        tls: Option<&mesh_core::identity::PeerIdentity>,
        guard: mesh_core::listener::ConnectionGuard,
    ) -> TcpOutcome
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let start = std::time::SystemTime::now();
        let started = std::time::Instant::now();
        let id = crate::access_log::next_connection_id();
        let cluster = self.choose().clone();
        let mut outcome = TcpOutcome::default();
        let peers = TcpPeers::default();
        let alpn = tls.and_then(|t| t.alpn.as_deref());
        let meter = (self.istio_stats.as_ref()).map(|s| s.connection(&peers, &cluster, tls));
        let (flag, received, sent, upstream) = self
            .proxy(
                (stream, alpn, &peers, meter.as_ref()),
                peer,
                guard,
                &cluster,
                original_dst,
                &mut outcome,
            )
            .await;
        if let Some(m) = &meter {
            m.close(flag);
        }
        outcome.flag = flag;
        outcome.upstream = upstream;
        outcome.cluster = Some(cluster);
        if let Some(log) = &self.access_log {
            let conn = TcpConn {
                peer,
                local,
                id,
                tls,
            };
            log.log_tcp(start, started, received, sent, &outcome, &conn);
        }
        outcome
    }

    async fn proxy<S>(
        &self,
        (stream, alpn, peers, meter): (S, Option<&str>, &TcpPeers, Option<&Arc<TcpMeter>>),
        peer: std::net::SocketAddr,
        guard: mesh_core::listener::ConnectionGuard,
        cluster: &Arc<ClusterEntry>,
        original_dst: Option<std::net::SocketAddr>,
        outcome: &mut TcpOutcome,
    ) -> (Option<ResponseFlag>, u64, u64, Option<std::net::SocketAddr>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.stats.cx_total.inc();
        let mx = self.istio_mx.as_ref();
        let stream = match tcp_exchange::maybe_start(mx, alpn, stream, &peers.downstream).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "tcp_proxy: istio-peer-exchange with the downstream failed; closing");
                return (None, 0, 0, None);
            }
        };
        let stream = Metered::new(stream, meter.cloned());
        // tcp_proxy's hash_policy: only source_ip.
        let hash =
            (!self.config.hash_policy.is_empty()).then(|| mesh_lb::hash::source_ip_hash(peer.ip()));
        let pick = mesh_lb::PickContext::new().with_hash(hash);
        if let Some(od) = &cluster.on_demand {
            od.ready().await;
        }
        let picked = match &cluster.original_dst {
            Some(hosts) => original_dst.and_then(|dst| hosts.host(dst)),
            None => cluster.balancer.pick_with(&pick),
        };
        let Some(endpoint) = picked else {
            cluster.stats.cx_none_healthy.inc();
            self.stats.cx_no_route.inc();
            tracing::debug!(%peer, cluster = %cluster.config.name, "tcp_proxy: no healthy upstream (UH); closing");
            return (Some(ResponseFlag::NoHealthyUpstream), 0, 0, None);
        };
        let connect_start = tokio::time::Instant::now();
        let connect = tokio::time::timeout(
            cluster.config.connect_timeout,
            mesh_codec::transport::connect_from(endpoint.addr, cluster.config.upstream_bind),
        )
        .await;
        let upstream = match connect {
            Ok(Ok(s)) => {
                // The connect time is the latency sample for peak EWMA.
                endpoint.observe_rtt(connect_start.elapsed());
                cluster.outlier_connect(&endpoint, true);
                s
            }
            Ok(Err(e)) => {
                cluster.outlier_connect(&endpoint, false);
                cluster.stats.cx_connect_fail.inc();
                endpoint.stats.cx_connect_fail.inc();
                tracing::debug!(%peer, endpoint = %endpoint.addr, error = %e, "tcp_proxy: upstream connect failed (UF); closing");
                outcome.failure = Some(connect_failure_reason(&e));
                return (
                    Some(ResponseFlag::UpstreamConnectionFailure),
                    0,
                    0,
                    Some(endpoint.addr),
                );
            }
            Err(_) => {
                cluster.outlier_connect(&endpoint, false);
                cluster.stats.cx_connect_fail.inc();
                endpoint.stats.cx_connect_fail.inc();
                tracing::debug!(%peer, endpoint = %endpoint.addr, "tcp_proxy: upstream connect timed out (UF); closing");
                return (
                    Some(ResponseFlag::UpstreamConnectionFailure),
                    0,
                    0,
                    Some(endpoint.addr),
                );
            }
        };
        let _ = upstream.set_nodelay(true);
        outcome.upstream_local = upstream.local_addr().ok();
        let _ticker = meter.map(|m| m.connected());
        let _active = GaugeGuard::new(&self.stats.cx_active);
        let _ep_active = GaugeGuard::new(&endpoint.stats.rq_active);
        endpoint.stats.rq_total.inc();
        cluster.stats.rq_total.inc();
        let tls = cluster
            .socket_matches
            .connection_tls(endpoint.transport_socket, &cluster.tls);
        let result = match tls {
            None => mesh_codec::tcp::proxy(stream, upstream, self.config.idle_timeout).await,
            Some(tls) => {
                let handshake = tls.connect(
                    upstream,
                    mesh_tls::UpstreamAlpn::Raw,
                    endpoint.addr.ip(),
                    Some(cluster.config.connect_timeout),
                );
                match handshake.await {
                    Ok((upstream, id)) => {
                        let mx = self
                            .upstream_mx
                            .iter()
                            .find(|(c, _)| Arc::ptr_eq(c, cluster));
                        let slot = &peers.upstream;
                        let alpn = id.alpn.as_deref();
                        match tcp_exchange::maybe_start(mx.map(|m| &m.1), alpn, upstream, slot)
                            .await
                        {
                            Ok(upstream) => {
                                mesh_codec::tcp::proxy(stream, upstream, self.config.idle_timeout)
                                    .await
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => {
                        cluster.stats.cx_connect_fail.inc();
                        endpoint.stats.cx_connect_fail.inc();
                        tracing::debug!(%peer, endpoint = %endpoint.addr, reason = e.reason.as_str(), error = %e.message,
                            "tcp_proxy: upstream TLS handshake failed (UF); closing");
                        outcome.failure = Some(tls_failure_reason(e.reason.as_str(), &e.message));
                        return (
                            Some(ResponseFlag::UpstreamConnectionFailure),
                            0,
                            0,
                            Some(endpoint.addr),
                        );
                    }
                }
            }
        };
        drop(guard);
        match result {
            Ok(t) => {
                cluster.stats.cx_tx_bytes.add(t.sent);
                cluster.stats.cx_rx_bytes.add(t.received);
                (None, t.sent, t.received, Some(endpoint.addr))
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                self.stats.idle_timeout.inc();
                (
                    Some(ResponseFlag::StreamIdleTimeout),
                    0,
                    0,
                    Some(endpoint.addr),
                )
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "tcp_proxy: connection ended with an error");
                (None, 0, 0, Some(endpoint.addr))
            }
        }
    }
}
