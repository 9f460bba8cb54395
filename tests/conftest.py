"""Fixtures for mesh's end-to-end suite (helpers live in harness.py).

- `start_proxy(kind, config_text)`: function-scoped factory, kind in
  {"mesh", "envoy"}; `module_start_proxy` is the same with module scope.
  Every process started is stopped at teardown (SIGTERM, then SIGKILL).
- `upstream_a`, `upstream_b`: HTTP/1.1 echo servers named "a" and "b"
  (session scope, per xdist worker); `make_upstream(name)` for a private one.
- `tcp_echo`, `grpc_server`, `refused`, `garbage_upstream`, `hangup_upstream`:
  other upstreams.
- `kind`: parametrizes a test over ["envoy", "mesh"].

The mesh side is skipped only while the binary does not exist; set
MESH_REQUIRE=1 (scripts/test does) to make a missing binary a failure.
"""

from __future__ import annotations

import os

# The harness starts proxies and peers with fork() (preexec_fn sets the
# parent-death signal). With gRPC's fork handlers on, a child forked while
# an in-process grpcio client or server runs may abort before exec
# ("epoll_wait error: Bad file descriptor", exit -6). Nothing here needs
# gRPC in a forked child: turn the handlers off before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest  # noqa: E402

import harness  # noqa: E402


@pytest.fixture(params=harness.kind_params())
def kind(request) -> str:
    return request.param


class _ProxySet:
    def __init__(self):
        self.procs: list[harness.Proxy] = []

    def __call__(self, kind: str, config_text: str, **kw) -> harness.Proxy:
        p = harness.Proxy(kind, config_text, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass


@pytest.fixture
def start_proxy():
    ps = _ProxySet()
    yield ps
    ps.stop_all()


@pytest.fixture(scope="module")
def module_start_proxy():
    ps = _ProxySet()
    yield ps
    ps.stop_all()


@pytest.fixture(scope="session")
def upstream_a():
    u = harness.HttpUpstream("a").start()
    yield u
    u.stop()


@pytest.fixture(scope="session")
def upstream_b():
    u = harness.HttpUpstream("b").start()
    yield u
    u.stop()


@pytest.fixture
def make_upstream():
    made = []

    def make(name: str) -> harness.HttpUpstream:
        u = harness.HttpUpstream(name).start()
        made.append(u)
        return u

    yield make
    for u in made:
        u.stop()


@pytest.fixture(scope="session")
def tcp_echo():
    s = harness.TcpEcho().start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def garbage_upstream():
    s = harness.BadUpstream("garbage").start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def hangup_upstream():
    s = harness.BadUpstream("close").start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def refused():
    """A port that refuses connections, for the whole session."""
    sock, port = harness.refused_port()
    yield port
    sock.close()


@pytest.fixture(scope="session")
def grpc_server(tmp_path_factory):
    srv = harness.start_grpc_server(tmp_path_factory.mktemp("grpc-stubs"))
    yield srv
    srv.stop()


def pytest_configure(config):
    # the controller (not an xdist worker) starts each run with an empty tests/.work
    if not hasattr(config, "workerinput"):
        import shutil

        shutil.rmtree(harness.WORK, ignore_errors=True)
