"""Thrift through the proxy: the Apache Thrift Python client and server,
framed/unframed x binary/compact, under Envoy's thrift_proxy and mesh on the
same YAML (routing by method and service name, invert, weighted split, the
TApplicationException for no route), then mesh-only: timeouts, oneway,
pipelined concurrent calls, stats per method, garbage input."""

from __future__ import annotations

import socket
import threading
from collections import Counter

import pytest

import harness
import rpc_peers
from rpc_peers import ThriftClient, ThriftServer, thrift_call

FORMATS = [("framed", "binary"), ("framed", "compact"), ("unframed", "binary"),
           ("unframed", "compact")]


def routes_config(extra_routes=None):
    return {
        "route_config": {
            "name": "calc",
            "routes": (extra_routes or []) + [
                {"match": {"method_name": "whoami"}, "route": {"cluster": "b"}},
                {"match": {"method_name": "unrouted", "invert": True}, "route": {"cluster": "a"}},
            ],
        }
    }


@pytest.fixture(scope="module", params=FORMATS, ids=lambda f: f"{f[0]}-{f[1]}")
def fmt(request):
    return request.param


@pytest.fixture(scope="module")
def servers(fmt):
    t, p = fmt
    a = ThriftServer("a", t, p).start()
    b = ThriftServer("b", t, p).start()
    m = ThriftServer("m", t, p, multiplexed="Calc").start()
    yield {"a": a, "b": b, "m": m}
    for s in (a, b, m):
        s.stop()


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy, servers):
    listeners = [
        rpc_peers.thrift_listener("thrift", routes_config()),
        rpc_peers.thrift_listener("split", {"route_config": {"routes": [
            {"match": {"method_name": ""}, "route": {"weighted_clusters": {"clusters": [
                {"name": "a", "weight": 80}, {"name": "b", "weight": 20}]}}}]}}),
        rpc_peers.thrift_listener("mux", {"route_config": {"routes": [
            {"match": {"service_name": "Calc"}, "route": {"cluster": "m"}},
            {"match": {"method_name": ""}, "route": {"cluster": "a"}}]}}),
    ]
    clusters = [harness.static_cluster(n, s.port) for n, s in servers.items()]
    return module_start_proxy(request.param, harness.bootstrap(listeners, clusters))


def test_calls_reach_the_routed_server(proxy, fmt):
    t, p = fmt
    with ThriftClient(proxy.port("thrift"), t, p) as c:
        assert c.add(2, 40) == 42
        assert c.whoami() == "b"  # method_name route
        assert c.echo("x" * 100_000) == "x" * 100_000
        for i in range(20):  # one connection, many calls
            assert c.add(i, 1) == i + 1


def test_no_route_is_an_unknown_method_exception(proxy, fmt):
    t, p = fmt
    with ThriftClient(proxy.port("thrift"), t, p) as c:
        rpc_peers.check_thrift_no_route(c, proxy.kind)


def test_declared_exceptions_pass_through(proxy, fmt):
    _, ttypes = rpc_peers.thrift_stubs()
    t, p = fmt
    with ThriftClient(proxy.port("thrift"), t, p) as c:
        with pytest.raises(ttypes.Oops) as e:
            c.fail("because")
        assert e.value.why == "because"


def test_weighted_split_80_20(proxy, fmt):
    t, p = fmt
    seen = Counter()
    with ThriftClient(proxy.port("split"), t, p) as c:
        for _ in range(300):
            seen[c.whoami()] += 1
    assert set(seen) == {"a", "b"}
    assert 0.68 < seen["a"] / 300 < 0.92, seen


def test_multiplexed_service_name_route(proxy, fmt):
    t, p = fmt
    with ThriftClient(proxy.port("mux"), t, p, multiplexed="Calc") as c:
        assert c.whoami() == "m"
    with ThriftClient(proxy.port("mux"), t, p) as c:
        assert c.whoami() == "a"


def test_concurrent_clients_all_answered(proxy, fmt):
    t, p = fmt
    errors = []

    def run(k):
        try:
            with ThriftClient(proxy.port("thrift"), t, p) as c:
                for i in range(25):
                    assert c.add(k, i) == k + i
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors


# ---------------------------------------------------------------- mesh only

MESH = harness.kind_params(("mesh",))


@pytest.fixture(scope="module")
def framed_servers():
    a = ThriftServer("a").start()
    b = ThriftServer("b").start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module", params=MESH)
def mesh(request, module_start_proxy, framed_servers, tmp_path_factory):
    a, b = framed_servers
    log = tmp_path_factory.mktemp("thrift-log") / "access.log"
    listeners = [
        rpc_peers.generic_listener("timed", "thrift", {
            "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(log)}}],
            "route_config": {"routes": [
                {"match": {"method": {"exact": "sleep"}}, "route": {"cluster": "a", "timeout": "0.5s"}},
                {"match": {"method": {"exact": "whoami"}}, "route": {"cluster": "dead"}},
                {"match": {}, "route": {"cluster": "a"}},
            ]}}),
        rpc_peers.thrift_listener("thrift", routes_config()),
    ]
    refused_sock, refused_port = harness.refused_port()
    clusters = [harness.static_cluster("a", a.port), harness.static_cluster("b", b.port),
                harness.static_cluster("dead", refused_port)]
    p = module_start_proxy(request.param, harness.bootstrap(listeners, clusters))
    p.access_log = log
    yield p
    refused_sock.close()


def test_route_timeout_is_an_internal_error_and_counted(mesh):
    from thrift.Thrift import TApplicationException

    with ThriftClient(mesh.port("timed")) as c:
        with pytest.raises(TApplicationException) as e:
            c.sleep(3000)
        assert e.value.type == TApplicationException.INTERNAL_ERROR
        assert "timeout" in e.value.message
        # Other calls on the same connection still work meanwhile.
        assert c.add(3, 4) == 7
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "envoy_cluster_upstream_rq_timeout",
                                    envoy_cluster_name="a") >= 1
    assert harness.prometheus_value(text, "mesh_rpc_local_reply", mesh_rpc_prefix="timed",
                                    flag="UT") >= 1


def test_unreachable_cluster_is_an_internal_error(mesh):
    from thrift.Thrift import TApplicationException

    with ThriftClient(mesh.port("timed")) as c:
        with pytest.raises(TApplicationException) as e:
            c.whoami()
        assert e.value.type == TApplicationException.INTERNAL_ERROR
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "envoy_cluster_upstream_cx_connect_fail",
                                    envoy_cluster_name="dead") >= 1


def test_oneway_reaches_the_server(mesh, framed_servers):
    a, _ = framed_servers
    with ThriftClient(mesh.port("timed")) as c:
        c.fire("note-1")
        c.fire("note-2")
        # A two-way call behind them on the same connection.
        assert "note-2" in c.fired() or "note-2" in a.fired


def test_stats_per_method(mesh):
    for _ in range(3):
        assert thrift_call(mesh.port("thrift"), "add", 1, 2) == 3
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "mesh_rpc_method_request_total",
                                    mesh_rpc_prefix="thrift", service="", method="add") >= 3
    assert harness.prometheus_value(text, "mesh_rpc_method_response_success",
                                    mesh_rpc_prefix="thrift", service="", method="add") >= 3


def test_access_log_line_per_call(mesh):
    assert thrift_call(mesh.port("timed"), "echo", "logged") == "logged"
    deadline = harness.time.monotonic() + 5
    while harness.time.monotonic() < deadline:
        text = mesh.access_log.read_text() if mesh.access_log.exists() else ""
        if '"echo - thrift" ok' in text:
            break
        harness.time.sleep(0.05)
    assert '"echo - thrift" ok - ' in text, text


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x7f\xff\xff\xff\x80\x01\x00\x01",  # framed length over the maximum
    b"\x00\x00\x00\x10\x80\x01\x00\x09\x00\x00\x00\x00" + b"\x00" * 8,  # unknown message type
    b"\x80\x01\x00\x01\x00\x00\x00\x03add\x00\x00\x00\x01\x0b\x00\x01\xff\xff\xff\xff",
])
def test_garbage_closes_only_that_connection(mesh, garbage):
    with ThriftClient(mesh.port("thrift")) as healthy:
        assert healthy.add(1, 1) == 2
        with socket.create_connection(("127.0.0.1", mesh.port("thrift")), timeout=5) as s:
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        assert healthy.add(2, 2) == 4
    assert mesh.alive()


# ---------------------------------------------------------------- outlier detection


@pytest.fixture(scope="module", params=harness.kind_params())
def outlier_proxy(request, module_start_proxy, framed_servers):
    a, _ = framed_servers
    refused_sock, refused_port = harness.refused_port()
    pool = harness.static_cluster("pool", [a.port, refused_port])
    pool["outlier_detection"] = {"consecutive_5xx": 2, "interval": "1s",
                                 "base_ejection_time": "60s", "max_ejection_percent": 100}
    listeners = [rpc_peers.thrift_listener("thrift", {"route_config": {"routes": [
        {"match": {"method_name": ""}, "route": {"cluster": "pool"}}]}})]
    yield module_start_proxy(request.param, harness.bootstrap(listeners, [pool]))
    refused_sock.close()


def test_outlier_detection_ejects_an_unreachable_endpoint(outlier_proxy):
    from thrift.Thrift import TApplicationException

    results = []
    for _ in range(30):
        try:
            results.append(thrift_call(outlier_proxy.port("thrift"), "whoami"))
        except TApplicationException:
            results.append("error")
    # Some calls fail before the refused endpoint is ejected; after that
    # every call reaches the live server.
    assert "error" in results[:10], results
    assert results[-15:] == ["a"] * 15, results
