"""A small ADS (state-of-the-world) management server written in Python on
PyPI `envoy-data-plane` (betterproto2 + grpclib): an xDS server nobody on
this project wrote the protocol code of, to drive mesh's client with.

`PyAds.set(type_url, version, [messages])` replaces the resources of a type
and pushes them to every open stream; `push_raw` sends any response
(unknown type URLs, malformed bytes, huge messages) for bad-input tests.
Every request received is recorded in `requests` (for ACK/NACK checks).
The server runs on its own asyncio loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import threading
import time

from grpclib.server import Server

from envoy_data_plane.envoy.service.discovery.v3 import (
    AggregatedDiscoveryServiceBase,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.google.protobuf import Any


class PyAds(AggregatedDiscoveryServiceBase):
    def __init__(self):
        self.resources: dict[str, tuple[str, list]] = {}
        self.requests: list[DiscoveryRequest] = []
        self.streams: list[asyncio.Queue] = []
        self.nonce = 0
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self.port = 0

    # -- control (from the test thread)

    def set(self, type_url: str, version: str, messages: list) -> None:
        anys = [Any(type_url=type_url, value=bytes(m)) for m in messages]
        self.resources[type_url] = (version, anys)
        self._broadcast(("push", type_url))

    def push_raw(self, response: DiscoveryResponse) -> None:
        self._broadcast(("raw", response))

    def _broadcast(self, event) -> None:
        if self.loop is None:
            return
        for q in list(self.streams):
            self.loop.call_soon_threadsafe(q.put_nowait, event)

    def requests_of(self, type_url: str) -> list[DiscoveryRequest]:
        with self.lock:
            return [r for r in self.requests if r.type_url == type_url]

    def wait_request(self, pred, timeout: float = 10.0) -> DiscoveryRequest:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                for r in self.requests:
                    if pred(r):
                        return r
            assert time.monotonic() < deadline, f"no matching request; got {len(self.requests)}"
            time.sleep(0.02)

    # -- the service

    def _response(self, type_url: str) -> DiscoveryResponse | None:
        if type_url not in self.resources:
            return None
        version, anys = self.resources[type_url]
        self.nonce += 1
        return DiscoveryResponse(version_info=version, resources=anys, type_url=type_url,
                                 nonce=str(self.nonce))

    async def stream_aggregated_resources(self, messages):
        q: asyncio.Queue = asyncio.Queue()
        self.streams.append(q)

        async def read():
            try:
                async for m in messages:
                    with self.lock:
                        self.requests.append(m)
                    await q.put(("request", m))
            finally:
                await q.put(("end", None))

        reader = asyncio.ensure_future(read())
        sent: dict[str, str] = {}
        try:
            while True:
                kind, value = await q.get()
                if kind == "end":
                    return
                if kind == "raw":
                    self.nonce += 1
                    value.nonce = str(self.nonce)
                    yield value
                    continue
                type_url = value.type_url if kind == "request" else value
                version = self.resources.get(type_url, ("", []))[0]
                if kind == "request" and value.response_nonce and sent.get(type_url) == version:
                    continue  # an ACK or NACK of what we have
                r = self._response(type_url)
                if r is not None:
                    sent[type_url] = r.version_info
                    yield r
        finally:
            reader.cancel()
            self.streams.remove(q)

    # -- lifecycle

    def start(self) -> "PyAds":
        ready = threading.Event()

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.server = Server([self])

            async def serve():
                await self.server.start("127.0.0.1", 0)
                self.port = self.server._server.sockets[0].getsockname()[1]
                ready.set()
                await self.server.wait_closed()

            self.loop.run_until_complete(serve())

        self.thread = threading.Thread(target=run, daemon=True, name="py-ads")
        self.thread.start()
        assert ready.wait(10), "python ADS server did not start"
        return self

    def stop(self) -> None:
        if self.loop is not None and self.server is not None:
            self.loop.call_soon_threadsafe(self.server.close)
            self.thread.join(timeout=5)
