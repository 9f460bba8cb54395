//! A route's `decorator` (Envoy `config.route.v3.Decorator`). It names the
//! route's tracing span and, with `propagate`, sends that name upstream in
//! `x-envoy-decorator-operation`; Envoy does both only for traced
//! requests. mesh has no tracing, so like Envoy without a tracing provider
//! it reads the fields and changes nothing on the wire.

use super::reader::{Ctx, Obj};

/// Reads `decorator` of the route `o`, if any.
pub(crate) fn read(cx: &mut Ctx, o: &mut Obj<'_>) {
    let Some(mut d) = o.obj(cx, "decorator") else {
        return;
    };
    let op_path = d.at("operation");
    if d.req_string(cx, "operation").is_some_and(|s| s.is_empty()) {
        cx.error(&op_path, "must not be empty");
    }
    d.bool(cx, "propagate");
    d.finish(cx);
}
