"""HTTP through the proxy with real clients (curl, http.client, raw sockets).

Written for mesh; the same tests also run against Envoy, which shows the
tests themselves are right (same YAML, same expectations).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import subprocess
import uuid

import pytest

import harness

BIG = 16 * 1024 * 1024

ROUTES = """
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/split"}
    route:
      weighted_clusters:
        clusters:
        - {name: a, weight: 80}
        - {name: b, weight: 20}
  - match: {prefix: "/"}
    route: {cluster: a, timeout: 60s}
"""

HCM_EXTRA = {
    "use_remote_address": True,
    "upgrade_configs": [{"upgrade_type": "websocket"}],
}


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy, upstream_a, upstream_b):
    # "ingress": an edge listener (use_remote_address, websocket upgrades);
    # "plain": HCM defaults (trusts x-request-id and x-forwarded-for as sent)
    cfg = harness.bootstrap(
        [harness.hcm_listener("ingress", ROUTES, HCM_EXTRA), harness.hcm_listener("plain", ROUTES)],
        [harness.static_cluster("a", upstream_a.port), harness.static_cluster("b", upstream_b.port)],
    )
    return module_start_proxy(request.param, cfg)


def curl(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
                          capture_output=True, timeout=timeout + 10)


def url(proxy, path: str) -> str:
    return f"http://127.0.0.1:{proxy.port('ingress')}{path}"


def test_http1_with_curl(proxy):
    r = curl("--http1.1", "-H", "Host: example.com", "-w", "\n%{http_code} %{http_version}",
             url(proxy, "/hello?x=1"))
    assert r.returncode == 0, r.stderr
    body, _, tail = r.stdout.rpartition(b"\n")
    assert tail == b"200 1.1"
    info = json.loads(body)
    assert info["upstream"] == "a"
    assert info["path"] == "/hello?x=1"
    assert info["headers"]["host"] == "example.com"


def test_h2c_prior_knowledge_with_curl(proxy):
    r = curl("--http2-prior-knowledge", "-w", "\n%{http_code} %{http_version}",
             "--data-binary", "h2 body", url(proxy, "/h2/post"))
    assert r.returncode == 0, r.stderr
    body, _, tail = r.stdout.rpartition(b"\n")
    assert tail == b"200 2"
    info = json.loads(body)
    assert info["upstream"] == "a"
    assert info["method"] == "POST"
    assert info["path"] == "/h2/post"
    assert info["body_len"] == len(b"h2 body")


def test_keep_alive_reuse(proxy, upstream_a):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port(), timeout=10)
    before = upstream_a.connections
    try:
        names = set()
        for i in range(20):
            r = harness.request(proxy.port(), "GET", f"/ka/{i}", conn=conn)
            assert r.status == 200
            assert (r.header("connection") or "").lower() != "close"
            names.add(conn.sock.getsockname())
        assert len(names) == 1, f"client connection was not reused: {names}"
    finally:
        conn.close()
    # sequential requests should share pooled upstream connections too
    assert upstream_a.connections - before <= 2


@pytest.mark.parametrize("proto", ["--http1.1", "--http2-prior-knowledge"])
def test_16mib_request_body_up(proxy, proto, tmp_path):
    data = harness.payload(BIG, seed=1)
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    r = curl(proto, "-H", "content-type: application/octet-stream", "--data-binary", f"@{f}",
             url(proxy, "/upload"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["body_len"] == BIG
    assert info["body_sha256"] == harness.sha256(data)


@pytest.mark.parametrize("proto", ["--http1.1", "--http2-prior-knowledge"])
def test_16mib_response_body_down(proxy, proto, tmp_path):
    f = tmp_path / "down.bin"
    r = curl(proto, "-o", str(f), "-w", "%{http_code}", url(proxy, f"/bytes/{BIG}"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"200"
    got = f.read_bytes()
    assert len(got) == BIG
    assert harness.sha256(got) == harness.sha256(harness.payload(BIG))


def test_echo_streamed_both_ways(proxy, tmp_path):
    data = harness.payload(2 * 1024 * 1024, seed=2)
    f = tmp_path / "echo.bin"
    f.write_bytes(data)
    out = tmp_path / "echo.out"
    r = curl("--http1.1", "--data-binary", f"@{f}", "-o", str(out), url(proxy, "/echo"))
    assert r.returncode == 0, r.stderr
    assert harness.sha256(out.read_bytes()) == harness.sha256(data)


def test_request_id_added_when_absent(proxy):
    r = harness.request(proxy.port(), "GET", "/rid")
    assert r.status == 200
    rid = r.json()["headers"].get("x-request-id")
    assert rid, "upstream saw no x-request-id"
    uuid.UUID(rid)  # Envoy generates a UUID


def test_request_id_kept_when_present(proxy):
    r = harness.request(proxy.port("plain"), "GET", "/rid", headers={"x-request-id": "my-id-123"})
    assert r.status == 200
    assert r.json()["headers"].get("x-request-id") == "my-id-123"


def _local_addresses() -> set[str]:
    """127.0.0.1 and this machine's own addresses.

    Envoy appends its own local address (not 127.0.0.1) to x-forwarded-for
    when the peer is a loopback address, so either is accepted.
    """
    out = {"127.0.0.1"}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the route's source
            out.add(s.getsockname()[0])
    except OSError:
        pass
    try:
        out.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    try:
        r = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5)
        out.update(r.stdout.split())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def test_x_forwarded_for_appended(proxy):
    local = _local_addresses()
    r = harness.request(proxy.port(), "GET", "/xff")
    xff = [v.strip() for v in r.json()["headers"]["x-forwarded-for"].split(",")]
    assert len(xff) == 1 and xff[0] in local, f"x-forwarded-for {xff}, local addresses {local}"
    r = harness.request(proxy.port(), "GET", "/xff", headers={"x-forwarded-for": "203.0.113.7"})
    xff = [v.strip() for v in r.json()["headers"]["x-forwarded-for"].split(",")]
    assert len(xff) == 2 and xff[0] == "203.0.113.7" and xff[1] in local, xff


def test_x_forwarded_for_untouched_without_use_remote_address(proxy):
    r = harness.request(proxy.port("plain"), "GET", "/xff",
                        headers={"x-forwarded-for": "203.0.113.7"})
    assert r.json()["headers"]["x-forwarded-for"] == "203.0.113.7"


def test_weighted_split_80_20(proxy):
    n = 1000
    counts = {"a": 0, "b": 0}
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port(), timeout=10)
    try:
        for _ in range(n):
            r = harness.request(proxy.port(), "GET", "/split", conn=conn)
            assert r.status == 200
            counts[r.upstream] += 1
    finally:
        conn.close()
    share_a = counts["a"] / n
    assert 0.75 <= share_a <= 0.85, f"split {counts} is not 80/20 within 5 points"


def test_websocket_upgrade_passthrough(proxy):
    req = (b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\n"
           b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as s:
        s.sendall(req)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, f"closed before the 101: {head!r}"
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        assert harness.status_of(head) == 101, head
        assert re.search(rb"(?im)^upgrade:\s*websocket", head), head
        assert re.search(rb"(?im)^x-upstream:\s*a", head), head
        for msg in (b"hello over the upgraded connection", harness.payload(256 * 1024, seed=3)):
            s.sendall(msg)
            got = rest
            while len(got) < len(msg):
                chunk = s.recv(65536)
                assert chunk, "upgraded connection closed early"
                got += chunk
            rest = got[len(msg):]
            assert hashlib.sha256(got[: len(msg)]).digest() == hashlib.sha256(msg).digest()
    assert proxy.alive()


def test_h2load_multiplexed_streams(proxy):
    """400 requests over 4 h2c connections, 10 concurrent streams each."""
    r = subprocess.run(["h2load", "-n", "400", "-c", "4", "-m", "10", "-T", "20",
                        url(proxy, "/h2load")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed",
                  r.stdout)
    assert m, r.stdout
    assert m.groups() == ("400", "400", "400", "400", "0"), r.stdout
    assert re.search(r"status codes: 400 2xx", r.stdout), r.stdout


def test_http1_pipelined_requests(proxy):
    """Two requests written at once on one connection answer in order."""
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as s:
        s.sendall(b"GET /p/1 HTTP/1.1\r\nHost: example.com\r\n\r\n"
                  b"GET /p/2 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        buf = b""
        deadline = 10
        s.settimeout(deadline)
        while buf.count(b'"path": "/p/') < 2:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    assert buf.count(b"HTTP/1.1 200") == 2, buf[:500]
    assert buf.index(b'"path": "/p/1"') < buf.index(b'"path": "/p/2"')


def test_h1_concurrent_connections(proxy):
    """400 HTTP/1.1 requests over 20 concurrent keep-alive connections."""
    r = subprocess.run(["h2load", "--h1", "-n", "400", "-c", "20", "-T", "20",
                        url(proxy, "/h1load")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"requests: 400 total, 400 started, 400 done, 400 succeeded, 0 failed",
                     r.stdout), r.stdout
    assert re.search(r"status codes: 400 2xx", r.stdout), r.stdout


def test_chunked_request_body(proxy):
    chunks = [harness.payload(n, seed=n) for n in (1, 1000, 70000, 5)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as s:
        s.sendall(b"POST /chunked HTTP/1.1\r\nHost: example.com\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n" + body)
        raw = harness.read_http_response(s)
    assert harness.status_of(raw) == 200, raw[:300]
    info = json.loads(raw.partition(b"\r\n\r\n")[2])
    whole = b"".join(chunks)
    assert info["body_len"] == len(whole)
    assert info["body_sha256"] == harness.sha256(whole)


def test_connection_close_honoured(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as s:
        s.sendall(b"GET /close HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        raw = harness.read_http_response(s, read_until_close=True)  # returns at EOF
    assert harness.status_of(raw) == 200, raw[:300]
    assert re.search(rb"(?im)^connection:\s*close", raw.partition(b"\r\n\r\n")[0]), raw[:300]
