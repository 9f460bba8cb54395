"""File access log in Envoy's default format, with Envoy's response flags."""

from __future__ import annotations

import re

import pytest

import harness

ROUTES = """
virtual_hosts:
- name: all
  domains: ["example.com"]
  routes:
  - match: {prefix: "/dead"}
    route: {cluster: dead}
  - match: {prefix: "/empty"}
    route: {cluster: empty}
  - match: {prefix: "/delay/"}
    route: {cluster: a, timeout: 0.2s}
  - match: {prefix: "/"}
    route: {cluster: a}
"""

# [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
# %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
# %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
# "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"
LINE = re.compile(
    r'^\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<proto>\S+)" (?P<code>\d+) '
    r'(?P<flags>\S+) (?P<rx>\d+) (?P<tx>\d+) (?P<duration>\d+) (?P<ust>\S+) '
    r'"(?P<xff>[^"]*)" "(?P<ua>[^"]*)" "(?P<rid>[^"]*)" "(?P<authority>[^"]*)" '
    r'"(?P<upstream>[^"]*)"$')


@pytest.fixture(params=harness.kind_params())
def logged(request, start_proxy, upstream_a, refused, tmp_path):
    log = tmp_path / "access.log"
    hcm = {"access_log": [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(log),
        },
    }]}
    cfg = harness.simple_http_bootstrap(
        ROUTES, [harness.static_cluster("a", upstream_a.port),
                 harness.static_cluster("dead", refused),
                 harness.static_cluster("empty", [])], hcm)
    proxy = start_proxy(request.param, cfg)
    return proxy, log


def _lines(log) -> list[dict]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        m = LINE.match(line)
        assert m, f"not Envoy's default access log format: {line!r}"
        out.append(m.groupdict())
    return out


def test_access_log_lines_and_response_flags(logged, upstream_a, refused):
    proxy, log = logged
    port = proxy.port()
    ua = {"user-agent": "mesh-tests/1"}
    reqs = [
        ("/ok", "example.com", 200),
        ("/dead", "example.com", 503),
        ("/empty", "example.com", 503),
        ("/delay/2", "example.com", 504),
        ("/nowhere", "unknown.example.org", 404),
    ]
    for path, host, status in reqs:
        r = harness.request(port, "GET", path, host=host,
                            headers={**ua, "x-request-id": f"rid-{path.strip('/').replace('/', '-')}"})
        assert r.status == status, (path, r.status, r.body[:200])
    if proxy.kind == "envoy":
        # Envoy buffers file access logs for up to 10 s; reopening flushes them
        host, aport = proxy.admin_address.rsplit(":", 1)
        assert harness.request(int(aport), "POST", "/reopen_logs", host=None, addr=host,
                               body=b"").status == 200
    lines = harness.wait_until(lambda: (ls := _lines(log)) and len(ls) >= len(reqs) and ls,
                               timeout=10, what=f"{len(reqs)} access log lines in {log}")
    by_path = {ln["path"]: ln for ln in lines}
    assert set(by_path) == {p for p, _, _ in reqs}, lines

    ok = by_path["/ok"]
    assert (ok["method"], ok["proto"], ok["code"], ok["flags"]) == ("GET", "HTTP/1.1", "200", "-")
    assert ok["authority"] == "example.com"
    assert ok["ua"] == "mesh-tests/1"
    assert ok["rid"] == "rid-ok"
    assert ok["upstream"] == f"127.0.0.1:{upstream_a.port}"
    assert int(ok["tx"]) > 0 and int(ok["rx"]) == 0
    # %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%: a number for a proxied response,
    # "-" for one the proxy made.
    assert ok["ust"].isdigit(), ok

    dead = by_path["/dead"]
    assert (dead["code"], dead["flags"]) == ("503", "UF")
    assert dead["upstream"] == f"127.0.0.1:{refused}"  # the host that refused

    empty = by_path["/empty"]
    assert (empty["code"], empty["flags"], empty["upstream"]) == ("503", "UH", "-")
    assert empty["ust"] == "-", empty

    slow = by_path["/delay/2"]
    assert (slow["code"], slow["flags"]) == ("504", "UT")
    assert int(slow["duration"]) >= 150
    assert slow["upstream"] == f"127.0.0.1:{upstream_a.port}"  # the host that timed out

    nr = by_path["/nowhere"]
    assert (nr["code"], nr["flags"], nr["upstream"]) == ("404", "NR", "-")
    assert nr["authority"] == "unknown.example.org"
