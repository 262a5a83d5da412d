"""A prototype server core: the gateway's real ``/v1`` path on an ``asyncio.Protocol`` over
httptools' request parser, to be measured against today's aiohttp server.

    python bench/server_core_proto.py      # with the gateway's environment (DATABASE_URL, ...)

It builds the same ``Gateway`` as ``inference-gateway serve`` (tenants, metering into the spool
and Postgres, metrics, the admission gate) and hands every request for a forwarded ``/v1``
endpoint to the same ``ProxyHandler``: endpoint match, tenant, payload, route, relay over the
same upstream pools, the usage record. Only the HTTP server in front differs. A connection
whose first request is anything else (``/ready``, ``/metrics``) is handed to the aiohttp
application, with the bytes read so far, for the rest of its life.

What the handler reads of a request is given to it by a small stand-in for aiohttp's request;
what it answers (an aiohttp ``Response``) is written out here. Streamed answers are not carried:
this measures the request/response path, one worker, nothing else.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections import deque
from typing import Any, cast

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from inference_gateway.proxy.app import GATEWAY, create_app
from inference_gateway.server import listen
from inference_gateway.settings import load_settings

log = logging.getLogger("server_core_proto")
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 413: b"Payload Too Large"}


class _Url:
    __slots__ = ("raw_query_string",)

    def __init__(self, query: str) -> None:
        self.raw_query_string = query


class Request:
    """What ``ProxyHandler`` reads of an aiohttp request, filled by the parser."""

    def __init__(self, conn: Connection, method: str, url: bytes,
                 headers: CIMultiDictProxy[str], keep_alive: bool) -> None:
        raw = url.decode("latin-1")
        path, _, query = raw.partition("?")
        self.method = method
        self.raw_path = raw
        self.path = path
        self.rel_url = _Url(query)
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None
        self.keep_alive = keep_alive
        self.conn = conn
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        while not self.complete:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        if self.size > self.conn.max_body:
            raise web.HTTPRequestEntityTooLarge(max_size=self.conn.max_body,
                                                actual_size=self.size)
        return b"".join(self.chunks)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One client connection: parses requests, runs them one after another, writes answers."""

    def __init__(self, app: web.Application, aiohttp_server: web.Server) -> None:
        gateway = app[GATEWAY]
        self.handler = gateway.proxy
        self.endpoints = gateway.proxy.endpoints
        self.max_body = gateway.settings.max_request_body_bytes
        self.aiohttp_server = aiohttp_server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.first: bytearray | None = bytearray()  # bytes read until the first head is whole
        self.url = b""
        self.raw_headers: list[tuple[str, str]] = []
        self.parsing: Request | None = None
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.handed_over = False

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.first is not None:
            self.first += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.handed_over:
                self._plain(400, b"Bad Request")
        if self.handed_over:
            return

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # -- llhttp callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.raw_headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.partition(b"?")[0].decode("latin-1")
        if self.first is not None:
            first, self.first = self.first, None
            if self.endpoints.match(method, path) is None:
                self._hand_over(bytes(first))
                raise _HandedOver
        request = Request(self, method, self.url, CIMultiDictProxy(CIMultiDict(self.raw_headers)),
                          self.parser.should_keep_alive())
        self.parsing = request
        self.queue.append(request)
        if self.task is None:
            self.task = self.loop.create_task(self._serve())

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.size += len(body)
        if request.size <= self.max_body:
            request.chunks.append(body)

    def on_message_complete(self) -> None:
        request = self.parsing
        assert request is not None
        request.complete = True
        request.wake()

    # -- serving --------------------------------------------------------------------------------

    async def _serve(self) -> None:
        while self.queue:
            request = self.queue[0]
            response = await self.handler.handle(cast(Any, request))
            self._write(cast(web.Response, response), request.keep_alive)
            self.queue.popleft()
            if not request.keep_alive:
                assert self.transport is not None
                self.transport.close()
                break
        self.task = None

    def _write(self, response: web.Response, keep_alive: bool) -> None:
        body = cast(bytes, response.body or b"")
        reason = response.reason.encode() if response.reason else _REASONS.get(
            response.status, b"")
        head = [b"HTTP/1.1 %d %s\r\n" % (response.status, reason)]
        for name, value in response.headers.items():
            if name.lower() != "content-length":
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if response.content_type and "Content-Type" not in response.headers:
            head.append(f"Content-Type: {response.content_type}\r\n".encode("latin-1"))
        head.append(b"Content-Length: %d\r\n" % len(body))
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        assert self.transport is not None
        self.transport.write(b"".join(head) + body)

    def _plain(self, status: int, reason: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                             % (status, reason))
        self.transport.close()

    def _hand_over(self, first: bytes) -> None:
        """The rest of this connection is the aiohttp application's."""
        assert self.transport is not None
        self.handed_over = True
        protocol = self.aiohttp_server()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(first)


class _HandedOver(Exception):
    """Stops this parser: the connection belongs to aiohttp now."""


async def main() -> None:
    settings = load_settings()
    sock = listen(settings.webserver_host, settings.webserver_port)
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    aiohttp_server = runner.server
    assert aiohttp_server is not None
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(app, aiohttp_server), sock=sock)
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("prototype %d listening on %s:%d", os.getpid(), settings.webserver_host,
             settings.webserver_port)
    await stop.wait()
    server.close()
    await runner.cleanup()


if __name__ == "__main__":
    import uvloop

    logging.basicConfig(level=logging.INFO)
    uvloop.run(main())
