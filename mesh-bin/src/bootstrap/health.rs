//! A cluster's `health_checks` (Envoy `config.core.v3.HealthCheck`) and
//! `outlier_detection` (Envoy `config.cluster.v3.OutlierDetection`).
//!
//! Envoy's proto validation is applied with its field paths: durations that
//! must be greater than zero, percentages of at most 100, HTTP status ranges
//! within `[100, 600)`. mesh also refuses thresholds of 0, which Envoy takes
//! but which would make an endpoint never change state.

use std::time::Duration;

use mesh_core::config::{
    GrpcHealthCheck, HealthCheck, HealthChecker, HttpHealthCheck, OutlierDetection, TcpHealthCheck,
};

use super::headers::header_options;
use super::reader::{as_str, one_of, Ctx, Obj};

/// Envoy's default `no_traffic_interval`.
const NO_TRAFFIC_INTERVAL: Duration = Duration::from_secs(60);

/// A duration field that must be greater than 0 when present.
fn positive(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Option<Duration> {
    let path = o.at(key);
    let d = o.duration(cx, key)?;
    if d.is_zero() {
        cx.error(&path, "must be greater than 0s");
        return None;
    }
    Some(d)
}

/// A required duration that must be greater than 0.
fn req_positive(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Option<Duration> {
    if !o.has(key) {
        cx.missing(&o.at(key));
        return None;
    }
    positive(cx, o, key)
}

/// A required threshold of at least 1.
fn threshold(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Option<u32> {
    let path = o.at(key);
    if !o.has(key) {
        cx.missing(&path);
        return None;
    }
    let n = o.u32(cx, key)?;
    if n == 0 {
        cx.error(&path, "must be at least 1");
        return None;
    }
    Some(n)
}

/// `health_checks`: Envoy runs at most one health checker per cluster.
pub(crate) fn health_checks(cx: &mut Ctx, o: &mut Obj<'_>) -> Option<HealthCheck> {
    let path = o.at("health_checks");
    let list = o.list(cx, "health_checks");
    if list.len() > 1 {
        cx.error(
            &path,
            "at most one health check is supported per cluster (as in Envoy)",
        );
    }
    let (p, v) = list.into_iter().next()?;
    let h = Obj::new(cx, p, v)?;
    health_check(cx, h)
}

fn health_check(cx: &mut Ctx, mut o: Obj<'_>) -> Option<HealthCheck> {
    let timeout = req_positive(cx, &mut o, "timeout");
    let interval = req_positive(cx, &mut o, "interval");
    let initial_jitter = o.duration(cx, "initial_jitter").unwrap_or_default();
    let interval_jitter = o.duration(cx, "interval_jitter").unwrap_or_default();
    let interval_jitter_percent = o.u32(cx, "interval_jitter_percent").unwrap_or(0);
    let unhealthy_threshold = threshold(cx, &mut o, "unhealthy_threshold");
    let healthy_threshold = threshold(cx, &mut o, "healthy_threshold");
    let no_traffic_interval =
        positive(cx, &mut o, "no_traffic_interval").unwrap_or(NO_TRAFFIC_INTERVAL);
    let unhealthy_interval = positive(cx, &mut o, "unhealthy_interval");
    let unhealthy_edge_interval = positive(cx, &mut o, "unhealthy_edge_interval");
    let healthy_edge_interval = positive(cx, &mut o, "healthy_edge_interval");
    // Envoy's default: keep the connection between probes. Each mesh probe
    // opens its own connection; the outcome is the same.
    o.bool(cx, "reuse_connection");
    let always_log_health_check_failures = o
        .bool(cx, "always_log_health_check_failures")
        .unwrap_or(false);
    let event_log_path = o.string(cx, "event_log_path").filter(|p| !p.is_empty());
    let transport_socket_match_criteria = o
        .obj(cx, "transport_socket_match_criteria")
        .map(|s| super::lb::struct_values(cx, s));
    let mut tls_alpn = Vec::new();
    if let Some(mut t) = o.obj(cx, "tls_options") {
        for (path, p) in t.strings(cx, "alpn_protocols") {
            if p.is_empty() || p.len() > 255 {
                cx.error(&path, "an ALPN protocol name is 1 to 255 bytes");
            } else {
                tls_alpn.push(p);
            }
        }
        t.finish(cx);
    }
    o.refuse(
        cx,
        "event_logger",
        "event logger extensions are not supported; use event_log_path",
    );
    o.refuse(
        cx,
        "custom_health_check",
        "only http_health_check, tcp_health_check and grpc_health_check are supported",
    );
    let kinds = ["http_health_check", "tcp_health_check", "grpc_health_check"];
    let checker = match one_of(cx, &o, &kinds, !o.has("custom_health_check")) {
        Some("http_health_check") => o.obj(cx, "http_health_check").and_then(|h| http(cx, h)),
        Some("tcp_health_check") => o.obj(cx, "tcp_health_check").map(|t| tcp(cx, t)),
        Some(_) => o.obj(cx, "grpc_health_check").map(|g| grpc(cx, g)),
        None => {
            for k in kinds {
                o.take(k);
            }
            None
        }
    };
    o.finish(cx);
    let interval = interval?;
    let unhealthy_interval = unhealthy_interval.unwrap_or(interval);
    Some(HealthCheck {
        timeout: timeout?,
        interval,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent,
        unhealthy_threshold: unhealthy_threshold?,
        healthy_threshold: healthy_threshold?,
        no_traffic_interval,
        unhealthy_interval,
        unhealthy_edge_interval: unhealthy_edge_interval.unwrap_or(unhealthy_interval),
        healthy_edge_interval: healthy_edge_interval.unwrap_or(interval),
        always_log_health_check_failures,
        event_log_path,
        transport_socket_match_criteria,
        tls_alpn,
        checker: checker?,
    })
}

fn http(cx: &mut Ctx, mut o: Obj<'_>) -> Option<HealthChecker> {
    let host = o.string(cx, "host").filter(|h| !h.is_empty());
    if let Some(h) = &host {
        if http::HeaderValue::from_str(h).is_err() {
            cx.error(&o.at("host"), format!("invalid header value {h:?}"));
        }
    }
    let path_path = o.at("path");
    let path = o.req_string(cx, "path");
    if let Some(p) = &path {
        if p.is_empty() {
            cx.error(&path_path, "must not be empty");
        } else if p.parse::<http::uri::PathAndQuery>().is_err() || !p.starts_with('/') {
            cx.error(&path_path, format!("invalid path {p:?}"));
        }
    }
    let mut expected_statuses = Vec::new();
    for (p, v) in o.list(cx, "expected_statuses") {
        let Some(mut r) = Obj::new(cx, p, v) else {
            continue;
        };
        let start = r.i64(cx, "start").unwrap_or(0);
        let end = r.i64(cx, "end").unwrap_or(0);
        let rpath = r.path().to_owned();
        r.finish(cx);
        if start < 100 {
            cx.error(
                &rpath,
                format!(
                    "invalid http expected status range: expecting start >= 100, but found {start}"
                ),
            );
        } else if end > 600 {
            cx.error(
                &rpath,
                format!(
                    "invalid http expected status range: expecting end <= 600, but found {end}"
                ),
            );
        } else if start >= end {
            cx.error(
                &rpath,
                format!("invalid http expected status range: expecting start < end, but found start={start} and end={end}"),
            );
        } else {
            expected_statuses.push((start as u16, end as u16));
        }
    }
    if expected_statuses.is_empty() {
        expected_statuses.push((200, 201));
    }
    let request_headers_to_add = header_options(cx, &mut o, "request_headers_to_add")
        .into_iter()
        .map(|h| (h.key, h.value))
        .collect();
    let request_headers_to_remove = o
        .strings(cx, "request_headers_to_remove")
        .into_iter()
        .map(|(_, n)| n.to_ascii_lowercase())
        .collect();
    let http2 = o
        .enumeration(
            cx,
            "codec_client_type",
            &[("HTTP1", false), ("HTTP2", true)],
            &[("HTTP3", "HTTP/3 is not supported")],
        )
        .unwrap_or(false);
    o.finish(cx);
    Some(HealthChecker::Http(HttpHealthCheck {
        host,
        path: path.filter(|p| !p.is_empty())?,
        expected_statuses,
        request_headers_to_add,
        request_headers_to_remove,
        http2,
    }))
}

/// A `Payload`: `text` (hex) or `binary` (base64 in JSON; refused here).
fn payload(cx: &mut Ctx, mut o: Obj<'_>) -> Option<Vec<u8>> {
    o.refuse(cx, "binary", "give the payload as hex in text");
    let path = o.at("text");
    let text = match o.take("text") {
        Some(serde_json::Value::Number(n)) => {
            // YAML reads hex such as 0123 or 50494e47 as a number, losing
            // the text: ask for quotes rather than guess.
            cx.error(
                &path,
                format!("the hex payload was read as the number {n}; quote it (text: \"...\")"),
            );
            None
        }
        Some(v) => as_str(cx, &path, v),
        None => None,
    };
    o.finish(cx);
    let text = text?;
    match decode_hex(&text) {
        Some(b) if !b.is_empty() => Some(b),
        _ => {
            cx.error(&path, format!("{text:?} is not a non-empty hex string"));
            None
        }
    }
}

/// Decodes hex text (`"0a1B"`); `None` when it is not hex.
pub(crate) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn tcp(cx: &mut Ctx, mut o: Obj<'_>) -> HealthChecker {
    let send = o.obj(cx, "send").and_then(|p| payload(cx, p));
    let mut receive = Vec::new();
    for (p, v) in o.list(cx, "receive") {
        if let Some(b) = Obj::new(cx, p, v).and_then(|p| payload(cx, p)) {
            receive.push(b);
        }
    }
    o.finish(cx);
    HealthChecker::Tcp(TcpHealthCheck {
        send: send.unwrap_or_default(),
        receive,
    })
}

fn grpc(cx: &mut Ctx, mut o: Obj<'_>) -> HealthChecker {
    let service_name = o.string(cx, "service_name").unwrap_or_default();
    let authority = o.string(cx, "authority").filter(|a| !a.is_empty());
    if let Some(a) = &authority {
        if http::uri::Authority::try_from(a.as_str()).is_err() {
            cx.error(&o.at("authority"), format!("invalid authority {a:?}"));
        }
    }
    o.finish(cx);
    HealthChecker::Grpc(GrpcHealthCheck {
        service_name,
        authority,
    })
}

/// A percentage field (at most 100).
fn percent(cx: &mut Ctx, o: &mut Obj<'_>, key: &str, default: u32) -> u32 {
    let path = o.at(key);
    match o.u32(cx, key) {
        Some(n) if n > 100 => {
            cx.error(&path, format!("must be at most 100, found {n}"));
            default
        }
        Some(n) => n,
        None => default,
    }
}

/// `outlier_detection`.
pub(crate) fn outlier_detection(cx: &mut Ctx, mut o: Obj<'_>) -> OutlierDetection {
    let d = OutlierDetection::default();
    let count = |cx: &mut Ctx, o: &mut Obj<'_>, key: &str, default: u32| {
        let path = o.at(key);
        match o.u32(cx, key) {
            Some(0) => {
                cx.error(&path, "must be at least 1");
                default
            }
            Some(n) => n,
            None => default,
        }
    };
    let consecutive_5xx = count(cx, &mut o, "consecutive_5xx", d.consecutive_5xx);
    let consecutive_gateway_failure = count(
        cx,
        &mut o,
        "consecutive_gateway_failure",
        d.consecutive_gateway_failure,
    );
    let consecutive_local_origin_failure = count(
        cx,
        &mut o,
        "consecutive_local_origin_failure",
        d.consecutive_local_origin_failure,
    );
    let split_external_local_origin_errors = o
        .bool(cx, "split_external_local_origin_errors")
        .unwrap_or(false);
    let interval = positive(cx, &mut o, "interval").unwrap_or(d.interval);
    let base_ejection_time =
        positive(cx, &mut o, "base_ejection_time").unwrap_or(d.base_ejection_time);
    let max_ejection_time = positive(cx, &mut o, "max_ejection_time")
        .unwrap_or(d.max_ejection_time)
        .max(base_ejection_time);
    let out = OutlierDetection {
        consecutive_5xx,
        consecutive_gateway_failure,
        consecutive_local_origin_failure,
        split_external_local_origin_errors,
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent: percent(cx, &mut o, "max_ejection_percent", d.max_ejection_percent),
        always_eject_one_host: o.bool(cx, "always_eject_one_host").unwrap_or(false),
        enforcing_consecutive_5xx: percent(
            cx,
            &mut o,
            "enforcing_consecutive_5xx",
            d.enforcing_consecutive_5xx,
        ),
        enforcing_consecutive_gateway_failure: percent(
            cx,
            &mut o,
            "enforcing_consecutive_gateway_failure",
            d.enforcing_consecutive_gateway_failure,
        ),
        enforcing_consecutive_local_origin_failure: percent(
            cx,
            &mut o,
            "enforcing_consecutive_local_origin_failure",
            d.enforcing_consecutive_local_origin_failure,
        ),
        enforcing_success_rate: percent(
            cx,
            &mut o,
            "enforcing_success_rate",
            d.enforcing_success_rate,
        ),
        enforcing_local_origin_success_rate: percent(
            cx,
            &mut o,
            "enforcing_local_origin_success_rate",
            d.enforcing_local_origin_success_rate,
        ),
        success_rate_minimum_hosts: o
            .u32(cx, "success_rate_minimum_hosts")
            .unwrap_or(d.success_rate_minimum_hosts),
        success_rate_request_volume: o
            .u32(cx, "success_rate_request_volume")
            .unwrap_or(d.success_rate_request_volume),
        success_rate_stdev_factor: o
            .u32(cx, "success_rate_stdev_factor")
            .unwrap_or(d.success_rate_stdev_factor),
        failure_percentage_threshold: percent(
            cx,
            &mut o,
            "failure_percentage_threshold",
            d.failure_percentage_threshold,
        ),
        enforcing_failure_percentage: percent(
            cx,
            &mut o,
            "enforcing_failure_percentage",
            d.enforcing_failure_percentage,
        ),
        enforcing_failure_percentage_local_origin: percent(
            cx,
            &mut o,
            "enforcing_failure_percentage_local_origin",
            d.enforcing_failure_percentage_local_origin,
        ),
        failure_percentage_minimum_hosts: o
            .u32(cx, "failure_percentage_minimum_hosts")
            .unwrap_or(d.failure_percentage_minimum_hosts),
        failure_percentage_request_volume: o
            .u32(cx, "failure_percentage_request_volume")
            .unwrap_or(d.failure_percentage_request_volume),
        successful_active_health_check_uneject_host: o
            .bool(cx, "successful_active_health_check_uneject_host")
            .unwrap_or(true),
    };
    o.finish(cx);
    out
}
