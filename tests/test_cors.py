"""CORS (`envoy.filters.http.cors` with `CorsPolicy` in
`typed_per_filter_config`), the same YAML under Envoy and mesh: preflight
requests from allowed origins answered by the proxy with the
`access-control-*` headers, cross-origin responses given
`access-control-allow-origin`/`-credentials`/`-expose-headers`, other
origins left alone (their preflights forwarded, or answered empty with
`forward_not_matching_preflights: false`), a route's policy inheriting the
virtual host's fields, per-route disabling, and the origin stats."""

from __future__ import annotations

import pytest

import harness

CORS_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
POLICY_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
APP = "https://app.example.com"
CORS_HEADERS = ("access-control-allow-origin", "access-control-allow-credentials",
                "access-control-allow-methods", "access-control-allow-headers",
                "access-control-max-age", "access-control-expose-headers")


def _policy(**fields):
    return {"envoy.filters.http.cors": {"@type": POLICY_TYPE, **fields}}


VH_POLICY = _policy(allow_origin_string_match=[{"exact": APP}, {"suffix": ".trusted.test"}],
                    allow_methods="GET, PUT", allow_headers="x-a, x-b", max_age="600",
                    expose_headers="x-id", allow_credentials=True)


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy):
    up = harness.HttpUpstream("u").start()
    request.addfinalizer(up.stop)
    routes = [
        {"match": {"prefix": "/strict"}, "route": {"cluster": "c"},
         "typed_per_filter_config": _policy(
             allow_origin_string_match=[{"exact": "https://strict.test"}],
             forward_not_matching_preflights=False)},
        {"match": {"prefix": "/off"}, "route": {"cluster": "c"},
         "typed_per_filter_config": {"envoy.filters.http.cors": {
             "@type": FILTER_CONFIG_TYPE, "disabled": True}}},
        {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
    ]
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes,
                             "typed_per_filter_config": VH_POLICY}]}
    hcm = {"http_filters": [{"name": "envoy.filters.http.cors",
                             "typed_config": {"@type": CORS_TYPE}}, harness.ROUTER_FILTER]}
    return module_start_proxy(request.param, harness.simple_http_bootstrap(
        rc, [harness.static_cluster("c", up.port)], hcm))


def _cors(r):
    return {k: r.header(k) for k in CORS_HEADERS if r.header(k) is not None}


def _preflight(p, path, origin, method="PUT"):
    return harness.request(p.port(), "OPTIONS", path, headers={
        "origin": origin, "access-control-request-method": method})


def test_a_preflight_is_answered_by_the_proxy(proxy):
    r = _preflight(proxy, "/x", APP)
    assert r.status == 200
    assert r.header("x-upstream") is None
    assert _cors(r) == {
        "access-control-allow-origin": APP,
        "access-control-allow-credentials": "true",
        "access-control-allow-methods": "GET, PUT",
        "access-control-allow-headers": "x-a, x-b",
        "access-control-max-age": "600",
        "access-control-expose-headers": "x-id",
    }


def test_a_cross_origin_response_gets_the_headers(proxy):
    r = harness.request(proxy.port(), "GET", "/x", headers={"origin": "https://a.trusted.test"})
    assert r.status == 200
    assert r.header("x-upstream") == "u"
    assert _cors(r) == {
        "access-control-allow-origin": "https://a.trusted.test",
        "access-control-allow-credentials": "true",
        "access-control-expose-headers": "x-id",
    }
    # An OPTIONS without access-control-request-method is no preflight.
    r = harness.request(proxy.port(), "OPTIONS", "/x", headers={"origin": APP})
    assert r.header("x-upstream") == "u"
    assert r.header("access-control-allow-origin") == APP


def test_other_origins_are_left_alone(proxy):
    r = harness.request(proxy.port(), "GET", "/x", headers={"origin": "https://evil.test"})
    assert r.status == 200 and _cors(r) == {}
    # Their preflights go upstream (forward_not_matching_preflights defaults to true).
    r = _preflight(proxy, "/x", "https://evil.test")
    assert r.header("x-upstream") == "u"
    assert _cors(r) == {}
    assert _cors(harness.request(proxy.port(), "GET", "/x")) == {}


def test_a_route_policy_inherits_and_may_refuse_preflights(proxy):
    r = _preflight(proxy, "/strict", "https://strict.test")
    assert r.status == 200
    assert r.header("x-upstream") is None
    # Fields the route leaves unset come from the virtual host.
    assert r.header("access-control-allow-methods") == "GET, PUT"
    assert r.header("access-control-allow-credentials") == "true"
    # The route's own origins replace the virtual host's; a preflight from
    # another origin is answered instead of forwarded, without
    # access-control-allow-origin.
    r = _preflight(proxy, "/strict", APP)
    assert r.status == 200
    assert r.header("x-upstream") is None
    assert _cors(r) == {
        "access-control-allow-credentials": "true",
        "access-control-allow-methods": "GET, PUT",
        "access-control-allow-headers": "x-a, x-b",
        "access-control-max-age": "600",
    }


def test_cors_disabled_on_a_route(proxy):
    r = _preflight(proxy, "/off", APP)
    assert r.header("x-upstream") == "u"
    assert _cors(r) == {}


def test_origin_stats(proxy):
    def stat(name):
        return harness.prometheus_value(proxy.admin_text("/stats/prometheus"), name,
                                        envoy_http_conn_manager_prefix="ingress") or 0

    valid, invalid = stat("envoy_http_cors_origin_valid"), stat("envoy_http_cors_origin_invalid")
    harness.request(proxy.port(), "GET", "/x", headers={"origin": APP})
    harness.request(proxy.port(), "GET", "/x", headers={"origin": "https://evil.test"})
    harness.request(proxy.port(), "GET", "/x")
    assert stat("envoy_http_cors_origin_valid") == valid + 1
    assert stat("envoy_http_cors_origin_invalid") == invalid + 1
