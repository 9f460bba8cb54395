"""The fault filter's `response_rate_limit` through the real proxy, the same
YAML under Envoy and mesh: a 64 KiB body at 16 KiB/s arrives whole and takes
seconds (only a generous lower bound is asserted: at least half the time
the rate implies), header-controlled limits apply only to requests with
`x-envoy-fault-throughput-response`, and `response_rl_injected` counts
them; bad limits are refused."""

from __future__ import annotations

import subprocess
import time

import pytest

import harness

FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
SIZE = 64 * 1024


def _pct(n):
    return {"numerator": n, "denominator": "HUNDRED"}


def _config(port, limit):
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"],
                             "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}
    hcm = {"http_filters": [{"name": "envoy.filters.http.fault", "typed_config": {
        "@type": FAULT_TYPE, "response_rate_limit": limit}}, harness.ROUTER_FILTER]}
    return harness.simple_http_bootstrap(rc, [harness.static_cluster("c", port)], hcm)


def _injected(p):
    return harness.prometheus_value(p.admin_text("/stats/prometheus"),
                                    "envoy_http_fault_response_rl_injected",
                                    envoy_http_conn_manager_prefix="ingress") or 0


def _timed_get(p, headers=None):
    t0 = time.monotonic()
    r = harness.request(p.port(), path=f"/bytes/{SIZE}", headers=headers or {}, timeout=30)
    return r, time.monotonic() - t0


def test_a_fixed_limit_slows_the_body(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port,
                                  {"fixed_limit": {"limit_kbps": 16}, "percentage": _pct(100)}))
    r, took = _timed_get(p)
    assert r.status == 200
    assert r.body == harness.payload(SIZE)
    # 64 KiB at 16 KiB/s is 4 s; allow for an initial burst.
    assert took >= 2.0, took
    assert _injected(p) == 1


def test_a_header_limit_applies_only_with_the_header(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, {"header_limit": {}, "percentage": _pct(100)}))
    r = harness.request(p.port(), path=f"/bytes/{SIZE}")
    assert r.status == 200
    assert _injected(p) == 0
    r, took = _timed_get(p, {"x-envoy-fault-throughput-response": "16"})
    assert r.body == harness.payload(SIZE)
    assert took >= 2.0, took
    assert _injected(p) == 1
    # A zero percentage header turns it off for that request.
    r = harness.request(p.port(), path="/x", headers={
        "x-envoy-fault-throughput-response": "16",
        "x-envoy-fault-throughput-response-percentage": "0"})
    assert r.status == 200
    assert _injected(p) == 1


@pytest.mark.parametrize("limit,fragment", [
    ({"fixed_limit": {"limit_kbps": 0}, "percentage": _pct(100)}, "fixed_limit.limit_kbps"),
    ({"percentage": _pct(100)}, "response_rate_limit"),
    ({"fixed_limit": {"limit_kbps": 1}, "percentage": _pct(101)}, "percentage.numerator"),
])
def test_bad_limits_are_refused(tmp_path, limit, fragment):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(_config(1, limit))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert fragment in out.stdout + out.stderr, out.stdout + out.stderr
