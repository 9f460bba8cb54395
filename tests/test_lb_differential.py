"""Load balancing, the same YAML under Envoy and mesh: round robin order and
shares, weighted shares, ring hash stickiness (and the same endpoint for the
same key, since mesh builds Envoy's ring), Maglev stickiness, priority
failover and panic from the endpoints' `health_status`, and subset routing
by header -> `metadata_match`.

Endpoint health comes from `lb_endpoints[].health_status` (as EDS would
report it), which both proxies honour on static clusters, and from active
health checking (an upstream killed and restarted).
"""

from __future__ import annotations

import collections

import pytest

import harness

ROUTES = harness.catch_all_routes("c")


def endpoint(port: int, weight: int = 1, health: str | None = None, metadata=None) -> dict:
    e = {"endpoint": {"address": harness.socket_address(port)}, "load_balancing_weight": weight}
    if health:
        e["health_status"] = health
    if metadata:
        e["metadata"] = {"filter_metadata": {"envoy.lb": metadata}}
    return e


def cluster(levels: list[list[dict]], **extra) -> dict:
    """levels[p] = the lb_endpoints of priority p."""
    c = {
        "name": "c",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "c",
            "endpoints": [{"priority": p, "lb_endpoints": eps}
                          for p, eps in enumerate(levels) if eps],
        },
    }
    c.update(extra)
    return c


def sequence(p, n: int, headers=None, path: str = "/") -> list[str]:
    out = []
    for _ in range(n):
        r = harness.request(p.port(), "GET", path, headers=headers)
        assert r.status == 200, (r.status, r.body[:200])
        out.append(r.upstream)
    return out


@pytest.fixture(scope="module")
def ups():
    made = [harness.HttpUpstream(f"u{i}").start() for i in range(4)]
    yield made
    for u in made:
        u.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_round_robin_cycles_in_order(start_proxy, ups, kind):
    cfg = harness.simple_http_bootstrap(
        ROUTES, [cluster([[endpoint(u.port) for u in ups[:3]]])])
    p = start_proxy(kind, cfg)
    seq = sequence(p, 60)
    assert collections.Counter(seq) == {"u0": 20, "u1": 20, "u2": 20}
    # Strict rotation: every window of three has all three endpoints.
    for i in range(len(seq) - 2):
        assert len(set(seq[i:i + 3])) == 3, seq


@pytest.mark.parametrize("kind", harness.kind_params())
@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"])
def test_weighted_shares(start_proxy, ups, kind, policy):
    cfg = harness.simple_http_bootstrap(
        ROUTES, [cluster([[endpoint(ups[0].port, 3), endpoint(ups[1].port, 1)]],
                         lb_policy=policy)])
    p = start_proxy(kind, cfg)
    n = 400
    c = collections.Counter(sequence(p, n))
    share = c["u0"] / n
    if policy == "RANDOM":
        # Envoy's RANDOM ignores weights; mesh's is weighted random.
        expected = 0.5 if kind == "envoy" else 0.75
        assert abs(share - expected) < 0.08, c
    else:
        assert abs(share - 0.75) < 0.03, c


def _hash_cfg(ups, policy: str, extra: dict | None = None, hash_policy=None) -> str:
    hash_policy = hash_policy or [{"header": {"header_name": "x-user"}}]
    routes = {
        "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster": "c", "hash_policy": hash_policy}}],
        }]
    }
    return harness.simple_http_bootstrap(
        routes, [cluster([[endpoint(u.port) for u in ups]], lb_policy=policy, **(extra or {}))])


@pytest.fixture(scope="module")
def ring_choices(ups):
    """user -> upstream under each proxy kind (filled by the tests)."""
    return {}


@pytest.mark.parametrize("kind", harness.kind_params())
@pytest.mark.parametrize("policy", ["RING_HASH", "MAGLEV"])
def test_hash_policy_is_sticky(start_proxy, ups, kind, policy, ring_choices):
    p = start_proxy(kind, _hash_cfg(ups, policy))
    choice = {}
    for i in range(40):
        user = f"user-{i}"
        got = set(sequence(p, 3, headers={"x-user": user}))
        assert len(got) == 1, (user, got)
        choice[user] = got.pop()
    assert len(set(choice.values())) >= 3, choice
    ring_choices[(kind, policy)] = choice


def test_ring_hash_picks_the_same_endpoint_as_envoy(start_proxy, ups, ring_choices):
    """mesh builds Envoy's ring (xxHash64 of "ip:port_i", Envoy's sizing) and
    hashes the header as Envoy does, so each user lands on the same endpoint."""
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    for kind in ("envoy", "mesh"):
        if (kind, "RING_HASH") not in ring_choices:
            p = start_proxy(kind, _hash_cfg(ups, "RING_HASH"))
            ring_choices[(kind, "RING_HASH")] = {
                f"user-{i}": sequence(p, 1, headers={"x-user": f"user-{i}"})[0]
                for i in range(40)
            }
    assert ring_choices[("mesh", "RING_HASH")] == ring_choices[("envoy", "RING_HASH")]


QUERY_POLICY = [{"header": {"header_name": "x-user"}, "terminal": True},
                {"query_parameter": {"name": "u"}}]


def _query_choices(start_proxy, ups, kind) -> dict:
    p = start_proxy(kind, _hash_cfg(ups, "RING_HASH", hash_policy=QUERY_POLICY))
    choice = {}
    fixed = sequence(p, 1, headers={"x-user": "fixed"})[0]
    for i in range(30):
        by_query = set(sequence(p, 2, path=f"/?u=q{i}"))
        assert len(by_query) == 1
        choice[f"q{i}"] = by_query.pop()
        # The header matched and is terminal: the query no longer matters.
        assert sequence(p, 1, headers={"x-user": "fixed"}, path=f"/?u=q{i}")[0] == fixed
    assert len(set(choice.values())) >= 3
    return choice


@pytest.mark.parametrize("kind", harness.kind_params())
def test_query_parameter_and_terminal_hash_policies(start_proxy, ups, kind):
    """`terminal` on a header policy that matched skips the query policy;
    without the header the query parameter decides."""
    _query_choices(start_proxy, ups, kind)


def test_query_parameter_hash_picks_the_same_endpoint_as_envoy(start_proxy, ups):
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    assert _query_choices(start_proxy, ups, "mesh") == _query_choices(start_proxy, ups, "envoy")


@pytest.mark.parametrize("kind", harness.kind_params())
def test_locality_weights(start_proxy, ups, kind):
    c = cluster([[]], common_lb_config={"locality_weighted_lb_config": {}})
    c["load_assignment"]["endpoints"] = [
        {"locality": {"zone": "a"}, "load_balancing_weight": 1,
         "lb_endpoints": [endpoint(ups[0].port)]},
        {"locality": {"zone": "b"}, "load_balancing_weight": 3,
         "lb_endpoints": [endpoint(ups[1].port), endpoint(ups[2].port)]},
    ]
    p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [c]))
    n = 400
    got = collections.Counter(sequence(p, n))
    assert abs(got["u0"] / n - 0.25) < 0.04, got
    assert abs(got["u1"] / n - 0.375) < 0.05, got


@pytest.mark.parametrize("kind", harness.kind_params())
def test_generated_cookie_makes_the_client_stick(start_proxy, ups, kind):
    routes = {
        "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster": "c",
                                  "hash_policy": [{"cookie": {"name": "sticky", "ttl": "60s",
                                                              "path": "/"}}]}}],
        }]
    }
    cfg = harness.simple_http_bootstrap(
        routes, [cluster([[endpoint(u.port) for u in ups]], lb_policy="RING_HASH")])
    p = start_proxy(kind, cfg)
    r = harness.request(p.port(), "GET", "/")
    assert r.status == 200
    cookie = r.header("set-cookie")
    assert cookie is not None
    assert cookie.startswith('sticky="') and cookie.endswith('"; Max-Age=60; Path=/; HttpOnly'), cookie
    value = cookie.split(";", 1)[0]
    first = r.upstream
    for _ in range(10):
        r = harness.request(p.port(), "GET", "/", headers={"cookie": value})
        assert r.upstream == first
        assert r.header("set-cookie") is None


@pytest.mark.parametrize("kind", harness.kind_params())
def test_priority_failover_when_p0_is_unhealthy(start_proxy, ups, kind):
    # All of P0 unhealthy: everything goes to P1.
    cfg = harness.simple_http_bootstrap(ROUTES, [cluster([
        [endpoint(ups[0].port, health="UNHEALTHY"), endpoint(ups[1].port, health="UNHEALTHY")],
        [endpoint(ups[2].port)],
    ])])
    p = start_proxy(kind, cfg)
    assert collections.Counter(sequence(p, 30)) == {"u2": 30}


@pytest.mark.parametrize("kind", harness.kind_params())
def test_priority_spill_over_with_overprovisioning(start_proxy, ups, kind):
    # One of two P0 endpoints unhealthy: P0 health = 1.4 * 50% = 70%, so P0
    # keeps 70% and P1 takes 30%.
    cfg = harness.simple_http_bootstrap(ROUTES, [cluster([
        [endpoint(ups[0].port), endpoint(ups[1].port, health="UNHEALTHY")],
        [endpoint(ups[2].port)],
    ])])
    p = start_proxy(kind, cfg)
    n = 600
    c = collections.Counter(sequence(p, n))
    assert "u1" not in c, c
    assert abs(c["u2"] / n - 0.30) < 0.07, c


@pytest.mark.parametrize("kind", harness.kind_params())
def test_overprovisioning_factor_from_the_load_assignment(start_proxy, ups, kind):
    # With factor 200, one healthy of two still counts as 100%: no spill.
    c = cluster([
        [endpoint(ups[0].port), endpoint(ups[1].port, health="UNHEALTHY")],
        [endpoint(ups[2].port)],
    ])
    c["load_assignment"]["policy"] = {"overprovisioning_factor": 200}
    p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [c]))
    assert collections.Counter(sequence(p, 40)) == {"u0": 40}


@pytest.mark.parametrize("kind", harness.kind_params())
def test_panic_mode_uses_every_endpoint(start_proxy, ups, kind):
    # One of three healthy (33% < 50%): the level is in panic and, with no
    # other level, spreads over all three.
    cfg = harness.simple_http_bootstrap(ROUTES, [cluster([[
        endpoint(ups[0].port, health="UNHEALTHY"),
        endpoint(ups[1].port, health="UNHEALTHY"),
        endpoint(ups[2].port),
    ]])])
    p = start_proxy(kind, cfg)
    c = collections.Counter(sequence(p, 60))
    assert set(c) == {"u0", "u1", "u2"}, c


@pytest.mark.parametrize("kind", harness.kind_params())
def test_panic_threshold_zero_means_no_healthy_upstream(start_proxy, ups, kind):
    cfg = harness.simple_http_bootstrap(ROUTES, [cluster(
        [[endpoint(ups[0].port, health="UNHEALTHY")]],
        common_lb_config={"healthy_panic_threshold": {"value": 0}},
    )])
    p = start_proxy(kind, cfg)
    r = harness.request(p.port(), "GET", "/")
    assert r.status == 503
    assert r.body == b"no healthy upstream"
    stats = p.admin_text("/stats/prometheus")
    assert harness.prometheus_value(stats, "envoy_cluster_upstream_cx_none_healthy",
                                    envoy_cluster_name="c") == 1


@pytest.mark.parametrize("kind", harness.kind_params())
def test_degraded_endpoints_take_traffic_only_when_needed(start_proxy, ups, kind):
    cfg = harness.simple_http_bootstrap(ROUTES, [cluster([[
        endpoint(ups[0].port), endpoint(ups[1].port), endpoint(ups[2].port),
        endpoint(ups[3].port, health="DEGRADED"),
    ]])])
    p = start_proxy(kind, cfg)
    assert "u3" not in collections.Counter(sequence(p, 40))


SUBSET_ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match:
      prefix: "/"
      headers: [{name: x-version, string_match: {exact: v2}}]
    route:
      cluster: c
      metadata_match: {filter_metadata: {envoy.lb: {version: v2}}}
  - match: {prefix: "/nosuch"}
    route:
      cluster: c
      metadata_match: {filter_metadata: {envoy.lb: {version: v9}}}
  - match: {prefix: "/"}
    route: {cluster: c}
"""


@pytest.mark.parametrize("kind", harness.kind_params())
@pytest.mark.parametrize("fallback", ["DEFAULT_SUBSET", "ANY_ENDPOINT", "NO_FALLBACK"])
def test_subset_routing_by_header(start_proxy, ups, kind, fallback):
    c = cluster([[
        endpoint(ups[0].port, metadata={"version": "v1"}),
        endpoint(ups[1].port, metadata={"version": "v2"}),
        endpoint(ups[2].port, metadata={"version": "v2"}),
    ]], lb_subset_config={
        "fallback_policy": fallback,
        "default_subset": {"version": "v1"},
        "subset_selectors": [{"keys": ["version"]}],
    })
    p = start_proxy(kind, harness.simple_http_bootstrap(SUBSET_ROUTES, [c]))
    v2 = collections.Counter(sequence(p, 20, headers={"x-version": "v2"}))
    assert v2 == {"u1": 10, "u2": 10}, v2
    for path in ("/", "/nosuch"):
        if fallback == "NO_FALLBACK":
            r = harness.request(p.port(), "GET", path)
            assert r.status == 503 and r.body == b"no healthy upstream"
        else:
            got = set(sequence(p, 12, path=path))
            if fallback == "DEFAULT_SUBSET":
                assert got == {"u0"}, got
            else:
                assert got == {"u0", "u1", "u2"}, got


@pytest.mark.parametrize("kind", harness.kind_params())
def test_dead_p0_endpoint_without_health_checking_still_gets_traffic(start_proxy, ups,
                                                                     refused, kind):
    """Without health checks or outlier detection nothing marks a refused
    endpoint unhealthy, so (as Envoy) it keeps its share and those requests
    fail with 503 UF; failover then comes from `health_status` (above) or
    from active health checking / outlier detection."""
    cfg = harness.simple_http_bootstrap(ROUTES, [cluster([
        [endpoint(refused), endpoint(ups[0].port)],
        [endpoint(ups[1].port)],
    ])])
    p = start_proxy(kind, cfg)
    statuses = collections.Counter()
    upstreams = collections.Counter()
    for _ in range(20):
        r = harness.request(p.port(), "GET", "/")
        statuses[r.status] += 1
        upstreams[r.upstream] += 1
    assert statuses == {200: 10, 503: 10}, statuses
    assert upstreams == {"u0": 10, None: 10}, upstreams


@pytest.mark.parametrize("kind", harness.kind_params())
def test_least_request_avoids_a_slow_endpoint_under_concurrency(start_proxy, ups, kind):
    """Eight clients at once: the slow endpoint holds requests longer, so
    power-of-two-choices sends it far less than its round-robin third."""
    import threading

    from test_lb import SlowUpstream

    slow = SlowUpstream("slow", 0.2).start()
    try:
        c = cluster([[endpoint(ups[0].port), endpoint(ups[1].port), endpoint(slow.port)]],
                    lb_policy="LEAST_REQUEST")
        p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [c]))
        got = collections.Counter()
        lock = threading.Lock()
        errors = []

        def client():
            try:
                for _ in range(15):
                    r = harness.request(p.port(), "GET", "/")
                    with lock:
                        got[r.upstream] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        total = sum(got.values())
        assert total == 120, got
        assert got["slow"] / total < 0.25, got
    finally:
        slow.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_priority_failover_by_active_health_checking(start_proxy, kind):
    """P0's only endpoint is killed: the health checker marks it, all traffic
    fails over to P1, and returns to P0 when it comes back."""
    from killable import KillableUpstream
    from test_health import health_check, wait_flags, wait_traffic

    p0 = KillableUpstream("p0")
    p1 = KillableUpstream("p1")
    try:
        c = cluster([[endpoint(p0.port)], [endpoint(p1.port)]])
        c["health_checks"] = [health_check({"http_health_check": {"path": "/healthz"}})]
        p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [c]))
        wait_flags(p, "c", {p0.port: "healthy", p1.port: "healthy"})
        wait_traffic(p, {(200, "p0")})
        p0.kill()
        wait_flags(p, "c", {p0.port: "/failed_active_hc"})
        wait_traffic(p, {(200, "p1")})
        p0.restart()
        wait_flags(p, "c", {p0.port: "healthy"})
        wait_traffic(p, {(200, "p0")})
    finally:
        p0.stop()
        p1.stop()
