"""Network local rate limit (`envoy.filters.network.local_ratelimit`)
through the real proxy, the same YAML under Envoy and mesh: connections over
the bucket are closed at accept before the terminal filter (tcp_proxy or
HCM) sees them, one bucket per filter chain (only the chosen chain's bucket
is taken from), `local_rate_limit.<stat_prefix>.rate_limited` counts them,
and bad configurations are refused with the field path."""

from __future__ import annotations

import http.client
import socket
import subprocess

import pytest
import yaml

import harness

NLRL_TYPE = "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit"


def _nlrl(max_tokens, interval="60s", prefix="conns", **extra):
    c = {"@type": NLRL_TYPE, "stat_prefix": prefix,
         "token_bucket": {"max_tokens": max_tokens, "fill_interval": interval}}
    c.update(extra)
    return {"name": "envoy.filters.network.local_ratelimit", "typed_config": c}


def _tcp_listener(name, nlrl):
    l = harness.tcp_listener(name, "echo")
    if nlrl is not None:
        l["filter_chains"][0]["filters"].insert(0, nlrl)
    return l


def _echo(port: int, source: str | None = None) -> bytes:
    """Sends `hello`, half-closes, and returns what came back (b"" when the
    proxy closed the connection without serving it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        if source:
            s.bind((source, 0))
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                chunk = s.recv(100)
                if not chunk:
                    return got
                got += chunk
        except OSError:  # reset, broken pipe
            return b""


def _exchange(port: int, req: bytes) -> bytes:
    try:
        return harness.raw_exchange(port, req, read_until_close=True)
    except OSError:  # reset
        return b""


def _rate_limited(p, prefix="conns"):
    text = p.admin_text("/stats/prometheus")
    return harness.prometheus_value(text, "envoy_local_rate_limit_rate_limited",
                                    envoy_local_network_ratelimit_prefix=prefix) or 0


def test_connections_over_the_bucket_are_closed(start_proxy, kind, tcp_echo):
    p = start_proxy(kind, harness.bootstrap(
        [_tcp_listener("ingress", _nlrl(3))], [harness.static_cluster("echo", tcp_echo.port)]),
        concurrency=2)
    got = [_echo(p.port()) for _ in range(5)]
    # One bucket for both workers: three connections in all, then closed.
    assert got == [b"hello"] * 3 + [b""] * 2
    assert _rate_limited(p) == 2
    assert "local_rate_limit.conns.rate_limited: 2" in p.admin_text("/stats")


def test_an_hcm_behind_the_limit(start_proxy, kind, upstream_a):
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"],
                             "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}
    l = harness.hcm_listener("ingress", rc)
    l["filter_chains"][0]["filters"].insert(0, _nlrl(2))
    p = start_proxy(kind, harness.bootstrap([l], [harness.static_cluster("c", upstream_a.port)]))
    # Requests on an admitted connection take no more tokens.
    conn = http.client.HTTPConnection("127.0.0.1", p.port(), timeout=5)
    for _ in range(3):
        conn.request("GET", "/x")
        r = conn.getresponse()
        r.read()
        assert r.status == 200
    conn.close()
    req = b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
    answers = [_exchange(p.port(), req) for _ in range(2)]
    assert harness.status_of(answers[0]) == 200
    assert answers[1] == b""
    assert _rate_limited(p) == 1


def test_runtime_disabled_filter_limits_nothing(start_proxy, kind, tcp_echo):
    nlrl = _nlrl(1, runtime_enabled={"runtime_key": "nlrl_on", "default_value": False})
    p = start_proxy(kind, harness.bootstrap(
        [_tcp_listener("ingress", nlrl)], [harness.static_cluster("echo", tcp_echo.port)]))
    assert [_echo(p.port()) for _ in range(3)] == [b"hello"] * 3
    assert _rate_limited(p) == 0


def test_only_the_chosen_chain_is_limited(start_proxy, kind, tcp_echo):
    # Chain 0 serves clients from 127.0.0.2 through a one-token bucket; the
    # default chain (everyone else) has no limit.
    limited = harness.tcp_listener("ingress", "echo")["filter_chains"][0]
    limited["filter_chain_match"] = {"source_prefix_ranges": [
        {"address_prefix": "127.0.0.2", "prefix_len": 32}]}
    limited["filters"].insert(0, _nlrl(1))
    free = harness.tcp_listener("ingress", "echo")["filter_chains"][0]
    l = harness.tcp_listener("ingress", "echo")
    l["filter_chains"] = [limited, free]
    p = start_proxy(kind, harness.bootstrap([l], [harness.static_cluster("echo", tcp_echo.port)]))
    assert [_echo(p.port(), "127.0.0.1") for _ in range(3)] == [b"hello"] * 3
    assert [_echo(p.port(), "127.0.0.2") for _ in range(2)] == [b"hello", b""]
    assert _echo(p.port(), "127.0.0.1") == b"hello"
    assert _rate_limited(p) == 1


@pytest.mark.parametrize("nlrl,fragment", [
    (_nlrl(0), "token_bucket.max_tokens"),
    (_nlrl(1, "0.01s"), "token_bucket.fill_interval"),
    (_nlrl(1, share_key="k"), "share_key"),
    (_nlrl(1, runtime_enabled={"default_value": True}), "runtime_enabled.runtime_key"),
    ({"name": "envoy.filters.network.local_ratelimit", "typed_config": {
        "@type": NLRL_TYPE, "stat_prefix": "x"}}, "typed_config.token_bucket"),
])
def test_bad_limits_are_refused(tmp_path, nlrl, fragment):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(harness.bootstrap([_tcp_listener("ingress", nlrl)],
                                     [harness.static_cluster("echo", 1)]))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert fragment in out.stdout + out.stderr, out.stdout + out.stderr


def test_the_filter_after_the_terminal_is_refused(tmp_path):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    l = _tcp_listener("ingress", None)
    l["filter_chains"][0]["filters"].append(_nlrl(1))
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(yaml.safe_load(harness.bootstrap(
        [l], [harness.static_cluster("echo", 1)]))))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "filters[1]" in out.stdout + out.stderr, out.stdout + out.stderr
