"""The simulator's routes, shaped like vLLM 0.32's OpenAI-compatible server.

Every JSON body, stream event and error has the members of vLLM 0.32.0's, in the same order
(``tests/e2e/test_simulator_conformance.py`` checks this against the real server). What differs
is the text, the token counts (see ``tokens``) and one default: without a token limit the
simulator generates ``default_max_tokens`` tokens, where vLLM fills the context. One simulator
serves what vLLM splits between a generation server and a pooling server.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from inference_gateway.simulator import chat, completions, controls, messages, pooling, tokens
from inference_gateway.simulator.config import SimConfig
from inference_gateway.simulator.engine import VLLM_VERSION, Engine
from inference_gateway.simulator.faults import BrokenOff
from inference_gateway.simulator.metrics import CONTENT_TYPE, exposition
from inference_gateway.simulator.responses import Responses
from inference_gateway.simulator.validation import SimError, json_response

__all__ = ["SimConfig", "create_app"]

_RESPONSE_PATHS = re.compile(r"/v1/responses/[^/]+(/cancel)?")
Handler = Callable[[Engine, web.Request], Awaitable[web.StreamResponse]]

POSTS: dict[str, Handler] = {
    "/v1/chat/completions": chat.chat,
    "/v1/chat/completions/batch": chat.batch,
    "/v1/completions": completions.completions,
    "/v1/messages": messages.messages,
    "/v1/messages/count_tokens": messages.count_tokens,
    "/v1/embeddings": pooling.embeddings,
    "/v1/score": pooling.score,
    "/score": pooling.score,
    "/v1/rerank": pooling.rerank,
    "/rerank": pooling.rerank,
}


async def models(engine: Engine, request: web.Request) -> web.Response:
    data: list[dict[str, Any]] = [
        {"id": m, "object": "model", "created": engine.started, "owned_by": "vllm",
         "root": m, "parent": None, "max_model_len": engine.config.max_model_len,
         "permission": [{
             "id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
             "created": engine.started, "allow_create_engine": False,
             "allow_sampling": True, "allow_logprobs": True,
             "allow_search_indices": False, "allow_view": True,
             "allow_fine_tuning": False, "organization": "*", "group": None,
             "is_blocking": False,
         }]}
        for m in engine.config.models
    ]
    return json_response({"object": "list", "data": data})


async def tokenize(engine: Engine, request: web.Request) -> web.Response:
    try:
        body = await engine.body(request)
        engine.model(body)
    except SimError as exc:
        return exc.response()
    if isinstance(body.get("messages"), list):
        ids = tokens.chat_prompt_ids(body["messages"])
    else:
        ids = tokens.ids(str(body.get("prompt", "")))
    return json_response({"count": len(ids), "max_model_len": engine.config.max_model_len,
                          "tokens": ids, "token_strs": None})


async def version(engine: Engine, request: web.Request) -> web.Response:
    return json_response({"version": VLLM_VERSION})


async def health(engine: Engine, request: web.Request) -> web.Response:
    return web.Response(status=engine.faults.health)


async def metrics(engine: Engine, request: web.Request) -> web.Response:
    return web.Response(body=exposition(engine.cores, engine.created).encode(),
                        headers={"Content-Type": CONTENT_TYPE})


@web.middleware
async def quiet_breaks(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       ) -> web.StreamResponse:
    """An answer broken off on purpose ends without an error logged; nothing more is sent."""
    try:
        return await handler(request)
    except BrokenOff:
        return web.Response()


def not_found(known: set[str]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """FastAPI's answers for unknown paths and for known paths with another method."""
    async def answer(request: web.Request) -> web.Response:
        if request.path in known or _RESPONSE_PATHS.fullmatch(request.path):
            return web.Response(status=405, body=b'{"detail":"Method Not Allowed"}',
                                content_type="application/json")
        return web.Response(status=404, body=b'{"detail":"Not Found"}',
                            content_type="application/json")
    return answer


def create_app(config: SimConfig) -> web.Application:
    engine = Engine(config)
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[quiet_breaks])

    def bind(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await handler(engine, request)
        return handle

    for path, handler in {**POSTS, **controls.ROUTES}.items():
        app.router.add_post(path, bind(handler))
    gets: dict[str, Handler] = {"/v1/models": models, "/version": version, "/health": health,
                                "/metrics": metrics}
    for path, handler in gets.items():
        app.router.add_get(path, bind(handler), allow_head=False)
    app.router.add_post("/tokenize", bind(tokenize))
    responses = Responses(engine)
    app.router.add_post("/v1/responses", responses.create)
    app.router.add_get("/v1/responses/{response_id}", responses.retrieve, allow_head=False)
    app.router.add_post("/v1/responses/{response_id}/cancel", responses.cancel)
    known = {*POSTS, *controls.ROUTES, *gets, "/tokenize", "/v1/responses"}
    app.router.add_route("*", "/{tail:.*}", not_found(known))
    return app
