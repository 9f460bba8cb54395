//! `retry_policy` on `mesh.filters.network.rpc_proxy` routes: connect
//! failures are retried by default-safe config; resending after a reset
//! needs the route to declare its methods idempotent.

use mesh_bin::bootstrap::load_str;
use mesh_core::config::{NetworkFilter, RpcProxy};
use mesh_core::policy::RetryOn;
use serde_json::{json, Value};

const BASE: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";

fn doc(retry_policy: Value) -> String {
    json!({
        "static_resources": {
            "listeners": [{
                "name": "l",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "mesh.filters.network.rpc_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/mesh.filters.network.rpc_proxy.v1.RpcProxy",
                        "stat_prefix": "g",
                        "codec": "bolt",
                        "route_config": {"routes": [
                            {"match": {}, "route": {"cluster": "a", "retry_policy": retry_policy}}]}
                    }
                }]}]
            }],
            "clusters": [
                {"name": "a", "load_assignment": {"cluster_name": "a", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]}}
            ]
        }
    })
    .to_string()
}

fn rpc(retry_policy: Value) -> RpcProxy {
    let b = load_str(&doc(retry_policy)).unwrap_or_else(|e| panic!("{e}"));
    match &b.listeners[0].filter_chains[0].terminal {
        NetworkFilter::Rpc(r) => (**r).clone(),
        other => panic!("not an RPC filter: {other:?}"),
    }
}

fn errors(retry_policy: Value) -> Vec<String> {
    match load_str(&doc(retry_policy)) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn connect_failure_and_idempotent_reset_are_loaded() {
    let r = rpc(json!({"retry_on": "connect-failure", "num_retries": 3}));
    let p = r.route_config.virtual_hosts[0].routes[0]
        .policy
        .retry_policy
        .clone()
        .expect("a retry policy");
    assert_eq!((p.retry_on, p.num_retries), (RetryOn::CONNECT_FAILURE, 3));
    let r = rpc(json!({"retry_on": "connect-failure,reset", "idempotent": true}));
    let p = r.route_config.virtual_hosts[0].routes[0]
        .policy
        .retry_policy
        .clone()
        .expect("a retry policy");
    assert_eq!(
        (p.retry_on, p.num_retries),
        (RetryOn::CONNECT_FAILURE | RetryOn::RESET, 1)
    );
}

#[test]
fn reset_needs_idempotent_and_unknown_conditions_are_refused() {
    let path = format!("{BASE}.route_config.routes[0].route.retry_policy");
    let e = errors(json!({"retry_on": "reset"}));
    assert!(
        e.iter()
            .any(|m| m.starts_with(&format!("{path}.retry_on")) && m.contains("idempotent")),
        "{e:?}"
    );
    let e = errors(json!({"retry_on": "5xx"}));
    assert!(
        e.iter()
            .any(|m| m.starts_with(&format!("{path}.retry_on")) && m.contains("5xx")),
        "{e:?}"
    );
    let e = errors(json!({"retry_on": "connect-failure", "per_try_timeout": "1s"}));
    assert!(
        e.iter()
            .any(|m| m.starts_with(&format!("unsupported: {path}.per_try_timeout"))),
        "{e:?}"
    );
}
