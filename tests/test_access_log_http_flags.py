"""HTTP access-log lines that Envoy writes with more than one response flag,
and the request-side timings and upstream failure of an HTTP line, compared
with Envoy on the same YAML.

Envoy writes the flags in the order it set them: retries that end on a
connect failure log `URX,UF` (the retry decision comes before the last
try's failure is recorded), on a reset `URX,UC`; a retry refused by the
`max_retries` breaker logs `UO,UF`, tries that all ran out of their
`per_try_timeout` `URX,UT` (details `upstream_per_try_timeout`); an
injected delay adds `DI` (`DI,FI` with an abort), and a
`response_flag_filter` on `URX` picks the lines that carry it among
others. `%REQUEST_DURATION%` of a request with a body is
the time to its last byte (not `-`), `%BYTES_RECEIVED%` counts a chunked
body, `%UPSTREAM_TRANSPORT_FAILURE_REASON%` names the socket error of a
refused connect or the failed upstream TLS handshake, which the details
carry too, and the upstream
connection's local address is on the lines of upstream responses. A
request whose client leaves before the response is logged with `DC`.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

import harness
from test_access_log_format import file_log, flush, read_lines

FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"

JSON = {
    "path": "%REQ(:PATH)%",
    "code": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "tfr": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "rx": "%BYTES_RECEIVED%",
    "request_duration": "%REQUEST_DURATION%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "upstream": "%UPSTREAM_HOST%",
    "remote": "%UPSTREAM_REMOTE_ADDRESS%",
    "local": "%UPSTREAM_LOCAL_ADDRESS%",
    "local_ip": "%UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%",
    "local_port": "%UPSTREAM_LOCAL_PORT%",
}

# A pause between the chunks of a chunked request body.
PAUSE = 0.3


def _route(prefix: str, cluster: str, retry_on: str | None = None,
           per_try_timeout: str | None = None) -> dict:
    route = {"cluster": cluster, "timeout": "5s"}
    if retry_on:
        route["retry_policy"] = {"retry_on": retry_on, "num_retries": 1}
    if per_try_timeout:
        route["retry_policy"]["per_try_timeout"] = per_try_timeout
    return {"match": {"prefix": prefix}, "route": route}


def _chunked_post(port: int, path: str) -> bytes:
    """A chunked POST whose last chunk comes PAUSE seconds after the first."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: example.com\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
        time.sleep(PAUSE)
        s.sendall(b"6\r\n world\r\n0\r\n\r\n")
        return harness.read_http_response(s)


@pytest.fixture(scope="module")
def lines(tmp_path_factory, upstream_a, refused, hangup_upstream):
    """Per proxy kind: the JSON lines by path, and the URX-filtered lines."""
    out = {}
    for kind in harness.KINDS:
        if kind == "mesh" and harness.mesh_missing_reason():
            continue
        d = tmp_path_factory.mktemp(f"flags-{kind}")
        routes = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            _route("/uf-retried", "dead", "connect-failure"),
            _route("/uf-once", "dead"),
            _route("/uc-retried", "hangup", "reset"),
            _route("/uo", "dead_no_retries", "connect-failure"),
            _route("/delay/", "a", "5xx", "0.2s"),
            _route("/", "a"),
        ]}]}
        no_retries = harness.static_cluster("dead_no_retries", refused)
        no_retries["circuit_breakers"] = {"thresholds": [{"max_retries": 0}]}
        hcm = {
            "http_filters": [
                {"name": "envoy.filters.http.fault", "typed_config": {
                    "@type": FAULT_TYPE,
                    "delay": {"header_delay": {},
                              "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
                    "abort": {"header_abort": {},
                              "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}},
                harness.ROUTER_FILTER],
            "access_log": [
                file_log(d / "all.log", {"json_format": JSON}),
                file_log(d / "urx.log", {"text_format": "%REQ(:PATH)% %RESPONSE_FLAGS%\n"},
                         {"response_flag_filter": {"flags": ["URX"]}}),
            ],
        }
        cfg = harness.simple_http_bootstrap(
            routes, [harness.static_cluster("a", upstream_a.port),
                     harness.static_cluster("dead", refused),
                     harness.static_cluster("hangup", hangup_upstream.port),
                     no_retries], hcm)
        with harness.start_proxy(kind, cfg) as proxy:
            port = proxy.port()
            expect = {"/uf-retried": 503, "/uf-once": 503, "/uc-retried": 503, "/uo": 503,
                      "/delay/1": 504}
            for path, status in expect.items():
                assert harness.request(port, "GET", path).status == status, (kind, path)
            delayed = harness.request(port, "GET", "/delayed",
                                      headers={"x-envoy-fault-delay-request": "50"})
            assert delayed.status == 200, kind
            aborted = harness.request(port, "GET", "/aborted", headers={
                "x-envoy-fault-delay-request": "50", "x-envoy-fault-abort-request": "418"})
            assert aborted.status == 418, kind
            assert harness.request(port, "POST", "/post", body=b"x" * 1000).status == 200
            assert harness.status_of(_chunked_post(port, "/chunked")) == 200, kind
            n = len(expect) + 4
            flush(proxy)
            rows = [json.loads(l) for l in read_lines(d / "all.log", n)]
            assert len(rows) == n, (kind, rows)
            time.sleep(0.3)
            urx = sorted(read_lines(d / "urx.log", 0, timeout=0))
        out[kind] = ({r["path"]: r for r in rows}, urx)
    if "mesh" not in out:
        pytest.skip(harness.mesh_missing_reason() or "mesh not built")
    return out


def test_several_flags_on_one_line(lines):
    rows, urx = lines["mesh"]
    flags = {p: r["flags"] for p, r in rows.items()}
    assert flags == {
        "/uf-retried": "URX,UF",
        "/uf-once": "UF",
        "/uc-retried": "URX,UC",
        "/uo": "UO,UF",
        "/delay/1": "URX,UT",
        "/delayed": "DI",
        "/aborted": "DI,FI",
        "/post": "-",
        "/chunked": "-",
    }, flags
    assert rows["/uf-retried"]["attempts"] == 2 and rows["/uo"]["attempts"] == 1
    # The details are the failure's, not the retry decision's.
    assert rows["/uf-retried"]["details"] == (
        "upstream_reset_before_response_started{remote_connection_failure|"
        "delayed_connect_error:_Connection_refused}"), rows
    assert rows["/uc-retried"]["details"] == \
        "upstream_reset_before_response_started{connection_termination}", rows
    # Both tries ran out of their per_try_timeout.
    assert (rows["/delay/1"]["details"], rows["/delay/1"]["attempts"]) == \
        ("upstream_per_try_timeout", 2), rows
    assert rows["/delayed"]["details"] == "via_upstream"
    assert rows["/aborted"]["details"] == "fault_filter_abort"
    assert urx == ["/delay/1 URX,UT", "/uc-retried URX,UC", "/uf-retried URX,UF"]
    if "envoy" in lines:
        env_rows, env_urx = lines["envoy"]
        assert {p: r["flags"] for p, r in env_rows.items()} == flags
        assert env_urx == urx
        for key in ("details", "code", "attempts", "upstream"):
            assert {p: r[key] for p, r in env_rows.items()} == \
                {p: r[key] for p, r in rows.items()}, key


def test_upstream_transport_failure_reason(lines):
    rows, _ = lines["mesh"]
    for path in ("/uf-retried", "/uf-once", "/uo"):
        assert rows[path]["tfr"] == "delayed_connect_error:_Connection_refused", rows[path]
    for path in ("/uc-retried", "/delayed", "/post"):
        assert rows[path]["tfr"] is None, rows[path]
    if "envoy" in lines:
        env_rows, _ = lines["envoy"]
        assert {p: r["tfr"] for p, r in env_rows.items()} == \
            {p: r["tfr"] for p, r in rows.items()}


def test_request_duration_and_bytes_of_a_request_body(lines):
    rows, _ = lines["mesh"]
    post, chunked = rows["/post"], rows["/chunked"]
    assert post["rx"] == 1000 and isinstance(post["request_duration"], int), post
    # The last chunk came PAUSE after the headers.
    assert chunked["rx"] == 11, chunked
    assert isinstance(chunked["request_duration"], int), chunked
    assert chunked["request_duration"] >= PAUSE * 1000 - 20, chunked
    assert isinstance(rows["/delayed"]["request_duration"], int)
    if "envoy" in lines:
        env_rows, _ = lines["envoy"]
        for path in ("/post", "/chunked", "/uf-once", "/delayed"):
            env, mesh = env_rows[path], rows[path]
            assert env["rx"] == mesh["rx"], (path, env, mesh)
            assert (env["request_duration"] is None) == (mesh["request_duration"] is None), \
                (path, env, mesh)
        assert env_rows["/chunked"]["request_duration"] >= PAUSE * 1000 - 20


def test_upstream_addresses_on_http_lines(lines, upstream_a):
    rows, _ = lines["mesh"]
    for path in ("/delayed", "/post", "/chunked"):
        r = rows[path]
        assert r["remote"] == r["upstream"] == f"127.0.0.1:{upstream_a.port}", r
        assert r["local_ip"] == "127.0.0.1" and isinstance(r["local_port"], int), r
        assert r["local"] == f"127.0.0.1:{r['local_port']}", r
        assert r["local_port"] not in (0, upstream_a.port), r
    # No upstream connection carried a response.
    assert rows["/aborted"]["local"] is None and rows["/aborted"]["remote"] is None
    # A failed connect: the host was picked (UPSTREAM_HOST) but never
    # connected to (UPSTREAM_REMOTE_ADDRESS), as in Envoy.
    assert rows["/uf-once"]["upstream"] is not None and rows["/uf-once"]["remote"] is None
    assert rows["/uc-retried"]["remote"] == rows["/uc-retried"]["upstream"]
    if "envoy" in lines:
        env_rows, _ = lines["envoy"]
        for path, env in env_rows.items():
            mesh = rows[path]
            assert env["remote"] == mesh["remote"], (path, env, mesh)
            if mesh["local"] is not None:
                assert env["local_ip"] == mesh["local_ip"], (path, env, mesh)


@pytest.mark.parametrize("kind", harness.kind_params())
def test_a_request_whose_client_left_is_logged(kind, start_proxy, tmp_path, upstream_a):
    """The client closes while the upstream is still working: the line is
    not lost, it says `DC` with status 0, as Envoy's."""
    log = tmp_path / "dc.log"
    fmt = ("%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% "
           "%UPSTREAM_HOST% %UPSTREAM_REQUEST_ATTEMPT_COUNT%\n")
    cfg = harness.simple_http_bootstrap(
        harness.catch_all_routes("a"), [harness.static_cluster("a", upstream_a.port)],
        {"access_log": [file_log(log, {"text_format": fmt})]})
    proxy = start_proxy(kind, cfg)
    with socket.create_connection(("127.0.0.1", proxy.port())) as s:
        s.sendall(b"GET /delay/1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        time.sleep(0.3)
    flush(proxy)
    got = read_lines(log, 1, timeout=5)
    assert got == [f"/delay/1 0 DC downstream_remote_disconnect 127.0.0.1:{upstream_a.port} 1"], \
        got


@pytest.mark.parametrize("kind", harness.kind_params())
def test_upstream_tls_failure_reason(kind, start_proxy, tmp_path, upstream_a):
    """An upstream TLS handshake that fails (the endpoint speaks plain
    HTTP): `UF`, the reason `TLS_error:...` and the details carrying it, as
    Envoy writes them (the TLS library's words differ)."""
    import tls_certs
    from test_tls import up_tls

    pki = tls_certs.Pki(tmp_path / "pki")
    log = tmp_path / "tls.log"
    cluster = harness.static_cluster("a", upstream_a.port)
    cluster["transport_socket"] = up_tls(pki, None)
    cfg = harness.simple_http_bootstrap(
        harness.catch_all_routes("a"), [cluster],
        {"access_log": [file_log(log, {"json_format": JSON})]})
    proxy = start_proxy(kind, cfg)
    assert harness.request(proxy.port(), "GET", "/tls").status == 503
    flush(proxy)
    got = read_lines(log, 1)
    assert len(got) == 1, got
    row = json.loads(got[0])
    assert (row["flags"], row["code"]) == ("UF", 503), row
    assert row["tfr"].startswith("TLS_error:") and " " not in row["tfr"], row
    assert row["details"] == (
        "upstream_reset_before_response_started{remote_connection_failure|" + row["tfr"] + "}"), row
