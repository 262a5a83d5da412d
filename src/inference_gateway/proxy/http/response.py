"""Writing answers: a whole one in a single write, or a stream in chunks that waits while the
client's socket is full (so a slow reader slows the model server's stream, not our memory)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol, cast

from aiohttp import web

from inference_gateway.proxy.relay import Whole

REASONS = {status.value: status.phrase for status in HTTPStatus}
_SKIP = frozenset({"content-length", "transfer-encoding", "connection"})


class Writer(Protocol):
    """The connection, as an answer writes to it."""

    def write(self, data: bytes) -> None: ...  # raises ConnectionResetError once it is gone

    async def drain(self) -> None: ...


class Clock:
    """The ``Date`` header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


CLOCK = Clock()


def head(status: int, reason: str | None, headers: Iterable[tuple[str, str]], *,
         length: int | None, chunked: bool, close: bool) -> bytes:
    """A response head; ``length`` None and not ``chunked``: the body ends with the connection.

    ``headers`` must leave out the framing ones (length, transfer encoding, connection), which
    are written here: the relay's are without them already.
    """
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers])
    if length is not None:
        framing = b"Content-Length: %d\r\n" % length
    else:
        framing = b"Transfer-Encoding: chunked\r\n" if chunked else b""
    if close:
        framing += b"Connection: close\r\n"
    return b"HTTP/1.1 %d %b\r\n%b%bDate: %b\r\n\r\n" % (
        status, (reason or REASONS.get(status, "Unknown")).encode("latin-1"),
        lines.encode("latin-1"), framing, CLOCK.date())


def whole(answer: Whole | web.Response, *, close: bool) -> bytes:
    """A whole answer as bytes: the relay's as it is, or one the gateway made with aiohttp."""
    if isinstance(answer, Whole):
        status, reason, headers, body = answer.status, answer.reason, answer.headers, answer.body
    else:
        status, reason, body = answer.status, answer.reason, cast(bytes, answer.body or b"")
        headers = [(name, value) for name, value in answer.headers.items()
                   if name.lower() not in _SKIP]
    return head(status, reason, headers, length=len(body), chunked=False, close=close) + body


def plain(status: int, text: str) -> bytes:
    """A short plain-text answer that closes the connection (requests that are not HTTP)."""
    body = f"{status} {REASONS.get(status, '')}: {text}\n".encode("latin-1", "replace")
    return head(status, None, [("Content-Type", "text/plain; charset=utf-8")],
                length=len(body), chunked=False, close=True) + body


class StreamOut:
    """A streamed answer (``relay.Stream``): chunked on HTTP/1.1, closed-delimited on 1.0."""

    __slots__ = ("_chunked", "_out", "ended")

    def __init__(self, out: Writer, chunked: bool) -> None:
        self._out = out
        self._chunked = chunked
        self.ended = False

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self._out.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        await self._out.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self.ended:
            return
        if self._chunked:
            self._out.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data
                            else b"0\r\n\r\n")
        elif data:
            self._out.write(data)
        self.ended = True
        await self._out.drain()
