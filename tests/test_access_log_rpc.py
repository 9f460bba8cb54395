"""`log_format` and `filter` on the RPC proxies' access logs (mesh only:
Envoy's dubbo_proxy and thrift_proxy have no access log).

A call reads as routing reads it: `%REQ(:METHOD)%` is the RPC method,
`%REQ(:PATH)%` the service (interface), `%REQ(name)%` an attachment,
`%PROTOCOL%` the codec; `%RESPONSE_CODE%` is the protocol's response
status (Dubbo: 20 OK, 60 SERVICE_NOT_FOUND, ...). Filters pick lines as for
HTTP, and a log without `log_format` keeps the RPC proxies' own line.
"""

from __future__ import annotations

import json

import pytest

import harness
import rpc_peers
from rpc_peers import NodeServer, dubbo_call
from test_access_log_format import file_log, read_lines

pytestmark = pytest.mark.skipif(rpc_peers.node_available() is not None,
                                reason=str(rpc_peers.node_available()))

GREETER = "com.mesh.test.Greeter"

JSON = {
    "method": "%REQ(:METHOD)%", "service": "%REQ(:PATH)%", "user": "%REQ(X-USER)%",
    "user_prefix": "%REQ(X-USER):4%", "protocol": "%PROTOCOL%", "code": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%", "flags": "%RESPONSE_FLAGS%",
    "rx": "%BYTES_RECEIVED%", "tx": "%BYTES_SENT%", "upstream": "%UPSTREAM_HOST%",
    "cluster": "%UPSTREAM_CLUSTER%", "route": "%ROUTE_NAME%",
    "peer": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "duration": "%DURATION%",
}


@pytest.fixture(scope="module")
def servers():
    a = NodeServer("dubbo", "a").start()
    yield a
    a.stop()


@pytest.mark.parametrize("kind", harness.kind_params(("mesh",)))
def test_dubbo_log_format_and_filters(kind, start_proxy, tmp_path, servers):
    js, nr, canary, own = (tmp_path / n for n in ("json.log", "nr.log", "canary.log", "own.log"))
    routes = {"route_config": [{"name": "greeter", "interface": GREETER, "routes": [
        {"match": {"method": {"name": {"exact": "whoami"}}}, "route": {"cluster": "a"}}]}]}
    routes["access_log"] = [
        file_log(js, {"json_format": JSON}),
        file_log(nr, {"text_format": "%RESPONSE_FLAGS% %REQ(:METHOD)% %RESPONSE_CODE%\n"},
                 {"response_flag_filter": {"flags": ["NR"]}}),
        file_log(canary, {"text_format": "%REQ(:METHOD)% %REQ(X-USER)%\n"},
                 {"header_filter": {"header": {"name": "x-user",
                                               "string_match": {"prefix": "canary"}}}}),
        file_log(own),
    ]
    cfg = harness.bootstrap([rpc_peers.dubbo_listener("dubbo", routes)],
                            [harness.static_cluster("a", servers.port)])
    proxy = start_proxy(kind, cfg)
    port = proxy.port("dubbo")
    assert dubbo_call(port, GREETER, "whoami", attachments={"x-user": "canary-7"}) == "a"
    assert dubbo_call(port, GREETER, "whoami", attachments={"x-user": "plain"}) == "a"
    with pytest.raises(Exception):
        dubbo_call(port, GREETER, "nosuch")
    rows = [json.loads(l) for l in read_lines(js, 3)]
    assert len(rows) == 3, rows
    for r in rows:
        assert isinstance(r["code"], int) and isinstance(r["rx"], int) and r["rx"] > 0
        assert isinstance(r["duration"], int) and r["peer"] == "127.0.0.1"
        assert (r["service"], r["protocol"]) == (GREETER, "dubbo"), r
    ok, plain, missing = rows
    assert (ok["method"], ok["user"], ok["user_prefix"]) == ("whoami", "canary-7", "cana")
    assert (ok["code"], ok["details"], ok["flags"]) == (20, "via_upstream", "-"), ok
    assert (ok["upstream"], ok["cluster"]) == (f"127.0.0.1:{servers.port}", "a"), ok
    assert ok["tx"] > 0
    assert plain["user"] == "plain"
    assert (missing["method"], missing["user"], missing["flags"]) == ("nosuch", None, "NR")
    assert (missing["details"], missing["upstream"], missing["cluster"]) == \
        ("route_not_found", None, None), missing
    assert missing["code"] != 20
    assert read_lines(nr, 1) == [f"NR nosuch {missing['code']}"]
    assert read_lines(canary, 1) == ["whoami canary-7"]
    # Without log_format: the RPC proxies' own line.
    own_lines = read_lines(own, 3)
    assert len(own_lines) == 3, own_lines
    assert f'"whoami {GREETER} dubbo" ok - ' in own_lines[0], own_lines
    assert f'"nosuch {GREETER} dubbo" error NR ' in own_lines[2], own_lines
