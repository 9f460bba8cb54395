"""xDS over a Unix domain socket, as Istio's sidecar reaches its agent
(`xds-grpc` -> `./etc/istio/proxy/XDS`): the bootstrap's ADS cluster has an
`address.pipe.path`, and the example control plane serves on that socket.
Envoy and mesh side by side: LDS/RDS/CDS/EDS arrive, requests reach the
upstream, and an update is applied.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import harness
from test_xds import (  # noqa: F401 - control_plane is a fixture
    ControlPlane,
    assignment,
    control_plane_bin,
    eds_cluster,
    listener,
    routes,
    settle,
    to,
    upstreams,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    not control_plane_bin().exists(), reason=f"{control_plane_bin()} not built")


def uds_bootstrap(node: str, path: str) -> str:
    doc = {
        "node": {"id": node, "cluster": "test",
                 "metadata": {"ISTIO_VERSION": "1.22.0", "LABELS": {"app": "reviews"}}},
        "admin": {"address": harness.socket_address(0)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": path}}}}]}]},
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
        }]},
    }
    return yaml.safe_dump(doc)


@pytest.fixture
def uds_control_plane():
    # Unix socket paths are short (108 bytes): keep them under /tmp.
    d = Path(tempfile.mkdtemp(prefix="xds-uds-", dir="/tmp"))
    planes = []

    def make(nodes) -> ControlPlane:
        cp = ControlPlane(nodes)
        cp.unix = str(d / "XDS")
        planes.append(cp.start())
        return cp

    yield make
    for cp in planes:
        cp.kill()
    shutil.rmtree(d, ignore_errors=True)


def test_ads_over_a_unix_socket(kind, start_proxy, uds_control_plane, upstream_a, upstream_b):
    cp = uds_control_plane([kind])
    cp.write("clusters", [eds_cluster("a"), eds_cluster("b")])
    cp.write("endpoints", [assignment("a", [upstream_a.port]),
                           assignment("b", [upstream_b.port])])
    cp.write("routes", [routes()])
    cp.write("listeners", [listener()])
    settle()
    proxy = start_proxy(kind, uds_bootstrap(kind, cp.unix))
    # The control plane may have pushed a first snapshot before every file
    # was read: wait for the listener to arrive.
    deadline = time.monotonic() + 10
    while "ingress" not in proxy._listeners:
        assert time.monotonic() < deadline, f"{kind}: no listener over the Unix socket"
        time.sleep(0.05)
        proxy._listeners = proxy._read_listeners()
    port = proxy.port("ingress")
    assert set(upstreams(port, "/x", 5)) == {"a"}
    st = cp.wait_status(kind, lambda s: {"CDS", "EDS", "LDS", "RDS"} <= set(s.get("acked", {})))
    # node.metadata reaches the control plane (istiod reads it).
    assert st["metadata_keys"] == ["ISTIO_VERSION", "LABELS"]
    t = cp.write("routes", [routes(to("/b", "b"))])
    wait_until(lambda: harness.request(port, "GET", "/b/1").upstream == "b", t, "new route")


def test_a_pipe_cluster_is_refused_as_a_route_target(tmp_path):
    if not harness.mesh_available():
        pytest.skip(harness.mesh_missing_reason())
    cfg = yaml.safe_load(uds_bootstrap("n", "/tmp/nowhere"))
    cfg["static_resources"]["listeners"] = [harness.tcp_listener("ingress", "xds-grpc")]
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([str(harness.mesh_bin()), "validate", "--config-path", str(f)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "typed_config.cluster" in r.stderr + r.stdout
    assert "pipe" in r.stderr + r.stdout
