"""SOFA Bolt through mesh's generic RPC proxy (`mesh.filters.network.rpc_proxy`,
`codec: bolt`; Envoy has no Bolt filter): sofa-rpc-node client and server,
routing by service, method and version, weighted split, error replies for
no route and timeouts in the form SOFA clients read, many requests in flight
over one connection, heartbeats, stats per method, garbage input."""

from __future__ import annotations

import socket
import struct
from collections import Counter

import pytest

import harness
import rpc_peers
from rpc_peers import NodeServer, node_calls

pytestmark = pytest.mark.skipif(rpc_peers.node_available() is not None,
                                reason=str(rpc_peers.node_available()))

GREETER = "com.mesh.test.Greeter"


@pytest.fixture(scope="module")
def servers():
    a = NodeServer("bolt", "a").start()
    b = NodeServer("bolt", "b").start()
    yield {"a": a, "b": b}
    a.stop()
    b.stop()


@pytest.fixture(scope="module", params=harness.kind_params(("mesh",)))
def mesh(request, module_start_proxy, servers):
    routes = [
        {"match": {"service": {"exact": GREETER}, "method": {"exact": "sleep"}},
         "route": {"cluster": "a", "timeout": "0.5s"}},
        {"match": {"service": {"exact": GREETER}, "method": {"exact": "whoami"},
                   "headers": [{"name": ":version", "exact_match": "1.0.0"}]},
         "route": {"cluster": "b"}},
        {"match": {"service": {"exact": GREETER}}, "route": {"cluster": "a"}},
    ]
    listeners = [
        rpc_peers.generic_listener("bolt", "bolt", {"route_config": {"routes": routes}}),
        rpc_peers.generic_listener("split", "bolt", {"route_config": {"routes": [
            {"match": {}, "route": {"weighted_clusters": {"clusters": [
                {"name": "a", "weight": 80}, {"name": "b", "weight": 20}]}}}]}}),
    ]
    clusters = [harness.static_cluster(n, s.port) for n, s in servers.items()]
    return module_start_proxy(request.param, harness.bootstrap(listeners, clusters))


def test_calls_reach_the_routed_server(mesh):
    res = node_calls("bolt", mesh.port("bolt"), [
        {"method": "plus", "args": [20, 22]},
        {"method": "echo", "args": ["héllo " * 2000]},
        {"method": "whoami"},  # method + version route
    ])
    assert res == [{"ok": 42}, {"ok": "héllo " * 2000}, {"ok": "b"}]


def test_application_errors_pass_through(mesh):
    res = node_calls("bolt", mesh.port("bolt"), [{"method": "fail", "args": ["boom"]}])
    assert "boom" in res[0]["error"], res


def test_no_route_error_names_the_service(mesh):
    res = node_calls("bolt", mesh.port("bolt"), [
        {"interface": "com.mesh.test.Other", "method": "whoami"},
        {"method": "plus", "args": [1, 2]},
    ])
    assert "no route" in res[0]["error"] and "com.mesh.test.Other" in res[0]["error"], res
    assert res[1] == {"ok": 3}


def test_route_timeout(mesh):
    res = node_calls("bolt", mesh.port("bolt"), [
        {"method": "sleep", "args": [3000], "timeout": 10000},
        {"method": "plus", "args": [1, 2]},
    ], concurrency=2)
    assert "timeout" in res[0]["error"], res
    assert res[1] == {"ok": 3}


def test_weighted_split_80_20(mesh):
    res = node_calls("bolt", mesh.port("split"), [{"method": "whoami"}] * 300, concurrency=8)
    seen = Counter(r.get("ok") for r in res)
    assert set(seen) == {"a", "b"}, res[:3]
    assert 0.68 < seen["a"] / 300 < 0.92, seen


def test_many_in_flight_on_one_connection(mesh):
    calls = [{"method": "plus", "args": [i, i]} for i in range(1, 301)]
    res = node_calls("bolt", mesh.port("bolt"), calls, concurrency=64)
    assert [r.get("ok") for r in res] == [2 * i for i in range(1, 301)], res[:5]


def test_stats_per_method(mesh):
    node_calls("bolt", mesh.port("bolt"), [{"method": "plus", "args": [1, 2]}] * 3)
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "mesh_rpc_method_request_total", mesh_rpc_prefix="bolt",
                                    service=GREETER, method="plus") >= 3
    assert harness.prometheus_value(text, "mesh_rpc_local_reply", mesh_rpc_prefix="bolt",
                                    flag="NR") is not None


def test_heartbeat_is_answered(mesh):
    # Bolt v1 heartbeat: request, cmdcode 0, id 5, Hessian2, timeout 0, no class/header/content.
    hb = bytes([1, 1, 0, 0, 1]) + struct.pack(">I", 5) + bytes([1]) + struct.pack(">IHHI", 0, 0, 0, 0)
    with socket.create_connection(("127.0.0.1", mesh.port("bolt")), timeout=5) as s:
        s.sendall(hb)
        got = b""
        while len(got) < 20:
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
    assert got[:4] == bytes([1, 0, 0, 0]), got  # response, heartbeat
    assert struct.unpack(">I", got[5:9])[0] == 5


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    bytes([1, 1, 0, 1, 1, 0, 0, 0, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
    bytes([1, 7, 0, 1, 1, 0, 0, 0, 9, 1]),  # unknown command type
    bytes([1, 1, 0, 1, 1, 0, 0, 0, 9, 1, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0]) + b"\x00\x00\x00\x09ab",
])
def test_garbage_closes_only_that_connection(mesh, garbage):
    port = mesh.port("bolt")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    assert node_calls("bolt", port, [{"method": "plus", "args": [2, 2]}]) == [{"ok": 4}]
    assert mesh.alive()


@pytest.fixture(scope="module", params=harness.kind_params(("mesh",)))
def auto_mesh(request, module_start_proxy, servers):
    dubbo_a = NodeServer("dubbo", "dubbo-a").start()
    thrift_a = rpc_peers.ThriftServer("thrift-a").start()
    routes = [
        {"match": {"headers": [{"name": ":scheme", "exact_match": proto}]}, "route": {"cluster": proto}}
        for proto in ("dubbo", "bolt", "thrift")
    ]
    listeners = [rpc_peers.generic_listener("auto", "auto", {"route_config": {"routes": routes}})]
    clusters = [harness.static_cluster("bolt", servers["a"].port),
                harness.static_cluster("dubbo", dubbo_a.port),
                harness.static_cluster("thrift", thrift_a.port)]
    yield module_start_proxy(request.param, harness.bootstrap(listeners, clusters))
    dubbo_a.stop()
    thrift_a.stop()


def test_auto_codec_tells_protocols_apart_on_one_listener(auto_mesh):
    port = auto_mesh.port("auto")
    assert node_calls("bolt", port, [{"method": "whoami"}]) == [{"ok": "a"}]
    assert node_calls("dubbo", port, [{"method": "whoami"}]) == [{"ok": "dubbo-a"}]
    assert rpc_peers.dubbo_call(port, GREETER, "whoami") == "dubbo-a"
    assert rpc_peers.thrift_call(port, "whoami") == "thrift-a"
