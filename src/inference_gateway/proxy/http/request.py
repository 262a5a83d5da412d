"""A request as the handler reads it, its body filled in by the connection as it arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from inference_gateway.errors import GatewayError

if TYPE_CHECKING:
    from inference_gateway.proxy.http.response import StreamOut

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Request:
    """One parsed request head and its body; ``read`` waits for the body's last byte.

    The body is kept up to ``max_body`` bytes; past that ``read`` refuses it at once rather
    than wait for the rest. ``Expect: 100-continue`` is answered when the handler first reads,
    so a request refused on its head alone (a missing tenant, a length over the limit) never
    has its body sent.
    """

    __slots__ = (
        "_chunks", "_continue", "_error", "_waiter", "complete", "content_length", "discarding",
        "headers", "http11", "keep_alive", "max_body", "method", "on_wait", "path", "raw_path",
        "size", "stream", "too_large", "write",
    )

    def __init__(self, method: str, raw_path: str, headers: list[tuple[str, str]],
                 keep_alive: bool, http11: bool, max_body: int,
                 write: Callable[[bytes], None], on_wait: Callable[[bool], None]) -> None:
        self.method = method
        self.raw_path = raw_path
        self.path = raw_path.partition("?")[0]  # only plain paths are served here: no decoding
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(headers))
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.keep_alive = keep_alive
        self.http11 = http11
        self.max_body = max_body
        self.write = write  # to the client's socket
        self.on_wait = on_wait  # told when the handler starts (True) and stops waiting
        expect = self.headers.get("Expect", "")
        self._continue = http11 and expect.lower() == "100-continue"
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._error: GatewayError | None = None  # why the body will not come
        self.size = 0
        self.complete = False
        self.too_large = False
        self.discarding = False  # answered already: what still comes of the body is dropped
        self.stream: StreamOut | None = None  # the streamed answer, once one is opened

    async def read(self) -> bytes:
        if self._continue:
            self._continue = False
            if not self.complete:
                self.write(CONTINUE)
        while not (self.complete or self.too_large or self._error):
            self._waiter = asyncio.get_running_loop().create_future()
            self.on_wait(True)
            try:
                await self._waiter
            finally:
                self._waiter = None
                self.on_wait(False)
        if self.too_large:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body, actual_size=self.size)
        if self._error is not None:
            raise self._error
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    # -- fed by the connection ------------------------------------------------------------------

    @property
    def awaits_continue(self) -> bool:
        """The client waits for a 100 Continue before it sends the body; none was sent."""
        return self._continue and not self.complete

    @property
    def failed(self) -> bool:
        """The body stopped coming, or is malformed."""
        return self._error is not None

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.discarding:
            return
        if self.size > self.max_body:
            if not self.too_large:
                self.too_large = True
                self._chunks.clear()
                self._wake()
            return
        self._chunks.append(data)

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: GatewayError) -> None:
        """The body will not come whole (it stopped, or is malformed): ``read`` raises this."""
        self._error = error
        self._wake()

    def expire(self) -> None:
        self.fail(GatewayError(408, "the request body did not arrive in time",
                               code="request_timeout"))

    @property
    def waiting(self) -> bool:
        return self._waiter is not None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def is_chunked(headers: list[tuple[str, str]]) -> bool:
    return any(name.lower() == "transfer-encoding" and "chunked" in value.lower()
               for name, value in headers)


def rewritten_head(method: str, raw_path: str, version: str,
                   headers: list[tuple[str, str]]) -> bytes:
    """A parsed request head written back as bytes, for a parser that reads it again."""
    lines = [f"{method} {raw_path} HTTP/{version}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")
