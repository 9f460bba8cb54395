"""Health checking of clusters that arrive over xDS (CDS + EDS), the same
resources under Envoy and mesh: endpoints an EDS update adds start failed
until their first probe and a dead one stays failed, endpoints that stay
keep their state, and a CDS update that drops `health_checks` clears the
flags."""

from __future__ import annotations

import os

import pytest

import harness
from killable import KillableUpstream
from test_health import wait_flags, wait_traffic
from test_xds import (assignment, control_plane, control_plane_bin,  # noqa: F401
                      eds_cluster, listener, routes, start_driven)

pytestmark = pytest.mark.skipif(
    not control_plane_bin().exists() and not os.environ.get("MESH_REQUIRE"),
    reason=f"{control_plane_bin()} not built (cargo build -p mesh-examples --example xds_control_plane)",
)


def checked_eds_cluster(name: str) -> dict:
    c = eds_cluster(name)
    c["health_checks"] = [{
        "timeout": "0.5s", "interval": "0.3s", "no_traffic_interval": "0.3s",
        "unhealthy_threshold": 2, "healthy_threshold": 1,
        "http_health_check": {"path": "/healthz"},
    }]
    return c


@pytest.mark.parametrize("kind", harness.kind_params())
def test_eds_updates_follow_health_state(kind, start_proxy, control_plane):
    a = KillableUpstream("a")
    b = KillableUpstream("b")
    dead = KillableUpstream("dead")
    dead.kill()
    try:
        cp = control_plane([kind])
        cp.write("clusters", [checked_eds_cluster("a")])
        cp.write("endpoints", [assignment("a", [a.port, b.port])])
        cp.write("routes", [routes()])
        cp.write("listeners", [listener()])
        p = start_driven(kind, start_proxy, cp, kind, "GRPC")
        wait_flags(p, "a", {a.port: "healthy", b.port: "healthy"})
        wait_traffic(p, {(200, "a"), (200, "b")})

        b.kill()
        wait_flags(p, "a", {a.port: "healthy", b.port: "/failed_active_hc"})
        # EDS adds a dead endpoint: it never becomes healthy; the others keep
        # their state.
        cp.write("endpoints", [assignment("a", [a.port, b.port, dead.port])])
        wait_flags(p, "a", {a.port: "healthy", b.port: "/failed_active_hc",
                            dead.port: "/failed_active_hc"})
        # One healthy endpoint of three is under the 50% panic threshold:
        # traffic goes to all of them, dead ones included (as Envoy).
        wait_traffic(p, {(200, "a"), (503, None)})
        b.restart()
        wait_flags(p, "a", {a.port: "healthy", b.port: "healthy",
                            dead.port: "/failed_active_hc"})

        # CDS drops the health check: every endpoint is healthy again.
        cp.write("clusters", [eds_cluster("a")])
        wait_flags(p, "a", {a.port: "healthy", b.port: "healthy", dead.port: "healthy"})
    finally:
        for u in (a, b, dead):
            u.stop()
