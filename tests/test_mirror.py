"""Request mirroring (route `request_mirror_policies`) through the real
proxy, under Envoy and under mesh with the same YAML: the mirror cluster
receives shadow copies with `-shadow` appended to the host (before any
port), a 50% fraction mirrors about half the requests, POST bodies are
mirrored whole, and a slow or dead mirror neither delays nor fails the
primary request.
"""

from __future__ import annotations

import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import harness


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):
        pass

    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        srv = self.server
        with srv.lock:
            srv.seen.append((self.command, self.path, self.headers.get("Host"), body))
        if srv.delay:
            time.sleep(srv.delay)
        with srv.lock:
            srv.done += 1
        out = srv.name.encode()
        try:
            self.send_response(200)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except OSError:
            self.close_connection = True

    do_GET = do_POST = _handle


class Upstream(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, name: str, delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.delay = delay
        self.port = self.server_address[1]
        self.lock = threading.Lock()
        self.seen: list = []
        self.done = 0
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


@pytest.fixture
def upstream():
    made = []

    def make(name: str, delay: float = 0.0) -> Upstream:
        u = Upstream(name, delay)
        made.append(u)
        return u

    yield make
    for u in made:
        u.shutdown()
        u.server_close()


def _routes(mirror: dict) -> dict:
    route = {"cluster": "primary", "timeout": "10s", "request_mirror_policies": [mirror]}
    return {"virtual_hosts": [{"name": "all", "domains": ["*"],
                               "routes": [{"match": {"prefix": "/"}, "route": route}]}]}


def _start(start_proxy, kind, primary_port, mirror_port, mirror: dict | None = None):
    policy = {"cluster": "shadow"}
    policy.update(mirror or {})
    clusters = [harness.static_cluster("primary", primary_port),
                harness.static_cluster("shadow", mirror_port)]
    return start_proxy(kind, harness.simple_http_bootstrap(_routes(policy), clusters))


def _settle(u: Upstream, want: int | None = None, timeout: float = 5.0) -> int:
    """The upstream's request count once it stops growing (or reaches want)."""
    end = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        n = u.count()
        if want is not None and n >= want:
            return n
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 0.5:
            return n
        time.sleep(0.05)
    return u.count()


def test_the_mirror_gets_shadow_copies_with_the_shadow_host(start_proxy, kind, upstream):
    primary, mirror = upstream("primary"), upstream("mirror")
    p = _start(start_proxy, kind, primary.port, mirror.port)
    for i in range(5):
        r = harness.request(p.port(), path=f"/get/{i}", host="api.example")
        assert r.status == 200 and r.body == b"primary"
    r = harness.request(p.port(), path="/port", host="api.example:8080")
    assert r.status == 200
    assert _settle(mirror, want=6) == 6
    assert primary.count() == 6
    hosts = {path: host for _, path, host, _ in mirror.seen}
    assert hosts["/get/0"] == "api.example-shadow"
    assert hosts["/port"] == "api.example-shadow:8080"
    assert sorted(hosts) == sorted([f"/get/{i}" for i in range(5)] + ["/port"])
    # The primary sees the request as sent.
    assert {host for _, _, host, _ in primary.seen} == {"api.example", "api.example:8080"}
    # Shadow requests count on the mirror cluster as ordinary requests.
    text = p.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "envoy_cluster_upstream_rq_total",
                                    envoy_cluster_name="shadow") == 6


def test_the_host_suffix_can_be_disabled(start_proxy, kind, upstream):
    primary, mirror = upstream("primary"), upstream("mirror")
    p = _start(start_proxy, kind, primary.port, mirror.port,
               {"disable_shadow_host_suffix_append": True})
    assert harness.request(p.port(), path="/x", host="api.example").status == 200
    assert _settle(mirror, want=1) == 1
    assert mirror.seen[0][2] == "api.example"


def test_half_the_requests_are_mirrored_at_50_percent(start_proxy, kind, upstream):
    primary, mirror = upstream("primary"), upstream("mirror")
    p = _start(start_proxy, kind, primary.port, mirror.port,
               {"runtime_fraction": {"default_value": {"numerator": 50,
                                                       "denominator": "HUNDRED"}}})
    n = 400
    for i in range(n):
        assert harness.request(p.port(), path=f"/{i}").status == 200
    got = _settle(mirror)
    # Binomial(400, 0.5): sd 10; allow 5 sd.
    assert 150 <= got <= 250, got
    assert primary.count() == n


def test_post_bodies_are_mirrored_whole(start_proxy, kind, upstream):
    primary, mirror = upstream("primary"), upstream("mirror")
    p = _start(start_proxy, kind, primary.port, mirror.port)
    body = bytes(range(256)) * 40
    r = harness.request(p.port(), method="POST", path="/upload", body=body,
                        headers={"content-type": "application/octet-stream"})
    assert r.status == 200
    assert _settle(mirror, want=1) == 1
    method, path, host, got = mirror.seen[0]
    assert (method, path, host) == ("POST", "/upload", "example.com-shadow")
    assert got == body
    assert primary.seen[0][3] == body


def test_a_slow_mirror_does_not_delay_the_primary(start_proxy, kind, upstream):
    primary, mirror = upstream("primary"), upstream("mirror", delay=5.0)
    p = _start(start_proxy, kind, primary.port, mirror.port)
    for i in range(3):
        t0 = time.monotonic()
        r = harness.request(p.port(), method="POST", path=f"/{i}", body=b"payload")
        elapsed = time.monotonic() - t0
        assert r.status == 200 and r.body == b"primary"
        # The response came back while the mirror was still sleeping.
        assert elapsed < 2.5, elapsed
        with mirror.lock:
            assert mirror.done == 0
    assert _settle(mirror, want=3) == 3
    assert all(b == b"payload" for _, _, _, b in mirror.seen)


def test_a_dead_mirror_does_not_fail_the_primary(start_proxy, kind, upstream):
    primary = upstream("primary")
    dead = harness.free_port()  # nothing listens there
    p = _start(start_proxy, kind, primary.port, dead)
    for i in range(5):
        r = harness.request(p.port(), method="POST", path=f"/{i}", body=b"x" * 100)
        assert r.status == 200 and r.body == b"primary"
    assert primary.count() == 5


def test_bad_mirror_policies_name_the_field(tmp_path):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    bad = {"cluster": "nowhere", "cluster_header": "x-mirror",
           "runtime_fraction": {"default_value": {"numerator": 101}}}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(harness.simple_http_bootstrap(
        _routes(bad), [harness.static_cluster("primary", harness.free_port())]))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    assert out.returncode == 1
    where = "request_mirror_policies[0]"
    assert f"{where}.cluster_header" in text, text
    assert f"{where}.runtime_fraction.default_value.numerator" in text, text
    assert f"{where}.cluster" in text and "nowhere" in text, text
