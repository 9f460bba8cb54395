"""`envoy.filters.network.local_ratelimit` in a listener received over LDS
(the example control plane), under Envoy and mesh: the bucket limits new
connections, and an LDS update that changes the limit takes effect (a new
bucket) while the listener keeps its port."""

from __future__ import annotations

import http.client
import time

import harness
from test_network_ratelimit import _nlrl
from test_xds import (assignment, control_plane, eds_cluster, listener,  # noqa: F401
                      routes, start_driven, wait_until)


def _limited(port, tokens):
    l = listener()
    l["address"] = harness.socket_address(port)
    l["filter_chains"][0]["filters"].insert(0, _nlrl(tokens))
    return l


def _status(port):
    try:
        return harness.request(port, "GET", "/x").status
    except (OSError, http.client.HTTPException):
        return None


def test_lds_sets_and_changes_the_limit(kind, start_proxy, control_plane, upstream_a):  # noqa: F811
    cp = control_plane([kind])
    port = harness.free_port()
    cp.write("clusters", [eds_cluster("a")])
    cp.write("endpoints", [assignment("a", [upstream_a.port])])
    cp.write("routes", [routes()])
    cp.write("listeners", [_limited(port, 2)])
    start_driven(kind, start_proxy, cp, kind, "GRPC")
    wait_until(lambda: _status(port) == 200, time.monotonic(), "listener up", limit=10)
    # One token went to the probe above.
    assert [_status(port) for _ in range(2)] == [200, None]
    t = cp.write("listeners", [_limited(port, 50)])
    wait_until(lambda: _status(port) == 200, t, "the new limit")
    assert [_status(port) for _ in range(5)] == [200] * 5
