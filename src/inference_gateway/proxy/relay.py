"""Moves bytes between the client and the model server, and reports what it saw.

The relay knows nothing of tenants or databases: it returns an ``Outcome`` (status, usage,
timings, whether the client went away) and the caller turns that into a usage record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from inference_gateway.metering.readers import Usage, read_usage
from inference_gateway.proxy.errors import error_body
from inference_gateway.proxy.sse import DONE, StreamFilter
from inference_gateway.proxy.upstream import Pool, Response, UpstreamError, UpstreamTimeout

# Response headers that describe one hop's connection, not the response itself.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Content-Encoding",
        "Date", "Server", "Proxy-Authenticate", "Trailer", "Upgrade",
    )
)
_REQUEST_HEADERS = [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]
CLIENT_CLOSED = 499  # as nginx logs a request whose client went away before the answer


@dataclass(slots=True)
class Outcome:
    """What one relayed request looked like from the gateway."""

    status: int = 0
    usage: Usage | None = None
    disconnected: bool = False
    first_byte_at: float | None = None  # monotonic time the upstream's answer began


def _copy_headers(upstream: Response, extra: dict[str, str]) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in upstream.headers if k.lower() not in _HOP_BY_HOP]
    headers.extend(extra.items())
    return headers


def _failure(exc: UpstreamError) -> tuple[int, str, str]:
    if isinstance(exc, UpstreamTimeout):
        return 504, "the model server did not answer in time", "upstream_timeout"
    return 502, f"the model server could not be reached: {exc}", "upstream_unreachable"


class Relay:
    """One pool of keep-alive connections per model server, shared by a process's requests."""

    def __init__(self, upstreams: Iterable[str], connect_timeout: float, read_timeout: float,
                 max_idle: int = 1000) -> None:
        self.pools = {
            url: Pool(url, connect_timeout, read_timeout, max_idle) for url in upstreams
        }
        # What each server appends to a stream's usage chunk (see StreamFilter's trailer).
        self.trailers: dict[str, bytes] = {}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    async def forward(
        self,
        request: web.Request,
        upstream: str,
        body: bytes,
        outcome: Outcome,
        response_headers: dict[str, str],
        stream_filter: StreamFilter | None,
        finish: Callable[[], None],
    ) -> web.StreamResponse:
        """POST ``body`` to the same path on ``upstream``; relay the answer, filling ``outcome``.

        ``finish`` is called once the outcome is complete and before the client has the last
        byte of the answer, so whatever it records cannot be lost to a crash after the client
        was answered.
        """
        try:
            answer = await self.pools[upstream].post(request.path_qs, body, _REQUEST_HEADERS)
        except UpstreamError as exc:
            status, message, code = _failure(exc)
            outcome.status = status
            return _json(status, error_body(status, message, code=code), response_headers)
        outcome.first_byte_at = time.monotonic()
        try:
            if (stream_filter is not None and answer.status == 200
                    and answer.content_type == "text/event-stream"):
                stream_filter.trailer = self.trailers.get(upstream)
                try:
                    return await self._stream(request, answer, outcome, response_headers,
                                              stream_filter, finish)
                finally:
                    if stream_filter.learned is not None:
                        self.trailers[upstream] = stream_filter.learned
            try:
                data = await answer.read()
            except UpstreamError as exc:
                status, message, code = _failure(exc)
                outcome.status = status
                return _json(status, error_body(status, message, code=code), response_headers)
            outcome.status = answer.status
            if answer.status < 300:
                outcome.usage = read_usage(data)
            finish()  # the response is sent after the handler returns
            return web.Response(status=answer.status, reason=answer.reason or None, body=data,
                                headers=_copy_headers(answer, response_headers))
        finally:
            # After a whole body this returns the connection to the pool; on any early exit
            # (client gone, error) it closes it, which makes vLLM abort the generation.
            answer.release()

    async def _stream(
        self,
        request: web.Request,
        answer: Response,
        outcome: Outcome,
        response_headers: dict[str, str],
        stream_filter: StreamFilter,
        finish: Callable[[], None],
    ) -> web.StreamResponse:
        outcome.status = answer.status
        response = web.StreamResponse(status=answer.status,
                                      headers=_copy_headers(answer, response_headers))
        try:
            await response.prepare(request)
            try:
                async for chunk in answer.iter_chunks():
                    out = stream_filter.feed(chunk)
                    if out:
                        await response.write(out)
                    outcome.usage = stream_filter.usage
            except UpstreamError as exc:
                # The model server broke off mid-stream: tell the client in-band, as vLLM does.
                status, message, code = _failure(exc)
                outcome.status = status
                await response.write(
                    stream_filter.finish()
                    + b"data: " + error_body(status, message, code=code) + b"\n\n" + DONE
                )
                outcome.usage = stream_filter.usage
                finish()
                await response.write_eof()
                return response
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
