//! Policies of `mesh.filters.network.rpc_proxy`: a route's `retry_policy`
//! (connect failures are always safe to retry; resending after a reset
//! needs the route to declare its methods idempotent) and the filter's
//! `local_rate_limit`.

use mesh_bin::bootstrap::load_str;
use mesh_core::config::{NetworkFilter, RpcProxy};
use mesh_core::policy::RetryOn;
use serde_json::{json, Value};

const BASE: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";

fn doc(retry_policy: Value) -> String {
    doc_with(retry_policy, json!(null))
}

fn doc_with(retry_policy: Value, local_rate_limit: Value) -> String {
    let mut d = json!({
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
    });
    if !local_rate_limit.is_null() {
        d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["local_rate_limit"] = local_rate_limit;
    }
    d.to_string()
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
    let e = errors(json!({"retry_on": "connect-failure", "per_try_timeout": "-1s"}));
    assert!(
        e.iter()
            .any(|m| m.starts_with(&format!("{path}.per_try_timeout"))),
        "{e:?}"
    );
}

#[test]
fn per_try_timeout_is_loaded() {
    let r = rpc(json!({"retry_on": "connect-failure", "per_try_timeout": "1s"}));
    let p = r.route_config.virtual_hosts[0].routes[0]
        .policy
        .retry_policy
        .clone()
        .expect("a retry policy");
    assert_eq!(p.per_try_timeout, Some(std::time::Duration::from_secs(1)));
}

#[test]
fn local_rate_limit_needs_a_valid_token_bucket() {
    let b = load_str(&doc_with(
        json!({"retry_on": "connect-failure"}),
        json!({"token_bucket": {"max_tokens": 5, "fill_interval": "2s"}}),
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let NetworkFilter::Rpc(r) = &b.listeners[0].filter_chains[0].terminal else {
        panic!("not an RPC filter");
    };
    let t = r.local_rate_limit.expect("a token bucket");
    assert_eq!(
        (t.max_tokens, t.tokens_per_fill, t.fill_interval.as_secs()),
        (5, 1, 2)
    );
    let e = match load_str(&doc_with(
        json!({"retry_on": "connect-failure"}),
        json!({"token_bucket": {"max_tokens": 0, "fill_interval": "0s"}}),
    )) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
    };
    for key in ["max_tokens", "fill_interval"] {
        let path = format!("{BASE}.local_rate_limit.token_bucket.{key}");
        assert!(e.iter().any(|m| m.starts_with(&path)), "{key}: {e:?}");
    }
}

#[test]
fn fault_percentages_are_checked() {
    let with_fault = |fault: Value| {
        let mut d: Value = serde_json::from_str(&doc(json!({"retry_on": "connect-failure"})))
            .unwrap_or_else(|e| panic!("{e}"));
        d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["fault"] = fault;
        load_str(&d.to_string())
    };
    let b = with_fault(json!({"delay": {"fixed_delay": "0.2s", "percentage": 30}, "abort": {}}))
        .unwrap_or_else(|e| panic!("{e}"));
    let NetworkFilter::Rpc(r) = &b.listeners[0].filter_chains[0].terminal else {
        panic!("not an RPC filter");
    };
    assert_eq!(
        (
            r.fault.delay.map(|d| d.as_millis()),
            r.fault.delay_percent,
            r.fault.abort_percent
        ),
        (Some(200), 30, 100)
    );
    let e = match with_fault(json!({"delay": {"percentage": 10}, "abort": {"percentage": 101}})) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
    };
    for key in ["delay.fixed_delay", "abort.percentage"] {
        let path = format!("{BASE}.fault.{key}");
        assert!(e.iter().any(|m| m.contains(&path)), "{key}: {e:?}");
    }
}
