//! Transparent capture, as an Istio sidecar uses it: iptables `REDIRECT`s
//! a workload's connections to the proxy (15001 outbound, 15006 inbound),
//! and the proxy recovers where each connection was going.
//!
//! - **Listener filter** `envoy.filters.listener.original_dst`:
//!   [`original_destination`] asks the kernel (`SO_ORIGINAL_DST`, or
//!   `IP6T_SO_ORIGINAL_DST` for IPv6) for the destination before the
//!   redirect. That address becomes the connection's local address for
//!   filter chain matching (`destination_port`, `prefix_ranges`), logs and
//!   ORIGINAL_DST clusters. When the call fails (no conntrack entry), the
//!   local address stays, as in Envoy.
//! - **Hand-off** (`use_original_dst: true`): [`Handoff`] finds the
//!   listener whose address is the original destination exactly, else the
//!   wildcard listener `0.0.0.0:<port>` (`[::]:<port>` for IPv6), and the
//!   connection is served by that listener's chains on the same worker
//!   (its own listener filters run; it is not handed off again). No match:
//!   the accepting listener keeps it. Listeners with `bind_to_port: false`
//!   bind nothing and exist only to receive hand-offs.
//! - **ORIGINAL_DST clusters** ([`OriginalDstHosts`]): the upstream is the
//!   connection's restored destination (TCP proxy and HTTP), or for HTTP
//!   the `x-envoy-original-dst-host` header when
//!   `original_dst_lb_config.use_http_header` is set. Hosts are created on
//!   first use and removed after a `cleanup_interval` in which nothing used
//!   them. As in Envoy, a connection whose destination was not restored by
//!   the listener filter has no host (`no healthy upstream`).
//!
//! Loops: the proxy's own upstream connections must not be captured again.
//! Istio's iptables rules exempt the proxy's user id (`-m owner
//! --uid-owner 1337 -j RETURN`) and Envoy relies on that alone. mesh also
//! refuses an ORIGINAL_DST destination that is one of its own capture
//! listeners (a client connecting straight to 15001 would otherwise make
//! the passthrough connect back to 15001, over and over).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock, Weak};

use arc_swap::ArcSwap;
use mesh_core::config::OriginalDst;
use mesh_core::listener::Accepted;
use mesh_lb::{Balancer, Endpoint, EndpointSpec};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::downstream::WorkerChains;

/// The destination of `stream` before an iptables `REDIRECT`, if the
/// kernel knows one. For a connection that was not redirected this is the
/// local address itself.
pub(crate) fn original_destination(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    // An IPv4 connection on a dual-stack socket has a v4-mapped local
    // address; its original destination is an IPv4 one.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let addr = if v4 {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match addr {
        Ok(a) => a.as_socket().map(unmap),
        Err(e) => {
            tracing::trace!(%local, error = %e, "original_dst: no original destination; keeping the local address");
            None
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        a => a,
    }
}

/// What a listener does with an accepted connection before choosing its
/// filter chain.
#[derive(Debug, Default, Clone)]
pub(crate) struct Capture {
    /// `envoy.filters.listener.original_dst`.
    pub(crate) restore: bool,
    /// `use_original_dst`: the listeners to hand connections to.
    pub(crate) hand_off: Option<Arc<Handoff>>,
}

/// An accepted connection after the capture step.
pub(crate) struct Captured {
    /// The listener (this worker's view) that serves it.
    pub(crate) chains: Arc<WorkerChains>,
    /// The connection, its local address replaced by the original
    /// destination when that was restored.
    pub(crate) accepted: Accepted,
    /// Whether the original destination filter restored the local address
    /// (ORIGINAL_DST clusters use only a restored address).
    pub(crate) restored: bool,
}

impl Capture {
    /// Restores the original destination and picks the listener that
    /// serves the connection: `chains` itself, or the hand-off target.
    pub(crate) fn apply(&self, chains: Arc<WorkerChains>, mut a: Accepted) -> Captured {
        let mut restored = false;
        if self.restore {
            if let Some(dst) = original_destination(&a.stream, a.local) {
                if dst != a.local {
                    tracing::trace!(peer = %a.peer, local = %a.local, original = %dst, "original_dst: restored");
                } else {
                    // Not redirected: a client connected to this listener
                    // itself, so this address is the proxy's own.
                    own_addresses().learn(dst);
                }
                a.local = dst;
                restored = true;
            }
        }
        let target = match &self.hand_off {
            Some(h) if restored => h.find(a.local, chains.worker()),
            _ => None,
        };
        Captured {
            chains: target.unwrap_or(chains),
            accepted: a,
            restored,
        }
    }
}

/// One listener's per-worker chains, as a hand-off target.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    workers: Arc<Vec<Arc<WorkerChains>>>,
}

/// Every listener by address, for `use_original_dst` hand-offs. Shared by
/// the static listeners and those from LDS.
#[derive(Default)]
pub(crate) struct Handoff {
    by_name: Mutex<BTreeMap<String, Target>>,
    by_addr: ArcSwap<HashMap<SocketAddr, Arc<Vec<Arc<WorkerChains>>>>>,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("listeners", &self.by_addr.load().len())
            .finish()
    }
}

impl Handoff {
    /// Adds or replaces listener `name` at `addr`, with one view per
    /// worker (indexed by worker).
    pub(crate) fn publish(&self, name: &str, addr: SocketAddr, workers: Vec<Arc<WorkerChains>>) {
        let mut by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        by_name.insert(
            name.to_owned(),
            Target {
                addr,
                workers: Arc::new(workers),
            },
        );
        self.rebuild(&by_name);
    }

    /// Removes listener `name` (LDS removal).
    pub(crate) fn remove(&self, name: &str) {
        let mut by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        if by_name.remove(name).is_some() {
            self.rebuild(&by_name);
        }
    }

    fn rebuild(&self, by_name: &BTreeMap<String, Target>) {
        let map = by_name
            .values()
            .map(|t| (t.addr, t.workers.clone()))
            .collect();
        self.by_addr.store(Arc::new(map));
    }

    /// The listener for original destination `dst` on worker `worker`:
    /// the listener at `dst`, else the wildcard listener on its port.
    fn find(&self, dst: SocketAddr, worker: usize) -> Option<Arc<WorkerChains>> {
        let map = self.by_addr.load();
        let wildcard = match dst.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let workers = map
            .get(&dst)
            .or_else(|| map.get(&SocketAddr::new(wildcard, dst.port())))?;
        workers.get(worker % workers.len().max(1)).cloned()
    }
}

/// Addresses where the proxy's own capture listeners accept connections:
/// an ORIGINAL_DST cluster never connects there.
struct OwnAddresses {
    /// Bound capture listeners (a wildcard address stands for every local
    /// address on its port).
    listeners: RwLock<HashSet<SocketAddr>>,
    /// Local addresses seen on connections that were not redirected.
    seen: RwLock<HashSet<SocketAddr>>,
}

/// At most this many learned addresses are kept (a host has few).
const MAX_SEEN: usize = 256;

fn own_addresses() -> &'static OwnAddresses {
    static OWN: std::sync::OnceLock<OwnAddresses> = std::sync::OnceLock::new();
    OWN.get_or_init(|| OwnAddresses {
        listeners: RwLock::new(HashSet::new()),
        seen: RwLock::new(HashSet::new()),
    })
}

/// Records that a capture listener (one with the original destination
/// filter or `use_original_dst`) is bound at `addr`.
pub(crate) fn register_capture_listener(addr: SocketAddr) {
    own_addresses()
        .listeners
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(addr);
}

impl OwnAddresses {
    fn learn(&self, addr: SocketAddr) {
        if self
            .seen
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&addr)
        {
            return;
        }
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        if seen.len() < MAX_SEEN {
            seen.insert(addr);
        }
    }

    /// Whether connecting to `dst` would reach one of the proxy's own
    /// capture listeners.
    fn contains(&self, dst: SocketAddr) -> bool {
        if self
            .seen
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&dst)
        {
            return true;
        }
        let listeners = self.listeners.read().unwrap_or_else(|e| e.into_inner());
        listeners.iter().any(|l| {
            l.port() == dst.port()
                && (l.ip() == dst.ip()
                    || (l.ip().is_unspecified()
                        && (dst.ip().is_loopback() || dst.ip().is_unspecified())))
        })
    }
}

/// The hosts of one ORIGINAL_DST cluster, created on demand.
#[derive(Debug)]
pub struct OriginalDstHosts {
    config: OriginalDst,
    balancer: Arc<Balancer>,
    /// Each host, and whether it was used since the last cleanup.
    hosts: Mutex<HashMap<SocketAddr, (Arc<Endpoint>, bool)>>,
}

impl OriginalDstHosts {
    /// The hosts of a cluster with `config`, published in `balancer` (so
    /// that `/clusters` shows them and pools follow them). Removes unused
    /// hosts every `cleanup_interval` on the current runtime until `stop`
    /// fires or the cluster is dropped.
    pub fn start(
        config: OriginalDst,
        balancer: Arc<Balancer>,
        stop: &CancellationToken,
    ) -> Arc<Self> {
        let hosts = Arc::new(OriginalDstHosts {
            config,
            balancer,
            hosts: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&hosts);
        let interval = hosts.config.cleanup_interval;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(hosts) = Weak::upgrade(&weak) else {
                    return;
                };
                hosts.cleanup();
            }
        });
        hosts
    }

    /// The destination of an HTTP request: the configured header when
    /// `use_http_header` is set and the request has it (an invalid value
    /// gives none), else the restored original destination.
    pub fn http_destination(
        &self,
        headers: &http::HeaderMap,
        restored: Option<SocketAddr>,
    ) -> Option<SocketAddr> {
        if self.config.use_http_header {
            if let Some(v) = headers.get(self.config.header.as_str()) {
                let parsed = v.to_str().ok().and_then(|s| s.trim().parse().ok());
                if parsed.is_none() {
                    tracing::debug!(value = ?v, header = %self.config.header,
                        "original_dst: invalid destination header; no host");
                }
                return parsed;
            }
        }
        restored
    }

    /// The host for destination `dst` (after `upstream_port_override`),
    /// created on first use. None for a destination that is the proxy's
    /// own capture listener.
    pub fn host(&self, dst: SocketAddr) -> Option<Arc<Endpoint>> {
        let dst = match self.config.port_override {
            Some(p) => SocketAddr::new(dst.ip(), p),
            None => unmap(dst),
        };
        if own_addresses().contains(dst) {
            tracing::debug!(%dst, "original_dst: the destination is the proxy's own capture listener; refusing to loop");
            return None;
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((e, used)) = hosts.get_mut(&dst) {
            *used = true;
            return Some(e.clone());
        }
        let mut specs: Vec<EndpointSpec> = hosts.keys().map(|a| EndpointSpec::new(*a)).collect();
        specs.push(EndpointSpec::new(dst));
        self.balancer.update(specs);
        let endpoint = self
            .balancer
            .endpoints()
            .endpoints
            .iter()
            .find(|e| e.addr == dst)
            .cloned()?;
        hosts.insert(dst, (endpoint.clone(), true));
        tracing::debug!(%dst, hosts = hosts.len(), "original_dst: host added");
        Some(endpoint)
    }

    /// Removes the hosts nothing used since the last cleanup (a host with
    /// connections or requests in flight counts as used).
    fn cleanup(&self) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let before = hosts.len();
        hosts.retain(|_, (e, used)| {
            let keep = *used || e.stats.rq_active.get() > 0;
            *used = false;
            keep
        });
        if hosts.len() != before {
            tracing::debug!(
                removed = before - hosts.len(),
                left = hosts.len(),
                "original_dst: unused hosts removed"
            );
            let specs = hosts.keys().map(|a| EndpointSpec::new(*a)).collect();
            self.balancer.update(specs);
        }
    }

    /// How many hosts the cluster has now.
    pub fn len(&self) -> usize {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when the cluster has no host now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The host of an HTTP request to an ORIGINAL_DST cluster.
pub(crate) fn http_host<B>(
    hosts: &OriginalDstHosts,
    req: &http::Request<B>,
) -> Option<Arc<Endpoint>> {
    let restored = req.extensions().get::<RestoredDestination>().map(|d| d.0);
    hosts.host(hosts.http_destination(req.headers(), restored)?)
}

/// The original destination of a downstream connection, carried in each
/// HTTP request's extensions when the listener filter restored it.
#[derive(Debug, Clone, Copy)]
pub struct RestoredDestination(pub SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OriginalDst {
        OriginalDst {
            cleanup_interval: std::time::Duration::from_secs(5),
            use_http_header: true,
            header: "x-envoy-original-dst-host".into(),
            port_override: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hosts_are_created_on_demand_and_removed_when_unused() {
        let balancer = Arc::new(Balancer::new(mesh_core::config::LbPolicy::RoundRobin));
        let stop = CancellationToken::new();
        let hosts = OriginalDstHosts::start(config(), balancer.clone(), &stop);
        let a: SocketAddr = "10.1.2.3:80".parse().unwrap();
        let b: SocketAddr = "10.1.2.4:443".parse().unwrap();
        let ea = hosts.host(a).unwrap();
        assert_eq!(ea.addr, a);
        assert!(Arc::ptr_eq(&ea, &hosts.host(a).unwrap()));
        hosts.host(b).unwrap();
        assert_eq!(balancer.endpoints().endpoints.len(), 2);
        drop(ea);
        // Used during the first interval: kept by the first cleanup.
        tokio::time::sleep(std::time::Duration::from_millis(5100)).await;
        assert_eq!(hosts.len(), 2);
        // `b` is used again, `a` is not: only `a` goes.
        hosts.host(b).unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert_eq!(hosts.len(), 1);
        let left: Vec<SocketAddr> = balancer
            .endpoints()
            .endpoints
            .iter()
            .map(|e| e.addr)
            .collect();
        assert_eq!(left, vec![b]);
        stop.cancel();
    }

    #[test]
    fn the_header_wins_when_enabled_and_a_bad_value_gives_no_host() {
        let balancer = Arc::new(Balancer::new(mesh_core::config::LbPolicy::RoundRobin));
        let hosts = OriginalDstHosts {
            config: config(),
            balancer,
            hosts: Mutex::new(HashMap::new()),
        };
        let local: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let mut h = http::HeaderMap::new();
        assert_eq!(hosts.http_destination(&h, Some(local)), Some(local));
        assert_eq!(hosts.http_destination(&h, None), None);
        h.insert(
            "x-envoy-original-dst-host",
            "10.9.9.9:9000".parse().unwrap(),
        );
        assert_eq!(
            hosts.http_destination(&h, Some(local)),
            Some("10.9.9.9:9000".parse().unwrap())
        );
        h.insert(
            "x-envoy-original-dst-host",
            "not-an-address".parse().unwrap(),
        );
        assert_eq!(hosts.http_destination(&h, Some(local)), None);
    }

    #[test]
    fn own_capture_listeners_are_refused() {
        register_capture_listener("0.0.0.0:45001".parse().unwrap());
        let own = own_addresses();
        assert!(own.contains("127.0.0.1:45001".parse().unwrap()));
        assert!(!own.contains("10.1.1.1:45001".parse().unwrap()));
        own.learn("10.0.0.2:45001".parse().unwrap());
        assert!(own.contains("10.0.0.2:45001".parse().unwrap()));
    }
}
