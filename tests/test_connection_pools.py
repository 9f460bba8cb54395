"""`max_connection_pools` (cluster circuit breaker), the same YAML under
Envoy and mesh: with one pool allowed, a request to a second endpoint while
the first endpoint's pool still holds a keep-alive connection finds no pool
and gets Envoy's 503 `no healthy upstream`, counted in
`upstream_cx_pool_overflow`; the endpoint that has the pool keeps
working."""

from __future__ import annotations

import harness

ROUTES = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
    {"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}


def _overflow(p):
    return harness.prometheus_value(p.admin_text("/stats/prometheus"),
                                    "envoy_cluster_upstream_cx_pool_overflow",
                                    envoy_cluster_name="c") or 0


def test_one_pool_allowed(start_proxy, kind, upstream_a, upstream_b):
    c = harness.static_cluster("c", [upstream_a.port, upstream_b.port])
    c["lb_policy"] = "ROUND_ROBIN"
    c["circuit_breakers"] = {"thresholds": [{"max_connection_pools": 1}]}
    p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [c]))
    answers = [harness.request(p.port(), path=f"/x/{i}") for i in range(4)]
    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 503]
    # Round robin alternates: the endpoint with the pool answers, the other
    # one has none.
    assert len(ok) == 2 and len(refused) == 2, [a.status for a in answers]
    assert len({a.upstream for a in ok}) == 1
    assert all(a.body == b"no healthy upstream" for a in refused)
    assert _overflow(p) == 2


def test_without_the_limit_every_endpoint_gets_a_pool(start_proxy, kind, upstream_a,
                                                      upstream_b):
    c = harness.static_cluster("c", [upstream_a.port, upstream_b.port])
    c["circuit_breakers"] = {"thresholds": [{"max_connection_pools": 2}]}
    p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [c]))
    answers = [harness.request(p.port(), path=f"/x/{i}") for i in range(4)]
    assert [a.status for a in answers] == [200] * 4
    assert {a.upstream for a in answers} == {"a", "b"}
    assert _overflow(p) == 0
