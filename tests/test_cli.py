"""The `mesh` command line: validate, run on bad input, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

import harness

needs_mesh = pytest.mark.skipif(harness.mesh_missing_reason() is not None,
                                reason=harness.mesh_missing_reason() or "")

GOOD = """
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: {{route_cluster}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: a
    type: STATIC
    {{timeout_field}}: 1s
    load_assignment:
      cluster_name: a
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {socket_address: {address: 127.0.0.1, port_value: 9}}
"""

FILES = {
    "good": harness.render(GOOD, route_cluster="a", timeout_field="connect_timeout"),
    "typo": harness.render(GOOD, route_cluster="a", timeout_field="conect_timeout"),
    "unknown_cluster": harness.render(GOOD, route_cluster="nope", timeout_field="connect_timeout"),
    "invalid_yaml": "static_resources:\n  listeners: [\n    - name: x\n  clusters: {\n",
}


@pytest.fixture
def config_file(tmp_path):
    def write(name: str) -> str:
        p = tmp_path / f"{name}.yaml"
        p.write_text(FILES[name])
        return str(p)

    return write


def mesh(*args, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(harness.mesh_bin()), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("name,ok", [("good", True), ("typo", False),
                                     ("unknown_cluster", False), ("invalid_yaml", False)])
def test_envoy_agrees_on_the_files(config_file, name, ok):
    """The fixtures mean what the tests below say: Envoy accepts/refuses them too."""
    r = subprocess.run([str(harness.envoy_bin()), "--mode", "validate", "-c", config_file(name),
                        "--disable-hot-restart", "-l", "error"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode == 0) == ok, r.stdout[-2000:] + r.stderr[-2000:]


@needs_mesh
def test_validate_good(config_file):
    r = mesh("validate", "-c", config_file("good"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@needs_mesh
def test_validate_typo_field(config_file):
    r = mesh("validate", "-c", config_file("typo"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = (r.stdout + r.stderr).splitlines()
    assert "unsupported: static_resources.clusters[0].conect_timeout" in [l.strip() for l in lines], \
        r.stdout + r.stderr


@needs_mesh
def test_validate_unknown_cluster(config_file):
    r = mesh("validate", "-c", config_file("unknown_cluster"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert "nope" in out, out
    assert "virtual_hosts[0].routes[0].route.cluster" in out, out


@needs_mesh
def test_validate_invalid_yaml(config_file):
    r = mesh("validate", "-c", config_file("invalid_yaml"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip(), "no error message"
    assert r.stdout.strip() != "ok"


@needs_mesh
def test_validate_compiles_routes_and_refuses_what_cannot_run(tmp_path):
    """What only compiling finds (an unknown header substitution) and what
    this build cannot run (an EDS cluster without xDS) fail `validate` with
    their field paths, not only `run`."""
    text = FILES["good"].replace(
        "              routes:",
        "              request_headers_to_add: [{header: {key: x-a, value: \"%NOPE%\"}}]\n"
        "              routes:")
    text = text.replace("    type: STATIC\n", "    type: EDS\n    eds_cluster_config: {eds_config: {ads: {}}}\n")
    text = text.replace("    load_assignment:\n      cluster_name: a\n      endpoints:\n"
                        "      - lb_endpoints:\n        - endpoint:\n"
                        "            address: {socket_address: {address: 127.0.0.1, port_value: 9}}\n",
                        "")
    p = tmp_path / "compiled.yaml"
    p.write_text(text)
    r = mesh("validate", "-c", str(p))
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = r.stderr
    assert "static_resources.clusters[0].type: EDS" in out, out
    assert ("virtual_hosts[0].request_headers_to_add[0].header.value: "
            "unsupported header substitution %NOPE%") in out, out


@needs_mesh
def test_validate_missing_file(tmp_path):
    r = mesh("validate", "-c", str(tmp_path / "does-not-exist.yaml"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip()


@needs_mesh
@pytest.mark.parametrize("name", ["typo", "unknown_cluster", "invalid_yaml"])
def test_run_bad_file_exits_1(config_file, name, tmp_path):
    r = mesh("run", "-c", config_file(name), "--admin-address-path", str(tmp_path / "addr"),
             timeout=20)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip()


@needs_mesh
def test_sigterm_drains_in_flight_request(make_upstream):
    up = make_upstream("slow")
    cfg = harness.simple_http_bootstrap(harness.catch_all_routes("slow", timeout="30s"),
                                        [harness.static_cluster("slow", up.port)])
    drain = 5
    with harness.start_proxy("mesh", cfg, extra_args=("--drain-time-s", str(drain))) as proxy:
        port = proxy.port()
        result = {}

        def slow_request():
            try:
                result["resp"] = harness.request(port, "GET", "/delay/2", timeout=20)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                result["error"] = e

        t = threading.Thread(target=slow_request, daemon=True)
        t.start()
        harness.wait_until(lambda: up.requests >= 1, timeout=10,
                           what="the slow request to reach the upstream")
        sent = time.monotonic()
        os.kill(proxy.proc.pid, signal.SIGTERM)

        # stops accepting new connections while the slow request is in flight
        time.sleep(0.5)
        refused = False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                refused = s.recv(100) == b""
        except (ConnectionRefusedError, ConnectionResetError):
            refused = True
        except socket.timeout:
            refused = False

        t.join(20)
        assert "error" not in result, f"in-flight request failed: {result.get('error')!r}"
        assert result["resp"].status == 200
        assert result["resp"].upstream == "slow"
        try:
            rc = proxy.proc.wait(timeout=drain + 3)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mesh still running {drain + 3}s after SIGTERM")
        assert rc == 0, proxy.stderr_text()[-2000:]
        assert time.monotonic() - sent <= drain + 3
        assert refused, "a new connection was served after SIGTERM"


@needs_mesh
def test_sigint_idle_exits_0(upstream_a):
    cfg = harness.simple_http_bootstrap(harness.catch_all_routes("a"),
                                        [harness.static_cluster("a", upstream_a.port)])
    with harness.start_proxy("mesh", cfg, extra_args=("--drain-time-s", "2")) as proxy:
        assert harness.request(proxy.port(), "GET", "/").status == 200
        os.kill(proxy.proc.pid, signal.SIGINT)
        try:
            rc = proxy.proc.wait(timeout=2 + 3)
        except subprocess.TimeoutExpired:
            pytest.fail("mesh still running 5 s after SIGINT with nothing in flight")
        assert rc == 0, proxy.stderr_text()[-2000:]
