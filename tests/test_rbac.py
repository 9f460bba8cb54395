"""RBAC (envoy.filters.http.rbac, envoy.filters.network.rbac) through the
proxy, the same YAML under Envoy and mesh: allow/deny by SPIFFE principal
(mTLS), path, method and header, shadow rules counted only, and a network
RBAC that closes denied connections."""

from __future__ import annotations

import socket

import pytest
import yaml

import harness
import tls_certs
from test_tls import curl, down_tls, stat, tls_listener

WEB = "spiffe://cluster.local/ns/default/sa/web"
DB = "spiffe://cluster.local/ns/default/sa/db"

RBAC = f"""
name: envoy.filters.http.rbac
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
  rules:
    action: ALLOW
    policies:
      web-reads:
        permissions:
        - and_rules:
            rules:
            - header: {{name: ":method", string_match: {{exact: GET}}}}
            - url_path: {{path: {{prefix: "/api/"}}}}
        principals:
        - authenticated: {{principal_name: {{exact: "{WEB}"}}}}
      db-admin:
        permissions:
        - url_path: {{path: {{exact: "/admin"}}}}
        principals:
        - and_ids:
            ids:
            - authenticated: {{principal_name: {{suffix: "/sa/db"}}}}
            - header: {{name: x-admin, present_match: true}}
      health-from-anyone-local:
        permissions:
        - or_rules:
            rules:
            - url_path: {{path: {{exact: "/healthz"}}}}
            - url_path: {{path: {{safe_regex: {{regex: "/ready[0-9]*"}}}}}}
        principals:
        - direct_remote_ip: {{address_prefix: 127.0.0.0, prefix_len: 8}}
  shadow_rules:
    action: DENY
    policies:
      no-writes:
        permissions:
        - not_rule: {{header: {{name: ":method", string_match: {{exact: GET}}}}}}
        principals:
        - any: true
"""

ROUTES = harness.catch_all_routes("a")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tls_certs.Pki(tmp_path_factory.mktemp("rbac-pki"))


@pytest.fixture(scope="module")
def leaves(pki):
    return {
        "server": pki.leaf("server", dns=["server.local"]),
        "web": pki.leaf("web", uris=[WEB]),
        "db": pki.leaf("db", uris=[DB]),
    }


@pytest.fixture(scope="module", params=harness.kind_params())
def proxy(request, module_start_proxy, pki, leaves, upstream_a):
    l = tls_listener("authz", ROUTES, down_tls(pki, leaves["server"], require=True))
    hcm = l["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, yaml.safe_load(RBAC))
    return module_start_proxy(request.param, harness.bootstrap(
        [l], [harness.static_cluster("a", upstream_a.port)]))


CASES = [
    # (who, method, path, extra headers, expected status)
    ("web", "GET", "/api/items?x=1", [], 200),
    ("web", "POST", "/api/items", [], 403),
    ("web", "GET", "/other", [], 403),
    ("web", "GET", "/admin", ["x-admin: 1"], 403),
    ("db", "GET", "/admin", ["x-admin: 1"], 200),
    ("db", "GET", "/admin", [], 403),
    ("db", "GET", "/api/items", [], 403),
    ("db", "GET", "/healthz", [], 200),
    ("web", "GET", "/ready7", [], 200),
]


def test_allow_and_deny_by_principal_path_method_header(proxy, pki, leaves):
    port = proxy.port("authz")
    results = []
    for who, method, path, headers, _ in CASES:
        extra = ["--http1.1", "-X", method]
        for h in headers:
            extra += ["-H", h]
        rc, status, body = curl(port, path, pki=pki, cert=leaves[who], extra=extra)
        assert rc == 0, body
        results.append((int(status.split()[0]), body if status.startswith("403") else ""))
    assert [s for s, _ in results] == [c[-1] for c in CASES]
    assert all(b == "RBAC: access denied" for s, b in results if s == 403)
    allowed = sum(1 for c in CASES if c[-1] == 200)
    denied = len(CASES) - allowed
    assert stat(proxy, "envoy_http_rbac_allowed") == allowed
    assert stat(proxy, "envoy_http_rbac_denied") == denied
    # Shadow rules (deny everything but GET) are counted, never enforced.
    assert stat(proxy, "envoy_http_rbac_shadow_denied") == 1
    assert stat(proxy, "envoy_http_rbac_shadow_allowed") == len(CASES) - 1


def test_grpc_request_denied_as_permission_denied(proxy, pki, leaves):
    rc, status, out = curl(proxy.port("authz"), "/pkg.Svc/Method", pki=pki, cert=leaves["web"],
                           extra=["-X", "POST", "-H", "content-type: application/grpc",
                                  "-D", "-", "--http2"])
    assert rc == 0
    assert status.startswith("200")
    assert "grpc-status: 7" in out.lower(), out


NET_RBAC = {
    "name": "envoy.filters.network.rbac",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        "stat_prefix": "net",
        "rules": {
            "action": "DENY",
            "policies": {
                "no-local": {
                    "permissions": [{"destination_port": 0}],
                    "principals": [{"direct_remote_ip": {"address_prefix": "127.0.0.1",
                                                         "prefix_len": 32}}],
                }
            },
        },
    },
}


@pytest.fixture(scope="module", params=harness.kind_params())
def tcp_proxy(request, module_start_proxy, tcp_echo):
    allow_port = harness.free_port()
    deny_port = harness.free_port()
    listeners = []
    for name, port, denied_port in (("open", allow_port, deny_port),
                                    ("closed", deny_port, deny_port)):
        l = harness.tcp_listener(name, "echo")
        l["address"] = harness.socket_address(port)
        f = yaml.safe_load(yaml.safe_dump(NET_RBAC))
        f["typed_config"]["rules"]["policies"]["no-local"]["permissions"] = [
            {"destination_port": denied_port}]
        l["filter_chains"][0]["filters"].insert(0, f)
        listeners.append(l)
    return module_start_proxy(request.param, harness.bootstrap(
        listeners, [harness.static_cluster("echo", tcp_echo.port)]))


def _echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                chunk = s.recv(100)
                if not chunk:
                    return got
                got += chunk
        except OSError:  # reset, broken pipe, or not connected any more
            return b""


def test_network_rbac_closes_denied_connections(tcp_proxy):
    assert _echo(tcp_proxy.port("open")) == b"hello"
    assert _echo(tcp_proxy.port("closed")) == b""
    assert _echo(tcp_proxy.port("open")) == b"hello"
