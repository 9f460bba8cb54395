"""A route's `decorator` (istiod puts one on every route). Without a tracing
provider Envoy sends no `x-envoy-decorator-operation`, upstream or
downstream, even with `propagate`; mesh (no tracing) does the same."""

from __future__ import annotations

import pytest

import harness

ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/p"}
    route: {cluster: a}
    decorator: {operation: "reviews:9080/*", propagate: true}
  - match: {prefix: "/"}
    route: {cluster: a}
    decorator: {operation: "reviews:9080/*"}
"""


@pytest.mark.parametrize("kind", harness.kind_params())
def test_decorator_sends_no_header(start_proxy, upstream_a, kind):
    cfg = harness.simple_http_bootstrap(ROUTES, [harness.static_cluster("a", upstream_a.port)])
    proxy = start_proxy(kind, cfg)
    for path in ("/p", "/q"):
        r = harness.request(proxy.port(), "GET", path)
        assert r.status == 200
        assert "x-envoy-decorator-operation" not in r.json()["headers"]
        assert r.header("x-envoy-decorator-operation") is None


def test_empty_operation_refused_by_path(tmp_path):
    cfg = harness.simple_http_bootstrap(
        ROUTES.replace('"reviews:9080/*", propagate', '"", propagate'),
        [harness.static_cluster("a", 1)])
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    import subprocess
    p = tmp_path / "c.yaml"
    p.write_text(cfg)
    r = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(p)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    assert "virtual_hosts[0].routes[0].decorator.operation: must not be empty" in r.stdout + r.stderr
