"""Upstreams that run in their own process, so a test can kill one (every
socket closes, as when a real server dies) and restart it on the same port.

- `KillableUpstream("a")`: the harness HTTP echo server (`x-upstream: a`,
  `/status/NNN`, ...).
- `KillableUpstream("g", kind="grpc")`: a grpcio server with the standard
  `grpc.health.v1` health service (`grpcio-health-checking`); the serving
  status of a service is set with `set_grpc_status(service, "NOT_SERVING")`
  (the empty service is the whole server).
- `KillableUpstream("f", kind="fail", status=500)`: answers every request
  with `status` (`x-upstream: f`).
- `KillableUpstream("t", kind="tcp")`: answers `+pong` to `ping`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import harness

_CHILD = r'''
import socket, sys, threading, time
sys.path.insert(0, sys.argv[4])
kind, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

if kind == "http":
    import harness
    from http.server import ThreadingHTTPServer

    class Upstream(harness.HttpUpstream):
        def __init__(self):
            ThreadingHTTPServer.__init__(self, ("127.0.0.1", port), harness._Handler)
            self.name = name
            self.port = self.server_address[1]
            self.requests = 0
            self.connections = 0
            self._lock = threading.Lock()

    u = Upstream()
    print(u.port, flush=True)
    u.serve_forever(poll_interval=0.1)
elif kind == "fail":
    # Every request answers 500 (or the status in argv[5]), x-upstream: name.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    status = int(sys.argv[5]) if len(sys.argv) > 5 else 500

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _any(self):
            n = int(self.headers.get("content-length") or 0)
            if n:
                self.rfile.read(n)
            self.send_response(status)
            self.send_header("x-upstream", name)
            self.send_header("content-length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

    class S(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    srv = S(("127.0.0.1", port), H)
    print(srv.server_address[1], flush=True)
    srv.serve_forever(poll_interval=0.1)
elif kind == "grpc":
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(bound, flush=True)
    # Commands on stdin: "<service> <STATUS>".
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 2:
            service = "" if parts[0] == "-" else parts[0]
            hs.set(service, getattr(health_pb2.HealthCheckResponse, parts[1]))
            print("ok", flush=True)
    server.stop(0)
else:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print(srv.getsockname()[1], flush=True)

    def serve(c):
        with c:
            buf = b""
            while True:
                d = c.recv(4096)
                if not d:
                    return
                buf += d
                if b"ping" in buf:
                    c.sendall(b"+pong\r\n")
                    buf = b""

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


class KillableUpstream:
    def __init__(self, name: str, kind: str = "http", port: int = 0, status: int = 500):
        self.name = name
        self.kind = kind
        self.port = port
        self.status = status
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> "KillableUpstream":
        deadline = time.monotonic() + 10
        while True:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, self.kind, self.name, str(self.port),
                 str(harness.TESTS), str(self.status)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, preexec_fn=harness._die_with_parent)
            line = self.proc.stdout.readline().strip()
            if line.isdigit() and int(line) > 0:
                self.port = int(line)
                break
            # The port may still be held by the previous process: retry.
            self.proc.kill()
            self.proc.wait()
            if time.monotonic() > deadline:
                raise RuntimeError(f"upstream {self.name} could not bind port {self.port}")
            time.sleep(0.2)
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"upstream {self.name} is not listening on {self.port}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def set_grpc_status(self, service: str, status: str) -> None:
        assert self.kind == "grpc" and self.proc and self.proc.stdin
        self.proc.stdin.write(f"{service or '-'} {status}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def stop(self) -> None:
        self.kill()
