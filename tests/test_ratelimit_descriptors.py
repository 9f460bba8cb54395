"""Local rate limit descriptors, the same YAML under Envoy and mesh: route
and virtual-host `rate_limits` actions (`request_headers` with
`skip_if_absent`, `generic_key`, `header_value_match`, `remote_address`,
`destination_cluster`, `stage`) make descriptors; the filter's `descriptors`
give matching requests their own buckets; `always_consume_default_token_bucket`
decides whether they also take from the default bucket; `x-ratelimit-*`
headers describe the bucket that decided; bad descriptors are refused."""

from __future__ import annotations

import subprocess

import pytest

import harness

LRL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
ALWAYS = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "k"}


def _bucket(n):
    return {"max_tokens": n, "tokens_per_fill": 1, "fill_interval": "3600s"}


def _desc(tokens, **entries):
    return {"entries": [{"key": k, "value": v} for k, v in entries.items()],
            "token_bucket": _bucket(tokens)}


def _lrl(default_tokens, descriptors, **extra):
    c = {"@type": LRL_TYPE, "stat_prefix": "desc", "token_bucket": _bucket(default_tokens),
         "filter_enabled": ALWAYS, "filter_enforced": ALWAYS, "descriptors": descriptors}
    c.update(extra)
    return c


def _config(port, lrl, route_limits=None, vh_limits=None, extra_routes=()):
    route = {"cluster": "c"}
    if route_limits is not None:
        route["rate_limits"] = route_limits
    routes = list(extra_routes) + [{"match": {"prefix": "/"}, "route": route}]
    vh = {"name": "all", "domains": ["*"], "routes": routes}
    if vh_limits is not None:
        vh["rate_limits"] = vh_limits
    hcm = {"http_filters": [{"name": "envoy.filters.http.local_ratelimit", "typed_config": lrl},
                            harness.ROUTER_FILTER]}
    return harness.simple_http_bootstrap({"virtual_hosts": [vh]},
                                         [harness.static_cluster("c", port)], hcm)


def _statuses(p, n, headers=None, path="/x"):
    return [harness.request(p.port(), path=path, headers=headers or {}).status for _ in range(n)]


USER = [{"actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]}]


def test_a_request_header_descriptor_has_its_own_bucket(start_proxy, kind, upstream_a):
    lrl = _lrl(100, [_desc(2, user="alice")], always_consume_default_token_bucket=False)
    p = start_proxy(kind, _config(upstream_a.port, lrl, USER))
    assert _statuses(p, 3, {"x-user": "alice"}) == [200, 200, 429]
    # Another value, or no header at all (no descriptor): the default bucket.
    assert _statuses(p, 3, {"x-user": "bob"}) == [200] * 3
    assert _statuses(p, 3) == [200] * 3


def test_always_consume_default_token_bucket(start_proxy, kind, upstream_a):
    # Default true: alice's requests take from both buckets.
    lrl = _lrl(3, [_desc(10, user="alice")])
    p = start_proxy(kind, _config(upstream_a.port, lrl, USER))
    assert _statuses(p, 4, {"x-user": "alice"}) == [200, 200, 200, 429]
    assert _statuses(p, 1) == [429]


def test_without_always_consume_the_default_bucket_is_spared(start_proxy, kind, upstream_a):
    lrl = _lrl(3, [_desc(10, user="alice")], always_consume_default_token_bucket=False)
    p = start_proxy(kind, _config(upstream_a.port, lrl, USER))
    assert _statuses(p, 5, {"x-user": "alice"}) == [200] * 5
    assert _statuses(p, 4) == [200, 200, 200, 429]


def test_x_ratelimit_headers_describe_the_deciding_bucket(start_proxy, kind, upstream_a):
    lrl = _lrl(50, [_desc(2, user="alice")], always_consume_default_token_bucket=False,
               enable_x_ratelimit_headers="DRAFT_VERSION_03")
    p = start_proxy(kind, _config(upstream_a.port, lrl, USER))
    got = [harness.request(p.port(), path="/x", headers={"x-user": "alice"}) for _ in range(3)]
    assert [r.status for r in got] == [200, 200, 429]
    assert [r.header("x-ratelimit-limit") for r in got] == ["2"] * 3
    assert [r.header("x-ratelimit-remaining") for r in got] == ["1", "0", "0"]
    other = harness.request(p.port(), path="/x")
    assert other.header("x-ratelimit-limit") == "50"
    assert other.header("x-ratelimit-remaining") == "49"


def test_multi_entry_descriptors_and_skip_if_absent(start_proxy, kind, upstream_a):
    limits = [{"actions": [
        {"generic_key": {"descriptor_value": "api"}},
        {"request_headers": {"header_name": "x-user", "descriptor_key": "user",
                             "skip_if_absent": True}},
    ]}]
    descriptors = [
        {"entries": [{"key": "generic_key", "value": "api"}, {"key": "user", "value": "alice"}],
         "token_bucket": _bucket(1)},
        {"entries": [{"key": "generic_key", "value": "api"}], "token_bucket": _bucket(2)},
    ]
    lrl = _lrl(100, descriptors, always_consume_default_token_bucket=False)
    p = start_proxy(kind, _config(upstream_a.port, lrl, limits))
    assert _statuses(p, 2, {"x-user": "alice"}) == [200, 429]
    # No x-user: the entry is skipped, the descriptor is [generic_key=api].
    assert _statuses(p, 3) == [200, 200, 429]
    # Another user: [api, bob] matches no descriptor; the default bucket.
    assert _statuses(p, 3, {"x-user": "bob"}) == [200] * 3


def test_header_value_match_remote_address_and_destination_cluster(start_proxy, kind,
                                                                  upstream_a):
    limits = [
        {"actions": [{"header_value_match": {
            "descriptor_value": "beta", "headers": [{"name": "x-beta", "present_match": True}]}}]},
        {"actions": [{"header_value_match": {
            "descriptor_key": "nobeta", "descriptor_value": "yes", "expect_match": False,
            "headers": [{"name": "x-beta", "present_match": True}]}},
            {"remote_address": {}}, {"destination_cluster": {}}]},
    ]
    descriptors = [
        _desc(1, header_match="beta"),
        {"entries": [{"key": "nobeta", "value": "yes"},
                     {"key": "remote_address", "value": "127.0.0.1"},
                     {"key": "destination_cluster", "value": "c"}],
         "token_bucket": _bucket(2)},
    ]
    lrl = _lrl(100, descriptors, always_consume_default_token_bucket=False)
    p = start_proxy(kind, _config(upstream_a.port, lrl, limits))
    assert _statuses(p, 2, {"x-beta": "1"}) == [200, 429]
    assert _statuses(p, 3) == [200, 200, 429]


def test_virtual_host_limits_and_stages(start_proxy, kind, upstream_a):
    vh = [{"actions": [{"generic_key": {"descriptor_value": "vh"}}]},
          {"stage": 1, "actions": [{"generic_key": {"descriptor_value": "stage1"}}]}]
    route = [{"actions": [{"generic_key": {"descriptor_value": "route"}}]}]
    descriptors = [_desc(3, generic_key="vh"), _desc(2, generic_key="route"),
                   _desc(1, generic_key="stage1")]
    lrl = _lrl(100, descriptors, always_consume_default_token_bucket=False)
    extra = [{"match": {"prefix": "/own"}, "route": {"cluster": "c", "rate_limits": route}}]
    p = start_proxy(kind, _config(upstream_a.port, lrl, vh_limits=vh, extra_routes=extra))
    # OVERRIDE (the default): the route's own limits replace the vhost's.
    assert _statuses(p, 3, path="/own") == [200, 200, 429]
    # A route without limits gets the vhost's (stage 0 only: the stage 1
    # entry's one-token bucket is never taken from).
    assert _statuses(p, 4, path="/x") == [200, 200, 200, 429]


def test_include_vh_rate_limits(start_proxy, kind, upstream_a):
    vh = [{"actions": [{"generic_key": {"descriptor_value": "vh"}}]}]
    route = [{"actions": [{"generic_key": {"descriptor_value": "route"}}]}]
    descriptors = [_desc(1, generic_key="vh"), _desc(5, generic_key="route")]
    lrl = _lrl(100, descriptors, always_consume_default_token_bucket=False,
               vh_rate_limits="INCLUDE")
    p = start_proxy(kind, _config(upstream_a.port, lrl, route, vh))
    # Both descriptors: the vhost's one-token bucket decides the second.
    assert _statuses(p, 2) == [200, 429]


@pytest.mark.parametrize("descriptors,fragment", [
    ([_desc(1, user="a"), _desc(2, user="a")], "descriptors[1]"),
    ([{"entries": [{"key": "user", "value": "a"}]}], "descriptors[0].token_bucket"),
    ([{"entries": [], "token_bucket": _bucket(1)}], "descriptors[0].entries"),
    ([_desc(1, user="")], "descriptors[0].entries[0].value"),
])
def test_bad_descriptors_are_refused(tmp_path, descriptors, fragment):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(_config(1, _lrl(1, descriptors), USER))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert fragment in out.stdout + out.stderr, out.stdout + out.stderr
