"""`retry_on: refused-stream` through the real proxy, the same YAML under
Envoy and mesh: an HTTP/2 upstream (a small server on the Python `h2`
package) answers the first stream of every path that starts with `/refuse`
with RST_STREAM(REFUSED_STREAM) and later ones with 200; the proxy retries
the refused stream, and without a matching retry condition the client gets
the 503 reset reply."""

from __future__ import annotations

import collections
import socket
import threading

import h2.config
import h2.connection
import h2.events
import h2.errors
import pytest

import harness


class RefusingH2Server:
    """h2c (prior knowledge) server: the first stream for each path starting
    with /refuse is refused, everything else answers 200 `ok`. Counts
    streams per path."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.streams = collections.Counter()
        self.closed = False

    def start(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self):
        self.closed = True
        self.sock.close()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        paths = {}
        try:
            conn.sendall(h2c.data_to_send())
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        headers = {k.decode() if isinstance(k, bytes) else k:
                                   v.decode() if isinstance(v, bytes) else v
                                   for k, v in ev.headers}
                        path = headers.get(":path", "/")
                        with self.lock:
                            self.streams[path] += 1
                            first = self.streams[path] == 1
                        if path.startswith("/refuse") and first:
                            h2c.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                        else:
                            paths[ev.stream_id] = path
                        if ev.stream_ended is not None and ev.stream_id in paths:
                            self._answer(h2c, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in paths:
                        self._answer(h2c, ev.stream_id)
                    elif isinstance(ev, h2.events.DataReceived):
                        h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                out = h2c.data_to_send()
                if out:
                    conn.sendall(out)
        except Exception:  # noqa: BLE001 - a broken client connection ends it
            return
        finally:
            conn.close()

    @staticmethod
    def _answer(h2c, stream_id):
        try:
            h2c.send_headers(stream_id, [(":status", "200"), ("content-length", "2"),
                                         ("x-upstream", "h2")])
            h2c.send_data(stream_id, b"ok", end_stream=True)
        except Exception:  # noqa: BLE001 - the stream is already closed
            pass


@pytest.fixture
def refusing_server():
    s = RefusingH2Server().start()
    yield s
    s.stop()


def _config(port, retry_on):
    route = {"cluster": "h2", "timeout": "5s"}
    if retry_on:
        route["retry_policy"] = {"retry_on": retry_on, "num_retries": 2}
    rc = {"virtual_hosts": [{"name": "all", "domains": ["*"],
                             "routes": [{"match": {"prefix": "/"}, "route": route}]}]}
    return harness.simple_http_bootstrap(rc, [harness.static_cluster("h2", port, http2=True)])


def test_a_refused_stream_is_retried(start_proxy, kind, refusing_server):
    p = start_proxy(kind, _config(refusing_server.port, "refused-stream"))
    r = harness.request(p.port(), path="/refuse/a")
    assert r.status == 200
    assert r.body == b"ok"
    # The refused stream and the retry.
    assert refusing_server.streams["/refuse/a"] == 2
    text = p.admin_text("/stats/prometheus")
    assert harness.prometheus_value(text, "envoy_cluster_upstream_rq_retry",
                                    envoy_cluster_name="h2") == 1


def test_without_the_condition_the_reset_reaches_the_client(start_proxy, kind,
                                                            refusing_server):
    p = start_proxy(kind, _config(refusing_server.port, "retriable-4xx"))
    r = harness.request(p.port(), path="/refuse/b")
    assert r.status == 503
    assert refusing_server.streams["/refuse/b"] == 1
    # Later requests are not refused.
    assert harness.request(p.port(), path="/refuse/b").status == 200
