"""Listener-level `access_log`, compared with Envoy on the same YAML.

A listener's own access log writes one line per downstream connection when
it closes: connections no filter chain takes (flag `NR`, details
`filter_chain_not_found`, the line Istio logs with a `response_flag_filter`),
connections whose ClientHello never came (listener filter timeout), failed
TLS handshakes (`%DOWNSTREAM_TRANSPORT_FAILURE_REASON%`), and connections
served by tcp_proxy (bytes, upstream host, cluster, upstream local address)
or by an HTTP connection manager (bytes on the wire, `%PROTOCOL%`).
"""

from __future__ import annotations

import socket
import time

import pytest

import harness
import tls_certs
from test_access_log_format import file_log, flush, read_lines
from test_tls import INSPECTOR, curl, down_tls, tls_listener

FIELDS = ("flags", "code", "details", "rx", "tx", "uhost", "cluster", "dremote", "dlocal",
          "sni", "proto", "method", "dtfr", "ulocal", "attempts", "peer_uri")
FORMAT = "\t".join([
    "%RESPONSE_FLAGS%", "%RESPONSE_CODE%", "%RESPONSE_CODE_DETAILS%", "%BYTES_RECEIVED%",
    "%BYTES_SENT%", "%UPSTREAM_HOST%", "%UPSTREAM_CLUSTER%",
    "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "%DOWNSTREAM_LOCAL_ADDRESS%",
    "%REQUESTED_SERVER_NAME%", "%PROTOCOL%", "%REQ(:METHOD)%",
    "%DOWNSTREAM_TRANSPORT_FAILURE_REASON%", "%UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%",
    "%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "%DOWNSTREAM_PEER_URI_SAN%",
]) + "\n"

ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/"}
    route: {cluster: a}
"""

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


def _fields(line: str) -> dict:
    values = line.split("\t")
    assert len(values) == len(FIELDS), line
    return dict(zip(FIELDS, values))


def _closed(port: int, send: bytes = b"", half_close: bool = False) -> bytes:
    """Connects, sends `send` (then half-closes), and reads until the proxy closes."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        if send:
            s.sendall(send)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
    return got


@pytest.fixture(scope="module")
def listener_logs(tmp_path_factory, upstream_a, tcp_echo, refused):
    """Per proxy kind: {listener: [fields of each line]}, ports, NR-only lines."""
    out = {}
    pki = tls_certs.Pki(tmp_path_factory.mktemp("pki"))
    server = pki.leaf("server", dns=["server.local"])
    client = pki.leaf("client", uris=[CLIENT_ID])
    for kind in harness.KINDS:
        if kind == "mesh" and harness.mesh_missing_reason():
            continue
        d = tmp_path_factory.mktemp(f"listener-logs-{kind}")

        def logs(name):
            return [file_log(d / f"{name}.log", {"text_format": FORMAT}),
                    # Istio's listener access log: only connections no chain took.
                    file_log(d / "nr_only.log", {"text_format": "%RESPONSE_FLAGS% " + name + "\n"},
                             {"response_flag_filter": {"flags": ["NR"]}})]

        sni_only = harness.tcp_listener("sni_only", "echo")
        sni_only["filter_chains"][0]["filter_chain_match"] = {"server_names": ["only.example"]}
        sni_only["listener_filters"] = [INSPECTOR]
        sni_only["listener_filters_timeout"] = "0.5s"
        tcp = harness.tcp_listener("tcp", "echo")
        dead = harness.tcp_listener("dead", "dead")
        http = harness.hcm_listener("http", ROUTES)
        tls = tls_listener("tls", ROUTES, down_tls(pki, server, require=True))
        tls["listener_filters"] = [INSPECTOR]  # Envoy's %REQUESTED_SERVER_NAME% needs it
        listeners = [sni_only, tcp, dead, http, tls]
        for l in listeners:
            l["access_log"] = logs(l["name"])
        cfg = harness.bootstrap(listeners, [harness.static_cluster("echo", tcp_echo.port),
                                            harness.static_cluster("a", upstream_a.port),
                                            harness.static_cluster("dead", refused)])
        with harness.start_proxy(kind, cfg) as proxy:
            ports = {l["name"]: proxy.port(l["name"]) for l in listeners}
            # Plain text on a listener whose only chain wants an SNI: NR.
            assert _closed(ports["sni_only"], b"hello\r\n") == b""
            # Nothing sent: the TLS inspector gives up after 0.5 s.
            assert _closed(ports["sni_only"]) == b""
            assert _closed(ports["tcp"], b"x" * 101, half_close=True) == b"x" * 101
            assert _closed(ports["dead"]) == b""
            assert harness.request(ports["http"], "GET", "/one").status == 200
            # A handshake without the required client certificate, then one with it.
            rc, _, _ = curl(ports["tls"], "/", pki=pki, extra=["--http1.1"])
            assert rc != 0
            rc, status, _ = curl(ports["tls"], "/", pki=pki, cert=client, extra=["--http1.1"])
            assert (rc, status) == (0, "200 1.1")
            time.sleep(0.5)
            flush(proxy)
            counts = {"sni_only": 2, "tcp": 1, "dead": 1, "http": 1, "tls": 2}
            lines = {n: [_fields(l) for l in read_lines(d / f"{n}.log", c)]
                     for n, c in counts.items()}
            nr_only = read_lines(d / "nr_only.log", 1)
        out[kind] = (lines, ports, nr_only)
    if "mesh" not in out:
        pytest.skip(harness.mesh_missing_reason() or "mesh not built")
    return out


def test_no_filter_chain_match_is_logged_with_nr(listener_logs):
    for kind, (lines, ports, nr_only) in listener_logs.items():
        nr, timeout = lines["sni_only"]
        assert (nr["flags"], nr["code"], nr["details"]) == ("NR", "0", "filter_chain_not_found"), \
            (kind, nr)
        assert nr["dlocal"] == f"127.0.0.1:{ports['sni_only']}" and nr["dremote"] == "127.0.0.1"
        assert (nr["uhost"], nr["cluster"], nr["proto"], nr["attempts"]) == ("-", "-", "-", "0")
        # The listener filter timed out: logged, without a flag.
        assert (timeout["flags"], timeout["details"], timeout["rx"]) == ("-", "-", "0"), \
            (kind, timeout)
        # The response_flag_filter keeps only the NR line, from every listener.
        assert nr_only == ["NR sni_only"], (kind, nr_only)


def test_tcp_proxy_connections(listener_logs, tcp_echo, refused):
    for kind, (lines, ports, _) in listener_logs.items():
        [ok] = lines["tcp"]
        assert (ok["flags"], ok["rx"], ok["tx"], ok["cluster"], ok["attempts"]) == \
            ("-", "101", "101", "echo", "1"), (kind, ok)
        assert ok["uhost"] == f"127.0.0.1:{tcp_echo.port}" and ok["ulocal"] == "127.0.0.1"
        [dead] = lines["dead"]
        # URX: the connect attempts (one) are used up.
        assert dead["flags"] == "UF,URX", (kind, dead)
        assert (dead["uhost"], dead["cluster"], dead["rx"]) == \
            (f"127.0.0.1:{refused}", "dead", "0"), (kind, dead)


def test_http_connections(listener_logs):
    for kind, (lines, ports, _) in listener_logs.items():
        [h] = lines["http"]
        # A connection's line has no request: bytes are the connection's.
        assert (h["flags"], h["code"], h["proto"], h["method"], h["uhost"]) == \
            ("-", "0", "HTTP/1.1", "-", "-"), (kind, h)
        assert int(h["rx"]) > 30 and int(h["tx"]) > 100, (kind, h)


def test_tls_handshake_failure_and_success(listener_logs):
    for kind, (lines, ports, _) in listener_logs.items():
        failed, ok = lines["tls"]
        assert failed["flags"] == "-" and failed["dtfr"].startswith("TLS_error"), (kind, failed)
        assert failed["peer_uri"] == "-" and failed["rx"] == "0"
        assert (ok["flags"], ok["dtfr"], ok["peer_uri"]) == ("-", "-", CLIENT_ID), (kind, ok)
        assert ok["proto"] == "HTTP/1.1" and int(ok["rx"]) > 30, (kind, ok)
        assert failed["sni"] == ok["sni"] == "server.local", (kind, failed, ok)


def test_same_fields_as_envoy(listener_logs):
    if "envoy" not in listener_logs:
        pytest.skip("envoy not run")
    envoy, _, _ = listener_logs["envoy"]
    mesh, _, _ = listener_logs["mesh"]
    # Ports, addresses of the two runs, and what each proxy writes in its
    # own words (the TLS library's error text, server header lengths,
    # Envoy's inspector's note on a plain-text ClientHello) differ.
    skip = {"dlocal", "uhost", "dtfr", "tx"}
    for name in envoy:
        for e, m in zip(envoy[name], mesh[name]):
            diff = {k: (e[k], m[k]) for k in FIELDS if k not in skip and e[k] != m[k]}
            assert not diff, f"{name}: fields differ (envoy, mesh): {diff}"
            assert (e["uhost"] == "-") == (m["uhost"] == "-")
            assert (e["dtfr"] == "-") == (m["dtfr"] == "-") or name == "sni_only"
