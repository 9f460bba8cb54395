"""`grpc-timeout` honoured with the route's `max_grpc_timeout`, under Envoy
and under mesh with the
same YAML: the header bounds the request (a gRPC 504 reply, UNAVAILABLE),
the maximum caps it, and without the setting the header is ignored."""

from __future__ import annotations

import time

import harness


def _config(port, route_extra):
    route = {"cluster": "c", "timeout": "5s", **route_extra}
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"],
                             "routes": [{"match": {"prefix": "/"}, "route": route}]}]}
    return harness.simple_http_bootstrap(rc, [harness.static_cluster("c", port)])


GRPC = {"content-type": "application/grpc"}


def test_grpc_timeout_header_bounds_the_request(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, {"max_grpc_timeout": "0s"}))
    t0 = time.monotonic()
    r = harness.request(p.port(), method="POST", path="/delay/2", body=b"",
                        headers={**GRPC, "grpc-timeout": "300m"})
    elapsed = time.monotonic() - t0
    assert r.status == 200
    assert r.header("grpc-status") == "14"
    assert elapsed < 1.5


def test_the_maximum_caps_the_header(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, {"max_grpc_timeout": "0.3s"}))
    t0 = time.monotonic()
    r = harness.request(p.port(), method="POST", path="/delay/2", body=b"",
                        headers={**GRPC, "grpc-timeout": "10S"})
    assert r.header("grpc-status") == "14"
    assert time.monotonic() - t0 < 1.5


def test_without_the_setting_the_header_is_ignored(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, {}))
    r = harness.request(p.port(), method="POST", path="/delay/0.5", body=b"",
                        headers={**GRPC, "grpc-timeout": "100m"})
    assert r.status == 200
    assert r.header("grpc-status") is None
