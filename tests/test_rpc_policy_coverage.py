"""Policy coverage for Thrift and Dubbo. Cluster and listener policies on
Thrift, with the Apache Thrift Python
client and threaded servers through mesh's rpc_proxy (`codec: thrift`),
the Thrift counterpart of test_rpc_policies.py (Dubbo and Bolt):

- the `max_requests` circuit breaker lets exactly the limit through under
  concurrency and answers the rest with a `TApplicationException`
  `INTERNAL_ERROR` naming the overflow (flag UO), then frees its permits;
- a route `retry_policy` retries connect failures on another endpoint;
- `local_rate_limit` answers calls over the rate with the exception (RL);
- `fault` aborts (FI) or delays calls.

Envoy's thrift_proxy has none of these on its routes or listener (its
timeouts, rate limits and faults live in other filters), so these run
under mesh only; outlier ejection and mirroring, which Envoy's Thrift
routes do have, run differentially in test_thrift.py and
test_rpc_mirror.py. Dubbo outlier ejection and access logs are at the end.
"""

from __future__ import annotations

import threading
import time

import pytest

import harness
import rpc_peers
from rpc_peers import ThriftClient, ThriftServer, thrift_call

MAX_REQUESTS = 2
RATE_TOKENS = 3
CALLS = 5

MESH = harness.kind_params(("mesh",))


def one_route(cluster: str, **route) -> dict:
    return {"route_config": {"routes": [{"match": {}, "route": {"cluster": cluster, **route}}]}}


@pytest.fixture(scope="module")
def server():
    s = ThriftServer("a").start()
    yield s
    s.stop()


@pytest.fixture(scope="module", params=MESH)
def mesh(request, module_start_proxy, server):
    limited = harness.static_cluster("limited", server.port)
    limited["circuit_breakers"] = {"thresholds": [{"max_requests": MAX_REQUESTS}]}
    # Round robin over a port nobody listens on and the live server.
    half_dead = harness.static_cluster("half_dead", [rpc_peers.free_port(), server.port])
    listeners = [
        rpc_peers.generic_listener("rpc", "thrift", one_route("limited")),
        rpc_peers.generic_listener("retry", "thrift", one_route("half_dead", retry_policy={
            "retry_on": "connect-failure", "num_retries": 2})),
        rpc_peers.generic_listener("noretry", "thrift", one_route("half_dead")),
        rpc_peers.generic_listener("limited_rate", "thrift", {
            "local_rate_limit": {"token_bucket": {
                "max_tokens": RATE_TOKENS, "tokens_per_fill": 1, "fill_interval": "3600s"}},
            **one_route("limited")}),
        rpc_peers.generic_listener("fault_abort", "thrift", {
            "fault": {"abort": {"percentage": 100}}, **one_route("limited")}),
        rpc_peers.generic_listener("fault_delay", "thrift", {
            "fault": {"delay": {"fixed_delay": "3s", "percentage": 100}},
            **one_route("limited")}),
    ]
    return module_start_proxy(request.param, harness.bootstrap(listeners, [limited, half_dead]))


def call_or_error(port: int, method: str, *args, timeout: float = 10.0):
    """The call's result, or ("error", type, message) for a
    TApplicationException, or ("transport", message) for a dead socket."""
    from thrift.Thrift import TApplicationException
    from thrift.transport.TTransport import TTransportException

    try:
        return thrift_call(port, method, *args, timeout=timeout)
    except TApplicationException as e:
        return ("error", e.type, e.message or "")
    except (TTransportException, OSError) as e:
        return ("transport", str(e))


def prom(mesh, name, **labels):
    return harness.prometheus_value(mesh.admin_text("/stats/prometheus"), name, **labels) or 0


def test_max_requests_lets_exactly_the_limit_through(mesh):
    from thrift.Thrift import TApplicationException

    before = prom(mesh, "envoy_cluster_upstream_rq_active_overflow", envoy_cluster_name="limited")
    results = [None] * CALLS
    barrier = threading.Barrier(CALLS)

    def run(i):
        with ThriftClient(mesh.port("rpc")) as c:
            barrier.wait(10)
            try:
                c.sleep(1500)
                results[i] = "slept"
            except TApplicationException as e:
                results[i] = (e.type, e.message)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CALLS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count("slept") == MAX_REQUESTS, results
    refused = [r for r in results if r != "slept"]
    assert len(refused) == CALLS - MAX_REQUESTS, results
    for r in refused:
        assert r[0] == TApplicationException.INTERNAL_ERROR and "overflow" in r[1], results
    assert prom(mesh, "envoy_cluster_upstream_rq_active_overflow",
                envoy_cluster_name="limited") == before + CALLS - MAX_REQUESTS
    assert prom(mesh, "mesh_rpc_local_reply", mesh_rpc_prefix="rpc",
                flag="UO") >= CALLS - MAX_REQUESTS
    # The permits were given back: nothing active, and the limit admits again.
    assert prom(mesh, "envoy_cluster_upstream_rq_active", envoy_cluster_name="limited") == 0
    with ThriftClient(mesh.port("rpc")) as c:
        assert [c.add(i, 1) for i in range(6)] == [i + 1 for i in range(6)]


def test_connect_failures_are_retried_on_another_endpoint(mesh):
    # Without a retry policy, the calls sent to the dead endpoint fail.
    res = [call_or_error(mesh.port("noretry"), "add", i, 2) for i in range(10)]
    assert sum(isinstance(r, tuple) for r in res) >= 3, res
    assert all(r == i + 2 for i, r in enumerate(res) if not isinstance(r, tuple)), res
    before = prom(mesh, "envoy_cluster_upstream_rq_retry", envoy_cluster_name="half_dead")
    res = [call_or_error(mesh.port("retry"), "add", i, 2) for i in range(10)]
    assert res == [i + 2 for i in range(10)], res
    assert prom(mesh, "envoy_cluster_upstream_rq_retry",
                envoy_cluster_name="half_dead") - before >= 3
    assert prom(mesh, "envoy_cluster_upstream_rq_retry_success", envoy_cluster_name="half_dead") >= 3


def test_local_rate_limit_answers_with_an_application_exception(mesh):
    from thrift.Thrift import TApplicationException

    with ThriftClient(mesh.port("limited_rate")) as c:
        assert [c.add(i, 1) for i in range(RATE_TOKENS)] == [i + 1 for i in range(RATE_TOKENS)]
        for _ in range(3):
            with pytest.raises(TApplicationException) as e:
                c.add(1, 1)
            assert e.value.type == TApplicationException.INTERNAL_ERROR
    assert prom(mesh, "mesh_rpc_local_reply", mesh_rpc_prefix="limited_rate", flag="RL") == 3


def test_fault_abort_answers_every_call_with_an_application_exception(mesh, server):
    from thrift.Thrift import TApplicationException

    calls = server.calls
    res = [call_or_error(mesh.port("fault_abort"), "add", 1, 2) for _ in range(3)]
    assert all(r[0] == "error" and r[1] == TApplicationException.INTERNAL_ERROR
               and "fault filter abort" in r[2] for r in res), res
    assert server.calls == calls  # nothing reached the server
    assert prom(mesh, "mesh_rpc_local_reply", mesh_rpc_prefix="fault_abort", flag="FI") == 3


def test_fault_delay_holds_calls_past_the_client_timeout(mesh):
    # The client gives up after 0.5 s; the proxy holds the call for 3 s.
    r = call_or_error(mesh.port("fault_delay"), "add", 1, 2, timeout=0.5)
    assert r[0] == "transport", r
    # The same call answers at once on a listener without the fault.
    assert call_or_error(mesh.port("rpc"), "add", 1, 2, timeout=0.5) == 3
    assert prom(mesh, "mesh_rpc_fault_delays_injected", mesh_rpc_prefix="fault_delay") == 1


# ---------------------------------------------------------------- Dubbo

node_skip = pytest.mark.skipif(rpc_peers.node_available() is not None,
                               reason=str(rpc_peers.node_available()))
GREETER = "com.mesh.test.Greeter"


@pytest.fixture(scope="module")
def node_a():
    if rpc_peers.node_available() is not None:
        pytest.skip(str(rpc_peers.node_available()))
    s = rpc_peers.NodeServer("dubbo", "a").start()
    yield s
    s.stop()


@pytest.fixture(scope="module", params=harness.kind_params())
def dubbo_outlier(request, module_start_proxy, node_a):
    refused_sock, refused_port = harness.refused_port()
    pool = harness.static_cluster("pool", [node_a.port, refused_port])
    pool["outlier_detection"] = {"consecutive_5xx": 2, "interval": "1s",
                                 "base_ejection_time": "60s", "max_ejection_percent": 100}
    listeners = [rpc_peers.dubbo_listener("dubbo", {"route_config": [{
        "name": "greeter", "interface": GREETER,
        "routes": [{"match": {"method": {"name": {"exact": "whoami"}}},
                    "route": {"cluster": "pool"}}]}]})]
    yield module_start_proxy(request.param, harness.bootstrap(listeners, [pool]))
    refused_sock.close()


@node_skip
def test_dubbo_outlier_detection_ejects_an_unreachable_endpoint(dubbo_outlier):
    from dubbo_ssl.common.exceptions import DubboResponseException

    results = []
    for _ in range(30):
        try:
            results.append(rpc_peers.dubbo_call(dubbo_outlier.port("dubbo"), GREETER, "whoami"))
        except DubboResponseException:
            results.append("error")
    # Some calls fail before the refused endpoint is ejected; after that
    # every call reaches the live server.
    assert "error" in results[:10], results
    assert results[-15:] == ["a"] * 15, results
    if dubbo_outlier.kind == "mesh":
        text = dubbo_outlier.admin_text("/stats/prometheus")
        assert harness.prometheus_value(text, "envoy_cluster_outlier_detection_ejections_enforced_total",
                                        envoy_cluster_name="pool") >= 1


@pytest.fixture(scope="module", params=MESH)
def dubbo_logged(request, module_start_proxy, node_a, tmp_path_factory):
    log = tmp_path_factory.mktemp("dubbo-log") / "access.log"
    refused_sock, refused_port = harness.refused_port()
    listeners = [rpc_peers.dubbo_listener("dubbo", {
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(log)}}],
        "route_config": [{"name": "greeter", "interface": GREETER, "routes": [
            {"match": {"method": {"name": {"exact": "whoami"}}}, "route": {"cluster": "dead"}},
            {"match": {}, "route": {"cluster": "a"}}]}]})]
    clusters = [harness.static_cluster("a", node_a.port),
                harness.static_cluster("dead", refused_port)]
    p = module_start_proxy(request.param, harness.bootstrap(listeners, clusters))
    p.access_log = log
    yield p
    refused_sock.close()


@node_skip
def test_dubbo_access_log_has_a_line_per_call_with_its_outcome(dubbo_logged):
    from dubbo_ssl.common.exceptions import DubboResponseException

    port = dubbo_logged.port("dubbo")
    assert rpc_peers.dubbo_call(port, GREETER, "plus", [2, 3]) == 5
    with pytest.raises(DubboResponseException):
        rpc_peers.dubbo_call(port, GREETER, "whoami")
    with pytest.raises(DubboResponseException):
        rpc_peers.dubbo_call(port, "com.mesh.test.Other", "plus", [1, 1])
    want = [f'"plus {GREETER} dubbo" ok - ', f'"whoami {GREETER} dubbo" error UF ',
            '"plus com.mesh.test.Other dubbo" error NR ']
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline:
        text = dubbo_logged.access_log.read_text() if dubbo_logged.access_log.exists() else ""
        if all(w in text for w in want):
            break
        time.sleep(0.05)
    for w in want:
        assert w in text, (w, text)


# ------------------------------------------- retries: per-try timeout, previous hosts


@pytest.fixture(scope="module")
def slow_and_fast():
    slow = ThriftServer("slow", whoami_delay=3.0).start()
    fast = ThriftServer("fast").start()
    yield slow, fast
    slow.stop()
    fast.stop()


@pytest.fixture(scope="module", params=MESH)
def per_try(request, module_start_proxy, slow_and_fast):
    slow, fast = slow_and_fast
    pool = harness.static_cluster("pool", [slow.port, fast.port])
    pool["lb_policy"] = "RANDOM"
    retry = {"retry_on": "reset", "idempotent": True, "num_retries": 1,
             "per_try_timeout": "0.5s"}
    listeners = [
        rpc_peers.generic_listener("previous_hosts", "thrift", one_route("pool", retry_policy={
            **retry,
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
            "host_selection_retry_max_attempts": 20})),
        rpc_peers.generic_listener("any_host", "thrift", one_route("pool", retry_policy=retry)),
        rpc_peers.generic_listener("no_retry", "thrift", one_route("pool", retry_policy={
            **retry, "num_retries": 0})),
    ]
    return module_start_proxy(request.param, harness.bootstrap(listeners, [pool]))


def test_a_try_past_per_try_timeout_is_retried_on_a_different_endpoint(per_try):
    # Every call that first lands on the slow server times out after 0.5 s
    # and is retried; the previous-hosts predicate sends the retry to the
    # other server, so every call is answered by the fast one.
    before = prom(per_try, "envoy_cluster_upstream_rq_per_try_timeout", envoy_cluster_name="pool")
    res = [call_or_error(per_try.port("previous_hosts"), "whoami", timeout=10) for _ in range(16)]
    assert res == ["fast"] * 16, res
    timeouts = prom(per_try, "envoy_cluster_upstream_rq_per_try_timeout",
                    envoy_cluster_name="pool") - before
    assert timeouts >= 1  # (16 random first picks all fast: 2^-16)
    assert prom(per_try, "envoy_cluster_upstream_rq_retry_success", envoy_cluster_name="pool") >= 1


def test_without_the_predicate_a_retry_may_land_on_the_same_endpoint(per_try):
    from thrift.Thrift import TApplicationException

    # Random picks: about a quarter of the calls try the slow server twice.
    res = [call_or_error(per_try.port("any_host"), "whoami", timeout=10) for _ in range(30)]
    failed = [r for r in res if r != "fast"]
    assert failed, res  # (no call failing twice: 0.75^30, about 2e-4)
    for r in failed:
        assert r[:2] == ("error", TApplicationException.INTERNAL_ERROR) and "timeout" in r[2], res


def test_per_try_timeout_without_retries_answers_with_a_timeout(per_try, slow_and_fast):
    from thrift.Thrift import TApplicationException

    res = [call_or_error(per_try.port("no_retry"), "whoami", timeout=10) for _ in range(12)]
    assert "fast" in res, res
    for r in res:
        if r != "fast":
            assert r[:2] == ("error", TApplicationException.INTERNAL_ERROR), res
            assert "per-try timeout" in r[2], res
    assert any(r != "fast" for r in res), res  # (all 12 fast: 2^-12)
    assert prom(per_try, "mesh_rpc_local_reply", mesh_rpc_prefix="no_retry", flag="UT") >= 1
