"""Dubbo through the proxy: the Python Dubbo client (dubbo-ssl-python) and
the Node sofa-rpc-node client against sofa-rpc-node + dubbo-remoting
servers, under Envoy's dubbo_proxy and mesh on the same YAML (routing by
interface, method and attachment, weighted split, SERVICE_NOT_FOUND for no
route), then mesh-only: timeouts, many requests in flight on one
connection, stats per method, garbage input."""

from __future__ import annotations

import socket
import struct
from collections import Counter

import pytest

import harness
import rpc_peers
from rpc_peers import NodeServer, dubbo_call, node_calls

pytestmark = pytest.mark.skipif(rpc_peers.node_available() is not None,
                                reason=str(rpc_peers.node_available()))

GREETER = "com.mesh.test.Greeter"


@pytest.fixture(scope="module")
def servers():
    a = NodeServer("dubbo", "a").start()
    b = NodeServer("dubbo", "b").start()
    yield {"a": a, "b": b}
    a.stop()
    b.stop()


def dubbo_routes():
    return {"route_config": [{
        "name": "greeter",
        "interface": GREETER,
        "routes": [
            {"match": {"method": {"name": {"exact": "whoami"}},
                       "headers": [{"name": "x-canary", "exact_match": "1"}]},
             "route": {"cluster": "b"}},
            {"match": {"method": {"name": {"prefix": "who"}}}, "route": {"cluster": "a"}},
            {"match": {"method": {"name": {"exact": "plus"}}}, "route": {"cluster": "a"}},
            {"match": {"method": {"name": {"exact": "echo"}}}, "route": {"cluster": "a"}},
        ],
    }]}


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy, servers):
    listeners = [
        rpc_peers.dubbo_listener("dubbo", dubbo_routes()),
        rpc_peers.dubbo_listener("split", {"route_config": [{
            "name": "split", "interface": GREETER,
            "routes": [{"match": {"method": {"name": {"exact": "whoami"}}},
                        "route": {"weighted_clusters": {"clusters": [
                            {"name": "a", "weight": 80}, {"name": "b", "weight": 20}]}}}]}]}),
    ]
    clusters = [harness.static_cluster(n, s.port) for n, s in servers.items()]
    return module_start_proxy(request.param, harness.bootstrap(listeners, clusters))


def test_python_client_calls_reach_the_server(proxy):
    port = proxy.port("dubbo")
    assert dubbo_call(port, GREETER, "plus", [20, 22]) == 42
    assert dubbo_call(port, GREETER, "echo", ["héllo " * 1000]) == "héllo " * 1000
    assert dubbo_call(port, GREETER, "whoami") == "a"


def test_attachment_header_routes_to_canary(proxy):
    port = proxy.port("dubbo")
    assert dubbo_call(port, GREETER, "whoami", attachments={"x-canary": "1"}) == "b"
    assert dubbo_call(port, GREETER, "whoami", attachments={"x-canary": "0"}) == "a"


def raw_request(rid: int, service: str, method: str) -> bytes:
    """A Dubbo request with no arguments, built byte by byte."""
    def s(v: str) -> bytes:
        b = v.encode()
        assert len(b) < 32
        return bytes([len(b)]) + b

    body = s("2.0.2") + s(service) + s("1.0.0") + s(method) + s("") + b"H" + s("path") + s(service) + b"Z"
    return b"\xda\xbb\xc2\x00" + struct.pack(">q", rid) + struct.pack(">i", len(body)) + body


def read_response(sock) -> tuple[int, int, bytes]:
    head = b""
    while len(head) < 16:
        chunk = sock.recv(16 - len(head))
        assert chunk, head
        head += chunk
    n = struct.unpack(">i", head[12:16])[0]
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        assert chunk
        body += chunk
    return head[3], struct.unpack(">q", head[4:12])[0], body


def test_no_route_is_a_service_not_found_response(proxy):
    from dubbo_ssl.common.exceptions import DubboResponseException

    with pytest.raises(DubboResponseException):
        dubbo_call(proxy.port("dubbo"), "com.mesh.test.Other", "whoami")
    with pytest.raises(DubboResponseException):
        dubbo_call(proxy.port("dubbo"), GREETER, "fail", ["x"])  # method not routed
    # On the wire: status 60 SERVICE_NOT_FOUND for the request's id.
    with socket.create_connection(("127.0.0.1", proxy.port("dubbo")), timeout=5) as sock:
        sock.sendall(raw_request(99, "com.mesh.test.Other", "whoami"))
        status, rid, _ = read_response(sock)
    assert (status, rid) == (60, 99)


def test_weighted_split_80_20(proxy):
    res = node_calls("dubbo", proxy.port("split"), [{"method": "whoami"}] * 300, concurrency=8)
    seen = Counter(r.get("ok") for r in res)
    assert set(seen) == {"a", "b"}, res[:3]
    assert 0.68 < seen["a"] / 300 < 0.92, seen


def test_node_client_many_in_flight_on_one_connection(proxy):
    # (sofa-rpc-node's Dubbo server drops the connection on a 0 argument.)
    calls = [{"method": "plus", "args": [i, i]} for i in range(1, 201)]
    res = node_calls("dubbo", proxy.port("dubbo"), calls, concurrency=50)
    assert [r.get("ok") for r in res] == [2 * i for i in range(1, 201)], res[:5]


# ---------------------------------------------------------------- mesh only

MESH = harness.kind_params(("mesh",))


@pytest.fixture(scope="module", params=MESH)
def mesh(request, module_start_proxy, servers):
    listeners = [
        rpc_peers.generic_listener("timed", "dubbo", {"route_config": {"routes": [
            {"match": {"method": {"exact": "sleep"}}, "route": {"cluster": "a", "timeout": "0.5s"}},
            {"match": {"service": {"exact": GREETER}}, "route": {"cluster": "a"}},
        ]}}),
        rpc_peers.dubbo_listener("dubbo", dubbo_routes()),
    ]
    clusters = [harness.static_cluster(n, s.port) for n, s in servers.items()]
    return module_start_proxy(request.param, harness.bootstrap(listeners, clusters))


def test_route_timeout_is_a_server_timeout_response(mesh):
    res = node_calls("dubbo", mesh.port("timed"), [
        {"method": "sleep", "args": [3000], "timeout": 10000},
        {"method": "plus", "args": [1, 2]},
    ], concurrency=2)
    assert "timeout" in res[0].get("error", "").lower(), res
    assert res[1] == {"ok": 3}
    text = mesh.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "mesh_rpc_local_reply", mesh_rpc_prefix="timed",
                                    flag="UT") >= 1


def test_stats_per_method(mesh):
    for i in range(3):
        assert dubbo_call(mesh.port("dubbo"), GREETER, "plus", [i, 1]) == i + 1
    text = mesh.admin_text("/stats/prometheus")
    v = harness.prometheus_value(text, "mesh_rpc_method_request_total", mesh_rpc_prefix="dubbo",
                                 service=GREETER, method="plus")
    assert v is not None and v >= 3, text
    assert harness.prometheus_value(text, "mesh_rpc_method_response_success",
                                    mesh_rpc_prefix="dubbo", service=GREETER, method="plus") >= 3


def test_heartbeat_is_answered_by_the_proxy(mesh):
    # A Dubbo heartbeat: event request, Hessian2, null body.
    hb = b"\xda\xbb\xe2\x00" + struct.pack(">q", 7) + struct.pack(">i", 1) + b"N"
    with socket.create_connection(("127.0.0.1", mesh.port("dubbo")), timeout=5) as s:
        s.sendall(hb)
        got = b""
        while len(got) < 17:
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
    assert got[:4] == b"\xda\xbb\x22\x14", got  # event response, status OK
    assert struct.unpack(">q", got[4:12])[0] == 7


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\xda\xbb\xc2\x00" + b"\x00" * 7 + b"\x01" + b"\x7f\xff\xff\xff",  # lying body length
    b"\xda\xbb\xc6\x00" + b"\x00" * 7 + b"\x02" + b"\x00\x00\x00\x01N",  # unknown serialization
    b"\xda\xbb\xc2\x00" + b"\x00" * 7 + b"\x03" + b"\x00\x00\x00\x03\x05ab",  # truncated body
])
def test_garbage_closes_only_that_connection(mesh, garbage):
    port = mesh.port("dubbo")
    assert dubbo_call(port, GREETER, "plus", [1, 1]) == 2
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    if garbage[3:4] == b"\x00" and garbage[2] & 0x40 and garbage[2] & 0x1f == 2 and len(garbage) == 16:
        assert got[:2] == b"\xda\xbb" and got[3] == 40, got  # BAD_REQUEST before the close
    assert dubbo_call(port, GREETER, "plus", [2, 2]) == 4
    assert mesh.alive()
