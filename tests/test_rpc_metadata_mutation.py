"""Attachment / header mutation on rpc_proxy routes (`metadata_mutation`).

A first mesh sets or removes an attachment (Dubbo) or header (SOFA Bolt)
and forwards to a second proxy that routes on it: the call lands on the
canary server only if the changed frame arrived intact. For Dubbo the
second hop is Envoy's dubbo_proxy as well as mesh's, so Envoy reads the
attachments mesh rewrote. Clients and servers are the real peers (Python
Dubbo client, sofa-rpc-node).
"""

from __future__ import annotations

import pytest

import harness
import rpc_peers
from rpc_peers import NodeServer, dubbo_call, node_calls

pytestmark = pytest.mark.skipif(rpc_peers.node_available() is not None,
                                reason=str(rpc_peers.node_available()))

GREETER = "com.mesh.test.Greeter"


def hop1_listeners(protocol: str) -> list[dict]:
    def route(mutation):
        return {"route_config": {"routes": [{"match": {}, "route": {
            "cluster": "hop2", "metadata_mutation": mutation}}]}}

    return [
        rpc_peers.generic_listener("set", protocol, route({"set": [
            {"key": "x-canary", "value": "1"}, {"key": "x-Trace", "value": "kept-case"}]})),
        rpc_peers.generic_listener("remove", protocol, route({"remove": ["X-Canary"]})),
        rpc_peers.generic_listener("plain", protocol, route({})),
    ]


@pytest.fixture(scope="module", params=["dubbo", "bolt"])
def protocol(request):
    return request.param


@pytest.fixture(scope="module")
def servers(protocol):
    a = NodeServer(protocol, "a").start()
    b = NodeServer(protocol, "b").start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module", params=harness.kind_params())
def chain(request, protocol, servers, module_start_proxy):
    """(protocol, the first mesh); the second hop is `request.param`."""
    kind = request.param
    if kind == "envoy" and protocol != "dubbo":
        pytest.skip("Envoy has no SOFA Bolt filter")
    a, b = servers
    canary = [{"name": "x-canary", "exact_match": "1"}]
    if protocol == "dubbo":
        any_method = {"name": {"safe_regex": {"regex": ".*"}}}
        hop2 = rpc_peers.dubbo_listener("hop2", {"route_config": [{
            "name": "greeter", "interface": GREETER, "routes": [
                {"match": {"method": any_method, "headers": canary}, "route": {"cluster": "b"}},
                {"match": {"method": any_method}, "route": {"cluster": "a"}}]}]})
    else:
        hop2 = rpc_peers.generic_listener("hop2", protocol, {"route_config": {"routes": [
            {"match": {"headers": canary}, "route": {"cluster": "b"}},
            {"match": {}, "route": {"cluster": "a"}}]}})
    second = module_start_proxy(kind, harness.bootstrap(
        [hop2], [harness.static_cluster("a", a.port), harness.static_cluster("b", b.port)]))
    first = module_start_proxy("mesh", harness.bootstrap(
        hop1_listeners(protocol), [harness.static_cluster("hop2", second.port("hop2"))]))
    return protocol, first


def whoami(protocol: str, port: int, attachments=None) -> str:
    if protocol == "dubbo":
        return dubbo_call(port, GREETER, "whoami", attachments=attachments)
    # sofa-rpc-node's client sends no custom headers: Bolt calls go bare.
    assert attachments is None
    res = node_calls(protocol, port, [{"method": "whoami"}])
    assert "ok" in res[0], res
    return res[0]["ok"]


def test_a_set_attachment_reaches_the_next_hop(chain):
    protocol, mesh = chain
    assert whoami(protocol, mesh.port("plain")) == "a"
    assert whoami(protocol, mesh.port("set")) == "b"
    if protocol == "dubbo":
        # An attachment the client sent with another value is overwritten.
        assert whoami(protocol, mesh.port("set"), {"X-Canary": "0"}) == "b"


def test_a_removed_attachment_is_gone_at_the_next_hop(chain):
    protocol, mesh = chain
    if protocol != "dubbo":
        pytest.skip("the Bolt client sends no custom headers to remove")
    assert whoami(protocol, mesh.port("plain"), {"x-canary": "1"}) == "b"
    assert whoami(protocol, mesh.port("remove"), {"x-canary": "1"}) == "a"


def test_calls_with_arguments_survive_the_rewrite(chain):
    protocol, mesh = chain
    # The arguments before the attachments are forwarded byte for byte.
    text = "héllo " * 2000
    if protocol == "dubbo":
        assert dubbo_call(mesh.port("set"), GREETER, "echo", [text]) == text
    # (A shorter text for the Node client, which prints every result.)
    text = "héllo " * 200
    calls = [{"method": "echo", "args": [text]}, {"method": "plus", "args": [20, 22]}] * 5
    res = node_calls(protocol, mesh.port("set"), calls, concurrency=5)
    assert res == [{"ok": text}, {"ok": 42}] * 5, [r if len(str(r)) < 80 else "..." for r in res]
    assert node_calls(protocol, mesh.port("set"), [{"method": "whoami"}]) == [{"ok": "b"}]
