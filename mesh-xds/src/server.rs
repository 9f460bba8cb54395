//! A snapshot-cache management server, like go-control-plane's
//! `cache.SnapshotCache`: the control plane sets a versioned [`Snapshot`]
//! of resources per node, and [`AdsServer`] serves it over ADS, both
//! state-of-the-world and delta, pushing each new snapshot to the streams of
//! that node and recording every ACK and NACK ([`NodeStatus`]).
//!
//! State-of-the-world: a type is answered when the snapshot's version differs
//! from the one last sent on the stream (or from the client's `version_info`
//! on a new stream), or when the requested names change. A NACK is recorded
//! and not answered: the same snapshot would be refused again, so the server
//! waits for a new one. Requests carrying a stale nonce are ignored, as the
//! protocol prescribes.
//!
//! Delta: the server keeps, per stream and type, the version of each
//! resource it believes the client has (seeded from
//! `initial_resource_versions`), and sends only resources whose version
//! differs, plus `removed_resources` for names that left the snapshot.
//! A resource's version is a hash of its encoded bytes, so an unchanged
//! resource is never resent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::types;

/// One resource in a snapshot.
#[derive(Debug, Clone)]
struct Entry {
    body: Any,
    version: String,
}

/// A consistent set of resources for one node, with one version.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    version: String,
    resources: BTreeMap<String, BTreeMap<String, Entry>>,
}

impl Snapshot {
    /// An empty snapshot with `version` (sent as `version_info` for every
    /// type).
    pub fn new(version: impl Into<String>) -> Self {
        Snapshot {
            version: version.into(),
            resources: BTreeMap::new(),
        }
    }

    /// Adds resources of `type_url` (their names are read from the encoded
    /// resources). Fails on a resource of another type, a malformed one, or
    /// a name given twice.
    pub fn with_resources(
        mut self,
        type_url: &str,
        resources: impl IntoIterator<Item = Any>,
    ) -> Result<Self, String> {
        let map = self.resources.entry(type_url.to_string()).or_default();
        for any in resources {
            if any.type_url != type_url {
                return Err(format!(
                    "a resource of type {} among {}",
                    any.type_url, type_url
                ));
            }
            let name = types::resource_name(&any.value)
                .map_err(|e| format!("malformed {type_url}: {e}"))?;
            let version = format!("{:016x}", fnv1a(&any.value));
            if map
                .insert(name.clone(), Entry { body: any, version })
                .is_some()
            {
                return Err(format!("{} {name:?} given twice", types::short(type_url)));
            }
        }
        Ok(self)
    }

    /// The snapshot's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The names of the resources of one type.
    pub fn names(&self, type_url: &str) -> Vec<String> {
        self.resources
            .get(type_url)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn of(&self, type_url: &str) -> Option<&BTreeMap<String, Entry>> {
        self.resources.get(type_url)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What the server knows of one node's clients.
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    /// The last version ACKed, by type URL.
    pub acked: BTreeMap<String, String>,
    /// The last NACK by type URL: the refused version and the client's
    /// `error_detail` message.
    pub nacked: BTreeMap<String, (String, String)>,
    /// Requests received.
    pub requests: u64,
    /// Streams open now.
    pub streams: usize,
    /// The node as the client last described it (`id`, `cluster`,
    /// `user_agent_name`, ...).
    pub node: Option<envoy_types::pb::envoy::config::core::v3::Node>,
    /// When the last request arrived.
    pub last_request: Option<SystemTime>,
    /// The resource names the node's last stream subscribes to, by type
    /// URL (empty for a wildcard subscription): what an on-demand client
    /// asked for so far.
    pub subscribed: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug)]
struct NodeEntry {
    snapshot: watch::Sender<Option<Arc<Snapshot>>>,
    status: NodeStatus,
}

impl NodeEntry {
    fn new() -> Self {
        NodeEntry {
            snapshot: watch::channel(None).0,
            status: NodeStatus::default(),
        }
    }
}

/// Snapshots and client status per node id.
#[derive(Debug, Default)]
pub struct SnapshotCache {
    nodes: Mutex<HashMap<String, NodeEntry>>,
    changed: Notify,
}

impl SnapshotCache {
    /// An empty cache.
    pub fn new() -> Arc<Self> {
        Arc::new(SnapshotCache::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeEntry>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the snapshot of `node` and pushes it to the node's open streams.
    pub fn set_snapshot(&self, node: &str, snapshot: Snapshot) {
        let mut nodes = self.lock();
        let e = nodes.entry(node.to_string()).or_insert_with(NodeEntry::new);
        e.snapshot.send_replace(Some(Arc::new(snapshot)));
    }

    /// The current snapshot of `node`.
    pub fn snapshot(&self, node: &str) -> Option<Arc<Snapshot>> {
        self.lock()
            .get(node)
            .and_then(|e| e.snapshot.borrow().clone())
    }

    /// What the server knows of `node`'s clients.
    pub fn status(&self, node: &str) -> Option<NodeStatus> {
        self.lock().get(node).map(|e| e.status.clone())
    }

    /// Waits until `pred` holds for `node`'s status, up to `timeout`.
    /// Returns whether it did.
    pub async fn wait_for(
        &self,
        node: &str,
        timeout: Duration,
        pred: impl Fn(&NodeStatus) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.status(node).is_some_and(|s| pred(&s)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.status(node).is_some_and(|s| pred(&s));
            }
        }
    }

    fn watch(&self, node: &str) -> watch::Receiver<Option<Arc<Snapshot>>> {
        let mut nodes = self.lock();
        let e = nodes.entry(node.to_string()).or_insert_with(NodeEntry::new);
        e.snapshot.subscribe()
    }

    fn update(&self, node: &str, f: impl FnOnce(&mut NodeStatus)) {
        {
            let mut nodes = self.lock();
            let e = nodes.entry(node.to_string()).or_insert_with(NodeEntry::new);
            f(&mut e.status);
        }
        self.changed.notify_waiters();
    }
}

/// The ADS service over a [`SnapshotCache`].
#[derive(Debug, Clone)]
pub struct AdsServer {
    cache: Arc<SnapshotCache>,
    max_message_size: usize,
    /// Ends every stream of this server when cancelled.
    stop: CancellationToken,
}

impl AdsServer {
    /// A server for `cache`.
    pub fn new(cache: Arc<SnapshotCache>) -> Self {
        AdsServer {
            cache,
            max_message_size: crate::client::DEFAULT_MAX_MESSAGE_SIZE,
            stop: CancellationToken::new(),
        }
    }

    /// The tonic service, accepting requests up to the client's default
    /// maximum message size and sending responses of any size.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        let max = self.max_message_size;
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX)
    }

    /// Serves ADS and the per-type discovery services (CDS, LDS, RDS, EDS,
    /// SDS)
    /// on `listener` until `shutdown` completes; open streams end then too.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        self.serve_incoming(incoming, shutdown).await
    }

    /// As [`AdsServer::serve`], on a Unix domain socket (as Istio's agent
    /// serves the proxy on `./etc/istio/proxy/XDS`).
    pub async fn serve_unix(
        self,
        listener: tokio::net::UnixListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        self.serve_incoming(incoming, shutdown).await
    }

    /// Binds a Unix socket at `path` and serves on a spawned task; the
    /// handle stops the server when dropped or aborted.
    pub fn spawn_unix(self, path: &std::path::Path) -> std::io::Result<ServerHandle> {
        let listener = tokio::net::UnixListener::bind(path)?;
        let stop = self.stop.clone();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = self.serve_unix(listener, s.cancelled_owned()).await {
                tracing::warn!(error = %e, "ADS server ended");
            }
        });
        Ok(ServerHandle { stop, task })
    }

    async fn serve_incoming<IO, E>(
        self,
        incoming: impl tokio_stream::Stream<Item = Result<IO, E>> + Send,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error>
    where
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stop = self.stop.clone();
        use envoy_types::pb::envoy::service as svc;
        let max = self.max_message_size;
        macro_rules! sized {
            ($s:expr) => {
                $s.max_decoding_message_size(max)
                    .max_encoding_message_size(usize::MAX)
            };
        }
        let cds = sized!(
            svc::cluster::v3::cluster_discovery_service_server::ClusterDiscoveryServiceServer::new(
                self.clone()
            )
        );
        let lds = sized!(svc::listener::v3::listener_discovery_service_server::ListenerDiscoveryServiceServer::new(self.clone()));
        let rds = sized!(
            svc::route::v3::route_discovery_service_server::RouteDiscoveryServiceServer::new(
                self.clone()
            )
        );
        let eds = sized!(svc::endpoint::v3::endpoint_discovery_service_server::EndpointDiscoveryServiceServer::new(self.clone()));
        let sds = sized!(
            svc::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer::new(
                self.clone()
            )
        );
        tonic::transport::Server::builder()
            .add_service(self.into_service())
            .add_service(cds)
            .add_service(lds)
            .add_service(rds)
            .add_service(eds)
            .add_service(sds)
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                stop.cancel();
            })
            .await
    }

    /// Binds `addr` and serves on a spawned task; returns the bound address
    /// and a handle that stops the server when dropped or aborted.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<(SocketAddr, ServerHandle)> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let stop = self.stop.clone();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = self.serve(listener, s.cancelled_owned()).await {
                tracing::warn!(error = %e, "ADS server ended");
            }
        });
        Ok((bound, ServerHandle { stop, task }))
    }
}

/// A running server from [`AdsServer::spawn`]. Dropping it stops the server
/// and closes its streams.
#[derive(Debug)]
pub struct ServerHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

impl AdsServer {
    fn open_sotw(&self, inbound: Streaming<DiscoveryRequest>) -> SotwStream {
        let (tx, rx) = mpsc::channel(16);
        let stop = self.stop.clone();
        let cache = self.cache.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = sotw_stream(cache, inbound, tx) => {}
                _ = stop.cancelled() => {}
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    fn open_delta(&self, inbound: Streaming<DeltaDiscoveryRequest>) -> DeltaStream {
        let (tx, rx) = mpsc::channel(16);
        let stop = self.stop.clone();
        let cache = self.cache.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = delta_stream(cache, inbound, tx) => {}
                _ = stop.cancelled() => {}
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Ok(Response::new(self.open_sotw(request.into_inner())))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Ok(Response::new(self.open_delta(request.into_inner())))
    }
}

/// The per-type discovery services (`ClusterDiscoveryService`, ...) over the
/// same cache: each stream carries one type, answered by the same rules as
/// ADS. The unary `Fetch*` methods (REST-style polling) are not served.
macro_rules! per_type_service {
    ($service:path, $stream_ty:ident, $delta_ty:ident, $stream:ident, $delta:ident, $fetch:ident) => {
        #[tonic::async_trait]
        impl $service for AdsServer {
            type $stream_ty = SotwStream;
            type $delta_ty = DeltaStream;

            async fn $stream(
                &self,
                request: Request<Streaming<DiscoveryRequest>>,
            ) -> Result<Response<SotwStream>, Status> {
                Ok(Response::new(self.open_sotw(request.into_inner())))
            }

            async fn $delta(
                &self,
                request: Request<Streaming<DeltaDiscoveryRequest>>,
            ) -> Result<Response<DeltaStream>, Status> {
                Ok(Response::new(self.open_delta(request.into_inner())))
            }

            async fn $fetch(
                &self,
                _request: Request<DiscoveryRequest>,
            ) -> Result<Response<DiscoveryResponse>, Status> {
                Err(Status::unimplemented("only streaming xDS is served"))
            }
        }
    };
}

per_type_service!(
    envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_server::ClusterDiscoveryService,
    StreamClustersStream,
    DeltaClustersStream,
    stream_clusters,
    delta_clusters,
    fetch_clusters
);
per_type_service!(
    envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_server::ListenerDiscoveryService,
    StreamListenersStream,
    DeltaListenersStream,
    stream_listeners,
    delta_listeners,
    fetch_listeners
);
per_type_service!(
    envoy_types::pb::envoy::service::route::v3::route_discovery_service_server::RouteDiscoveryService,
    StreamRoutesStream,
    DeltaRoutesStream,
    stream_routes,
    delta_routes,
    fetch_routes
);
per_type_service!(
    envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::EndpointDiscoveryService,
    StreamEndpointsStream,
    DeltaEndpointsStream,
    stream_endpoints,
    delta_endpoints,
    fetch_endpoints
);
per_type_service!(
    envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService,
    StreamSecretsStream,
    DeltaSecretsStream,
    stream_secrets,
    delta_secrets,
    fetch_secrets
);
/// Counts an open stream of a node for as long as it lives.
struct StreamGuard {
    cache: Arc<SnapshotCache>,
    node: String,
}

impl StreamGuard {
    fn new(cache: Arc<SnapshotCache>, node: String) -> Self {
        cache.update(&node, |s| s.streams += 1);
        StreamGuard { cache, node }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.cache
            .update(&self.node, |s| s.streams = s.streams.saturating_sub(1));
    }
}

#[derive(Debug, Default)]
struct SotwSub {
    names: BTreeSet<String>,
    /// The version last sent on this stream (or found up to date).
    sent: Option<String>,
    nonce: String,
}

async fn sotw_stream(
    cache: Arc<SnapshotCache>,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let first = match inbound.message().await {
        Ok(Some(r)) => r,
        _ => return,
    };
    let node = first
        .node
        .as_ref()
        .map(|n| n.id.clone())
        .unwrap_or_default();
    let _guard = StreamGuard::new(cache.clone(), node.clone());
    let mut snapshots = cache.watch(&node);
    let mut subs: HashMap<String, SotwSub> = HashMap::new();
    let mut nonce: u64 = 0;
    let mut next = Some(first);
    loop {
        if let Some(req) = next.take() {
            let t = req.type_url.clone();
            cache.update(&node, |s| {
                s.requests += 1;
                s.last_request = Some(SystemTime::now());
                if req.node.is_some() {
                    s.node = req.node.clone();
                }
            });
            let sub = subs.entry(t.clone()).or_default();
            if !req.response_nonce.is_empty() {
                if req.response_nonce != sub.nonce {
                    // A stale request: a newer response is on its way.
                    continue;
                }
                match &req.error_detail {
                    Some(e) => {
                        let v = sub.sent.clone().unwrap_or_default();
                        let detail = e.message.clone();
                        cache.update(&node, |s| {
                            s.nacked.insert(t.clone(), (v, detail));
                        });
                    }
                    None => cache.update(&node, |s| {
                        s.acked.insert(t.clone(), req.version_info.clone());
                    }),
                }
            }
            let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
            let names_changed = names != sub.names;
            if names_changed || sub.sent.is_none() {
                cache.update(&node, |s| {
                    s.subscribed.insert(t.clone(), names.clone());
                });
            }
            sub.names = names;
            if sub.sent.is_none() && !req.version_info.is_empty() {
                // A new stream from a client that already has a version: up
                // to date unless the snapshot moved on.
                if snapshots
                    .borrow()
                    .as_ref()
                    .is_some_and(|s| s.version == req.version_info)
                    && !names_changed
                {
                    sub.sent = Some(req.version_info.clone());
                }
            }
            let snap = snapshots.borrow().clone();
            if let Some(resp) = sotw_response(&snap, &t, sub, names_changed, &mut nonce) {
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(r)) => next = Some(r),
                _ => return,
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let snap = snapshots.borrow_and_update().clone();
                let mut order: Vec<String> = subs.keys().cloned().collect();
                order.sort_by_key(|t| types::ORDER.iter().position(|o| o == t).unwrap_or(usize::MAX));
                for t in order {
                    let Some(sub) = subs.get_mut(&t) else { continue };
                    if let Some(resp) = sotw_response(&snap, &t, sub, false, &mut nonce) {
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

fn sotw_response(
    snap: &Option<Arc<Snapshot>>,
    type_url: &str,
    sub: &mut SotwSub,
    names_changed: bool,
    nonce: &mut u64,
) -> Option<DiscoveryResponse> {
    let snap = snap.as_ref()?;
    if sub.sent.as_deref() == Some(snap.version.as_str()) && !names_changed {
        return None;
    }
    let resources = snap
        .of(type_url)
        .map(|m| {
            m.iter()
                .filter(|(n, _)| sub.names.is_empty() || sub.names.contains(*n))
                .map(|(_, e)| e.body.clone())
                .collect()
        })
        .unwrap_or_default();
    *nonce += 1;
    sub.nonce = nonce.to_string();
    sub.sent = Some(snap.version.clone());
    Some(DiscoveryResponse {
        version_info: snap.version.clone(),
        resources,
        type_url: type_url.to_string(),
        nonce: sub.nonce.clone(),
        ..Default::default()
    })
}

#[derive(Debug, Default)]
struct DeltaSub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client has, as far as this stream knows.
    known: HashMap<String, String>,
    nonce: String,
    sent_version: String,
}

async fn delta_stream(
    cache: Arc<SnapshotCache>,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    let first = match inbound.message().await {
        Ok(Some(r)) => r,
        _ => return,
    };
    let node = first
        .node
        .as_ref()
        .map(|n| n.id.clone())
        .unwrap_or_default();
    let _guard = StreamGuard::new(cache.clone(), node.clone());
    let mut snapshots = cache.watch(&node);
    let mut subs: HashMap<String, DeltaSub> = HashMap::new();
    let mut nonce: u64 = 0;
    let mut next = Some(first);
    loop {
        if let Some(req) = next.take() {
            let t = req.type_url.clone();
            cache.update(&node, |s| {
                s.requests += 1;
                s.last_request = Some(SystemTime::now());
                if req.node.is_some() {
                    s.node = req.node.clone();
                }
            });
            let is_new = !subs.contains_key(&t);
            let sub = subs.entry(t.clone()).or_default();
            if is_new {
                sub.wildcard = req.resource_names_subscribe.is_empty()
                    || req.resource_names_subscribe.iter().any(|n| n == "*");
                sub.known = req.initial_resource_versions.clone();
            }
            for n in &req.resource_names_subscribe {
                if n == "*" {
                    sub.wildcard = true;
                } else {
                    sub.names.insert(n.clone());
                }
            }
            for n in &req.resource_names_unsubscribe {
                if n == "*" {
                    sub.wildcard = false;
                } else {
                    sub.names.remove(n);
                    sub.known.remove(n);
                }
            }
            if is_new
                || !req.resource_names_subscribe.is_empty()
                || !req.resource_names_unsubscribe.is_empty()
            {
                let names = sub.names.clone();
                cache.update(&node, |s| {
                    s.subscribed.insert(t.clone(), names);
                });
            }
            if !req.response_nonce.is_empty() && req.response_nonce == sub.nonce {
                let v = sub.sent_version.clone();
                match &req.error_detail {
                    Some(e) => {
                        let detail = e.message.clone();
                        cache.update(&node, |s| {
                            s.nacked.insert(t.clone(), (v, detail));
                        });
                    }
                    None => cache.update(&node, |s| {
                        s.acked.insert(t.clone(), v);
                    }),
                }
            }
            let snap = snapshots.borrow().clone();
            if let Some(resp) = delta_response(&snap, &t, sub, &mut nonce) {
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(r)) => next = Some(r),
                _ => return,
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let snap = snapshots.borrow_and_update().clone();
                let mut order: Vec<String> = subs.keys().cloned().collect();
                order.sort_by_key(|t| types::ORDER.iter().position(|o| o == t).unwrap_or(usize::MAX));
                for t in order {
                    let Some(sub) = subs.get_mut(&t) else { continue };
                    if let Some(resp) = delta_response(&snap, &t, sub, &mut nonce) {
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

fn delta_response(
    snap: &Option<Arc<Snapshot>>,
    type_url: &str,
    sub: &mut DeltaSub,
    nonce: &mut u64,
) -> Option<DeltaDiscoveryResponse> {
    let snap = snap.as_ref()?;
    let empty = BTreeMap::new();
    let have = snap.of(type_url).unwrap_or(&empty);
    let wanted = |n: &str| sub.wildcard || sub.names.contains(n);
    let mut resources = Vec::new();
    for (name, e) in have {
        if wanted(name) && sub.known.get(name) != Some(&e.version) {
            resources.push(DeltaResource {
                name: name.clone(),
                version: e.version.clone(),
                resource: Some(e.body.clone()),
                ..Default::default()
            });
        }
    }
    let removed: Vec<String> = sub
        .known
        .keys()
        .filter(|n| !have.contains_key(*n))
        .cloned()
        .collect();
    // A wildcard subscription is answered even when it has nothing, so the
    // client knows the set is empty (its initial fetch is done) instead of
    // waiting for its `initial_fetch_timeout`.
    let first_wildcard = sub.wildcard && sub.nonce.is_empty();
    if resources.is_empty() && removed.is_empty() && !first_wildcard {
        return None;
    }
    for r in &resources {
        sub.known.insert(r.name.clone(), r.version.clone());
    }
    for n in &removed {
        sub.known.remove(n);
    }
    *nonce += 1;
    sub.nonce = nonce.to_string();
    sub.sent_version = snap.version.clone();
    Some(DeltaDiscoveryResponse {
        system_version_info: snap.version.clone(),
        resources,
        type_url: type_url.to_string(),
        removed_resources: removed,
        nonce: sub.nonce.clone(),
        ..Default::default()
    })
}
