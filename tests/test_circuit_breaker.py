"""Circuit breakers under concurrency, each under Envoy and under mesh with
the same YAML: `max_requests` and `max_connections` + `max_pending_requests`
overflow answers 503 with `x-envoy-overloaded: true` (flag UO) and counts
in Envoy's stats; the breaker gauges come back to 0 once traffic stops."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import harness

ROUTES = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
    {"match": {"prefix": "/"}, "route": {"cluster": "c", "timeout": "10s"}}]}]}


def _cluster(port, thresholds):
    c = harness.static_cluster("c", port)
    c["circuit_breakers"] = {"thresholds": [thresholds]}
    return c


def _burst(port, n, path):
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return harness.request(port, path=path, timeout=15)

    with ThreadPoolExecutor(max_workers=n) as ex:
        return list(ex.map(one, range(n)))


def _stat(p, name):
    text = p.admin_text("/stats/prometheus")
    return harness.prometheus_value(text, name, envoy_cluster_name="c") or 0


def test_max_requests_overflow(start_proxy, kind, make_upstream):
    up = make_upstream("slow")
    p = start_proxy(kind, harness.simple_http_bootstrap(
        ROUTES, [_cluster(up.port, {"max_requests": 2})]))
    answers = _burst(p.port(), 8, "/delay/0.5")
    ok = [a for a in answers if a.status == 200]
    over = [a for a in answers if a.status == 503]
    assert len(ok) + len(over) == 8
    assert 2 <= len(ok) <= 4, [a.status for a in answers]
    assert over and all(a.header("x-envoy-overloaded") == "true" for a in over)
    assert _stat(p, "envoy_cluster_upstream_rq_active_overflow") == len(over)
    assert _stat(p, "envoy_cluster_circuit_breakers_default_rq_open") == 0
    # Once the burst is over, requests flow again.
    assert harness.request(p.port(), path="/x").status == 200


def test_max_connections_and_pending_overflow(start_proxy, kind, make_upstream):
    up = make_upstream("slow")
    p = start_proxy(kind, harness.simple_http_bootstrap(
        ROUTES, [_cluster(up.port, {"max_connections": 1, "max_pending_requests": 1})]))
    before = up.connections
    # The first request holds the only connection before the others arrive,
    # so the second one queues and asks for a connection over the limit
    # (cx_overflow) and the rest find the pending queue full. Sent all at
    # once, the others could all meet a still-connecting first request and
    # overflow the pending queue alone, leaving cx_overflow at 0.
    requests_before = up.requests
    with ThreadPoolExecutor(max_workers=1) as ex:
        first = ex.submit(harness.request, p.port(), path="/delay/0.6", timeout=15)
        deadline = time.monotonic() + 10
        while up.requests == requests_before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert up.requests > requests_before, "the first request never reached the upstream"
        answers = _burst(p.port(), 5, "/delay/0.3") + [first.result()]
    statuses = sorted(a.status for a in answers)
    assert statuses.count(200) >= 1, statuses
    assert statuses.count(503) >= 1, statuses
    assert all(a.header("x-envoy-overloaded") == "true" for a in answers if a.status == 503)
    # Never more than one upstream connection.
    assert up.connections - before == 1
    assert _stat(p, "envoy_cluster_upstream_cx_overflow") >= 1
    assert _stat(p, "envoy_cluster_upstream_rq_pending_overflow") == statuses.count(503)
    time.sleep(0.2)
    assert harness.request(p.port(), path="/x").status == 200
