"""Moves bytes between the client and the model server, and reports what it saw.

The relay knows nothing of tenants or databases: it returns an ``Outcome`` (status, usage,
timings, whether the client went away) and the caller turns that into a usage record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from inference_gateway.errors import error_body
from inference_gateway.sse import DONE, StreamFilter
from inference_gateway.usage import Usage, read_usage

# Response headers that describe one hop's connection, not the response itself.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Content-Encoding",
        "Date", "Server", "Proxy-Authenticate", "Trailer", "Upgrade",
    )
)
CLIENT_CLOSED = 499  # as nginx logs a request whose client went away before the answer


@dataclass(slots=True)
class Outcome:
    """What one relayed request looked like from the gateway."""

    status: int = 0
    usage: Usage | None = None
    disconnected: bool = False
    first_byte_at: float | None = None  # monotonic time of the first upstream byte
    reached_upstream: bool = False


def _copy_headers(upstream: aiohttp.ClientResponse, extra: dict[str, str]) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
    headers.update(extra)
    return headers


def _failure(exc: BaseException) -> tuple[int, str, str]:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return 504, "the model server did not answer in time", "upstream_timeout"
    return 502, f"the model server could not be reached: {exc}", "upstream_unreachable"


class Relay:
    """One pooled, keep-alive client session per process, shared by every request."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def forward(
        self,
        request: web.Request,
        url: str,
        body: bytes,
        outcome: Outcome,
        response_headers: dict[str, str],
        stream_filter: StreamFilter | None,
        finish: Callable[[], None],
    ) -> web.StreamResponse:
        """Send ``body`` to ``url`` and relay the answer; ``outcome`` is filled as it goes.

        ``finish`` is called once the outcome is complete and before the client has the last
        byte of the answer, so whatever it records cannot be lost to a crash after the client
        was answered.
        """
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        try:
            upstream = await self.session.post(url, data=body, headers=headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            status, message, code = _failure(exc)
            outcome.status = status
            return _json(status, error_body(status, message, code=code), response_headers)
        outcome.reached_upstream = True
        outcome.first_byte_at = time.monotonic()
        try:
            is_sse = upstream.content_type == "text/event-stream"
            if stream_filter is not None and is_sse and upstream.status == 200:
                return await self._stream(request, upstream, outcome, response_headers,
                                          stream_filter, finish)
            try:
                data = await upstream.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                status, message, code = _failure(exc)
                outcome.status = status
                return _json(status, error_body(status, message, code=code), response_headers)
            outcome.status = upstream.status
            if upstream.status < 300:
                outcome.usage = read_usage(data)
            finish()  # the response is sent after the handler returns
            return web.Response(status=upstream.status, body=data,
                                headers=_copy_headers(upstream, response_headers))
        finally:
            # On any early exit (client gone, error) this closes the upstream connection, so
            # the model server stops generating; after a full read it returns to the pool.
            if upstream.content.is_eof():
                upstream.release()
            else:
                upstream.close()

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        outcome: Outcome,
        response_headers: dict[str, str],
        stream_filter: StreamFilter,
        finish: Callable[[], None],
    ) -> web.StreamResponse:
        outcome.status = upstream.status
        response = web.StreamResponse(
            status=upstream.status, headers=_copy_headers(upstream, response_headers)
        )
        try:
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    out = stream_filter.feed(chunk)
                    if out:
                        await response.write(out)
                    outcome.usage = stream_filter.usage
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                if isinstance(exc, ConnectionResetError):
                    raise
                # The model server broke off mid-stream: tell the client in-band, as vLLM does.
                status, message, code = _failure(exc)
                outcome.status = status
                await response.write(
                    b"data: " + error_body(status, message, code=code) + b"\n\ndata: [DONE]\n\n"
                )
            rest = stream_filter.finish()
            if rest:
                await response.write(rest)
            outcome.usage = stream_filter.usage
            finish()
            await response.write_eof(DONE if stream_filter.done else b"")
        except ConnectionResetError:
            # The client went away: outcome.usage still holds the counts of the last chunk
            # it was sent.
            outcome.disconnected = True
        return response


def _json(status: int, body: bytes, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json",
                        headers=headers)
