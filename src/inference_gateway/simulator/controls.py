"""``POST /simulate/health``, ``/simulate/faults`` and ``/simulate/reset``: faults of the process.

These paths are the simulator's own (vLLM has none of them), for tests of health probes and of
replicas that fail: each answers with the state it leaves, a bad body with a 400.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

from inference_gateway.simulator.engine import Engine
from inference_gateway.simulator.faults import Faults
from inference_gateway.simulator.validation import SimError, json_response


def state(faults: Faults) -> dict[str, Any]:
    fault = faults.standing
    return {"health": faults.health,
            "faults": {"status": fault.status, "break_after": fault.break_after,
                       "stall_after": fault.stall_after, "count": faults.remaining}}


async def _spec(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise SimError(400, "the body is not JSON", "BadRequestError") from None


async def health(engine: Engine, request: web.Request) -> web.Response:
    """``{"status": 503}``: ``/health`` answers that status until set back or reset."""
    try:
        spec = await _spec(request)
        status = spec.get("status") if isinstance(spec, dict) else None
        if isinstance(status, bool) or not isinstance(status, int) \
                or not 200 <= status <= 599 or status not in set(HTTPStatus):
            raise SimError(400, "expected {\"status\": <an HTTP status from 200 to 599>}",
                           "BadRequestError", "status")
    except SimError as exc:
        return exc.response()
    engine.faults.health = status
    return json_response(state(engine.faults))


async def faults(engine: Engine, request: web.Request) -> web.Response:
    """An ``x_simulate`` object for every request that names none, until reset, or for the
    next ``count`` of them; ``{}`` for none."""
    try:
        engine.faults.stand(await _spec(request))
    except SimError as exc:
        return exc.response()
    return json_response(state(engine.faults))


async def reset(engine: Engine, request: web.Request) -> web.Response:
    """``/health`` back to 200, no fault for the process, stalled answers resumed."""
    engine.faults.reset()
    return json_response(state(engine.faults))


ROUTES = {"/simulate/health": health, "/simulate/faults": faults, "/simulate/reset": reset}
