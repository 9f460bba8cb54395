"""Active health checking (cluster `health_checks`), the same YAML under Envoy
and mesh: HTTP path checks with expected statuses, TCP send/receive, gRPC
`grpc.health.v1`; an upstream killed mid-test is marked `/failed_active_hc`
on `/clusters`, gets no traffic, and returns when restarted on its port; a
cluster whose endpoints all fail their checks still serves (panic mode)."""

from __future__ import annotations

import collections
import json
import time

import pytest

import harness
from killable import KillableUpstream

ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/bad"}
    route: {cluster: bad}
  - match: {prefix: "/"}
    route: {cluster: c}
"""


def health_check(checker: dict, **over) -> dict:
    hc = {
        "timeout": "0.5s",
        "interval": "0.3s",
        "no_traffic_interval": "0.3s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
    }
    hc.update(over)
    hc.update(checker)
    return hc


def checked_cluster(name: str, ports, checker: dict, http2: bool = False, **over) -> dict:
    c = harness.static_cluster(name, ports, http2=http2)
    c["health_checks"] = [health_check(checker, **over)]
    return c


def flags(p, cluster: str) -> dict[int, str]:
    """Endpoint port -> health_flags from /clusters."""
    out = {}
    for line in p.admin_text("/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags":
            out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return out


def wait_flags(p, cluster: str, want: dict[int, str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = flags(p, cluster)
        if all(got.get(port) == f for port, f in want.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{p.kind}: flags of {cluster} {got}, want {want}")
        time.sleep(0.1)


def upstreams_hit(p, n: int, path: str = "/") -> collections.Counter:
    c = collections.Counter()
    for _ in range(n):
        r = harness.request(p.port(), "GET", path)
        c[(r.status, r.upstream)] += 1
    return c


def wait_traffic(p, want: set, timeout: float = 10.0) -> None:
    """Until a batch of requests reaches exactly the `want` (status, upstream)
    pairs (a health change reaches the workers shortly after /clusters)."""
    deadline = time.monotonic() + timeout
    while True:
        got = set(upstreams_hit(p, 10))
        if got == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{p.kind}: requests reached {got}, want {want}")
        time.sleep(0.1)


@pytest.fixture
def pair():
    a = KillableUpstream("a")
    b = KillableUpstream("b")
    yield a, b
    a.stop()
    b.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_killed_upstream_is_marked_unhealthy_gets_no_traffic_and_returns(start_proxy, pair,
                                                                         kind):
    a, b = pair
    http = {"http_health_check": {"path": "/healthz"}}
    cfg = harness.simple_http_bootstrap(ROUTES, [
        checked_cluster("c", [a.port, b.port], http),
        checked_cluster("bad", [a.port], http),
    ])
    p = start_proxy(kind, cfg)
    wait_flags(p, "c", {a.port: "healthy", b.port: "healthy"})
    assert set(upstreams_hit(p, 10)) == {(200, "a"), (200, "b")}

    b.kill()
    wait_flags(p, "c", {a.port: "healthy", b.port: "/failed_active_hc"})
    assert upstreams_hit(p, 20) == {(200, "a"): 20}

    b.restart()
    wait_flags(p, "c", {a.port: "healthy", b.port: "healthy"})
    wait_traffic(p, {(200, "a"), (200, "b")})

    stats = p.admin_text("/stats")
    for name in ["attempt", "success", "failure", "network_failure"]:
        line = [l for l in stats.splitlines() if l.startswith(f"cluster.c.health_check.{name}:")]
        assert line and int(line[0].split(":")[1]) > 0, (name, line)
    assert "cluster.c.health_check.healthy: 2" in stats.splitlines()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_http_path_and_expected_statuses(start_proxy, upstream_a, kind):
    ok = {"http_health_check": {"path": "/status/204",
                                "expected_statuses": [{"start": 200, "end": 205}],
                                "request_headers_to_add": [{"header": {"key": "x-hc", "value": "1"}}]}}
    bad = {"http_health_check": {"path": "/status/204"}}  # default: 200 only
    cfg = harness.simple_http_bootstrap(ROUTES, [
        checked_cluster("c", [upstream_a.port], ok),
        checked_cluster("bad", [upstream_a.port], bad),
    ])
    p = start_proxy(kind, cfg)
    wait_flags(p, "c", {upstream_a.port: "healthy"})
    wait_flags(p, "bad", {upstream_a.port: "/failed_active_hc"})
    # Every endpoint of "bad" fails its check: the cluster still serves.
    assert upstreams_hit(p, 5, "/bad") == {(200, "a"): 5}


@pytest.mark.parametrize("kind", harness.kind_params())
def test_tcp_send_receive(start_proxy, kind):
    t = KillableUpstream("t", kind="tcp")
    try:
        # "ping\n" -> "+pong" ("pong" found in the reply); "nope" never comes.
        ping = {"tcp_health_check": {"send": {"text": "70696e670a"},
                                     "receive": [{"text": "706f6e67"}]}}
        nope = {"tcp_health_check": {"send": {"text": "70696e670a"},
                                     "receive": [{"text": "6e6f7065"}]}}
        connect_only = {"tcp_health_check": {}}
        cfg = harness.simple_http_bootstrap(ROUTES, [
            checked_cluster("c", [t.port], ping),
            checked_cluster("bad", [t.port], nope, unhealthy_threshold=1),
            checked_cluster("conn", [t.port], connect_only),
        ])
        p = start_proxy(kind, cfg)
        wait_flags(p, "c", {t.port: "healthy"})
        wait_flags(p, "conn", {t.port: "healthy"})
        # The reply never matches: each check times out.
        wait_flags(p, "bad", {t.port: "/failed_active_hc/active_hc_timeout"})
        t.kill()
        wait_flags(p, "c", {t.port: "/failed_active_hc"})
        wait_flags(p, "conn", {t.port: "/failed_active_hc"})
        t.restart()
        wait_flags(p, "c", {t.port: "healthy"})
    finally:
        t.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_grpc_health_service(start_proxy, kind):
    g = KillableUpstream("g", kind="grpc")
    try:
        whole = {"grpc_health_check": {}}
        named = {"grpc_health_check": {"service_name": "shop.Cart", "authority": "grpc.local"}}
        cfg = harness.simple_http_bootstrap(ROUTES, [
            checked_cluster("c", [g.port], whole, http2=True),
            checked_cluster("bad", [g.port], named, http2=True),
        ])
        p = start_proxy(kind, cfg)
        wait_flags(p, "c", {g.port: "healthy"})
        # An unknown service is NOT_FOUND: unhealthy.
        wait_flags(p, "bad", {g.port: "/failed_active_hc"})
        g.set_grpc_status("shop.Cart", "SERVING")
        wait_flags(p, "bad", {g.port: "healthy"})
        g.set_grpc_status("", "NOT_SERVING")
        wait_flags(p, "c", {g.port: "/failed_active_hc"})
        g.set_grpc_status("", "SERVING")
        wait_flags(p, "c", {g.port: "healthy"})
        g.kill()
        wait_flags(p, "c", {g.port: "/failed_active_hc"})
    finally:
        g.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_clusters_json_shows_health(start_proxy, pair, kind):
    a, b = pair
    http = {"http_health_check": {"path": "/healthz"}}
    cfg = harness.simple_http_bootstrap(ROUTES, [
        checked_cluster("c", [a.port, b.port], http),
        checked_cluster("bad", [a.port], http),
    ])
    b.kill()
    p = start_proxy(kind, cfg)
    wait_flags(p, "c", {a.port: "healthy", b.port: "/failed_active_hc"})
    doc = json.loads(p.admin_text("/clusters?format=json"))
    c = next(s for s in doc["cluster_statuses"] if s["name"] == "c")
    by_port = {h["address"]["socket_address"]["port_value"]: h for h in c["host_statuses"]}
    assert by_port[b.port]["health_status"].get("failed_active_health_check") is True
    assert "failed_active_health_check" not in by_port[a.port]["health_status"]
    assert by_port[a.port]["health_status"]["eds_health_status"] == "HEALTHY"


@pytest.mark.parametrize("kind", harness.kind_params())
def test_event_log(start_proxy, pair, tmp_path, kind):
    a, b = pair
    log = tmp_path / "hc-events.log"
    http = {"http_health_check": {"path": "/healthz"}}
    c = checked_cluster("c", [a.port, b.port], http, event_log_path=str(log))
    cfg = harness.simple_http_bootstrap(ROUTES, [c, checked_cluster("bad", [a.port], http)])
    p = start_proxy(kind, cfg)
    wait_flags(p, "c", {a.port: "healthy", b.port: "healthy"})
    b.kill()
    wait_flags(p, "c", {b.port: "/failed_active_hc"})
    b.restart()
    wait_flags(p, "c", {b.port: "healthy"})
    # Envoy flushes its event log every 10 s.
    deadline = time.monotonic() + 15
    while True:
        events = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        of_b = [e for e in events
                if e["host"]["socket_address"]["port_value"] == b.port]
        if len(of_b) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    kinds = [next(k for k in e if k.endswith("_event")) for e in of_b]
    assert kinds == ["add_healthy_event", "eject_unhealthy_event", "add_healthy_event"], of_b
    assert of_b[0]["add_healthy_event"].get("first_check") is True
    assert of_b[1]["eject_unhealthy_event"]["failure_type"] == "NETWORK"
    assert of_b[2]["add_healthy_event"].get("first_check", False) is False
    for e in of_b:
        assert e["health_checker_type"] == "HTTP" and e["cluster_name"] == "c"
        assert e["host"]["socket_address"]["address"] == "127.0.0.1"
        assert e["timestamp"].endswith("Z")
        assert e["locality"] == {"region": "", "zone": "", "sub_zone": ""}
