"""uvicorn (httptools, uvloop) with a bare ASGI application that forwards each POST through the
gateway's upstream client: the floor for an ASGI server in front of the same client.

    python bench/server_core_asgi.py PORT BACKEND_URL

No tenant, no metering, no metrics: it reads the body, sends it upstream over a keep-alive pool,
reads the answer and writes it back. ``GET /ready`` answers 200, for the benchmark's start-up.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from inference_gateway.proxy.upstream import Pool

Scope = dict[str, Any]
Message = dict[str, Any]
HEADERS = [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]


def make_app(backend: str) -> Callable[..., Awaitable[None]]:
    pool: Pool | None = None

    async def app(scope: Scope, receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        nonlocal pool
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ready\n"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if pool is None:
            pool = Pool(backend, 5.0, 600.0)
        answer = await pool.request("POST", scope["path"], body, HEADERS)
        data = await answer.read()
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": [(b"content-type", answer.content_type.encode())]})
        await send({"type": "http.response.body", "body": data})

    return app


if __name__ == "__main__":
    port, backend = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(make_app(backend), host="127.0.0.1", port=port, http="httptools",
                loop="uvloop", access_log=False, log_level="warning", lifespan="off")
