//! The HTTP connection manager network filter
//! (`envoy.filters.network.http_connection_manager`) and its HTTP filters.

use std::time::Duration;

use mesh_core::config::{
    CodecType, EscapedSlashesAction, HttpConnectionManager, PathNormalization, RouteConfiguration,
};

use super::listener::{access_logs, ONE_HOUR};
use super::policy::http_filters;
use super::reader::{Ctx, Obj};
use super::route;

/// Envoy's default `stream_idle_timeout` (5 minutes).
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The HCM's typed config.
pub(crate) fn hcm(cx: &mut Ctx, mut o: Obj<'_>) -> HttpConnectionManager {
    let stat_prefix = o.req_string(cx, "stat_prefix").unwrap_or_default();
    let codec_type = o
        .enumeration(
            cx,
            "codec_type",
            &[
                ("AUTO", CodecType::Auto),
                ("HTTP1", CodecType::Http1),
                ("HTTP2", CodecType::Http2),
            ],
            &[("HTTP3", "HTTP/3 is not supported yet")],
        )
        .unwrap_or_default();

    let rds_path = o.at("rds");
    let rds = o.obj(cx, "rds").map(|r| super::xds::rds(cx, r));
    if rds.is_some() && o.has("route_config") {
        cx.error(&rds_path, "only one of rds and route_config may be set");
    }
    o.refuse(cx, "scoped_routes", "scoped routes are not supported");
    let route_config = match o.obj(cx, "route_config") {
        Some(rc) => route::route_config(cx, rc),
        None => {
            if !o.has("route_config") && !o.has("rds") && !o.has("scoped_routes") {
                cx.missing(&o.at("route_config"));
            }
            RouteConfiguration::default()
        }
    };

    let (http_filters, http_filter_meta) = http_filters(cx, &mut o);

    let stream_idle_timeout = o.timeout(cx, "stream_idle_timeout", Some(STREAM_IDLE_TIMEOUT));
    let request_timeout = o.timeout(cx, "request_timeout", None);
    let request_headers_timeout = o.timeout(cx, "request_headers_timeout", None);
    let (idle_timeout, max_stream_duration) = match o.obj(cx, "common_http_protocol_options") {
        Some(mut c) => {
            let t = c.timeout(cx, "idle_timeout", Some(ONE_HOUR));
            let d = c
                .duration(cx, "max_stream_duration")
                .filter(|d| !d.is_zero());
            c.finish(cx);
            (t, d)
        }
        None => (Some(ONE_HOUR), None),
    };
    let kb_path = o.at("max_request_headers_kb");
    let max_request_headers_kb = match o.u32(cx, "max_request_headers_kb") {
        Some(kb) if (1..=8192).contains(&kb) => kb,
        Some(kb) => {
            cx.error(&kb_path, format!("must be from 1 to 8192, found {kb}"));
            60
        }
        None => 60,
    };
    let use_remote_address = o.bool(cx, "use_remote_address").unwrap_or(false);
    let internal_address_config = o
        .obj(cx, "internal_address_config")
        .map(|c| super::policy::internal_address_config(cx, c))
        .unwrap_or_default();
    let skip_xff_append = o.bool(cx, "skip_xff_append").unwrap_or(false);
    let generate_request_id = o.bool(cx, "generate_request_id").unwrap_or(true);
    let server_name = o.string(cx, "server_name");
    let access_log = access_logs(cx, &mut o);

    let mut upgrade_types = Vec::new();
    for (path, v) in o.list(cx, "upgrade_configs") {
        let Some(mut u) = Obj::new(cx, path, v) else {
            continue;
        };
        if let Some(t) = u.req_string(cx, "upgrade_type") {
            upgrade_types.push(t.to_ascii_lowercase());
        }
        u.finish(cx);
    }
    let path_normalization = PathNormalization {
        normalize_path: o.bool(cx, "normalize_path").unwrap_or(false),
        merge_slashes: o.bool(cx, "merge_slashes").unwrap_or(false),
        escaped_slashes: o
            .enumeration(
                cx,
                "path_with_escaped_slashes_action",
                &[
                    (
                        "IMPLEMENTATION_SPECIFIC_DEFAULT",
                        EscapedSlashesAction::KeepUnchanged,
                    ),
                    ("KEEP_UNCHANGED", EscapedSlashesAction::KeepUnchanged),
                    ("REJECT_REQUEST", EscapedSlashesAction::RejectRequest),
                    (
                        "UNESCAPE_AND_REDIRECT",
                        EscapedSlashesAction::UnescapeAndRedirect,
                    ),
                    (
                        "UNESCAPE_AND_FORWARD",
                        EscapedSlashesAction::UnescapeAndForward,
                    ),
                ],
                &[],
            )
            .unwrap_or_default(),
    };
    o.empty_obj(cx, "http_protocol_options");
    o.empty_obj(cx, "http2_protocol_options");
    o.finish(cx);

    HttpConnectionManager {
        stat_prefix,
        codec_type,
        route_config,
        http_filters,
        stream_idle_timeout,
        request_timeout,
        request_headers_timeout,
        max_stream_duration,
        idle_timeout,
        max_request_headers_kb,
        use_remote_address,
        skip_xff_append,
        generate_request_id,
        server_name,
        access_log,
        upgrade_types,
        http_filter_meta,
        internal_address_config,
        rds,
        path_normalization,
    }
}
