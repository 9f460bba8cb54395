"""gRPC (grpcio client -> proxy h2c listener -> HTTP/2 cluster -> grpcio server)."""

from __future__ import annotations

import grpc
import pytest

import harness

ROUTES = """
virtual_hosts:
- name: grpc
  domains: ["*"]
  routes:
  - match: {prefix: "/meshtest.EchoService/"}
    route: {cluster: grpc, timeout: 30s}
"""

CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


@pytest.fixture(scope="module", params=harness.kind_params())
def channel(request, module_start_proxy, grpc_server):
    cfg = harness.simple_http_bootstrap(
        ROUTES, [harness.static_cluster("grpc", grpc_server.port, http2=True)],
        {"codec_type": "AUTO"},
    )
    proxy = module_start_proxy(request.param, cfg)
    ch = grpc.insecure_channel(f"127.0.0.1:{proxy.port('ingress')}", options=CHANNEL_OPTIONS)
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()


@pytest.fixture
def stub(channel, grpc_server):
    return grpc_server.pb2_grpc.EchoServiceStub(channel)


def test_unary(stub, grpc_server):
    pb2 = grpc_server.pb2
    for i in range(5):
        reply = stub.Echo(pb2.EchoRequest(message=f"hello {i}", seq=i), timeout=10)
        assert reply.message == f"hello {i}"
        assert reply.seq == i


def test_unary_large_message(stub, grpc_server):
    pb2 = grpc_server.pb2
    msg = "x" * (1024 * 1024)
    reply = stub.Echo(pb2.EchoRequest(message=msg, seq=1), timeout=10)
    assert reply.message == msg


def test_bidi_streaming_50_messages(stub, grpc_server):
    pb2 = grpc_server.pb2
    requests = (pb2.EchoRequest(message=f"m{i}", seq=i) for i in range(50))
    replies = list(stub.Chat(requests, timeout=20))
    assert [r.seq for r in replies] == list(range(50))
    assert [r.message for r in replies] == [f"re: m{i}" for i in range(50)]


def test_error_status_and_details(stub, grpc_server):
    pb2 = grpc_server.pb2
    with pytest.raises(grpc.RpcError) as ei:
        stub.Missing(pb2.EchoRequest(message="widget-7"), timeout=10)
    err = ei.value
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no such thing: widget-7"


def test_unknown_method_unimplemented(channel):
    # routed to the server, which answers UNIMPLEMENTED in trailers-only form
    call = channel.unary_unary("/meshtest.EchoService/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as ei:
        call(b"", timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metadata_and_trailers(stub, grpc_server):
    pb2 = grpc_server.pb2
    reply, call = stub.Echo.with_call(pb2.EchoRequest(message="md", seq=3),
                                      metadata=(("x-echo-md", "v-123"),), timeout=10)
    assert reply.message == "md"
    assert ("x-initial", "v-123") in tuple(call.initial_metadata())
    assert ("x-trailer", "v-123") in tuple(call.trailing_metadata())
    assert call.code() == grpc.StatusCode.OK


def test_concurrent_unary_calls(stub, grpc_server):
    pb2 = grpc_server.pb2
    futures = [stub.Echo.future(pb2.EchoRequest(message=f"c{i}", seq=i), timeout=15)
               for i in range(50)]
    assert [f.result().seq for f in futures] == list(range(50))


PROXY_MADE_ROUTES = """
virtual_hosts:
- name: grpc
  domains: ["*"]
  routes:
  - match: {prefix: "/meshtest.EchoService/"}
    route: {cluster: dead}
"""


@pytest.mark.parametrize("kind", harness.kind_params())
def test_proxy_made_errors_are_grpc_statuses(start_proxy, refused, kind):
    """A gRPC client gets the proxy's own errors as gRPC statuses with the
    reason in grpc-message, as Envoy sends them: no route -> UNIMPLEMENTED,
    connect failure -> UNAVAILABLE with Envoy's reset text."""
    cfg = harness.simple_http_bootstrap(
        PROXY_MADE_ROUTES, [harness.static_cluster("dead", refused, http2=True)],
        {"codec_type": "AUTO"},
    )
    proxy = start_proxy(kind, cfg)
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port('ingress')}",
                               options=CHANNEL_OPTIONS) as ch:
        dead = ch.unary_unary("/meshtest.EchoService/Echo")
        with pytest.raises(grpc.RpcError) as ei:
            dead(b"", timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, (kind, ei.value)
        assert ei.value.details().startswith(
            "upstream connect error or disconnect/reset before headers"), (kind, ei.value.details())
        nowhere = ch.unary_unary("/other.Service/Call")
        with pytest.raises(grpc.RpcError) as ei:
            nowhere(b"", timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED, (kind, ei.value)
