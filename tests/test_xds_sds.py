"""SDS over xDS and TLS inside LDS/CDS resources, mesh and Envoy side by side.

Both proxies are driven by mesh-xds's snapshot server (the example control
plane, as in test_xds.py) over ADS, with the same resources:

- an mTLS listener delivered by LDS whose certificate and trust bundle come
  from SDS; the certificate is rotated twice while a load generator runs:
  zero failed requests, new handshakes (openssl s_client) present the new
  serial, and a connection made before the rotations keeps working;
- a bad certificate (a key that does not match) is NACKed (mesh names the
  secret and the field) and the old certificate keeps serving; the next
  good one is ACKed;
- an upstream mTLS cluster delivered by CDS whose client certificate and
  root come from SDS on a stream of their own, as Istio's sidecars get
  them (the upstream checks the certificate and echoes its serial);
  rotating the secret changes the certificate new upstream connections
  present;
- SDS on its own stream (`api_config_source`, GRPC and DELTA_GRPC), static
  listeners with secrets over ADS, and a listener from LDS with the TLS
  inspector and several filter chains (SNI, network RBAC, plain text).
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import socket
import ssl
import subprocess
import threading
import time

import pytest
import yaml

import harness
import test_xds as xds
import tls_certs
from test_xds import control_plane  # noqa: F401 - the fixture, shared

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
DOWN_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UP_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
ADS = {"ads": {}, "resource_api_version": "V3"}
# How soon after the control plane pushes a change it must be seen. On an
# idle machine both proxies take well under test_xds.py's 1 s; this suite
# shares the CPU with parallel builds and benchmarks that starve every
# niced process (the debug control plane, both proxies, the clients) for
# seconds, so the bound here only tells "promptly" from "never", for Envoy
# and mesh alike.
SEEN_WITHIN = 8.0

pytestmark = xds.pytestmark


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tls_certs.Pki:
    return tls_certs.Pki(tmp_path_factory.mktemp("sds-pki"))


# ---------------------------------------------------------------- resources


def cert_secret(name: str, leaf: tls_certs.Leaf, key: tls_certs.Leaf | None = None) -> dict:
    return {"@type": SECRET, "name": name, "tls_certificate": {
        "certificate_chain": {"inline_string": leaf.cert.read_text()},
        "private_key": {"inline_string": (key or leaf).key.read_text()}}}


def trust_secret(name: str, pki: tls_certs.Pki) -> dict:
    return {"@type": SECRET, "name": name,
            "validation_context": {"trusted_ca": {"inline_string": pki.ca.cert.read_text()}}}


def sds(name: str, source: dict = ADS) -> dict:
    return {"name": name, "sds_config": source}


def down_tls(source: dict = ADS) -> dict:
    """A DownstreamTlsContext requiring client certificates, with its
    certificate and trust bundle from SDS."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWN_TLS,
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [sds("server_cert", source)],
                "validation_context_sds_secret_config": sds("trust", source),
            },
        },
    }


def mtls_listener(source: dict = ADS) -> dict:
    """The LDS listener of test_xds.py with an mTLS transport socket."""
    l = xds.listener()
    l["filter_chains"][0]["transport_socket"] = down_tls(source)
    return l


def client_context(pki: tls_certs.Pki, client: tls_certs.Leaf) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def https(port: int, ctx: ssl.SSLContext) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("server.local", port, context=ctx, timeout=10)
    conn._create_connection = lambda *a, **k: socket.create_connection(("127.0.0.1", port), 10)
    return conn


def get(conn: http.client.HTTPSConnection) -> tuple[int, str]:
    conn.request("GET", "/")
    r = conn.getresponse()
    r.read()
    serial = conn.sock.getpeercert()["serialNumber"].lower().lstrip("0")
    return r.status, serial


def served_serial(port: int, ctx: ssl.SSLContext) -> str | None:
    """The serial a new connection sees, or None if the handshake fails."""
    try:
        return get(https(port, ctx))[1]
    except (OSError, http.client.HTTPException):
        return None


def s_client_serial(port: int, pki: tls_certs.Pki, client: tls_certs.Leaf) -> str:
    """The serial of the certificate a new handshake presents, read by
    openssl s_client."""
    p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                        "-servername", "server.local", "-CAfile", str(pki.ca.cert),
                        "-cert", str(client.cert), "-key", str(client.key)],
                       input=b"", capture_output=True, timeout=20)
    m = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", p.stdout, re.S)
    assert m, (p.stdout + p.stderr).decode(errors="replace")[-2000:]
    return tls_certs.serial_of(m.group(0))


class TlsLoad(xds.Load):
    """test_xds.py's load generator over HTTPS (client certificate,
    CA-verified): fresh connections and one keep-alive connection."""

    def __init__(self, port: int, ctx: ssl.SSLContext):
        super().__init__(port)
        self.ctx = ctx
        self.threads.append(threading.Thread(target=self._run, args=(False,), daemon=True))

    def _run(self, keep_alive: bool):
        conn = None
        deadline = time.monotonic() + 120
        while not self.stop_flag.is_set() and time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = https(self.port, self.ctx)
                status, _ = get(conn)
                with self.lock:
                    if status == 200:
                        self.ok += 1
                    else:
                        self.failures.append(status)
            except Exception as e:  # noqa: BLE001 - every error is a failure
                with self.lock:
                    self.failures.append(repr(e))
                keep_alive = False
            if not keep_alive and conn is not None:
                conn.close()
                conn = None
            time.sleep(0.005)


def push(cp: xds.ControlPlane, node: str, name: str, resources: list) -> float:
    """Writes a file and waits until the control plane serves the new
    snapshot; returns that time. The delay is counted from the push, not
    from the write: on a loaded machine the control plane (a debug build
    polling its files) can take seconds to notice a file, for Envoy as for
    mesh."""
    before = cp.status(node).get("version")
    cp.write(name, resources)
    cp.wait_status(node, lambda s: s.get("version") not in (None, before))
    return time.monotonic()


def listener_port(proxy: harness.Proxy, name: str = "ingress", timeout: float = 10) -> int:
    """The port of a listener from LDS. Under load the control plane may
    serve a first snapshot without every file, so the listener may come
    after the proxy is ready."""
    deadline = time.monotonic() + timeout
    while True:
        ports = proxy._read_listeners()
        if name in ports:
            return ports[name]
        assert time.monotonic() < deadline, f"{proxy.kind}: no listener {name!r}: {ports}"
        time.sleep(0.05)


def start_mtls(kind, start_proxy, control_plane, pki, upstream_a, api_type, server_leaf,
               source: dict = ADS):
    cp = control_plane([kind])
    cp.write("clusters", [xds.eds_cluster("a")])
    cp.write("endpoints", [xds.assignment("a", [upstream_a.port])])
    cp.write("routes", [xds.routes()])
    cp.write("secrets", [cert_secret("server_cert", server_leaf), trust_secret("trust", pki)])
    cp.write("listeners", [mtls_listener(source)])
    proxy = xds.start_driven(kind, start_proxy, cp, kind, api_type)
    cp.wait_status(kind, lambda s: {"CDS", "EDS", "LDS", "RDS", "SDS"} <= set(s.get("acked", {})))
    return cp, proxy


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("api_type", xds.API_TYPES)
def test_certificate_rotated_over_sds_under_load(kind, api_type, start_proxy, control_plane,
                                                 pki, upstream_a):
    leaves = [pki.leaf(f"sds-rot{i}", dns=["server.local"]) for i in range(3)]
    client = pki.leaf("sds-client", uris=["spiffe://cluster.local/ns/default/sa/web"])
    cp, proxy = start_mtls(kind, start_proxy, control_plane, pki, upstream_a, api_type,
                           leaves[0])
    port = listener_port(proxy)
    ctx = client_context(pki, client)
    kept = https(port, ctx)
    assert get(kept) == (200, leaves[0].serial())
    assert s_client_serial(port, pki, client) == leaves[0].serial()
    # Without a client certificate the handshake is refused.
    plain = ssl.create_default_context(cafile=str(pki.ca.cert))
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        get(https(port, plain))

    with TlsLoad(port, ctx) as load:
        for leaf in leaves[1:]:
            time.sleep(1)
            t = push(cp, kind, "secrets", [cert_secret("server_cert", leaf), trust_secret("trust", pki)])
            xds.wait_until(lambda: get(https(port, ctx))[1] == leaf.serial(), t,
                           f"new handshakes present serial {leaf.serial()}", SEEN_WITHIN)
            assert s_client_serial(port, pki, client) == leaf.serial()
        time.sleep(1)
    assert load.ok > 50, load.ok
    assert load.failures == [], load.failures[:5]
    # The connection made before the rotations still works, with its
    # original certificate.
    assert get(kept) == (200, leaves[0].serial())
    kept.close()
    if kind == "mesh":
        dump = json.loads(proxy.admin_text("/config_dump"))
        sds_dump = [c for c in dump["configs"] if c["@type"].endswith("SecretsConfigDump")][0]
        secrets = {s["name"]: s for s in sds_dump["dynamic_active_secrets"]}
        assert set(secrets) == {"server_cert", "trust"}
        key = secrets["server_cert"]["resource"]["tls_certificate"]["private_key"]
        assert key == {"inline_string": "[redacted]"}, key
        assert "BEGIN CERTIFICATE" in json.dumps(secrets["server_cert"])
        certs = json.loads(proxy.admin_text("/certs"))
        serials = [c["serial_number"].lstrip("0") for e in certs["certificates"]
                   for c in e["cert_chain"]]
        assert serials == [leaves[2].serial()], serials


def test_bad_secret_is_nacked_and_the_old_certificate_keeps_serving(
        kind, start_proxy, control_plane, pki, upstream_a):
    leaves = [pki.leaf(f"sds-nack{i}", dns=["server.local"]) for i in range(3)]
    client = pki.leaf("sds-nack-client")
    cp, proxy = start_mtls(kind, start_proxy, control_plane, pki, upstream_a, "GRPC", leaves[0])
    port = listener_port(proxy)
    good = cp.status(kind)["acked"]["SDS"]
    # A certificate with somebody else's key.
    cp.write("secrets", [cert_secret("server_cert", leaves[1], key=leaves[2]),
                         trust_secret("trust", pki)])
    s = cp.wait_status(kind, lambda s: "SDS" in s.get("nacked", {}))
    if kind == "mesh":
        err = s["nacked"]["SDS"]["error"]
        assert 'secret "server_cert"' in err and "private_key" in err, err
    assert s["acked"]["SDS"] == good
    assert s_client_serial(port, pki, client) == leaves[0].serial()
    ctx = client_context(pki, client)
    assert get(https(port, ctx)) == (200, leaves[0].serial())
    if kind == "mesh":
        dump = json.loads(proxy.admin_text("/config_dump"))
        sds_dump = [c for c in dump["configs"] if c["@type"].endswith("SecretsConfigDump")][0]
        assert "private_key" in sds_dump["error_state"]["details"]
        assert harness.prometheus_value(proxy.admin_text("/stats/prometheus"),
                                        "mesh_sds_update_rejected", secret="server_cert") >= 1
    # The next good secret is ACKed and served.
    t = push(cp, kind, "secrets", [cert_secret("server_cert", leaves[1]), trust_secret("trust", pki)])
    cp.wait_status(kind, lambda s: s.get("acked", {}).get("SDS") not in (None, good))
    xds.wait_until(lambda: s_client_serial(port, pki, client) == leaves[1].serial(), t,
                   "the good certificate", SEEN_WITHIN)


@pytest.mark.parametrize("api_type", xds.API_TYPES)
def test_secrets_on_their_own_sds_stream(kind, api_type, start_proxy, control_plane, pki,
                                         upstream_a):
    """`sds_config.api_config_source`: the secrets come on a
    SecretDiscoveryService stream of their own (GRPC or DELTA_GRPC), the
    rest over ADS."""
    leaves = [pki.leaf(f"sds-api{i}", dns=["server.local"]) for i in range(2)]
    client = pki.leaf("sds-api-client")
    cp, proxy = start_mtls(kind, start_proxy, control_plane, pki, upstream_a, "GRPC", leaves[0],
                           source=xds.api_source(api_type))
    port = listener_port(proxy)
    ctx = client_context(pki, client)
    assert get(https(port, ctx)) == (200, leaves[0].serial())
    t = push(cp, kind, "secrets", [cert_secret("server_cert", leaves[1]), trust_secret("trust", pki)])
    xds.wait_until(lambda: get(https(port, ctx))[1] == leaves[1].serial(), t,
                   "the rotated certificate", SEEN_WITHIN)
    assert s_client_serial(port, pki, client) == leaves[1].serial()


def test_static_listener_with_secrets_over_ads(kind, start_proxy, control_plane, pki,
                                               upstream_a):
    """A static mTLS listener whose secrets come over ADS (no LDS/CDS): the
    proxy is ready once they arrived, and rotates with them."""
    leaves = [pki.leaf(f"sds-static{i}", dns=["server.local"]) for i in range(2)]
    client = pki.leaf("sds-static-client")
    cp = control_plane([kind])
    cp.write("secrets", [cert_secret("server_cert", leaves[0]), trust_secret("trust", pki)])
    xds.settle()
    listener = harness.hcm_listener("ingress", {"virtual_hosts": [{
        "name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "a"}}]}]})
    listener["filter_chains"][0]["transport_socket"] = down_tls()
    doc = {
        "node": {"id": kind, "cluster": "test"},
        "admin": {"address": harness.socket_address(0)},
        "dynamic_resources": {"ads_config": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}]}},
        "static_resources": {
            "listeners": [listener],
            "clusters": [harness.static_cluster("xds_cluster", [cp.port], http2=True),
                         harness.static_cluster("a", [upstream_a.port])],
        },
    }
    proxy = start_proxy(kind, yaml.safe_dump(doc))
    port = proxy.port("ingress")
    ctx = client_context(pki, client)
    harness.wait_until(lambda: served_serial(port, ctx) == leaves[0].serial(), timeout=10,
                       what="the certificate from SDS")
    cp.wait_status(kind, lambda s: "SDS" in s.get("acked", {}))
    t = push(cp, kind, "secrets", [cert_secret("server_cert", leaves[1]), trust_secret("trust", pki)])
    xds.wait_until(lambda: get(https(port, ctx))[1] == leaves[1].serial(), t,
                   "the rotated certificate", SEEN_WITHIN)


class MtlsUpstream:
    """An HTTPS server requiring a client certificate from the test CA; it
    answers with the serial of the client certificate and closes the
    connection, so each request shows the certificate of a new handshake."""

    def __init__(self, pki: tls_certs.Pki, leaf: tls_certs.Leaf):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
        ctx.load_verify_locations(str(pki.ca.cert))
        ctx.verify_mode = ssl.CERT_REQUIRED

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                der = self.connection.getpeercert(binary_form=True)
                body = tls_certs.der_serial(der).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("api_type", xds.API_TYPES)
def test_upstream_mtls_cluster_from_cds_with_sds_client_certificate(
        kind, api_type, start_proxy, control_plane, pki):
    server = pki.leaf("sds-upstream", dns=["backend.local"])
    clients = [pki.leaf(f"sds-up-client{i}", uris=["spiffe://cluster.local/ns/default/sa/web"])
               for i in range(2)]
    upstream = MtlsUpstream(pki, server)
    try:
        cp = control_plane([kind])
        source = xds.api_source(api_type)
        secure = xds.eds_cluster("a")
        secure["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UP_TLS, "sni": "backend.local",
            # Istio's shape: the workload certificate and the root over SDS
            # on a stream of their own, the peer's name checked by a default
            # validation context combined with the root.
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [sds("client_cert", source)],
                "combined_validation_context": {
                    "default_validation_context": {"match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "backend.local"}}]},
                    "validation_context_sds_secret_config": sds("ROOTCA", source)},
            }}}
        cp.write("clusters", [secure])
        cp.write("endpoints", [xds.assignment("a", [upstream.port])])
        cp.write("routes", [xds.routes()])
        cp.write("secrets", [cert_secret("client_cert", clients[0]), trust_secret("ROOTCA", pki)])
        cp.write("listeners", [xds.listener()])
        proxy = xds.start_driven(kind, start_proxy, cp, kind, api_type)
        port = listener_port(proxy)
        cp.wait_status(kind, lambda s: {"CDS", "SDS"} <= set(s.get("acked", {})))
        r = harness.request(port, "GET", "/")
        assert (r.status, r.body.decode()) == (200, clients[0].serial())
        t = push(cp, kind, "secrets", [cert_secret("client_cert", clients[1]), trust_secret("ROOTCA", pki)])
        xds.wait_until(lambda: harness.request(port, "GET", "/").body.decode()
                       == clients[1].serial(), t, "the rotated client certificate",
                       SEEN_WITHIN)
    finally:
        upstream.stop()


def test_lds_listener_with_filter_chains_chosen_by_sni(kind, start_proxy, control_plane, pki,
                                                       upstream_a, upstream_b):
    """A listener from LDS with the TLS inspector and three filter chains:
    TLS for api.example.com (certificate from SDS, routes from RDS), TLS
    for denied.example.com behind a network RBAC that denies everyone, and
    plain text. A route update reaches the TLS chain in place."""
    leaf = pki.leaf("sds-sni", dns=["api.example.com", "denied.example.com"])
    cp = control_plane([kind])
    cp.write("clusters", [xds.eds_cluster("a"), xds.eds_cluster("b")])
    cp.write("endpoints", [xds.assignment("a", [upstream_a.port]),
                           xds.assignment("b", [upstream_b.port])])
    cp.write("routes", [xds.routes()])
    cp.write("secrets", [cert_secret("api_cert", leaf)])
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": DOWN_TLS,
        "common_tls_context": {"tls_certificate_sds_secret_configs": [sds("api_cert")]}}}
    base = xds.listener()
    hcm = base["filter_chains"][0]["filters"][0]
    plain = json.loads(json.dumps(hcm))
    plain["typed_config"].pop("rds")
    plain["typed_config"]["route_config"] = {"virtual_hosts": [{
        "name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
                                                     "direct_response": {"status": 200, "body": {"inline_string": "plain"}}}]}]}
    deny = {"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        "stat_prefix": "deny", "rules": {"action": "DENY", "policies": {"all": {
            "permissions": [{"any": True}], "principals": [{"any": True}]}}}}}
    base["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]
    base["filter_chains"] = [
        {"filter_chain_match": {"server_names": ["api.example.com"]}, "filters": [hcm],
         "transport_socket": tls},
        {"filter_chain_match": {"server_names": ["denied.example.com"]}, "filters": [deny, hcm],
         "transport_socket": tls},
        {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [plain]},
    ]
    cp.write("listeners", [base])
    proxy = xds.start_driven(kind, start_proxy, cp, kind, "GRPC")
    port = listener_port(proxy)
    cp.wait_status(kind, lambda s: {"LDS", "RDS", "SDS"} <= set(s.get("acked", {})))
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))

    def https_get(host: str, path: str = "/") -> str:
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
        conn._create_connection = lambda *a, **k: socket.create_connection(("127.0.0.1", port),
                                                                           10)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            return r.getheader("x-upstream")
        finally:
            conn.close()

    assert https_get("api.example.com") == "a"
    assert harness.request(port, "GET", "/").body == b"plain"
    with pytest.raises((OSError, http.client.HTTPException)):
        https_get("denied.example.com")
    t = push(cp, kind, "routes", [xds.routes(default="b")])
    xds.wait_until(lambda: https_get("api.example.com", "/x") == "b", t, "route update",
                   SEEN_WITHIN)
