"""A listener-level `access_log` on an RPC proxy's listener counts the
connection's bytes, compared with Envoy's thrift_proxy on the same YAML:
one line per connection when it closes, with the bytes the client sent and
received (not 0), in plain text and, on an Istio-style mTLS inbound
chain, after TLS decryption.
"""

from __future__ import annotations

import pytest

import harness
import rpc_peers
from rpc_peers import ThriftClient, ThriftServer
from test_access_log_format import file_log, flush, read_lines

FORMAT = "%BYTES_RECEIVED% %BYTES_SENT% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%\n"


def _framed(write) -> int:
    """The bytes `write(protocol)` puts on a framed binary connection."""
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TTransport

    buf = TTransport.TMemoryBuffer()
    framed = TTransport.TFramedTransport(buf)
    write(TBinaryProtocol.TBinaryProtocol(framed))
    return len(buf.getvalue())


def _calls() -> tuple[int, int]:
    """Request and reply bytes of `whoami()` -> "a" and `add(2, 3)` -> 5."""
    from thrift.Thrift import TMessageType

    Calc, _ = rpc_peers.thrift_stubs()

    def requests(proto):
        client = Calc.Client(proto)
        client.send_whoami()
        client.send_add(2, 3)

    def replies(proto):
        for name, result in (("whoami", Calc.whoami_result(success="a")),
                             ("add", Calc.add_result(success=5))):
            proto.writeMessageBegin(name, TMessageType.REPLY, 0)
            result.write(proto)
            proto.writeMessageEnd()
            proto.trans.flush()

    return _framed(requests), _framed(replies)


@pytest.fixture(scope="module")
def server():
    s = ThriftServer("a").start()
    yield s
    s.stop()


@pytest.mark.parametrize("kind", harness.kind_params())
def test_rpc_listener_line_counts_the_connections_bytes(kind, start_proxy, tmp_path, server):
    log = tmp_path / "listener.log"
    listener = rpc_peers.thrift_listener("thrift", {"route_config": {"name": "calc", "routes": [
        {"match": {"method_name": ""}, "route": {"cluster": "a"}}]}})
    listener["access_log"] = [file_log(log, {"text_format": FORMAT})]
    proxy = start_proxy(kind, harness.bootstrap([listener],
                                                [harness.static_cluster("a", server.port)]))
    port = proxy.port("thrift")
    with ThriftClient(port) as c:
        assert c.whoami() == "a"
        assert c.add(2, 3) == 5
    flush(proxy)
    lines = read_lines(log, 1)
    assert len(lines) == 1, lines
    rx, tx, peer = lines[0].split(" ")
    assert peer == "127.0.0.1"
    # The framed calls and replies as they crossed the wire.
    assert (int(rx), int(tx)) == _calls(), lines


@pytest.mark.parametrize("kind", harness.kind_params())
def test_rpc_mtls_listener_line_counts_the_decrypted_bytes(kind, start_proxy, tmp_path, server):
    """The same over an Istio-style inbound chain (TLS inspector, mTLS,
    network RBAC, thrift_proxy): the bytes after TLS decryption."""
    import ssl

    import tls_certs
    from test_rpc_tls import CLIENT_ID, ISTIO_ALPN, mtls_inbound
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TSSLSocket, TTransport

    pki = tls_certs.Pki(tmp_path / "pki")
    server_leaf = pki.leaf("rpc-server", dns=["server.local"])
    client_leaf = pki.leaf("rpc-client", uris=[CLIENT_ID])
    log = tmp_path / "listener.log"
    listener = rpc_peers.thrift_listener("thrift", {"route_config": {"name": "calc", "routes": [
        {"match": {"method_name": ""}, "route": {"cluster": "a"}}]}})
    listener = mtls_inbound(listener, pki, server_leaf)
    listener["access_log"] = [file_log(log, {"text_format": FORMAT})]
    proxy = start_proxy(kind, harness.bootstrap([listener],
                                                [harness.static_cluster("a", server.port)]))
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.load_cert_chain(str(client_leaf.cert), str(client_leaf.key))
    # Istio's inbound chains match its ALPN too.
    ctx.set_alpn_protocols(list(ISTIO_ALPN))
    sock = TSSLSocket.TSSLSocket("127.0.0.1", proxy.port("thrift"), ssl_context=ctx,
                                server_hostname="server.local")
    transport = TTransport.TFramedTransport(sock)
    Calc, _ = rpc_peers.thrift_stubs()
    client = Calc.Client(TBinaryProtocol.TBinaryProtocol(transport))
    transport.open()
    try:
        assert client.whoami() == "a"
        assert client.add(2, 3) == 5
    finally:
        transport.close()
    flush(proxy)
    lines = read_lines(log, 1)
    assert len(lines) == 1, lines
    rx, tx, peer = lines[0].split(" ")
    assert peer == "127.0.0.1"
    assert (int(rx), int(tx)) == _calls(), lines
