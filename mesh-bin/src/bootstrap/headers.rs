//! Header mutations (`request_headers_to_add`, `request_headers_to_remove`,
//! `response_headers_to_add`, `response_headers_to_remove`) of route
//! configurations, virtual hosts, routes and weighted clusters.

use mesh_core::config::{AppendAction, HeaderMutations, HeaderValueOption};

use super::reader::{Ctx, Obj};

/// The four header-mutation lists of a route configuration, virtual host,
/// route or weighted cluster.
pub(crate) fn header_mutations(cx: &mut Ctx, o: &mut Obj<'_>) -> HeaderMutations {
    HeaderMutations {
        request_add: header_options(cx, o, "request_headers_to_add"),
        request_remove: header_removals(cx, o, "request_headers_to_remove"),
        response_add: header_options(cx, o, "response_headers_to_add"),
        response_remove: header_removals(cx, o, "response_headers_to_remove"),
    }
}

/// Checks a header name for adding or removing; returns it lower-cased.
fn header_name(cx: &mut Ctx, path: &str, name: &str, verb: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if lower.is_empty() {
        cx.error(path, "must not be empty");
        None
    } else if lower.starts_with(':') || lower == "host" {
        cx.error(
            path,
            format!(":-prefixed or host headers may not be {verb} ({name:?})"),
        );
        None
    } else if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
        cx.error(path, format!("invalid header name {name:?}"));
        None
    } else {
        Some(lower)
    }
}

fn header_removals(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Vec<String> {
    o.strings(cx, key)
        .into_iter()
        .filter_map(|(p, n)| header_name(cx, &p, &n, "removed"))
        .collect()
}

pub(crate) fn header_options(cx: &mut Ctx, o: &mut Obj<'_>, key: &str) -> Vec<HeaderValueOption> {
    let mut out = Vec::new();
    for (path, v) in o.list(cx, key) {
        let Some(mut h) = Obj::new(cx, path, v) else {
            continue;
        };
        let header = match h.obj(cx, "header") {
            Some(mut kv) => {
                let key_path = kv.at("key");
                let name = kv
                    .req_string(cx, "key")
                    .and_then(|k| header_name(cx, &key_path, &k, "modified"));
                let value_path = kv.at("value");
                let value = kv.string(cx, "value").unwrap_or_default();
                let value_ok = http::HeaderValue::from_str(&value).is_ok();
                if !value_ok {
                    cx.error(&value_path, format!("invalid header value {value:?}"));
                }
                kv.finish(cx);
                name.filter(|_| value_ok).map(|n| (n, value))
            }
            None => {
                if !h.has("header") {
                    cx.missing(&h.at("header"));
                }
                None
            }
        };
        if h.has("append") && h.has("append_action") {
            cx.error(h.path(), "only one of append and append_action may be set");
        }
        let append = h.bool(cx, "append").map(|a| {
            if a {
                AppendAction::AppendIfExistsOrAdd
            } else {
                AppendAction::OverwriteIfExistsOrAdd
            }
        });
        let action = h.enumeration(
            cx,
            "append_action",
            &[
                ("APPEND_IF_EXISTS_OR_ADD", AppendAction::AppendIfExistsOrAdd),
                ("ADD_IF_ABSENT", AppendAction::AddIfAbsent),
                (
                    "OVERWRITE_IF_EXISTS_OR_ADD",
                    AppendAction::OverwriteIfExistsOrAdd,
                ),
                ("OVERWRITE_IF_EXISTS", AppendAction::OverwriteIfExists),
            ],
            &[],
        );
        let keep_empty_value = h.bool(cx, "keep_empty_value").unwrap_or(false);
        h.finish(cx);
        if let Some((key, value)) = header {
            out.push(HeaderValueOption {
                key,
                value,
                append_action: action.or(append).unwrap_or_default(),
                keep_empty_value,
            });
        }
    }
    out
}
