"""TLS through the real proxy, compared with Envoy on the same YAML.

Certificates are made at test time (tls_certs.py, openssl CLI). Covered:
mTLS with curl (client certificate and --cacert), a missing or foreign
client certificate refused at the handshake, ALPN and SNI with openssl
s_client, filter chains chosen by SNI (exact, wildcard, plain text on the
same port), TLS pass-through by SNI to a tcp_proxy, sidecar to sidecar mTLS
carrying HTTP/1.1, h2 and gRPC (mesh<->mesh, Envoy->mesh, mesh->Envoy) with
SPIFFE SAN checks, an upstream SAN mismatch, /certs, and bad input on a TLS
port (plain text, a truncated ClientHello, a stalled handshake).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import yaml

import harness
import tls_certs

DOWN_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UP_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
    },
}

SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
WEB_ID = "spiffe://cluster.local/ns/default/sa/web"


# --------------------------------------------------------------------------
# config builders


def down_tls(pki: tls_certs.Pki, leaf: tls_certs.Leaf, require: bool = True, sans=None,
             alpn=("h2", "http/1.1")) -> dict:
    common = {
        "tls_certificates": [{"certificate_chain": {"filename": str(leaf.cert)},
                              "private_key": {"filename": str(leaf.key)}}],
    }
    if alpn:
        common["alpn_protocols"] = list(alpn)
    if require or sans:
        vc = {"trusted_ca": {"filename": str(pki.ca.cert)}}
        if sans:
            vc["match_typed_subject_alt_names"] = sans
        common["validation_context"] = vc
    tc = {"@type": DOWN_TLS, "common_tls_context": common}
    if require:
        tc["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": tc}


def up_tls(pki: tls_certs.Pki, leaf: tls_certs.Leaf | None, sni: str | None = "server.local",
           sans=None) -> dict:
    common = {"validation_context": {"trusted_ca": {"filename": str(pki.ca.cert)}}}
    if sans:
        common["validation_context"]["match_typed_subject_alt_names"] = sans
    if leaf:
        common["tls_certificates"] = [{"certificate_chain": {"filename": str(leaf.cert)},
                                       "private_key": {"filename": str(leaf.key)}}]
    tc = {"@type": UP_TLS, "common_tls_context": common}
    if sni:
        tc["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": tc}


def uri_san(value: str, how: str = "exact") -> dict:
    return {"san_type": "URI", "matcher": {how: value}}


def tls_listener(name: str, routes, transport_socket: dict, port: int = 0, **chain_extra) -> dict:
    l = harness.hcm_listener(name, routes)
    l["address"] = harness.socket_address(port)
    l["filter_chains"][0]["transport_socket"] = transport_socket
    l["filter_chains"][0].update(chain_extra)
    return l


def direct(body: str) -> str:
    return harness.catch_all(f'direct_response: {{status: 200, body: {{inline_string: "{body}"}}}}')


TO_A = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/meshtest.EchoService/"}
    route: {cluster: grpc, timeout: 30s}
  - match: {prefix: "/"}
    route: {cluster: a}
"""


def curl(port: int, path: str = "/", host: str = "server.local", pki=None, cert=None,
         extra=()) -> tuple[int, str, str]:
    """(curl exit code, "STATUS VERSION", body)."""
    argv = ["curl", "-sS", "--max-time", "10", "--resolve", f"{host}:{port}:127.0.0.1",
            "-w", "\n%{http_code} %{http_version}"]
    if pki:
        argv += ["--cacert", str(pki.ca.cert)]
    if cert:
        argv += ["--cert", str(cert.cert), "--key", str(cert.key)]
    argv += list(extra) + [f"https://{host}:{port}{path}"]
    p = subprocess.run(argv, capture_output=True, timeout=20)
    out = p.stdout.decode(errors="replace")
    body, _, status = out.rpartition("\n")
    return p.returncode, status, body


def s_client(port: int, *args: str) -> str:
    p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                       input=b"", capture_output=True, timeout=20)
    return p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def stat(proxy: harness.Proxy, name: str, **labels) -> float:
    """The sum of every sample of `name` whose labels include `labels`.

    Envoy labels a listener's stats with its configured address
    (`127.0.0.1_0` for port 0), mesh with the bound one, so listener stats
    are read without the address label.
    """
    total = 0.0
    for n, ls, v in harness.prometheus_samples(proxy.admin_text("/stats/prometheus")):
        if n == name and all(ls.get(k) == v2 for k, v2 in labels.items()):
            total += v
    return total


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tls_certs.Pki:
    return tls_certs.Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_leaf(pki):
    return pki.leaf("server", dns=["server.local", "*.example.com", "api.example.com",
                                   "*.b.example.com", "backend.local"],
                    uris=[SERVER_ID])


@pytest.fixture(scope="module")
def web_leaf(pki):
    return pki.leaf("web", uris=[WEB_ID])


@pytest.fixture(scope="module")
def foreign_leaf(tmp_path_factory):
    other = tls_certs.Pki(tmp_path_factory.mktemp("other-pki"), name="other CA")
    return other.leaf("web", uris=[WEB_ID])


# --------------------------------------------------------------------------
# downstream TLS with curl and openssl


@pytest.fixture(scope="module", params=harness.kind_params())
def mtls_proxy(request, module_start_proxy, pki, server_leaf, upstream_a):
    cfg = harness.bootstrap(
        [tls_listener("mtls", TO_A, down_tls(pki, server_leaf, require=True,
                                             sans=[uri_san("spiffe://cluster.local/ns/default/", "prefix")])),
         tls_listener("tls_only", TO_A, down_tls(pki, server_leaf, require=False))],
        [harness.static_cluster("a", upstream_a.port),
         harness.static_cluster("grpc", upstream_a.port)],
    )
    return module_start_proxy(request.param, cfg)


def test_curl_with_client_certificate(mtls_proxy, pki, web_leaf):
    port = mtls_proxy.port("mtls")
    rc, status, body = curl(port, "/hello", pki=pki, cert=web_leaf, extra=["--http1.1"])
    assert rc == 0, body
    assert status == "200 1.1"
    info = json.loads(body)
    assert info["upstream"] == "a" and info["path"] == "/hello"
    assert info["headers"].get("x-forwarded-proto") == "https"
    # ALPN h2 is offered by the listener, so curl's default negotiates HTTP/2.
    rc, status, _ = curl(port, "/", pki=pki, cert=web_leaf)
    assert (rc, status) == (0, "200 2")
    assert stat(mtls_proxy, "envoy_listener_ssl_handshake") >= 2


def test_missing_or_foreign_client_certificate_is_refused(mtls_proxy, pki, foreign_leaf):
    port = mtls_proxy.port("mtls")
    before = stat(mtls_proxy, "envoy_listener_ssl_fail_verify_no_cert")
    rc, _, _ = curl(port, "/", pki=pki)
    assert rc != 0
    rc, _, _ = curl(port, "/", pki=pki, cert=foreign_leaf)
    assert rc != 0
    harness.wait_until(lambda: stat(mtls_proxy, "envoy_listener_ssl_fail_verify_no_cert") == before + 1,
                       what="fail_verify_no_cert counted")
    assert stat(mtls_proxy, "envoy_listener_ssl_fail_verify_error") >= 1


def test_server_without_client_auth_serves_plain_clients(mtls_proxy, pki):
    rc, status, body = curl(mtls_proxy.port("tls_only"), "/x", pki=pki)
    assert (rc, status) == (0, "200 2"), body
    # A client that does not trust the CA refuses the server.
    rc, _, _ = curl(mtls_proxy.port("tls_only"), "/x")
    assert rc == 60


def test_openssl_sees_alpn_sni_and_the_certificate(mtls_proxy, pki, web_leaf, server_leaf):
    port = mtls_proxy.port("mtls")
    common = ["-servername", "server.local", "-CAfile", str(pki.ca.cert),
              "-cert", str(web_leaf.cert), "-key", str(web_leaf.key)]
    out = s_client(port, "-alpn", "h2,http/1.1", *common)
    assert "ALPN protocol: h2" in out, out
    assert "Verify return code: 0 (ok)" in out
    assert "CN = server" in out
    out = s_client(port, "-alpn", "http/1.1", *common)
    assert "ALPN protocol: http/1.1" in out, out
    out = s_client(port, "-tls1_2", *common)
    assert "Protocol  : TLSv1.2" in out or "TLSv1.2" in out, out


# --------------------------------------------------------------------------
# filter chains by SNI, plain text beside TLS, pass-through by SNI


@pytest.fixture(scope="module", params=harness.kind_params())
def sni_proxy(request, module_start_proxy, pki, server_leaf):
    back_port = harness.free_port()
    front = harness.hcm_listener("front", direct("default"))
    chains = []
    for names, body in ((["api.example.com"], "api"), (["*.example.com"], "wildcard"),
                        (None, "default")):
        chain = harness.hcm_listener("x", direct(body))["filter_chains"][0]
        chain["transport_socket"] = down_tls(pki, server_leaf, require=False)
        chain["filter_chain_match"] = {"transport_protocol": "tls"}
        if names:
            chain["filter_chain_match"]["server_names"] = names
        chains.append(chain)
    plain = harness.hcm_listener("x", direct("plain"))["filter_chains"][0]
    plain["filter_chain_match"] = {"transport_protocol": "raw_buffer"}
    chains.append(plain)
    passthrough = harness.tcp_listener("x", "backend")["filter_chains"][0]
    passthrough["filter_chain_match"] = {"server_names": ["backend.local"],
                                         "transport_protocol": "tls"}
    chains.insert(0, passthrough)
    front["filter_chains"] = chains
    front["listener_filters"] = [INSPECTOR]
    back = tls_listener("back", direct("backend terminated TLS"),
                        down_tls(pki, server_leaf, require=False), port=back_port)
    cfg = harness.bootstrap([front, back], [harness.static_cluster("backend", back_port)])
    return module_start_proxy(request.param, cfg)


@pytest.mark.parametrize("host,body", [("api.example.com", "api"),
                                       ("www.example.com", "wildcard"),
                                       ("a.b.example.com", "wildcard"),
                                       ("server.local", "default")])
def test_chain_chosen_by_sni(sni_proxy, pki, host, body):
    rc, status, got = curl(sni_proxy.port("front"), "/", host=host, pki=pki)
    assert (rc, status, got) == (0, "200 2", body)


def test_plain_text_chain_on_the_same_port(sni_proxy):
    r = harness.request(sni_proxy.port("front"), path="/")
    assert (r.status, r.body) == (200, b"plain")


def test_tls_passthrough_by_sni(sni_proxy, pki):
    # The front listener does not terminate: the backend's handshake reaches
    # the client, which verifies it and sees the backend's answer.
    rc, status, got = curl(sni_proxy.port("front"), "/", host="backend.local", pki=pki)
    assert rc == 0, got
    assert got == "backend terminated TLS"


# --------------------------------------------------------------------------
# sidecar to sidecar mTLS: HTTP/1.1, h2 and gRPC, with SPIFFE SAN checks


CLIENT_ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/meshtest.EchoService/"}
    route: {cluster: server_h2, timeout: 30s}
  - match: {prefix: "/h2/"}
    route: {cluster: server_h2, prefix_rewrite: "/"}
  - match: {prefix: "/bad-san/"}
    route: {cluster: server_bad_san}
  - match: {prefix: "/"}
    route: {cluster: server_h1}
"""


def sidecars(start_proxy, client_kind, server_kind, pki, server_leaf, web_leaf, upstream_a,
             grpc_server):
    server_cfg = harness.bootstrap(
        [tls_listener("inbound", TO_A, down_tls(pki, server_leaf, require=True,
                                                sans=[uri_san(WEB_ID)]))],
        [harness.static_cluster("a", upstream_a.port),
         harness.static_cluster("grpc", grpc_server.port, http2=True)],
    )
    server = start_proxy(server_kind, server_cfg)
    sport = server.port("inbound")
    clusters = []
    for name, h2, sans in (("server_h1", False, [uri_san(SERVER_ID)]),
                           ("server_h2", True, [uri_san(SERVER_ID)]),
                           ("server_bad_san", False, [uri_san("spiffe://cluster.local/ns/default/sa/db")])):
        c = harness.static_cluster(name, sport, http2=h2)
        c["transport_socket"] = up_tls(pki, web_leaf, sans=sans)
        clusters.append(c)
    client_cfg = harness.bootstrap(
        [harness.hcm_listener("outbound", CLIENT_ROUTES, {"codec_type": "AUTO"})], clusters)
    client = start_proxy(client_kind, client_cfg)
    return client, server


PAIRS = [pytest.param(c, s, id=f"{c}-to-{s}") for c, s in
         (("mesh", "mesh"), ("envoy", "mesh"), ("mesh", "envoy"))]


@pytest.mark.parametrize("client_kind,server_kind", PAIRS)
def test_sidecar_mtls_http1_h2_grpc(start_proxy, client_kind, server_kind, pki, server_leaf,
                                    web_leaf, upstream_a, grpc_server):
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    client, server = sidecars(start_proxy, client_kind, server_kind, pki, server_leaf, web_leaf,
                              upstream_a, grpc_server)
    port = client.port("outbound")
    r = harness.request(port, path="/one")
    assert r.status == 200 and r.upstream == "a", r.body
    r = harness.h2_request(port, path="/h2/two")
    assert r.status == 200 and r.json()["path"] == "/two", r.body
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])
    try:
        stub = grpc_server.pb2_grpc.EchoServiceStub(ch)
        reply = stub.Echo(grpc_server.pb2.EchoRequest(message="over mTLS", seq=3), timeout=10)
        assert (reply.message, reply.seq) == ("over mTLS", 3)
        replies = list(stub.Chat((grpc_server.pb2.EchoRequest(message=f"m{i}", seq=i)
                                  for i in range(10)), timeout=20))
        assert [r.seq for r in replies] == list(range(10))
    finally:
        ch.close()
    # The server side saw verified client handshakes.
    assert stat(server, "envoy_listener_ssl_handshake") >= 2
    # An upstream whose certificate lacks the expected SPIFFE ID is refused.
    r = harness.request(port, path="/bad-san/x")
    assert r.status == 503, r.body
    assert stat(client, "envoy_cluster_ssl_fail_verify_san",
                envoy_cluster_name="server_bad_san") >= 1


# --------------------------------------------------------------------------
# /certs


def test_admin_certs_lists_loaded_certificates(mtls_proxy, server_leaf, pki):
    doc = json.loads(mtls_proxy.admin_text("/certs"))
    chains = [c for entry in doc["certificates"] for c in entry.get("cert_chain", [])]
    serial = server_leaf.serial()
    mine = [c for c in chains if c["serial_number"].lstrip("0") == serial]
    assert mine, doc
    c = mine[0]
    assert {"uri": SERVER_ID} in c["subject_alt_names"]
    assert {"dns": "server.local"} in c["subject_alt_names"]
    assert c["path"] == str(server_leaf.cert)
    assert int(c["days_until_expiration"]) in (1, 2)
    assert c["expiration_time"].endswith("Z")
    cas = [c for entry in doc["certificates"] for c in entry.get("ca_cert", [])]
    assert any(c["path"] == str(pki.ca.cert) for c in cas)


# --------------------------------------------------------------------------
# bad input on a TLS port


def client_hello_bytes() -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="server.local")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


@pytest.fixture(scope="module", params=harness.kind_params())
def strict_proxy(request, module_start_proxy, pki, server_leaf):
    l = tls_listener("tls", direct("ok"), down_tls(pki, server_leaf, require=False),
                     transport_socket_connect_timeout="1s")
    extra = ("-l", "debug") if request.param == "mesh" else ()
    return module_start_proxy(request.param, harness.bootstrap([l], []), extra_args=extra)


def test_plain_text_on_a_tls_port_is_closed(strict_proxy, pki):
    port = strict_proxy.port("tls")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert closed_within(s, 5)
    assert curl(port, "/", pki=pki)[1] == "200 2"
    assert stat(strict_proxy, "envoy_listener_ssl_connection_error") >= 1


@pytest.mark.parametrize("what", ["truncated", "stalled"])
def test_incomplete_handshakes_time_out_and_others_are_served(strict_proxy, pki, what):
    port = strict_proxy.port("tls")
    # Made before connecting: the handshake timer starts at accept.
    hello = client_hello_bytes()[:40]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        started = time.monotonic()
        if what == "truncated":
            s.sendall(hello)
        # Meanwhile another client is served.
        assert curl(port, "/", pki=pki)[1] == "200 2"
        assert closed_within(s, 6), "the stalled connection must be closed by the timeout"
        assert time.monotonic() - started >= 0.5
    if strict_proxy.kind == "mesh":
        # The connection is closed as the timer fires, just before the
        # failure is counted.
        harness.wait_until(lambda: stat(strict_proxy, "mesh_listener_ssl_handshake_error",
                                        reason="timeout") >= 1,
                           what="a handshake timeout counted")
        harness.wait_until(lambda: "downstream TLS handshake failed" in strict_proxy.stderr_text(),
                           what="a log line for the failed handshake")


# --------------------------------------------------------------------------
# rotation without restarts (SDS from a watched file, Kubernetes-style
# symlink swaps) under load


SDS_FILE = """
resources:
- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
  name: server_cert
  tls_certificate:
    certificate_chain: {{filename: "{dir}/cert.pem"}}
    private_key: {{filename: "{dir}/key.pem"}}
"""


class SecretDir:
    """A Kubernetes-style secret volume: `cert.pem` and `key.pem` are
    symlinks into `..data`, itself a symlink to a timestamped directory that
    each update replaces atomically."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def publish(self, cert: bytes, key: bytes) -> None:
        import os
        self.n += 1
        ts = self.root / f"..{self.n:04d}"
        ts.mkdir()
        (ts / "cert.pem").write_bytes(cert)
        (ts / "key.pem").write_bytes(key)
        tmp = self.root / "..data_tmp"
        os.symlink(ts.name, tmp)
        os.replace(tmp, self.root / "..data")
        for name in ("cert.pem", "key.pem"):
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)


def _get(port: int, ctx: ssl.SSLContext, conn=None):
    import http.client
    own = conn is None
    if own:
        conn = http.client.HTTPSConnection("server.local", port, context=ctx, timeout=10)
        conn._create_connection = lambda *a, **k: socket.create_connection(("127.0.0.1", port), 10)
    conn.request("GET", "/")
    r = conn.getresponse()
    body = r.read()
    serial = conn.sock.getpeercert()["serialNumber"].lower().lstrip("0")
    if own:
        conn.close()
    return r.status, body, serial


def test_rotation_under_load_keeps_serving(start_proxy, pki, tmp_path):
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    import threading
    secrets_dir = SecretDir(tmp_path / "secret")
    leaves = [pki.leaf(f"rot{i}", dns=["server.local"]) for i in range(4)]
    secrets_dir.publish(leaves[0].cert.read_bytes(), leaves[0].key.read_bytes())
    sds = tmp_path / "sds.yaml"
    sds.write_text(SDS_FILE.format(dir=secrets_dir.root))
    ts = down_tls(pki, leaves[0], require=False)
    common = ts["typed_config"]["common_tls_context"]
    del common["tls_certificates"]
    common["tls_certificate_sds_secret_configs"] = [{
        "name": "server_cert",
        "sds_config": {"path_config_source": {"path": str(sds)}, "resource_api_version": "V3"},
    }]
    proxy = start_proxy("mesh", harness.bootstrap([tls_listener("tls", direct("ok"), ts)], []))
    port = proxy.port("tls")
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))

    # A connection established before any rotation.
    import http.client
    kept = http.client.HTTPSConnection("server.local", port, context=ctx, timeout=10)
    kept._create_connection = lambda *a, **k: socket.create_connection(("127.0.0.1", port), 10)
    assert _get(port, ctx, kept)[2] == leaves[0].serial()

    failures, seen, done = [], [], threading.Event()

    def load():
        while not done.is_set():
            try:
                status, body, serial = _get(port, ctx)
                if status != 200 or body != b"ok":
                    failures.append((status, body))
                elif not seen or seen[-1] != serial:
                    seen.append(serial)
            except Exception as e:  # noqa: BLE001 - every failure counts
                failures.append(repr(e))

    workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for w in workers:
        w.start()
    started = time.monotonic()
    try:
        for leaf in leaves[1:]:
            time.sleep(4)
            secrets_dir.publish(leaf.cert.read_bytes(), leaf.key.read_bytes())
            harness.wait_until(lambda: _get(port, ctx)[2] == leaf.serial(), timeout=10,
                               what=f"new handshakes present serial {leaf.serial()}")
        # A bad update (a key that does not match, then garbage) is refused:
        # the last good certificate keeps serving.
        secrets_dir.publish(leaves[1].cert.read_bytes(), leaves[3].key.read_bytes())
        harness.wait_until(lambda: stat(proxy, "mesh_sds_update_rejected",
                                        secret="server_cert") >= 1, timeout=10,
                           what="the mismatched key refused")
        secrets_dir.publish(b"not a certificate", leaves[3].key.read_bytes())
        harness.wait_until(lambda: stat(proxy, "mesh_sds_update_rejected",
                                        secret="server_cert") >= 2, timeout=10,
                           what="the garbage certificate refused")
        while time.monotonic() - started < 20:
            time.sleep(0.5)
    finally:
        done.set()
        for w in workers:
            w.join(15)
    assert failures == [], failures[:5]
    # Handshakes racing a swap may finish in either order, so compare the
    # order in which each serial first appeared.
    assert list(dict.fromkeys(seen)) == [l.serial() for l in leaves], seen
    assert _get(port, ctx)[2] == leaves[3].serial()
    # The connection made before the rotations still works, with its
    # original certificate.
    status, body, serial = _get(port, ctx, kept)
    assert (status, body, serial) == (200, b"ok", leaves[0].serial())
    kept.close()
    assert stat(proxy, "mesh_sds_update_success", secret="server_cert") >= 4
    assert "secret update rejected" in proxy.stderr_text()
    doc = json.loads(proxy.admin_text("/certs"))
    # /certs writes whole bytes (as Envoy: `011e...`); the helper strips
    # leading zeros.
    serials = [c["serial_number"].lstrip("0") for e in doc["certificates"]
               for c in e["cert_chain"]]
    assert serials == [leaves[3].serial()]
