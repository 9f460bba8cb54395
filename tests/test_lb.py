"""Load balancing through the real proxy, for what only mesh has or where
Envoy needs more than the same YAML: zone-aware routing (Envoy needs a local
cluster), the peak EWMA policy (mesh's own), tcp_proxy source-IP hashing,
typed `load_balancing_policy` extensions, and config errors for bad LB
input. Comparisons with Envoy on the same file are in
test_lb_differential.py."""

from __future__ import annotations

import collections
import socket
import subprocess
import time

import pytest
import yaml

import harness
from test_lb_differential import ROUTES, cluster, endpoint, sequence

MESH = pytest.mark.parametrize("kind", harness.kind_params(("mesh",)))


class SlowUpstream(harness.HttpUpstream):
    """An upstream that takes `delay` seconds for every request."""

    def __init__(self, name: str, delay: float):
        super().__init__(name)
        self.delay = delay

    def record(self, handler):
        time.sleep(self.delay)
        super().record(handler)


@pytest.fixture(scope="module")
def ups():
    made = [harness.HttpUpstream(f"u{i}").start() for i in range(4)]
    yield made
    for u in made:
        u.stop()


def with_node(cfg: str, zone: str | None) -> str:
    doc = yaml.safe_load(cfg)
    if zone is not None:
        doc["node"] = {"id": "n", "cluster": "test", "locality": {"region": "r", "zone": zone}}
    return yaml.safe_dump(doc, sort_keys=False)


def zoned_cluster(ups, health=None) -> dict:
    health = health or {}
    c = cluster([[]])
    c["load_assignment"]["endpoints"] = [
        {"locality": {"region": "r", "zone": "a"},
         "lb_endpoints": [endpoint(ups[0].port, health=health.get(0)),
                          endpoint(ups[1].port, health=health.get(1))]},
        {"locality": {"region": "r", "zone": "b"},
         "lb_endpoints": [endpoint(ups[2].port), endpoint(ups[3].port)]},
    ]
    c["common_lb_config"] = {"zone_aware_lb_config": {"min_cluster_size": 1}}
    return c


@MESH
def test_zone_aware_prefers_the_node_zone(start_proxy, ups, kind):
    cfg = with_node(harness.simple_http_bootstrap(ROUTES, [zoned_cluster(ups)]), "a")
    p = start_proxy(kind, cfg)
    assert collections.Counter(sequence(p, 40)) == {"u0": 20, "u1": 20}


@MESH
def test_zone_flag_overrides_the_node_zone(start_proxy, ups, kind):
    cfg = with_node(harness.simple_http_bootstrap(ROUTES, [zoned_cluster(ups)]), "a")
    p = start_proxy(kind, cfg, extra_args=("--zone", "b"))
    assert set(sequence(p, 20)) == {"u2", "u3"}


@MESH
def test_zone_aware_spills_when_the_local_zone_loses_endpoints(start_proxy, ups, kind):
    # Zone a: 1 of 2 healthy. It holds 1/3 of the healthy endpoints but
    # (we assume) half the proxies: 2/3 of requests stay, 1/3 go to zone b.
    cfg = with_node(harness.simple_http_bootstrap(
        ROUTES, [zoned_cluster(ups, health={1: "UNHEALTHY"})]), "a")
    p = start_proxy(kind, cfg)
    n = 600
    c = collections.Counter(sequence(p, n))
    assert "u1" not in c
    assert abs(c["u0"] / n - 2 / 3) < 0.07, c


@MESH
def test_no_zone_means_no_zone_preference(start_proxy, ups, kind):
    cfg = harness.simple_http_bootstrap(ROUTES, [zoned_cluster(ups)])
    p = start_proxy(kind, cfg)
    assert set(sequence(p, 40)) == {"u0", "u1", "u2", "u3"}


def typed_policy(name: str, ty: str, **fields) -> dict:
    return {"policies": [{"typed_extension_config": {
        "name": name, "typed_config": {"@type": f"type.googleapis.com/{ty}", **fields}}}]}


PEAK_EWMA = ("mesh.load_balancing_policies.peak_ewma",
             "mesh.load_balancing_policies.peak_ewma.PeakEwma")


@MESH
def test_peak_ewma_avoids_the_slow_endpoint(start_proxy, ups, kind):
    slow = SlowUpstream("slow", 0.05).start()
    try:
        eps = [endpoint(ups[0].port), endpoint(ups[1].port), endpoint(slow.port)]
        ewma = cluster([eps], load_balancing_policy=typed_policy(*PEAK_EWMA,
                                                                  decay_time="10s"))
        p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [ewma]))
        n = 200
        c = collections.Counter(sequence(p, n))
        assert c["slow"] / n < 0.10, c
        # The same traffic under round robin gives the slow one its third.
        rr = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [cluster([eps])]))
        c = collections.Counter(sequence(rr, 60))
        assert c["slow"] == 20, c
    finally:
        slow.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_typed_least_request_policy(start_proxy, ups, kind):
    c = cluster([[endpoint(ups[0].port, 3), endpoint(ups[1].port, 1)]],
                load_balancing_policy=typed_policy(
                    "envoy.load_balancing_policies.least_request",
                    "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
                    choice_count=3))
    p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [c]))
    n = 400
    c = collections.Counter(sequence(p, n))
    assert abs(c["u0"] / n - 0.75) < 0.04, c


def _tcp_hash_cfg(ups) -> str:
    listener = harness.tcp_listener("tcp", "c")
    listener["filter_chains"][0]["filters"][0]["typed_config"]["hash_policy"] = [
        {"source_ip": {}}]
    return harness.bootstrap([listener], [cluster([[endpoint(u.port) for u in ups]],
                                                  lb_policy="RING_HASH")])


def _via_tcp(port: int, source_ip: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(source_ip, 0)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = harness.read_http_response(s, read_until_close=True)
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(b"x-upstream:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(raw[:300])


def _tcp_choices(start_proxy, ups, kind) -> dict:
    p = start_proxy(kind, _tcp_hash_cfg(ups))
    port = p.port("tcp")
    choice = {}
    for i in range(2, 22):
        ip = f"127.0.0.{i}"
        got = {_via_tcp(port, ip) for _ in range(3)}
        assert len(got) == 1, (ip, got)
        choice[ip] = got.pop()
    assert len(set(choice.values())) >= 3, choice
    return choice


@pytest.mark.parametrize("kind", harness.kind_params())
def test_tcp_proxy_hashes_the_source_ip(start_proxy, ups, kind):
    _tcp_choices(start_proxy, ups, kind)


def test_tcp_source_ip_hash_picks_the_same_endpoint_as_envoy(start_proxy, ups):
    """Same ring, same hash of the IP text: the same endpoint per client."""
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    assert _tcp_choices(start_proxy, ups, "mesh") == _tcp_choices(start_proxy, ups, "envoy")


BAD = [
    ({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 65536}},
     "static_resources.clusters[0].maglev_lb_config.table_size: must be a prime number, found 65536"),
    ({"lb_policy": "RING_HASH", "ring_hash_lb_config": {"maximum_ring_size": 8388609}},
     "static_resources.clusters[0].ring_hash_lb_config.maximum_ring_size: must be at most 8388608, found 8388609"),
    ({"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {"choice_count": 1}},
     "static_resources.clusters[0].least_request_lb_config.choice_count: must be at least 2"),
    ({"common_lb_config": {"healthy_panic_threshold": {"value": 101}}},
     "static_resources.clusters[0].common_lb_config.healthy_panic_threshold.value: must be from 0 to 100"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_lb_settings_are_config_errors_with_the_field_path(ups, extra, message, tmp_path):
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    path = tmp_path / "bad.yaml"
    path.write_text(harness.simple_http_bootstrap(ROUTES, [cluster([[endpoint(ups[0].port)]],
                                                                   **extra)]))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out
    assert message in out.stdout + out.stderr, out


@pytest.mark.parametrize("extra", [e for e, _ in BAD[:3]])
def test_envoy_refuses_the_same_settings(ups, extra, tmp_path):
    """The limits mesh enforces are Envoy's: Envoy refuses these too."""
    path = tmp_path / "bad.yaml"
    path.write_text(harness.simple_http_bootstrap(ROUTES, [cluster([[endpoint(ups[0].port)]],
                                                                   **extra)]))
    out = subprocess.run([str(harness.envoy_bin()), "--mode", "validate", "-c", str(path),
                          "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out


def test_duplicate_endpoints_and_zero_weights_are_refused(ups, tmp_path):
    if harness.mesh_missing_reason():
        pytest.skip(harness.mesh_missing_reason())
    path = tmp_path / "bad.yaml"
    c = cluster([[endpoint(ups[0].port), endpoint(ups[0].port), endpoint(ups[1].port, 0)]])
    path.write_text(harness.simple_http_bootstrap(ROUTES, [c]))
    out = subprocess.run([str(harness.mesh_bin()), "validate", "-c", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    la = "static_resources.clusters[0].load_assignment.endpoints[0]"
    text = out.stdout + out.stderr
    assert f"{la}.lb_endpoints[1]: duplicate endpoint 127.0.0.1:{ups[0].port} (also {la}.lb_endpoints[0])" in text
    assert f"{la}.lb_endpoints[2].load_balancing_weight: must be at least 1" in text


@pytest.mark.parametrize("kind", harness.kind_params())
def test_cluster_without_endpoints_answers_503_uh(start_proxy, kind):
    c = cluster([[]])
    c["load_assignment"]["endpoints"] = []
    p = start_proxy(kind, harness.simple_http_bootstrap(ROUTES, [c]))
    r = harness.request(p.port(), "GET", "/")
    assert r.status == 503 and r.body == b"no healthy upstream"
