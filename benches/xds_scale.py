#!/usr/bin/env python3
"""xDS scale benchmark: time and peak RSS to apply N EDS clusters with E
endpoints each over ADS (state-of-the-world and delta), mesh beside Envoy on
the same snapshot in the same run, and the RSS growth per 1,000 clusters.

    cargo build --release -p mesh-bin -p mesh-examples --example xds_control_plane
    MESH_BIN=target/release/mesh .venv/bin/python benches/xds_scale.py \
        --clusters 1000,5000,10000 --endpoints 10

For each cluster count and protocol it writes the resources for the example
control plane (one file of clusters, one of assignments; endpoints are
127.0.0.x:port addresses nobody listens on, so no traffic flows), starts
the control plane, then starts each proxy with an ADS bootstrap and polls
`/clusters` until every cluster shows all of its endpoints. Reported:
seconds from process start until then, and VmHWM (peak RSS) of the proxy
process at that point. The growth per 1,000 clusters is the slope of peak
RSS over the cluster counts (least squares). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402
import test_xds as tx  # noqa: E402


def write_resources(cp: tx.ControlPlane, n: int, e: int) -> None:
    clusters = [tx.eds_cluster(f"c{i:05d}") for i in range(n)]
    cp.write("clusters", clusters)
    las = []
    for i in range(n):
        ports = [10000 + (i * e + j) % 50000 for j in range(e)]
        la = tx.assignment(f"c{i:05d}", ports)
        for k, ep in enumerate(la["endpoints"][0]["lb_endpoints"]):
            ep["endpoint"]["address"]["socket_address"]["address"] = f"127.0.{(i >> 8) & 255}.{(k % 250) + 1}"
        las.append(la)
    cp.write("endpoints", las)


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def applied(admin: str, n: int, e: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/clusters", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return False
    names = text.count("::observability_name::")
    endpoints = text.count("::health_flags::")
    return names >= n and endpoints >= n * e


def run_one(kind: str, cp: tx.ControlPlane, api_type: str, n: int, e: int, timeout: float):
    boot = tx.xds_bootstrap(kind, cp.port, api_type)
    p = harness.Proxy(kind, boot, wait_ready=False)
    t0 = time.monotonic()
    try:
        while not p.addr_path.exists() or not p.addr_path.read_text().strip():
            time.sleep(0.01)
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("no admin address")
        admin = p.addr_path.read_text().strip()
        while not applied(admin, n, e):
            if p.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited: {p.stderr_text()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{kind}: not applied in {timeout}s")
            time.sleep(0.2)
        return time.monotonic() - t0, vm_hwm_kib(p.proc.pid)
    finally:
        p.stop()


def slope(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", default="1000,5000,10000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--kinds", default="mesh,envoy")
    ap.add_argument("--protocols", default="GRPC,DELTA_GRPC")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    counts = [int(c) for c in a.clusters.split(",")]
    kinds = a.kinds.split(",")
    rows = []
    rss: dict = {}
    for n in counts:
        cp = tx.ControlPlane(kinds).start()
        try:
            write_resources(cp, n, a.endpoints)
            time.sleep(1)  # let the control plane load the files
            for proto in a.protocols.split(","):
                for kind in kinds:
                    secs, kib = run_one(kind, cp, proto, n, a.endpoints, a.timeout)
                    rows.append((kind, proto, n, n * a.endpoints, secs, kib))
                    rss.setdefault((kind, proto), []).append((n, kib))
                    print(f"{kind} {proto} {n} clusters: {secs:.2f}s, peak RSS {kib / 1024:.1f} MiB",
                          file=sys.stderr)
        finally:
            cp.kill()
    print("| proxy | protocol | clusters | endpoints | time to apply (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for kind, proto, n, eps, secs, kib in rows:
        print(f"| {kind} | {proto} | {n} | {eps} | {secs:.2f} | {kib / 1024:.1f} |")
    print()
    print("| proxy | protocol | RSS growth per 1,000 clusters (MiB) |")
    print("|---|---|---|")
    for (kind, proto), pts in rss.items():
        if len(pts) > 1:
            s = slope([p[0] for p in pts], [p[1] for p in pts]) * 1000 / 1024
            print(f"| {kind} | {proto} | {s:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
