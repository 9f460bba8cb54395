"""tcp_proxy: bytes pass through unchanged; a refused upstream closes downstream."""

from __future__ import annotations

import socket
import threading

import pytest

import harness


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy, tcp_echo, refused):
    cfg = harness.bootstrap(
        [harness.tcp_listener("tcp", "echo"), harness.tcp_listener("tcp_dead", "dead")],
        [harness.static_cluster("echo", tcp_echo.port), harness.static_cluster("dead", refused)],
    )
    return module_start_proxy(request.param, cfg)


def _echo_through(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        err = []

        def send():
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError as e:  # pragma: no cover - reported below
                err.append(e)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        t.join(15)
        assert not err, err
        return bytes(got)


def test_1mib_echo_byte_exact(proxy):
    data = harness.payload(1024 * 1024, seed=7)
    got = _echo_through(proxy.port("tcp"), data)
    assert len(got) == len(data)
    assert harness.sha256(got) == harness.sha256(data)


def test_several_connections(proxy):
    for i in range(5):
        data = harness.payload(10_000 + i, seed=i)
        assert _echo_through(proxy.port("tcp"), data) == data


def test_half_close_propagates(proxy):
    """After the echo, the upstream closes; the downstream sees EOF."""
    with socket.create_connection(("127.0.0.1", proxy.port("tcp")), timeout=10) as s:
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        assert got == b"ping"


def test_refused_upstream_closes_downstream(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port("tcp_dead")), timeout=10) as s:
        try:
            s.sendall(b"hello?")
        except OSError:
            pass
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        except socket.timeout:
            pytest.fail("downstream connection still open 10 s after the upstream refused")
        assert data == b""
    assert proxy.alive()
