"""RPC proxies over TLS and mTLS, as Istio sidecars carry Dubbo, Thrift and
SOFA Bolt between them.

The topology of every case: a real client -> proxy A (plain text
downstream, an RPC cluster whose `UpstreamTlsContext` presents the client
workload's certificate) -> proxy B (a filter chain matched on
`transport_protocol: tls` and Istio's ALPN `istio-peer-exchange`/`istio`,
which A offers, with a `DownstreamTlsContext` requiring a client
certificate, a network RBAC allowing only the client's SPIFFE ID, then the
RPC proxy) -> a real server. The same YAML runs under Envoy and mesh, in
the four combinations on each side for Thrift and Dubbo (Envoy has no
Bolt: mesh to mesh). B seeing the client certificate is shown by its RBAC:
a client workload with another identity is refused. Under Envoy and mesh
too: the inbound chain over LDS, and bad input on it (plain text, no
client certificate, another workload), each refused and counted while
other connections are served.

Then mesh alone: `transport_socket_matches` on an RPC cluster (an endpoint
labelled `tlsMode: istio` gets mTLS, the other plain text, seen by which
server answers); an upstream whose certificate the cluster does not
trust, has expired or lacks the expected SAN (a connect failure, counted);
the RPC access log naming the client's SPIFFE ID; server and client
certificates rotated from watched SDS files; `upstream_bind_config`.
"""

from __future__ import annotations

import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness
import rpc_peers
import tls_certs
from rpc_peers import NodeServer, ThriftClient, ThriftServer, dubbo_call, node_calls
from test_access_log_format import file_log, read_lines
from test_health_tls import TlsHttpServer
from test_xds import control_plane  # noqa: F401 - the fixture, shared

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
# What Istio's sidecars offer and its inbound chains match on.
ISTIO_ALPN = ["istio-peer-exchange", "istio"]

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
    common["alpn_protocols"] = ISTIO_ALPN
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


def mtls_inbound(listener: dict, pki, server_leaf, alpn=()) -> dict:
    """`listener` (one RPC chain) as an inbound sidecar listener: the TLS
    inspector, the chain matched on `transport_protocol: tls` (and on
    `alpn` when given), mTLS, and network RBAC before the RPC proxy."""
    chain = listener["filter_chains"][0]
    chain["filter_chain_match"] = {"transport_protocol": "tls"}
    if alpn:
        chain["filter_chain_match"]["application_protocols"] = list(alpn)
    chain["transport_socket"] = down_tls(pki, server_leaf)
    chain["filters"].insert(0, rbac_only(CLIENT_ID))
    listener["listener_filters"] = [INSPECTOR]
    return listener


def istio_inbound(listener: dict, pki, server_leaf) -> dict:
    """`mtls_inbound` as Istio's inbound chains are: matched on Istio's
    ALPN as well."""
    return mtls_inbound(listener, pki, server_leaf, alpn=ISTIO_ALPN)


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
        [istio_inbound(b_listener, pki, server_leaf)],
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


@pytest.mark.parametrize("a_kind", ["mesh", "envoy"])
def test_transport_socket_matches_pick_tls_per_endpoint(start_proxy, a_kind, pki, server_leaf,
                                                        client_leaf):
    """Istio's auto-mTLS on a Thrift cluster (sidecar A under mesh and
    Envoy, B under mesh): the endpoint labelled
    `tlsMode: istio` is an mTLS-only sidecar (a plain-text connection to it
    fails), the other a plain Thrift server (a TLS handshake to it fails),
    so both answering shows each got its own transport."""
    skip_without_mesh("mesh")
    tls_backend = ThriftServer("behind-sidecar").start()
    plain_backend = ThriftServer("plain").start()
    try:
        b = start_proxy("mesh", harness.bootstrap(
            [istio_inbound(rpc_peers.thrift_listener("in", thrift_routes()), pki, server_leaf)],
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
        a = start_proxy(a_kind, harness.bootstrap([thrift_out("out", "mixed")], [mixed]))
        seen = set()
        for _ in range(20):
            with ThriftClient(a.port("out")) as c:
                seen.add(c.whoami())
        assert seen == {"behind-sidecar", "plain"}, seen
        if a_kind == "mesh":
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
        "text_format": "%REQ(:METHOD)% %DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_TLS_VERSION%"
                       " %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_PEER_SERIAL%\n"})]
    return module_start_proxy("mesh", harness.bootstrap(
        [istio_inbound(rpc_peers.thrift_listener("in", routes), pki, server_leaf)],
        [harness.static_cluster("next", thrift_server.port)]))


@pytest.fixture(scope="module", params=harness.kind_params())
def inbound(request, module_start_proxy, pki, server_leaf, thrift_server):
    """The mTLS inbound Thrift sidecar under Envoy and mesh."""
    return module_start_proxy(request.param, harness.bootstrap(
        [istio_inbound(rpc_peers.thrift_listener("in", thrift_routes()), pki, server_leaf)],
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


def tls_thrift_client(port: int, ctx: ssl.SSLContext):
    """A framed binary `Calc` client over TLS with `ctx`, and its open
    transport (the caller closes it)."""
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
    return Calc.Client(TBinaryProtocol.TBinaryProtocol(t)), t


def mtls_thrift_call(port: int, ctx: ssl.SSLContext) -> int:
    """One framed binary `add(1, 2)` over TLS with `ctx`; the result."""
    client, t = tls_thrift_client(port, ctx)
    try:
        return client.add(1, 2)
    finally:
        t.close()


def client_ctx(pki, leaf=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.set_alpn_protocols(["istio"])
    if leaf:
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    return ctx


def test_python_tls_client_with_certificate_is_served(strict, pki, client_leaf, peer_log):
    assert mtls_thrift_call(strict.port("in"), client_ctx(pki, client_leaf)) == 3
    lines = read_lines(peer_log, 1)
    assert any(l.startswith(f"add {CLIENT_ID} TLSv1.") for l in lines), lines


def test_upstream_bind_config_sets_the_source_of_rpc_connections(start_proxy, strict, pki,
                                                                 client_leaf, peer_log):
    """A cluster's `upstream_bind_config`: the mTLS sidecar's access log
    sees the RPC connection come from the bound address."""
    c = tls_cluster("next", strict.port("in"), up_tls(pki, client_leaf))
    c["upstream_bind_config"] = {"source_address": {"address": "127.0.0.7", "port_value": 0}}
    a = start_proxy("mesh", harness.bootstrap([thrift_out("out", "next")], [c]))
    with ThriftClient(a.port("out")) as t:
        assert t.echo("bound") == "bound"
    lines = read_lines(peer_log, 1)
    deadline = time.time() + 5
    while not any(l.startswith("echo ") for l in lines) and time.time() < deadline:
        time.sleep(0.1)
        lines = read_lines(peer_log, 1)
    assert any(l.split()[:2] == ["echo", CLIENT_ID] and l.split()[3] == "127.0.0.7"
               for l in lines), lines


def logged_serials(peer_log, method: str) -> set[str]:
    """The client certificate serials of `method` calls in the log."""
    return {f[4].lower().lstrip("0") for f in (l.split() for l in read_lines(peer_log, 0))
            if len(f) == 5 and f[0] == method}


def test_rotated_client_certificate_reaches_new_rpc_connections(start_proxy, strict, pki,
                                                                 peer_log, tmp_path):
    """The cluster's client certificate comes from a watched SDS file; after
    it rotates (a Kubernetes-style symlink swap) new RPC connections present
    the new certificate, without a restart."""
    from test_tls import SDS_FILE, SecretDir

    leaves = [pki.leaf(f"rot-client{i}", uris=[CLIENT_ID]) for i in range(2)]
    secret = SecretDir(tmp_path / "secret")
    secret.publish(leaves[0].cert.read_bytes(), leaves[0].key.read_bytes())
    sds = tmp_path / "sds.yaml"
    sds.write_text(SDS_FILE.format(dir=secret.root))
    ts = up_tls(pki, None)
    ts["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_configs"] = [{
        "name": "server_cert",
        "sds_config": {"path_config_source": {"path": str(sds)}, "resource_api_version": "V3"},
    }]
    a = start_proxy("mesh", harness.bootstrap([thrift_out("out", "next")],
                                              [tls_cluster("next", strict.port("in"), ts)]))
    with ThriftClient(a.port("out")) as t:
        t.sleep(1)
    harness.wait_until(lambda: leaves[0].serial() in logged_serials(peer_log, "sleep"),
                       timeout=5, what="the first certificate in the log")
    secret.publish(leaves[1].cert.read_bytes(), leaves[1].key.read_bytes())
    harness.wait_until(lambda: leaves[1].serial() in a.admin_text("/certs"), timeout=10,
                       what="the rotated certificate loaded")

    def sleep_call(_):
        with ThriftClient(a.port("out")) as t:
            t.sleep(300)

    # Calls in flight at once need connections beyond the idle one.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(sleep_call, range(4)))
    harness.wait_until(lambda: leaves[1].serial() in logged_serials(peer_log, "sleep"),
                       timeout=5, what="a new connection with the rotated certificate")


def test_rpc_chain_server_certificate_from_rotating_sds(start_proxy, pki, client_leaf,
                                                        thrift_server, tmp_path):
    """The inbound RPC chain's certificate comes from a watched SDS file:
    clients are served with it, and after a rotation new handshakes see the
    new one while the connection opened before keeps working."""
    from test_tls import SDS_FILE, SecretDir

    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    leaves = [pki.leaf(f"rot-server{i}", dns=["server.local"], uris=[SERVER_ID])
              for i in range(2)]
    secret = SecretDir(tmp_path / "secret")
    secret.publish(leaves[0].cert.read_bytes(), leaves[0].key.read_bytes())
    sds = tmp_path / "sds.yaml"
    sds.write_text(SDS_FILE.format(dir=secret.root))
    l = istio_inbound(rpc_peers.thrift_listener("in", thrift_routes()), pki, leaves[0])
    common = l["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    del common["tls_certificates"]
    common["tls_certificate_sds_secret_configs"] = [{
        "name": "server_cert",
        "sds_config": {"path_config_source": {"path": str(sds)}, "resource_api_version": "V3"},
    }]
    b = start_proxy("mesh", harness.bootstrap(
        [l], [harness.static_cluster("next", thrift_server.port)]))
    port = b.port("in")
    ctx = client_ctx(pki, client_leaf)

    def served_serial() -> str:
        with socket.create_connection(("127.0.0.1", port), 10) as raw:
            with ctx.wrap_socket(raw, server_hostname="server.local") as t:
                return tls_certs.der_serial(t.getpeercert(binary_form=True))

    assert served_serial() == leaves[0].serial()
    client, kept = tls_thrift_client(port, ctx)  # a connection opened before
    try:
        assert client.add(1, 1) == 2
        secret.publish(leaves[1].cert.read_bytes(), leaves[1].key.read_bytes())
        harness.wait_until(lambda: served_serial() == leaves[1].serial(), timeout=10,
                           what="new handshakes presenting the rotated certificate")
        assert client.add(2, 2) == 4
        assert mtls_thrift_call(port, ctx) == 3
    finally:
        kept.close()


def test_plain_text_on_an_mtls_rpc_chain_is_closed(inbound, pki, client_leaf):
    port = inbound.port("in")
    before = stat(inbound, "envoy_listener_ssl_connection_error") + stat(
        inbound, "envoy_listener_no_filter_chain_match")
    with socket.create_connection(("127.0.0.1", port)) as s:
        # A framed binary Thrift call in plain text: no chain takes it.
        s.sendall(bytes.fromhex("0000001180010001000000036164640000000100"))
        assert closed_within(s, 10), "a plain-text Thrift call was not closed"
    assert stat(inbound, "envoy_listener_ssl_connection_error") + stat(
        inbound, "envoy_listener_no_filter_chain_match") > before
    assert mtls_thrift_call(port, client_ctx(pki, client_leaf)) == 3


def test_client_without_certificate_is_refused(inbound, pki, client_leaf, thrift_server):
    port = inbound.port("in")
    before = stat(inbound, "envoy_listener_ssl_fail_verify_no_cert")
    calls = thrift_server.calls
    with pytest.raises(Exception):
        mtls_thrift_call(port, client_ctx(pki))
    deadline = time.time() + 5
    while stat(inbound, "envoy_listener_ssl_fail_verify_no_cert") <= before and time.time() < deadline:
        time.sleep(0.1)
    assert stat(inbound, "envoy_listener_ssl_fail_verify_no_cert") > before
    assert thrift_server.calls == calls
    assert mtls_thrift_call(port, client_ctx(pki, client_leaf)) == 3


def test_client_of_another_workload_is_denied_by_rbac(inbound, pki, other_leaf, client_leaf):
    port = inbound.port("in")
    with pytest.raises(Exception):
        mtls_thrift_call(port, client_ctx(pki, other_leaf))
    assert mtls_thrift_call(port, client_ctx(pki, client_leaf)) == 3


def test_untrusted_or_expired_upstream_certificate_is_a_connect_failure(
        start_proxy, strict, pki, foreign, client_leaf, server_leaf, thrift_server):
    """A cluster that trusts another CA, one whose SNI/SAN does not match,
    a sidecar serving an expired certificate, and an upstream that never
    answers the handshake: each call gets a TApplicationException (the
    last within the connect timeout), counted as a connect failure (and a
    cluster TLS error); the good cluster on the same proxy keeps
    answering."""
    from thrift.Thrift import TApplicationException

    expired_leaf = pki.leaf("expired-server", dns=["server.local"], uris=[SERVER_ID],
                            expired=True)
    expired = TlsHttpServer(pki, expired_leaf)
    # Accepts and never answers the ClientHello: the connect timeout
    # (1 s) covers the handshake.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    sport = strict.port("in")
    try:
        a = start_proxy("mesh", harness.bootstrap(
            [thrift_out("good", "good"), thrift_out("untrusted", "untrusted"),
             thrift_out("expired", "expired"), thrift_out("wrong_sni", "wrong_sni"),
             thrift_out("silent", "silent")],
            [tls_cluster("good", sport, up_tls(pki, client_leaf)),
             tls_cluster("untrusted", sport, up_tls(foreign, client_leaf)),
             tls_cluster("expired", expired.port, up_tls(pki, client_leaf)),
             tls_cluster("wrong_sni", sport, up_tls(pki, client_leaf, sni="other.local",
                                                    san=OTHER_ID)),
             tls_cluster("silent", silent.getsockname()[1], up_tls(pki, client_leaf))]))
        for name in ("untrusted", "expired", "wrong_sni", "silent"):
            with ThriftClient(a.port(name)) as c:
                with pytest.raises(TApplicationException):
                    c.add(1, 1)
                # The downstream connection stays usable.
                with pytest.raises(TApplicationException):
                    c.add(1, 1)
            assert stat(a, "envoy_cluster_upstream_cx_connect_fail",
                        envoy_cluster_name=name) >= 2, name
            if name != "silent":
                assert stat(a, "envoy_cluster_ssl_fail_verify_error",
                            envoy_cluster_name=name) + stat(
                    a, "envoy_cluster_ssl_fail_verify_san", envoy_cluster_name=name) + stat(
                    a, "envoy_cluster_ssl_connection_error", envoy_cluster_name=name) >= 1, name
        with ThriftClient(a.port("good")) as c:
            assert c.add(2, 2) == 4
    finally:
        expired.stop()
        silent.close()


# --------------------------------------------------------------------------
# over LDS


def test_mtls_rpc_chain_over_lds(kind, start_proxy, control_plane, pki, server_leaf,  # noqa: F811
                                 client_leaf, other_leaf, thrift_server):
    """The inbound mTLS Thrift listener with its RBAC arrives over LDS (the
    example control plane), its cluster over CDS/EDS: a client with the
    allowed certificate is served, another workload is refused."""
    import test_xds as xds

    cp = control_plane([kind])
    port = harness.free_port()
    l = istio_inbound(rpc_peers.thrift_listener("in", thrift_routes()), pki, server_leaf)
    l["address"] = harness.socket_address(port)
    l["@type"] = xds.LISTENER
    cp.write("clusters", [xds.eds_cluster("next")])
    cp.write("endpoints", [xds.assignment("next", [thrift_server.port])])
    cp.write("listeners", [l])
    xds.start_driven(kind, start_proxy, cp, kind, "GRPC")

    def served():
        try:
            return mtls_thrift_call(port, client_ctx(pki, client_leaf)) == 3
        except Exception:  # noqa: BLE001 - not up yet
            return False

    xds.wait_until(served, time.monotonic(), "the LDS listener serving", limit=10)
    with pytest.raises(Exception):
        mtls_thrift_call(port, client_ctx(pki, other_leaf))
