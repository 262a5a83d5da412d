"""Faults on demand, for fault tests through the gateway: errors, broken and stalled answers.

The gateway forwards a client's body unchanged but none of its headers, so a request names its
fault in a body member of the simulator's own, ``x_simulate`` (vLLM ignores members it does not
know, and so does the simulator for every other one):

- ``{"status": 503}``: that status in vLLM's error shape, before any work is queued;
- ``{"break_after": N}``: a stream sends N events, then the connection is reset (no end of
  the stream); a whole answer is reset after N tokens were generated, before any byte is sent;
- ``{"stall_after": N}``: the same point, but nothing more is sent and the connection stays
  open, the request still running, until the client leaves or the faults are reset.

A body carries its fault to every replica the gateway tries, so a replica that fails all it is
sent is set for the process instead (``POST /simulate/faults``), as is ``/health``'s status.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from inference_gateway.simulator.validation import SimError

MEMBER = "x_simulate"
# vLLM's error types by status; any other status is named by its phrase, as vLLM does.
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 422: "UnprocessableEntityError",
               500: "InternalServerError", 501: "NotImplementedError",
               503: "ServiceUnavailableError"}


@dataclass(frozen=True)
class Fault:
    status: int | None = None
    break_after: int | None = None
    stall_after: int | None = None


NONE = Fault()
FAULT = web.RequestKey("fault", Fault)
PAUSED = web.RequestKey("paused", float)  # seconds a request's answer has stood stalled


class FaultError(SimError):
    """A status asked for with ``x_simulate``; the Messages API answers it in its own shape."""


class BrokenOff(Exception):
    """Raised once the connection is reset, to end the handler without an answer."""


def _count(spec: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = spec.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise SimError(400, f"{MEMBER}.{name} must be an integer {bound}", "BadRequestError",
                       MEMBER)
    return value


def read(spec: object, extra: tuple[str, ...] = ()) -> Fault:
    """A fault as a client writes it; anything else is a 400 naming the member."""
    names = ("status", "break_after", "stall_after", *extra)
    if not isinstance(spec, dict) or set(spec) - set(names):
        raise SimError(400, f"{MEMBER} must be an object with only {', '.join(names)}",
                       "BadRequestError", MEMBER)
    status = _count(spec, "status", 400, 599)
    if status is not None and status not in set(HTTPStatus):
        raise SimError(400, f"{MEMBER}.status {status} is not an HTTP status", "BadRequestError",
                       MEMBER)
    return Fault(status=status, break_after=_count(spec, "break_after", 0),
                 stall_after=_count(spec, "stall_after", 0))


def error(status: int) -> FaultError:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # a status no standard names, sent in a header
        phrase = "Error"
    return FaultError(status, f"Simulated error {status}", ERROR_TYPES.get(status, phrase))


class Faults:
    """What ``POST /simulate/...`` set for the whole process."""

    def __init__(self) -> None:
        self.health = 200
        self.standing = NONE  # the fault of every generation request ...
        self.remaining: int | None = None  # ... or of only this many more
        self._resumed = asyncio.Event()

    def of(self, body: dict[str, Any]) -> Fault:
        """The fault of a request: its own, else the process's standing one."""
        if MEMBER in body:
            return read(body[MEMBER])
        fault = self.standing
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self.standing, self.remaining = NONE, None
        return fault

    def stand(self, spec: object) -> None:
        fault = read(spec, ("count",))
        count = _count(spec, "count", 1) if isinstance(spec, dict) else None
        self.standing, self.remaining = fault, count

    def reset(self) -> None:
        """Health back to 200, no standing fault, and stalled answers go on."""
        self.health, self.standing, self.remaining = 200, NONE, None
        resumed, self._resumed = self._resumed, asyncio.Event()
        resumed.set()

    async def stall(self, request: web.BaseRequest) -> None:
        """Wait until the faults are reset (a client that leaves cancels the wait); the time
        stalled is kept with the request, whose clock stood still meanwhile."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            await self._resumed.wait()
        finally:
            request[PAUSED] = request.get(PAUSED, 0.0) + loop.time() - began


async def reset_connection(request: web.BaseRequest) -> BrokenOff:
    """Reset the client's connection (RST, not a clean close) once what was written has left
    the process, or after a second (a client that does not read misses what was not taken)."""
    transport = request.transport
    for _ in range(1000):
        if transport is None or transport.is_closing() or not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.001)
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return BrokenOff()


class FaultyStream(web.StreamResponse):
    """A stream that counts the events it writes and breaks or stalls where its fault says."""

    def __init__(self, request: web.Request, faults: Faults, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._request, self._faults = request, faults
        self._fault = request.get(FAULT, NONE)
        self._sent = 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._sent:  # a fault after no event strikes once the first one is ready
            await self._at_boundary()
        await super().write(data)
        self._sent += 1
        await self._at_boundary()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._fault.break_after is not None:
            raise await reset_connection(self._request)  # never a clean end
        await super().write_eof(data)

    async def _at_boundary(self) -> None:
        if self._fault.break_after == self._sent:
            raise await reset_connection(self._request)
        if self._fault.stall_after == self._sent:
            await self._faults.stall(self._request)
