//! `access_log` entries: the logger (`envoy.access_loggers.{file,stdout,stderr}`),
//! its `log_format` (Envoy `SubstitutionFormatString`, parsed here into
//! command operators) and its `filter` (`AccessLogFilter`).

use mesh_core::access_log::{
    parse_format, AccessLogFilter, Comparison, JsonNode, LogFormat, LogFormatKind,
    GRPC_STATUS_NAMES, RESPONSE_FLAG_NAMES,
};
use mesh_core::config::{AccessLog, AccessLogSink};
use serde_json::Value;

use super::reader::{as_enum, as_str, one_of, Ctx, Obj};
use super::{select_extension, Known};

const ACCESS_LOGGERS: &[Known] = &[
    Known {
        name: "envoy.access_loggers.stdout",
        type_url: "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
    },
    Known {
        name: "envoy.access_loggers.stderr",
        type_url: "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
    },
    Known {
        name: "envoy.access_loggers.file",
        type_url: "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
    },
];

/// The `access_log` list of a filter or listener.
pub(crate) fn access_logs(cx: &mut Ctx, parent: &mut Obj<'_>) -> Vec<AccessLog> {
    let mut out = Vec::new();
    for (path, v) in parent.list(cx, "access_log") {
        let Some(mut o) = Obj::new(cx, path, v) else {
            continue;
        };
        let mut filter = o.obj(cx, "filter").and_then(|f| filter(cx, f));
        if let Some((which, tc)) = select_extension(cx, &mut o, "access logger", ACCESS_LOGGERS) {
            let file_path = tc.as_ref().map(|t| t.at("path"));
            let mut path = None;
            let mut format = None;
            if let Some(mut tc) = tc {
                for old in ["format", "json_format", "typed_json_format"] {
                    tc.refuse(cx, old, "deprecated in Envoy; use log_format");
                }
                format = tc.obj(cx, "log_format").and_then(|f| log_format(cx, f));
                if which == 2 {
                    path = tc.req_string(cx, "path");
                }
                tc.finish(cx);
            }
            let sink = match which {
                0 => Some(AccessLogSink::Stdout),
                1 => Some(AccessLogSink::Stderr),
                _ => match (path, file_path) {
                    (Some(p), _) => Some(AccessLogSink::File(p)),
                    (None, Some(_)) => None,
                    (None, None) => {
                        cx.missing(&o.at("typed_config"));
                        None
                    }
                },
            };
            if let Some(sink) = sink {
                out.push(AccessLog {
                    sink,
                    format,
                    filter: filter.take(),
                });
            }
        }
        o.finish(cx);
    }
    out
}

/// `SubstitutionFormatString`.
fn log_format(cx: &mut Ctx, mut o: Obj<'_>) -> Option<LogFormat> {
    let which = one_of(
        cx,
        &o,
        &["text_format", "text_format_source", "json_format"],
        true,
    );
    if which.is_none() {
        // Already reported; not unsupported on top of that.
        for k in ["text_format", "text_format_source", "json_format"] {
            o.take(k);
        }
    }
    let omit_empty_values = o.bool(cx, "omit_empty_values").unwrap_or(false);
    o.refuse(cx, "formatters", "formatter extensions are not supported");
    if let Some(mut opts) = o.obj(cx, "json_format_options") {
        if opts.bool(cx, "sort_properties") == Some(true) {
            cx.unsupported(
                &opts.at("sort_properties"),
                Some("keys are written in configuration order"),
            );
        }
        opts.finish(cx);
    }
    // Only used by loggers that send lines over a protocol (not files).
    o.string(cx, "content_type");
    let kind = match which {
        Some("text_format") => {
            let path = o.at("text_format");
            let text = o.string(cx, "text_format")?;
            text_template(cx, &path, &text).map(LogFormatKind::Text)
        }
        Some("text_format_source") => {
            let mut src = o.obj(cx, "text_format_source")?;
            let text = match one_of(
                cx,
                &src,
                &["inline_string", "inline_bytes", "filename"],
                true,
            ) {
                Some("inline_string") => src.string(cx, "inline_string"),
                Some("inline_bytes") => {
                    let p = src.at("inline_bytes");
                    src.string(cx, "inline_bytes")
                        .and_then(|b| match super::route::base64_decode(&b) {
                            Some(bytes) => String::from_utf8(bytes).ok(),
                            None => None,
                        })
                        .or_else(|| {
                            cx.error(&p, "not base64 of UTF-8 text");
                            None
                        })
                }
                Some(_) => {
                    let p = src.at("filename");
                    src.string(cx, "filename")
                        .and_then(|f| match std::fs::read_to_string(&f) {
                            Ok(t) => Some(t),
                            Err(e) => {
                                cx.error(&p, format!("cannot read {f:?}: {e}"));
                                None
                            }
                        })
                }
                None => None,
            };
            let path = src.path().to_owned();
            src.finish(cx);
            text_template(cx, &path, &text?).map(LogFormatKind::Text)
        }
        Some(_) => {
            let path = o.at("json_format");
            let v = o.take("json_format")?;
            json_object(cx, &path, v).map(LogFormatKind::Json)
        }
        None => None,
    };
    o.finish(cx);
    Some(LogFormat {
        kind: kind?,
        omit_empty_values,
    })
}

fn text_template(cx: &mut Ctx, path: &str, text: &str) -> Option<mesh_core::access_log::Template> {
    match parse_format(text) {
        Ok(t) => Some(t),
        Err(e) => {
            cx.error(path, e);
            None
        }
    }
}

fn json_object(cx: &mut Ctx, path: &str, v: &Value) -> Option<Vec<(String, JsonNode)>> {
    let Value::Object(map) = v else {
        cx.error(path, "expected a map of keys to format strings");
        return None;
    };
    let mut out = Vec::with_capacity(map.len());
    let mut ok = true;
    for (k, v) in map {
        let p = super::reader::join(path, k);
        let node = match v {
            Value::String(s) => text_template(cx, &p, s).map(JsonNode::Template),
            Value::Object(_) => json_object(cx, &p, v).map(JsonNode::Object),
            Value::Number(_) | Value::Bool(_) | Value::Null => {
                Some(JsonNode::Literal(v.to_string()))
            }
            Value::Array(_) => {
                cx.unsupported(&p, Some("lists in json_format"));
                None
            }
        };
        match node {
            Some(n) => out.push((k.clone(), n)),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

const FILTERS: &[&str] = &[
    "status_code_filter",
    "duration_filter",
    "not_health_check_filter",
    "traceable_filter",
    "runtime_filter",
    "and_filter",
    "or_filter",
    "header_filter",
    "response_flag_filter",
    "grpc_status_filter",
    "extension_filter",
    "metadata_filter",
    "log_type_filter",
];

/// `AccessLogFilter`.
fn filter(cx: &mut Ctx, mut o: Obj<'_>) -> Option<AccessLogFilter> {
    let which = one_of(cx, &o, FILTERS, true)?;
    let f = match which {
        "status_code_filter" | "duration_filter" => {
            let mut f = o.obj(cx, which)?;
            let c = f.obj(cx, "comparison");
            let (cmp, value) = match c {
                Some(c) => comparison(cx, c)?,
                None => {
                    cx.missing(&f.at("comparison"));
                    return None;
                }
            };
            f.finish(cx);
            if which == "status_code_filter" {
                AccessLogFilter::StatusCode(cmp, value)
            } else {
                AccessLogFilter::Duration(cmp, value)
            }
        }
        "not_health_check_filter" => {
            o.empty_obj(cx, which);
            AccessLogFilter::NotHealthCheck
        }
        "and_filter" | "or_filter" => {
            let mut f = o.obj(cx, which)?;
            let items = f.list(cx, "filters");
            let path = f.at("filters");
            let mut subs = Vec::new();
            let n = items.len();
            for (p, v) in items {
                if let Some(s) = Obj::new(cx, p, v).and_then(|s| filter(cx, s)) {
                    subs.push(s);
                }
            }
            f.finish(cx);
            if n < 2 {
                cx.error(&path, "at least 2 filters are required");
                return None;
            }
            if subs.len() != n {
                return None;
            }
            if which == "and_filter" {
                AccessLogFilter::And(subs)
            } else {
                AccessLogFilter::Or(subs)
            }
        }
        "header_filter" => {
            let mut f = o.obj(cx, which)?;
            let h = f.obj(cx, "header");
            let path = f.at("header");
            f.finish(cx);
            match h {
                Some(h) => AccessLogFilter::Header(super::route::header_matcher(cx, h)),
                None => {
                    cx.missing(&path);
                    return None;
                }
            }
        }
        "response_flag_filter" => {
            let mut f = o.obj(cx, which)?;
            let mut flags = Vec::new();
            for (p, flag) in f.strings(cx, "flags") {
                if RESPONSE_FLAG_NAMES.contains(&flag.as_str()) {
                    flags.push(flag);
                } else {
                    cx.error(
                        &p,
                        format!(
                            "unknown response flag {flag:?} (one of {})",
                            RESPONSE_FLAG_NAMES.join(", ")
                        ),
                    );
                }
            }
            f.finish(cx);
            AccessLogFilter::ResponseFlag(flags)
        }
        "grpc_status_filter" => {
            let mut f = o.obj(cx, which)?;
            let known: Vec<(&str, u32)> = GRPC_STATUS_NAMES
                .iter()
                .enumerate()
                .map(|(i, n)| (*n, i as u32))
                .collect();
            let mut statuses = Vec::new();
            for (p, v) in f.list(cx, "statuses") {
                if let Some(s) = as_enum(cx, &p, v, &known, &[]) {
                    statuses.push(s);
                }
            }
            let exclude = f.bool(cx, "exclude").unwrap_or(false);
            f.finish(cx);
            AccessLogFilter::GrpcStatus(statuses, exclude)
        }
        other => {
            let p = o.at(other);
            o.take(other);
            cx.unsupported(&p, Some(&format!("access log filter {other}")));
            return None;
        }
    };
    o.finish(cx);
    Some(f)
}

/// `ComparisonFilter`: `op` and `value.default_value` (`runtime_key` is
/// read and has no effect: mesh has no runtime layer, so the default holds).
fn comparison(cx: &mut Ctx, mut o: Obj<'_>) -> Option<(Comparison, u64)> {
    let op = match o.take("op") {
        Some(v) => as_enum(
            cx,
            &o.at("op"),
            v,
            &[
                ("EQ", Comparison::Eq),
                ("GE", Comparison::Ge),
                ("LE", Comparison::Le),
            ],
            &[],
        )?,
        None => Comparison::Eq,
    };
    let value = match o.obj(cx, "value") {
        Some(mut v) => {
            let d = v.u32(cx, "default_value").unwrap_or(0);
            let key_path = v.at("runtime_key");
            match v.take("runtime_key") {
                Some(k) => {
                    as_str(cx, &key_path, k);
                }
                None => cx.missing(&key_path),
            }
            v.finish(cx);
            u64::from(d)
        }
        None => {
            cx.missing(&o.at("value"));
            return None;
        }
    };
    o.finish(cx);
    Some((op, value))
}
