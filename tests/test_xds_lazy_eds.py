"""On-demand EDS (`mesh run --lazy-eds`): mesh driven by the example control
plane (mesh-xds snapshot server) with many EDS clusters over ADS,
state-of-the-world and delta.

- the proxy is ready without any endpoint subscription; the server sees
  EDS subscribed only for the clusters requests used, one name at a time;
- the first requests to a cluster wait for its endpoints and succeed
  (several at once share one subscription);
- endpoint updates of a used cluster still apply;
- a cluster whose endpoints never arrive answers 503 after its
  `initial_fetch_timeout`, then at once, never hangs;
- removing a used cluster unsubscribes it; a restarted control plane gets
  the used names again;
- `/config_dump` and the `mesh_lazy_eds_clusters_*` gauges show what is
  subscribed and loaded.

mesh only: Envoy has no such switch (its on-demand discovery is a per-route
filter), and the bootstrap stays one Envoy runs unchanged.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import yaml

import harness
from test_xds import (API_TYPES, ControlPlane, assignment, control_plane,  # noqa: F401
                      eds_cluster, listener, routes, settle, to, wait_until, xds_bootstrap)

pytestmark = pytest.mark.skipif(not harness.mesh_available(), reason="mesh binary not built")

N = 200  # clusters the control plane knows


def name(i: int) -> str:
    return f"c{i:03d}"


def lazy_cluster(n: str, fetch_timeout: str | None = None) -> dict:
    c = eds_cluster(n)
    if fetch_timeout:
        c["eds_cluster_config"]["eds_config"] = dict(c["eds_cluster_config"]["eds_config"],
                                                     initial_fetch_timeout=fetch_timeout)
    return c


def loaded(cp: ControlPlane):
    """Waits until the control plane has loaded every file written (its
    snapshot version stays the same for a while): parsing hundreds of
    resources takes longer than `settle`."""
    settle()
    last, since = None, time.monotonic()
    deadline = since + 30
    while time.monotonic() < deadline:
        v = cp.status("mesh").get("version")
        if v != last:
            last, since = v, time.monotonic()
        elif v is not None and time.monotonic() - since > 0.5:
            return
        time.sleep(0.05)
    raise AssertionError("the control plane did not settle")


def eds_names(cp: ControlPlane) -> set | None:
    sub = cp.status("mesh").get("subscribed", {}).get("EDS")
    return None if sub is None else set(sub["names"] or [])


def dump(proxy) -> dict:
    return json.loads(proxy.admin_text("/config_dump"))


def loaded_endpoints(proxy) -> set:
    eds = [c for c in dump(proxy)["configs"] if c["@type"].endswith("EndpointsConfigDump")][0]
    return {e["name"] for e in eds["dynamic_endpoint_configs"]}


def gauge(proxy, stat: str) -> float | None:
    return harness.prometheus_value(proxy.admin_text("/stats/prometheus"), stat)


@pytest.mark.parametrize("api_type", API_TYPES)
def test_lazy_eds_subscribes_on_first_use(api_type, start_proxy, control_plane, upstream_a,
                                          upstream_b, refused):
    cp = control_plane(["mesh"])
    clusters = [lazy_cluster(name(i)) for i in range(N)]
    clusters.append(lazy_cluster("never", fetch_timeout="1s"))
    cp.write("clusters", clusters)
    ports = {name(7): upstream_a.port, name(42): upstream_b.port}
    cp.write("endpoints", [assignment(name(i), [ports.get(name(i), refused)]) for i in range(N)])
    cp.write("routes", [routes(to("/c007", name(7)), to("/c042", name(42)),
                               to("/never", "never"), default=name(100))])
    cp.write("listeners", [listener()])
    loaded(cp)
    proxy = start_proxy("mesh", xds_bootstrap("mesh", cp.port, api_type),
                        extra_args=("--lazy-eds",))
    port = proxy.port("ingress")

    # Ready with every cluster and no endpoints subscribed.
    cp.wait_status("mesh", lambda s: {"CDS", "LDS", "RDS"} <= set(s.get("acked", {})))
    d = dump(proxy)["lazy_eds"]
    assert d == {"known_clusters": N + 1, "subscribed_clusters": []}
    assert gauge(proxy, "mesh_lazy_eds_clusters_known") == N + 1
    assert gauge(proxy, "mesh_lazy_eds_clusters_subscribed") == 0
    time.sleep(0.3)
    assert not eds_names(cp), cp.status("mesh")
    assert loaded_endpoints(proxy) == set()

    # Concurrent first requests to c007: all succeed, one subscription.
    results = []

    def first():
        results.append(harness.request(port, "GET", "/c007/x"))

    threads = [threading.Thread(target=first) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert [(r.status, r.upstream) for r in results] == [(200, "a")] * 5
    cp.wait_status("mesh", lambda s: eds_names(cp) == {name(7)})
    assert loaded_endpoints(proxy) == {name(7)}

    # A second cluster grows the subscription by one name.
    r = harness.request(port, "GET", "/c042/x")
    assert (r.status, r.upstream) == (200, "b")
    cp.wait_status("mesh", lambda s: eds_names(cp) == {name(7), name(42)})
    assert loaded_endpoints(proxy) == {name(7), name(42)}
    d = dump(proxy)["lazy_eds"]
    assert d["known_clusters"] == N + 1
    assert d["subscribed_clusters"] == [
        {"cluster": name(7), "endpoints_loaded": True},
        {"cluster": name(42), "endpoints_loaded": True},
    ]
    assert gauge(proxy, "mesh_lazy_eds_clusters_subscribed") == 2

    # An endpoint update of a used cluster applies: c007 moves to b.
    ports[name(7)] = upstream_b.port
    t = cp.write("endpoints", [assignment(name(i), [ports.get(name(i), refused)])
                               for i in range(N)])
    wait_until(lambda: harness.request(port, "GET", "/c007/y").upstream == "b", t, "EDS update",
               2.0)

    # Endpoints that never arrive: 503 after the cluster's 1 s
    # initial_fetch_timeout, then 503 at once.
    started = time.monotonic()
    r = harness.request(port, "GET", "/never", timeout=20)
    took = time.monotonic() - started
    assert r.status == 503, (r.status, r.body[:200])
    assert 0.8 <= took < 5, took
    started = time.monotonic()
    assert harness.request(port, "GET", "/never").status == 503
    assert time.monotonic() - started < 0.5
    cp.wait_status("mesh", lambda s: eds_names(cp) == {name(7), name(42), "never"})
    never = [c for c in dump(proxy)["lazy_eds"]["subscribed_clusters"] if c["cluster"] == "never"]
    assert never == [{"cluster": "never", "endpoints_loaded": False}]

    # Removing a used cluster unsubscribes it and drops its endpoints.
    cp.write("routes", [routes(to("/c007", name(7)), default=name(7))])
    cp.write("clusters", [c for c in clusters if c["name"] != name(42)])
    cp.wait_status("mesh", lambda s: eds_names(cp) == {name(7), "never"})
    wait_until(lambda: loaded_endpoints(proxy) == {name(7)}, time.monotonic(), "endpoints dropped",
               2.0)
    assert gauge(proxy, "mesh_lazy_eds_clusters_known") == N

    # A restarted control plane is asked for the used names again.
    cp.kill()
    cp.start()
    cp.wait_status("mesh", lambda s: s.get("streams") == 1 and eds_names(cp) == {name(7), "never"},
                   timeout=15)
    assert harness.request(port, "GET", "/c007/z").upstream == "b"


def test_without_the_flag_every_cluster_is_subscribed(start_proxy, control_plane, upstream_a,
                                                      refused):
    """The default stays Envoy's: every EDS cluster subscribes at once."""
    cp = control_plane(["mesh"])
    cp.write("clusters", [lazy_cluster(name(i)) for i in range(20)])
    cp.write("endpoints", [assignment(name(i), [upstream_a.port if i == 3 else refused])
                           for i in range(20)])
    cp.write("routes", [routes(default=name(3))])
    cp.write("listeners", [listener()])
    loaded(cp)
    proxy = start_proxy("mesh", xds_bootstrap("mesh", cp.port, "GRPC"))
    assert harness.request(proxy.port("ingress"), "GET", "/").upstream == "a"
    cp.wait_status("mesh", lambda s: eds_names(cp) == {name(i) for i in range(20)})
    assert "lazy_eds" not in dump(proxy)
    assert gauge(proxy, "mesh_lazy_eds_clusters_known") is None


@pytest.mark.parametrize("api_type", API_TYPES)
def test_lazy_eds_tcp_proxy_first_connection_waits(api_type, start_proxy, control_plane,
                                                   tcp_echo, refused):
    """A tcp_proxy connection to a lazy cluster waits for its endpoints,
    then carries the bytes."""
    cp = control_plane(["mesh"])
    cp.write("clusters", [lazy_cluster(name(i)) for i in range(20)])
    cp.write("endpoints", [assignment(name(i), [tcp_echo.port if i == 5 else refused])
                           for i in range(20)])
    tcp = harness.tcp_listener("tcp", name(5))
    tcp["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
    cp.write("listeners", [tcp])
    loaded(cp)
    proxy = start_proxy("mesh", xds_bootstrap("mesh", cp.port, api_type),
                        extra_args=("--lazy-eds",))
    port = proxy.port("tcp")
    time.sleep(0.3)
    assert not eds_names(cp)
    data = harness.payload(64 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    assert got == data
    cp.wait_status("mesh", lambda s: eds_names(cp) == {name(5)})
