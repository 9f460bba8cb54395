"""Listener and HCM options Istio sets, under Envoy and mesh alike.

- `continue_on_listener_filters_timeout`: a server-speaks-first client sends
  nothing, so the TLS inspector times out; with the option the connection is
  matched as plain text and proxied, without it the connection is closed.
- `traffic_direction` is accepted (Istio marks every listener with it).
"""

from __future__ import annotations

import pytest

import harness


@pytest.fixture(scope="module")
def banner():
    s = harness.BannerServer(b"220 hello\r\n")
    yield s
    s.close()


def config(port: int, cont: bool) -> str:
    listener = harness.tcp_listener("ingress", "banner")
    listener["listener_filters"] = [{
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
    }]
    listener["listener_filters_timeout"] = "0.3s"
    listener["continue_on_listener_filters_timeout"] = cont
    listener["traffic_direction"] = "INBOUND"
    return harness.bootstrap([listener], [harness.static_cluster("banner", [port])])


def test_continue_on_listener_filters_timeout_serves_server_first_protocols(kind, start_proxy, banner):
    p = start_proxy(kind, config(banner.port, True))
    p.wait_ready()
    assert harness.read_line(p.port()) == b"220 hello\r\n"


def test_listener_filters_timeout_closes_silent_connections_by_default(kind, start_proxy, banner):
    p = start_proxy(kind, config(banner.port, False))
    p.wait_ready()
    assert harness.read_line(p.port()) == b""
