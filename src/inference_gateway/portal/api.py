"""The usage API's routes: usage in the shape of OpenAI's usage API, costs, and what operators
need beside them. It is the read side, with a small connection pool of its own: nothing here
is on the /v1 proxy's path, and every answer is read from the rollups (see ``usage_store``).

    GET /v1/organization/usage/completions      OpenAI's usage API, generation endpoints
    GET /v1/organization/usage/embeddings       the same, pooling endpoints
    GET /v1/organization/costs                  OpenAI's costs API, from MODEL_PRICES
    GET /v1/organization/usage/organizations    the organizations using most (admin only)
    GET /v1/organization/usage/scope            what the credential may read
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import asyncpg
import orjson
from aiohttp import web

from inference_gateway.errors import GatewayError
from inference_gateway.portal import dashboard
from inference_gateway.portal.access import Viewer, admin_only, identify, scoped, token_of
from inference_gateway.portal.pages import cost_page, ranking, usage_page
from inference_gateway.portal.params import (
    GROUP_ORDER,
    Family,
    Params,
    cost_query,
    ranking_query,
    usage_query,
)
from inference_gateway.portal.usage_store import Selection, fetch_usage
from inference_gateway.settings import Settings

log = logging.getLogger(__name__)

POOL_SIZE = 4
STATEMENT_TIMEOUT_MS = 10_000
CLOSE_TIMEOUT_SEC = 2.0

Reader = Callable[[web.Request, asyncpg.Connection, Viewer], Awaitable[dict[str, object]]]


class UsageApi:
    """The handlers, over one connection pool per process that connects on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tail = timedelta(seconds=settings.usage_fresh_tail_sec)
        self._pool: asyncpg.Pool | None = None

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        self._pool = await asyncpg.create_pool(  # no connection yet: min_size=0
            self.settings.database_url, min_size=0, max_size=POOL_SIZE, timeout=5,
            server_settings={
                "statement_timeout": str(STATEMENT_TIMEOUT_MS),
                # Small, index-bound queries: compiling a plan or starting parallel workers
                # costs more than running one; an operator's sums by organization fit in memory.
                "jit": "off", "max_parallel_workers_per_gather": "0", "work_mem": "32MB",
                "application_name": "inference-gateway usage api"})
        yield
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_SEC)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    def route(self, read: Reader) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A handler: the credential, then ``read``; every failure an OpenAI-shaped error."""

        async def handle(request: web.Request) -> web.Response:
            try:
                token = token_of(request.headers)
                assert self._pool is not None, "the application has not started"
                async with self._pool.acquire() as conn:
                    viewer = await identify(conn, token, self.settings.admin_token)
                    body = await read(request, conn, viewer)
            except GatewayError as exc:
                return exc.response()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("usage API: database unavailable: %s: %s", type(exc).__name__, exc)
                return GatewayError(503, "Usage is unavailable: the database cannot be reached; "
                                    "retry later.", code="database_unavailable").response()
            except Exception:  # a bug: the client still gets an error it can read
                log.exception("usage API: %s %s failed", request.method, request.path)
                return GatewayError(500, "The usage API failed; the gateway's log says why.",
                                    code="internal_error").response()
            return web.Response(body=orjson.dumps(body), content_type="application/json",
                                headers={"Cache-Control": "no-store"})

        return handle

    def usage(self, family: Family) -> Reader:
        async def read(request: web.Request, conn: asyncpg.Connection, viewer: Viewer
                       ) -> dict[str, object]:
            query = scoped(viewer, usage_query(Params(request.query), int(time.time())))
            sel = Selection(family, query.page_start, query.page_end(), query.width,
                            query.group_by, query.filters)
            return usage_page(family, query, await fetch_usage(conn, sel, self.tail))

        return read

    async def costs(self, request: web.Request, conn: asyncpg.Connection, viewer: Viewer
                    ) -> dict[str, object]:
        query = scoped(viewer, cost_query(Params(request.query), int(time.time())))
        groups = tuple(c for c in GROUP_ORDER if c in query.group_by or c == "model")
        sel = Selection(None, query.page_start, query.page_end(), query.width, groups,
                        query.filters)
        rows = await fetch_usage(conn, sel, self.tail)
        return cost_page(query, rows, self.settings.model_prices, self.settings.price_currency)

    async def organizations(self, request: web.Request, conn: asyncpg.Connection,
                            viewer: Viewer) -> dict[str, object]:
        if not viewer.admin:
            raise admin_only("The usage of every organization")
        start, end, limit = ranking_query(Params(request.query), int(time.time()))
        sel = Selection(None, start, end, None, ("organization_id",), rank=limit + 1)
        return ranking(await fetch_usage(conn, sel, self.tail), limit)

    async def scope(self, request: web.Request, conn: asyncpg.Connection, viewer: Viewer
                    ) -> dict[str, object]:
        Params(request.query).finish()
        return viewer.describe()


def add_routes(app: web.Application, settings: Settings) -> None:
    """The usage API and the dashboard; call before the catch-all /v1 route is added."""
    api = UsageApi(settings)
    app.cleanup_ctx.append(api.lifespan)
    base = "/v1/organization"
    app.router.add_get(f"{base}/usage/completions", api.route(api.usage("completions")))
    app.router.add_get(f"{base}/usage/embeddings", api.route(api.usage("embeddings")))
    app.router.add_get(f"{base}/costs", api.route(api.costs))
    app.router.add_get(f"{base}/usage/organizations", api.route(api.organizations))
    app.router.add_get(f"{base}/usage/scope", api.route(api.scope))
    dashboard.add_routes(app)
