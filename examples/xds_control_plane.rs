//! A small xDS control plane on `mesh_xds::server`: serves the resources
//! found in a directory of YAML (or JSON) files over ADS, state-of-the-world
//! and delta, and pushes a new snapshot whenever the files change.
//!
//! ```text
//! cargo run -p mesh-examples --example xds_control_plane -- \
//!     --dir resources/ --listen 127.0.0.1:18000 --node mesh-1
//! ```
//!
//! Each file holds one resource or a list of them; every resource names its
//! type with `@type` (`type.googleapis.com/envoy.config.cluster.v3.Cluster`,
//! `...listener.v3.Listener`, `...route.v3.RouteConfiguration`,
//! `...endpoint.v3.ClusterLoadAssignment`,
//! `...extensions.transport_sockets.tls.v3.Secret` for SDS), the rest is the
//! resource in the same form as in an Envoy bootstrap. Rewriting the file of
//! a secret rotates the certificate of every proxy that uses it. The snapshot's version is a hash of
//! the resources, so a restarted control plane serving the same files sends
//! nothing new to clients that already have them. Files that do not parse
//! are reported and the previous snapshot stays.
//!
//! Options: `--dir DIR` (required), `--listen ADDR` (default
//! `127.0.0.1:18000`; port 0 picks one; `unix:PATH` serves on a Unix
//! socket, as Istio's agent does), `--node ID` (repeatable; the node
//! ids served), `--address-file FILE` (write the bound address),
//! `--status-file FILE` (rewritten with every node's ACK/NACK state and
//! subscribed resource names as JSON), `--poll-ms N` (how often files are checked, default 200).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mesh_xds::convert::json_to_any;
use mesh_xds::server::{AdsServer, Snapshot, SnapshotCache};
use mesh_xds::types;
use serde_json::{json, Value};

struct Args {
    dir: PathBuf,
    listen: SocketAddr,
    listen_unix: Option<PathBuf>,
    nodes: Vec<String>,
    address_file: Option<PathBuf>,
    status_file: Option<PathBuf>,
    poll: Duration,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        dir: PathBuf::new(),
        listen: SocketAddr::from(([127, 0, 0, 1], 18000)),
        listen_unix: None,
        nodes: Vec::new(),
        address_file: None,
        status_file: None,
        poll: Duration::from_millis(200),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => a.dir = PathBuf::from(value()?),
            "--listen" => {
                let v = value()?;
                match v.strip_prefix("unix:") {
                    Some(path) => a.listen_unix = Some(PathBuf::from(path)),
                    None => a.listen = v.parse().map_err(|e| format!("--listen: {e}"))?,
                }
            }
            "--node" => a.nodes.push(value()?),
            "--address-file" => a.address_file = Some(PathBuf::from(value()?)),
            "--status-file" => a.status_file = Some(PathBuf::from(value()?)),
            "--poll-ms" => {
                a.poll =
                    Duration::from_millis(value()?.parse().map_err(|e| format!("--poll-ms: {e}"))?)
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.dir.as_os_str().is_empty() {
        return Err("--dir is required".into());
    }
    if a.nodes.is_empty() {
        return Err("at least one --node is required".into());
    }
    Ok(a)
}

/// Every file's modification time and length: a change in any reloads.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
            if !matches!(ext, "yaml" | "yml" | "json") {
                continue;
            }
            if let Ok(m) = e.metadata() {
                out.push((p, m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            }
        }
    }
    out.sort();
    out
}

fn load(dir: &Path) -> Result<Snapshot, String> {
    let mut by_type: BTreeMap<String, Vec<mesh_xds::pb::google::protobuf::Any>> = BTreeMap::new();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (path, _, _) in fingerprint(dir) {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: Value =
            yaml_serde::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let items = match v {
            Value::Array(a) => a,
            Value::Null => Vec::new(),
            other => vec![other],
        };
        for (i, mut item) in items.into_iter().enumerate() {
            let ty = item
                .as_object_mut()
                .and_then(|o| o.remove("@type"))
                .and_then(|t| t.as_str().map(str::to_string))
                .ok_or_else(|| format!("{}[{i}]: missing @type", path.display()))?;
            let any =
                json_to_any(&ty, &item).map_err(|e| format!("{}[{i}]: {e}", path.display()))?;
            for b in any.value.iter().chain(ty.as_bytes()) {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
            by_type.entry(ty).or_default().push(any);
        }
    }
    let mut snap = Snapshot::new(format!("{hash:016x}"));
    for t in [
        types::CLUSTER,
        types::ENDPOINT,
        types::LISTENER,
        types::ROUTE,
        types::SECRET,
    ] {
        let items = by_type.remove(t).unwrap_or_default();
        snap = snap.with_resources(t, items)?;
    }
    if let Some(t) = by_type.keys().next() {
        return Err(format!("unknown resource type {t}"));
    }
    Ok(snap)
}

fn status_json(cache: &SnapshotCache, nodes: &[String]) -> Value {
    let mut out = serde_json::Map::new();
    for n in nodes {
        let Some(s) = cache.status(n) else { continue };
        let acked: serde_json::Map<String, Value> = s
            .acked
            .iter()
            .map(|(t, v)| (types::short(t).to_string(), json!(v)))
            .collect();
        let nacked: serde_json::Map<String, Value> = s
            .nacked
            .iter()
            .map(|(t, (v, e))| {
                (
                    types::short(t).to_string(),
                    json!({"version": v, "error": e}),
                )
            })
            .collect();
        // Names subscribed per type (the list only while it is short, so a
        // large mesh's status stays small).
        let subscribed: serde_json::Map<String, Value> = s
            .subscribed
            .iter()
            .map(|(t, names)| {
                let list = (names.len() <= 1000).then_some(names);
                (
                    types::short(t).to_string(),
                    json!({"count": names.len(), "names": list}),
                )
            })
            .collect();
        out.insert(
            n.clone(),
            json!({
                "version": cache.snapshot(n).map(|s| s.version().to_string()),
                "subscribed": subscribed,
                "acked": acked,
                "nacked": nacked,
                "streams": s.streams,
                "requests": s.requests,
                "user_agent_name": s.node.as_ref().map(|n| n.user_agent_name.clone()),
                "metadata_keys": s.node.as_ref().and_then(|n| n.metadata.as_ref()).map(|m| {
                    let mut keys: Vec<&String> = m.fields.keys().collect();
                    keys.sort();
                    keys
                }),
            }),
        );
    }
    Value::Object(out)
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
    let a = args()?;
    let cache = SnapshotCache::new();
    let mut seen = fingerprint(&a.dir);
    match load(&a.dir) {
        Ok(s) => {
            tracing::info!(version = s.version(), "snapshot loaded");
            for n in &a.nodes {
                cache.set_snapshot(n, s.clone());
            }
        }
        Err(e) => tracing::error!(error = %e, "resources refused; serving nothing until fixed"),
    }
    let (addr, _server) = match &a.listen_unix {
        Some(path) => {
            let server = AdsServer::new(cache.clone())
                .spawn_unix(path)
                .map_err(|e| format!("--listen unix:{}: {e}", path.display()))?;
            (format!("unix:{}", path.display()), server)
        }
        None => {
            let (addr, server) = AdsServer::new(cache.clone())
                .spawn(a.listen)
                .await
                .map_err(|e| format!("--listen {}: {e}", a.listen))?;
            (addr.to_string(), server)
        }
    };
    tracing::info!(%addr, "serving ADS");
    if let Some(f) = &a.address_file {
        write_atomic(f, &addr);
    }
    let mut last_status = String::new();
    loop {
        tokio::time::sleep(a.poll).await;
        let now = fingerprint(&a.dir);
        if now != seen {
            seen = now;
            match load(&a.dir) {
                Ok(s) => {
                    tracing::info!(
                        version = s.version(),
                        "files changed: pushing a new snapshot"
                    );
                    for n in &a.nodes {
                        cache.set_snapshot(n, s.clone());
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "resources refused; keeping the previous snapshot")
                }
            }
        }
        if let Some(f) = &a.status_file {
            let s = status_json(&cache, &a.nodes).to_string();
            if s != last_status {
                write_atomic(f, &s);
                last_status = s;
            }
        }
    }
}
