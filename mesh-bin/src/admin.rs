//! The admin HTTP listener (`admin.address`), with Envoy's paths and formats
//! so that existing tooling (readiness probes, Prometheus scrapes, scripts
//! that read `/clusters` or `/listeners?format=json`) works unchanged:
//!
//! | path | what |
//! |---|---|
//! | `/ready` | 200 `LIVE` once every listener serves; 503 `PRE_INITIALIZING` / `DRAINING` otherwise |
//! | `/stats/prometheus` | every stat, Prometheus text format |
//! | `/stats` | the same stats in Envoy's text form (`cluster.web.upstream_rq_2xx: 3`) |
//! | `/listeners?format=json` | listener names and bound addresses (ports chosen for `port_value: 0` included) |
//! | `/clusters` | each endpoint's weight, health flags, request counters and outlier state, Envoy's text format (`?format=json`: Envoy's JSON) |
//! | `/config_dump` | the running configuration as JSON |
//! | `/quitquitquit` (POST) | drain and exit |

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::listener::Drain;
use mesh_core::stats::Store;
use tokio::net::TcpListener;

use crate::cluster::ClusterManager;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    /// Every stat.
    pub store: Store,
    /// The clusters.
    pub clusters: Arc<ClusterManager>,
    /// Listener names and bound addresses.
    pub listeners: Vec<(String, SocketAddr)>,
    /// The configuration as JSON, for `/config_dump`.
    pub config_json: serde_json::Value,
    /// True once every listener serves.
    pub ready: AtomicBool,
    /// Drain coordination (for `/ready` and `/quitquitquit`).
    pub drain: Drain,
    /// The dynamic configuration, when `dynamic_resources` is used: its
    /// listeners join `/listeners`, its resources `/config_dump`.
    pub xds: std::sync::OnceLock<Arc<crate::dynamic::XdsRuntime>>,
}

impl AdminState {
    /// Static and dynamic listeners with their bound addresses.
    fn all_listeners(&self) -> Vec<(String, SocketAddr)> {
        let mut out = self.listeners.clone();
        if let Some(x) = self.xds.get() {
            out.extend(x.listeners());
        }
        out
    }

    /// `/config_dump`: the file; with xDS, Envoy's `configs` list with the
    /// file as the bootstrap and the dynamic resources of each type.
    fn config_dump(&self) -> serde_json::Value {
        match self.xds.get() {
            None => self.config_json.clone(),
            Some(x) => {
                let mut dump = x.config_dump();
                if let Some(configs) = dump.get_mut("configs").and_then(|c| c.as_array_mut()) {
                    configs.insert(
                        0,
                        serde_json::json!({
                            "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
                            "bootstrap": self.config_json,
                        }),
                    );
                }
                dump
            }
        }
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn listeners_json(state: &AdminState) -> String {
    let statuses: Vec<serde_json::Value> = state
        .all_listeners()
        .iter()
        .map(|(name, addr)| {
            serde_json::json!({
                "name": name,
                "local_address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}
            })
        })
        .collect();
    serde_json::json!({ "listener_statuses": statuses }).to_string()
}

fn clusters_text(state: &AdminState) -> String {
    let mut out = String::new();
    let clusters = match state.xds.get() {
        Some(x) => x.clusters(),
        None => state.clusters.clone(),
    };
    for c in clusters.iter() {
        let name = &c.config.name;
        let _ = writeln!(out, "{name}::observability_name::{name}");
        if let Some(d) = &c.outlier {
            crate::health::outlier_cluster_lines(&mut out, name, d);
        }
        let _ = writeln!(out, "{name}::added_via_api::false");
        for e in &c.balancer.endpoints().endpoints {
            let p = format!("{name}::{}", e.addr);
            let _ = writeln!(out, "{p}::hostname::{}", e.hostname);
            let _ = writeln!(out, "{p}::rq_active::{}", e.stats.rq_active.get());
            let _ = writeln!(out, "{p}::rq_total::{}", e.stats.rq_total.get());
            let _ = writeln!(out, "{p}::rq_error::{}", e.stats.rq_error.get());
            let _ = writeln!(
                out,
                "{p}::rq_success::{}",
                e.stats
                    .rq_total
                    .get()
                    .saturating_sub(e.stats.rq_error.get())
            );
            let _ = writeln!(
                out,
                "{p}::cx_connect_fail::{}",
                e.stats.cx_connect_fail.get()
            );
            let _ = writeln!(out, "{p}::weight::{}", e.weight);
            let _ = writeln!(out, "{p}::region::{}", e.locality.region);
            let _ = writeln!(out, "{p}::zone::{}", e.locality.zone);
            let _ = writeln!(out, "{p}::sub_zone::{}", e.locality.sub_zone);
            let _ = writeln!(out, "{p}::priority::{}", e.priority);
            let _ = writeln!(out, "{p}::health_flags::{}", e.health.render());
            crate::health::outlier_endpoint_lines(&mut out, &p, c, e);
        }
    }
    out
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    match (req.method(), path) {
        (_, "/ready") => {
            if state.drain.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n".into(), "text/plain")
            } else if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "LIVE\n".into(), "text/plain")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n".into(), "text/plain")
            }
        }
        (_, "/stats/prometheus") => text(
            StatusCode::OK,
            state.store.render_prometheus(),
            "text/plain; version=0.0.4",
        ),
        (_, "/stats") => text(StatusCode::OK, state.store.render_envoy_text(), "text/plain"),
        (_, "/listeners") => {
            if query.contains("format=json") {
                text(StatusCode::OK, listeners_json(state), "application/json")
            } else {
                let body = state
                    .all_listeners()
                    .iter()
                    .map(|(n, a)| format!("{n}::{a}\n"))
                    .collect();
                text(StatusCode::OK, body, "text/plain")
            }
        }
        (_, "/clusters") if query.contains("format=json") => text(
            StatusCode::OK,
            crate::health::clusters_json(&state.clusters).to_string(),
            "application/json",
        ),
        (_, "/clusters") => text(StatusCode::OK, clusters_text(state), "text/plain"),
        (_, "/config_dump") => text(
            StatusCode::OK,
            serde_json::to_string_pretty(&state.config_dump()).unwrap_or_default(),
            "application/json",
        ),
        (&Method::POST, "/quitquitquit") => {
            state.drain.signal();
            text(StatusCode::OK, "OK\n".into(), "text/plain")
        }
        (_, "/") => text(
            StatusCode::OK,
            "/ready\n/stats\n/stats/prometheus\n/listeners\n/clusters\n/config_dump\n/quitquitquit (POST)\n".into(),
            "text/plain",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// Serves the admin API on `listener` until the process exits.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
