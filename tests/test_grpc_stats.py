"""`envoy.filters.http.grpc_stats`: per-cluster gRPC call counters.

grpcio client -> proxy (grpc_stats + router) -> HTTP/2 cluster -> grpcio
server, under Envoy and mesh on the same YAML; the `grpc` series of
`/stats/prometheus` must be equal.
"""

from __future__ import annotations

import grpc
import pytest

import harness

from test_grpc import CHANNEL_OPTIONS
from test_grpc import ROUTES as GRPC_ROUTES

# test_grpc's routes, to a cluster named unlike the `grpc` stat prefix.
ROUTES = GRPC_ROUTES.replace("cluster: grpc", "cluster: backend")
assert "cluster: backend" in ROUTES
FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"


def config(grpc_port: int, filter_config: dict) -> str:
    tc = {"@type": FILTER_TYPE, **filter_config}
    return harness.simple_http_bootstrap(
        ROUTES,
        [harness.static_cluster("backend", grpc_port, http2=True)],
        {
            "codec_type": "AUTO",
            "http_filters": [
                {"name": "envoy.filters.http.grpc_stats", "typed_config": tc},
                harness.ROUTER_FILTER,
            ],
        },
    )


def traffic(port: int, pb2, pb2_grpc) -> None:
    """3 OK unary calls, a 10-message bidi stream, one NOT_FOUND, one
    UNIMPLEMENTED, and a plain HTTP request (not gRPC: not counted)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        stub = pb2_grpc.EchoServiceStub(ch)
        for i in range(3):
            assert stub.Echo(pb2.EchoRequest(message=f"m{i}", seq=i), timeout=10).seq == i
        replies = list(stub.Chat((pb2.EchoRequest(message="s", seq=i) for i in range(10)),
                                 timeout=20))
        assert len(replies) == 10
        with pytest.raises(grpc.RpcError) as ei:
            stub.Missing(pb2.EchoRequest(message="x"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary("/meshtest.EchoService/NoSuchMethod")(b"", timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Not gRPC (no application/grpc content type): not counted.
    harness.request(port, path="/meshtest.EchoService/Echo")


def grpc_series(proxy) -> dict:
    text = proxy.admin_text("/stats/prometheus")
    out = {}
    for name, labels, value in harness.prometheus_samples(text):
        if name.startswith("envoy_cluster_grpc_"):
            out[(name, tuple(sorted(labels.items())))] = value
    return out


CASES = {
    "all_methods": {"stats_for_all_methods": True},
    "istio": {"emit_filter_state": True, "stats_for_all_methods": False},
    "allowlist": {
        "individual_method_stats_allowlist": {
            "services": [{"name": "meshtest.EchoService", "method_names": ["Echo", "Missing"]}]
        }
    },
    "replace_dots": {"stats_for_all_methods": True, "replace_dots_in_grpc_service_name": True},
}


def run(kind, start_proxy, grpc_server, case) -> dict:
    proxy = start_proxy(kind, config(grpc_server.port, CASES[case]))
    traffic(proxy.port("ingress"), grpc_server.pb2, grpc_server.pb2_grpc)
    return grpc_series(proxy)


@pytest.mark.parametrize("case", sorted(CASES))
def test_grpc_series_equal_envoys(start_proxy, grpc_server, case):
    """Unary and bidi calls, OK and error statuses, allowlisted or not:
    the same `envoy_cluster_grpc_*` series, labels and values as Envoy."""
    envoy = run("envoy", start_proxy, grpc_server, case)
    mesh = run("mesh", start_proxy, grpc_server, case)
    assert envoy, "Envoy counted nothing: the traffic did not reach the filter"
    assert mesh == envoy


def test_no_series_without_the_filter(start_proxy, grpc_server):
    cfg = harness.simple_http_bootstrap(
        ROUTES, [harness.static_cluster("backend", grpc_server.port, http2=True)],
        {"codec_type": "AUTO"},
    )
    for kind in harness.KINDS:
        proxy = start_proxy(kind, cfg)
        traffic(proxy.port("ingress"), grpc_server.pb2, grpc_server.pb2_grpc)
        assert grpc_series(proxy) == {}, kind
