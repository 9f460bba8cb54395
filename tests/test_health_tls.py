"""Active health checks over the cluster's TLS, under Envoy and mesh on the
same YAML: Envoy health checks connect through the cluster's transport
socket, so a TLS-only upstream is healthy to a TLS cluster and failed to a
plain one, or to one that does not trust its certificate or expects
another SAN. HTTP (ALPN http/1.1), TCP send/receive and gRPC (ALPN h2)
checkers; an endpoint labelled `tlsMode: istio` under
`transport_socket_matches` is probed in mTLS, and so is an unlabelled one
whose health check's `transport_socket_match_criteria` names that match;
`tls_options.alpn_protocols` replaces the ALPN list probes offer; probes
come from `upstream_bind_config`.
Read from `/clusters`.
"""

from __future__ import annotations

import socket
import ssl
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import harness
import tls_certs
from test_health import checked_cluster, wait_flags

UP_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/checked"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/checker"
FAILED = "/failed_active_hc"


def up_tls(ca: tls_certs.Pki, leaf: tls_certs.Leaf, san: str = SERVER_ID, alpn=()) -> dict:
    # A gRPC server needs ALPN h2, which Envoy only offers when configured.
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UP_TLS, "sni": "checked.local",
        "common_tls_context": {
            "alpn_protocols": list(alpn),
            "tls_certificates": [{"certificate_chain": {"filename": str(leaf.cert)},
                                  "private_key": {"filename": str(leaf.key)}}],
            "validation_context": {
                "trusted_ca": {"filename": str(ca.ca.cert)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": san}}],
            },
        },
    }}


class TlsHttpServer:
    """HTTPS only (client certificate from the test CA required): 200 on
    `/healthz`, and `+pong` to a line holding `ping` for TCP checks (the
    first bytes decide)."""

    def __init__(self, pki: tls_certs.Pki, leaf: tls_certs.Leaf, require_alpn: str | None = None):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
        self.ctx.load_verify_locations(str(pki.ca.cert))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.set_alpn_protocols([require_alpn] if require_alpn else ["http/1.1"])
        # `/healthz` answers 200 only over this ALPN protocol (else 503).
        self.require_alpn = require_alpn
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.peers: set[str] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.add(peer[0])
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.settimeout(5)
            with self.ctx.wrap_socket(conn, server_side=True) as t:
                data = t.recv(4096)
                if self.require_alpn and t.selected_alpn_protocol() != self.require_alpn:
                    t.sendall(b"HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                elif data.startswith(b"GET /healthz"):
                    t.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                elif b"ping" in data:
                    t.sendall(b"+pong\r\n")
                else:
                    t.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def stop(self):
        self.sock.close()


class TlsGrpcHealthServer:
    """grpcio over TLS (ALPN h2) with `grpc.health.v1` answering SERVING."""

    def __init__(self, pki: tls_certs.Pki, leaf: tls_certs.Leaf):
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        h = health.HealthServicer()
        h.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(h, self.server)
        creds = grpc.ssl_server_credentials(
            [(leaf.key.read_bytes(), leaf.cert.read_bytes())],
            root_certificates=pki.ca.cert.read_bytes(), require_client_auth=True)
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def stop(self):
        self.server.stop(0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tls_certs.Pki(tmp_path_factory.mktemp("hc-pki"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    return tls_certs.Pki(tmp_path_factory.mktemp("hc-foreign"), name="another CA")


@pytest.fixture(scope="module")
def leaves(pki):
    return (pki.leaf("checked", dns=["checked.local"], uris=[SERVER_ID]),
            pki.leaf("checker", uris=[CLIENT_ID]))


@pytest.fixture(scope="module")
def tls_servers(pki, leaves):
    http = TlsHttpServer(pki, leaves[0])
    grpc_server = TlsGrpcHealthServer(pki, leaves[0])
    alpn = TlsHttpServer(pki, leaves[0], require_alpn="hc")
    yield http, grpc_server, alpn
    http.stop()
    grpc_server.stop()
    alpn.stop()


HTTP_CHECK = {"http_health_check": {"path": "/healthz"}}
TCP_CHECK = {"tcp_health_check": {"send": {"text": "70696e670a"},
                                  "receive": [{"text": "2b706f6e67"}]}}
GRPC_CHECK = {"grpc_health_check": {}}


@pytest.fixture(scope="module", params=harness.kind_params())
def checked(request, module_start_proxy, pki, foreign, leaves, tls_servers):
    http, grpc_server, alpn = tls_servers
    _, client = leaves
    clusters = []

    def add(name, port, checker, transport=None, http2=False):
        c = checked_cluster(name, port, checker, http2=http2)
        if transport:
            c["transport_socket"] = transport
        clusters.append(c)

    add("http_tls", http.port, HTTP_CHECK, up_tls(pki, client))
    add("http_plain", http.port, HTTP_CHECK)
    add("http_untrusted", http.port, HTTP_CHECK, up_tls(foreign, client))
    add("http_wrong_san", http.port, HTTP_CHECK, up_tls(pki, client, san=CLIENT_ID))
    add("tcp_tls", http.port, TCP_CHECK, up_tls(pki, client))
    add("tcp_plain", http.port, TCP_CHECK)
    add("grpc_tls", grpc_server.port, GRPC_CHECK, up_tls(pki, client, alpn=["h2"]), http2=True)
    add("grpc_untrusted", grpc_server.port, GRPC_CHECK, up_tls(foreign, client, alpn=["h2"]),
        http2=True)
    # Istio's auto-mTLS: the labelled endpoint is probed in mTLS.
    m = checked_cluster("matched", http.port, HTTP_CHECK)
    m["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] = {
        "filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}
    m["transport_socket_matches"] = [
        {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
         "transport_socket": up_tls(pki, client)},
        {"name": "tlsMode-disabled", "match": {}, "transport_socket": {
            "name": "envoy.transport_sockets.raw_buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}},
    ]
    clusters.append(m)
    # `transport_socket_match_criteria` picks the match for probes in place
    # of the (unlabelled) endpoint's metadata; criteria no match fits leave
    # the cluster's own (plain) socket.
    for name, criteria in (("criteria", {"tlsMode": "istio"}), ("criteria_none", {"x": "y"})):
        c = checked_cluster(name, http.port, HTTP_CHECK)
        c["health_checks"][0]["transport_socket_match_criteria"] = criteria
        c["transport_socket_matches"] = [m["transport_socket_matches"][0]]
        clusters.append(c)
    # `tls_options.alpn_protocols`: what probes offer in place of the
    # transport socket's list.
    c = checked_cluster("alpn", alpn.port, HTTP_CHECK)
    c["transport_socket"] = up_tls(pki, client)
    c["health_checks"][0]["tls_options"] = {"alpn_protocols": ["hc"]}
    clusters.append(c)
    c = checked_cluster("alpn_none", alpn.port, HTTP_CHECK)
    c["transport_socket"] = up_tls(pki, client)
    clusters.append(c)
    # `upstream_bind_config`: probes come from the bound address.
    c = checked_cluster("bound", http.port, HTTP_CHECK)
    c["transport_socket"] = up_tls(pki, client)
    c["upstream_bind_config"] = {"source_address": {"address": bind_address(request.param),
                                                    "port_value": 0}}
    clusters.append(c)
    listeners = [harness.hcm_listener("ingress", harness.catch_all("route: {cluster: http_tls}"))]
    return module_start_proxy(request.param, harness.bootstrap(listeners, clusters))


@pytest.mark.parametrize("cluster,healthy", [
    ("http_tls", True), ("http_plain", False), ("http_untrusted", False),
    ("http_wrong_san", False), ("tcp_tls", True), ("tcp_plain", False),
    ("grpc_tls", True), ("grpc_untrusted", False), ("matched", True),
    ("criteria", True), ("criteria_none", False), ("bound", True),
    ("alpn", True), ("alpn_none", False),
])
def test_health_checks_use_the_cluster_tls(checked, tls_servers, cluster, healthy):
    http, grpc_server, alpn = tls_servers
    port = (grpc_server.port if cluster.startswith("grpc")
            else alpn.port if cluster.startswith("alpn") else http.port)
    wait_flags(checked, cluster, {port: "healthy" if healthy else FAILED})


def test_probes_come_from_upstream_bind_config(checked, tls_servers):
    http = tls_servers[0]
    wait_flags(checked, "bound", {http.port: "healthy"})
    assert bind_address(checked.kind) in http.peers, http.peers


def bind_address(kind: str) -> str:
    """One source address per proxy kind (the upstream is shared)."""
    return "127.0.0.9" if kind == "envoy" else "127.0.0.10"
