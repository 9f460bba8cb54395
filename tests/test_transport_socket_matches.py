"""A cluster's `transport_socket_matches`: per-endpoint transport sockets
chosen by endpoint metadata (Istio's auto-mTLS), under Envoy and mesh alike.

The upstreams answer plain HTTP and mTLS on the same port (a TLS handshake
starts with byte 0x16), and say which one they got: `plain`, or `mtls
<serial of the client certificate>`. So a request shows the transport its
endpoint's connection used, and a proxy that picked the wrong one would
show it (or fail the handshake).

- static clusters: an endpoint labelled `tlsMode: istio` gets mTLS and an
  unlabelled one plain text (Istio's two matches), over the HTTP router and
  the TCP proxy; a locality's metadata is consulted when no match fits the
  endpoint's own, and an endpoint no match fits uses the cluster's
  `transport_socket`;
- over xDS: Istio's outbound cluster as `istioctl proxy-config cluster -o
  json` prints it (`tests/fixtures/istio_outbound_cluster.json`, unchanged)
  comes over CDS, its workload certificate and root over SDS on a stream of
  their own (the `sds-grpc` cluster, as Istio's bootstrap names it); EDS
  labels one endpoint; then the labels flip over EDS while a load generator
  runs, and new connections follow with no failed request;
- a STRICT_DNS cluster from CDS whose matches change takes the new ones at
  once; ORIGINAL_DST hosts (no metadata) take the match with an empty
  `match`; a match without a transport socket is refused.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import yaml

import harness
import test_xds as xds
import tls_certs
from test_xds import control_plane  # noqa: F401 - the fixture, shared
from test_xds_sds import listener_port

UP_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
FIXTURE = Path(__file__).parent / "fixtures" / "istio_outbound_cluster.json"
ISTIO_SA = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
SEEN_WITHIN = 8.0  # as test_xds_sds.py: a loaded machine delays both proxies alike


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tls_certs.Pki:
    return tls_certs.Pki(tmp_path_factory.mktemp("tsm-pki"))


class DualUpstream:
    """Plain HTTP and mTLS (client certificate from the test CA required) on
    one port. Each response names the transport and the upstream, and closes
    the connection, so every request shows a new connection's transport."""

    def __init__(self, name: str, pki: tls_certs.Pki, leaf: tls_certs.Leaf):
        self.name = name
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
        self.ctx.load_verify_locations(str(pki.ca.cert))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        try:
            conn.settimeout(10)
            if conn.recv(1, socket.MSG_PEEK) == b"\x16":
                conn = self.ctx.wrap_socket(conn, server_side=True)
                body = "mtls " + tls_certs.der_serial(conn.getpeercert(binary_form=True))
            else:
                body = "plain"
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall((f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n"
                          f"x-upstream: {self.name}\r\nconnection: close\r\n\r\n{body}").encode())
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            conn.close()

    def stop(self):
        self.stopped = True
        self.sock.close()


@pytest.fixture(scope="module")
def duals(pki):
    server = pki.leaf("tsm-upstream", dns=["backend.local"], uris=[ISTIO_SA])
    made = [DualUpstream(n, pki, server) for n in ("a", "b")]
    yield made
    for d in made:
        d.stop()


def tls_socket(pki: tls_certs.Pki, client: tls_certs.Leaf) -> dict:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UP_TLS, "sni": "backend.local",
        "common_tls_context": {
            "tls_certificates": [{"certificate_chain": {"filename": str(client.cert)},
                                  "private_key": {"filename": str(client.key)}}],
            "validation_context": {"trusted_ca": {"filename": str(pki.ca.cert)}}}}}


RAW_SOCKET = {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW}}


def labelled(md: dict | None) -> dict:
    return {"filter_metadata": {"envoy.transport_socket_match": md}} if md else {}


def endpoint(port: int, md: dict | None = None) -> dict:
    e = {"endpoint": {"address": harness.socket_address(port)}}
    if md:
        e["metadata"] = labelled(md)
    return e


def seen(port: int, n: int = 8) -> set:
    """(upstream, transport) of `n` requests; each must succeed."""
    out = set()
    for _ in range(n):
        r = harness.request(port, "GET", "/")
        assert r.status == 200, (r.status, r.body[:200])
        body = r.body.decode()
        out.add((r.upstream, body.split(" ")[0]))
        if body.startswith("mtls "):
            out.add(("serial", body.split(" ", 1)[1]))
    return out


def seen_quietly(port: int) -> set | None:
    """`seen`, or None while a request fails (the proxy still warming)."""
    try:
        return seen(port)
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return None


def start_static(kind, start_proxy, cluster: dict) -> harness.Proxy:
    routes = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "mixed"}}]}]}
    text = harness.bootstrap(
        [harness.hcm_listener("ingress", routes), harness.tcp_listener("tcp", "mixed")],
        [cluster])
    return start_proxy(kind, text)


def socket_match_cx(proxy: harness.Proxy, cluster: str, match: str) -> float:
    return harness.prometheus_value(
        proxy.admin_text("/stats/prometheus"), "mesh_cluster_transport_socket_match_cx_total",
        envoy_cluster_name=cluster, transport_socket_match=match) or 0


def test_istio_matches_on_endpoint_metadata(kind, start_proxy, pki, duals):
    """Istio's two matches: `tlsMode: istio` endpoints get mTLS, the others
    (catch-all empty match) plain text; the HTTP router and the TCP proxy
    alike."""
    a, b = duals
    client = pki.leaf("tsm-client", uris=["spiffe://cluster.local/ns/default/sa/web"])
    cluster = {
        "name": "mixed", "type": "STATIC", "connect_timeout": "2s",
        "transport_socket_matches": [
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
             "transport_socket": tls_socket(pki, client)},
            {"name": "tlsMode-disabled", "match": {}, "transport_socket": RAW_SOCKET}],
        "load_assignment": {"cluster_name": "mixed", "endpoints": [{"lb_endpoints": [
            endpoint(a.port, {"tlsMode": "istio"}), endpoint(b.port)]}]},
    }
    proxy = start_static(kind, start_proxy, cluster)
    expected = {("a", "mtls"), ("serial", client.serial()), ("b", "plain")}
    assert seen(proxy.port("ingress")) == expected
    assert seen(proxy.port("tcp")) == expected
    if kind == "mesh":
        assert socket_match_cx(proxy, "mixed", "tlsMode-istio") >= 2
        assert socket_match_cx(proxy, "mixed", "tlsMode-disabled") >= 2
        assert socket_match_cx(proxy, "mixed", "default") == 0


def test_locality_metadata_then_the_cluster_transport_socket(kind, start_proxy, pki, duals):
    """No match fits endpoint a, nor its locality: it uses the cluster's
    `transport_socket` (mTLS). Endpoint b has no label of its own, but its
    locality's fits the plain-text match."""
    a, b = duals
    client = pki.leaf("tsm-client2")
    cluster = {
        "name": "mixed", "type": "STATIC", "connect_timeout": "2s",
        "transport_socket": tls_socket(pki, client),
        "transport_socket_matches": [
            {"name": "plain", "match": {"tlsMode": "disabled"}, "transport_socket": RAW_SOCKET}],
        "load_assignment": {"cluster_name": "mixed", "endpoints": [
            {"locality": {"zone": "z1"}, "lb_endpoints": [endpoint(a.port, {"other": "x"})]},
            {"locality": {"zone": "z2"}, "metadata": labelled({"tlsMode": "disabled"}),
             "lb_endpoints": [endpoint(b.port)]}]},
    }
    proxy = start_static(kind, start_proxy, cluster)
    expected = {("a", "mtls"), ("serial", client.serial()), ("b", "plain")}
    assert seen(proxy.port("ingress")) == expected
    if kind == "mesh":
        assert socket_match_cx(proxy, "mixed", "default") >= 1
        assert socket_match_cx(proxy, "mixed", "plain") >= 1


def test_bad_transport_socket_match_is_refused(kind, start_proxy, duals):
    """A match without a transport socket: Envoy and mesh refuse the file."""
    cluster = {
        "name": "mixed", "type": "STATIC", "connect_timeout": "2s",
        "transport_socket_matches": [{"name": "m", "match": {"tlsMode": "istio"}}],
        "load_assignment": {"cluster_name": "mixed", "endpoints": [{"lb_endpoints": [
            endpoint(duals[0].port)]}]},
    }
    with pytest.raises(harness.ProxyStartError) as e:
        start_static(kind, start_proxy, cluster)
    if kind == "mesh":
        assert "clusters[0].transport_socket_matches[0].transport_socket" in str(e.value)


# ---------------------------------------------------------------- over xDS


def istio_cluster() -> dict:
    c = json.loads(FIXTURE.read_text())
    c["@type"] = xds.CLUSTER
    return c


def cert_secret(name: str, leaf: tls_certs.Leaf) -> dict:
    return {"@type": SECRET, "name": name, "tls_certificate": {
        "certificate_chain": {"inline_string": leaf.cert.read_text()},
        "private_key": {"inline_string": leaf.key.read_text()}}}


def trust_secret(name: str, pki: tls_certs.Pki) -> dict:
    return {"@type": SECRET, "name": name,
            "validation_context": {"trusted_ca": {"inline_string": pki.ca.cert.read_text()}}}


def assignment(name: str, endpoints: list) -> dict:
    """As istiod sends it: the fixture's `locality_weighted_lb_config`
    gives no traffic to a locality without a weight."""
    return {"@type": xds.ENDPOINT, "cluster_name": name, "endpoints": [{
        "locality": {"region": "r1", "zone": "z1"}, "load_balancing_weight": 1,
        "lb_endpoints": endpoints}]}


def istio_bootstrap(node: str, cp_port: int, api_type: str) -> str:
    """test_xds's bootstrap plus Istio's `sds-grpc` cluster, which the
    fixture's SDS config sources name (here: the control plane)."""
    doc = yaml.safe_load(xds.xds_bootstrap(node, cp_port, api_type))
    doc["static_resources"]["clusters"].append(
        harness.static_cluster("sds-grpc", [cp_port], http2=True))
    return yaml.safe_dump(doc)


@pytest.mark.parametrize("api_type", xds.API_TYPES)
def test_istio_outbound_cluster_over_xds_and_labels_flipping(kind, api_type, start_proxy,
                                                             control_plane, pki, duals):
    a, b = duals
    workload = pki.leaf("tsm-workload", uris=["spiffe://cluster.local/ns/default/sa/web"])
    cluster = istio_cluster()
    name = cluster["name"]
    cp = control_plane([kind])
    cp.write("clusters", [cluster])
    cp.write("endpoints", [assignment(name, [endpoint(a.port, {"tlsMode": "istio"}),
                                             endpoint(b.port)])])
    cp.write("routes", [xds.routes(default=name)])
    cp.write("secrets", [cert_secret("default", workload), trust_secret("ROOTCA", pki)])
    cp.write("listeners", [xds.listener()])
    xds.settle()
    proxy = start_proxy(kind, istio_bootstrap(kind, cp.port, api_type))
    port = listener_port(proxy)
    cp.wait_status(kind, lambda s: {"CDS", "EDS", "LDS", "RDS", "SDS"} <= set(s.get("acked", {})))
    assert "CDS" not in cp.status(kind).get("nacked", {}), cp.status(kind)
    expected = {("a", "mtls"), ("serial", workload.serial()), ("b", "plain")}
    harness.wait_until(lambda: seen_quietly(port) == expected, timeout=30,
                       what="both endpoints, each with its transport")

    # The labels flip over EDS under load: new connections follow, and no
    # request fails.
    with xds.Load(port) as load:
        t = cp.write("endpoints", [assignment(name, [endpoint(a.port),
                                                     endpoint(b.port, {"tlsMode": "istio"})])])
        flipped = {("a", "plain"), ("b", "mtls"), ("serial", workload.serial())}
        xds.wait_until(lambda: seen(port) == flipped, t, "the flipped labels", SEEN_WITHIN)
        time.sleep(1)
    assert load.ok > 10, load.ok
    assert load.failures == [], load.failures[:5]
    if kind == "mesh":
        assert socket_match_cx(proxy, name, "tlsMode-istio") >= 2
        assert socket_match_cx(proxy, name, "tlsMode-disabled") >= 2
        dump = json.loads(proxy.admin_text("/config_dump"))
        clusters = [c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump")][0]
        dumped = json.dumps(clusters)
        assert "tlsMode-istio" in dumped and "tlsMode-disabled" in dumped


def test_dns_cluster_matches_changed_over_cds(kind, start_proxy, control_plane, pki, duals):
    """A STRICT_DNS cluster from CDS whose `transport_socket_matches` change:
    its endpoints take the new list's match at once, not at the next DNS
    refresh (an hour away here)."""
    a = duals[0]
    workload = pki.leaf("tsm-dns-client")
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UP_TLS, "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": xds.ADS}],
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": xds.ADS}}}}

    def cluster(matches: list) -> dict:
        return {"@type": xds.CLUSTER, "name": "a", "type": "STRICT_DNS",
                "connect_timeout": "2s", "dns_refresh_rate": "3600s",
                "transport_socket_matches": matches,
                "load_assignment": {"cluster_name": "a", "endpoints": [{"lb_endpoints": [
                    endpoint(a.port, {"tlsMode": "istio"})]}]}}

    cp = control_plane([kind])
    cp.write("clusters", [cluster([
        {"name": "istio", "match": {"tlsMode": "istio"}, "transport_socket": tls}])])
    cp.write("routes", [xds.routes()])
    cp.write("secrets", [cert_secret("default", workload), trust_secret("ROOTCA", pki)])
    cp.write("listeners", [xds.listener()])
    proxy = xds.start_driven(kind, start_proxy, cp, kind, "GRPC")
    port = listener_port(proxy)
    harness.wait_until(lambda: seen_quietly(port) == {("a", "mtls"), ("serial", workload.serial())},
                       timeout=30, what="mTLS to the labelled endpoint")
    # Index 0 is now another TLS match; the endpoint's is the second, plain.
    t = cp.write("clusters", [cluster([
        {"name": "other", "match": {"other": "x"}, "transport_socket": tls},
        {"name": "plain", "match": {"tlsMode": "istio"}, "transport_socket": RAW_SOCKET}])])
    xds.wait_until(lambda: seen_quietly(port) == {("a", "plain")}, t, "the new match",
                   SEEN_WITHIN)


def test_original_dst_hosts_take_the_unlabelled_match(kind, start_proxy, pki, duals):
    """ORIGINAL_DST hosts carry no metadata: an empty `match` fits them."""
    a = duals[0]
    client = pki.leaf("tsm-odst-client")
    cluster = {
        "name": "mixed", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "2s", "original_dst_lb_config": {"use_http_header": True},
        "transport_socket_matches": [
            {"name": "labelled", "match": {"tlsMode": "disabled"}, "transport_socket": RAW_SOCKET},
            {"name": "any", "match": {}, "transport_socket": tls_socket(pki, client)}],
    }
    routes = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "mixed"}}]}]}
    proxy = start_proxy(kind, harness.bootstrap([harness.hcm_listener("ingress", routes)],
                                                [cluster]))
    r = harness.request(proxy.port("ingress"), "GET", "/",
                        headers={"x-envoy-original-dst-host": f"127.0.0.1:{a.port}"})
    assert (r.status, r.body.decode()) == (200, f"mtls {client.serial()}")
    if kind == "mesh":
        assert socket_match_cx(proxy, "mixed", "any") == 1
