"""Cluster policies on the RPC proxy, with real SOFA Bolt and Dubbo peers
(sofa-rpc-node clients and servers): the `max_requests` circuit breaker
refuses what is over the limit with the protocol's own "overloaded" error
(flag UO, `upstream_rq_active_overflow`) and lets exactly the limit through
under concurrency, then frees its permits when the calls end; a route's
`retry_policy` retries connect failures on another endpoint; a listener's
`local_rate_limit` answers requests over its rate with the protocol's
error (flag RL); its `fault` aborts (flag FI) or delays requests; a
`per_try_timeout` gives up each try and retries it."""

from __future__ import annotations

import pytest

import harness
import rpc_peers
from rpc_peers import NodeServer, node_calls

pytestmark = pytest.mark.skipif(rpc_peers.node_available() is not None,
                                reason=str(rpc_peers.node_available()))

MAX_REQUESTS = 2
RATE_TOKENS = 3
CALLS = 5


@pytest.fixture(scope="module", params=["bolt", "dubbo"])
def setup(request, module_start_proxy):
    protocol = request.param
    server = NodeServer(protocol, "a").start()
    cluster = harness.static_cluster("limited", server.port)
    cluster["circuit_breakers"] = {"thresholds": [{"max_requests": MAX_REQUESTS}]}
    # Round robin over a port nobody listens on and the live server.
    half_dead = harness.static_cluster("half_dead", [rpc_peers.free_port(), server.port])
    listeners = [
        rpc_peers.generic_listener("rpc", protocol, {"route_config": {"routes": [
            {"match": {}, "route": {"cluster": "limited"}}]}}),
        rpc_peers.generic_listener("retry", protocol, {"route_config": {"routes": [
            {"match": {}, "route": {"cluster": "half_dead", "retry_policy": {
                "retry_on": "connect-failure", "num_retries": 2}}}]}}),
        rpc_peers.generic_listener("noretry", protocol, {"route_config": {"routes": [
            {"match": {}, "route": {"cluster": "half_dead"}}]}}),
        rpc_peers.generic_listener("limited_rate", protocol, {
            "local_rate_limit": {"token_bucket": {
                "max_tokens": RATE_TOKENS, "tokens_per_fill": 1, "fill_interval": "3600s"}},
            "route_config": {"routes": [{"match": {}, "route": {"cluster": "limited"}}]}}),
        rpc_peers.generic_listener("fault_abort", protocol, {
            "fault": {"abort": {"percentage": 100}},
            "route_config": {"routes": [{"match": {}, "route": {"cluster": "limited"}}]}}),
        rpc_peers.generic_listener("fault_delay", protocol, {
            "fault": {"delay": {"fixed_delay": "3s", "percentage": 100}},
            "route_config": {"routes": [{"match": {}, "route": {"cluster": "limited"}}]}}),
        rpc_peers.generic_listener("per_try", protocol, {"route_config": {"routes": [
            {"match": {}, "route": {"cluster": "single", "retry_policy": {
                "retry_on": "reset", "idempotent": True, "num_retries": 1,
                "per_try_timeout": "0.5s"}}}]}}),
    ]
    single = harness.static_cluster("single", server.port)
    mesh = module_start_proxy("mesh", harness.bootstrap(listeners, [cluster, half_dead, single]))
    yield protocol, mesh
    server.stop()


def test_max_requests_lets_exactly_the_limit_through(setup):
    protocol, mesh = setup
    before = harness.prometheus_value(mesh.admin_text("/stats/prometheus"),
                                      "envoy_cluster_upstream_rq_active_overflow",
                                      envoy_cluster_name="limited") or 0
    res = node_calls(protocol, mesh.port("rpc"),
                     [{"method": "sleep", "args": [1500], "timeout": 10000}] * CALLS,
                     concurrency=CALLS)
    ok = [r for r in res if r.get("ok") == "slept"]
    refused = [r for r in res if "error" in r]
    assert len(ok) == MAX_REQUESTS, res
    assert len(refused) == CALLS - MAX_REQUESTS, res
    for r in refused:
        assert "overflow" in r["error"] or "overloaded" in r["error"].lower(), res
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "envoy_cluster_upstream_rq_active_overflow",
                                    envoy_cluster_name="limited") == before + CALLS - MAX_REQUESTS
    assert harness.prometheus_value(text, "mesh_rpc_local_reply", mesh_rpc_prefix="rpc",
                                    flag="UO") >= CALLS - MAX_REQUESTS
    # The permits were given back: nothing is active, and the limit admits again.
    assert harness.prometheus_value(text, "envoy_cluster_upstream_rq_active",
                                    envoy_cluster_name="limited") == 0
    res = node_calls(protocol, mesh.port("rpc"),
                     [{"method": "plus", "args": [i, 1]} for i in range(6)],
                     concurrency=MAX_REQUESTS)
    assert res == [{"ok": i + 1} for i in range(6)], res


def test_connect_failures_are_retried_on_another_endpoint(setup):
    protocol, mesh = setup
    calls = [{"method": "plus", "args": [i, 2]} for i in range(10)]
    # Without a retry policy, the calls sent to the dead endpoint fail.
    res = node_calls(protocol, mesh.port("noretry"), calls)
    assert sum("error" in r for r in res) >= 3, res
    assert all(r == {"ok": i + 2} for i, r in enumerate(res) if "ok" in r), res
    before = harness.prometheus_value(mesh.admin_text("/stats/prometheus"),
                                      "envoy_cluster_upstream_rq_retry",
                                      envoy_cluster_name="half_dead") or 0
    res = node_calls(protocol, mesh.port("retry"), calls)
    assert res == [{"ok": i + 2} for i in range(10)], res
    text = mesh.admin_text("/stats/prometheus")
    retried = harness.prometheus_value(text, "envoy_cluster_upstream_rq_retry",
                                       envoy_cluster_name="half_dead") - before
    assert retried >= 3, retried
    assert harness.prometheus_value(text, "envoy_cluster_upstream_rq_retry_success",
                                    envoy_cluster_name="half_dead") >= 3


def test_local_rate_limit_answers_with_the_protocol_error(setup):
    protocol, mesh = setup
    res = node_calls(protocol, mesh.port("limited_rate"),
                     [{"method": "plus", "args": [i, 1]} for i in range(RATE_TOKENS + 3)])
    assert res[:RATE_TOKENS] == [{"ok": i + 1} for i in range(RATE_TOKENS)], res
    assert all("error" in r for r in res[RATE_TOKENS:]), res
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "mesh_rpc_local_reply", mesh_rpc_prefix="limited_rate",
                                    flag="RL") == 3


def test_fault_abort_answers_every_call_with_the_protocol_error(setup):
    protocol, mesh = setup
    res = node_calls(protocol, mesh.port("fault_abort"), [{"method": "plus", "args": [1, 2]}] * 3)
    assert all("fault filter abort" in r.get("error", "") for r in res), res
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "mesh_rpc_local_reply", mesh_rpc_prefix="fault_abort",
                                    flag="FI") == 3


def test_fault_delay_holds_calls_past_the_client_timeout(setup):
    protocol, mesh = setup
    # The client gives up after 0.5 s; the proxy holds the call for 3 s.
    res = node_calls(protocol, mesh.port("fault_delay"),
                     [{"method": "plus", "args": [1, 2], "timeout": 500}])
    err = res[0].get("error", "").lower()
    assert "timeout" in err or "no response in" in err, res
    # The same call answers at once on a listener without the fault.
    assert node_calls(protocol, mesh.port("rpc"),
                      [{"method": "plus", "args": [1, 2], "timeout": 500}]) == [{"ok": 3}]
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "mesh_rpc_fault_delays_injected",
                                    mesh_rpc_prefix="fault_delay") == 1


def test_per_try_timeout_abandons_each_try_and_retries_it(setup):
    protocol, mesh = setup
    # Each try of a 3 s call is given up after 0.5 s; the one retry too.
    res = node_calls(protocol, mesh.port("per_try"),
                     [{"method": "sleep", "args": [3000], "timeout": 10000},
                      {"method": "plus", "args": [1, 2], "timeout": 10000}])
    assert "timeout" in res[0].get("error", "").lower(), res
    assert res[1] == {"ok": 3}, res  # a fast call on the same route is answered
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "envoy_cluster_upstream_rq_per_try_timeout",
                                    envoy_cluster_name="single") == 2
    assert harness.prometheus_value(text, "envoy_cluster_upstream_rq_retry",
                                    envoy_cluster_name="single") == 1
    assert harness.prometheus_value(text, "mesh_rpc_local_reply", mesh_rpc_prefix="per_try",
                                    flag="UT") == 1
