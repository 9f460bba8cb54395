"""The admin endpoint (Envoy's paths and formats)."""

from __future__ import annotations

import json
import re

import pytest

import harness

ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/b"}
    route: {cluster: b}
  - match: {prefix: "/slow"}
    route: {cluster: slow, timeout: 0.2s, prefix_rewrite: "/delay/1"}
  - match: {prefix: "/"}
    route: {cluster: a}
"""

N_A = 7


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy, upstream_a, upstream_b):
    cfg = harness.simple_http_bootstrap(
        ROUTES, [harness.static_cluster("a", upstream_a.port),
                 harness.static_cluster("b", upstream_b.port),
                 harness.static_cluster("slow", upstream_a.port)])
    p = module_start_proxy(request.param, cfg)
    # a known amount of traffic, before any test looks at the stats
    for i in range(N_A):
        assert harness.request(p.port(), "GET", f"/x/{i}").status == 200
    assert harness.request(p.port(), "GET", "/status/503").status == 503
    assert harness.request(p.port(), "GET", "/b/status/404").status == 404
    assert harness.request(p.port(), "GET", "/slow").status == 504
    return p


def test_ready(proxy):
    status, _, body = proxy.admin_get("/ready")
    assert status == 200
    assert body.strip() == b"LIVE"


def test_prometheus_per_cluster_response_classes(proxy):
    def counts():
        text = proxy.admin_text("/stats/prometheus")
        return (
            harness.prometheus_value(text, "envoy_cluster_upstream_rq_xx",
                                     envoy_response_code_class="2", envoy_cluster_name="a"),
            harness.prometheus_value(text, "envoy_cluster_upstream_rq_xx",
                                     envoy_response_code_class="5", envoy_cluster_name="a"),
            harness.prometheus_value(text, "envoy_cluster_upstream_rq_xx",
                                     envoy_response_code_class="4", envoy_cluster_name="b"),
        )

    harness.wait_until(lambda: counts() == (N_A, 1, 1), timeout=5,
                       what=f"upstream_rq_xx counts (a 2xx={N_A}, a 5xx=1, b 4xx=1)")


def test_prometheus_text_format(proxy):
    text = proxy.admin_text("/stats/prometheus")
    samples = harness.prometheus_samples(text)
    assert samples, "no samples"
    assert re.search(r"(?m)^# TYPE envoy_cluster_upstream_rq_xx counter$", text)
    assert harness.prometheus_value(text, "envoy_cluster_upstream_cx_connect_fail",
                                    envoy_cluster_name="a") == 0


def test_config_dump_is_json(proxy):
    status, headers, body = proxy.admin_get("/config_dump")
    assert status == 200
    doc = json.loads(body)
    assert isinstance(doc, dict) and doc


def test_clusters_text_format(proxy, upstream_a, upstream_b):
    text = proxy.admin_text("/clusters")
    lines = text.splitlines()
    for name, up in (("a", upstream_a), ("b", upstream_b)):
        prefix = f"{name}::127.0.0.1:{up.port}::"
        assert any(line.startswith(prefix) for line in lines), f"no {prefix} line in:\n{text}"
        assert f"{prefix}health_flags::healthy" in lines, text


def test_listeners_json(proxy):
    doc = json.loads(proxy.admin_text("/listeners?format=json"))
    (ls,) = doc["listener_statuses"]
    assert ls["name"] == "ingress"
    assert ls["local_address"]["socket_address"]["address"] == "127.0.0.1"
    assert ls["local_address"]["socket_address"]["port_value"] == proxy.port("ingress")


def test_unknown_admin_path_404(proxy):
    status, _, _ = proxy.admin_get("/no/such/admin/path")
    assert status == 404


def test_prometheus_standard_counters(proxy):
    """Counters Envoy dashboards read: downstream classes, upstream totals and codes."""
    want = {
        ("envoy_http_downstream_rq_xx",
         (("envoy_http_conn_manager_prefix", "ingress"), ("envoy_response_code_class", "2"))): N_A,
        ("envoy_http_downstream_rq_xx",
         (("envoy_http_conn_manager_prefix", "ingress"), ("envoy_response_code_class", "4"))): 1,
        ("envoy_http_downstream_rq_xx",
         (("envoy_http_conn_manager_prefix", "ingress"), ("envoy_response_code_class", "5"))): 2,
        ("envoy_http_downstream_rq_total", (("envoy_http_conn_manager_prefix", "ingress"),)): N_A + 3,
        ("envoy_cluster_upstream_rq_total", (("envoy_cluster_name", "a"),)): N_A + 1,
        ("envoy_cluster_upstream_rq",
         (("envoy_cluster_name", "a"), ("envoy_response_code", "503"))): 1,
        ("envoy_cluster_upstream_rq",
         (("envoy_cluster_name", "a"), ("envoy_response_code", "200"))): N_A,
        ("envoy_cluster_upstream_rq_timeout", (("envoy_cluster_name", "slow"),)): 1,
    }

    def got():
        text = proxy.admin_text("/stats/prometheus")
        return {k: harness.prometheus_value(text, k[0], **dict(k[1])) for k in want}

    try:
        harness.wait_until(lambda: got() == want, timeout=5, what="standard counters")
    except AssertionError:
        assert got() == want


def test_stats_text_uses_envoys_dotted_names(proxy):
    """`/stats` in Envoy's text form, so scripts written for Envoy read mesh."""
    want = {
        "cluster.a.upstream_rq_2xx": N_A,
        "cluster.a.upstream_rq_200": N_A,
        "cluster.a.upstream_rq_503": 1,
        "cluster.b.upstream_rq_404": 1,
        "cluster.slow.upstream_rq_timeout": 1,
        "http.ingress.downstream_rq_4xx": 1,
    }

    def got():
        values = {}
        for line in proxy.admin_text("/stats").splitlines():
            name, _, value = line.partition(": ")
            if name in want:
                values[name] = int(value)
        return values

    try:
        harness.wait_until(lambda: got() == want, timeout=5, what="dotted stats")
    except AssertionError:
        assert got() == want
