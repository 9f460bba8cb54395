"""Cluster discovery and load balancing, the same YAML under Envoy and mesh:
STRICT_DNS and LOGICAL_DNS clusters, endpoint weights, priority levels, and
the per-listener connection limit."""

from __future__ import annotations

import collections
import socket
import time

import pytest

import harness

ROUTES = """
virtual_hosts:
- name: all
  domains: ["example.com"]
  routes:
  - match: {prefix: "/"}
    route: {cluster: c}
"""


def dns_cluster(kind: str, port: int) -> dict:
    return {
        "name": "c",
        "type": kind,
        "connect_timeout": "1s",
        "dns_lookup_family": "V4_ONLY",
        "load_assignment": {
            "cluster_name": "c",
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "localhost",
                                                             "port_value": port}}}}]}],
        },
    }


def weighted_cluster(endpoints: list[tuple[int, int, int]]) -> dict:
    """endpoints: (port, weight, priority)."""
    by_priority = collections.defaultdict(list)
    for port, weight, priority in endpoints:
        by_priority[priority].append({
            "endpoint": {"address": harness.socket_address(port)},
            "load_balancing_weight": weight,
        })
    return {
        "name": "c",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "c",
            "endpoints": [{"priority": p, "lb_endpoints": eps}
                          for p, eps in sorted(by_priority.items())],
        },
    }


@pytest.mark.parametrize("kind", harness.kind_params())
@pytest.mark.parametrize("dns", ["STRICT_DNS", "LOGICAL_DNS"])
def test_dns_cluster_resolves_localhost(start_proxy, upstream_a, kind, dns):
    cfg = harness.simple_http_bootstrap(ROUTES, [dns_cluster(dns, upstream_a.port)])
    p = start_proxy(kind, cfg)
    for _ in range(5):
        r = harness.request(p.port(), "GET", "/dns")
        assert r.status == 200 and r.upstream == "a", (r.status, r.body[:200])
    clusters = p.admin_text("/clusters")
    assert f"c::127.0.0.1:{upstream_a.port}::" in clusters, clusters[:1000]


def _counts(p, n: int) -> collections.Counter:
    c = collections.Counter()
    for _ in range(n):
        r = harness.request(p.port(), "GET", "/")
        assert r.status == 200, r.status
        c[r.upstream] += 1
    return c


@pytest.mark.parametrize("kind", harness.kind_params())
def test_endpoint_weights_3_to_1(start_proxy, upstream_a, upstream_b, kind):
    cfg = harness.simple_http_bootstrap(
        ROUTES, [weighted_cluster([(upstream_a.port, 3, 0), (upstream_b.port, 1, 0)])])
    p = start_proxy(kind, cfg)
    c = _counts(p, 400)
    share = c["a"] / 400
    assert 0.70 <= share <= 0.80, c


@pytest.mark.parametrize("kind", harness.kind_params())
def test_lower_priority_unused_while_priority_0_has_endpoints(start_proxy, upstream_a,
                                                             upstream_b, kind):
    cfg = harness.simple_http_bootstrap(
        ROUTES, [weighted_cluster([(upstream_a.port, 1, 0), (upstream_b.port, 1, 1)])])
    p = start_proxy(kind, cfg)
    assert _counts(p, 50) == {"a": 50}


def _limit_listener(cluster_port_name: str) -> dict:
    listener = harness.hcm_listener("ingress", ROUTES)
    listener["filter_chains"][0]["filters"].insert(0, {
        "name": "envoy.filters.network.connection_limit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
            "stat_prefix": "limit",
            "max_connections": 1,
        },
    })
    return listener


@pytest.mark.parametrize("kind", harness.kind_params())
def test_connection_limit_closes_the_extra_connection(start_proxy, upstream_a, kind):
    cfg = harness.bootstrap([_limit_listener("c")],
                            [harness.static_cluster("c", upstream_a.port)])
    p = start_proxy(kind, cfg)
    with socket.create_connection(("127.0.0.1", p.port()), timeout=5) as first:
        first.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert harness.status_of(harness.read_http_response(first)) == 200
        # A second connection while the first is open: closed, no response.
        with socket.create_connection(("127.0.0.1", p.port()), timeout=5) as second:
            second.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
            try:
                data = second.recv(65536)
            except ConnectionResetError:
                data = b""
            assert data == b"", data[:200]
        # The first keeps working.
        first.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert harness.status_of(harness.read_http_response(first)) == 200
    # Once it is closed, a new connection is served.
    deadline = time.monotonic() + 5
    while True:
        try:
            r = harness.request(p.port(), "GET", "/")
            if r.status == 200:
                break
        except (ConnectionError, OSError):
            pass
        assert time.monotonic() < deadline, "no connection accepted after the first closed"
        time.sleep(0.05)
