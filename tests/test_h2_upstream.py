"""HTTP/1.1 and h2c clients -> proxy -> HTTP/2 cluster (nghttpd, a strict h2 server)."""

from __future__ import annotations

import re
import subprocess

import pytest

import harness

BIG = 4 * 1024 * 1024

ROUTES = harness.catch_all_routes("h2up", timeout="30s")


@pytest.fixture(scope="module")
def nghttpd(tmp_path_factory):
    root = tmp_path_factory.mktemp("nghttpd")
    htdocs = root / "htdocs"
    htdocs.mkdir()
    (htdocs / "hello.txt").write_bytes(b"hello from h2\n")
    (htdocs / "big.bin").write_bytes(harness.payload(BIG, seed=11))
    srv = harness.Nghttpd(htdocs).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy, nghttpd):
    cfg = harness.simple_http_bootstrap(
        ROUTES, [harness.static_cluster("h2up", nghttpd.port, http2=True)])
    return module_start_proxy(request.param, cfg)


def curl(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
                          capture_output=True, timeout=timeout + 10)


def url(proxy, path):
    return f"http://127.0.0.1:{proxy.port()}{path}"


@pytest.mark.parametrize("proto", ["--http1.1", "--http2-prior-knowledge"])
def test_small_file(proxy, proto):
    r = curl(proto, "-w", "\n%{http_code}", url(proxy, "/hello.txt"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello from h2\n\n200"


@pytest.mark.parametrize("proto", ["--http1.1", "--http2-prior-knowledge"])
def test_big_file_byte_exact(proxy, proto, tmp_path):
    out = tmp_path / "big.out"
    r = curl(proto, "-o", str(out), "-w", "%{http_code}", url(proxy, "/big.bin"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"200"
    assert harness.sha256(out.read_bytes()) == harness.sha256(harness.payload(BIG, seed=11))


@pytest.mark.parametrize("proto", ["--http1.1", "--http2-prior-knowledge"])
def test_upload_echoed_byte_exact(proxy, proto, tmp_path):
    data = harness.payload(BIG, seed=12)
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    out = tmp_path / "echo.out"
    r = curl(proto, "--data-binary", f"@{f}", "-o", str(out), "-w", "%{http_code}",
             url(proxy, "/echo"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"200"
    assert harness.sha256(out.read_bytes()) == harness.sha256(data)


def test_upstream_404_passes_through(proxy):
    r = harness.request(proxy.port(), "GET", "/missing.txt")
    assert r.status == 404


def test_multiplexed_load(proxy):
    r = subprocess.run(["h2load", "-n", "200", "-c", "2", "-m", "10", "-T", "20",
                        url(proxy, "/hello.txt")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed",
                     r.stdout), r.stdout
