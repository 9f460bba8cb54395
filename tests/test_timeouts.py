"""Timeouts, each run under Envoy and under mesh with the same YAML, and
mesh's answer compared with Envoy's: stream idle (HCM and route), request
timeout on a slow request body, downstream connection idle timeout, and the
tcp_proxy idle timeout."""

from __future__ import annotations

import socket
import time

import pytest

import harness

ROUTES = """
virtual_hosts:
- name: all
  domains: ["example.com"]
  routes:
  - match: {prefix: "/route-idle/"}
    route: {cluster: a, timeout: 5s, idle_timeout: 0.3s, prefix_rewrite: "/delay/"}
  - match: {prefix: "/"}
    route: {cluster: a, timeout: 5s}
"""


def _answer(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return harness.status_of(raw), body


@pytest.fixture(scope="module")
def upstream(upstream_a):
    return upstream_a


def _start(start_proxy, kind, upstream, hcm_extra):
    cfg = harness.simple_http_bootstrap(ROUTES, [harness.static_cluster("a", upstream.port)],
                                        hcm_extra)
    return start_proxy(kind, cfg)


def _run_both(start_proxy, upstream, hcm_extra, exchange):
    got = {}
    for kind in ("envoy", "mesh"):
        if kind == "mesh" and not harness.mesh_available():
            pytest.skip(harness.mesh_missing_reason())
        proxy = _start(start_proxy, kind, upstream, hcm_extra)
        got[kind] = exchange(proxy)
    return got


def test_stream_idle_timeout_before_response(start_proxy, upstream):
    def exchange(p):
        t0 = time.monotonic()
        raw = harness.raw_exchange(p.port(), b"GET /delay/2 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        return _answer(raw), time.monotonic() - t0

    got = _run_both(start_proxy, upstream, {"stream_idle_timeout": "0.3s"}, exchange)
    (envoy_answer, envoy_t), (mesh_answer, mesh_t) = got["envoy"], got["mesh"]
    assert envoy_answer == (504, b"stream timeout"), envoy_answer
    assert mesh_answer == envoy_answer
    assert mesh_t < 1.5, mesh_t


def test_route_idle_timeout_overrides_hcm(start_proxy, upstream):
    def exchange(p):
        raw = harness.raw_exchange(p.port(),
                                   b"GET /route-idle/2 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        return _answer(raw)

    got = _run_both(start_proxy, upstream, None, exchange)
    assert got["envoy"] == (504, b"stream timeout"), got
    assert got["mesh"] == got["envoy"]


def test_request_timeout_on_a_slow_body(start_proxy, upstream):
    def exchange(p):
        with socket.create_connection(("127.0.0.1", p.port()), timeout=5) as s:
            # The upstream reads the whole body before it answers.
            s.sendall(b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\n12345")
            t0 = time.monotonic()
            raw = harness.read_http_response(s)
            return _answer(raw), time.monotonic() - t0

    got = _run_both(start_proxy, upstream, {"request_timeout": "0.3s"}, exchange)
    (envoy_answer, _), (mesh_answer, mesh_t) = got["envoy"], got["mesh"]
    assert envoy_answer[0] == 408, envoy_answer
    assert mesh_answer[0] == envoy_answer[0], (mesh_answer, envoy_answer)
    assert mesh_t < 2, mesh_t


def test_request_timeout_does_not_cut_a_slow_response(start_proxy, upstream):
    """request_timeout covers the request's arrival, not the upstream's answer."""
    def exchange(p):
        raw = harness.raw_exchange(p.port(), b"GET /delay/0.6 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        return harness.status_of(raw)

    got = _run_both(start_proxy, upstream, {"request_timeout": "0.3s"}, exchange)
    assert got == {"envoy": 200, "mesh": 200}


def test_idle_downstream_connection_is_closed(start_proxy, upstream):
    """Both close an idle HTTP/1.1 connection: mesh at the idle timeout,
    Envoy after the idle timeout plus its drain timeout (5 s by default)."""
    hcm = {"common_http_protocol_options": {"idle_timeout": "0.5s"}}

    def exchange(p):
        with socket.create_connection(("127.0.0.1", p.port()), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
            first = harness.status_of(harness.read_http_response(s))
            t0 = time.monotonic()
            rest = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return first, time.monotonic() - t0

    got = _run_both(start_proxy, upstream, hcm, exchange)
    for kind, (first, waited) in got.items():
        assert first == 200, (kind, first)
    assert 0.3 < got["envoy"][1] < 8, got
    assert 0.3 < got["mesh"][1] < 2, got


def test_tcp_proxy_idle_timeout(start_proxy, tcp_echo):
    def exchange(p):
        with socket.create_connection(("127.0.0.1", p.port("tcp")), timeout=5) as s:
            s.sendall(b"ping")
            echoed = s.recv(4)
            t0 = time.monotonic()
            closed = s.recv(1) == b""
            return echoed, closed, time.monotonic() - t0

    got = {}
    for kind in ("envoy", "mesh"):
        listener = harness.tcp_listener("tcp", "echo")
        listener["filter_chains"][0]["filters"][0]["typed_config"]["idle_timeout"] = "0.5s"
        cfg = harness.bootstrap([listener], [harness.static_cluster("echo", tcp_echo.port)])
        got[kind] = exchange(start_proxy(kind, cfg))
    for kind, (echoed, closed, waited) in got.items():
        assert echoed == b"ping" and closed, (kind, echoed, closed)
        assert 0.3 < waited < 3, (kind, waited)


@pytest.mark.parametrize("runtime", ["per-core", "shared"])
def test_mesh_runtime_modes_with_two_workers(tmp_path, upstream, runtime):
    """Both runtime models serve, with two workers sharing the listener."""
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    cfg = harness.simple_http_bootstrap(ROUTES, [harness.static_cluster("a", upstream.port)])
    with harness.Proxy("mesh", cfg, workdir=tmp_path,
                       extra_args=["--concurrency", "2", "--runtime", runtime]) as p:
        for _ in range(20):
            r = harness.request(p.port(), "GET", "/x")
            assert r.status == 200 and r.upstream == "a"


def test_envoy_timing_headers(start_proxy, upstream):
    """Envoy's router tells the upstream its deadline
    (`x-envoy-expected-rq-timeout-ms`) and the client how long the upstream
    took (`x-envoy-upstream-service-time`); mesh does the same."""
    got = {}
    for kind in ("envoy", "mesh"):
        if kind == "mesh" and not harness.mesh_available():
            pytest.skip(harness.mesh_missing_reason())
        p = _start(start_proxy, kind, upstream, None)
        r = harness.request(p.port(), "GET", "/delay/0.2")
        assert r.status == 200, (kind, r.status)
        seen = r.json()["headers"].get("x-envoy-expected-rq-timeout-ms")
        service = r.header("x-envoy-upstream-service-time")
        got[kind] = (seen, service)
    for kind, (seen, service) in got.items():
        assert seen == "5000", (kind, seen)
        assert service is not None and 150 <= int(service) < 2000, (kind, service)
