//! The xDS client: one gRPC stream (ADS, or one type's own discovery
//! service), state-of-the-world or delta, that keeps subscriptions, ACKs
//! what the application applied and NACKs what it refused.
//!
//! The client does not interpret resources. Each response becomes an
//! [`Update`] handed to the application as a [`Delivery`] on a channel; the
//! application applies it (or refuses it) and answers through the delivery.
//! Only then does the client ACK (with the new `version_info`) or NACK
//! (with the previous version and an `error_detail`), so a refused update
//! leaves the last good configuration in place on both sides.
//!
//! State machine of one client:
//!
//! ```text
//!  Connecting --ok--> Streaming --stream error / server gone--> Backoff
//!      ^                  |                                       |
//!      +------------------+---------------- jittered delay -------+
//! ```
//!
//! - **Connecting**: opens the channel and the stream, then sends one request
//!   per subscribed type in Envoy's order (CDS, EDS, LDS, RDS, SDS) with the
//!   versions already applied: `version_info` for state-of-the-world,
//!   `initial_resource_versions` for delta. A server that still has those
//!   versions has nothing to send, and the configuration in use never
//!   changes because of a reconnection.
//! - **Streaming**: each response is delivered; deliveries of one type are
//!   applied in order, one at a time, while other types keep flowing (an
//!   application that waits for endpoints before applying listeners does not
//!   block the endpoints). Subscription changes
//!   ([`XdsHandle::subscribe`]) are sent as they come.
//! - **Backoff**: full-jitter exponential backoff between `backoff_base` and
//!   `backoff_max`, reset once a stream has delivered a response. The
//!   application keeps serving what it has meanwhile.
//!
//! A response larger than `max_message_size` fails the stream with a clear
//! error (logged, and kept in [`XdsHandle::last_stream_error`]) rather than
//! being buffered.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as WrappedResource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tonic::codegen::http::uri::PathAndQuery;

use crate::types::{self, Protocol, Service};

/// The default bound on one received message: 64 MiB. gRPC's own default
/// (4 MiB) is too small for the clusters of a large mesh in one
/// state-of-the-world response; Envoy sets no bound at all, which lets a
/// broken server exhaust memory.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// How to reach a management server and what to say to it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server, as an `http://host:port` URI (cleartext h2), or
    /// `unix:<path>` for a server on a Unix domain socket (Istio's
    /// `./etc/istio/proxy/XDS` and SDS sockets).
    pub server_uri: String,
    /// ADS or one type's own service.
    pub service: Service,
    /// State-of-the-world or delta.
    pub protocol: Protocol,
    /// Who we are: sent in every state-of-the-world request and in the first
    /// delta request of each type, as Envoy does.
    pub node: Node,
    /// The largest response accepted; larger ones fail the stream.
    pub max_message_size: usize,
    /// First reconnection delay (upper bound of the first jittered wait).
    pub backoff_base: Duration,
    /// Longest reconnection delay.
    pub backoff_max: Duration,
    /// Bound on connecting to the server.
    pub connect_timeout: Duration,
}

impl ClientConfig {
    /// An ADS state-of-the-world client for `server_uri` with Envoy's
    /// reconnection defaults (500 ms base) capped at 5 s, so a control plane
    /// that returns is found again quickly.
    pub fn new(server_uri: impl Into<String>, node: Node) -> Self {
        ClientConfig {
            server_uri: server_uri.into(),
            service: Service::Aggregated,
            protocol: Protocol::StateOfTheWorld,
            node,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A JSON object as a `google.protobuf.Struct` (for `node.metadata`);
/// `None` for anything but an object.
pub fn json_to_struct(v: &serde_json::Value) -> Option<envoy_types::pb::google::protobuf::Struct> {
    use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
    fn value(v: &serde_json::Value) -> Value {
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(a) => Kind::ListValue(ListValue {
                values: a.iter().map(value).collect(),
            }),
            serde_json::Value::Object(o) => Kind::StructValue(Struct {
                fields: o.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
            }),
        };
        Value { kind: Some(kind) }
    }
    match value(v).kind {
        Some(Kind::StructValue(s)) => Some(s),
        _ => None,
    }
}

/// A node identity as Envoy sends it: `user_agent_name` is `mesh` and
/// `user_agent_version` this crate's version.
pub fn node(id: &str, cluster: &str) -> Node {
    Node {
        id: id.to_string(),
        cluster: cluster.to_string(),
        user_agent_name: "mesh".to_string(),
        user_agent_version_type: Some(
            envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_string(),
            ),
        ),
        ..Default::default()
    }
}

/// One received resource.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Its name (`name`, or `cluster_name` for endpoints).
    pub name: String,
    /// Its own version (delta only; empty in state-of-the-world).
    pub version: String,
    /// The encoded resource.
    pub body: Any,
}

/// One response for one type, to apply.
#[derive(Debug, Clone)]
pub struct Update {
    /// The resource type.
    pub type_url: String,
    /// The response's `version_info` (`system_version_info` for delta).
    pub version: String,
    /// Added or updated resources.
    pub resources: Vec<Resource>,
    /// Names the server removed (delta only).
    pub removed: Vec<String>,
    /// State-of-the-world: `resources` is the whole set for the type, so
    /// listeners and clusters not in it are removed.
    pub state_of_the_world: bool,
}

/// An [`Update`] waiting for the application's answer. Dropping it without
/// an answer NACKs it.
#[derive(Debug)]
pub struct Delivery {
    /// What arrived.
    pub update: Update,
    reply: oneshot::Sender<Result<(), String>>,
}

impl Delivery {
    /// Answers: `Ok` ACKs, `Err(detail)` NACKs with `detail` as the
    /// `error_detail` message.
    pub fn reply(self, result: Result<(), String>) {
        let _ = self.reply.send(result);
    }
}

/// The last refusal of a type.
#[derive(Debug, Clone)]
pub struct Nack {
    /// The version that was refused.
    pub version: String,
    /// Why.
    pub detail: String,
    /// When.
    pub at: SystemTime,
}

/// Per-type state shown by admin (`/config_dump`).
#[derive(Debug, Clone, Default)]
pub struct TypeStatus {
    /// The last applied version.
    pub version: String,
    /// When it was applied.
    pub last_updated: Option<SystemTime>,
    /// The last NACK, if any (kept after later ACKs, as Envoy's
    /// `error_state` is for the resource it concerns).
    pub last_nack: Option<Nack>,
    /// ACKs sent.
    pub acks: u64,
    /// NACKs sent.
    pub nacks: u64,
}

enum Command {
    Subscribe(String, BTreeSet<String>),
    Add(String, BTreeSet<String>),
    Remove(String, BTreeSet<String>),
}

#[derive(Default)]
struct Shared {
    status: BTreeMap<String, TypeStatus>,
    /// The names subscribed per type, as last requested by the application.
    subscribed: BTreeMap<String, BTreeSet<String>>,
    connected: bool,
    last_error: Option<String>,
}

/// A handle on a running client: change subscriptions, read status. The
/// client stops when every handle and the delivery receiver are dropped.
#[derive(Clone)]
pub struct XdsHandle {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for XdsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsHandle").finish_non_exhaustive()
    }
}

impl XdsHandle {
    /// Subscribes to `names` of `type_url` (replacing the previous set for
    /// that type). For listeners and clusters an empty set is the wildcard
    /// subscription (everything the server has for this node); for the other
    /// types an empty set unsubscribes.
    pub fn subscribe(&self, type_url: &str, names: BTreeSet<String>) {
        self.record(type_url, |s| *s = names.clone());
        let _ = self
            .commands
            .send(Command::Subscribe(type_url.to_string(), names));
    }

    /// Adds `names` to the subscription of `type_url`, keeping the names
    /// already subscribed: on-demand (lazy) subscription, as a proxy that
    /// fetches a cluster's endpoints only once a request uses the cluster.
    /// State-of-the-world sends the grown name list, delta sends
    /// `resource_names_subscribe` with the new names only. Names already
    /// subscribed change nothing; an empty `names` is ignored (it never
    /// turns into a wildcard subscription).
    ///
    /// ```no_run
    /// # fn demo(handle: mesh_xds::client::XdsHandle) {
    /// use mesh_xds::types::ENDPOINT;
    /// // The first request to `reviews` needs its endpoints.
    /// handle.subscribe_more(ENDPOINT, ["reviews".to_string()].into());
    /// # }
    /// ```
    pub fn subscribe_more(&self, type_url: &str, names: BTreeSet<String>) {
        if names.is_empty() {
            return;
        }
        self.record(type_url, |s| s.extend(names.iter().cloned()));
        let _ = self
            .commands
            .send(Command::Add(type_url.to_string(), names));
    }

    /// Removes `names` from the subscription of `type_url` (delta sends
    /// `resource_names_unsubscribe`; state-of-the-world sends the shrunk
    /// list). Removing the last name of a named type (endpoints, routes,
    /// secrets) leaves the type unsubscribed, never a wildcard; for
    /// listeners and clusters an empty set is the wildcard subscription.
    pub fn unsubscribe(&self, type_url: &str, names: BTreeSet<String>) {
        if names.is_empty() {
            return;
        }
        self.record(type_url, |s| s.retain(|n| !names.contains(n)));
        let _ = self
            .commands
            .send(Command::Remove(type_url.to_string(), names));
    }

    /// The names subscribed for `type_url` as the application last asked
    /// (empty for a wildcard subscription or an unsubscribed type).
    pub fn subscribed(&self, type_url: &str) -> BTreeSet<String> {
        self.lock()
            .subscribed
            .get(type_url)
            .cloned()
            .unwrap_or_default()
    }

    fn record(&self, type_url: &str, f: impl FnOnce(&mut BTreeSet<String>)) {
        f(self
            .lock()
            .subscribed
            .entry(type_url.to_string())
            .or_default());
    }

    /// Per-type status, by type URL.
    pub fn status(&self) -> BTreeMap<String, TypeStatus> {
        self.lock().status.clone()
    }

    /// Whether a stream is open now.
    pub fn connected(&self) -> bool {
        self.lock().connected
    }

    /// Why the last stream ended or could not open.
    pub fn last_stream_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts a client on the current tokio runtime. Subscribe with the handle;
/// updates arrive on the receiver.
pub fn start(config: ClientConfig) -> (XdsHandle, mpsc::Receiver<Delivery>) {
    let (ctx, crx) = mpsc::unbounded_channel();
    let (dtx, drx) = mpsc::channel(16);
    let shared = Arc::new(Mutex::new(Shared::default()));
    let handle = XdsHandle {
        commands: ctx,
        shared: shared.clone(),
    };
    tokio::spawn(run(config, crx, dtx, shared));
    (handle, drx)
}

#[derive(Debug, Default)]
struct TypeState {
    names: BTreeSet<String>,
    /// State-of-the-world: the last applied `version_info`.
    version: String,
    /// The last nonce received on the current stream.
    nonce: String,
    /// Delta: applied resource versions.
    resource_versions: BTreeMap<String, String>,
    /// Delta: the names the server was told about on the current stream.
    sent_names: BTreeSet<String>,
    /// Delta: whether the first request of this stream went out.
    started: bool,
    /// A delivery of this type is waiting for the application.
    busy: bool,
    /// Responses waiting for the one in progress.
    queue: VecDeque<Incoming>,
}

/// A response reduced to what both protocols share.
#[derive(Debug)]
struct Incoming {
    type_url: String,
    version: String,
    nonce: String,
    resources: Vec<Resource>,
    removed: Vec<String>,
    /// Problems found before delivery (wrong type, malformed): NACKed
    /// without reaching the application.
    error: Option<String>,
}

enum End {
    /// Every handle and the receiver are gone.
    Shutdown,
    /// The stream failed; `progressed` when it delivered something.
    Failed { reason: String, progressed: bool },
}

type Pending = Pin<Box<dyn Future<Output = (Incoming, Result<(), String>)> + Send>>;

struct Client {
    config: ClientConfig,
    types: BTreeMap<String, TypeState>,
    commands: mpsc::UnboundedReceiver<Command>,
    deliveries: mpsc::Sender<Delivery>,
    shared: Arc<Mutex<Shared>>,
    handles_gone: bool,
}

async fn run(
    config: ClientConfig,
    commands: mpsc::UnboundedReceiver<Command>,
    deliveries: mpsc::Sender<Delivery>,
    shared: Arc<Mutex<Shared>>,
) {
    let mut client = Client {
        config,
        types: BTreeMap::new(),
        commands,
        deliveries,
        shared,
        handles_gone: false,
    };
    let mut attempt: u32 = 0;
    loop {
        let end = match client.config.protocol {
            Protocol::StateOfTheWorld => client.sotw_session().await,
            Protocol::Delta => client.delta_session().await,
        };
        client.set_connected(false);
        match end {
            End::Shutdown => return,
            End::Failed { reason, progressed } => {
                if progressed {
                    attempt = 0;
                }
                let delay = client.backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(server = %client.config.server_uri, error = %reason,
                    retry_in_ms = delay.as_millis() as u64, "xDS stream ended; serving the last good configuration");
                client.lock().last_error = Some(reason);
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        cmd = client.commands.recv(), if !client.handles_gone => match cmd {
                            Some(c) => { client.absorb(c); }
                            None => client.handles_gone = true,
                        },
                    }
                }
                if client.handles_gone && client.deliveries.is_closed() {
                    return;
                }
            }
        }
    }
}

impl Client {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_connected(&self, c: bool) {
        self.lock().connected = c;
    }

    /// Full jitter: a uniform wait in `[0, min(max, base * 2^attempt)]`,
    /// at least 10 ms.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.config.backoff_base.as_millis() as u64;
        let cap = self.config.backoff_max.as_millis() as u64;
        let ceiling = base
            .saturating_mul(1u64 << attempt.min(20))
            .min(cap)
            .max(10);
        Duration::from_millis(fastrand::u64(10..=ceiling))
    }

    /// Records a subscription change; returns the type and the previous
    /// names.
    fn absorb(&mut self, cmd: Command) -> (String, BTreeSet<String>) {
        let (t, names) = match cmd {
            Command::Subscribe(t, names) => (t, names),
            Command::Add(t, more) => {
                let mut names = self
                    .types
                    .get(&t)
                    .map(|s| s.names.clone())
                    .unwrap_or_default();
                names.extend(more);
                (t, names)
            }
            Command::Remove(t, less) => {
                let mut names = self
                    .types
                    .get(&t)
                    .map(|s| s.names.clone())
                    .unwrap_or_default();
                names.retain(|n| !less.contains(n));
                (t, names)
            }
        };
        let st = self.types.entry(t.clone()).or_default();
        let old = std::mem::replace(&mut st.names, names);
        // Delta: forget versions of resources no longer wanted.
        if !types::is_wildcard(&t) {
            let keep = st.names.clone();
            st.resource_versions.retain(|n, _| keep.contains(n));
        }
        (t, old)
    }

    /// Takes in the subscription changes already waiting.
    fn drain_commands(&mut self) {
        while let Ok(c) = self.commands.try_recv() {
            self.absorb(c);
        }
    }

    /// The types this client has subscriptions for, in Envoy's order.
    fn ordered_types(&self) -> Vec<String> {
        let mut out: Vec<String> = types::ORDER
            .iter()
            .filter(|t| self.types.contains_key(**t))
            .map(|t| t.to_string())
            .collect();
        for t in self.types.keys() {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
        // An empty name list would mean "everything" to the server: a
        // named type with no names is simply not requested.
        out.retain(|t| {
            types::is_wildcard(t) || self.types.get(t).is_some_and(|s| !s.names.is_empty())
        });
        out
    }

    async fn grpc(&self) -> Result<tonic::client::Grpc<tonic::transport::Channel>, String> {
        let unix = self.config.server_uri.strip_prefix("unix:");
        // A Unix socket server still needs an http URI for the `:authority`.
        let uri = match unix {
            Some(_) => "http://localhost".to_string(),
            None => self.config.server_uri.clone(),
        };
        let endpoint = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| format!("server URI {:?}: {e}", self.config.server_uri))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        let failed = |e: tonic::transport::Error| {
            format!(
                "connecting to {}: {}",
                self.config.server_uri,
                source_chain(&e)
            )
        };
        let channel = match unix {
            Some(path) => {
                let path = std::path::PathBuf::from(path);
                let connect = tower::service_fn(move |_: tonic::codegen::http::Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                });
                tokio::time::timeout(
                    self.config.connect_timeout,
                    endpoint.connect_with_connector(connect),
                )
                .await
                .map_err(|_| format!("connecting to {}: timed out", self.config.server_uri))?
                .map_err(failed)?
            }
            None => endpoint.connect().await.map_err(failed)?,
        };
        Ok(tonic::client::Grpc::new(channel)
            .max_decoding_message_size(self.config.max_message_size)
            .max_encoding_message_size(usize::MAX))
    }

    fn path(&self) -> PathAndQuery {
        PathAndQuery::from_static(types::method_path(
            self.config.service,
            self.config.protocol,
        ))
    }

    fn stream_error(&self, status: &tonic::Status) -> String {
        let msg = status.message();
        if status.code() == tonic::Code::OutOfRange || msg.contains("message length too large") {
            format!(
                "a response exceeded the maximum xDS message size of {} bytes ({msg})",
                self.config.max_message_size
            )
        } else {
            format!("{:?}: {msg}", status.code())
        }
    }

    /// Delivers `inc` to the application, or answers at once when it
    /// carries an error or nobody listens.
    fn deliver(&mut self, inc: Incoming, pending: &mut FuturesUnordered<Pending>) {
        if let Some(st) = self.types.get_mut(&inc.type_url) {
            if st.busy {
                st.queue.push_back(inc);
                return;
            }
            st.busy = true;
        }
        if let Some(e) = inc.error.clone() {
            pending.push(Box::pin(async move { (inc, Err(e)) }));
            return;
        }
        let (tx, rx) = oneshot::channel();
        let delivery = Delivery {
            update: Update {
                type_url: inc.type_url.clone(),
                version: inc.version.clone(),
                resources: inc.resources.clone(),
                removed: inc.removed.clone(),
                state_of_the_world: self.config.protocol == Protocol::StateOfTheWorld,
            },
            reply: tx,
        };
        let sender = self.deliveries.clone();
        pending.push(Box::pin(async move {
            if sender.send(delivery).await.is_err() {
                return (inc, Err("the configuration is not being applied".into()));
            }
            let r = rx
                .await
                .unwrap_or_else(|_| Err("the update was dropped without an answer".into()));
            (inc, r)
        }));
    }

    /// Records the application's answer; returns the next queued response
    /// of the same type, if any.
    fn answered(&mut self, inc: &Incoming, result: &Result<(), String>) -> Option<Incoming> {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let status = shared.status.entry(inc.type_url.clone()).or_default();
        match result {
            Ok(()) => {
                status.version = inc.version.clone();
                status.last_updated = Some(SystemTime::now());
                status.acks += 1;
                tracing::debug!(r#type = types::short(&inc.type_url), version = %inc.version, "xDS ACK");
            }
            Err(detail) => {
                status.nacks += 1;
                status.last_nack = Some(Nack {
                    version: inc.version.clone(),
                    detail: detail.clone(),
                    at: SystemTime::now(),
                });
                tracing::warn!(r#type = types::short(&inc.type_url), version = %inc.version,
                    error = %detail, "xDS update refused (NACK); keeping the last good configuration");
            }
        }
        drop(shared);
        let st = self.types.get_mut(&inc.type_url)?;
        st.busy = false;
        if result.is_ok() {
            if self.config.protocol == Protocol::StateOfTheWorld {
                st.version = inc.version.clone();
            } else {
                for r in &inc.resources {
                    st.resource_versions
                        .insert(r.name.clone(), r.version.clone());
                }
                for n in &inc.removed {
                    st.resource_versions.remove(n);
                }
            }
        }
        st.queue.pop_front()
    }

    // ---- state of the world ----

    fn sotw_request(&self, type_url: &str, error: Option<String>) -> DiscoveryRequest {
        let st = self.types.get(type_url);
        DiscoveryRequest {
            version_info: st.map(|s| s.version.clone()).unwrap_or_default(),
            node: Some(self.config.node.clone()),
            resource_names: st
                .map(|s| s.names.iter().cloned().collect())
                .unwrap_or_default(),
            type_url: type_url.to_string(),
            response_nonce: st.map(|s| s.nonce.clone()).unwrap_or_default(),
            error_detail: error.map(|message| RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }

    async fn sotw_session(&mut self) -> End {
        let mut grpc = match self.grpc().await {
            Ok(g) => g,
            Err(reason) => {
                return End::Failed {
                    reason,
                    progressed: false,
                }
            }
        };
        let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
        self.drain_commands();
        for st in self.types.values_mut() {
            st.nonce.clear();
        }
        for t in self.ordered_types() {
            let _ = tx.send(self.sotw_request(&t, None));
        }
        if let Err(e) = grpc.ready().await {
            return End::Failed {
                reason: format!("server not ready: {e}"),
                progressed: false,
            };
        }
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let path = self.path();
        let call = grpc.streaming(
            tonic::Request::new(stream),
            path,
            tonic_prost::ProstCodec::<DiscoveryRequest, DiscoveryResponse>::default(),
        );
        tokio::pin!(call);
        // Some servers answer with headers only once they have a request to
        // answer: keep sending subscriptions while the call opens.
        let response = loop {
            tokio::select! {
                r = &mut call => break r,
                cmd = self.commands.recv(), if !self.handles_gone => match cmd {
                    Some(c) => {
                        let (t, _) = self.absorb(c);
                        if types::is_wildcard(&t) || self.types.get(&t).is_some_and(|s| !s.names.is_empty()) {
                            let _ = tx.send(self.sotw_request(&t, None));
                        }
                    }
                    None => self.handles_gone = true,
                },
            }
        };
        let mut inbound = match response {
            Ok(r) => r.into_inner(),
            Err(s) => {
                return End::Failed {
                    reason: self.stream_error(&s),
                    progressed: false,
                }
            }
        };
        self.set_connected(true);
        let mut progressed = false;
        let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(resp)) => {
                        progressed = true;
                        let inc = self.sotw_incoming(resp);
                        if let Some(st) = self.types.get_mut(&inc.type_url) {
                            st.nonce = inc.nonce.clone();
                        }
                        if !self.types.contains_key(&inc.type_url) {
                            let mut req = self.sotw_request(&inc.type_url, Some(format!("unknown or unsubscribed type {:?}", inc.type_url)));
                            req.response_nonce = inc.nonce.clone();
                            req.resource_names.clear();
                            let _ = tx.send(req);
                            continue;
                        }
                        self.deliver(inc, &mut pending);
                    }
                    Ok(None) => return End::Failed { reason: "the server closed the stream".into(), progressed },
                    Err(s) => return End::Failed { reason: self.stream_error(&s), progressed },
                },
                Some((inc, result)) = pending.next(), if !pending.is_empty() => {
                    let next = self.answered(&inc, &result);
                    let mut req = self.sotw_request(&inc.type_url, result.err());
                    req.response_nonce = inc.nonce.clone();
                    let _ = tx.send(req);
                    if let Some(n) = next {
                        self.deliver(n, &mut pending);
                    }
                }
                cmd = self.commands.recv(), if !self.handles_gone => match cmd {
                    Some(c) => {
                        let (t, old) = self.absorb(c);
                        let names = self.types.get(&t).map(|s| s.names.clone()).unwrap_or_default();
                        let wanted = types::is_wildcard(&t) || !names.is_empty();
                        if wanted && (names != old || old.is_empty()) {
                            let _ = tx.send(self.sotw_request(&t, None));
                        }
                    }
                    None => {
                        self.handles_gone = true;
                        if self.deliveries.is_closed() {
                            return End::Shutdown;
                        }
                    }
                },
            }
        }
    }

    fn sotw_incoming(&self, resp: DiscoveryResponse) -> Incoming {
        let mut error = None;
        let mut resources = Vec::with_capacity(resp.resources.len());
        for (i, any) in resp.resources.into_iter().enumerate() {
            match unwrap_resource(any, &resp.type_url) {
                Ok(r) => resources.push(r),
                Err(e) => {
                    error.get_or_insert(format!("resources[{i}]: {e}"));
                }
            }
        }
        Incoming {
            type_url: resp.type_url,
            version: resp.version_info,
            nonce: resp.nonce,
            resources,
            removed: Vec::new(),
            error,
        }
    }

    // ---- delta ----

    fn delta_request(
        &mut self,
        type_url: &str,
        old: Option<&BTreeSet<String>>,
    ) -> DeltaDiscoveryRequest {
        let node = self.config.node.clone();
        let st = self.types.entry(type_url.to_string()).or_default();
        let mut req = DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            ..Default::default()
        };
        if !st.started {
            st.started = true;
            req.node = Some(node);
            req.resource_names_subscribe = st.names.iter().cloned().collect();
            req.initial_resource_versions = st
                .resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>();
        } else {
            let old = old.cloned().unwrap_or_else(|| st.sent_names.clone());
            req.resource_names_subscribe = st.names.difference(&old).cloned().collect();
            req.resource_names_unsubscribe = old.difference(&st.names).cloned().collect();
            if types::is_wildcard(type_url) && st.names.is_empty() && !old.is_empty() {
                // Back to the wildcard subscription.
                req.resource_names_subscribe.push("*".into());
            }
        }
        st.sent_names = st.names.clone();
        req
    }

    async fn delta_session(&mut self) -> End {
        let mut grpc = match self.grpc().await {
            Ok(g) => g,
            Err(reason) => {
                return End::Failed {
                    reason,
                    progressed: false,
                }
            }
        };
        let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
        self.drain_commands();
        for st in self.types.values_mut() {
            st.started = false;
            st.sent_names.clear();
        }
        for t in self.ordered_types() {
            let req = self.delta_request(&t, None);
            let _ = tx.send(req);
        }
        if let Err(e) = grpc.ready().await {
            return End::Failed {
                reason: format!("server not ready: {e}"),
                progressed: false,
            };
        }
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let path = self.path();
        let call = grpc.streaming(
            tonic::Request::new(stream),
            path,
            tonic_prost::ProstCodec::<DeltaDiscoveryRequest, DeltaDiscoveryResponse>::default(),
        );
        tokio::pin!(call);
        let response = loop {
            tokio::select! {
                r = &mut call => break r,
                cmd = self.commands.recv(), if !self.handles_gone => match cmd {
                    Some(c) => {
                        let (t, old) = self.absorb(c);
                        let first = !self.types.get(&t).is_some_and(|s| s.started);
                        let req = self.delta_request(&t, if first { None } else { Some(&old) });
                        let _ = tx.send(req);
                    }
                    None => self.handles_gone = true,
                },
            }
        };
        let mut inbound = match response {
            Ok(r) => r.into_inner(),
            Err(s) => {
                return End::Failed {
                    reason: self.stream_error(&s),
                    progressed: false,
                }
            }
        };
        self.set_connected(true);
        let mut progressed = false;
        let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(resp)) => {
                        progressed = true;
                        let inc = delta_incoming(resp);
                        if !self.types.contains_key(&inc.type_url) {
                            let _ = tx.send(DeltaDiscoveryRequest {
                                type_url: inc.type_url.clone(),
                                response_nonce: inc.nonce.clone(),
                                error_detail: Some(RpcStatus {
                                    code: tonic::Code::InvalidArgument as i32,
                                    message: format!("unknown or unsubscribed type {:?}", inc.type_url),
                                    details: Vec::new(),
                                }),
                                ..Default::default()
                            });
                            continue;
                        }
                        self.deliver(inc, &mut pending);
                    }
                    Ok(None) => return End::Failed { reason: "the server closed the stream".into(), progressed },
                    Err(s) => return End::Failed { reason: self.stream_error(&s), progressed },
                },
                Some((inc, result)) = pending.next(), if !pending.is_empty() => {
                    let next = self.answered(&inc, &result);
                    let _ = tx.send(DeltaDiscoveryRequest {
                        type_url: inc.type_url.clone(),
                        response_nonce: inc.nonce.clone(),
                        error_detail: result.err().map(|message| RpcStatus {
                            code: tonic::Code::InvalidArgument as i32,
                            message,
                            details: Vec::new(),
                        }),
                        ..Default::default()
                    });
                    if let Some(n) = next {
                        self.deliver(n, &mut pending);
                    }
                }
                cmd = self.commands.recv(), if !self.handles_gone => match cmd {
                    Some(c) => {
                        let (t, old) = self.absorb(c);
                        let first = !self.types.get(&t).is_some_and(|s| s.started);
                        let req = self.delta_request(&t, if first { None } else { Some(&old) });
                        if first || !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
                            let _ = tx.send(req);
                        }
                    }
                    None => {
                        self.handles_gone = true;
                        if self.deliveries.is_closed() {
                            return End::Shutdown;
                        }
                    }
                },
            }
        }
    }
}

fn delta_incoming(resp: DeltaDiscoveryResponse) -> Incoming {
    let mut error = None;
    let mut resources = Vec::with_capacity(resp.resources.len());
    for (i, r) in resp.resources.into_iter().enumerate() {
        let Some(body) = r.resource else {
            error.get_or_insert(format!("resources[{i}] ({:?}): no resource", r.name));
            continue;
        };
        if body.type_url != resp.type_url {
            error.get_or_insert(format!(
                "resources[{i}]: type {:?} in a response of type {:?}",
                body.type_url, resp.type_url
            ));
            continue;
        }
        let name = if r.name.is_empty() {
            match types::resource_name(&body.value) {
                Ok(n) => n,
                Err(e) => {
                    error.get_or_insert(format!("resources[{i}]: malformed resource: {e}"));
                    continue;
                }
            }
        } else {
            r.name
        };
        resources.push(Resource {
            name,
            version: r.version,
            body,
        });
    }
    Incoming {
        type_url: resp.type_url,
        version: resp.system_version_info,
        nonce: resp.nonce,
        resources,
        removed: resp.removed_resources,
        error,
    }
}

/// A state-of-the-world resource: checks its type (unwrapping a
/// `discovery.v3.Resource`) and reads its name.
fn unwrap_resource(any: Any, type_url: &str) -> Result<Resource, String> {
    let (any, version) = if any.type_url == types::RESOURCE_WRAPPER {
        let w = WrappedResource::decode(any.value.as_slice())
            .map_err(|e| format!("malformed Resource wrapper: {e}"))?;
        match w.resource {
            Some(inner) => (inner, w.version),
            None => return Err(format!("Resource wrapper {:?} has no resource", w.name)),
        }
    } else {
        (any, String::new())
    };
    if any.type_url != type_url {
        return Err(format!(
            "type {:?} in a response of type {type_url:?}",
            any.type_url
        ));
    }
    let name = types::resource_name(&any.value).map_err(|e| format!("malformed resource: {e}"))?;
    Ok(Resource {
        name,
        version,
        body: any,
    })
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
