//! `envoy.filters.http.grpc_stats`'s typed config
//! (`extensions.filters.http.grpc_stats.v3.FilterConfig`), read field by
//! field; the model is `mesh_core::config::grpc_stats`.

use mesh_core::config::grpc_stats::{GrpcStats, MethodStats};

use super::reader::{one_of, Ctx, Obj};

/// The filter's name.
pub(crate) const NAME: &str = "envoy.filters.http.grpc_stats";
/// The filter's `@type`.
pub(crate) const TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";

/// A `FilterConfig`; the caller finishes `o`.
pub(crate) fn filter_config(cx: &mut Ctx, o: &mut Obj<'_>) -> GrpcStats {
    let mut c = GrpcStats {
        emit_filter_state: o.bool(cx, "emit_filter_state").unwrap_or(false),
        replace_dots_in_grpc_service_name: o
            .bool(cx, "replace_dots_in_grpc_service_name")
            .unwrap_or(false),
        ..GrpcStats::default()
    };
    let upstream = o.at("enable_upstream_stats");
    if o.bool(cx, "enable_upstream_stats") == Some(true) {
        // The `upstream_rq_time` histogram: not built yet.
        cx.unsupported(&upstream, Some("upstream gRPC request time histograms"));
    }
    let which = one_of(
        cx,
        o,
        &["stats_for_all_methods", "individual_method_stats_allowlist"],
        false,
    );
    match which {
        Some("stats_for_all_methods") => {
            if o.bool(cx, "stats_for_all_methods") == Some(true) {
                c.methods = MethodStats::All;
            }
        }
        Some(_) => {
            let mut list = Vec::new();
            if let Some(mut a) = o.obj(cx, "individual_method_stats_allowlist") {
                for (path, v) in a.list(cx, "services") {
                    let Some(mut s) = Obj::new(cx, path, v) else {
                        continue;
                    };
                    let name_path = s.at("name");
                    let name = s.req_string(cx, "name").unwrap_or_default();
                    if name.is_empty() && s.has("name") {
                        cx.error(&name_path, "must not be empty");
                    }
                    let methods_path = s.at("method_names");
                    let methods = s.strings(cx, "method_names");
                    if methods.is_empty() {
                        cx.error(&methods_path, "at least one method name is required");
                    }
                    s.finish(cx);
                    list.extend(methods.into_iter().map(|(_, m)| (name.clone(), m)));
                }
                a.finish(cx);
            }
            c.methods = MethodStats::Allowlist(list);
        }
        None => {
            // Both given: reported by `one_of`; consume them.
            o.take("stats_for_all_methods");
            o.take("individual_method_stats_allowlist");
        }
    }
    c
}
