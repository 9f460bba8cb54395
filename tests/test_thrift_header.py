"""Thrift's header transport (Apache Thrift `THeaderTransport` /
`THeaderProtocol`, binary and compact payloads) through Envoy's
thrift_proxy (`transport: HEADER`) and mesh on the same YAML: calls, routing
on an info header, the no-route TApplicationException, oneway. Then mesh
only: transport detection (`AUTO_TRANSPORT`, `codec: auto`), a payload
transform (zlib) refused with an exception, and lax binary (unversioned)
messages detected without configuration."""

from __future__ import annotations

import time

import pytest

import harness
import rpc_peers
from rpc_peers import ThriftClient, ThriftServer


def route_config():
    return {"route_config": {"name": "hdr", "routes": [
        {"match": {"method_name": "", "headers": [
            {"name": "x-route", "string_match": {"exact": "b"}}]},
         "route": {"cluster": "b"}},
        {"match": {"method_name": "unrouted", "invert": True}, "route": {"cluster": "a"}},
    ]}}


@pytest.fixture(scope="module", params=["binary", "compact"])
def protocol(request):
    return request.param


@pytest.fixture(scope="module")
def servers(protocol):
    a = ThriftServer("a", "header", protocol).start()
    b = ThriftServer("b", "header", protocol).start()
    yield {"a": a, "b": b}
    a.stop()
    b.stop()


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy, servers):
    listeners = [
        rpc_peers.thrift_listener("header", {
            "transport": "HEADER", "protocol": "AUTO_PROTOCOL", **route_config()}),
        rpc_peers.thrift_listener("auto", {"transport": "AUTO_TRANSPORT", **route_config()}),
    ]
    clusters = [harness.static_cluster(n, s.port) for n, s in servers.items()]
    return module_start_proxy(request.param, harness.bootstrap(listeners, clusters))


@pytest.mark.parametrize("listener", ["header", "auto"])
def test_calls_reach_the_server(proxy, protocol, listener):
    with ThriftClient(proxy.port(listener), "header", protocol) as c:
        assert c.add(2, 40) == 42
        assert c.whoami() == "a"
        assert c.echo("x" * 100_000) == "x" * 100_000
        for i in range(20):  # one connection, many calls
            assert c.add(i, 1) == i + 1


def test_an_info_header_routes_the_call(proxy, protocol):
    with ThriftClient(proxy.port("header"), "header", protocol) as c:
        c.proto.set_header(b"x-route", b"b")
        assert c.whoami() == "b"
        # Headers are per call: the next one goes to the default route.
        assert c.whoami() == "a"
        c.proto.set_header(b"x-route", b"c")
        assert c.whoami() == "a"


def headers_of_next_call(server: ThriftServer, call) -> dict:
    """The info headers `server` records for the call `call()` makes (the
    server records them after it has answered)."""
    before = len(server.headers)
    call()
    harness.wait_until(lambda: len(server.headers) > before, what="the call's headers")
    return server.headers[before]


def test_info_headers_reach_the_server(proxy, protocol, servers):
    a = servers["a"]
    with ThriftClient(proxy.port("header"), "header", protocol) as c:
        # Keys are lower-cased on the way (header_keys_preserve_case is
        # false by default).
        c.proto.set_header(b"X-Trace", b"t-1")
        c.proto.set_header(b"x-empty", b"")
        assert headers_of_next_call(a, lambda: c.add(1, 1)) == {"x-trace": "t-1", "x-empty": ""}
        assert headers_of_next_call(a, lambda: c.add(1, 2)) == {}


def test_no_route_is_an_unknown_method_exception(proxy, protocol):
    # In a header frame (the client reads it), as Envoy answers.
    with ThriftClient(proxy.port("header"), "header", protocol) as c:
        rpc_peers.check_thrift_no_route(c, proxy.kind)


def test_oneway_reaches_the_server(proxy, protocol, servers):
    note = f"note-{proxy.kind}-{protocol}"
    with ThriftClient(proxy.port("header"), "header", protocol) as c:
        c.fire(note)
        deadline = time.monotonic() + 5
        while note not in servers["a"].fired and time.monotonic() < deadline:
            time.sleep(0.05)
        assert note in servers["a"].fired
        assert c.add(1, 2) == 3


# ---------------------------------------------------------------- mesh only

MESH = harness.kind_params(("mesh",))


@pytest.fixture(scope="module")
def lax_server():
    s = ThriftServer("lax", "unframed", "lax").start()
    yield s
    s.stop()


@pytest.fixture(scope="module", params=MESH)
def mesh(request, module_start_proxy, servers, lax_server):
    listeners = [
        rpc_peers.thrift_listener("header", {"transport": "HEADER", **route_config()}),
        rpc_peers.generic_listener("generic", "auto", {"route_config": {"routes": [
            {"match": {"headers": [{"name": "x-route", "string_match": {"exact": "b"}}]},
             "route": {"cluster": "b"}},
            {"match": {"method": {"exact": "echo"}}, "route": {"cluster": "a",
             "metadata_mutation": {"set": [{"key": "x-canary", "value": "1"}],
                                   "remove": ["x-secret"]}}},
            {"match": {}, "route": {"cluster": "a"}}]}}),
        rpc_peers.generic_listener("lax", "auto", {"route_config": {"routes": [
            {"match": {}, "route": {"cluster": "lax"}}]}}),
        inspected_listener(),
    ]
    clusters = [harness.static_cluster(n, s.port) for n, s in servers.items()]
    clusters.append(harness.static_cluster("lax", lax_server.port))
    return module_start_proxy(request.param, harness.bootstrap(listeners, clusters))


def inspected_listener() -> dict:
    """One port: the protocol inspector sends Thrift to a thrift_proxy
    (`echo` to the lax binary server, the rest to `a`), anything else to
    a tcp_proxy to `b`, a header-only server."""
    thrift = rpc_peers.thrift_listener("inspected", {"route_config": {"routes": [
        {"match": {"method_name": "echo"}, "route": {"cluster": "lax"}},
        {"match": {"method_name": ""}, "route": {"cluster": "a"}}]}})
    chain = thrift["filter_chains"][0]
    chain["filter_chain_match"] = {"application_protocols": ["thrift"]}
    fallback = {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": harness.TCP_PROXY_TYPE, "stat_prefix": "other", "cluster": "b"}}]}
    thrift["filter_chains"] = [chain, fallback]
    thrift["listener_filters"] = [{
        "name": "mesh.filters.listener.protocol_inspector",
        "typed_config": {"@type": "type.googleapis.com/mesh.filters.listener."
                                  "protocol_inspector.v1.ProtocolInspector"}}]
    return thrift


def test_the_protocol_inspector_finds_header_and_lax_thrift(mesh, protocol):
    # Through the thrift_proxy chain, `whoami` reaches `a`; through the
    # tcp_proxy fallback it would reach `b`.
    with ThriftClient(mesh.port("inspected"), "header", protocol) as c:
        assert c.whoami() == "a"
    # Unversioned binary: only the thrift_proxy chain reaches the lax
    # server (`b` takes header frames only).
    with ThriftClient(mesh.port("inspected"), "unframed", "lax") as c:
        assert c.echo("lax") == "lax"


def test_codec_auto_takes_the_header_transport(mesh, protocol):
    with ThriftClient(mesh.port("generic"), "header", protocol) as c:
        assert c.add(20, 22) == 42
        c.proto.set_header(b"X-Route", b"b")
        assert c.whoami() == "b"


def test_metadata_mutation_rewrites_the_info_headers(mesh, protocol, servers):
    a = servers["a"]
    with ThriftClient(mesh.port("generic"), "header", protocol) as c:
        c.proto.set_header(b"x-secret", b"s")
        c.proto.set_header(b"x-keep", b"k")
        assert headers_of_next_call(a, lambda: c.echo("m")) == {"x-keep": "k", "x-canary": "1"}


def test_a_transform_is_refused_with_an_exception(mesh, protocol):
    from thrift.Thrift import TApplicationException
    from thrift.transport.THeaderTransport import THeaderTransformID

    with ThriftClient(mesh.port("header"), "header", protocol) as c:
        c.proto.add_transform(THeaderTransformID.ZLIB)
        with pytest.raises(TApplicationException) as e:
            c.add(1, 2)
        assert "transform 1 is not supported" in (e.value.message or "")
    # Other connections are unaffected.
    with ThriftClient(mesh.port("header"), "header", protocol) as c:
        assert c.add(1, 2) == 3


def test_lax_binary_is_detected_without_configuration(mesh):
    with ThriftClient(mesh.port("lax"), "unframed", "lax") as c:
        assert c.add(1, 2) == 3
        assert c.whoami() == "lax"
        assert c.echo("y" * 5000) == "y" * 5000
