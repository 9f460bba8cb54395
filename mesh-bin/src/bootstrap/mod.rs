//! The Envoy v3 bootstrap loader: YAML or JSON text into the typed
//! [`mesh_core::config::Bootstrap`] model.
//!
//! The text is parsed into a [`serde_json::Value`] tree and walked by hand
//! (see `reader.rs`), so that every field has a precise Envoy path
//! (`static_resources.clusters[0].connect_timeout`) and nothing is silently
//! ignored: a field mesh does not map is reported as
//! `unsupported: <path>`. All problems are collected, not just the first, so
//! `mesh validate` can print every one of them.
//!
//! Envoy's defaults are applied as documented on the model types, and the
//! cross-checks Envoy makes on a static configuration (unique listener and
//! cluster names, every referenced cluster exists, unique virtual-host
//! domains, ...) are made here too.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use mesh_core::config::{Admin, Bootstrap, Locality, Node};
use serde_json::Value;

mod access_log;
mod cluster;
mod decorator;
pub(crate) mod eds_proto;
mod grpc_stats;
mod hcm;
mod headers;
mod health;
#[cfg(test)]
mod health_tests;
mod istio;
mod lb;
mod listener;
mod original_dst;
mod policy;
mod rbac;
mod reader;
mod route;
mod rpc;
mod socket_match;
#[cfg(test)]
mod tests;
mod tls;
#[cfg(test)]
mod tls_tests;
mod xds;

pub use xds::{
    cluster_from_json, endpoints_from_json, listener_from_json, route_config_from_json,
    secret_from_json,
};

use reader::{Ctx, Obj};
pub use tls::parse_sds_file;

/// One problem found in a configuration.
///
/// `path` is the Envoy field path with list indices
/// (`static_resources.listeners[0].name`), the file name (or `""`) for a
/// file that cannot be read or parsed, or `""` for the document as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the problem is.
    pub path: String,
    /// What the problem is. For a field outside the supported subset this is
    /// `unsupported`, optionally followed by ` (reason)`.
    pub message: String,
}

const UNSUPPORTED: &str = "unsupported";

impl ConfigError {
    /// An error for a field at `path` that mesh does not support.
    pub fn unsupported(path: &str, reason: Option<&str>) -> Self {
        let message = match reason {
            Some(r) => format!("{UNSUPPORTED} ({r})"),
            None => UNSUPPORTED.to_string(),
        };
        ConfigError {
            path: path.to_string(),
            message,
        }
    }

    /// The reason part of an "unsupported" error (`Some("")` when none was
    /// given); `None` for other errors.
    pub fn unsupported_reason(&self) -> Option<&str> {
        let rest = self.message.strip_prefix(UNSUPPORTED)?;
        if rest.is_empty() {
            Some("")
        } else {
            rest.strip_prefix(" (")?.strip_suffix(')')
        }
    }

    /// Whether the field at `path` is outside the supported subset (as
    /// opposed to being wrong).
    pub fn is_unsupported(&self) -> bool {
        self.unsupported_reason().is_some()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.unsupported_reason() {
            Some("") => write!(f, "{UNSUPPORTED}: {}", self.path),
            Some(reason) => write!(f, "{UNSUPPORTED}: {} ({reason})", self.path),
            None if self.path.is_empty() => f.write_str(&self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration (never empty when returned by the
/// loader). Displays one error per line.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads a bootstrap file: JSON when the name ends in `.json`, YAML
/// otherwise. Read and parse errors carry the file name as their path.
pub fn load_file(path: &Path) -> Result<Bootstrap, ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| single(&origin, e.to_string()))?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let value = if is_json {
        let v = serde_json::from_str::<Value>(&text).map_err(|e| single(&origin, e.to_string()))?;
        check_duplicate_keys(&text, &origin)?;
        v
    } else {
        parse_yaml(&text, &origin)?
    };
    load_value(&value, &origin)
}

/// Loads a bootstrap from YAML (or JSON, which the YAML parser also reads)
/// text. Parse errors have the path `""`.
pub fn load_str(text: &str) -> Result<Bootstrap, ConfigErrors> {
    let value = parse_yaml(text, "")?;
    load_value(&value, "")
}

fn single(path: &str, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        path: path.to_string(),
        message,
    }])
}

fn parse_yaml(text: &str, origin: &str) -> Result<Value, ConfigErrors> {
    let value = yaml_serde::from_str::<Value>(text).map_err(|e| single(origin, e.to_string()))?;
    check_duplicate_keys(text, origin)?;
    Ok(value)
}

/// A JSON tree keeps the last of two equal keys; Envoy refuses them, and
/// mesh must not silently drop a value. `yaml_serde::Value` rejects
/// duplicates, so a second parse into it finds them (its other errors, if
/// any, are left to the main parse).
fn check_duplicate_keys(text: &str, origin: &str) -> Result<(), ConfigErrors> {
    match yaml_serde::from_str::<yaml_serde::Value>(text) {
        Err(e) if e.to_string().contains("duplicate entry") => Err(single(origin, e.to_string())),
        _ => Ok(()),
    }
}

fn load_value(value: &Value, origin: &str) -> Result<Bootstrap, ConfigErrors> {
    if value.is_null() {
        return Err(single(origin, "the configuration is empty".to_string()));
    }
    let mut cx = Ctx::default();
    let bootstrap = bootstrap(&mut cx, value);
    if cx.errors.is_empty() {
        Ok(bootstrap)
    } else {
        Err(ConfigErrors(cx.errors))
    }
}

fn bootstrap(cx: &mut Ctx, value: &Value) -> Bootstrap {
    let mut out = Bootstrap::default();
    let Some(mut top) = Obj::new(cx, String::new(), value) else {
        return out;
    };
    if let Some(o) = top.obj(cx, "node") {
        out.node = node(cx, o);
    }
    if let Some(mut sr) = top.obj(cx, "static_resources") {
        out.listeners = listener::listeners(cx, &mut sr);
        out.clusters = cluster::clusters(cx, &mut sr);
        out.secrets = tls::static_secrets(cx, &mut sr);
        sr.finish(cx);
    }
    if let Some(o) = top.obj(cx, "admin") {
        out.admin = admin(cx, o);
    }
    if let Some(o) = top.obj(cx, "dynamic_resources") {
        out.dynamic_resources = Some(xds::dynamic_resources(cx, o));
    }
    top.finish(cx);

    // Clusters from CDS are not known yet: only the clusters that reach the
    // management server (`envoy_grpc.cluster_name`) must be static then.
    let cds = out
        .dynamic_resources
        .as_ref()
        .is_some_and(|d| d.cds_config.is_some());
    let refs = std::mem::take(&mut cx.cluster_refs);
    for (path, name) in refs {
        let grpc = path.ends_with("envoy_grpc.cluster_name");
        match out.clusters.iter().find(|c| c.name == name) {
            None if cds && !grpc => {}
            None => cx.error(&path, format!("unknown cluster {name:?}")),
            Some(c) if c.pipe.is_some() && !grpc => cx.error(
                &path,
                format!("cluster {name:?} has a pipe (Unix socket) address: supported only as a gRPC config source (envoy_grpc.cluster_name)"),
            ),
            Some(_) => {}
        }
    }
    let refs = std::mem::take(&mut cx.secret_refs);
    for (path, name) in refs {
        if !out.secrets.iter().any(|s| s.name == name) {
            cx.error(
                &path,
                format!(
                    "unknown secret {name:?} (no sds_config, and not in static_resources.secrets)"
                ),
            );
        }
    }
    out
}

fn node(cx: &mut Ctx, mut o: Obj<'_>) -> Node {
    let id = o.string(cx, "id").unwrap_or_default();
    let cluster = o.string(cx, "cluster").unwrap_or_default();
    let locality = o
        .obj(cx, "locality")
        .map(|l| locality(cx, l))
        .unwrap_or_default();
    let metadata_path = o.at("metadata");
    let metadata_json = match o.take("metadata") {
        Some(v) if v.is_object() => v.to_string(),
        Some(_) => {
            cx.error(&metadata_path, "expected an object");
            String::new()
        }
        None => String::new(),
    };
    o.finish(cx);
    Node {
        id,
        cluster,
        locality,
        metadata_json,
    }
}

/// Envoy `config.core.v3.Locality`.
pub(crate) fn locality(cx: &mut Ctx, mut o: Obj<'_>) -> Locality {
    let region = o.string(cx, "region").unwrap_or_default();
    let zone = o.string(cx, "zone").unwrap_or_default();
    let sub_zone = o.string(cx, "sub_zone").unwrap_or_default();
    o.finish(cx);
    Locality {
        region,
        zone,
        sub_zone,
    }
}

fn admin(cx: &mut Ctx, mut o: Obj<'_>) -> Option<Admin> {
    if o.has("access_log_path") {
        let path = o.string(cx, "access_log_path");
        if path.as_deref().is_some_and(|p| p != "/dev/null") {
            cx.unsupported(
                &o.at("access_log_path"),
                Some("the admin access log is not written; only /dev/null is accepted"),
            );
        }
    }
    o.empty_list(cx, "access_log", "the admin access log is not written");
    let address = o.obj(cx, "address").and_then(|a| ip_address(cx, a));
    o.finish(cx);
    // Envoy runs no admin listener when the address is absent.
    address.map(|address| Admin { address })
}

/// An `address` (Envoy `config.core.v3.Address`) that must be
/// `socket_address` with an IP literal: listeners and admin.
pub(crate) fn ip_address(cx: &mut Ctx, o: Obj<'_>) -> Option<SocketAddr> {
    let (host, port, host_path) = endpoint_address(cx, o)?;
    match host.parse::<IpAddr>() {
        Ok(ip) => Some(SocketAddr::new(ip, port)),
        Err(_) => {
            cx.error(
                &host_path,
                format!("expected an IP address, found {host:?}"),
            );
            None
        }
    }
}

/// An `address` whose `socket_address.address` may be a host name: the
/// host, the port and the path of the host (for later checks).
pub(crate) fn endpoint_address(cx: &mut Ctx, mut o: Obj<'_>) -> Option<(String, u16, String)> {
    let sa = o.obj(cx, "socket_address");
    if sa.is_none() && !o.has("socket_address") {
        // A pipe or internal address is reported by `finish`.
        if o.is_empty() {
            cx.missing(&o.at("socket_address"));
        }
    }
    o.finish(cx);
    let mut sa = sa?;
    let host = sa.req_string(cx, "address");
    let port = match sa.take("port_value") {
        Some(v) => reader::as_int(cx, &sa.at("port_value"), v, 0, 65535)
            .and_then(|p| u16::try_from(p).ok()),
        None => Some(0),
    };
    sa.enumeration(
        cx,
        "protocol",
        &[("TCP", ())],
        &[("UDP", "UDP arrives later")],
    );
    let host_path = sa.at("address");
    sa.finish(cx);
    Some((host?, port?, host_path))
}

/// An extension mesh knows: its canonical name and its `@type`.
pub(crate) struct Known {
    /// The canonical extension name (`envoy.filters.http.router`).
    pub(crate) name: &'static str,
    /// `type.googleapis.com/<full proto name>`.
    pub(crate) type_url: &'static str,
}

/// Picks which of `known` the extension object `o` (`{name,
/// typed_config}`) is: by `typed_config["@type"]` when there is a typed
/// config (checking it agrees with a known `name`), by `name` otherwise.
/// Returns the index into `known` and the typed config (its `@type`
/// consumed). Reports unknown extensions as unsupported at `o`'s path;
/// `what` names the kind ("network filter").
pub(crate) fn select_extension<'a>(
    cx: &mut Ctx,
    o: &mut Obj<'a>,
    what: &str,
    known: &[Known],
) -> Option<(usize, Option<Obj<'a>>)> {
    let name = o.string(cx, "name");
    let by_name = name
        .as_deref()
        .and_then(|n| known.iter().position(|k| k.name == n));
    if o.has("typed_config") {
        let mut tc = o.obj(cx, "typed_config")?;
        let ty_path = tc.at("@type");
        let Some(ty) = tc.string(cx, "@type") else {
            if !tc.has("@type") {
                cx.missing(&ty_path);
            }
            return None;
        };
        let (tc, ty, ty_path) = istio::typed_struct(cx, tc, ty, ty_path)?;
        match (by_name, known.iter().position(|k| k.type_url == ty)) {
            (_, None) => {
                let short = ty.strip_prefix("type.googleapis.com/").unwrap_or(&ty);
                cx.unsupported(o.path(), Some(&format!("{what} {short}")));
                None
            }
            (Some(n), Some(t)) if n != t => {
                cx.error(
                    &ty_path,
                    format!(
                        "expected @type {} for {}, found {ty:?}",
                        known[n].type_url, known[n].name
                    ),
                );
                None
            }
            (_, Some(t)) => Some((t, Some(tc))),
        }
    } else {
        match (name, by_name) {
            (_, Some(n)) => Some((n, None)),
            (Some(name), None) => {
                cx.unsupported(o.path(), Some(&format!("{what} {name}")));
                None
            }
            (None, None) => {
                if !o.has("name") {
                    cx.missing(&o.at("name"));
                }
                None
            }
        }
    }
}
