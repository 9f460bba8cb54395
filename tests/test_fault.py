"""Fault injection (`envoy.filters.http.fault`) through the real proxy, each
under Envoy and under mesh with the same YAML: abort percentages within
tolerance, a fixed delay, header-controlled delay and abort, gRPC aborts,
`max_active_faults`, per-route disabling, and the fault stats."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness

FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"


def _pct(n):
    return {"numerator": n, "denominator": "HUNDRED"}


def _config(port, fault, routes=None):
    routes = routes or [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}
    hcm = {"http_filters": [{"name": "envoy.filters.http.fault",
                             "typed_config": {"@type": FAULT_TYPE, **fault}},
                            harness.ROUTER_FILTER]}
    return harness.simple_http_bootstrap(rc, [harness.static_cluster("c", port)], hcm)


def _stat(p, name):
    return harness.prometheus_value(p.admin_text("/stats/prometheus"), name,
                                    envoy_http_conn_manager_prefix="ingress") or 0


def test_abort_percentage_within_tolerance(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port,
                                  {"abort": {"http_status": 503, "percentage": _pct(30)}}))
    n = 400
    with ThreadPoolExecutor(max_workers=8) as ex:
        answers = list(ex.map(lambda i: harness.request(p.port(), path=f"/x/{i}"), range(n)))
    aborted = [a for a in answers if a.status == 503]
    assert all(a.body == b"fault filter abort" for a in aborted)
    assert {a.status for a in answers} <= {200, 503}
    # 30 % of 400 = 120; binomial sd ~ 9.2: +-4 sd.
    assert 83 <= len(aborted) <= 157, len(aborted)
    assert _stat(p, "envoy_http_fault_aborts_injected") == len(aborted)


def test_fixed_delay(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, {
        "delay": {"fixed_delay": "0.4s", "percentage": _pct(100)}}))
    t0 = time.monotonic()
    r = harness.request(p.port(), path="/x")
    assert r.status == 200
    # Envoy's timers have millisecond granularity and may fire up to a
    # millisecond early against this clock: allow 10 ms.
    assert time.monotonic() - t0 >= 0.39
    assert _stat(p, "envoy_http_fault_delays_injected") == 1


def test_header_controlled_faults(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, {
        "delay": {"header_delay": {}, "percentage": _pct(100)},
        "abort": {"header_abort": {}, "percentage": _pct(100)}}))
    # No headers: no fault.
    assert harness.request(p.port(), path="/x").status == 200
    r = harness.request(p.port(), path="/x", headers={"x-envoy-fault-abort-request": "418"})
    assert r.status == 418
    t0 = time.monotonic()
    r = harness.request(p.port(), path="/x", headers={"x-envoy-fault-delay-request": "300"})
    assert r.status == 200
    assert time.monotonic() - t0 >= 0.29  # see test_fixed_delay
    # A percentage header of 0 turns the abort off.
    r = harness.request(p.port(), path="/x", headers={
        "x-envoy-fault-abort-request": "418", "x-envoy-fault-abort-request-percentage": "0"})
    assert r.status == 200


def test_max_active_faults(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, {
        "delay": {"fixed_delay": "1s", "percentage": _pct(100)}, "max_active_faults": 1}))
    with ThreadPoolExecutor(max_workers=4) as ex:
        list(ex.map(lambda i: harness.request(p.port(), path=f"/x/{i}"), range(4)))
    assert _stat(p, "envoy_http_fault_delays_injected") == 1
    assert _stat(p, "envoy_http_fault_faults_overflow") == 3


def test_per_route_disabling(start_proxy, kind, upstream_a):
    routes = [
        {"match": {"prefix": "/safe"}, "route": {"cluster": "c"},
         "typed_per_filter_config": {"envoy.filters.http.fault": {
             "@type": FILTER_CONFIG_TYPE, "disabled": True}}},
        {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
    ]
    p = start_proxy(kind, _config(upstream_a.port,
                                  {"abort": {"http_status": 500, "percentage": _pct(100)}},
                                  routes))
    assert harness.request(p.port(), path="/x").status == 500
    assert harness.request(p.port(), path="/safe").status == 200


def test_percentages_over_100_are_refused(tmp_path):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(_config(1, {"abort": {"http_status": 503, "percentage": _pct(101)}}))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "abort.percentage.numerator" in out.stdout + out.stderr
