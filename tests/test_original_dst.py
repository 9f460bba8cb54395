"""Traffic capture as an Istio sidecar does it, under Envoy and mesh: the
same Istio-shaped file (`fixtures/istio_capture.yaml`) in a private network
namespace whose iptables rules REDIRECT the "workload's" connections to the
proxy (outbound to virtualOutbound on 15001, inbound to virtualInbound on
15006), as istio-iptables does.

The rules match the client's user id (the workload runs as uid 1001, a
peer pod as uid 1002), so the proxy's own upstream connections (root) are
never captured again: Istio exempts the proxy's uid instead, to the same
effect.

Checked, each under both proxies with the same outcome:
- a connection to 10.96.0.10:8080 is handed from virtualOutbound to the
  `0.0.0.0_8080` HTTP listener (`bind_to_port: false`) and routed;
- 10.96.0.20:8080 reaches the same listener (wildcard port) and its
  catch-all route to PassthroughCluster connects to 10.96.0.20:8080 itself
  (HTTP through an ORIGINAL_DST cluster);
- 10.96.0.30:7000 is handed to the exact-address TCP listener;
- an unmatched port passes through to the real original destination;
- a connection made straight to 15001 goes to BlackHoleCluster (closed);
- inbound: 10.0.0.2:8080 takes virtualInbound's `destination_port: 8080`
  chain to the workload through `inbound|8080||` (ORIGINAL_DST), another
  port the catch-all TCP chain to InboundPassthroughClusterIpv4; both
  connect to the workload from 127.0.0.6 (`upstream_bind_config`, which
  istio-iptables exempts from capture).
"""

from __future__ import annotations

import os
import sys

import pytest
import yaml

import harness
from netns import Netns

FIXTURE = harness.TESTS / "fixtures" / "istio_capture.yaml"
APP = 1001  # the workload: its outbound connections are captured
PEER = 1002  # another pod: its connections to the workload are captured

ADDRESSES = ["10.96.0.10", "10.96.0.20", "10.96.0.30", "10.0.0.2"]


def capture_rules(ns: Netns) -> None:
    ns.iptables("-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.96.0.0/16",
                "-m", "owner", "--uid-owner", str(APP), "-j", "REDIRECT", "--to-ports", "15001")
    ns.iptables("-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.0.0.2/32",
                "-m", "owner", "--uid-owner", str(PEER), "-j", "REDIRECT", "--to-ports", "15006")


def proxy_argv(kind: str, config) -> list:
    if kind == "mesh":
        return [harness.mesh_bin(), "run", "-c", config, "--concurrency", "2"]
    return [harness.envoy_bin(), "-c", config, "--concurrency", "1", "--disable-hot-restart",
            "-l", "warn"]


@pytest.fixture
def captured(kind):
    """A namespace with the capture rules, the upstreams and `kind`
    running the fixture."""
    try:
        ns = Netns(ADDRESSES)
    except Exception as e:  # noqa: BLE001 - any failure here must fail loudly
        pytest.fail(f"network namespaces are not usable here: {e}")
    try:
        capture_rules(ns)
        ns.servers(
            "http:web:127.0.0.1:18080",
            "http:other:10.96.0.20:8080",
            "tcp:db-:127.0.0.1:17000",
            "tcp:direct-:10.96.0.20:9999",
            "http:app:10.0.0.2:8080",
            "tcppeer:inbound-:10.0.0.2:9090",
        )
        p = ns.popen(proxy_argv(kind, FIXTURE), f"{kind}.log")
        ns.wait_port("127.0.0.1", 15001, proc=p, log=f"{kind}.log")
        ns.wait_port("127.0.0.1", 15006, proc=p, log=f"{kind}.log")
        yield ns
    finally:
        ns.close()


def test_outbound_http_is_handed_to_the_port_listener(captured):
    status, body = captured.curl("http://10.96.0.10:8080/hello", uid=APP)
    assert (status, body) == (200, "web 10.96.0.10:8080 /hello 127.0.0.1")


def test_outbound_http_passthrough_reaches_the_original_destination(captured):
    status, body = captured.curl("http://10.96.0.20:8080/x", uid=APP)
    assert (status, body) == (200, "other 10.96.0.20:8080 /x 10.96.0.20")


def test_outbound_tcp_exact_address_listener(captured):
    assert captured.tcp("10.96.0.30", 7000, "ping", uid=APP) == "'db-ping'"


def test_outbound_tcp_passthrough(captured):
    assert captured.tcp("10.96.0.20", 9999, "ping", uid=APP) == "'direct-ping'"


def test_direct_connection_to_the_capture_port_is_blackholed(captured):
    # Not redirected (root): the original destination is 15001 itself.
    assert captured.tcp("127.0.0.1", 15001, "ping") == "closed"


def test_inbound_http_by_destination_port(captured):
    status, body = captured.curl("http://10.0.0.2:8080/in", uid=PEER)
    assert (status, body) == (200, "app 10.0.0.2:8080 /in 127.0.0.6")


def test_inbound_tcp_passthrough(captured):
    assert captured.tcp("10.0.0.2", 9090, "ping", uid=PEER) == "'inbound-127.0.0.6 ping'"


def test_uncaptured_traffic_is_untouched(captured):
    # The same addresses as root: no rule applies, the servers answer.
    assert captured.curl("http://10.0.0.2:8080/direct") == (200, "app 10.0.0.2:8080 /direct 10.0.0.2")
    assert captured.tcp("10.96.0.20", 9999, "x") == "'direct-x'"


def test_netns_helpers_fail_loudly():
    """The namespace tooling is required: a broken `ip` is an error."""
    with pytest.raises(Exception):
        Netns(["not-an-address"])
    assert sys.platform.startswith("linux")


def test_mesh_refuses_to_loop_back_into_its_capture_port(kind):
    """Without Istio's blackhole chain, a connection made straight to 15001
    would make the passthrough connect to 15001 again, and again (Envoy has
    no guard and relies on that chain). mesh refuses the destination and
    closes the connection; captured traffic keeps flowing."""
    if kind != "mesh":
        pytest.skip("mesh's own guard; Envoy loops without the blackhole chain")
    config = yaml.safe_load(FIXTURE.read_text())
    outbound = config["static_resources"]["listeners"][0]
    assert outbound["name"] == "virtualOutbound"
    outbound["filter_chains"] = outbound["filter_chains"][1:]
    try:
        ns = Netns(ADDRESSES)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"network namespaces are not usable here: {e}")
    try:
        capture_rules(ns)
        ns.servers("tcp:direct-:10.96.0.20:9999")
        path = ns.dir / "no-blackhole.yaml"
        path.write_text(yaml.safe_dump(config))
        p = ns.popen(proxy_argv(kind, path) + ["--log-level", "debug"], "mesh.log")
        ns.wait_port("127.0.0.1", 15001, proc=p, log="mesh.log")
        for addr in ["127.0.0.1", "10.96.0.10"]:
            assert ns.tcp(addr, 15001, "ping") == "closed"
        assert ns.tcp("10.96.0.20", 9999, "ping", uid=APP) == "'direct-ping'"
        assert p.poll() is None
        assert "refusing to loop" in (ns.dir / "mesh.log").read_text()
    finally:
        ns.close()


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_lds_and_cds_deliver_the_capture_resources(kind, api_type):
    """The same listeners and clusters from the example control plane (LDS
    and CDS over ADS), in the namespace: the hand-off, a passthrough and
    the inbound chain work as with the static file."""
    from test_xds import CLUSTER, LISTENER, control_plane_bin, xds_bootstrap

    if not control_plane_bin().exists() and not os.environ.get("MESH_REQUIRE"):
        pytest.skip(f"{control_plane_bin()} not built")
    static = yaml.safe_load(FIXTURE.read_text())["static_resources"]
    try:
        ns = Netns(ADDRESSES)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"network namespaces are not usable here: {e}")
    try:
        capture_rules(ns)
        ns.servers("http:web:127.0.0.1:18080", "tcp:direct-:10.96.0.20:9999",
                   "http:app:10.0.0.2:8080")
        resources = ns.dir / "resources"
        resources.mkdir()
        (resources / "listeners.yaml").write_text(
            yaml.safe_dump([dict(l, **{"@type": LISTENER}) for l in static["listeners"]]))
        (resources / "clusters.yaml").write_text(
            yaml.safe_dump([dict(c, **{"@type": CLUSTER}) for c in static["clusters"]]))
        cp = ns.popen([control_plane_bin(), "--dir", resources, "--listen", "127.0.0.1:18000",
                       "--address-file", ns.dir / "cp-address", "--node", kind],
                      "control-plane.log")
        ns.wait_port("127.0.0.1", 18000, proc=cp, log="control-plane.log")
        config = ns.dir / "bootstrap.yaml"
        config.write_text(xds_bootstrap(kind, 18000, api_type))
        p = ns.popen(proxy_argv(kind, config), f"{kind}.log")
        ns.wait_port("127.0.0.1", 15001, proc=p, log=f"{kind}.log")
        ns.wait_port("127.0.0.1", 15006, proc=p, log=f"{kind}.log")
        assert ns.curl("http://10.96.0.10:8080/x", uid=APP) == (200, "web 10.96.0.10:8080 /x 127.0.0.1")
        assert ns.tcp("10.96.0.20", 9999, "ping", uid=APP) == "'direct-ping'"
        assert ns.curl("http://10.0.0.2:8080/in", uid=PEER) == (200, "app 10.0.0.2:8080 /in 127.0.0.6")
    finally:
        ns.close()
