//! The proxy's side of endpoint health: the HTTP, TCP and gRPC probes that
//! `mesh_lb::health_check::HealthChecker` drives, and the hooks by which the
//! data path reports attempt results to outlier detection.
//!
//! The probes live here rather than in `mesh-lb` because they need the
//! HTTP client stack (hyper), which sits beside `mesh-lb`, not below it:
//! `mesh-lb` stays protocol-neutral and light, and a Rust program that
//! wants its own probe implements the small `Probe` trait.
//!
//! | probe | passes when | fails at once (`Unhealthy`) | network failure (counts to `unhealthy_threshold`) |
//! |---|---|---|---|
//! | HTTP | the status is in `expected_statuses` (default 200) | any other status | refused, reset, not HTTP, timeout |
//! | TCP | connected (and every `receive` block arrived, in order) | — | refused, closed before the reply matched, timeout |
//! | gRPC | `grpc.health.v1.Health/Check` answers `SERVING` | another serving status, a non-OK `grpc-status`, a non-200 HTTP status | refused, reset, timeout |
//!
//! Probes connect as traffic does ([`ProbeTransport`]): from the cluster's
//! `upstream_bind_config` address, through the TLS context of the
//! endpoint's `transport_socket_matches` entry or the cluster's
//! `transport_socket` (Envoy health checks use the cluster's transport
//! socket), offering ALPN `h2` to gRPC and HTTP/2 probes. A failed
//! handshake is a network failure, counted in the cluster's `ssl` stats.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_codec::transport::{connect_from, BoxIo, Carried, Connector};
use mesh_core::config::{GrpcHealthCheck, HealthChecker as Kind, HttpHealthCheck, TcpHealthCheck};
use mesh_core::flags::ResponseFlag;
use mesh_lb::health_check::{Probe, ProbeFuture, ProbeResult};
use mesh_lb::outlier::{Outcome, OutlierDetector};
use mesh_lb::{Endpoint, HealthFlags};
use mesh_tls::ClientTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::{ClusterEntry, ClusterManager};
use crate::socket_match::SocketMatches;
use crate::tls::TlsConnector;

/// The `user-agent` of HTTP and gRPC probes (Envoy's).
const USER_AGENT: &str = "Envoy/HC";

/// The probe for a cluster's health check configuration, connecting
/// through `transport`.
pub fn probe(cluster: &str, kind: &Kind, transport: ProbeTransport) -> Arc<dyn Probe> {
    let transport = Arc::new(transport);
    match kind {
        Kind::Http(h) => Arc::new(HttpProbe::new(cluster, h, transport)),
        Kind::Tcp(t) => Arc::new(TcpProbe(Arc::new(t.clone()), transport)),
        Kind::Grpc(g) => Arc::new(GrpcProbe::new(cluster, g, transport)),
    }
}

/// How probes reach an endpoint: the cluster's upstream transport and
/// source address. The default is plain text from any address.
#[derive(Debug, Clone, Default)]
pub struct ProbeTransport {
    /// The cluster's `transport_socket` (`None`: plain text).
    pub tls: Option<Arc<ClientTls>>,
    /// The cluster's `transport_socket_matches`.
    pub matches: SocketMatches,
    /// `upstream_bind_config`.
    pub source: Option<SocketAddr>,
    /// The health check's `transport_socket_match_criteria` resolved
    /// against `matches`: `Some(entry)` for every endpoint (`Some(None)`:
    /// the cluster's `transport_socket`); `None`: each endpoint's own.
    pub criteria: Option<Option<u32>>,
    /// `tls_options.alpn_protocols`: offered by TLS probes in place of the
    /// socket's list (empty: the socket's own).
    pub alpn: Vec<String>,
}

impl ProbeTransport {
    /// A new connection to `endpoint`, in TLS when its transport socket
    /// says so (offering the ALPN of what it will carry).
    async fn connect(&self, endpoint: &Endpoint, carried: Carried) -> Result<BoxIo, ProbeResult> {
        let tcp = connect_from(endpoint.addr, self.source)
            .await
            .map_err(network)?;
        let _ = tcp.set_nodelay(true);
        let tls = match self.criteria {
            // No entry fits the criteria: the cluster's own socket.
            Some(None) => &self.tls,
            Some(i) => self.matches.tls_of(i, &self.tls),
            None => self.matches.tls_of(endpoint.transport_socket, &self.tls),
        };
        match tls {
            None => Ok(Box::new(tcp)),
            Some(tls) if self.alpn.is_empty() => TlsConnector(tls.clone())
                .connect(tcp, endpoint.addr, carried)
                .await
                .map_err(|e| network(format!("TLS handshake: {e}"))),
            Some(tls) => match tls
                .connect_with_alpn(tcp, &self.alpn, endpoint.addr.ip(), None)
                .await
            {
                Ok((stream, _)) => Ok(Box::new(stream)),
                Err(e) => Err(network(format!("TLS handshake: {e}"))),
            },
        }
    }
}

fn network(e: impl std::fmt::Display) -> ProbeResult {
    ProbeResult::NetworkFailure(e.to_string())
}

/// The most response body a probe keeps (the rest is read and dropped).
const MAX_PROBE_BODY: usize = 64 * 1024;

/// Sends one request on a fresh connection and reads the response to its
/// end, keeping at most `keep` bytes of the body.
async fn exchange(
    transport: &ProbeTransport,
    endpoint: &Endpoint,
    h2: bool,
    req: Request<Full<Bytes>>,
    keep: usize,
) -> Result<(http::response::Parts, Bytes, Option<http::HeaderMap>), ProbeResult> {
    let carried = if h2 { Carried::Http2 } else { Carried::Http1 };
    let io = TokioIo::new(transport.connect(endpoint, carried).await?);
    let resp = if h2 {
        let (mut sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(network)?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(network)?
    } else {
        let (mut sender, conn) = http1::handshake(io).await.map_err(network)?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(network)?
    };
    let (parts, mut body) = resp.into_parts();
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(network)?;
        match frame.into_data() {
            Ok(d) => {
                let room = keep.saturating_sub(data.len());
                data.extend_from_slice(&d[..d.len().min(room)]);
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok((parts, data.freeze(), trailers))
}

/// `http_health_check`: `GET path` with `Host` = `host` or the cluster
/// name.
struct HttpProbe {
    config: Arc<HttpHealthCheck>,
    authority: HeaderValue,
    headers: Arc<Vec<(HeaderName, HeaderValue)>>,
    transport: Arc<ProbeTransport>,
}

impl HttpProbe {
    fn new(cluster: &str, c: &HttpHealthCheck, transport: Arc<ProbeTransport>) -> Self {
        let host = c.host.as_deref().unwrap_or(cluster);
        let authority =
            HeaderValue::from_str(host).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let headers = c
            .request_headers_to_add
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        HttpProbe {
            config: Arc::new(c.clone()),
            authority,
            headers: Arc::new(headers),
            transport,
        }
    }
}

impl Probe for HttpProbe {
    fn probe(&self, endpoint: &Arc<Endpoint>) -> ProbeFuture {
        let endpoint = endpoint.clone();
        let config = self.config.clone();
        let authority = self.authority.clone();
        let headers = self.headers.clone();
        let transport = self.transport.clone();
        Box::pin(async move {
            let mut b = Request::get(config.path.as_str());
            if config.http2 {
                let uri = format!(
                    "http://{}{}",
                    authority.to_str().unwrap_or("localhost"),
                    config.path
                );
                b = Request::get(uri).version(http::Version::HTTP_2);
            } else {
                b = b.header(http::header::HOST, authority.clone());
            }
            let mut req = match b.body(Full::new(Bytes::new())) {
                Ok(r) => r,
                Err(e) => return ProbeResult::Unhealthy(format!("bad request: {e}")),
            };
            let h = req.headers_mut();
            h.insert(
                http::header::USER_AGENT,
                HeaderValue::from_static(USER_AGENT),
            );
            for (k, v) in headers.iter() {
                h.append(k.clone(), v.clone());
            }
            for k in &config.request_headers_to_remove {
                h.remove(k.as_str());
            }
            match exchange(&transport, &endpoint, config.http2, req, 0).await {
                Ok((parts, _, _)) => {
                    let s = parts.status.as_u16();
                    if config
                        .expected_statuses
                        .iter()
                        .any(|(lo, hi)| (*lo..*hi).contains(&s))
                    {
                        ProbeResult::Healthy
                    } else {
                        ProbeResult::Unhealthy(format!("status {s}"))
                    }
                }
                Err(r) => r,
            }
        })
    }

    fn kind(&self) -> &'static str {
        "HTTP"
    }
}

/// `tcp_health_check`: connect, send `send`, and find every `receive`
/// block in the reply, in order (not necessarily adjacent), as Envoy does.
struct TcpProbe(Arc<TcpHealthCheck>, Arc<ProbeTransport>);

/// Whether `blocks` appear in `data` in order.
fn contains_in_order(data: &[u8], blocks: &[Vec<u8>]) -> bool {
    let mut rest = data;
    for b in blocks {
        match rest.windows(b.len()).position(|w| w == b.as_slice()) {
            Some(i) => rest = &rest[i + b.len()..],
            None => return false,
        }
    }
    true
}

impl Probe for TcpProbe {
    fn probe(&self, endpoint: &Arc<Endpoint>) -> ProbeFuture {
        let endpoint = endpoint.clone();
        let c = self.0.clone();
        let transport = self.1.clone();
        Box::pin(async move {
            let mut s = match transport.connect(&endpoint, Carried::Raw).await {
                Ok(s) => s,
                Err(r) => return r,
            };
            if !c.send.is_empty() {
                if let Err(e) = s.write_all(&c.send).await {
                    return network(e);
                }
            }
            if c.receive.is_empty() {
                return ProbeResult::Healthy;
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return network("closed before the expected reply"),
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        if contains_in_order(&got, &c.receive) {
                            return ProbeResult::Healthy;
                        }
                        if got.len() > 1 << 20 {
                            return network("no expected reply in the first MiB");
                        }
                    }
                    Err(e) => return network(e),
                }
            }
        })
    }

    fn kind(&self) -> &'static str {
        "TCP"
    }
}

/// `grpc_health_check`: `grpc.health.v1.Health/Check` over h2c.
struct GrpcProbe {
    authority: String,
    /// The framed `HealthCheckRequest`.
    message: Bytes,
    transport: Arc<ProbeTransport>,
}

impl GrpcProbe {
    fn new(cluster: &str, c: &GrpcHealthCheck, transport: Arc<ProbeTransport>) -> Self {
        // HealthCheckRequest { string service = 1; }
        let mut pb = BytesMut::new();
        if !c.service_name.is_empty() {
            pb.put_u8(0x0a);
            put_varint(&mut pb, c.service_name.len() as u64);
            pb.put_slice(c.service_name.as_bytes());
        }
        let mut msg = BytesMut::with_capacity(5 + pb.len());
        msg.put_u8(0);
        msg.put_u32(pb.len() as u32);
        msg.put_slice(&pb);
        GrpcProbe {
            authority: c.authority.clone().unwrap_or_else(|| cluster.to_owned()),
            message: msg.freeze(),
            transport,
        }
    }
}

fn put_varint(b: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if b.is_empty() {
            return None;
        }
        let byte = b.get_u8();
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `status` of a framed `HealthCheckResponse` (0 when absent, as
/// protobuf defaults it: `UNKNOWN`).
fn serving_status(body: &[u8]) -> Result<u64, String> {
    let mut b = body;
    if b.len() < 5 {
        return Err("no gRPC message in the response".into());
    }
    let compressed = b.get_u8();
    let len = b.get_u32() as usize;
    if compressed != 0 {
        return Err("compressed gRPC response".into());
    }
    if b.len() < len {
        return Err("truncated gRPC message".into());
    }
    let mut m = &b[..len];
    let mut status = 0;
    while !m.is_empty() {
        let tag = get_varint(&mut m).ok_or("bad protobuf")?;
        match tag & 7 {
            0 => {
                let v = get_varint(&mut m).ok_or("bad protobuf")?;
                if tag >> 3 == 1 {
                    status = v;
                }
            }
            2 => {
                let l = get_varint(&mut m).ok_or("bad protobuf")? as usize;
                if m.len() < l {
                    return Err("bad protobuf".into());
                }
                m = &m[l..];
            }
            1 if m.len() >= 8 => m = &m[8..],
            5 if m.len() >= 4 => m = &m[4..],
            _ => return Err("bad protobuf".into()),
        }
    }
    Ok(status)
}

impl Probe for GrpcProbe {
    fn probe(&self, endpoint: &Arc<Endpoint>) -> ProbeFuture {
        let endpoint = endpoint.clone();
        let uri = format!("http://{}/grpc.health.v1.Health/Check", self.authority);
        let message = self.message.clone();
        let transport = self.transport.clone();
        Box::pin(async move {
            let req = Request::post(uri)
                .version(http::Version::HTTP_2)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .header(http::header::USER_AGENT, USER_AGENT)
                .body(Full::new(message));
            let req = match req {
                Ok(r) => r,
                Err(e) => return ProbeResult::Unhealthy(format!("bad request: {e}")),
            };
            let exchanged = exchange(&transport, &endpoint, true, req, MAX_PROBE_BODY).await;
            let (parts, body, trailers) = match exchanged {
                Ok(x) => x,
                Err(r) => return r,
            };
            if parts.status != http::StatusCode::OK {
                return ProbeResult::Unhealthy(format!("HTTP status {}", parts.status.as_u16()));
            }
            let grpc_status = trailers
                .as_ref()
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| parts.headers.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            match grpc_status {
                Some(0) => {}
                Some(s) => return ProbeResult::Unhealthy(format!("grpc-status {s}")),
                None => return ProbeResult::Unhealthy("no grpc-status".into()),
            }
            match serving_status(&body) {
                Ok(1) => ProbeResult::Healthy,
                Ok(s) => ProbeResult::Unhealthy(format!("serving status {s} (not SERVING)")),
                Err(e) => ProbeResult::Unhealthy(e),
            }
        })
    }

    fn kind(&self) -> &'static str {
        "GRPC"
    }
}

impl ClusterEntry {
    /// Reports an upstream response status to outlier detection.
    #[inline]
    pub fn outlier_status(&self, endpoint: &Endpoint, status: u16) {
        if let Some(d) = &self.outlier {
            d.report(endpoint, Outcome::Status(status));
        }
    }

    /// Reports a proxy-made failure (by its response flag) to outlier
    /// detection, as Envoy's router does: connect failures, resets and
    /// protocol errors as connect failures, the route timeout as a timeout.
    #[inline]
    pub fn outlier_failure(&self, endpoint: &Endpoint, flag: ResponseFlag) {
        let Some(d) = &self.outlier else { return };
        let outcome = match flag {
            ResponseFlag::UpstreamConnectionFailure
            | ResponseFlag::UpstreamConnectionTermination
            | ResponseFlag::UpstreamProtocolError => Outcome::ConnectFailed,
            ResponseFlag::UpstreamRequestTimeout => Outcome::Timeout,
            _ => return,
        };
        d.report(endpoint, outcome);
    }

    /// Reports a TCP proxy connect attempt to outlier detection.
    #[inline]
    pub fn outlier_connect(&self, endpoint: &Endpoint, connected: bool) {
        if let Some(d) = &self.outlier {
            d.report(
                endpoint,
                if connected {
                    Outcome::ConnectSuccessFinal
                } else {
                    Outcome::ConnectFailed
                },
            );
        }
    }
}

/// Envoy's `-1` for a rate that was not computed, else the rate.
fn rate_text(r: f64) -> String {
    if r < 0.0 {
        "-1".into()
    } else {
        format!("{r}")
    }
}

/// The cluster-level outlier lines of `/clusters`
/// (`web::outlier::success_rate_average::-1`, ...).
pub(crate) fn outlier_cluster_lines(out: &mut String, name: &str, d: &OutlierDetector) {
    let _ = writeln!(
        out,
        "{name}::outlier::success_rate_average::{}",
        rate_text(d.success_rate_average())
    );
    let _ = writeln!(
        out,
        "{name}::outlier::success_rate_ejection_threshold::{}",
        rate_text(d.success_rate_ejection_threshold())
    );
}

/// An endpoint's outlier and latency lines of `/clusters`: Envoy's
/// `success_rate` and `local_origin_success_rate`, and mesh's own
/// `mesh_ewma_rtt_ms` (the peak-EWMA latency estimate), `mesh_ejections`
/// (times ejected) and `mesh_ejection_time_ms` (the length of the current or
/// next ejection).
pub(crate) fn outlier_endpoint_lines(
    out: &mut String,
    prefix: &str,
    c: &ClusterEntry,
    e: &Endpoint,
) {
    let _ = writeln!(
        out,
        "{prefix}::success_rate::{}",
        rate_text(e.outlier.success_rate())
    );
    let _ = writeln!(
        out,
        "{prefix}::local_origin_success_rate::{}",
        rate_text(e.outlier.local_origin_success_rate())
    );
    let _ = writeln!(
        out,
        "{prefix}::mesh_ewma_rtt_ms::{:.3}",
        e.rtt.estimate_at(tokio::time::Instant::now()) / 1e6
    );
    if let Some(d) = &c.outlier {
        let _ = writeln!(
            out,
            "{prefix}::mesh_ejections::{}",
            e.outlier.num_ejections()
        );
        let _ = writeln!(
            out,
            "{prefix}::mesh_ejection_time_ms::{}",
            d.ejection_time(e).as_millis()
        );
    }
}

/// `/clusters?format=json`, shaped like Envoy's `admin.v3.Clusters`.
pub(crate) fn clusters_json(cm: &ClusterManager) -> serde_json::Value {
    use serde_json::json;
    let statuses: Vec<serde_json::Value> = cm
        .iter()
        .map(|c| {
            let hosts: Vec<serde_json::Value> = c
                .balancer
                .endpoints()
                .endpoints
                .iter()
                .map(|e| {
                    let s = &e.stats;
                    let total = s.rq_total.get();
                    let error = s.rq_error.get();
                    let counter = |n: &str, v: u64| json!({"name": n, "value": v.to_string()});
                    let gauge =
                        |n: &str, v: i64| json!({"type": "GAUGE", "name": n, "value": v.to_string()});
                    let bits = e.health.bits();
                    let mut health = serde_json::Map::new();
                    health.insert("eds_health_status".into(), json!("HEALTHY"));
                    for (flag, key) in [
                        (HealthFlags::FAILED_ACTIVE_HC, "failed_active_health_check"),
                        (HealthFlags::FAILED_OUTLIER_CHECK, "failed_outlier_check"),
                        (HealthFlags::PENDING_ACTIVE_HC, "pending_active_hc"),
                    ] {
                        if bits & flag != 0 {
                            health.insert(key.into(), json!(true));
                        }
                    }
                    let mut host = json!({
                        "address": {"socket_address": {"address": e.addr.ip().to_string(), "port_value": e.addr.port()}},
                        "stats": [
                            counter("cx_connect_fail", s.cx_connect_fail.get()),
                            counter("rq_error", error),
                            counter("rq_success", total.saturating_sub(error)),
                            counter("rq_total", total),
                            gauge("rq_active", s.rq_active.get()),
                        ],
                        "health_status": health,
                        "weight": e.weight,
                        "hostname": e.hostname,
                        "locality": {"region": e.locality.region, "zone": e.locality.zone, "sub_zone": e.locality.sub_zone},
                    });
                    if e.priority != 0 {
                        host["priority"] = json!(e.priority);
                    }
                    let sr = e.outlier.success_rate();
                    if sr >= 0.0 {
                        host["success_rate"] = json!({"value": sr});
                    }
                    let lsr = e.outlier.local_origin_success_rate();
                    if lsr >= 0.0 {
                        host["local_origin_success_rate"] = json!({"value": lsr});
                    }
                    host
                })
                .collect();
            let mut status = json!({
                "name": c.config.name,
                "observability_name": c.config.name,
                "host_statuses": hosts,
            });
            if let Some(d) = &c.outlier {
                let t = d.success_rate_ejection_threshold();
                if t >= 0.0 {
                    status["success_rate_ejection_threshold"] = json!({"value": t});
                }
            }
            status
        })
        .collect();
    json!({ "cluster_statuses": statuses })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_blocks_match_in_order_not_adjacent() {
        let b = vec![b"PO".to_vec(), b"NG".to_vec()];
        assert!(contains_in_order(b"+PONG\r\n", &b));
        assert!(contains_in_order(b"PO..NG", &b));
        assert!(!contains_in_order(b"NGPO", &b));
    }

    #[test]
    fn grpc_request_and_response_encoding() {
        let p = GrpcProbe::new(
            "c",
            &GrpcHealthCheck {
                service_name: "svc".into(),
                authority: None,
            },
            Arc::new(ProbeTransport::default()),
        );
        assert_eq!(&p.message[..], b"\0\0\0\0\x05\x0a\x03svc");
        assert_eq!(p.authority, "c");
        assert_eq!(serving_status(b"\0\0\0\0\x02\x08\x01"), Ok(1));
        assert_eq!(serving_status(b"\0\0\0\0\x02\x08\x02"), Ok(2));
        assert_eq!(serving_status(b"\0\0\0\0\0"), Ok(0));
        assert!(serving_status(b"\0\0\0\0\x05\x08").is_err());
        assert!(serving_status(b"\0\0\0\0\x01\x08").is_err());
    }
}
