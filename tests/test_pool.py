"""Upstream connection pools: `max_requests_per_connection` (cluster field and
`common_http_protocol_options`), the same YAML under Envoy and mesh, counted
by the upstream's accepted connections."""

from __future__ import annotations

import pytest

import harness

ROUTES = harness.catch_all_routes("c")


def cluster(port: int, where: str) -> dict:
    c = harness.static_cluster("c", port)
    if where == "cluster":
        c["max_requests_per_connection"] = 2
    else:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": harness.HTTP_PROTOCOL_OPTIONS_TYPE,
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": {"max_requests_per_connection": 2},
            }
        }
    return c


@pytest.mark.parametrize("kind", harness.kind_params())
@pytest.mark.parametrize("where", ["cluster", "protocol_options"])
def test_max_requests_per_connection(start_proxy, make_upstream, kind, where):
    up = make_upstream("m")
    p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [cluster(up.port, where)]))
    for _ in range(10):
        r = harness.request(p.port(), "GET", "/")
        assert r.status == 200 and r.upstream == "m"
    assert up.requests == 10
    # Two requests per connection, one request at a time: 5 connections.
    assert up.connections == 5, up.connections


@pytest.mark.parametrize("kind", harness.kind_params())
def test_connections_are_reused_without_a_limit(start_proxy, make_upstream, kind):
    up = make_upstream("m")
    p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [harness.static_cluster("c", up.port)]))
    for _ in range(10):
        assert harness.request(p.port(), "GET", "/").status == 200
    assert up.connections == 1, up.connections
