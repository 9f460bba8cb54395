"""Real RPC peers for the Thrift, Dubbo and SOFA Bolt end-to-end tests.

- Apache Thrift (PyPI `thrift`, stubs generated at test time with the
  `thrift` compiler from tests/rpc/calc.thrift): a threaded server named
  after its instance, in any transport/protocol, plus client helpers.
- Node peers (`sofa-rpc-node`, `dubbo-remoting` from tests/node): servers
  and clients are small scripts under tests/node/, started as processes.

Every server binds 127.0.0.1 port 0 and is stopped by its owner.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import harness

RPC = harness.TESTS / "rpc"
NODE = harness.TESTS / "node"

THRIFT_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy"
DUBBO_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy"
RPC_PROXY_TYPE = "type.googleapis.com/mesh.filters.network.rpc_proxy.v1.RpcProxy"


def rpc_listener(name: str, filter_name: str, type_url: str, config: dict) -> dict:
    return {
        "name": name,
        "address": harness.socket_address(0),
        "filter_chains": [
            {"filters": [{"name": filter_name, "typed_config": {"@type": type_url, **config}}]}
        ],
    }


def thrift_listener(name: str, config: dict) -> dict:
    return rpc_listener(name, "envoy.filters.network.thrift_proxy", THRIFT_PROXY_TYPE,
                        {"stat_prefix": name, **config})


def dubbo_listener(name: str, config: dict) -> dict:
    return rpc_listener(name, "envoy.filters.network.dubbo_proxy", DUBBO_PROXY_TYPE,
                        {"stat_prefix": name, **config})


def generic_listener(name: str, codec: str, config: dict) -> dict:
    return rpc_listener(name, "mesh.filters.network.rpc_proxy", RPC_PROXY_TYPE,
                        {"stat_prefix": name, "codec": codec, **config})


# --------------------------------------------------------------------------
# Thrift

_stubs_lock = threading.Lock()
_stubs_dir: Path | None = None


def thrift_stubs():
    """Generates (once per process) and imports the `calc` Python stubs."""
    global _stubs_dir
    with _stubs_lock:
        if _stubs_dir is None:
            compiler = shutil.which("thrift")
            if compiler is None:
                raise RuntimeError("the thrift compiler is missing (apt-get install thrift-compiler)")
            harness.WORK.mkdir(parents=True, exist_ok=True)
            out = Path(harness.tempfile.mkdtemp(prefix="thrift-stubs-", dir=harness.WORK))
            subprocess.run([compiler, "--gen", "py", "-out", str(out), str(RPC / "calc.thrift")],
                           check=True, timeout=60)
            sys.path.insert(0, str(out))
            _stubs_dir = out
    return importlib.import_module("calc.Calc"), importlib.import_module("calc.ttypes")


def _factories(transport: str, protocol: str):
    from thrift.protocol import TBinaryProtocol, TCompactProtocol
    from thrift.transport import TTransport

    if transport == "header":
        # THeaderTransport: the protocol frames itself; `protocol` is the
        # payload's (binary or compact).
        from thrift.protocol.THeaderProtocol import THeaderProtocolFactory
        from thrift.transport.THeaderTransport import THeaderSubprotocolID

        sub = (THeaderSubprotocolID.COMPACT if protocol == "compact"
               else THeaderSubprotocolID.BINARY)
        return TTransport.TTransportFactoryBase(), THeaderProtocolFactory(default_protocol=sub)
    if protocol == "lax":
        # Old, unversioned binary message headers (unframed or framed).
        pf = TBinaryProtocol.TBinaryProtocolFactory(strictRead=False, strictWrite=False)
        tf = (TTransport.TFramedTransportFactory() if transport == "framed"
              else TTransport.TBufferedTransportFactory())
        return tf, pf
    tf = (TTransport.TFramedTransportFactory() if transport == "framed"
          else TTransport.TBufferedTransportFactory())
    pf = (TCompactProtocol.TCompactProtocolFactory() if protocol == "compact"
          else TBinaryProtocol.TBinaryProtocolFactory())
    return tf, pf


class ThriftServer:
    """A threaded Thrift `Calc` server whose `whoami` answers its name
    (after `whoami_delay` seconds)."""

    def __init__(self, name: str, transport: str = "framed", protocol: str = "binary",
                 multiplexed: str | None = None, whoami_delay: float = 0.0):
        self.name = name
        self.whoami_delay = whoami_delay
        self.transport = transport
        self.protocol = protocol
        self.multiplexed = multiplexed
        self.fired: list[str] = []
        # Header transport: the info headers of each call, in order.
        self.headers: list[dict] = []
        self.calls = 0
        self._server = None
        self.port = 0

    def start(self) -> "ThriftServer":
        from thrift.server import TServer
        from thrift.transport import TSocket
        from thrift.TMultiplexedProcessor import TMultiplexedProcessor

        Calc, ttypes = thrift_stubs()
        outer = self

        class Handler:
            def add(self, a, b):
                outer.calls += 1
                return a + b

            def whoami(self):
                outer.calls += 1
                if outer.whoami_delay:
                    time.sleep(outer.whoami_delay)
                return outer.name

            def echo(self, s):
                outer.calls += 1
                return s

            def sleep(self, ms):
                outer.calls += 1
                time.sleep(ms / 1000.0)

            def fire(self, note):
                outer.fired.append(note)

            def fired(self):
                return list(outer.fired)

            def unrouted(self):
                return "reached"

            def fail(self, why):
                raise ttypes.Oops(why=why)

        processor = Calc.Processor(Handler())
        if self.multiplexed:
            mp = TMultiplexedProcessor()
            mp.registerProcessor(self.multiplexed, processor)
            processor = mp
        if self.transport == "header":
            processor = _RecordHeaders(processor, self.headers)
        sock = TSocket.TServerSocket(host="127.0.0.1", port=0)
        sock.listen()
        self.port = sock.handle.getsockname()[1]
        sock.listen = lambda: None  # already listening
        self._sock = sock
        tf, pf = _factories(self.transport, self.protocol)
        self._server = TServer.TThreadedServer(processor, sock, tf, pf, daemon=True)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self):
        try:
            self._server.serve()
        except Exception:  # noqa: BLE001 - closed at stop()
            pass

    def stop(self):
        try:
            self._sock.close()
        except Exception:  # noqa: BLE001
            pass


class _RecordHeaders:
    """A processor that records each call's header transport info headers
    (str keys and values) before handing the call on."""

    def __init__(self, inner, into: list):
        self.inner = inner
        self.into = into

    def process(self, iprot, oprot):
        result = self.inner.process(iprot, oprot)
        self.into.append({k.decode(): v.decode() for k, v in iprot.get_headers().items()})
        return result


class ThriftClient:
    """A `Calc` client over one connection."""

    def __init__(self, port: int, transport: str = "framed", protocol: str = "binary",
                 multiplexed: str | None = None, timeout: float = 10.0):
        from thrift.protocol import TMultiplexedProtocol
        from thrift.transport import TSocket

        Calc, _ = thrift_stubs()
        sock = TSocket.TSocket("127.0.0.1", port)
        sock.setTimeout(timeout * 1000)
        tf, pf = _factories(transport, protocol)
        self.transport = tf.getTransport(sock)
        proto = pf.getProtocol(self.transport)
        # The header transport's protocol (set_header for info headers).
        self.proto = proto
        if multiplexed:
            proto = TMultiplexedProtocol.TMultiplexedProtocol(proto, multiplexed)
        self.client = Calc.Client(proto)
        self.transport.open()

    def __getattr__(self, name):
        return getattr(self.client, name)

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_thrift_no_route(c: ThriftClient, kind: str):
    """`unrouted` has no route: an UNKNOWN_METHOD TApplicationException
    naming it. Envoy closes the connection after its local reply; mesh
    keeps it (other calls may be in flight on it)."""
    import pytest
    from thrift.Thrift import TApplicationException

    with pytest.raises(TApplicationException) as e:
        c.unrouted()
    assert e.value.type == TApplicationException.UNKNOWN_METHOD
    assert "unrouted" in (e.value.message or "")
    if kind == "mesh":
        assert c.add(1, 1) == 2


def thrift_call(port: int, method: str, *args, **kw):
    with ThriftClient(port, **kw) as c:
        return getattr(c, method)(*args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Node peers (sofa-rpc-node): Dubbo and SOFA Bolt


def node_available() -> str | None:
    """Why the Node peers cannot run (None: they can). Under scripts/test
    (MESH_REQUIRE=1) they must run, so a missing install fails the tests."""
    if os.environ.get("MESH_REQUIRE") == "1":
        return None
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE / "node_modules" / "sofa-rpc-node").is_dir():
        return "tests/node/node_modules is missing (run scripts/test, which runs npm ci)"
    return None


class NodeServer:
    """`node tests/node/server.js`: a sofa-rpc-node server (bolt or dubbo)
    whose `whoami` answers its name."""

    def __init__(self, protocol: str, name: str):
        self.protocol = protocol
        self.name = name
        self.proc = None
        self.port = 0

    def start(self) -> "NodeServer":
        harness.WORK.mkdir(parents=True, exist_ok=True)
        self.err = open(harness.WORK / f"node-{self.protocol}-{self.name}-{os.getpid()}.log", "wb")
        self.proc = subprocess.Popen(
            ["node", str(NODE / "server.js"), "--protocol", self.protocol, "--name", self.name],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err, cwd=NODE,
            preexec_fn=harness._die_with_parent)
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"node server {self.name} did not start")
        self.port = json.loads(line)["port"]
        return self

    def stop(self):
        if self.proc is not None:
            harness.kill_process(self.proc)
            self.proc = None


def node_calls(protocol: str, port: int, calls: list[dict], concurrency: int = 1,
               timeout: float = 60.0) -> list[dict]:
    """Runs `node tests/node/client.js`: each call is {interface?, method,
    args?, timeout?}; returns [{"ok": value} | {"error": text}] in order."""
    out = subprocess.run(
        ["node", str(NODE / "client.js"), "--protocol", protocol, "--port", str(port),
         "--calls", json.dumps(calls), "--concurrency", str(concurrency)],
        stdin=subprocess.DEVNULL, capture_output=True, cwd=NODE, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"node client failed ({out.returncode}): {out.stderr.decode()[-2000:]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def dubbo_call(port: int, interface: str, method: str, args=(), attachments=None,
               version: str = "1.0.0", group=None, timeout: float = 5.0):
    """One call with the Python Dubbo client (dubbo-ssl-python)."""
    from dubbo_ssl.client import DubboClient

    c = DubboClient(interface, group, version=version, host=f"127.0.0.1:{port}")
    return c.call(method, list(args), context=attachments, timeout=timeout)
