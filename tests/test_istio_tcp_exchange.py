"""Istio's TCP metadata exchange (`istio.metadata_exchange` as a network
filter and as a cluster filter, ALPN `istio-peer-exchange`) between two mesh
sidecars joined by mTLS, in the shape istiod writes: the applications see
exactly their own bytes, each sidecar learns the other's workload, a peer
without the exchange still works, and the frame on the wire is Istio's
(checked with google.protobuf)."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest
from google.protobuf import any_pb2, struct_pb2

import harness
import tls_certs
from test_istio_extensions import (CLIENT_ID, INSPECTOR, SERVER_ID, UP_TLS, down_tls, node,
                                   tls_common, with_node)

pytestmark = pytest.mark.skipif(harness.mesh_missing_reason() is not None,
                                reason=harness.mesh_missing_reason() or "")

MAGIC = 0x3D230467
MX_TYPE = "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"
# pilot's xdsfilters.TCPListenerMx / TCPClusterMx.
MX = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": MX_TYPE,
    "value": {"protocol": "istio-peer-exchange"}}}
STRUCT_URL = "type.googleapis.com/google.protobuf.Struct"


def metric(proxy, name: str) -> float:
    return harness.prometheus_value(proxy.admin_text("/stats/prometheus"), name) or 0


def server_config(pki, leaf, echo_port) -> str:
    chain = harness.tcp_listener("inbound", "echo")["filter_chains"][0]
    chain["filters"].insert(0, MX)
    chain.update({"filter_chain_match": {"transport_protocol": "tls"},
                  "transport_socket": down_tls(pki, leaf, ["istio-peer-exchange", "istio"])})
    listener = {"name": "inbound", "address": harness.socket_address(0),
                "listener_filters": [INSPECTOR], "filter_chains": [chain]}
    return with_node(harness.bootstrap([listener], [harness.static_cluster("echo", echo_port)]),
                     node("reviews-v1-pod", "reviews"))


def client_config(pki, leaf, server_port) -> str:
    clusters = []
    for name, alpn, filters in (("server", ["istio-peer-exchange", "istio"], [MX]),
                                ("server_plain", ["istio"], [MX]),
                                ("server_no_mx", ["istio-peer-exchange", "istio"], [])):
        c = harness.static_cluster(name, server_port)
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UP_TLS, "common_tls_context": tls_common(pki, leaf, alpn, SERVER_ID)}}
        if filters:
            c["filters"] = filters
        clusters.append(c)
    listeners = [harness.tcp_listener(n, n) for n in ("server", "server_plain", "server_no_mx")]
    return with_node(harness.bootstrap(listeners, clusters),
                     node("productpage-v1-pod", "productpage"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tls_certs.Pki:
    return tls_certs.Pki(tmp_path_factory.mktemp("istio-mx-pki"))


@pytest.fixture(scope="module")
def sidecars(module_start_proxy, pki, tcp_echo):
    server_leaf = pki.leaf("server", uris=[SERVER_ID])
    client_leaf = pki.leaf("client", uris=[CLIENT_ID])
    server = module_start_proxy("mesh", server_config(pki, server_leaf, tcp_echo.port))
    client = module_start_proxy("mesh", client_config(pki, client_leaf, server.port("inbound")))
    return client, server, client_leaf


def echo_through(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return harness.recv_until(s, lambda b: False)


def test_exchange_is_invisible_to_the_applications_and_both_sides_learn(sidecars):
    client, server, _ = sidecars
    before = (metric(client, "envoy_metadata_exchange_metadata_added"),
              metric(server, "envoy_metadata_exchange_metadata_added"))
    data = harness.payload(200_000, seed=7)
    got = echo_through(client.port("server"), data)
    assert got == data, (len(got), got[:16])
    # Each side read the other's frame (the peer is kept on the connection).
    harness.wait_until(lambda: (metric(client, "envoy_metadata_exchange_metadata_added"),
                                metric(server, "envoy_metadata_exchange_metadata_added"))
                       == (before[0] + 1, before[1] + 1), what="both sides learned the peer")
    assert metric(server, "envoy_metadata_exchange_header_not_found") == 0


def test_other_alpn_or_no_exchange_on_one_side_still_works(sidecars):
    client, server, _ = sidecars
    found = metric(server, "envoy_metadata_exchange_alpn_protocol_not_found")
    # ALPN `istio`: neither side runs the exchange.
    assert echo_through(client.port("server_plain"), b"plain bytes") == b"plain bytes"
    harness.wait_until(lambda: metric(server, "envoy_metadata_exchange_alpn_protocol_not_found")
                       == found + 1, what="the server saw another ALPN")
    # The cluster without the filter negotiates istio-peer-exchange but sends
    # no frame: the server relays the client's bytes untouched (as Istio
    # does) while its own frame reaches the client application.
    missing = metric(server, "envoy_metadata_exchange_initial_header_not_found")
    got = echo_through(client.port("server_no_mx"), b"hello, no exchange")
    assert got.endswith(b"hello, no exchange"), got
    assert struct.unpack(">I", got[:4])[0] == MAGIC
    harness.wait_until(lambda: metric(server, "envoy_metadata_exchange_initial_header_not_found")
                       == missing + 1, what="the server saw no magic")


def tls_client(pki, leaf, port: int) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(pki.ca.cert))
    ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    ctx.set_alpn_protocols(["istio-peer-exchange"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    assert s.selected_alpn_protocol() == "istio-peer-exchange"
    return s


def read_exact(s, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return out


def read_frame(s) -> struct_pb2.Struct:
    magic, length = struct.unpack(">II", read_exact(s, 8))
    assert magic == MAGIC
    any_msg = any_pb2.Any()
    any_msg.ParseFromString(read_exact(s, length))
    assert any_msg.type_url == STRUCT_URL
    data = struct_pb2.Struct()
    assert any_msg.Unpack(data)
    return data


def frame(metadata: dict, node_id: str) -> bytes:
    data = struct_pb2.Struct()
    data.update({"x-envoy-peer-metadata": metadata, "x-envoy-peer-metadata-id": node_id})
    any_msg = any_pb2.Any()
    any_msg.Pack(data)
    body = any_msg.SerializeToString()
    return struct.pack(">II", MAGIC, len(body)) + body


def test_wire_format_is_istios(sidecars, pki):
    """A peer built from google.protobuf: the server's frame decodes as
    Istio's (Any of a Struct with the workload and node id), ours is
    accepted and stripped before the application."""
    client, server, leaf = sidecars
    added = metric(server, "envoy_metadata_exchange_metadata_added")
    with tls_client(pki, leaf, server.port("inbound")) as s:
        s.sendall(frame({"NAME": "ratings-pod", "NAMESPACE": "default",
                         "WORKLOAD_NAME": "ratings-v1", "LABELS": {"app": "ratings"}},
                        "sidecar~10.0.0.1~ratings-pod.default~default.svc.cluster.local")
                  + b"after the frame")
        data = read_frame(s)
        assert data["x-envoy-peer-metadata-id"] == \
            "sidecar~127.0.0.1~reviews-v1-pod.default~default.svc.cluster.local"
        peer = data["x-envoy-peer-metadata"]
        assert peer["NAME"] == "reviews-v1-pod"
        assert peer["WORKLOAD_NAME"] == "reviews-v1"
        assert peer["NAMESPACE"] == "default"
        assert dict(peer["LABELS"]) == {"app": "reviews", "version": "v1",
                                        "service.istio.io/canonical-name": "reviews"}
        assert peer["OWNER"] == \
            "kubernetes://apis/apps/v1/namespaces/default/deployments/reviews-v1"
        assert read_exact(s, 15) == b"after the frame"
    harness.wait_until(lambda: metric(server, "envoy_metadata_exchange_metadata_added")
                       == added + 1, what="the server learned the python peer")


def test_malformed_frames_are_handled_as_istio_does(sidecars, pki):
    client, server, leaf = sidecars
    bad = metric(server, "envoy_metadata_exchange_header_not_found")
    # The magic and a body that is not an Any: the frame is dropped, the
    # bytes after it reach the application.
    with tls_client(pki, leaf, server.port("inbound")) as s:
        s.sendall(struct.pack(">II", MAGIC, 3) + b"\xff\xff\xff" + b"tail")
        read_frame(s)
        assert read_exact(s, 4) == b"tail"
    assert metric(server, "envoy_metadata_exchange_header_not_found") == bad + 1
    # A length beyond the bound: the connection is closed, never buffered.
    with tls_client(pki, leaf, server.port("inbound")) as s:
        s.sendall(struct.pack(">II", MAGIC, 0xFFFFFFF0) + b"x" * 100)
        read_frame(s)
        try:
            rest = harness.recv_until(s, lambda b: False)
        except ssl.SSLError:
            rest = b""
        assert rest == b""
    # The sidecars still serve.
    assert echo_through(client.port("server"), b"still fine") == b"still fine"
