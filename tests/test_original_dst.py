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


# What the workload (or a peer, or root, uncaptured) sees: an HTTP GET
# (status, body) for a URL, or a TCP exchange (reply to "ping") for a
# (host, port).
CASES = {
    "outbound HTTP handed to 0.0.0.0_8080":
        (APP, "http://10.96.0.10:8080/hello", (200, "web 10.96.0.10:8080 /hello 127.0.0.1")),
    "outbound HTTP passthrough (wildcard port, ORIGINAL_DST)":
        (APP, "http://10.96.0.20:8080/x", (200, "other 10.96.0.20:8080 /x 10.96.0.20")),
    "outbound TCP handed to the exact-address listener":
        (APP, ("10.96.0.30", 7000), "'db-ping'"),
    "outbound TCP passthrough": (APP, ("10.96.0.20", 9999), "'direct-ping'"),
    "straight to 15001: BlackHoleCluster": (None, ("127.0.0.1", 15001), "closed"),
    "inbound HTTP by destination_port":
        (PEER, "http://10.0.0.2:8080/in", (200, "app 10.0.0.2:8080 /in 127.0.0.6")),
    "inbound TCP passthrough": (PEER, ("10.0.0.2", 9090), "'inbound-127.0.0.6 ping'"),
    "uncaptured HTTP": (None, "http://10.0.0.2:8080/direct", (200, "app 10.0.0.2:8080 /direct 10.0.0.2")),
    "uncaptured TCP": (None, ("10.96.0.20", 9999), "'direct-ping'"),
}

EXPECTED = {name: want for name, (_, _, want) in CASES.items()}

SERVERS = (
    "http:web:127.0.0.1:18080",
    "http:other:10.96.0.20:8080",
    "tcp:db-:127.0.0.1:17000",
    "tcp:direct-:10.96.0.20:9999",
    "http:app:10.0.0.2:8080",
    "tcppeer:inbound-:10.0.0.2:9090",
)


def outcomes(ns: Netns, names) -> dict:
    out = {}
    for name in names:
        uid, target, _ = CASES[name]
        if isinstance(target, str):
            out[name] = ns.curl(target, uid=uid)
        else:
            out[name] = ns.tcp(*target, "ping", uid=uid)
    return out


def namespace() -> Netns:
    try:
        ns = Netns(ADDRESSES)
    except Exception as e:  # noqa: BLE001 - any failure here must fail loudly
        pytest.fail(f"network namespaces are not usable here: {e}")
    try:
        capture_rules(ns)
        ns.servers(*SERVERS)
    except BaseException:
        ns.close()
        raise
    return ns


def start(ns: Netns, kind: str, config, *extra: str):
    p = ns.popen(proxy_argv(kind, config) + list(extra), f"{kind}.log")
    ns.wait_port("127.0.0.1", 15001, proc=p, log=f"{kind}.log")
    ns.wait_port("127.0.0.1", 15006, proc=p, log=f"{kind}.log")
    return p


def test_istio_capture(kind):
    ns = namespace()
    try:
        start(ns, kind, FIXTURE)
        assert outcomes(ns, CASES) == EXPECTED
    finally:
        ns.close()


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
    del outbound["filter_chains"]  # only the default chain is left
    ns = namespace()
    try:
        path = ns.dir / "no-blackhole.yaml"
        path.write_text(yaml.safe_dump(config))
        p = start(ns, kind, path, "--log-level", "debug")
        for addr in ["127.0.0.1", "10.96.0.10"]:
            assert ns.tcp(addr, 15001, "ping") == "closed"
        assert ns.tcp("10.96.0.20", 9999, "ping", uid=APP) == "'direct-ping'"
        assert p.poll() is None
        assert "refusing to loop" in (ns.dir / "mesh.log").read_text()
    finally:
        ns.close()


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_lds_and_cds_deliver_the_capture_resources(kind, api_type):
    """The same listeners, routes and clusters from the example control
    plane (LDS, RDS and CDS over ADS, state-of-the-world and delta, the
    port listener's routes over RDS as istiod sends them) give the same
    outcomes as the static file."""
    from test_xds import CLUSTER, LISTENER, ROUTE, control_plane_bin, xds_bootstrap

    if not control_plane_bin().exists() and not os.environ.get("MESH_REQUIRE"):
        pytest.skip(f"{control_plane_bin()} not built")
    static = yaml.safe_load(FIXTURE.read_text())["static_resources"]
    ns = namespace()
    try:
        resources = ns.dir / "resources"
        resources.mkdir()
        (resources / "clusters.yaml").write_text(
            yaml.safe_dump([dict(c, **{"@type": CLUSTER}) for c in static["clusters"]]))
        # As istiod sends it: the outbound port listener's routes over RDS.
        hcm = static["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"]
        assert static["listeners"][1]["name"] == "0.0.0.0_8080"
        route = hcm.pop("route_config")
        hcm["rds"] = {"route_config_name": route["name"],
                      "config_source": {"ads": {}, "resource_api_version": "V3"}}
        (resources / "routes.yaml").write_text(yaml.safe_dump([dict(route, **{"@type": ROUTE})]))
        (resources / "listeners.yaml").write_text(
            yaml.safe_dump([dict(l, **{"@type": LISTENER}) for l in static["listeners"]]))
        cp = ns.popen([control_plane_bin(), "--dir", resources, "--listen", "127.0.0.1:18000",
                       "--address-file", ns.dir / "cp-address", "--node", kind],
                      "control-plane.log")
        ns.wait_port("127.0.0.1", 18000, proc=cp, log="control-plane.log")
        config = ns.dir / "bootstrap.yaml"
        config.write_text(xds_bootstrap(kind, 18000, api_type))
        start(ns, kind, config)
        assert outcomes(ns, CASES) == EXPECTED
    finally:
        ns.close()


def test_original_destination_from_a_request_header(kind, start_proxy, upstream_a):
    """`original_dst_lb_config.use_http_header`: the request names its
    upstream in `x-envoy-original-dst-host`. No header and no restored
    destination (this listener has no original_dst filter), or a value
    that is not `ip:port`, give 503 with no host, as in Envoy."""
    cluster = {"name": "dst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
               "connect_timeout": "1s", "original_dst_lb_config": {"use_http_header": True}}
    routes = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "dst"}}]}]}
    proxy = start_proxy(kind, harness.simple_http_bootstrap(routes, [cluster]))
    port = proxy.port("ingress")
    dst = {"x-envoy-original-dst-host": f"127.0.0.1:{upstream_a.port}"}
    r = harness.request(port, "GET", "/h", headers=dst)
    assert (r.status, r.upstream) == (200, "a")
    assert harness.request(port, "GET", "/h").status == 503
    bad = {"x-envoy-original-dst-host": "upstream-a"}
    assert harness.request(port, "GET", "/h", headers=bad).status == 503


def test_ipv6_capture(kind):
    """IPv6 (`IP6T_SO_ORIGINAL_DST`, ip6tables REDIRECT): a connection to
    [fd00::10]:8080 is handed to the `[::]:8080` listener, one to
    [fd00::20]:9999 passes through to its original destination."""
    http6 = harness.hcm_listener("[::]_8080", {"virtual_hosts": [
        {"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "web"}}]}]})
    http6["address"] = harness.socket_address(8080, "::")
    http6["bind_to_port"] = False
    outbound = {
        "name": "virtualOutbound6",
        "address": harness.socket_address(15001, "::"),
        "use_original_dst": True,
        "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
        "filter_chains": harness.tcp_listener("x", "PassthroughCluster")["filter_chains"],
    }
    passthrough = {"name": "PassthroughCluster", "type": "ORIGINAL_DST",
                   "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"}
    config = yaml.safe_load(harness.bootstrap(
        [outbound, http6], [passthrough, harness.static_cluster("web", [18080])]))
    config["admin"] = {"address": harness.socket_address(15000)}
    try:
        ns = Netns(["fd00::10", "fd00::20"])
    except Exception as e:  # noqa: BLE001 - any failure here must fail loudly
        pytest.fail(f"network namespaces are not usable here: {e}")
    try:
        ns.ip6tables("-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "fd00::/64", "-m", "owner",
                     "--uid-owner", str(APP), "-j", "REDIRECT", "--to-ports", "15001")
        ns.servers("http:web:127.0.0.1:18080", "tcp:direct6-:fd00::20:9999")
        path = ns.dir / "ipv6.yaml"
        path.write_text(yaml.safe_dump(config))
        p = ns.popen(proxy_argv(kind, path), f"{kind}.log")
        ns.wait_port("::1", 15001, proc=p, log=f"{kind}.log")
        got = {
            "handed off": ns.curl("http://[fd00::10]:8080/v6", uid=APP),
            "passthrough": ns.tcp("fd00::20", 9999, "ping", uid=APP),
        }
        assert got == {
            "handed off": (200, "web [fd00::10]:8080 /v6 127.0.0.1"),
            "passthrough": "'direct6-ping'",
        }
    finally:
        ns.close()
