"""The listening socket, the connections' deadlines, and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from inference_gateway.proxy.handler import Incoming
from inference_gateway.proxy.http.connection import Connection
from inference_gateway.proxy.relay import Answer, OpenStream


class Handler(Protocol):
    """What answers a request (``ProxyHandler``)."""

    def serve(self, request: Incoming, open_stream: OpenStream) -> Awaitable[Answer]: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_body: int  # bytes of request body; more gets a 413
    head_timeout: float = 30.0  # from a request's first byte to the end of its head
    body_timeout: float = 60.0  # between two pieces of a body the handler waits for
    idle_timeout: float = 75.0  # a keep-alive connection with nothing to do (as aiohttp's)
    max_pipelined: int = 16  # requests read ahead of their answers before reading stops


class ServerCore:
    """Serves ``native`` requests with ``handler``; gives the rest to ``app_protocol``'s."""

    def __init__(self, handler: Handler, native: Callable[[str, str], bool],
                 app_protocol: Callable[[], asyncio.Protocol], limits: Limits,
                 on_malformed: Callable[[], object] = lambda: None) -> None:
        self.handler = handler
        self.native = native  # (method, path) -> whether this core answers it
        self.app_protocol = app_protocol
        self.limits = limits
        self.on_malformed = on_malformed  # counts what is not HTTP (the metrics own the count)
        self.connections: set[Connection] = set()
        self.closing = False
        self._none_left = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), sock=sock)
        self._watchdog = loop.create_task(self._watch())

    def forget(self, conn: Connection) -> None:
        """A connection closed, or was handed to the aiohttp application."""
        self.connections.discard(conn)
        if not self.connections and self.closing:
            self._none_left.set()

    async def close(self, grace: float) -> None:
        """Stop accepting, close idle connections, let answers in progress finish (for up to
        ``grace`` seconds), then cut what is left: those requests are recorded as the
        client's disconnects."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if not self.connections:
            self._none_left.set()
        for conn in list(self.connections):
            conn.shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._none_left.wait()
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    async def _watch(self) -> None:
        """One timer for every connection's deadline, rather than a timer per request."""
        limits = self.limits
        interval = min(1.0, limits.head_timeout / 4, limits.body_timeout / 4,
                       limits.idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.deadline and now > conn.deadline:
                    conn.expire()
