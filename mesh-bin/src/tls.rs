//! TLS in the proxy: the secret store fed by `static_resources.secrets` and
//! watched SDS files, the upstream connector used by the endpoint pools and
//! the TCP proxy, and the registry behind the admin `/certs` page.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use mesh_codec::transport::{BoxIo, Carried, ConnectFuture, Connector};
use mesh_core::config::tls::{CommonTlsContext, SdsSecretConfig, SdsSource, ValidationSource};
use mesh_core::config::{Bootstrap, ConfigSource};
use mesh_core::stats::Store;
use mesh_tls::watch::{SecretFile, DEFAULT_INTERVAL};
use mesh_tls::{CertInfo, ClientTls, SecretStore, ServerTls, SubjectAltName, UpstreamAlpn};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Upstream TLS for an endpoint pool or the TCP proxy.
#[derive(Debug, Clone)]
pub struct TlsConnector(pub Arc<ClientTls>);

impl Connector for TlsConnector {
    fn connect(&self, tcp: TcpStream, peer: SocketAddr, carried: Carried) -> ConnectFuture {
        let tls = self.0.clone();
        Box::pin(async move {
            let alpn = match carried {
                Carried::Raw => UpstreamAlpn::Raw,
                Carried::Http1 => UpstreamAlpn::Http1,
                Carried::Http2 => UpstreamAlpn::Http2,
            };
            match tls.connect(tcp, alpn, peer.ip(), None).await {
                Ok((stream, _)) => Ok(Box::new(stream) as BoxIo),
                Err(e) => Err(handshake_failed(peer, &e)),
            }
        })
    }
}

/// The `io::Error` a failed upstream TLS handshake with `peer` becomes:
/// logged at debug, and carrying the reason the access log prints as
/// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
pub(crate) fn handshake_failed(peer: SocketAddr, e: &mesh_tls::HandshakeError) -> io::Error {
    tracing::debug!(endpoint = %peer, reason = e.reason.as_str(), error = %e.message,
        "upstream TLS handshake failed");
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        crate::access_log::listener::TransportFailure {
            message: e.to_string(),
            reason: crate::access_log::listener::tls_failure_reason(e.reason.as_str(), &e.message),
        },
    )
}

/// The SDS secrets a TLS context names that arrive over xDS, with their
/// config source.
pub(crate) fn xds_secrets(common: &CommonTlsContext) -> Vec<(String, ConfigSource)> {
    let mut out = Vec::new();
    let mut add = |s: &SdsSecretConfig| {
        if let SdsSource::Xds(c) = &s.source {
            out.push((s.name.clone(), c.clone()));
        }
    };
    common.tls_certificate_sds.iter().for_each(&mut add);
    match &common.validation {
        Some(ValidationSource::Sds(s)) | Some(ValidationSource::Combined { sds: s, .. }) => add(s),
        _ => {}
    }
    out
}

/// Every xDS secret the static listeners and clusters of `bootstrap` name.
pub(crate) fn static_xds_secrets(bootstrap: &Bootstrap) -> Vec<(String, ConfigSource)> {
    let listeners = bootstrap
        .listeners
        .iter()
        .flat_map(|l| &l.filter_chains)
        .filter_map(|c| c.tls.as_ref().map(|t| &t.common));
    let clusters = bootstrap
        .clusters
        .iter()
        .flat_map(|c| c.tls_contexts().map(|t| &t.common));
    listeners.chain(clusters).flat_map(xds_secrets).collect()
}

fn sds_paths(common: &CommonTlsContext, out: &mut BTreeSet<String>) {
    let mut add = |s: &SdsSource| {
        if let SdsSource::Path(p) = s {
            out.insert(p.clone());
        }
    };
    for c in &common.tls_certificate_sds {
        add(&c.source);
    }
    match &common.validation {
        Some(ValidationSource::Sds(s)) | Some(ValidationSource::Combined { sds: s, .. }) => {
            add(&s.source)
        }
        _ => {}
    }
}

/// Builds the proxy's secret store: publishes `static_resources.secrets`,
/// loads every SDS file the configuration names, and starts watching those
/// files on the current runtime until `stop`. Any secret that cannot be
/// loaded at start is an error (with its path), as Envoy refuses to warm a
/// listener without its secrets.
pub fn secret_store(
    bootstrap: &Bootstrap,
    stats: &Store,
    stop: &CancellationToken,
) -> Result<Arc<SecretStore>, String> {
    let store = SecretStore::new(Some(stats.clone()));
    for (i, s) in bootstrap.secrets.iter().enumerate() {
        store
            .update(s)
            .map_err(|e| format!("static_resources.secrets[{i}]: {e}"))?;
    }
    let mut paths = BTreeSet::new();
    for l in &bootstrap.listeners {
        for c in &l.filter_chains {
            if let Some(t) = &c.tls {
                sds_paths(&t.common, &mut paths);
            }
        }
    }
    for c in &bootstrap.clusters {
        for t in c.tls_contexts() {
            sds_paths(&t.common, &mut paths);
        }
    }
    for path in paths {
        let file = SecretFile::new(&path, Arc::new(crate::bootstrap::parse_sds_file));
        file.load(&store)
            .map_err(|e| format!("sds_config.path_config_source {path:?}: {e}"))?;
        tokio::spawn(file.watch(
            store.clone(),
            DEFAULT_INTERVAL,
            stop.clone().cancelled_owned(),
        ));
    }
    Ok(store)
}

/// Every TLS context of the proxy, for `/certs`. Contexts are held weakly:
/// one whose listener or cluster left (xDS) leaves the page.
#[derive(Debug, Default)]
pub struct TlsRegistry {
    servers: Mutex<Vec<Weak<ServerTls>>>,
    clients: Mutex<Vec<Weak<ClientTls>>>,
}

impl TlsRegistry {
    /// Adds a listener context.
    pub fn add_server(&self, t: Arc<ServerTls>) {
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&t));
    }

    /// Adds a cluster context.
    pub fn add_client(&self, t: Arc<ClientTls>) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&t));
    }

    /// Envoy's `/certs` JSON: one entry per TLS context with its CA
    /// certificates and its certificate chain.
    pub fn certs_json(&self) -> String {
        let mut entries = Vec::new();
        let servers = live(&self.servers, |s| s.loaded());
        let clients = live(&self.clients, |c| c.loaded());
        for (cert, validation) in servers.into_iter().chain(clients) {
            let ca: Vec<serde_json::Value> = validation
                .map(|v| v.ca_infos.iter().map(cert_json).collect())
                .unwrap_or_default();
            let chain: Vec<serde_json::Value> = cert
                .map(|c| {
                    std::iter::once(&c.info)
                        .chain(c.chain.iter())
                        .map(cert_json)
                        .collect()
                })
                .unwrap_or_default();
            entries.push(serde_json::json!({"ca_cert": ca, "cert_chain": chain}));
        }
        let mut out = serde_json::to_string_pretty(&serde_json::json!({ "certificates": entries }))
            .unwrap_or_default();
        let _ = writeln!(out);
        out
    }
}

/// What `f` says of every context still alive (dropping the others).
fn live<T, R>(list: &Mutex<Vec<Weak<T>>>, f: impl Fn(&T) -> R) -> Vec<R> {
    let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|w| w.strong_count() > 0);
    list.iter()
        .filter_map(|w| w.upgrade())
        .map(|t| f(&t))
        .collect()
}

fn cert_json(i: &CertInfo) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let sans: Vec<serde_json::Value> = i
        .sans
        .iter()
        .map(|s| match s {
            SubjectAltName::Dns(v) => serde_json::json!({ "dns": v }),
            SubjectAltName::Uri(v) => serde_json::json!({ "uri": v }),
            SubjectAltName::Email(v) => serde_json::json!({ "email": v }),
            SubjectAltName::Ip(v) => serde_json::json!({ "ip_address": v }),
        })
        .collect();
    serde_json::json!({
        "path": i.path.clone().unwrap_or_else(|| "<inline>".into()),
        "serial_number": i.serial,
        "subject_alt_names": sans,
        "days_until_expiration": ((i.not_after - now).max(0) / 86_400).to_string(),
        "seconds_until_expiration": ((i.not_after - now).max(0)).to_string(),
        "valid_from": mesh_tls::rfc3339(i.not_before),
        "expiration_time": mesh_tls::rfc3339(i.not_after),
    })
}
