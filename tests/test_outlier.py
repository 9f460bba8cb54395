"""Outlier detection (cluster `outlier_detection`), the same YAML under Envoy
and mesh: an upstream killed mid-test is ejected after consecutive failures,
gets no traffic, and returns after the ejection time once restarted;
consecutive 5xx responses, gateway failures, success rate, the
`max_ejection_percent` limit, TCP proxy connect failures, and a cluster
whose only endpoint is ejected still serving (panic mode)."""

from __future__ import annotations

import collections
import socket
import time

import pytest

import harness
from killable import KillableUpstream
from test_health import flags, upstreams_hit, wait_flags, wait_traffic

ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/other"}
    route: {cluster: other}
  - match: {prefix: "/"}
    route: {cluster: c}
"""


def od_cluster(name: str, ports, **od) -> dict:
    c = harness.static_cluster(name, ports)
    c["outlier_detection"] = {"interval": "0.5s", "base_ejection_time": "2s", **od}
    return c


def stat(p, name: str) -> int:
    for line in p.admin_text("/stats").splitlines():
        k, _, v = line.partition(": ")
        if k == name:
            return int(v)
    raise AssertionError(f"{p.kind}: no stat {name}")


def send_until_ejected(p, cluster: str, port: int, path: str = "/",
                       timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while "/failed_outlier_check" not in flags(p, cluster).get(port, ""):
        if time.monotonic() > deadline:
            raise AssertionError(f"{p.kind}: {port} not ejected: {flags(p, cluster)}")
        harness.request(p.port(), "GET", path)


@pytest.fixture
def pair():
    a = KillableUpstream("a")
    b = KillableUpstream("b")
    yield a, b
    a.stop()
    b.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_killed_upstream_is_ejected_and_returns(start_proxy, pair, kind):
    a, b = pair
    cfg = harness.simple_http_bootstrap(ROUTES, [
        od_cluster("c", [a.port, b.port], consecutive_5xx=3, max_ejection_percent=100),
        od_cluster("other", [a.port]),
    ])
    p = start_proxy(kind, cfg)
    assert set(upstreams_hit(p, 10)) == {(200, "a"), (200, "b")}

    b.kill()
    send_until_ejected(p, "c", b.port)
    assert flags(p, "c") == {a.port: "healthy", b.port: "/failed_outlier_check"}
    assert upstreams_hit(p, 20) == {(200, "a"): 20}
    assert stat(p, "cluster.c.outlier_detection.ejections_active") == 1
    assert stat(p, "cluster.c.outlier_detection.ejections_enforced_consecutive_5xx") >= 1

    b.restart()
    # Back after base_ejection_time (2s), checked every interval (0.5s).
    wait_flags(p, "c", {a.port: "healthy", b.port: "healthy"}, timeout=10)
    wait_traffic(p, {(200, "a"), (200, "b")})
    assert stat(p, "cluster.c.outlier_detection.ejections_active") == 0


@pytest.mark.parametrize("kind", harness.kind_params())
def test_consecutive_5xx_responses_eject_and_the_limit_holds(start_proxy, kind):
    a = KillableUpstream("a")
    f = KillableUpstream("f", kind="fail", status=500)
    try:
        cfg = harness.simple_http_bootstrap(ROUTES, [
            od_cluster("c", [a.port, f.port], consecutive_5xx=3, max_ejection_percent=100),
            # Envoy's default max_ejection_percent (10%) allows no ejection
            # out of two endpoints.
            od_cluster("other", [a.port, f.port], consecutive_5xx=3),
        ])
        p = start_proxy(kind, cfg)
        send_until_ejected(p, "c", f.port)
        assert upstreams_hit(p, 20) == {(200, "a"): 20}
        for _ in range(20):
            harness.request(p.port(), "GET", "/other")
        assert flags(p, "other") == {a.port: "healthy", f.port: "healthy"}
        assert stat(p, "cluster.other.outlier_detection.ejections_overflow") >= 1
        assert stat(p, "cluster.other.outlier_detection.ejections_active") == 0
    finally:
        a.stop()
        f.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_gateway_failures_count_apart_from_other_5xx(start_proxy, kind):
    a = KillableUpstream("a")
    f503 = KillableUpstream("f503", kind="fail", status=503)
    f500 = KillableUpstream("f500", kind="fail", status=500)
    try:
        gw = dict(consecutive_5xx=1000, consecutive_gateway_failure=3,
                  enforcing_consecutive_gateway_failure=100, max_ejection_percent=100)
        cfg = harness.simple_http_bootstrap(ROUTES, [
            od_cluster("c", [a.port, f503.port], **gw),
            od_cluster("other", [a.port, f500.port], **gw),
        ])
        p = start_proxy(kind, cfg)
        send_until_ejected(p, "c", f503.port)
        assert stat(p, "cluster.c.outlier_detection."
                       "ejections_enforced_consecutive_gateway_failure") == 1
        for _ in range(20):
            harness.request(p.port(), "GET", "/other")
        assert flags(p, "other") == {a.port: "healthy", f500.port: "healthy"}
    finally:
        for u in (a, f503, f500):
            u.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_success_rate_ejects_the_failing_endpoint(start_proxy, kind):
    a = KillableUpstream("a")
    f = KillableUpstream("f", kind="fail", status=500)
    try:
        cfg = harness.simple_http_bootstrap(ROUTES, [
            od_cluster("c", [a.port, f.port], consecutive_5xx=100000, interval="1s",
                       success_rate_minimum_hosts=2, success_rate_request_volume=10,
                       success_rate_stdev_factor=500, max_ejection_percent=100),
            od_cluster("other", [a.port]),
        ])
        p = start_proxy(kind, cfg)
        send_until_ejected(p, "c", f.port)
        assert flags(p, "c")[a.port] == "healthy"
        assert stat(p, "cluster.c.outlier_detection.ejections_enforced_success_rate") == 1
    finally:
        a.stop()
        f.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_an_ejected_only_endpoint_still_serves(start_proxy, kind):
    f = KillableUpstream("f", kind="fail", status=500)
    try:
        cfg = harness.simple_http_bootstrap(ROUTES, [
            od_cluster("c", [f.port], consecutive_5xx=2, max_ejection_percent=100),
            od_cluster("other", [f.port]),
        ])
        p = start_proxy(kind, cfg)
        send_until_ejected(p, "c", f.port)
        # All endpoints ejected: panic mode serves them anyway.
        assert upstreams_hit(p, 5) == {(500, "f"): 5}
    finally:
        f.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_tcp_proxy_connect_failures_eject(start_proxy, kind):
    t = KillableUpstream("t", kind="tcp")
    dead = KillableUpstream("dead", kind="tcp")
    dead.kill()
    try:
        cluster = od_cluster("c", [t.port, dead.port], consecutive_5xx=2,
                             max_ejection_percent=100)
        cfg = harness.bootstrap([harness.tcp_listener("ingress", "c")], [cluster])
        p = start_proxy(kind, cfg)

        def ping() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", p.port()), timeout=5) as s:
                    s.sendall(b"ping\n")
                    return b"pong" in s.recv(100)
            except OSError:
                return False

        deadline = time.monotonic() + 15
        while "/failed_outlier_check" not in flags(p, "c").get(dead.port, ""):
            assert time.monotonic() < deadline, flags(p, "c")
            ping()
        assert all(ping() for _ in range(10))
        assert flags(p, "c")[t.port] == "healthy"
    finally:
        t.stop()
        dead.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_a_passing_health_check_returns_an_ejected_endpoint(start_proxy, pair, kind):
    a, b = pair
    c = od_cluster("c", [a.port, b.port], consecutive_5xx=3, max_ejection_percent=50,
                   base_ejection_time="60s")
    c["health_checks"] = [{
        "timeout": "0.5s", "interval": "0.3s", "no_traffic_interval": "0.3s",
        "unhealthy_threshold": 2, "healthy_threshold": 1,
        "http_health_check": {"path": "/healthz"},
    }]
    cfg = harness.simple_http_bootstrap(ROUTES, [c, od_cluster("other", [a.port])])
    p = start_proxy(kind, cfg)
    wait_flags(p, "c", {a.port: "healthy", b.port: "healthy"})
    # Both endpoints answer 500 on this path; one of them is ejected (50%).
    deadline = time.monotonic() + 10
    while stat(p, "cluster.c.outlier_detection.ejections_enforced_total") == 0:
        assert time.monotonic() < deadline
        harness.request(p.port(), "GET", "/status/500")
    # The next passing health check returns it long before the 60s ejection ends.
    wait_flags(p, "c", {a.port: "healthy", b.port: "healthy"}, timeout=5)
    assert stat(p, "cluster.c.outlier_detection.ejections_active") == 0
