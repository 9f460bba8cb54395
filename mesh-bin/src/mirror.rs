//! Request mirroring on the forward path (route `request_mirror_policies`):
//! shadow copies sent fire-and-forget to the mirror cluster's own balancer
//! and pools, counted in that cluster's stats as ordinary requests. The
//! primary request never waits for a shadow.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Uri};
use http_body_util::BodyExt;
use mesh_codec::http::body::{ProxyBody, UpstreamBody};
use mesh_codec::http::client::FailureKind;
use mesh_core::policy::RoutingPriority;
use mesh_filter::mirror::shadow_authority;
use tokio::sync::oneshot;

use crate::cluster::WorkerCluster;

/// One shadow to send: the mirror cluster and whether `-shadow` is
/// appended to the authority.
pub(crate) struct Shadow {
    pub(crate) cluster: Arc<WorkerCluster>,
    pub(crate) suffix: bool,
}

/// The shadow's body: known now, or once the primary has read it whole
/// (an error when it went past the buffer limit: no shadow then).
pub(crate) enum ShadowBody {
    Ready(Bytes),
    Tee(oneshot::Receiver<Bytes>),
}

/// Spawns the shadows of one request. `head` is the request head as sent
/// to the primary upstream; `down_version` picks each mirror cluster's
/// protocol as for the primary; `timeout` is the route timeout.
pub(crate) fn spawn(
    shadows: Vec<Shadow>,
    head: http::request::Parts,
    body: ShadowBody,
    down_version: http::Version,
    priority: RoutingPriority,
    timeout: Option<Duration>,
) {
    tokio::spawn(async move {
        let body = match body {
            ShadowBody::Ready(b) => b,
            ShadowBody::Tee(rx) => match rx.await {
                Ok(b) => b,
                Err(_) => return,
            },
        };
        for s in shadows {
            let head = head.clone();
            let body = body.clone();
            tokio::spawn(send(s, head, body, down_version, priority, timeout));
        }
    });
}

async fn send(
    shadow: Shadow,
    mut head: http::request::Parts,
    body: Bytes,
    down_version: http::Version,
    priority: RoutingPriority,
    timeout: Option<Duration>,
) {
    let cluster = shadow.cluster;
    let cstats = &cluster.entry.stats;
    if let Some(od) = &cluster.entry.on_demand {
        od.ready().await;
    }
    // An ORIGINAL_DST shadow cluster has no host of its own to mirror to.
    let picked = match cluster.entry.original_dst {
        Some(_) => None,
        None => cluster
            .entry
            .balancer
            .pick_with(&mesh_lb::PickContext::new()),
    };
    let Some(endpoint) = picked else {
        cstats.cx_none_healthy.inc();
        return;
    };
    let resources = cluster.entry.policy.resources(priority);
    if !resources.requests.can_create() {
        cluster.entry.policy.rq_active_overflow.inc();
        return;
    }
    let h2 = cluster.uses_h2(down_version);
    let authority = head
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            head.headers
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| endpoint.addr.to_string());
    let authority = if shadow.suffix {
        shadow_authority(&authority)
    } else {
        authority
    };
    let pq = head
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    if h2 {
        let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(pq.as_str())
            .build()
        else {
            return;
        };
        head.uri = uri;
        head.headers.remove(HOST);
        head.version = http::Version::HTTP_2;
    } else {
        let (Ok(uri), Ok(host)) = (pq.parse::<Uri>(), HeaderValue::from_str(&authority)) else {
            return;
        };
        head.uri = uri;
        head.headers.insert(HOST, host);
        head.version = http::Version::HTTP_11;
    }
    if !body.is_empty() {
        head.headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let req = Request::from_parts(head, ProxyBody::Full(Some(body)));

    cstats.rq_total.inc();
    endpoint.stats.rq_total.inc();
    let _active = resources.requests.acquire();
    let Some(pool) = cluster.pool(&endpoint, h2) else {
        return;
    };
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let sent = pool.send(req, false);
    let result = match deadline {
        Some(d) => tokio::time::timeout_at(d, sent).await.ok(),
        None => Some(sent.await),
    };
    match result {
        Some(Ok((resp, pool_end))) => {
            let status = resp.status();
            cstats.record_status(status.as_u16());
            if status.is_server_error() {
                endpoint.stats.rq_error.inc();
            }
            // Read the response to its end so the connection is reused.
            let sleep = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
            let body = UpstreamBody::new(resp.into_body(), pool_end, sleep);
            let _ = body.collect().await;
        }
        Some(Err(e)) => {
            count_failure(&cluster, &endpoint, &e);
            tracing::debug!(cluster = %cluster.entry.config.name, endpoint = %endpoint.addr, error = %e, "shadow request failed");
        }
        None => {
            endpoint.stats.rq_error.inc();
            cstats.rq_timeout.inc();
            cstats.record_status(504);
        }
    }
}

/// Counts an upstream request that failed without a response in the
/// cluster's and the endpoint's stats: `rq_error`, `cx_connect_fail` or
/// `rq_rx_reset`, and the status the proxy answers such a failure with (a
/// circuit breaker's refusal counts as `rq_active_overflow` instead).
pub(crate) fn count_failure(
    cluster: &WorkerCluster,
    endpoint: &mesh_lb::Endpoint,
    e: &mesh_codec::http::client::UpstreamError,
) {
    let cstats = &cluster.entry.stats;
    endpoint.stats.rq_error.inc();
    match e.kind() {
        FailureKind::Connect => {
            cstats.cx_connect_fail.inc();
            endpoint.stats.cx_connect_fail.inc();
            cstats.record_status(503);
        }
        FailureKind::Reset => {
            cstats.rq_rx_reset.inc();
            cstats.record_status(503);
        }
        FailureKind::Overflow => cluster.entry.policy.rq_active_overflow.inc(),
        _ => cstats.record_status(502),
    }
}
