"""Private network namespaces for traffic-capture tests.

`Netns` makes a namespace of its own (a unique name, so `pytest -n 2`
runs side by side), brings `lo` up, adds "service" and "pod" addresses to
it, installs iptables rules in the style of istio-iptables, and runs
processes inside it with `ip netns exec` (optionally as another user, which
is how the rules tell the workload's traffic from the proxy's). Everything
it started is killed by PID, and the namespace deleted, by `close()`.

A machine where namespaces or iptables cannot be used makes `Netns()`
raise: the tests that need it fail loudly instead of skipping.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

_COUNTER = itertools.count()

# Upstream servers run inside the namespace: `http:NAME:IP:PORT` answers
# every request with `x-upstream: NAME` and a body `NAME HOST PATH PEER-IP`;
# `tcp:PREFIX:IP:PORT` reads until the peer stops writing and answers
# PREFIX + what it read, then closes (`tcppeer:` puts the peer's IP and a
# space before what it read).
_SERVERS = r'''
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def http_server(name, ip, port):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            peer = self.client_address[0]
            body = f"{name} {self.headers.get('Host')} {self.path} {peer}".encode()
            self.send_response(200)
            self.send_header("x-upstream", name)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    ThreadingHTTPServer((ip, port), H).serve_forever()

def tcp_server(prefix, ip, port, with_peer=False):
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(64)
    def serve(c, peer):
        data = b""
        if with_peer:
            data = f"{peer} ".encode()
        c.settimeout(5)
        try:
            while True:
                b = c.recv(4096)
                if not b:
                    break
                data += b
            c.sendall(prefix.encode() + data)
        except OSError:
            pass
        c.close()
    while True:
        c, peer = s.accept()
        threading.Thread(target=serve, args=(c, peer[0]), daemon=True).start()

threads = []
for spec in sys.argv[1:]:
    kind, name, rest = spec.split(":", 2)
    ip, port = rest.rsplit(":", 1)
    if kind == "http":
        t = threading.Thread(target=http_server, args=(name, ip, int(port)), daemon=True)
    else:
        t = threading.Thread(target=tcp_server, args=(name, ip, int(port), kind == "tcppeer"),
                             daemon=True)
    t.start()
    threads.append(t)
print("ready", flush=True)
for t in threads:
    t.join()
'''

# A TCP client: connects, sends argv[3], stops writing, prints what came
# back (Python repr), or `closed` when the connection ended with no data
# (closed or reset), `refused`, `error: ...`.
_TCP_CLIENT = r'''
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(sys.argv[3].encode())
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
    if not data:
        print("closed")
    else:
        print(repr(data.decode()))
except ConnectionRefusedError:
    print("refused")
except (ConnectionResetError, BrokenPipeError):
    print("closed")
except OSError as e:
    if e.errno == 107:  # ENOTCONN: closed before we stopped writing
        print("closed")
    else:
        print(f"error: {e}")
'''


class NetnsError(RuntimeError):
    pass


def _run(argv, check=True, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, **kw)
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


class Netns:
    def __init__(self, addresses=()):
        self.name = f"mesh-odst-{os.getpid()}-{next(_COUNTER)}"
        self.procs: list[subprocess.Popen] = []
        harness.WORK.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="netns-", dir=harness.WORK))
        _run(["ip", "netns", "add", self.name])
        try:
            self.exec(["ip", "link", "set", "lo", "up"])
            for a in addresses:
                if ":" in a:
                    self.exec(["ip", "-6", "addr", "add", f"{a}/128", "dev", "lo", "nodad"])
                else:
                    self.exec(["ip", "addr", "add", f"{a}/32", "dev", "lo"])
        except BaseException:
            self.close()
            raise

    def exec(self, argv, uid: int | None = None, check=True):
        return _run(self.argv(argv, uid), check=check)

    def argv(self, argv, uid: int | None = None) -> list[str]:
        prefix = ["ip", "netns", "exec", self.name]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return prefix + [str(a) for a in argv]

    def iptables(self, *rule: str):
        self.exec(["iptables", "-w", *rule])

    def ip6tables(self, *rule: str):
        self.exec(["ip6tables", "-w", *rule])

    def popen(self, argv, log: str, **kw) -> subprocess.Popen:
        out = open(self.dir / log, "wb")
        p = subprocess.Popen(self.argv(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             preexec_fn=harness._die_with_parent, **kw)
        self.procs.append(p)
        return p

    def servers(self, *specs: str) -> None:
        """Starts the upstream servers and waits until they listen."""
        p = self.popen([sys.executable, "-c", _SERVERS, *specs], "servers.log")
        deadline = time.monotonic() + 10
        while b"ready" not in (self.dir / "servers.log").read_bytes():
            assert p.poll() is None, (self.dir / "servers.log").read_text()
            assert time.monotonic() < deadline, "servers did not start"
            time.sleep(0.02)

    def curl(self, url: str, uid: int | None = None, *extra: str) -> tuple[int, str]:
        """(status, body) of a GET; status 0 when no response came."""
        r = self.exec(["curl", "-s", "-m", "5", "-w", "\n%{http_code}", *extra, url],
                      uid=uid, check=False)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    def tcp(self, ip: str, port: int, data: str, uid: int | None = None) -> str:
        r = self.exec([sys.executable, "-c", _TCP_CLIENT, ip, port, data], uid=uid, check=False)
        return r.stdout.strip()

    def wait_port(self, ip: str, port: int, timeout: float = 20.0, proc=None, log=None):
        deadline = time.monotonic() + timeout
        probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)"
        while self.exec([sys.executable, "-c", probe, ip, port], check=False).returncode != 0:
            if proc is not None and proc.poll() is not None:
                text = (self.dir / log).read_text() if log else ""
                raise NetnsError(f"process exited before {ip}:{port} listened:\n{text[-3000:]}")
            assert time.monotonic() < deadline, f"{ip}:{port} did not listen"
            time.sleep(0.05)

    def close(self):
        for p in self.procs:
            harness.kill_process(p, grace=2)
        self.procs.clear()
        _run(["ip", "netns", "del", self.name], check=False)
