"""Writing answers: a whole one in a single write, or a stream in chunks that waits while the
client's socket is full (so a slow reader slows the model server's stream, not our memory)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol, cast

from aiohttp import web

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
    """A response head; ``length`` None and not ``chunked``: the body ends with the connection."""
    lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, 'Unknown')}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers if name.lower() not in _SKIP]
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    elif chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    if close:
        lines.append("Connection: close\r\n")
    return "".join(lines).encode("latin-1") + b"Date: " + CLOCK.date() + b"\r\n\r\n"


def whole(response: web.Response, *, close: bool, with_body: bool = True) -> bytes:
    """An aiohttp ``Response`` as bytes (the handler builds those for every whole answer)."""
    body = cast(bytes, response.body or b"")
    return head(response.status, response.reason, response.headers.items(), length=len(body),
                chunked=False, close=close) + (body if with_body else b"")


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
