//! RBAC in the proxy: `envoy.filters.http.rbac` checked on each request
//! before routing (403 `RBAC: access denied`, or gRPC `PERMISSION_DENIED`
//! for gRPC requests), and `envoy.filters.network.rbac` checked once per
//! connection, after the TLS handshake, before the terminal filter (a denied
//! connection is closed). The engine is `mesh_filter::rbac`.
//!
//! Stats, Envoy's names: `envoy_http_rbac_{allowed,denied,shadow_allowed,shadow_denied}`
//! labelled by the HCM's `envoy_http_conn_manager_prefix`, and
//! `envoy_rbac_*{envoy_rbac_prefix=<stat_prefix>}` for the network filter.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use mesh_codec::http::ProxyBody;
use mesh_core::config::rbac::Rbac;
use mesh_core::config::{HttpConnectionManager, HttpFilter};
use mesh_core::headers::StreamInfo;
use mesh_core::identity::PeerIdentity;
use mesh_core::stats::Store;
use mesh_filter::rbac::{ConnectionFacts, RbacFilter, RbacStats, DENIED_BODY};

/// The HCM's RBAC filter, if it has one.
pub(crate) fn http_rbac(
    config: &HttpConnectionManager,
    store: &Store,
) -> Result<Option<RbacFilter>, String> {
    for (i, f) in config.http_filters.iter().enumerate() {
        if let HttpFilter::Rbac(r) = f {
            let stats = RbacStats::new(
                store,
                "envoy_http",
                &[("envoy_http_conn_manager_prefix", config.stat_prefix.clone())],
            );
            return RbacFilter::new(r, stats)
                .map(Some)
                .map_err(|e| format!("http_filters[{i}].typed_config.{e}"));
        }
    }
    Ok(None)
}

/// A network RBAC filter.
pub(crate) fn network_rbac(config: &Rbac, store: &Store) -> Result<RbacFilter, String> {
    let stats = RbacStats::new(
        store,
        "envoy",
        &[("envoy_rbac_prefix", config.stat_prefix.clone())],
    );
    RbacFilter::new(config, stats)
}

/// Checks a request; `Some(403)` when it is denied.
pub(crate) fn deny_reply<B>(
    rbac: &RbacFilter,
    req: &Request<B>,
    info: &StreamInfo,
    server: &HeaderValue,
    grpc: bool,
) -> Option<Response<ProxyBody>> {
    let identity = req.extensions().get::<Arc<PeerIdentity>>().map(|i| &**i);
    let facts = ConnectionFacts {
        peer: info.downstream_remote,
        local: info.downstream_local,
        identity,
    };
    if rbac.check(Some(req), &facts) {
        return None;
    }
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(DENIED_BODY.as_bytes())));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp.headers_mut()
        .insert(http::header::SERVER, server.clone());
    if grpc {
        resp = crate::http::grpc_local_reply(resp);
    }
    Some(resp)
}
