"""Local rate limit (`envoy.filters.http.local_ratelimit`) through the real
proxy, each under Envoy and under mesh with the same YAML: 429s at the
configured rate with two worker threads (one bucket shared by both), the
429's body and headers, per-route buckets and per-route disabling through
`typed_per_filter_config`, stats, and bad configurations refused."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness

LRL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
ALWAYS = {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
          "runtime_key": "lrl_enabled"}


def _lrl(max_tokens, per_fill, interval, **extra):
    c = {"@type": LRL_TYPE, "stat_prefix": "http_local_rate_limiter",
         "token_bucket": {"max_tokens": max_tokens, "tokens_per_fill": per_fill,
                          "fill_interval": interval},
         "filter_enabled": ALWAYS, "filter_enforced": ALWAYS}
    c.update(extra)
    return c


def _config(port, lrl, routes=None):
    routes = routes or [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}
    hcm = {"http_filters": [{"name": "envoy.filters.http.local_ratelimit", "typed_config": lrl},
                            harness.ROUTER_FILTER]}
    return harness.simple_http_bootstrap(rc, [harness.static_cluster("c", port)], hcm)


def _stat(p, name):
    return harness.prometheus_value(p.admin_text("/stats/prometheus"), name,
                                    envoy_local_http_ratelimit_prefix="http_local_rate_limiter") or 0


def test_429s_at_the_configured_rate_across_two_workers(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, _lrl(10, 10, "1s")),
                    concurrency=2)
    t0 = time.monotonic()
    deadline = t0 + 2.0

    def client(_):
        got = []
        while time.monotonic() < deadline:
            # A new connection each time: requests land on both workers.
            got.append(harness.request(p.port(), path="/x").status)
        return got

    with ThreadPoolExecutor(max_workers=4) as ex:
        statuses = [s for batch in ex.map(client, range(4)) for s in batch]
    elapsed = time.monotonic() - t0
    ok = statuses.count(200)
    assert set(statuses) <= {200, 429}
    # A full bucket of 10, then 10 per second, shared by both workers.
    expected = 10 + 10 * elapsed
    assert expected - 6 <= ok <= expected + 6, (ok, expected, len(statuses))
    assert statuses.count(429) > 0
    assert _stat(p, "envoy_http_local_rate_limit_rate_limited") == statuses.count(429)
    assert _stat(p, "envoy_http_local_rate_limit_ok") == ok


def test_the_429_reply(start_proxy, kind, upstream_a):
    lrl = _lrl(1, 1, "60s", enable_x_ratelimit_headers="DRAFT_VERSION_03",
               response_headers_to_add=[{"header": {"key": "x-limited", "value": "yes"},
                                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}])
    p = start_proxy(kind, _config(upstream_a.port, lrl))
    first = harness.request(p.port(), path="/x")
    assert first.status == 200
    assert first.header("x-ratelimit-limit") == "1"
    assert first.header("x-limited") is None
    second = harness.request(p.port(), path="/x")
    assert second.status == 429
    assert second.body == b"local_rate_limited"
    assert second.header("x-limited") == "yes"
    assert second.header("x-ratelimit-limit") == "1"
    assert second.header("x-ratelimit-remaining") == "0"


def test_per_route_buckets_and_disabling(start_proxy, kind, upstream_a):
    routes = [
        {"match": {"prefix": "/tight"}, "route": {"cluster": "c"},
         "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": _lrl(1, 1, "60s")}},
        {"match": {"prefix": "/free"}, "route": {"cluster": "c"},
         "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": {
             "@type": FILTER_CONFIG_TYPE, "disabled": True}}},
        {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
    ]
    p = start_proxy(kind, _config(upstream_a.port, _lrl(3, 1, "60s"), routes))
    assert [harness.request(p.port(), path="/tight").status for _ in range(3)] == [200, 429, 429]
    # The filter's own bucket is untouched by /tight.
    assert [harness.request(p.port(), path="/").status for _ in range(4)] == [200, 200, 200, 429]
    assert [harness.request(p.port(), path="/free").status for _ in range(5)] == [200] * 5


def test_a_disabled_filter_runs_only_where_a_route_enables_it(start_proxy, kind, upstream_a):
    routes = [
        {"match": {"prefix": "/on"}, "route": {"cluster": "c"},
         "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": {
             "@type": FILTER_CONFIG_TYPE, "config": _lrl(1, 1, "60s")}}},
        {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
    ]
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}
    hcm = {"http_filters": [{"name": "envoy.filters.http.local_ratelimit", "disabled": True,
                             "typed_config": _lrl(1, 1, "60s")},
                            harness.ROUTER_FILTER]}
    p = start_proxy(kind, harness.simple_http_bootstrap(
        rc, [harness.static_cluster("c", upstream_a.port)], hcm))
    assert [harness.request(p.port(), path="/").status for _ in range(3)] == [200] * 3
    assert [harness.request(p.port(), path="/on").status for _ in range(2)] == [200, 429]


@pytest.mark.parametrize("lrl,fragment", [
    (_lrl(0, 1, "1s"), "token_bucket.max_tokens"),
    (_lrl(1, 1, "0s"), "token_bucket.fill_interval"),
    (_lrl(1, 1, "-1s"), "token_bucket.fill_interval"),
    (_lrl(1, 1, "1s", filter_enabled={"default_value": {"numerator": 150,
                                                        "denominator": "HUNDRED"}}),
     "filter_enabled.default_value.numerator"),
])
def test_bad_limits_are_refused(tmp_path, lrl, fragment):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(_config(1, lrl))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert fragment in out.stdout + out.stderr, out.stdout + out.stderr


def test_an_unknown_optional_filter_is_skipped(start_proxy, kind, upstream_a):
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"],
                             "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}
    hcm = {"http_filters": [
        {"name": "envoy.filters.http.buffer", "is_optional": True, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 1024}},
        harness.ROUTER_FILTER]}
    if kind == "mesh":
        p = start_proxy(kind, harness.simple_http_bootstrap(
            rc, [harness.static_cluster("c", upstream_a.port)], hcm))
        assert harness.request(p.port(), path="/x").status == 200
    else:
        # Envoy has the buffer filter, so it runs it: only the YAML is checked.
        p = start_proxy(kind, harness.simple_http_bootstrap(
            rc, [harness.static_cluster("c", upstream_a.port)], hcm))
        assert harness.request(p.port(), path="/x").status == 200
