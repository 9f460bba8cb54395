"""Route `max_stream_duration` (`max_stream_duration`,
`grpc_timeout_header_max`, `grpc_timeout_header_offset`) and the HCM's
`common_http_protocol_options.max_stream_duration`, under Envoy and mesh
with the same YAML. Istio puts `{max_stream_duration: 0s,
grpc_timeout_header_max: 0s}` on every route: gRPC deadlines are honoured
and nothing else is limited."""

from __future__ import annotations

import time

import harness

GRPC = {"content-type": "application/grpc"}
ISTIO = {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}


def _config(port, msd=None, hcm_msd=None):
    route = {"cluster": "c", "timeout": "5s"}
    if msd is not None:
        route["max_stream_duration"] = msd
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"],
                             "routes": [{"match": {"prefix": "/"}, "route": route}]}]}
    hcm = {}
    if hcm_msd is not None:
        hcm["common_http_protocol_options"] = {"max_stream_duration": hcm_msd}
    return harness.simple_http_bootstrap(rc, [harness.static_cluster("c", port)], hcm)


def test_istio_shape_honours_the_grpc_deadline(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, ISTIO))
    t0 = time.monotonic()
    r = harness.request(p.port(), method="POST", path="/delay/2", body=b"",
                        headers={**GRPC, "grpc-timeout": "300m"})
    assert time.monotonic() - t0 < 1.5
    assert r.status == 200
    assert r.header("grpc-status") == "4"  # DEADLINE_EXCEEDED
    assert r.header("grpc-message") == "downstream duration timeout"
    # Without the header, and for plain HTTP, nothing is limited.
    r = harness.request(p.port(), method="POST", path="/delay/0.5", body=b"", headers=GRPC)
    assert r.status == 200 and r.header("grpc-status") is None
    assert harness.request(p.port(), path="/delay/0.5").status == 200


def test_route_duration_answers_504(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, {"max_stream_duration": "0.3s"}))
    t0 = time.monotonic()
    r = harness.request(p.port(), path="/delay/2")
    assert time.monotonic() - t0 < 1.5
    assert r.status == 504
    assert r.body == b"downstream duration timeout"
    assert harness.request(p.port(), path="/delay/0.05").status == 200


def test_hcm_duration_and_a_route_that_turns_it_off(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, None, "0.3s"))
    assert harness.request(p.port(), path="/delay/2").status == 504
    p = start_proxy(kind, _config(upstream_a.port, {"max_stream_duration": "0s"}, "0.3s"))
    assert harness.request(p.port(), path="/delay/0.6").status == 200


def test_grpc_header_cap_and_offset(start_proxy, kind, upstream_a):
    p = start_proxy(kind, _config(upstream_a.port, {
        "grpc_timeout_header_max": "0.4s", "grpc_timeout_header_offset": "0.1s"}))
    t0 = time.monotonic()
    r = harness.request(p.port(), method="POST", path="/delay/2", body=b"",
                        headers={**GRPC, "grpc-timeout": "10S"})
    assert time.monotonic() - t0 < 1.5
    assert r.header("grpc-status") == "4"
    # Under the cap less the offset the call completes.
    r = harness.request(p.port(), method="POST", path="/delay/0.05", body=b"",
                        headers={**GRPC, "grpc-timeout": "10S"})
    assert r.status == 200 and r.header("grpc-status") is None
