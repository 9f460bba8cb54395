"""RPC proxies over TLS and mTLS, as Istio sidecars carry Dubbo, Thrift and
SOFA Bolt between them.

The topology of every case: a real client -> proxy A (plain text
downstream, an RPC cluster whose `UpstreamTlsContext` presents the client
workload's certificate) -> proxy B (a filter chain matched on
`transport_protocol: tls` with a `DownstreamTlsContext` requiring a client
certificate, a network RBAC allowing only the client's SPIFFE ID, then the
RPC proxy) -> a real server. The same YAML runs under Envoy and mesh, in
the four combinations on each side for Thrift and Dubbo (Envoy has no
Bolt: mesh to mesh). B seeing the client certificate is shown by its RBAC:
a client workload with another identity is refused.

Then mesh alone: `transport_socket_matches` on an RPC cluster (an endpoint
labelled `tlsMode: istio` gets mTLS, the other plain text, seen by which
server answers), and bad input: plain text and a client without a
certificate on an mTLS RPC chain, an upstream whose certificate the
cluster does not trust, has expired or lacks the expected SAN; each is
refused and counted while other connections are served. mesh's RPC access
log names the client's SPIFFE ID.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

import harness
import rpc_peers
import tls_certs
from rpc_peers import NodeServer, ThriftClient, ThriftServer, dubbo_call, node_calls
from test_access_log_format import file_log, read_lines

DOWN_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UP_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
    },
}
SERVER_ID = "spiffe://cluster.local/ns/default/sa/rpc-server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/rpc-client"
OTHER_ID = "spiffe://cluster.local/ns/default/sa/intruder"
GREETER = "com.mesh.test.Greeter"

PAIRS = [pytest.param(a, b, id=f"{a}-to-{b}") for a in ("mesh", "envoy")
         for b in ("mesh", "envoy")]
MESH_PAIR = [pytest.param("mesh", "mesh", id="mesh-to-mesh")]


# --------------------------------------------------------------------------
# config builders


def _certificate(leaf: tls_certs.Leaf) -> dict:
    return {"certificate_chain": {"filename": str(leaf.cert)},
            "private_key": {"filename": str(leaf.key)}}


def down_tls(pki: tls_certs.Pki, leaf: tls_certs.Leaf) -> dict:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": DOWN_TLS,
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [_certificate(leaf)],
            "validation_context": {"trusted_ca": {"filename": str(pki.ca.cert)}},
        },
    }}


def up_tls(ca: tls_certs.Pki, leaf: tls_certs.Leaf | None, sni: str = "server.local",
           san: str = SERVER_ID) -> dict:
    common = {"validation_context": {
        "trusted_ca": {"filename": str(ca.ca.cert)},
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": san}}],
    }}
    if leaf:
        common["tls_certificates"] = [_certificate(leaf)]
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": UP_TLS, "sni": sni, "common_tls_context": common}}


def rbac_only(principal: str) -> dict:
    return {"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": RBAC_TYPE, "stat_prefix": "rpc_rbac",
        "rules": {"action": "ALLOW", "policies": {"workload": {
            "permissions": [{"any": True}],
            "principals": [{"authenticated": {"principal_name": {"exact": principal}}}],
        }}},
    }}


def mtls_inbound(listener: dict, pki, server_leaf) -> dict:
    """`listener` (one RPC chain) as an Istio inbound listener: the TLS
    inspector, the chain matched on `transport_protocol: tls`, mTLS, and
    network RBAC before the RPC proxy."""
    chain = listener["filter_chains"][0]
    chain["filter_chain_match"] = {"transport_protocol": "tls"}
    chain["transport_socket"] = down_tls(pki, server_leaf)
    chain["filters"].insert(0, rbac_only(CLIENT_ID))
    listener["listener_filters"] = [INSPECTOR]
    return listener


def tls_cluster(name: str, port: int, transport_socket: dict) -> dict:
    c = harness.static_cluster(name, port)
    c["transport_socket"] = transport_socket
    return c


def stat(proxy: harness.Proxy, name: str, **labels) -> float:
    total = 0.0
    for n, ls, v in harness.prometheus_samples(proxy.admin_text("/stats/prometheus")):
        if n == name and all(ls.get(k) == v2 for k, v2 in labels.items()):
            total += v
    return total


def skip_without_mesh(*kinds: str):
    if "mesh" in kinds and harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tls_certs.Pki:
    return tls_certs.Pki(tmp_path_factory.mktemp("rpc-pki"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> tls_certs.Pki:
    return tls_certs.Pki(tmp_path_factory.mktemp("rpc-foreign"), name="another CA")


@pytest.fixture(scope="module")
def server_leaf(pki):
    return pki.leaf("rpc-server", dns=["server.local"], uris=[SERVER_ID])


@pytest.fixture(scope="module")
def client_leaf(pki):
    return pki.leaf("rpc-client", uris=[CLIENT_ID])


@pytest.fixture(scope="module")
def other_leaf(pki):
    return pki.leaf("intruder", uris=[OTHER_ID])


@pytest.fixture(scope="module")
def thrift_server():
    s = ThriftServer("tls-backend").start()
    yield s
    s.stop()


def thrift_routes() -> dict:
    return {"route_config": {"name": "calc", "routes": [
        {"match": {"method_name": ""}, "route": {"cluster": "next"}}]}}


def sidecars(start_proxy, a_kind, b_kind, b_listener, a_listener, backend_port, pki,
             server_leaf, client_leaf, other_leaf):
    """Proxy B (mTLS inbound) in front of `backend_port`, and proxy A whose
    listener `out` reaches B with the client certificate and `intruder`
    with another workload's."""
    b = start_proxy(b_kind, harness.bootstrap(
        [mtls_inbound(b_listener, pki, server_leaf)],
        [harness.static_cluster("next", backend_port)]))
    bport = b.port("in")
    a = start_proxy(a_kind, harness.bootstrap(
        [a_listener("out", "next"), a_listener("intruder", "intruder")],
        [tls_cluster("next", bport, up_tls(pki, client_leaf)),
         tls_cluster("intruder", bport, up_tls(pki, other_leaf))]))
    return a, b


def thrift_out(name: str, cluster: str) -> dict:
    return rpc_peers.thrift_listener(name, {"route_config": {"name": name, "routes": [
        {"match": {"method_name": ""}, "route": {"cluster": cluster}}]}})


def dubbo_routes(cluster: str) -> dict:
    return {"route_config": [{"name": "greeter", "interface": GREETER, "routes": [
        {"match": {"method": {"name": {"exact": m}}}, "route": {"cluster": cluster}}
        for m in ("whoami", "plus", "echo")]}]}


def dubbo_out(name: str, cluster: str) -> dict:
    return rpc_peers.dubbo_listener(name, dubbo_routes(cluster))


def bolt_out(name: str, cluster: str) -> dict:
    return rpc_peers.generic_listener(name, "bolt", {"route_config": {"routes": [
        {"match": {}, "route": {"cluster": cluster}}]}})


# --------------------------------------------------------------------------
# sidecar to sidecar


@pytest.mark.parametrize("a_kind,b_kind", PAIRS)
def test_thrift_over_mtls_between_sidecars(start_proxy, a_kind, b_kind, pki, server_leaf,
                                           client_leaf, other_leaf, thrift_server):
    skip_without_mesh(a_kind, b_kind)
    a, b = sidecars(start_proxy, a_kind, b_kind,
                    rpc_peers.thrift_listener("in", thrift_routes()), thrift_out,
                    thrift_server.port, pki, server_leaf, client_leaf, other_leaf)
    with ThriftClient(a.port("out")) as c:
        assert c.add(40, 2) == 42
        assert c.whoami() == "tls-backend"
        assert c.echo("x" * 200_000) == "x" * 200_000
        for i in range(30):
            assert c.add(i, i) == 2 * i
    assert stat(b, "envoy_listener_ssl_handshake") >= 1
    assert stat(a, "envoy_cluster_ssl_handshake", envoy_cluster_name="next") >= 1
    # B's RBAC reads the client certificate: another workload is refused.
    before = thrift_server.calls
    with pytest.raises(Exception):
        with ThriftClient(a.port("intruder"), timeout=5) as c:
            c.whoami()
    assert thrift_server.calls == before


@pytest.fixture(scope="module")
def dubbo_server():
    if rpc_peers.node_available():
        pytest.skip(rpc_peers.node_available())
    s = NodeServer("dubbo", "dubbo-tls").start()
    yield s
    s.stop()


@pytest.mark.parametrize("a_kind,b_kind", PAIRS)
def test_dubbo_over_mtls_between_sidecars(start_proxy, a_kind, b_kind, pki, server_leaf,
                                          client_leaf, other_leaf, dubbo_server):
    skip_without_mesh(a_kind, b_kind)
    a, b = sidecars(start_proxy, a_kind, b_kind,
                    rpc_peers.dubbo_listener("in", dubbo_routes("next")), dubbo_out,
                    dubbo_server.port, pki, server_leaf, client_leaf, other_leaf)
    port = a.port("out")
    assert dubbo_call(port, GREETER, "plus", [20, 22]) == 42
    assert dubbo_call(port, GREETER, "whoami") == "dubbo-tls"
    assert dubbo_call(port, GREETER, "echo", ["héllo " * 2000]) == "héllo " * 2000
    # Many calls in flight over the one multiplexed TLS connection.
    out = node_calls("dubbo", port, [{"method": "plus", "args": [i, 1]} for i in range(100)],
                     concurrency=20)
    assert out == [{"ok": i + 1} for i in range(100)], out[:5]
    assert stat(b, "envoy_listener_ssl_handshake") >= 1
    with pytest.raises(Exception):
        dubbo_call(a.port("intruder"), GREETER, "whoami", timeout=5)


@pytest.fixture(scope="module")
def bolt_server():
    if rpc_peers.node_available():
        pytest.skip(rpc_peers.node_available())
    s = NodeServer("bolt", "bolt-tls").start()
    yield s
    s.stop()


@pytest.mark.parametrize("a_kind,b_kind", MESH_PAIR)
def test_bolt_over_mtls_between_sidecars(start_proxy, a_kind, b_kind, pki, server_leaf,
                                         client_leaf, other_leaf, bolt_server):
    skip_without_mesh(a_kind, b_kind)
    a, b = sidecars(start_proxy, a_kind, b_kind,
                    rpc_peers.generic_listener("in", "bolt", {"route_config": {"routes": [
                        {"match": {}, "route": {"cluster": "next"}}]}}),
                    bolt_out, bolt_server.port, pki, server_leaf, client_leaf, other_leaf)
    calls = [{"method": "whoami"}] + [{"method": "plus", "args": [i, 2]} for i in range(200)]
    out = node_calls("bolt", a.port("out"), calls, concurrency=50)
    assert out[0] == {"ok": "bolt-tls"}, out[0]
    assert out[1:] == [{"ok": i + 2} for i in range(200)], out[1:4]
    assert stat(b, "envoy_listener_ssl_handshake") >= 1
    denied = node_calls("bolt", a.port("intruder"), [{"method": "whoami", "timeout": 3000}])
    assert "error" in denied[0], denied


# --------------------------------------------------------------------------
# transport_socket_matches on an RPC cluster


def test_transport_socket_matches_pick_tls_per_endpoint(start_proxy, pki, server_leaf,
                                                        client_leaf):
    """Istio's auto-mTLS on a Thrift cluster: the endpoint labelled
    `tlsMode: istio` is an mTLS-only sidecar (a plain-text connection to it
    fails), the other a plain Thrift server (a TLS handshake to it fails),
    so both answering shows each got its own transport."""
    skip_without_mesh("mesh")
    tls_backend = ThriftServer("behind-sidecar").start()
    plain_backend = ThriftServer("plain").start()
    try:
        b = start_proxy("mesh", harness.bootstrap(
            [mtls_inbound(rpc_peers.thrift_listener("in", thrift_routes()), pki, server_leaf)],
            [harness.static_cluster("next", tls_backend.port)]))
        mixed = harness.static_cluster("mixed", [])
        mixed["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": harness.socket_address(b.port("in"))},
             "metadata": {"filter_metadata": {"envoy.transport_socket_match": {
                 "tlsMode": "istio"}}}},
            {"endpoint": {"address": harness.socket_address(plain_backend.port)}},
        ]}]
        mixed["transport_socket_matches"] = [
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
             "transport_socket": up_tls(pki, client_leaf)},
            {"name": "tlsMode-disabled", "match": {}, "transport_socket": {
                "name": "envoy.transport_sockets.raw_buffer", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}},
        ]
        a = start_proxy("mesh", harness.bootstrap([thrift_out("out", "mixed")], [mixed]))
        seen = set()
        for _ in range(20):
            with ThriftClient(a.port("out")) as c:
                seen.add(c.whoami())
        assert seen == {"behind-sidecar", "plain"}, seen
        assert stat(a, "mesh_cluster_transport_socket_match_cx_total",
                    transport_socket_match="tlsMode-istio") >= 1
        assert stat(a, "mesh_cluster_transport_socket_match_cx_total",
                    transport_socket_match="tlsMode-disabled") >= 1
        assert stat(a, "envoy_cluster_upstream_cx_connect_fail", envoy_cluster_name="mixed") == 0
    finally:
        tls_backend.stop()
        plain_backend.stop()


# --------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def peer_log(tmp_path_factory):
    return tmp_path_factory.mktemp("rpc-tls-log") / "peer.log"


@pytest.fixture(scope="module")
def strict(module_start_proxy, pki, server_leaf, thrift_server, peer_log):
    """mesh as the mTLS inbound sidecar, its Thrift access log naming the
    client's SPIFFE ID."""
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    routes = thrift_routes()
    routes["access_log"] = [file_log(peer_log, {
        "text_format": "%REQ(:METHOD)% %DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_TLS_VERSION%\n"})]
    return module_start_proxy("mesh", harness.bootstrap(
        [mtls_inbound(rpc_peers.thrift_listener("in", routes), pki, server_leaf)],
        [harness.static_cluster("next", thrift_server.port)]))


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


def mtls_thrift_call(port: int, ctx: ssl.SSLContext) -> int:
    """One framed binary `add(1, 2)` over TLS with `ctx`; the result."""
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TSocket, TTransport

    Calc, _ = rpc_peers.thrift_stubs()

    class TlsSocket(TSocket.TSocket):
        def open(self):
            super().open()
            self.handle = ctx.wrap_socket(self.handle, server_hostname="server.local")

    sock = TlsSocket("127.0.0.1", port)
    sock.setTimeout(10_000)
    t = TTransport.TFramedTransport(sock)
    t.open()
    try:
        return Calc.Client(TBinaryProtocol.TBinaryProtocol(t)).add(1, 2)
    finally:
        t.close()


def client_ctx(pki, leaf=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    if leaf:
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    return ctx


def test_python_tls_client_with_certificate_is_served(strict, pki, client_leaf, peer_log):
    assert mtls_thrift_call(strict.port("in"), client_ctx(pki, client_leaf)) == 3
    lines = read_lines(peer_log, 1)
    assert any(l.startswith(f"add {CLIENT_ID} TLSv1.") for l in lines), lines


def test_plain_text_on_an_mtls_rpc_chain_is_closed(strict, pki, client_leaf):
    port = strict.port("in")
    before = stat(strict, "envoy_listener_ssl_connection_error") + stat(
        strict, "envoy_listener_no_filter_chain_match")
    with socket.create_connection(("127.0.0.1", port)) as s:
        # A framed binary Thrift call in plain text: no chain takes it.
        s.sendall(bytes.fromhex("0000001180010001000000036164640000000100"))
        assert closed_within(s, 10), "a plain-text Thrift call was not closed"
    assert stat(strict, "envoy_listener_ssl_connection_error") + stat(
        strict, "envoy_listener_no_filter_chain_match") > before
    assert mtls_thrift_call(port, client_ctx(pki, client_leaf)) == 3


def test_client_without_certificate_is_refused(strict, pki, client_leaf, thrift_server):
    port = strict.port("in")
    before = stat(strict, "envoy_listener_ssl_fail_verify_no_cert")
    calls = thrift_server.calls
    with pytest.raises(Exception):
        mtls_thrift_call(port, client_ctx(pki))
    deadline = time.time() + 5
    while stat(strict, "envoy_listener_ssl_fail_verify_no_cert") <= before and time.time() < deadline:
        time.sleep(0.1)
    assert stat(strict, "envoy_listener_ssl_fail_verify_no_cert") > before
    assert thrift_server.calls == calls
    assert mtls_thrift_call(port, client_ctx(pki, client_leaf)) == 3


def test_client_of_another_workload_is_denied_by_rbac(strict, pki, other_leaf, client_leaf):
    port = strict.port("in")
    with pytest.raises(Exception):
        mtls_thrift_call(port, client_ctx(pki, other_leaf))
    assert mtls_thrift_call(port, client_ctx(pki, client_leaf)) == 3


def test_untrusted_or_expired_upstream_certificate_is_a_connect_failure(
        start_proxy, strict, pki, foreign, client_leaf, server_leaf, thrift_server):
    """A cluster that trusts another CA, one whose SNI/SAN does not match,
    and a sidecar serving an expired certificate: each call gets a
    TApplicationException, counted as a connect failure and a cluster TLS
    error; the good cluster on the same proxy keeps answering."""
    from thrift.Thrift import TApplicationException

    expired_leaf = pki.leaf("expired-server", dns=["server.local"], uris=[SERVER_ID],
                            expired=True)
    expired = ExpiredTlsServer(expired_leaf)
    sport = strict.port("in")
    try:
        a = start_proxy("mesh", harness.bootstrap(
            [thrift_out("good", "good"), thrift_out("untrusted", "untrusted"),
             thrift_out("expired", "expired"), thrift_out("wrong_sni", "wrong_sni")],
            [tls_cluster("good", sport, up_tls(pki, client_leaf)),
             tls_cluster("untrusted", sport, up_tls(foreign, client_leaf)),
             tls_cluster("expired", expired.port, up_tls(pki, client_leaf)),
             tls_cluster("wrong_sni", sport, up_tls(pki, client_leaf, sni="other.local",
                                                    san=OTHER_ID))]))
        for name in ("untrusted", "expired", "wrong_sni"):
            with ThriftClient(a.port(name)) as c:
                with pytest.raises(TApplicationException):
                    c.add(1, 1)
                # The downstream connection stays usable.
                with pytest.raises(TApplicationException):
                    c.add(1, 1)
            assert stat(a, "envoy_cluster_upstream_cx_connect_fail",
                        envoy_cluster_name=name) >= 2, name
            assert stat(a, "envoy_cluster_ssl_fail_verify_error", envoy_cluster_name=name) + stat(
                a, "envoy_cluster_ssl_fail_verify_san", envoy_cluster_name=name) + stat(
                a, "envoy_cluster_ssl_connection_error", envoy_cluster_name=name) >= 1, name
        with ThriftClient(a.port("good")) as c:
            assert c.add(2, 2) == 4
    finally:
        expired.stop()


class ExpiredTlsServer:
    """Accepts TLS with an expired certificate (a peer mesh must refuse)."""

    def __init__(self, leaf: tls_certs.Leaf):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                with self.ctx.wrap_socket(conn, server_side=True) as t:
                    t.recv(1)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def stop(self):
        self.sock.close()
