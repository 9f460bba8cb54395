"""Protocol sniffing on one listener port: the listener filters tell the
protocol of each connection from its first bytes, and
`filter_chain_match` sends it to the right chain.

- Under Envoy and mesh on the same YAML (`tls_inspector` +
  `http_inspector`): a TLS client goes to a `tcp_proxy` to a TLS echo
  server (bytes passed through, the handshake is the server's), curl HTTP/1.1
  and HTTP/2 prior knowledge (`http/1.1`, `h2c`) go to the HTTP connection
  manager, anything else to the default chain's `tcp_proxy` to a TCP echo
  server; Envoy's `http_inspector.*` stats count the same on both. A
  server-first protocol (the client sends nothing) reaches its upstream
  after `listener_filters_timeout` with `continue_on_listener_filters_timeout`,
  and is closed without it.
- mesh only (`mesh.filters.listener.protocol_inspector`): the same port also
  sends Dubbo (Python dubbo client), Thrift (Apache Thrift client, framed
  binary) and SOFA Bolt (sofa-rpc-node client) to `dubbo_proxy`,
  `thrift_proxy` and `rpc_proxy` chains; its stats; a client that closes
  before its protocol is known, and garbage bytes, never hurt other
  connections.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import pytest

import harness
import rpc_peers
import tls_certs
from rpc_peers import NodeServer, ThriftServer, dubbo_call, node_calls

GREETER = "com.mesh.test.Greeter"
HTTP_INSPECTOR = {
    "name": "envoy.filters.listener.http_inspector",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener."
                              "http_inspector.v3.HttpInspector"},
}
TLS_INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener."
                              "tls_inspector.v3.TlsInspector"},
}
PROTOCOL_INSPECTOR = {
    "name": "mesh.filters.listener.protocol_inspector",
    "typed_config": {"@type": "type.googleapis.com/mesh.filters.listener."
                              "protocol_inspector.v1.ProtocolInspector"},
}
HTTP_PROTOCOLS = ["http/1.0", "http/1.1", "h2c"]


# --------------------------------------------------------------------------
# peers


class TlsEcho(harness.TcpEcho):
    """A TLS server (Python ssl) that echoes what it reads."""

    def __init__(self, leaf: tls_certs.Leaf):
        super().__init__()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(leaf.cert), str(leaf.key))

    def finish_request(self, request, client_address):
        try:
            request = self.ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        super().finish_request(request, client_address)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tls_certs.Pki(tmp_path_factory.mktemp("sniff-pki"))


@pytest.fixture(scope="module")
def tls_echo(pki):
    s = TlsEcho(pki.leaf("tls-echo", dns=["tls.test"])).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def banner():
    s = harness.BannerServer(b"220 hello\r\n")
    yield s
    s.close()


# --------------------------------------------------------------------------
# configuration


def chain(filter_name: str, typed_config: dict, match: dict | None = None) -> dict:
    c = {"filters": [{"name": filter_name, "typed_config": typed_config}]}
    if match is not None:
        c["filter_chain_match"] = match
    return c


def tcp_chain(cluster: str, match: dict | None = None) -> dict:
    return chain("envoy.filters.network.tcp_proxy",
                 {"@type": harness.TCP_PROXY_TYPE, "stat_prefix": cluster, "cluster": cluster},
                 match)


def http_chain() -> dict:
    route_config = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "web"}}]}]}
    return chain("envoy.filters.network.http_connection_manager",
                 {"@type": harness.HCM_TYPE, "stat_prefix": "sniffed",
                  "route_config": route_config, "http_filters": [harness.ROUTER_FILTER]},
                 {"application_protocols": HTTP_PROTOCOLS})


def listener(name: str, inspectors: list, chains: list, timeout: str | None = None,
             cont: bool | None = None) -> dict:
    l = {"name": name, "address": harness.socket_address(0),
         "listener_filters": inspectors, "filter_chains": chains}
    if timeout is not None:
        l["listener_filters_timeout"] = timeout
    if cont is not None:
        l["continue_on_listener_filters_timeout"] = cont
    return l


def common_listeners() -> list:
    """The listeners Envoy runs too."""
    return [
        listener("sniff", [TLS_INSPECTOR, HTTP_INSPECTOR], [
            tcp_chain("tls_echo", {"transport_protocol": "tls"}),
            http_chain(),
            tcp_chain("echo"),
        ], timeout="1s"),
        listener("first", [TLS_INSPECTOR, HTTP_INSPECTOR], [
            http_chain(), tcp_chain("banner")], timeout="0.3s", cont=True),
        listener("first_closed", [TLS_INSPECTOR, HTTP_INSPECTOR], [
            http_chain(), tcp_chain("banner")], timeout="0.3s"),
    ]


def common_clusters(upstream_a, tcp_echo, tls_echo, banner) -> list:
    return [
        harness.static_cluster("web", upstream_a.port),
        harness.static_cluster("echo", tcp_echo.port),
        harness.static_cluster("tls_echo", tls_echo.port),
        harness.static_cluster("banner", banner.port),
    ]


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy, upstream_a, tcp_echo, tls_echo, banner):
    return module_start_proxy(request.param, harness.bootstrap(
        common_listeners(), common_clusters(upstream_a, tcp_echo, tls_echo, banner)))


# --------------------------------------------------------------------------
# clients


def curl(*args, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
                          capture_output=True, timeout=timeout + 10)


def curl_version(port: int, *flags: str) -> tuple[str, str]:
    """(status, HTTP version) of a GET through the proxy; a 200 must come
    from the upstream. (HTTP/1.0 gets the connection manager's own 426, as
    `accept_http_10` is off: the HTTP chain answered, not the TCP echo.)"""
    r = curl(*flags, "-o", "/dev/null", "-D", "-", "-w", "%{http_code} %{http_version}",
             f"http://127.0.0.1:{port}/x")
    assert r.returncode == 0, r.stderr
    head, _, tail = r.stdout.rpartition(b"\n")
    status, version = tail.decode().split()
    assert status != "200" or b"x-upstream: a" in head.lower(), head
    return status, version


def tls_exchange(port: int, ca, data: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="tls.test") as t:
            t.sendall(data)
            return harness.recv_until(t, lambda out: len(out) >= len(data))


def tcp_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Sends `data` and reads until as many bytes came back or the peer
    closed (b"" when the proxy closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return harness.recv_until(s, lambda out: len(out) >= len(data))


def stat(p, name: str, **labels) -> float:
    return harness.prometheus_value(p.admin_text("/stats/prometheus"), name, **labels) or 0


def listener_stat(p, listener: str, name: str) -> float:
    # Envoy names a listener's scope by its configured address (port 0 for
    # every listener here); mesh by the bound one.
    port = 0 if p.kind == "envoy" else p.port(listener)
    return stat(p, f"envoy_listener_{name}", envoy_listener_address=f"127.0.0.1_{port}")


# --------------------------------------------------------------------------
# Envoy and mesh


def test_http1_and_h2c_reach_the_http_chain(proxy):
    port = proxy.port("sniff")
    assert curl_version(port, "--http1.1") == ("200", "1.1")
    assert curl_version(port, "--http2-prior-knowledge") == ("200", "2")
    assert curl_version(port, "--http1.0")[0] == "426"


def test_tls_passes_through_to_the_tls_server(proxy, pki):
    assert tls_exchange(proxy.port("sniff"), pki.ca.cert, b"over tls") == b"over tls"


def test_other_bytes_take_the_default_tcp_chain(proxy):
    port = proxy.port("sniff")
    for data in [b"hello world\n", bytes(range(256)) * 4, b"\r\nGET / HTTP/1.1\r\n\r\n",
                 b"SSH-2.0-OpenSSH_9.2\r\n"]:
        assert tcp_exchange(port, data) == data


def test_http_inspector_stats(proxy, pki):
    port = proxy.port("sniff")
    before = {n: stat(proxy, f"envoy_http_inspector_{n}")
              for n in ("http10_found", "http11_found", "http2_found", "http_not_found")}
    curl_version(port, "--http1.1")
    curl_version(port, "--http1.1")
    curl_version(port, "--http2-prior-knowledge")
    curl_version(port, "--http1.0")
    tcp_exchange(port, b"not http\n")
    # TLS connections are not inspected for HTTP: no stat moves.
    assert tls_exchange(port, pki.ca.cert, b"x") == b"x"
    want = {"http10_found": 1, "http11_found": 2, "http2_found": 1, "http_not_found": 1}
    harness.wait_until(
        lambda: all(stat(proxy, f"envoy_http_inspector_{n}") - before[n] == v
                    for n, v in want.items()),
        what="http_inspector stats")
    # Envoy's dotted names on /stats.
    assert "\nhttp_inspector.http11_found: " in "\n" + proxy.admin_text("/stats")


def test_server_first_protocol_continues_after_the_timeout(proxy):
    before = listener_stat(proxy, "first", "downstream_pre_cx_timeout")
    start = time.monotonic()
    assert harness.read_line(proxy.port("first")) == b"220 hello\r\n"
    assert time.monotonic() - start >= 0.25
    # One timeout for the listener filters together.
    harness.wait_until(
        lambda: listener_stat(proxy, "first", "downstream_pre_cx_timeout") == before + 1,
        what="downstream_pre_cx_timeout")


def test_server_first_protocol_is_closed_without_continue(proxy):
    before = listener_stat(proxy, "first_closed", "downstream_pre_cx_timeout")
    assert harness.read_line(proxy.port("first_closed")) == b""
    harness.wait_until(
        lambda: listener_stat(proxy, "first_closed", "downstream_pre_cx_timeout") == before + 1,
        what="downstream_pre_cx_timeout")


def test_a_client_closing_mid_request_line_is_closed(proxy):
    port = proxy.port("sniff")
    before = listener_stat(proxy, "sniff", "downstream_listener_filter_remote_close")
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /partial")
        s.shutdown(socket.SHUT_WR)
        assert harness.recv_until(s, lambda out: False) == b""
    # Seen when the client closed, not at listener_filters_timeout (1 s).
    assert time.monotonic() - start < 0.9
    harness.wait_until(
        lambda: listener_stat(proxy, "sniff", "downstream_listener_filter_remote_close")
        == before + 1, what="downstream_listener_filter_remote_close")
    assert curl_version(port, "--http1.1") == ("200", "1.1")


# --------------------------------------------------------------------------
# mesh only: the protocol inspector adds Dubbo, Thrift and SOFA Bolt

needs_node = pytest.mark.skipif(rpc_peers.node_available() is not None,
                                reason=str(rpc_peers.node_available()))


@pytest.fixture(scope="module")
def rpc_servers():
    servers = {"dubbo": NodeServer("dubbo", "dubbo-server"),
               "bolt": NodeServer("bolt", "bolt-server"),
               "thrift": ThriftServer("thrift-server")}
    started = []
    try:
        for s in servers.values():
            started.append(s.start())
        yield servers
    finally:
        for s in started:
            s.stop()


def rpc_chains() -> list:
    return [
        chain("envoy.filters.network.dubbo_proxy",
              {"@type": rpc_peers.DUBBO_PROXY_TYPE, "stat_prefix": "dubbo",
               "route_config": [{"name": "all", "interface": GREETER,
                                 "routes": [{"match": {}, "route": {"cluster": "dubbo"}}]}]},
              {"application_protocols": ["dubbo"]}),
        chain("envoy.filters.network.thrift_proxy",
              {"@type": rpc_peers.THRIFT_PROXY_TYPE, "stat_prefix": "thrift",
               "route_config": {"routes": [
                   {"match": {"method_name": ""}, "route": {"cluster": "thrift"}}]}},
              {"application_protocols": ["thrift"]}),
        chain("mesh.filters.network.rpc_proxy",
              {"@type": rpc_peers.RPC_PROXY_TYPE, "stat_prefix": "bolt", "codec": "bolt",
               "route_config": {"routes": [{"match": {}, "route": {"cluster": "bolt"}}]}},
              {"application_protocols": ["bolt"]}),
    ]


@pytest.fixture(scope="module", params=harness.kind_params(("mesh",)))
def multi(request, module_start_proxy, upstream_a, tcp_echo, tls_echo, banner, rpc_servers):
    listeners = [
        listener("multi", [TLS_INSPECTOR, PROTOCOL_INSPECTOR], [
            tcp_chain("tls_echo", {"transport_protocol": "tls"}),
            http_chain(),
            *rpc_chains(),
            tcp_chain("echo"),
        ], timeout="1s"),
        listener("multi_first", [PROTOCOL_INSPECTOR], [
            http_chain(), *rpc_chains(), tcp_chain("banner")], timeout="0.3s", cont=True),
    ]
    clusters = common_clusters(upstream_a, tcp_echo, tls_echo, banner) + [
        harness.static_cluster(n, s.port) for n, s in rpc_servers.items()]
    return module_start_proxy(request.param, harness.bootstrap(listeners, clusters))


@needs_node
def test_every_protocol_on_one_port(multi, pki):
    port = multi.port("multi")
    assert curl_version(port, "--http1.1") == ("200", "1.1")
    assert curl_version(port, "--http2-prior-knowledge") == ("200", "2")
    assert tls_exchange(port, pki.ca.cert, b"over tls") == b"over tls"
    assert dubbo_call(port, GREETER, "whoami") == "dubbo-server"
    assert dubbo_call(port, GREETER, "plus", [20, 22]) == 42
    assert rpc_peers.thrift_call(port, "whoami") == "thrift-server"
    assert rpc_peers.thrift_call(port, "add", 2, 3) == 5
    assert node_calls("bolt", port, [{"method": "whoami"}, {"method": "plus", "args": [1, 2]}]) \
        == [{"ok": "bolt-server"}, {"ok": 3}]
    assert tcp_exchange(port, b"hello world\n") == b"hello world\n"
    assert multi.alive()


@needs_node
def test_protocol_inspector_stats(multi):
    port = multi.port("multi")
    names = ("http11_found", "http2_found", "dubbo_found", "thrift_found", "bolt_found",
             "not_found")
    before = {n: stat(multi, f"mesh_protocol_inspector_{n}") for n in names}
    curl_version(port, "--http1.1")
    curl_version(port, "--http2-prior-knowledge")
    # The Python Dubbo client keeps its connections between calls: the Node
    # client (a new process) makes sure of a new connection.
    assert node_calls("dubbo", port, [{"method": "whoami"}]) == [{"ok": "dubbo-server"}]
    rpc_peers.thrift_call(port, "whoami")
    node_calls("bolt", port, [{"method": "whoami"}])
    tcp_exchange(port, b"hello world\n")
    harness.wait_until(
        lambda: all(stat(multi, f"mesh_protocol_inspector_{n}") - before[n] >= 1 for n in names),
        what="protocol_inspector stats")
    text = multi.admin_text("/stats")
    assert "mesh.protocol_inspector.dubbo_found: " in text


@needs_node
def test_server_first_protocol_with_the_protocol_inspector(multi):
    assert harness.read_line(multi.port("multi_first")) == b"220 hello\r\n"


@needs_node
def test_bad_first_bytes_never_hurt_other_connections(multi):
    port = multi.port("multi")
    # Garbage that no protocol starts with: the default chain echoes it.
    garbage = bytes([0x00, 0xff, 0x13, 0x37]) * 100
    assert tcp_exchange(port, garbage) == garbage
    # A Dubbo magic byte, then silence: closed at listener_filters_timeout.
    before = listener_stat(multi, "multi", "downstream_pre_cx_timeout")
    start = time.monotonic()
    assert tcp_exchange(port, b"\xda", timeout=5) == b""
    assert 0.8 < time.monotonic() - start < 4
    harness.wait_until(
        lambda: listener_stat(multi, "multi", "downstream_pre_cx_timeout") > before,
        what="pre_cx_timeout")
    # Half a Thrift frame header, then the client closes its side: closed at
    # once (with a reset, as the bytes were never read).
    before = listener_stat(multi, "multi", "downstream_listener_filter_remote_close")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x00\x00\x00")
        s.shutdown(socket.SHUT_WR)
        assert harness.recv_until(s, lambda out: False) == b""
    harness.wait_until(
        lambda: listener_stat(multi, "multi", "downstream_listener_filter_remote_close") > before,
        what="remote close")
    # A request line longer than the inspector reads (64 KiB): closed.
    before = stat(multi, "mesh_protocol_inspector_read_error")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(b"GET /" + b"a" * 70000)
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    harness.wait_until(lambda: stat(multi, "mesh_protocol_inspector_read_error") > before,
                       what="read_error")
    # Meanwhile the listener serves as before.
    assert curl_version(port, "--http1.1") == ("200", "1.1")
    assert dubbo_call(port, GREETER, "whoami") == "dubbo-server"
    assert multi.alive()


def test_example_config_is_valid():
    """examples/configs/sniff.yaml (every protocol on one port) loads."""
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    path = harness.REPO / "examples" / "configs" / "sniff.yaml"
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(path)],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out
