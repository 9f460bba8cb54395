"""Custom access-log formats and filters, compared with Envoy on the same YAML.

Istio's default text format and a JSON format are logged by Envoy and mesh
for the same requests and compared field by field (timings and ephemeral
ports excluded: the upstream connection's local address is compared for
presence); the verified
client certificate's SPIFFE ID reaches `%DOWNSTREAM_PEER_URI_SAN%` under
both proxies; access-log filters pick the same lines; bad formats are
refused with the field path.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import subprocess
import time

import pytest

import harness
import tls_certs
from test_tls import INSPECTOR, WEB_ID, curl, down_tls, tls_listener

FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"

# Istio's default proxy access-log format (meshConfig accessLogFormat unset).
ISTIO_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    '%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% '
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    '%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% '
    '%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n'
)
ISTIO_LINE = re.compile(
    r'^\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<proto>\S+)" '
    r'(?P<code>\d+) (?P<flags>\S+) (?P<details>\S+) (?P<term>\S+) "(?P<tfr>[^"]*)" '
    r'(?P<rx>\d+) (?P<tx>\d+) (?P<duration>\d+) (?P<ust>\S+) "(?P<xff>[^"]*)" '
    r'"(?P<ua>[^"]*)" "(?P<rid>[^"]*)" "(?P<authority>[^"]*)" "(?P<uhost>[^"]*)" '
    r'(?P<cluster>\S+) (?P<ulocal>\S+) (?P<dlocal>\S+) (?P<dremote>\S+) (?P<sni>\S+) '
    r'(?P<route>\S+)$')

JSON_FORMAT = {
    "start_time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "user_agent": "%REQ(USER-AGENT)%",
    "ua_prefix": "%REQ(USER-AGENT):5%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "missing": "%REQ(X-NOT-SENT)%",
    "mixed": "id=%REQ(X-REQUEST-ID)% nope=%REQ(X-NOT-SENT)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "route_name": "%ROUTE_NAME%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "upstream_header": "%RESP(X-UPSTREAM)%",
    "peer": {"ip": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
             "local_ip": "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%"},
    "constant": 7,
    # Not a gRPC request: null.
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "tx_duration": "%RESPONSE_TX_DURATION%",
}

ROUTES = """
name: local
virtual_hosts:
- name: all
  domains: ["example.com"]
  routes:
  - name: dead_route
    match: {prefix: "/dead"}
    route: {cluster: dead}
  - name: default_route
    match: {prefix: "/"}
    route: {cluster: a}
"""

# (path, host, extra headers, expected status)
REQUESTS = [
    ("/ok?x=1", "example.com", {}, 200),
    ("/status/503", "example.com", {"x-forwarded-for": "10.9.9.9"}, 503),
    ("/dead", "example.com", {}, 503),
    ("/nowhere", "unknown.example.org", {"x-debug": "1"}, 404),
]


def file_log(path, log_format=None, flt=None) -> dict:
    tc = {"@type": FILE_LOG, "path": str(path)}
    if log_format is not None:
        tc["log_format"] = log_format
    entry = {"name": "envoy.access_loggers.file", "typed_config": tc}
    if flt is not None:
        entry["filter"] = flt
    return entry


def read_lines(path, n: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def flush(proxy: harness.Proxy) -> None:
    """Envoy buffers file access logs for up to 10 s; reopening flushes them."""
    if proxy.kind == "envoy":
        host, aport = proxy.admin_address.rsplit(":", 1)
        assert harness.request(int(aport), "POST", "/reopen_logs", host=None, addr=host,
                               body=b"").status == 200


def send_requests(port: int) -> None:
    for i, (path, host, extra, status) in enumerate(REQUESTS):
        headers = {"user-agent": "mesh-tests/1", "x-request-id": f"rid-{i}", **extra}
        r = harness.request(port, "GET", path, host=host, headers=headers)
        assert r.status == status, (path, r.status, r.body[:200])


# --------------------------------------------------------------------------
# Istio's text format and a JSON format, under both proxies


@pytest.fixture(scope="module")
def formatted_logs(tmp_path_factory, upstream_a, refused):
    """Per proxy kind: (proxy port, Istio lines, JSON lines, filtered logs)."""
    out = {}
    for kind in harness.KINDS:
        if kind == "mesh" and harness.mesh_missing_reason():
            continue
        d = tmp_path_factory.mktemp(f"logs-{kind}")
        filters = {
            "5xx": {"status_code_filter": {"comparison": {
                "op": "GE", "value": {"default_value": 500, "runtime_key": "k"}}}},
            "uf": {"response_flag_filter": {"flags": ["UF"]}},
            "anyflag": {"response_flag_filter": {}},
            "debug": {"header_filter": {"header": {"name": "x-debug",
                                                   "string_match": {"exact": "1"}}}},
            "ok_and": {"and_filter": {"filters": [
                {"status_code_filter": {"comparison": {
                    "op": "EQ", "value": {"default_value": 200, "runtime_key": "k"}}}},
                {"not_health_check_filter": {}}]}},
            "or": {"or_filter": {"filters": [
                {"duration_filter": {"comparison": {
                    "op": "GE", "value": {"default_value": 60000, "runtime_key": "k"}}}},
                {"status_code_filter": {"comparison": {
                    "op": "EQ", "value": {"default_value": 404, "runtime_key": "k"}}}}]}},
        }
        logs = [file_log(d / "istio.log", {"text_format_source": {"inline_string": ISTIO_FORMAT}}),
                file_log(d / "json.log", {"json_format": JSON_FORMAT})]
        logs += [file_log(d / f"{name}.log", {"text_format": "%RESPONSE_CODE% %REQ(:PATH)%\n"}, f)
                 for name, f in filters.items()]
        cfg = harness.simple_http_bootstrap(
            ROUTES, [harness.static_cluster("a", upstream_a.port),
                     harness.static_cluster("dead", refused)],
            {"access_log": logs})
        with harness.start_proxy(kind, cfg) as proxy:
            port = proxy.port()
            send_requests(port)
            flush(proxy)
            istio = read_lines(d / "istio.log", len(REQUESTS))
            js = read_lines(d / "json.log", len(REQUESTS))
            time.sleep(0.3)
            filtered = {name: sorted(read_lines(d / f"{name}.log", 0, timeout=0))
                        for name in filters}
        out[kind] = (port, istio, js, filtered)
    if "mesh" not in out:
        pytest.skip(harness.mesh_missing_reason() or "mesh not built")
    return out


def _istio_fields(line: str) -> dict:
    m = ISTIO_LINE.match(line)
    assert m, f"not Istio's format: {line!r}"
    return m.groupdict()


def test_istio_text_format_matches_envoy(formatted_logs, upstream_a, refused):
    by_kind = {}
    for kind, (port, istio, _, _) in formatted_logs.items():
        assert len(istio) == len(REQUESTS), (kind, istio)
        rows = [_istio_fields(l) for l in istio]
        rows.sort(key=lambda r: r["rid"])
        for r in rows:
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["start"]), r
            assert r["dlocal"] == f"127.0.0.1:{port}", (kind, r)
            if r["xff"] == "-":
                assert r["dremote"].startswith("127.0.0.1:"), (kind, r)
            else:
                # use_remote_address false (the default): the remote address
                # is the last x-forwarded-for entry.
                assert r["dremote"] == r["xff"] + ":0", (kind, r)
            int(r["duration"])
        by_kind[kind] = rows
    if "envoy" not in by_kind:
        return
    # Timings, ephemeral ports and the upstream connection's local address
    # differ between the two runs by nature.
    skip = {"start", "duration", "ust", "dlocal", "dremote", "ulocal"}
    for env, mesh in zip(by_kind["envoy"], by_kind["mesh"]):
        if env["flags"] == "UF":
            # Envoy's local reply body names the socket error (so its
            # length differs); the details and the reason name it too, as
            # under mesh.
            skip_here = skip | {"tx"}
            assert mesh["tfr"] == "delayed_connect_error:_Connection_refused", mesh
        else:
            skip_here = skip
        diff = {k: (env[k], mesh[k]) for k in env if k not in skip_here and env[k] != mesh[k]}
        assert not diff, f"fields differ (envoy, mesh): {diff}"
        # The upstream connection's local address: on the lines of upstream
        # responses only, under both.
        assert (env["ulocal"] == "-") == (mesh["ulocal"] == "-"), (env, mesh)
    ok = by_kind["mesh"][0]
    assert ok["ulocal"].startswith("127.0.0.1:"), ok
    assert (ok["code"], ok["details"], ok["cluster"], ok["route"]) == \
        ("200", "via_upstream", "a", "default_route")
    assert ok["uhost"] == f"127.0.0.1:{upstream_a.port}"
    assert by_kind["mesh"][1]["xff"] == "10.9.9.9"
    assert (by_kind["mesh"][3]["flags"], by_kind["mesh"][3]["details"]) == ("NR", "route_not_found")


def test_json_format_matches_envoy(formatted_logs):
    by_kind = {}
    for kind, (port, _, js, _) in formatted_logs.items():
        assert len(js) == len(REQUESTS), (kind, js)
        rows = sorted((json.loads(l) for l in js), key=lambda r: r["request_id"])
        for r in rows:
            assert isinstance(r["response_code"], int) and isinstance(r["bytes_sent"], int)
            assert isinstance(r["duration"], int)
            assert r["missing"] is None and r["grpc_status"] is None
            # Only for a response from the upstream.
            assert isinstance(r["tx_duration"], int) == (r["request_id"] in ("rid-0", "rid-1")), r
            assert r["constant"] == 7
            ip = "10.9.9.9" if r["request_id"] == "rid-1" else "127.0.0.1"
            assert r["peer"] == {"ip": ip, "local_ip": "127.0.0.1"}
        by_kind[kind] = rows
    mesh = by_kind["mesh"]
    assert mesh[0]["method"] == "GET" and mesh[0]["path"] == "/ok?x=1"
    assert mesh[0]["mixed"] == "id=rid-0 nope=-"
    assert mesh[0]["ua_prefix"] == "mesh-"
    assert mesh[0]["upstream_header"] == "a"
    assert mesh[3]["upstream_host"] is None and mesh[3]["route_name"] is None
    if "envoy" not in by_kind:
        return
    for env, m in zip(by_kind["envoy"], mesh):
        skip = {"start_time", "duration", "tx_duration"}
        if env["response_flags"] == "UF":
            skip.add("bytes_sent")  # Envoy's local reply body names the socket error
        diff = {k: (env.get(k), m.get(k)) for k in set(env) | set(m)
                if k not in skip and env.get(k) != m.get(k)}
        assert not diff, f"fields differ (envoy, mesh): {diff}"


def test_filters_pick_the_same_lines_as_envoy(formatted_logs):
    mesh = formatted_logs["mesh"][3]
    assert mesh == {
        "5xx": ["503 /dead", "503 /status/503"],
        "uf": ["503 /dead"],
        "anyflag": ["404 /nowhere", "503 /dead"],
        "debug": ["404 /nowhere"],
        "ok_and": ["200 /ok?x=1"],
        "or": ["404 /nowhere"],
    }
    if "envoy" in formatted_logs:
        assert formatted_logs["envoy"][3] == mesh


# --------------------------------------------------------------------------
# mTLS: the verified client identity in the log


TLS_FORMAT = ("%DOWNSTREAM_PEER_URI_SAN%|%DOWNSTREAM_PEER_DNS_SAN%|%DOWNSTREAM_PEER_SUBJECT%|"
              "%DOWNSTREAM_PEER_ISSUER%|%DOWNSTREAM_PEER_SERIAL%|%DOWNSTREAM_PEER_FINGERPRINT_256%|"
              "%DOWNSTREAM_TLS_VERSION%|%DOWNSTREAM_TLS_CIPHER%|%REQUESTED_SERVER_NAME%|"
              "%REQ(:PATH)%\n")

TO_A = harness.catch_all_routes("a")


@pytest.mark.parametrize("kind", harness.kind_params())
def test_peer_identity_reaches_the_access_log(kind, start_proxy, tmp_path, upstream_a):
    pki = tls_certs.Pki(tmp_path / "pki")
    server = pki.leaf("server", dns=["server.local"])
    web = pki.leaf("web", uris=[WEB_ID], dns=["web.local"])
    log, plain_log = tmp_path / "tls.log", tmp_path / "plain.log"
    # The TLS inspector gives Envoy %REQUESTED_SERVER_NAME% (Istio always has it).
    listener = tls_listener("mtls", TO_A, down_tls(pki, server, require=True))
    listener["listener_filters"] = [INSPECTOR]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [file_log(log, {"text_format": TLS_FORMAT})]
    plain = harness.hcm_listener(
        "plain", TO_A, {"access_log": [file_log(plain_log, {"text_format": TLS_FORMAT})]})
    cfg = harness.bootstrap([listener, plain], [harness.static_cluster("a", upstream_a.port)])
    proxy = start_proxy(kind, cfg)
    rc, status, _ = curl(proxy.port("mtls"), "/tls", pki=pki, cert=web, extra=["--http1.1"])
    assert (rc, status) == (0, "200 1.1")
    assert harness.request(proxy.port("plain"), "GET", "/plain").status == 200
    flush(proxy)
    lines = read_lines(log, 1) + read_lines(plain_log, 1)
    assert len(lines) == 2, lines
    der = ssl.PEM_cert_to_DER_cert(web.cert.read_text())
    uri, dns, subject, issuer, serial, fp, version, cipher, sni, path = lines[0].split("|")
    assert (uri, dns, subject, issuer, path) == (WEB_ID, "web.local", "CN=web",
                                                 "CN=mesh test CA", "/tls")
    # Hex of the serial's bytes, as Envoy prints it (a leading 0 kept).
    want = web.serial()
    assert serial == ("0" + want if len(want) % 2 else want)
    assert fp == hashlib.sha256(der).hexdigest()
    assert version == "TLSv1.3" and cipher.startswith("TLS_"), (version, cipher)
    assert sni == "server.local"
    # Over plain text every TLS operator is "-".
    assert lines[1] == "-|-|-|-|-|-|-|-|-|/plain"


# --------------------------------------------------------------------------
# bad formats and filters


@pytest.mark.parametrize("bad, error", [
    ({"text_format": "%NOT_AN_OPERATOR%"}, "log_format.text_format: unsupported command operator"),
    ({"json_format": {"a": "%REQ(%"}}, "log_format.json_format.a:"),
    ({"text_format_source": {"inline_string": "%START_TIME(%Q)%"}},
     "log_format.text_format_source: START_TIME format"),
])
def test_bad_formats_are_refused_with_the_field_path(bad, error, tmp_path):
    cfg = harness.simple_http_bootstrap(
        ROUTES, [harness.static_cluster("a", 1)],
        {"access_log": [file_log(tmp_path / "x.log", bad)]})
    path = tmp_path / "bad.yaml"
    path.write_text(cfg)
    p = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(path)],
                       capture_output=True, text=True, timeout=30)
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    assert p.returncode != 0
    assert error in p.stderr + p.stdout, p.stderr + p.stdout


def test_unsupported_filters_are_refused(tmp_path):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    cfg = harness.simple_http_bootstrap(
        ROUTES, [harness.static_cluster("a", 1)],
        {"access_log": [file_log(tmp_path / "x.log", None,
                                 {"runtime_filter": {"runtime_key": "k"}})]})
    path = tmp_path / "bad.yaml"
    path.write_text(cfg)
    p = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert "access_log[0].filter.runtime_filter (access log filter runtime_filter)" in p.stderr + p.stdout


# --------------------------------------------------------------------------
# gRPC: trailers in the format, grpc_status_filter


GRPC_ROUTES = """
virtual_hosts:
- name: grpc
  domains: ["*"]
  routes:
  - match: {prefix: "/meshtest.EchoService/"}
    route: {cluster: grpc, timeout: 30s}
"""


@pytest.mark.parametrize("kind", harness.kind_params())
def test_grpc_status_from_trailers_and_the_grpc_status_filter(kind, start_proxy, tmp_path,
                                                              grpc_server):
    import grpc

    all_log, failed_log, nf_log, st_log = (tmp_path / n for n in
                                           ("all.log", "failed.log", "nf.log", "status.log"))
    fmt = {"text_format": "%REQ(:PATH)% %RESPONSE_CODE% h=%RESP(GRPC-STATUS)% "
                          "t=%TRAILER(GRPC-STATUS)% %TRAILER(GRPC-MESSAGE):8%\n"}
    logs = [
        file_log(all_log, fmt),
        file_log(failed_log, fmt, {"grpc_status_filter": {"statuses": ["OK"], "exclude": True}}),
        file_log(nf_log, fmt, {"grpc_status_filter": {"statuses": ["NOT_FOUND", "UNIMPLEMENTED"]}}),
        file_log(st_log, {"text_format": "%REQ(:PATH)% %GRPC_STATUS% %GRPC_STATUS(SNAKE_STRING)% "
                                         "%GRPC_STATUS(NUMBER)%\n"}),
    ]
    cfg = harness.simple_http_bootstrap(
        GRPC_ROUTES, [harness.static_cluster("grpc", grpc_server.port, http2=True)],
        {"codec_type": "AUTO", "access_log": logs})
    proxy = start_proxy(kind, cfg)
    pb2 = grpc_server.pb2
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port()}",
                               options=[("grpc.enable_http_proxy", 0)]) as ch:
        stub = grpc_server.pb2_grpc.EchoServiceStub(ch)
        assert stub.Echo(pb2.EchoRequest(message="hi", seq=1), timeout=10).message == "hi"
        with pytest.raises(grpc.RpcError):
            stub.Missing(pb2.EchoRequest(message="widget-7"), timeout=10)
        with pytest.raises(grpc.RpcError):
            ch.unary_unary("/meshtest.EchoService/NoSuchMethod")(b"", timeout=10)
    flush(proxy)
    got = {name: sorted(read_lines(p, n)) for name, p, n in
           (("all", all_log, 3), ("failed", failed_log, 2), ("nf", nf_log, 2))}
    assert len(got["all"]) == 3, got
    echo = [l for l in got["all"] if l.startswith("/meshtest.EchoService/Echo ")]
    # grpc-status in the trailers (with an empty grpc-message: "", not "-").
    assert echo == ["/meshtest.EchoService/Echo 200 h=- t=0 "], got
    # Errors come trailers-only: grpc-status in the headers.
    assert got["failed"] == ["/meshtest.EchoService/Missing 200 h=5 t=- -",
                             "/meshtest.EchoService/NoSuchMethod 200 h=12 t=- -"], got
    assert got["nf"] == got["failed"], got
    assert sorted(read_lines(st_log, 3)) == [
        "/meshtest.EchoService/Echo OK OK 0",
        "/meshtest.EchoService/Missing NotFound NOT_FOUND 5",
        "/meshtest.EchoService/NoSuchMethod Unimplemented UNIMPLEMENTED 12",
    ]


# --------------------------------------------------------------------------
# tcp_proxy


TCP_JSON = {
    "code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%", "rx": "%BYTES_RECEIVED%",
    "tx": "%BYTES_SENT%", "upstream": "%UPSTREAM_HOST%", "cluster": "%UPSTREAM_CLUSTER%",
    "method": "%REQ(:METHOD)%", "protocol": "%PROTOCOL%",
    "peer": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
}


@pytest.mark.parametrize("kind", harness.kind_params())
def test_tcp_proxy_json_format_and_filter(kind, start_proxy, tmp_path, tcp_echo, refused):
    import socket

    log, failed = tmp_path / "tcp.log", tmp_path / "failed.log"
    listeners = []
    for name, cluster in (("tcp", "echo"), ("tcp_dead", "dead")):
        l = harness.tcp_listener(name, cluster)
        l["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [
            file_log(log, {"json_format": TCP_JSON}),
            file_log(failed, {"text_format": "%UPSTREAM_CLUSTER% %RESPONSE_FLAGS%\n"},
                     {"response_flag_filter": {"flags": ["UF"]}}),
        ]
        listeners.append(l)
    cfg = harness.bootstrap(listeners, [harness.static_cluster("echo", tcp_echo.port),
                                        harness.static_cluster("dead", refused)])
    proxy = start_proxy(kind, cfg)
    with socket.create_connection(("127.0.0.1", proxy.port("tcp")), timeout=10) as s:
        s.sendall(b"x" * 1000)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got == b"x" * 1000
    with socket.create_connection(("127.0.0.1", proxy.port("tcp_dead")), timeout=10) as s:
        s.settimeout(10)
        assert s.recv(10) == b""
    time.sleep(0.5)
    flush(proxy)
    rows = sorted((json.loads(l) for l in read_lines(log, 2)), key=lambda r: r["cluster"])
    # As Envoy's tcp_proxy, URX once the connect attempts are used up.
    assert rows[0].pop("flags") == "UF,URX", rows
    assert rows == [
        {"code": 0, "rx": 0, "tx": 0, "upstream": f"127.0.0.1:{refused}",
         "cluster": "dead", "method": None, "protocol": None, "peer": "127.0.0.1"},
        {"code": 0, "flags": "-", "rx": 1000, "tx": 1000, "upstream": f"127.0.0.1:{tcp_echo.port}",
         "cluster": "echo", "method": None, "protocol": None, "peer": "127.0.0.1"},
    ]
    assert read_lines(failed, 1) == ["dead UF,URX"]
