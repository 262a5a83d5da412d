"""The aiohttp application: routes, the small handlers, and the request path's resources.

``/v1`` requests go to ``ProxyHandler``; the rest (models, probes, CORS pre-flight, unknown
paths) is answered here. Jobs that are not about HTTP (billing, maintenance) are started by the
worker (see ``server``), not by the application. It builds and wires every part (proxy,
admission, observability, portal), so it sits above them all rather than inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
import orjson
from aiohttp import web

from inference_gateway.admission.gate import Admission
from inference_gateway.admission.limits import LimitBook
from inference_gateway.db.migrate import pending_migrations
from inference_gateway.errors import error_response
from inference_gateway.metering.meter import Meter
from inference_gateway.observability.setup import Observability
from inference_gateway.portal import api as portal_api
from inference_gateway.proxy.endpoints import EndpointTable, dialect_of, is_normal, not_normal
from inference_gateway.proxy.handler import CORS_HEADERS, ProxyHandler
from inference_gateway.proxy.payload import Caps
from inference_gateway.proxy.relay import Relay
from inference_gateway.proxy.stored_responses import StoredResponses
from inference_gateway.routing.router import Router
from inference_gateway.routing.status import describe
from inference_gateway.routing.upkeep import Upkeep
from inference_gateway.settings import Settings
from inference_gateway.tenants.caches import Cache, TenantCaches
from inference_gateway.tenants.identity import bearer_token

log = logging.getLogger(__name__)

PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Max-Age": "86400",
}
READINESS_INTERVAL_SEC = 2.0


class Gateway:
    """Per-process state shared by the handlers."""

    def __init__(self, settings: Settings, meter: Meter | None = None) -> None:
        self.settings = settings
        self.relay = Relay(settings.upstream_connect_timeout_sec, settings.upstream_timeout_sec,
                           settings.upstream_max_connections)
        self.router = Router(settings.model_service_port_map, settings.model_rewrites,
                             on_retired=self.relay.retire)
        self.upkeep = Upkeep(self.router, self.relay.fetch, scrape=settings.scrape_replica_load)
        self.meter = meter or Meter(settings)
        self.limits = LimitBook()
        self.tenants = TenantCaches(settings, extra=[Cache(
            "limits", self.limits.refresh, settings.limits_refresh_interval_sec, "limits")])
        self.admission = Admission(settings, self.limits)
        self.stored = StoredResponses(settings.database_url)
        self.observability = Observability(settings, self.router, self.upkeep, self.meter,
                                           self.tenants)
        self.proxy = ProxyHandler(
            EndpointTable(settings.forwarded_endpoints), self.router, self.tenants, self.meter,
            self.relay, self.stored, Caps(settings.max_n, settings.max_tokens),
            settings.max_request_body_bytes, settings.prefix_affinity_chars,
            admission=self.admission, observers=self.observability.observers,
            traced=self.observability.trace_sampler)
        self.ready = False
        self.started = int(time.time())
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [self._model(name) for name in self.router.model_ids()],
            }
        )

    def _model(self, name: str) -> dict[str, object]:
        route = self.router.resolve(name)
        model: dict[str, object] = {
            "id": name, "object": "model", "created": self.started, "owned_by": "inference-gateway",
        }
        if route is not None and route.served_model != name:
            model["root"] = route.served_model
        return model

    # -- handlers -------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=self._models_body, content_type="application/json",
                            headers=CORS_HEADERS)

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.router.resolve(name) is None:
            return error_response(404, f"The model `{name}` does not exist.", param="model",
                                  code="model_not_found", headers=CORS_HEADERS)
        return web.Response(body=orjson.dumps(self._model(name)),
                            content_type="application/json", headers=CORS_HEADERS)

    async def ready_probe(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def lively(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def replicas(self, request: web.Request) -> web.Response:
        """The replica sets as this process sees them: for the admin credential, or for a
        client on this host when there is none."""
        token = self.settings.admin_token
        if token is not None:
            if not hmac.compare_digest(bearer_token(request.headers) or "", token):
                return error_response(401, "the admin token is required", code="invalid_api_key")
        elif request.remote not in ("127.0.0.1", "::1"):
            return error_response(403, "set ADMIN_TOKEN to read this from another host",
                                  code="admin_only")
        return web.Response(body=orjson.dumps(describe(self.router)),
                            content_type="application/json")

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=PREFLIGHT_HEADERS)

    async def not_found(self, request: web.Request) -> web.Response:
        if not is_normal(request.raw_path):
            return not_normal().response(CORS_HEADERS, dialect_of(request.path))
        return error_response(404, f"Unknown endpoint: {request.method} {request.path}",
                              code="unknown_url", headers=CORS_HEADERS,
                              dialect=dialect_of(request.path))

    # -- background -----------------------------------------------------------------------------

    async def _watch_readiness(self) -> None:
        """Ready once Postgres answers and every migration is applied; re-checked periodically."""
        conn: asyncpg.Connection | None = None
        while True:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.settings.database_url, timeout=5)
                missing = await pending_migrations(conn)
                if missing and self.ready:
                    log.error("not ready: migrations not applied: %s",
                              ", ".join(m.version for m in missing))
                self.ready = not missing
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if self.ready:
                    log.warning("not ready: Postgres unreachable: %s", exc)
                self.ready = False
                if conn is not None:
                    conn.terminate()
                    conn = None
            await asyncio.sleep(READINESS_INTERVAL_SEC)

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await self.meter.start()
        await self.tenants.start()
        await self.upkeep.refresh_sets()  # a model named by DNS has its replicas before serving
        self.upkeep.start()
        await self.observability.start()
        readiness = asyncio.create_task(self._watch_readiness(), name="readiness")
        try:
            yield
        finally:
            readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readiness
            await self.proxy.drain()
            await self.admission.close()
            await self.upkeep.close()
            await self.tenants.close()
            await self.stored.close()
            self.relay.close()
            await self.meter.close()
            await self.observability.close()  # after the meter: its last numbers


def create_app(settings: Settings, meter: Meter | None = None) -> web.Application:
    gateway = Gateway(settings, meter)
    app = web.Application(client_max_size=settings.max_request_body_bytes)
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(gateway.lifespan)
    portal_api.add_routes(app, settings)  # the usage API and /dashboard, before the catch-alls
    # The forwarded endpoints by their paths first: aiohttp finds a plain path in one lookup,
    # before it tries the patterns below one by one.
    for method, path in gateway.proxy.endpoints.exact:
        app.router.add_route(method, path, gateway.proxy.handle)
    # aiohttp looks routes up by their first path segment: /v1 needs its own pre-flight route.
    app.router.add_route("OPTIONS", "/v1/{tail:.*}", gateway.preflight)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/v1/models/{name:.+}", gateway.model)
    app.router.add_route("*", "/v1/{tail:.+}", gateway.proxy.handle)
    app.router.add_route("OPTIONS", "/{tail:.*}", gateway.preflight)
    app.router.add_get("/ready", gateway.ready_probe)
    app.router.add_get("/lively", gateway.lively)
    app.router.add_get("/status/replicas", gateway.replicas)
    app.router.add_get("/metrics", gateway.observability.page)
    app.router.add_route("*", "/{tail:.*}", gateway.not_found)
    return app


GATEWAY = web.AppKey("gateway", Gateway)
