"""mesh's xDS client driven by an independent ADS server written in Python
on PyPI `envoy-data-plane` (tests/xds_py_server.py), Envoy beside it as the
reference; then bad input from that server: malformed resources, an
unknown type URL, a route to a cluster that does not exist, and a message
over mesh's size bound. The proxy NACKs or reports each one and keeps
serving.
"""

from __future__ import annotations

import time

import pytest
import yaml

import harness

pytest.importorskip("envoy_data_plane")

# Imported so that their types are known when packed into `Any`.
import envoy_data_plane.envoy.extensions.filters.http.router.v3  # noqa: E402,F401
import envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3  # noqa: E402,F401
from envoy_data_plane.envoy.config.cluster.v3 import Cluster  # noqa: E402
from envoy_data_plane.envoy.config.listener.v3 import Listener  # noqa: E402
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryResponse  # noqa: E402
from envoy_data_plane.google.protobuf import Any  # noqa: E402

from xds_py_server import PyAds  # noqa: E402

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def cluster(name: str, port: int) -> Cluster:
    return Cluster.from_dict({
        "name": name, "type": "STATIC", "connectTimeout": "1s",
        "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": [
            {"endpoint": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}}}}]}]}})


def listener(routes: list) -> Listener:
    return Listener.from_dict({
        "name": "ingress",
        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}},
        "filterChains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "statPrefix": "ingress",
                "routeConfig": {"name": "local", "virtualHosts": [
                    {"name": "all", "domains": ["*"], "routes": routes}]},
                "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}]})


def route(prefix: str, cluster_name: str) -> dict:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster_name}}


def bootstrap(node: str, port: int) -> str:
    return yaml.safe_dump({
        "node": {"id": node, "cluster": "test"},
        "admin": {"address": harness.socket_address(0)},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [harness.static_cluster("xds", [port], http2=True)]},
    })


@pytest.fixture
def py_ads():
    s = PyAds().start()
    yield s
    s.stop()


def acked(server: PyAds, type_url: str, version: str):
    return server.wait_request(lambda r: r.type_url == type_url and r.version_info == version
                               and r.response_nonce and r.error_detail is None)


def test_python_ads_server_drives_the_proxy(kind, py_ads, start_proxy, upstream_a, upstream_b):
    py_ads.set(CLUSTER, "1", [cluster("a", upstream_a.port), cluster("b", upstream_b.port)])
    py_ads.set(LISTENER, "1", [listener([route("/b", "b"), route("/", "a")])])
    proxy = start_proxy(kind, bootstrap(kind, py_ads.port))
    port = proxy.port("ingress")
    assert harness.request(port, "GET", "/x").upstream == "a"
    assert harness.request(port, "GET", "/b").upstream == "b"
    acked(py_ads, CLUSTER, "1")
    acked(py_ads, LISTENER, "1")
    first = py_ads.requests_of(CLUSTER)[0]
    assert first.node.id == kind and first.node.cluster == "test"
    if kind == "mesh":
        assert first.node.user_agent_name == "mesh"
    # An update of the listener's inline routes.
    py_ads.set(LISTENER, "2", [listener([route("/", "b")])])
    acked(py_ads, LISTENER, "2")
    deadline = time.monotonic() + 5
    while harness.request(port, "GET", "/x").upstream != "b":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_bad_input_from_the_server_is_nacked_and_the_proxy_keeps_serving(
        py_ads, start_proxy, upstream_a, upstream_b):
    py_ads.set(CLUSTER, "1", [cluster("a", upstream_a.port)])
    py_ads.set(LISTENER, "1", [listener([route("/", "a")])])
    proxy = start_proxy("mesh", bootstrap("mesh", py_ads.port),
                        extra_args=("--xds-max-message-bytes", "200000"))
    port = proxy.port("ingress")
    acked(py_ads, LISTENER, "1")

    def nack(type_url: str, needle: str):
        r = py_ads.wait_request(lambda r: r.type_url == type_url and r.error_detail is not None
                                and needle in r.error_detail.message)
        return r

    # Malformed bytes as a cluster: NACKed with the reason, version 1 kept.
    py_ads.push_raw(DiscoveryResponse(version_info="2", type_url=CLUSTER,
                                      resources=[Any(type_url=CLUSTER, value=b"\xff\xff\xff")]))
    r = nack(CLUSTER, "malformed")
    assert r.version_info == "1"
    assert harness.request(port, "GET", "/").upstream == "a"

    # A resource of another type inside a CDS response.
    py_ads.push_raw(DiscoveryResponse(version_info="3", type_url=CLUSTER,
                                      resources=[Any(type_url=LISTENER, value=b"")]))
    nack(CLUSTER, "in a response of type")

    # A type nobody subscribed to.
    py_ads.push_raw(DiscoveryResponse(version_info="1", type_url="type.googleapis.com/foo.Bar"))
    nack("type.googleapis.com/foo.Bar", "unknown or unsubscribed type")

    # A cluster field mesh does not support: NACKed with its path.
    bad = cluster("c", upstream_b.port)
    bad.ignore_health_on_host_removal = True
    py_ads.set(CLUSTER, "4", [cluster("a", upstream_a.port), bad])
    r = nack(CLUSTER, "ignore_health_on_host_removal")
    assert 'cluster "c"' in r.error_detail.message, r.error_detail.message
    assert harness.request(port, "GET", "/").upstream == "a"

    # A route to a cluster that does not exist: accepted as Envoy does;
    # requests to it get 503 (NC), others are served.
    py_ads.set(LISTENER, "5", [listener([route("/missing", "nowhere"), route("/", "a")])])
    acked(py_ads, LISTENER, "5")
    deadline = time.monotonic() + 5
    while harness.request(port, "GET", "/missing").status != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert harness.request(port, "GET", "/").upstream == "a"

    # A response over --xds-max-message-bytes: the stream fails with a clear
    # error, mesh reconnects and keeps serving the last good configuration.
    streams_before = len([r for r in py_ads.requests_of(LISTENER) if not r.response_nonce])
    huge = [cluster(f"c{i:05d}-" + "x" * 200, 1000 + i) for i in range(2000)]
    py_ads.push_raw(DiscoveryResponse(version_info="6", type_url=CLUSTER,
                                      resources=[Any(type_url=CLUSTER, value=bytes(c)) for c in huge]))
    deadline = time.monotonic() + 10
    while "maximum xDS message size of 200000" not in proxy.stderr_text():
        assert time.monotonic() < deadline, proxy.stderr_text()[-2000:]
        time.sleep(0.05)
    assert proxy.alive()
    assert harness.request(port, "GET", "/").upstream == "a"
    # Resubscribed on a new stream with the versions it has.
    r = py_ads.wait_request(lambda r: r.type_url == LISTENER and not r.response_nonce
                            and r.version_info == "5")
    assert r is not None
    assert len([r for r in py_ads.requests_of(LISTENER) if not r.response_nonce]) > streams_before
