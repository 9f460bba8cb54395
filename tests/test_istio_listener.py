"""Listener and HCM options Istio sets, under Envoy and mesh alike.

- `continue_on_listener_filters_timeout`: a server-speaks-first client sends
  nothing, so the TLS inspector times out; with the option the connection is
  matched as plain text and proxied, without it the connection is closed.
- `traffic_direction` is accepted (Istio marks every listener with it).
"""

from __future__ import annotations

import socket
import threading

import pytest

import harness


class BannerServer:
    """A TCP server that greets first ("server speaks first", like SMTP/MySQL)."""

    def __init__(self, banner: bytes):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.banner = banner
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.sendall(self.banner)
            except OSError:
                pass
            threading.Timer(5, c.close).start()

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def banner():
    s = BannerServer(b"220 hello\r\n")
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


def read_all(port: int, timeout: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        out = b""
        try:
            while b"\n" not in out:
                chunk = s.recv(100)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, TimeoutError, socket.timeout):
            pass
        return out


def test_continue_on_listener_filters_timeout_serves_server_first_protocols(kind, start_proxy, banner):
    p = start_proxy(kind, config(banner.port, True))
    p.wait_ready()
    assert read_all(p.port()) == b"220 hello\r\n"


def test_listener_filters_timeout_closes_silent_connections_by_default(kind, start_proxy, banner):
    p = start_proxy(kind, config(banner.port, False))
    p.wait_ready()
    assert read_all(p.port()) == b""
