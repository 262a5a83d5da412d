"""A lean Redis connection for the two scripts every limited request runs.

redis-py spends 200-250 µs of CPU on a call of a script with thirty arguments (each argument
encoded on its own, then its pool, retries and metrics recorder): more than the rest of the
request path. This speaks just enough RESP2 over one connection per process: commands are
written as they come, and answers, which Redis sends in the same order, are matched to them.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

Orphan = Callable[[Any], None]


def _adopt(orphan: Orphan, future: asyncio.Future[Any]) -> None:
    """Hand the answer of a command whose caller left to ``orphan`` (an error: nothing ran)."""
    if not future.cancelled() and future.exception() is None:
        orphan(future.result())


class _Incomplete(Exception):
    """The buffer ends inside an answer."""


def encode(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse(buf: bytes | bytearray, at: int = 0) -> tuple[Any, int]:
    """One answer from ``at``: its value (an error reply as an exception) and where it ends."""
    end = buf.find(b"\r\n", at)
    if end < 0:
        raise _Incomplete
    kind, line, at = buf[at], bytes(buf[at + 1:end]), end + 2
    if kind == 0x3A:  # ':' an integer
        return int(line), at
    if kind == 0x2B:  # '+' a simple string
        return line.decode(), at
    if kind == 0x2D:  # '-' an error
        message = line.decode(errors="replace")
        return (NoScriptError if message.startswith("NOSCRIPT") else ResponseError)(message), at
    if kind == 0x24:  # '$' a bulk string
        size = int(line)
        if size < 0:
            return None, at
        if len(buf) < at + size + 2:
            raise _Incomplete
        return bytes(buf[at:at + size]), at + size + 2
    if kind == 0x2A:  # '*' an array
        count = int(line)
        if count < 0:
            return None, at
        items = []
        for _ in range(count):
            item, at = parse(buf, at)
            items.append(item)
        return items, at
    raise ConnectionError(f"Redis sent something that is not RESP: {bytes(buf[at - 2:end])!r}")


class _Connection(asyncio.Protocol):
    """One connection: commands written in order, answers matched to them in order.

    Commands written in one turn of the event loop leave in one write (at c=32 a dozen
    admissions share a system call), unless one must leave at once (``flush``). One timer per
    connection, not one per command, watches the oldest command waiting for its answer.
    """

    def __init__(self, gone: Callable[[_Connection], None], timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # and when it left
        self.timeout = timeout
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._gone = gone
        self._loop = asyncio.get_running_loop()
        self._watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def write(self, command: bytes, future: asyncio.Future[Any], *, now: bool = False) -> None:
        """Queue ``command``; its answer goes to ``future``. ``now``: write it (and what was
        queued before it) before returning."""
        self.waiting.append((future, self._loop.time()))
        if not self._out and not now:
            self._loop.call_soon(self.flush)
        self._out.append(command)
        if now:
            self.flush()
        if self._watch is None:
            self._watch = self._loop.call_later(self.timeout, self._check)

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _check(self) -> None:
        """Close the connection when its oldest command has waited too long."""
        self._watch = None
        if not self.waiting:
            return
        late = self.waiting[0][1] + self.timeout - self._loop.time()
        if late <= 0:
            self.close(TimeoutError("Redis did not answer in time"))
        else:
            self._watch = self._loop.call_later(late, self._check)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        at = 0
        try:
            while self.waiting and at < len(self._buffer):
                value, at_next = parse(self._buffer, at)
                at = at_next
                future, _ = self.waiting.popleft()
                if future.done():  # its caller gave up; the answer is dropped
                    continue
                if isinstance(value, Exception):
                    future.set_exception(value)
                else:
                    future.set_result(value)
        except _Incomplete:
            pass
        except ConnectionError as exc:
            self.close(exc)
            return
        del self._buffer[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(ConnectionError(f"Redis closed the connection ({exc or 'end of stream'})"))

    def close(self, exc: Exception) -> None:
        """Fail what waits: later answers could no longer be matched to their commands."""
        self._gone(self)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._out.clear()
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class Resp:
    """One pipelined connection to one Redis server, opened when first needed."""

    def __init__(self, host: str, port: int, db: int, username: str | None,
                 password: str | None, timeout: float) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._opening = asyncio.Lock()

    async def call(self, *args: bytes | str | int, orphan: Orphan | None = None) -> Any:
        """Send a command and wait for its answer. ``orphan``: should the caller be cancelled
        once the command is written, its answer goes there when it comes."""
        conn = self._conn or await self._open()
        return await self._send(conn, encode(*args), orphan)

    async def script(self, sha: str, source: bytes | str, keys: list[str],
                     args: list[str | int], orphan: Orphan | None = None) -> Any:
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args, orphan=orphan)
        except NoScriptError:  # a Redis that restarted, or was flushed: load it again
            await self.call("SCRIPT", "LOAD", source)
            return await self.call("EVALSHA", sha, len(keys), *keys, *args, orphan=orphan)

    def send(self, *args: bytes | str | int) -> asyncio.Future[Any] | None:
        """Write a command now, on the open connection, and return its answer to come; None
        when no connection is open (``call`` would have to open one first)."""
        conn = self._conn
        if conn is None or conn.transport is None or conn.transport.is_closing():
            return None
        future = asyncio.get_running_loop().create_future()
        conn.write(encode(*args), future, now=True)
        return future

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close(ConnectionError("the client was closed"))

    async def _send(self, conn: _Connection, command: bytes, orphan: Orphan | None = None) -> Any:
        future = asyncio.get_running_loop().create_future()
        conn.write(command, future)  # the connection's timer fails it, should Redis not answer
        if orphan is None:
            return await future
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(functools.partial(_adopt, orphan))
            raise

    async def _open(self) -> _Connection:
        async with self._opening:
            if self._conn is not None:
                return self._conn
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._forget, self.timeout), self.host, self.port)
            try:
                if self.password is not None:
                    auth = ("AUTH", self.username, self.password) if self.username \
                        else ("AUTH", self.password)
                    await self._send(conn, encode(*auth))
                if self.db:
                    await self._send(conn, encode("SELECT", self.db))
            except BaseException as exc:
                conn.close(ConnectionError(f"Redis refused the connection's set-up: {exc}"))
                raise
            self._conn = conn
            return conn

    def _forget(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
