"""Retries through the real proxy against upstreams that fail on purpose,
each under Envoy and under mesh with the same YAML: a fail-once upstream
becomes a 200 with two attempts, exhausted retries give the last 503 with
URX, the retry budget caps attempts under a 100% failing upstream, a
per-try timeout moves on to a healthy endpoint, request headers extend the
policy, bodies are replayed, and the max_retries breaker refuses retries.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import harness


class _FlakyHandler(BaseHTTPRequestHandler):
    """`/flaky/<key>/<n>`: the first n requests for key answer 503, then 200.
    `/fail`: always 503. Anything else: 200. Every request is counted per
    path (and per key for /flaky); the server's `delay` applies first."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):
        pass

    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.hits[path] += 1
            count = srv.hits[path]
            srv.bodies.append(body)
        if srv.delay:
            time.sleep(srv.delay)
        status = 200
        m = re.fullmatch(r"/flaky/([^/]+)/(\d+)", path)
        if m and count <= int(m.group(2)):
            status = 503
        if path.startswith("/fail"):
            status = 503
        out = json.dumps({"upstream": srv.name, "count": count, "body_len": len(body),
                          "attempt": self.headers.get("x-envoy-attempt-count")}).encode()
        try:
            self.send_response(status)
            self.send_header("x-upstream", srv.name)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = _handle


class FlakyUpstream(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, name: str, delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.name = name
        self.delay = delay
        self.port = self.server_address[1]
        self.lock = threading.Lock()
        self.hits: collections.Counter = collections.Counter()
        self.bodies: list[bytes] = []
        self._t = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                   daemon=True)

    def start(self) -> "FlakyUpstream":
        self._t.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def total(self, prefix: str) -> int:
        with self.lock:
            return sum(v for k, v in self.hits.items() if k.startswith(prefix))


@pytest.fixture
def flaky():
    made = []

    def make(name: str, delay: float = 0.0) -> FlakyUpstream:
        u = FlakyUpstream(name, delay).start()
        made.append(u)
        return u

    yield make
    for u in made:
        u.stop()


def _route(retry_policy: dict | None, cluster: str = "c", timeout: str = "5s") -> dict:
    route = {"cluster": cluster, "timeout": timeout}
    if retry_policy is not None:
        route["retry_policy"] = retry_policy
    return {"virtual_hosts": [{"name": "all", "domains": ["*"],
                               "routes": [{"match": {"prefix": "/"}, "route": route}]}]}


def _start(start_proxy, kind, routes, clusters, hcm_extra=None):
    return start_proxy(kind, harness.simple_http_bootstrap(routes, clusters, hcm_extra))


def _stat(proxy, name: str, cluster: str = "c") -> float:
    text = proxy.admin_text("/stats/prometheus")
    return harness.prometheus_value(text, name, envoy_cluster_name=cluster) or 0


def test_a_fail_once_upstream_becomes_200_with_two_attempts(start_proxy, kind, flaky):
    up = flaky("u")
    p = _start(start_proxy, kind, _route({"retry_on": "5xx", "num_retries": 2}),
               [harness.static_cluster("c", up.port)])
    r = harness.request(p.port(), path=f"/flaky/{kind}/1")
    assert r.status == 200
    assert up.hits[f"/flaky/{kind}/1"] == 2
    assert _stat(p, "envoy_cluster_upstream_rq_retry") == 1
    assert _stat(p, "envoy_cluster_upstream_rq_retry_success") == 1


def test_exhausted_retries_answer_the_last_503_with_urx(start_proxy, kind, flaky, tmp_path):
    up = flaky("u")
    log = tmp_path / f"access-{kind}.log"
    extra = {"access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(log)}}]}
    p = _start(start_proxy, kind, _route({"retry_on": "gateway-error", "num_retries": 2}),
               [harness.static_cluster("c", up.port)], extra)
    r = harness.request(p.port(), path="/fail")
    assert r.status == 503
    assert r.json()["upstream"] == "u"  # the upstream's own response, passed through
    assert up.hits["/fail"] == 3
    assert _stat(p, "envoy_cluster_upstream_rq_retry_limit_exceeded") == 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "URX" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.05)
    assert " 503 URX " in log.read_text()


def test_connect_failures_are_retried_on_another_endpoint(start_proxy, kind, flaky, refused):
    up = flaky("u")
    policy = {
        "retry_on": "connect-failure",
        "num_retries": 3,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                  "typed_config": {"@type": "type.googleapis.com/envoy."
                                                   "extensions.retry.host.previous_hosts.v3."
                                                   "PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 3,
    }
    p = _start(start_proxy, kind, _route(policy),
               [harness.static_cluster("c", [refused, up.port])])
    statuses = [harness.request(p.port(), path=f"/ok/{i}").status for i in range(6)]
    assert statuses == [200] * 6
    assert _stat(p, "envoy_cluster_upstream_rq_retry") >= 1


def test_a_per_try_timeout_moves_on_to_the_healthy_endpoint(start_proxy, kind, flaky):
    slow = flaky("slow", delay=3.0)
    fast = flaky("fast")
    policy = {"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "0.3s"}
    p = _start(start_proxy, kind, _route(policy, timeout="10s"),
               [harness.static_cluster("c", [slow.port, fast.port])])
    t0 = time.monotonic()
    answers = [harness.request(p.port(), path=f"/x/{i}") for i in range(4)]
    elapsed = time.monotonic() - t0
    assert [a.status for a in answers] == [200] * 4
    assert {a.upstream for a in answers} == {"fast"}
    assert slow.total("/x/") >= 1  # some requests went to the slow one first
    assert elapsed < 3.0 * 4
    assert _stat(p, "envoy_cluster_upstream_rq_per_try_timeout") >= 1


INTERNAL = {"use_remote_address": True,
            "internal_address_config": {"cidr_ranges": [{"address_prefix": "127.0.0.1",
                                                         "prefix_len": 32}]}}


def test_request_headers_turn_retries_on_for_internal_requests(start_proxy, kind, flaky):
    up = flaky("u")
    p = _start(start_proxy, kind, _route(None), [harness.static_cluster("c", up.port)], INTERNAL)
    ask = {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "1"}
    r = harness.request(p.port(), path=f"/flaky/h{kind}/1", headers=ask)
    assert r.status == 200
    assert up.hits[f"/flaky/h{kind}/1"] == 2
    # Without the headers, no retry.
    r = harness.request(p.port(), path=f"/flaky/n{kind}/1")
    assert r.status == 503
    # A request forwarded from elsewhere (x-forwarded-for) is external: the
    # headers are ignored.
    r = harness.request(p.port(), path=f"/flaky/x{kind}/1",
                        headers={**ask, "x-forwarded-for": "10.0.0.1"})
    assert r.status == 503
    assert up.hits[f"/flaky/x{kind}/1"] == 1


def test_request_headers_are_ignored_by_default(start_proxy, kind, flaky):
    up = flaky("u")
    p = _start(start_proxy, kind, _route(None), [harness.static_cluster("c", up.port)])
    r = harness.request(p.port(), path=f"/flaky/d{kind}/1",
                        headers={"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "1"})
    assert r.status == 503
    assert up.hits[f"/flaky/d{kind}/1"] == 1


def test_a_request_body_is_replayed(start_proxy, kind, flaky):
    up = flaky("u")
    p = _start(start_proxy, kind, _route({"retry_on": "5xx", "num_retries": 1}),
               [harness.static_cluster("c", up.port)])
    body = harness.payload(100_000)
    r = harness.request(p.port(), method="POST", path=f"/flaky/b{kind}/1", body=body)
    assert r.status == 200
    assert up.bodies[-2:] == [body, body]


def test_a_body_over_the_buffer_limit_is_not_retried(start_proxy, kind, flaky):
    up = flaky("u")
    routes = _route({"retry_on": "5xx", "num_retries": 1})
    routes["virtual_hosts"][0]["per_request_buffer_limit_bytes"] = 1024
    p = _start(start_proxy, kind, routes, [harness.static_cluster("c", up.port)])
    body = harness.payload(64_000)
    r = harness.request(p.port(), method="POST", path=f"/flaky/big{kind}/1", body=body)
    assert r.status == 503
    assert up.hits[f"/flaky/big{kind}/1"] == 1
    assert up.bodies[-1] == body


def test_max_retries_breaker_refuses_retries(start_proxy, kind, flaky):
    up = flaky("u")
    cluster = harness.static_cluster("c", up.port)
    cluster["circuit_breakers"] = {"thresholds": [{"max_retries": 0}]}
    p = _start(start_proxy, kind, _route({"retry_on": "5xx", "num_retries": 3}), [cluster])
    r = harness.request(p.port(), path="/fail")
    assert r.status == 503
    assert up.hits["/fail"] == 1
    assert _stat(p, "envoy_cluster_upstream_rq_retry_overflow") == 1


def test_attempt_count_header(start_proxy, kind, flaky):
    up = flaky("u")
    routes = _route({"retry_on": "5xx", "num_retries": 2})
    routes["virtual_hosts"][0]["include_request_attempt_count"] = True
    routes["virtual_hosts"][0]["include_attempt_count_in_response"] = True
    p = _start(start_proxy, kind, routes, [harness.static_cluster("c", up.port)])
    r = harness.request(p.port(), path=f"/flaky/a{kind}/2")
    assert r.status == 200
    assert r.json()["attempt"] == "3"
    assert r.header("x-envoy-attempt-count") == "3"


def test_the_retry_budget_caps_attempts_under_a_failing_upstream(start_proxy, kind, flaky):
    up = flaky("u", delay=0.05)
    cluster = harness.static_cluster("c", up.port)
    cluster["circuit_breakers"] = {"thresholds": [{
        "max_retries": 1000,
        "retry_budget": {"budget_percent": {"value": 20.0},
                         "min_retry_concurrency": 0}}]}
    p = _start(start_proxy, kind, _route({"retry_on": "5xx", "num_retries": 5,
                                          "retry_back_off": {"base_interval": "0.001s"}}),
               [cluster], )
    n = 120

    def one(i):
        return harness.request(p.port(), path=f"/fail/{i}").status

    with ThreadPoolExecutor(max_workers=10) as ex:
        statuses = list(ex.map(one, range(n)))
    assert statuses == [503] * n
    attempts = up.total("/fail/")
    # At most budget_percent of the active requests are retries at any time:
    # retries / (requests + retries) <= 20 %, so attempts <= 1.25 x requests
    # (a few over for requests racing on the check).
    assert attempts <= 1.25 * n + 10, attempts
    # Without the budget each request would have made 6 attempts.
    assert attempts < 2 * n


@pytest.mark.parametrize("policy,fragment", [
    ({"retry_on": "5xx,bogus"}, "retry_on"),
    ({"retry_on": "5xx", "retry_back_off": {"base_interval": "0s"}}, "retry_back_off.base_interval"),
    ({"retry_on": "5xx", "retry_back_off": {"base_interval": "1s", "max_interval": "0.5s"}},
     "retry_back_off.max_interval"),
    ({"retry_on": "5xx", "per_try_timeout": "-1s"}, "per_try_timeout"),
])
def test_bad_retry_policies_are_refused_with_the_field_path(tmp_path, policy, fragment):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    import subprocess
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(harness.simple_http_bootstrap(_route(policy),
                                                 [harness.static_cluster("c", 1)]))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"retry_policy.{fragment}" in out.stdout + out.stderr, out.stdout + out.stderr


def test_bad_circuit_breakers_are_refused(tmp_path):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    import subprocess
    cluster = harness.static_cluster("c", 1)
    cluster["circuit_breakers"] = {"thresholds": [{
        "retry_budget": {"budget_percent": {"value": 150.0}}}]}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(harness.simple_http_bootstrap(_route(None), [cluster]))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "retry_budget.budget_percent.value" in out.stdout + out.stderr
