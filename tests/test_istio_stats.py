"""Istio's standard metrics (`istio.stats`) in mesh.

Two mesh sidecars in Istio's shape (mTLS between them, the HTTP metadata
exchange, `istio.stats` in both HCMs): the client's outbound listener
(`traffic_direction: OUTBOUND`) reports `reporter="source"`, the server's
inbound listener (`INBOUND`) reports `reporter="destination"`, each with
the other side's workload labels learned from the exchange. Requests from
curl give `istio_requests_total` by response code (200, 404, and 503 when
the upstream refuses), histograms whose counts equal the request counts
and whose byte sums cover what was sent; a config error names its path.
With `istio.stats` before `tcp_proxy` and the TCP metadata exchange, both
sidecars report `istio_tcp_*` for a connection: opened and closed once,
the bytes the client sent and got back, the peer's workload labels, and
deltas every `tcp_reporting_duration` while the connection is open.
"""

from __future__ import annotations

import copy
import subprocess

import grpc
import pytest

import harness
from test_istio_extensions import (  # noqa: F401
    CLIENT_ID, INSPECTOR, ISTIO_ALPN, MX_INBOUND, MX_OUTBOUND, ROUTER, SERVER_ID, down_tls,
    mtls_clusters, node, pki, with_node,
)

pytestmark = pytest.mark.skipif(harness.mesh_missing_reason() is not None,
                                reason=harness.mesh_missing_reason() or "")

STATS_TYPE = "type.googleapis.com/stats.PluginConfig"
# What istiod writes in sidecar HCMs (TypedStruct-wrapped PluginConfig).
STATS = {"name": "istio.stats", "typed_config": {
    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": STATS_TYPE,
    "value": {}}}
SERVICE = {"host": "reviews.default.svc.cluster.local", "name": "reviews",
           "namespace": "default"}
ISTIO_METADATA = {"filter_metadata": {"istio": {"services": [SERVICE]}}}

ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/meshtest.EchoService/"}
    route: {cluster: server_h2}
  - match: {prefix: "/refused"}
    route: {cluster: refused}
  - match: {prefix: "/"}
    route: {cluster: server}
"""


INBOUND_ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/meshtest.EchoService/"}
    route: {cluster: "inbound|50051||"}
  - match: {prefix: "/"}
    route: {cluster: "inbound|9080||"}
"""


def server_config(pki, leaf, upstream, grpc_port) -> str:
    chain = harness.hcm_listener("inbound", INBOUND_ROUTES, {
        "codec_type": "AUTO",
        "http_filters": [MX_INBOUND, copy.deepcopy(STATS), ROUTER]})["filter_chains"][0]
    chain["transport_socket"] = down_tls(pki, leaf, ["h2", "http/1.1"])
    listener = {"name": "inbound", "address": harness.socket_address(0),
                "traffic_direction": "INBOUND",
                "listener_filters": [INSPECTOR], "filter_chains": [chain]}
    cluster = harness.static_cluster("inbound|9080||", upstream.port)
    cluster["metadata"] = ISTIO_METADATA
    grpc_cluster = harness.static_cluster("inbound|50051||", grpc_port, http2=True)
    grpc_cluster["metadata"] = ISTIO_METADATA
    return with_node(harness.bootstrap([listener], [cluster, grpc_cluster]),
                     node("reviews-v1-pod", "reviews"))


def client_config(pki, leaf, server_port, refused_port) -> str:
    servers = mtls_clusters(pki, leaf, server_port, ("server", "server_h2"), "reviews")
    for c in servers:
        c["metadata"] = ISTIO_METADATA
    refused = harness.static_cluster("refused", refused_port)
    outbound = harness.hcm_listener("outbound", ROUTES, {
        "codec_type": "AUTO",
        "http_filters": [MX_OUTBOUND, ISTIO_ALPN, copy.deepcopy(STATS), ROUTER]})
    outbound["traffic_direction"] = "OUTBOUND"
    return with_node(harness.bootstrap([outbound], [*servers, refused]),
                     node("productpage-v1-pod", "productpage"))


@pytest.fixture(scope="module")
def sidecars(module_start_proxy, pki, upstream_a, grpc_server):
    refused_sock, refused_port = harness.refused_port()
    server = module_start_proxy("mesh", server_config(
        pki, pki.leaf("server", uris=[SERVER_ID]), upstream_a, grpc_server.port))
    client = module_start_proxy("mesh", client_config(
        pki, pki.leaf("client", uris=[CLIENT_ID]), server.port("inbound"), refused_port))
    yield client, server
    refused_sock.close()


def curl(port: int, path: str, body: bytes | None = None, *more: str) -> str:
    extra = (["--data-binary", "@-"] if body is not None else []) + list(more)
    p = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null",
                        "-w", "%{http_code}", *extra, f"http://127.0.0.1:{port}{path}"],
                       input=body, capture_output=True, timeout=20)
    return p.stdout.decode()


def value(text: str, name: str, **labels) -> float:
    return harness.prometheus_value(text, name, **labels) or 0.0


def test_both_sidecars_report_istio_request_metrics(sidecars):
    client, server = sidecars
    port = client.port("outbound")
    for i in range(3):
        assert curl(port, f"/ok/{i}") == "200"
    assert curl(port, "/post", b"x" * 5000) == "200"
    for _ in range(2):
        assert curl(port, "/status/404") == "404"
    assert curl(port, "/refused") == "503"

    out = client.admin_text("/stats/prometheus")
    src = dict(reporter="source", source_workload="productpage-v1",
               source_canonical_service="productpage", source_app="productpage",
               source_workload_namespace="default", source_cluster="Kubernetes",
               request_protocol="http", connection_security_policy="unknown")
    # The upstream's workload comes from the metadata exchange; the service
    # from the cluster's istio metadata.
    peer = dict(destination_workload="reviews-v1", destination_app="reviews",
                destination_version="v1", destination_canonical_service="reviews",
                destination_workload_namespace="default",
                destination_service="reviews.default.svc.cluster.local",
                destination_service_name="reviews", destination_service_namespace="default")
    assert value(out, "istio_requests_total", **src, **peer, response_code="200",
                 response_flags="-", grpc_response_status="") == 4, out
    assert value(out, "istio_requests_total", **src, **peer, response_code="404") == 2, out
    # Refused upstream: no peer answered, so its side is unknown; the
    # service falls back to the Host header.
    assert value(out, "istio_requests_total", **src, response_code="503", response_flags="UF",
                 destination_workload="unknown",
                 destination_service="127.0.0.1") == 1, out
    for h in ("istio_request_duration_milliseconds", "istio_request_bytes",
              "istio_response_bytes"):
        for code, n in (("200", 4), ("404", 2), ("503", 1)):
            assert value(out, f"{h}_count", **src, response_code=code) == n, (h, out)
            assert value(out, f"{h}_bucket", **src, response_code=code, le="+Inf") == n, out
    # The 5000-byte body is counted once, with every request's headers (the
    # exchange's metadata headers among them, as Istio counts them).
    sent = sum(value(out, "istio_request_bytes_sum", **src, response_code=c)
               for c in ("200", "404", "503"))
    assert 5000 + 7 * 300 < sent < 5000 + 7 * 1000, (sent, out)
    assert value(out, "istio_response_bytes_sum", **src, response_code="200") > 4 * 20

    out = server.admin_text("/stats/prometheus")
    dst = dict(reporter="destination", destination_workload="reviews-v1",
               destination_app="reviews", destination_service="reviews.default.svc.cluster.local",
               source_workload="productpage-v1", source_app="productpage",
               source_version="v1", source_principal=CLIENT_ID,
               connection_security_policy="mutual_tls", request_protocol="http")
    assert value(out, "istio_requests_total", **dst, response_code="200") == 4, out
    assert value(out, "istio_requests_total", **dst, response_code="404") == 2, out
    assert value(out, "istio_request_duration_milliseconds_count", **dst) == 6, out
    assert 5000 < value(out, "istio_request_bytes_sum", **dst) < 5000 + 6 * 1000, out


def test_requests_refused_before_routing_are_counted(sidecars):
    client, _ = sidecars
    # HTTP/1.0 is refused with 426 before routing, as Envoy does.
    assert curl(client.port("outbound"), "/old", None, "--http1.0") == "426"
    out = client.admin_text("/stats/prometheus")
    assert value(out, "istio_requests_total", reporter="source", response_code="426",
                 response_flags="DPE", destination_workload="unknown",
                 source_workload="productpage-v1") == 1, out
    assert value(out, "istio_request_duration_milliseconds_count", response_code="426") == 1


def test_grpc_status_and_protocol_through_both_sidecars(sidecars, grpc_server):
    client, server = sidecars
    pb2 = grpc_server.pb2
    ch = grpc.insecure_channel(f"127.0.0.1:{client.port('outbound')}",
                               options=[("grpc.enable_http_proxy", 0)])
    try:
        stub = grpc_server.pb2_grpc.EchoServiceStub(ch)
        for i in range(3):
            assert stub.Echo(pb2.EchoRequest(message=f"m{i}", seq=i), timeout=10).seq == i
        with pytest.raises(grpc.RpcError) as ei:
            stub.Missing(pb2.EchoRequest(message="w"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        ch.close()
    for proxy, reporter in ((client, "source"), (server, "destination")):
        out = proxy.admin_text("/stats/prometheus")
        common = dict(reporter=reporter, request_protocol="grpc", response_code="200",
                      source_workload="productpage-v1", destination_workload="reviews-v1",
                      destination_service="reviews.default.svc.cluster.local")
        assert value(out, "istio_requests_total", **common, grpc_response_status="0") == 3, out
        assert value(out, "istio_requests_total", **common, grpc_response_status="5") == 1, out
        assert value(out, "istio_response_bytes_count", **common) == 4, out


@pytest.mark.parametrize("value,error", [
    ({"reporter": "CLIENT"}, "http_filters[0].typed_config.value.reporter: expected one of"),
    ({"metrics": [{"name": "requests_total", "tags_to_remove": ["source_app"]}]},
     "unsupported: static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
     ".http_filters[0].typed_config.value.metrics (istio.stats: metric overrides"),
])
def test_bad_istio_stats_config_is_refused_with_its_path(tmp_path, value, error):
    bad = copy.deepcopy(STATS)
    bad["typed_config"]["value"] = value
    cfg = harness.bootstrap([harness.hcm_listener("l", harness.catch_all_routes("c"), {
        "http_filters": [bad, ROUTER]})], [harness.static_cluster("c", 1)])
    path = tmp_path / "bad.yaml"
    path.write_text(cfg)
    p = subprocess.run([str(harness.mesh_bin()), "validate", "--config-path", str(path)],
                       capture_output=True, timeout=30)
    err = p.stderr.decode() + p.stdout.decode()
    assert p.returncode != 0
    assert error in err, err


# --------------------------------------------------------------------------
# TCP metrics: `istio.stats` as a network filter before tcp_proxy, with the
# TCP metadata exchange over mTLS between the sidecars.

def tcp_server_config(pki, leaf, echo_port) -> str:
    from test_istio_tcp_exchange import MX
    chain = harness.tcp_listener("inbound", "inbound|9000||")["filter_chains"][0]
    chain["filters"][:0] = [MX, copy.deepcopy(STATS)]
    chain.update({"filter_chain_match": {"transport_protocol": "tls"},
                  "transport_socket": down_tls(pki, leaf, ["istio-peer-exchange", "istio"])})
    listener = {"name": "inbound", "address": harness.socket_address(0),
                "traffic_direction": "INBOUND",
                "listener_filters": [INSPECTOR], "filter_chains": [chain]}
    cluster = harness.static_cluster("inbound|9000||", echo_port)
    cluster["metadata"] = ISTIO_METADATA
    return with_node(harness.bootstrap([listener], [cluster]), node("reviews-v1-pod", "reviews"))


def tcp_client_config(pki, leaf, server_port) -> str:
    from test_istio_extensions import UP_TLS, tls_common
    from test_istio_tcp_exchange import MX
    cluster = harness.static_cluster("server", server_port)
    cluster.update({"metadata": ISTIO_METADATA, "filters": [MX], "transport_socket": {
        "name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UP_TLS, "common_tls_context": tls_common(
                pki, leaf, ["istio-peer-exchange", "istio"], SERVER_ID)}}})
    listeners = []
    for name, stats in (("outbound", STATS),
                        ("outbound_1s", {**STATS, "typed_config": {
                            **STATS["typed_config"], "value": {"tcp_reporting_duration": "1s"}}})):
        listener = harness.tcp_listener(name, "server")
        listener["traffic_direction"] = "OUTBOUND"
        listener["filter_chains"][0]["filters"].insert(0, copy.deepcopy(stats))
        listeners.append(listener)
    return with_node(harness.bootstrap(listeners, [cluster]),
                     node("productpage-v1-pod", "productpage"))


@pytest.fixture(scope="module")
def tcp_sidecars(module_start_proxy, pki, tcp_echo):
    server = module_start_proxy("mesh", tcp_server_config(
        pki, pki.leaf("server", uris=[SERVER_ID]), tcp_echo.port))
    client = module_start_proxy("mesh", tcp_client_config(
        pki, pki.leaf("client", uris=[CLIENT_ID]), server.port("inbound")))
    return client, server


TCP_SRC = dict(reporter="source", source_workload="productpage-v1",
               source_app="productpage", destination_workload="reviews-v1",
               destination_app="reviews", destination_version="v1",
               destination_service="reviews.default.svc.cluster.local",
               destination_service_name="reviews", request_protocol="tcp",
               response_flags="-", connection_security_policy="unknown")
TCP_DST = dict(reporter="destination", source_workload="productpage-v1",
               source_app="productpage", source_principal=CLIENT_ID,
               destination_workload="reviews-v1", destination_app="reviews",
               destination_service="reviews.default.svc.cluster.local",
               request_protocol="tcp", response_flags="-",
               connection_security_policy="mutual_tls")
TCP_METRICS = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
               "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total")


def tcp_metrics(proxy, labels: dict) -> tuple:
    text = proxy.admin_text("/stats/prometheus")
    return tuple(value(text, m, **labels) for m in TCP_METRICS)


def test_both_sidecars_report_istio_tcp_metrics(tcp_sidecars):
    import socket
    client, server = tcp_sidecars
    before = {"source": tcp_metrics(client, TCP_SRC), "destination": tcp_metrics(server, TCP_DST)}
    data = harness.payload(100_000, seed=3)
    with socket.create_connection(("127.0.0.1", client.port("outbound")), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert harness.recv_until(s, lambda b: False) == data
    n = len(data)
    for proxy, labels in ((client, TCP_SRC), (server, TCP_DST)):
        b = before[labels["reporter"]]
        want = (b[0] + 1, b[1] + 1, b[2] + n, b[3] + n)
        harness.wait_until(lambda: tcp_metrics(proxy, labels) == want,
                           what=f"{labels['reporter']} reported the connection")
        text = proxy.admin_text("/stats/prometheus")
        # No HTTP labels on TCP series.
        for name, ls, _ in harness.prometheus_samples(text):
            if name in TCP_METRICS:
                assert "response_code" not in ls and "grpc_response_status" not in ls, ls


def test_open_tcp_connections_are_reported_every_tcp_reporting_duration(tcp_sidecars):
    import socket
    client, _ = tcp_sidecars
    labels = dict(TCP_SRC)
    before = tcp_metrics(client, labels)
    with socket.create_connection(("127.0.0.1", client.port("outbound_1s")), timeout=10) as s:
        s.sendall(b"x" * 1000)
        assert harness.recv_until(s, lambda b: len(b) >= 1000) == b"x" * 1000
        # Still open: the deltas arrive with the next report.
        harness.wait_until(lambda: tcp_metrics(client, labels)
                           == (before[0] + 1, before[1], before[2] + 1000, before[3] + 1000),
                           what="a periodic report of the open connection")
        s.sendall(b"y" * 500)
        assert harness.recv_until(s, lambda b: len(b) >= 500) == b"y" * 500
    harness.wait_until(lambda: tcp_metrics(client, labels)
                       == (before[0] + 1, before[1] + 1, before[2] + 1500, before[3] + 1500),
                       what="the close report")
