//! Listeners, their filter chain and network filters (connection limit, TCP
//! proxy) and access logs. The HTTP connection manager is in `hcm.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::config::{
    ClusterSpecifier, ConnectionLimit, FilterChain, Listener, NetworkFilter, TcpProxy,
    TrafficDirection, WeightedCluster,
};

pub(crate) use super::access_log::access_logs;
use super::istio::IstioNetwork;
use super::reader::{is_empty_list, Ctx, Obj};
use super::{hcm, ip_address, rpc, select_extension, Known};

/// Envoy's default `per_connection_buffer_limit_bytes` (1 MiB).
pub(crate) const DEFAULT_BUFFER_LIMIT: u32 = 1024 * 1024;

/// Envoy's default connection idle timeout (1 hour).
pub(crate) const ONE_HOUR: Duration = Duration::from_secs(3600);

/// Envoy's default `listener_filters_timeout` (15 s).
const LISTENER_FILTERS_TIMEOUT: Duration = Duration::from_secs(15);

const TLS_INSPECTOR: usize = 0;
const HTTP_INSPECTOR: usize = 1;
const PROTOCOL_INSPECTOR: usize = 2;
const ORIGINAL_DST: usize = 3;

const LISTENER_FILTERS: &[Known] = &[
    Known {
        name: "envoy.filters.listener.tls_inspector",
        type_url:
            "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
    },
    Known {
        name: "envoy.filters.listener.http_inspector",
        type_url:
            "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
    },
    Known {
        name: "mesh.filters.listener.protocol_inspector",
        type_url:
            "type.googleapis.com/mesh.filters.listener.protocol_inspector.v1.ProtocolInspector",
    },
    Known {
        name: "envoy.filters.listener.original_dst",
        type_url:
            "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    },
];

/// The inspectors `listener_filters` lists.
struct Inspectors {
    tls: bool,
    http: bool,
    protocol: bool,
    /// `envoy.filters.listener.original_dst`.
    original_dst: bool,
}

/// `listener_filters`: which inspectors (and whether the original
/// destination filter) are present (each at most once).
fn listener_filters(cx: &mut Ctx, o: &mut Obj<'_>) -> Inspectors {
    let mut seen = [false; LISTENER_FILTERS.len()];
    for (path, v) in o.list(cx, "listener_filters") {
        let Some(mut f) = Obj::new(cx, path, v) else {
            continue;
        };
        if let Some((which, tc)) = select_extension(cx, &mut f, "listener filter", LISTENER_FILTERS)
        {
            if let Some(mut tc) = tc {
                if which == ORIGINAL_DST {
                    // Windows-only settings; on Linux the address comes
                    // from SO_ORIGINAL_DST.
                    tc.refuse(cx, "traffic_direction", "a Windows-only setting");
                }
                tc.finish(cx);
            }
            if seen[which] {
                cx.error(
                    f.path(),
                    format!("{} is listed twice", LISTENER_FILTERS[which].name),
                );
            }
            seen[which] = true;
        }
        f.finish(cx);
    }
    Inspectors {
        tls: seen[TLS_INSPECTOR],
        http: seen[HTTP_INSPECTOR],
        protocol: seen[PROTOCOL_INSPECTOR],
        original_dst: seen[ORIGINAL_DST],
    }
}

const CONNECTION_LIMIT: usize = 0;
const HTTP_CONNECTION_MANAGER: usize = 1;
const TCP_PROXY: usize = 2;
const THRIFT_PROXY: usize = 3;
const DUBBO_PROXY: usize = 4;
const RPC_PROXY: usize = 5;
const META_PROTOCOL: usize = 6;
const NETWORK_RBAC: usize = 7;
const NETWORK_LOCAL_RATELIMIT: usize = 8;
const ISTIO_MX: usize = 9;
const ISTIO_STATS: usize = 10;

const NETWORK_FILTERS: &[Known] = &[
    Known {
        name: "envoy.filters.network.connection_limit",
        type_url:
            "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
    },
    Known {
        name: "envoy.filters.network.http_connection_manager",
        type_url: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    },
    Known {
        name: "envoy.filters.network.tcp_proxy",
        type_url: "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    },
    Known {
        name: "envoy.filters.network.thrift_proxy",
        type_url: "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy",
    },
    Known {
        name: "envoy.filters.network.dubbo_proxy",
        type_url: "type.googleapis.com/envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy",
    },
    Known {
        name: "mesh.filters.network.rpc_proxy",
        type_url: "type.googleapis.com/mesh.filters.network.rpc_proxy.v1.RpcProxy",
    },
    Known {
        name: "mesh.filters.network.meta_protocol",
        type_url: "type.googleapis.com/mesh.filters.network.meta_protocol.v1.MetaProtocol",
    },
    Known {
        name: "envoy.filters.network.rbac",
        type_url: "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
    },
    Known {
        name: "envoy.filters.network.local_ratelimit",
        type_url:
            "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
    },
    Known {
        name: "istio.metadata_exchange",
        type_url: super::istio::TCP_MX_TYPE,
    },
    Known {
        name: "istio.stats",
        type_url: super::istio::STATS_TYPE,
    },
];

const TERMINAL_NAMES: &str =
    "envoy.filters.network.http_connection_manager, envoy.filters.network.tcp_proxy, envoy.filters.network.thrift_proxy, envoy.filters.network.dubbo_proxy or mesh.filters.network.rpc_proxy";

/// `static_resources.listeners`.
pub(crate) fn listeners(cx: &mut Ctx, sr: &mut Obj<'_>) -> Vec<Listener> {
    let mut out = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut addresses: HashMap<SocketAddr, String> = HashMap::new();
    for (i, (path, v)) in sr.list(cx, "listeners").into_iter().enumerate() {
        let Some(mut o) = Obj::new(cx, path, v) else {
            continue;
        };
        let name = o.req_string(cx, "name");
        if let Some(name) = &name {
            if let Some(first) = names.get(name) {
                cx.error(
                    &o.at("name"),
                    format!("duplicate listener name {name:?} (also listeners[{first}])"),
                );
            } else {
                names.insert(name.clone(), i);
            }
        }
        let address_path = o.at("address");
        let address = match o.obj(cx, "address") {
            Some(a) => ip_address(cx, a),
            None => {
                if !o.has("address") {
                    cx.missing(&address_path);
                }
                None
            }
        };
        if let Some(addr) = address.filter(|a| a.port() != 0) {
            let label = name.clone().unwrap_or_else(|| format!("listeners[{i}]"));
            if let Some(other) = addresses.get(&addr) {
                cx.error(
                    &address_path,
                    format!("duplicate address {addr} (also listener {other:?})"),
                );
            } else {
                addresses.insert(addr, label);
            }
        }
        let limit = o
            .u32(cx, "per_connection_buffer_limit_bytes")
            .unwrap_or(DEFAULT_BUFFER_LIMIT);
        let inspectors = listener_filters(cx, &mut o);
        let use_original_dst = o.bool(cx, "use_original_dst").unwrap_or(false);
        let bind_to_port = o.bool(cx, "bind_to_port").unwrap_or(true);
        let listener_filters_timeout = o.timeout(
            cx,
            "listener_filters_timeout",
            Some(LISTENER_FILTERS_TIMEOUT),
        );
        let continue_on_listener_filters_timeout = o
            .bool(cx, "continue_on_listener_filters_timeout")
            .unwrap_or(false);
        let traffic_direction = o
            .enumeration(
                cx,
                "traffic_direction",
                &[
                    ("UNSPECIFIED", TrafficDirection::Unspecified),
                    ("INBOUND", TrafficDirection::Inbound),
                    ("OUTBOUND", TrafficDirection::Outbound),
                ],
                &[],
            )
            .unwrap_or_default();
        let access_log = access_logs(cx, &mut o);
        let chains_path = o.at("filter_chains");
        let present = o.has("filter_chains");
        let empty = o.peek("filter_chains").is_some_and(is_empty_list);
        let chains = o.list(cx, "filter_chains");
        let mut filter_chains = Vec::new();
        let mut connection_limit = None;
        for (j, (cpath, cv)) in chains.into_iter().enumerate() {
            if let Some(c) = Obj::new(cx, cpath.clone(), cv) {
                let (chain, cl) = filter_chain(cx, c);
                if j == 0 {
                    connection_limit = cl;
                } else if cl.is_some() {
                    cx.unsupported(
                        &cpath,
                        Some(
                            "a connection_limit filter is supported on the first filter chain only",
                        ),
                    );
                }
                if let Some(chain) = chain {
                    if let Some(k) = filter_chains.iter().position(|c: &FilterChain| {
                        c.filter_chain_match == chain.filter_chain_match
                    }) {
                        cx.error(
                            &cpath,
                            format!("filter_chain_match is the same as filter_chains[{k}]'s"),
                        );
                    }
                    filter_chains.push(chain);
                }
            }
        }
        let has_default = o.has("default_filter_chain");
        let default_filter_chain = match o.obj(cx, "default_filter_chain") {
            Some(c) => {
                let dpath = c.path().to_owned();
                let (chain, cl) = filter_chain(cx, c);
                if cl.is_some() {
                    cx.unsupported(
                        &dpath,
                        Some(
                            "a connection_limit filter is supported on the first filter chain only",
                        ),
                    );
                }
                // Envoy ignores its filter_chain_match.
                chain
                    .map(|mut chain| {
                        chain.filter_chain_match = Default::default();
                        filter_chains.push(chain);
                    })
                    .is_some()
            }
            None => false,
        };
        super::istio::set_stats_direction(&mut filter_chains, traffic_direction);
        if !present && !has_default {
            cx.missing(&chains_path);
        } else if empty && !has_default {
            cx.error(&chains_path, "at least one filter chain is required");
        }
        o.finish(cx);
        if let (Some(name), Some(address)) = (name, address) {
            out.push(Listener {
                name,
                address,
                filter_chains,
                connection_limit,
                per_connection_buffer_limit_bytes: limit,
                tls_inspector: inspectors.tls,
                listener_filters_timeout,
                continue_on_listener_filters_timeout,
                traffic_direction,
                http_inspector: inspectors.http,
                protocol_inspector: inspectors.protocol,
                original_dst: inspectors.original_dst,
                use_original_dst,
                bind_to_port,
                access_log,
                default_filter_chain,
            });
        }
    }
    out
}

/// One `filter_chains` entry: the chain and the connection limit from its
/// non-terminal filters.
fn filter_chain(cx: &mut Ctx, mut o: Obj<'_>) -> (Option<FilterChain>, Option<ConnectionLimit>) {
    let name = o.string(cx, "name").unwrap_or_default();
    let filter_chain_match = o
        .obj(cx, "filter_chain_match")
        .map(|m| super::tls::filter_chain_match(cx, m))
        .unwrap_or_default();
    let tls = o
        .obj(cx, "transport_socket")
        .and_then(|t| super::tls::downstream_socket(cx, t));
    let handshake_timeout = o.timeout(
        cx,
        "transport_socket_connect_timeout",
        Some(mesh_core::config::tls::DEFAULT_HANDSHAKE_TIMEOUT),
    );
    let filters_path = o.at("filters");
    let present = o.has("filters");
    let empty = o.peek("filters").is_some_and(is_empty_list);
    let filters = o.list(cx, "filters");
    let count = filters.len();
    let mut terminal = None;
    let mut limit = None;
    let mut rbac = None;
    let mut local_ratelimit = None;
    let mut seen_ratelimit = false;
    let mut istio_mx = None;
    let mut istio_stats = None;
    for (i, (path, v)) in filters.into_iter().enumerate() {
        let last = i + 1 == count;
        let Some(mut f) = Obj::new(cx, path, v) else {
            continue;
        };
        let Some((which, tc)) = select_extension(cx, &mut f, "network filter", NETWORK_FILTERS)
        else {
            f.finish(cx);
            continue;
        };
        let tc = match tc {
            Some(tc) => Some(tc),
            None => {
                cx.missing(&f.at("typed_config"));
                None
            }
        };
        match which {
            NETWORK_RBAC => {
                if last || rbac.is_some() || terminal.is_some() {
                    cx.error(
                        f.path(),
                        "one envoy.filters.network.rbac is supported, before the terminal filter",
                    );
                }
                if let Some(tc) = tc {
                    rbac = Some(super::rbac::rbac(cx, tc, true));
                }
            }
            NETWORK_LOCAL_RATELIMIT => {
                if last || seen_ratelimit || terminal.is_some() {
                    cx.error(
                        f.path(),
                        "one envoy.filters.network.local_ratelimit is supported, before the terminal filter",
                    );
                }
                seen_ratelimit = true;
                if let Some(tc) = tc {
                    local_ratelimit = super::policy::network_local_ratelimit(cx, tc);
                }
            }
            CONNECTION_LIMIT => {
                if last {
                    cx.error(
                        f.path(),
                        format!("the last filter must be {TERMINAL_NAMES}"),
                    );
                }
                if let Some(tc) = tc {
                    let cl = connection_limit(cx, tc);
                    if limit.is_some() {
                        cx.error(
                            f.path(),
                            "only one envoy.filters.network.connection_limit filter is supported",
                        );
                    }
                    limit = Some(cl);
                }
            }
            HTTP_CONNECTION_MANAGER
            | TCP_PROXY
            | THRIFT_PROXY
            | DUBBO_PROXY
            | RPC_PROXY
            | META_PROTOCOL => {
                if !last {
                    cx.error(
                        f.path(),
                        format!(
                            "{} is a terminal filter and must be the last filter",
                            NETWORK_FILTERS[which].name
                        ),
                    );
                }
                if let Some(tc) = tc {
                    terminal = Some(match which {
                        TCP_PROXY => NetworkFilter::TcpProxy(tcp_proxy(cx, tc)),
                        THRIFT_PROXY => NetworkFilter::Rpc(Box::new(rpc::thrift_proxy(cx, tc))),
                        DUBBO_PROXY => NetworkFilter::Rpc(Box::new(rpc::dubbo_proxy(cx, tc))),
                        RPC_PROXY | META_PROTOCOL => {
                            NetworkFilter::Rpc(Box::new(rpc::generic_proxy(cx, tc)))
                        }
                        _ => NetworkFilter::HttpConnectionManager(Box::new(hcm::hcm(cx, tc))),
                    });
                }
            }
            ISTIO_MX | ISTIO_STATS => {
                if let Some(tc) = tc {
                    let what = NETWORK_FILTERS[which].name;
                    match super::istio::network_filter(cx, what, tc) {
                        IstioNetwork::Mx(mx) => istio_mx = Some((f.path().to_owned(), mx)),
                        IstioNetwork::Stats(s) => istio_stats = Some((f.path().to_owned(), s)),
                    }
                }
            }
            _ => {}
        }
        f.finish(cx);
    }
    if let Some((path, s)) = istio_stats {
        match &mut terminal {
            Some(NetworkFilter::TcpProxy(t)) => t.istio_stats = Some(Box::new(s)),
            Some(_) => cx.unsupported(
                &path,
                Some("istio.stats runs before envoy.filters.network.tcp_proxy only (or as an HTTP filter)"),
            ),
            None => {}
        }
    }
    if let Some((path, mx)) = istio_mx {
        match &mut terminal {
            Some(NetworkFilter::TcpProxy(t)) => t.istio_metadata_exchange = Some(mx),
            Some(_) => cx.unsupported(
                &path,
                Some("istio.metadata_exchange runs before envoy.filters.network.tcp_proxy only"),
            ),
            None => {}
        }
    }
    if !present {
        cx.missing(&filters_path);
    } else if empty {
        cx.error(
            &filters_path,
            format!("the last filter must be {TERMINAL_NAMES}"),
        );
    }
    o.finish(cx);
    (
        terminal.map(|terminal| FilterChain {
            name,
            terminal,
            filter_chain_match,
            tls,
            handshake_timeout,
            rbac,
            local_ratelimit,
        }),
        limit,
    )
}

/// `envoy.filters.network.connection_limit`'s typed config.
fn connection_limit(cx: &mut Ctx, mut o: Obj<'_>) -> ConnectionLimit {
    let stat_prefix = o.req_string(cx, "stat_prefix").unwrap_or_default();
    let max_path = o.at("max_connections");
    let max_connections = match o.u64(cx, "max_connections") {
        Some(0) => {
            cx.error(&max_path, "must be at least 1");
            0
        }
        Some(n) => n,
        None => {
            if !o.has("max_connections") {
                cx.missing(&max_path);
            }
            0
        }
    };
    let delay = o.duration(cx, "delay").filter(|d| !d.is_zero());
    o.finish(cx);
    ConnectionLimit {
        stat_prefix,
        max_connections,
        delay,
    }
}

/// `envoy.filters.network.tcp_proxy`'s typed config.
fn tcp_proxy(cx: &mut Ctx, mut o: Obj<'_>) -> TcpProxy {
    let stat_prefix = o.req_string(cx, "stat_prefix").unwrap_or_default();
    let cluster = if o.has("cluster") && o.has("weighted_clusters") {
        cx.error(
            o.path(),
            "only one of cluster and weighted_clusters may be set",
        );
        o.take("cluster");
        o.take("weighted_clusters");
        ClusterSpecifier::Cluster(String::new())
    } else if o.has("weighted_clusters") {
        let mut w = o.obj(cx, "weighted_clusters");
        let mut clusters = Vec::new();
        if let Some(w) = w.as_mut() {
            let entries = w.list(cx, "clusters");
            if entries.is_empty() {
                cx.error(&w.at("clusters"), "at least one cluster is required");
            }
            for (path, v) in entries {
                let Some(mut c) = Obj::new(cx, path, v) else {
                    continue;
                };
                let name = c.req_string(cx, "name");
                if let Some(n) = &name {
                    cx.cluster_ref(c.at("name"), n.clone());
                }
                let weight_path = c.at("weight");
                let weight = c.u32(cx, "weight");
                if weight == Some(0) || (weight.is_none() && !c.has("weight")) {
                    cx.error(&weight_path, "must be at least 1");
                }
                c.finish(cx);
                clusters.push(WeightedCluster {
                    name: name.unwrap_or_default(),
                    weight: weight.unwrap_or(0),
                    headers: Default::default(),
                    metadata_match: Default::default(),
                });
            }
        }
        if let Some(w) = w {
            w.finish(cx);
        }
        ClusterSpecifier::Weighted(clusters)
    } else if o.has("cluster") {
        let path = o.at("cluster");
        let name = o.req_string(cx, "cluster").unwrap_or_default();
        if !name.is_empty() {
            cx.cluster_ref(path, name.clone());
        }
        ClusterSpecifier::Cluster(name)
    } else {
        cx.error(o.path(), "one of cluster or weighted_clusters is required");
        ClusterSpecifier::Cluster(String::new())
    };
    let idle_timeout = o.timeout(cx, "idle_timeout", Some(ONE_HOUR));
    let access_log = access_logs(cx, &mut o);
    let hash_policy = super::lb::hash_policies(cx, &mut o, true);
    o.finish(cx);
    TcpProxy {
        stat_prefix,
        cluster,
        idle_timeout,
        access_log,
        hash_policy,
        istio_metadata_exchange: None,
        istio_stats: None,
    }
}
