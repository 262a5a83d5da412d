"""Who created a stored response, so that only that tenant can read, cancel or continue it.

vLLM keeps Responses (with ``VLLM_ENABLE_RESPONSES_API_STORE``) under their id and serves them to
anyone who names the id. The gateway answers ``GET /v1/responses/{id}``, ``.../cancel`` and a
``previous_response_id`` only for the tenant whose request created that response, and sends them
to the model server that holds it. The owner is the usage row of the creating request
(``upstream_id``); the ones this process created recently are also kept in memory, so a client
need not wait for its row to reach Postgres. These are rare requests: a database lookup on them
costs nothing on the paths that generate tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg

from inference_gateway.errors import GatewayError
from inference_gateway.tenants.tenant import Tenant

log = logging.getLogger(__name__)

REMEMBERED = 10_000  # responses this process created, kept in memory
QUERY_TIMEOUT_SEC = 5.0
_OWNER = """
SELECT organization_id, instance_id, model, replica
  FROM inference.requests
 WHERE upstream_id = $1 AND endpoint = '/v1/responses' AND status = 200
 ORDER BY completed_at
 LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class Owner:
    tenant: Tenant
    model: str  # the served model
    replica: str | None  # the model server that holds the response


class StoredResponses:
    """Owners of stored responses, from memory first, then from the audit table."""

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._recent: OrderedDict[str, Owner] = OrderedDict()
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    def remember(self, response_id: str, owner: Owner) -> None:
        self._recent[response_id] = owner
        if len(self._recent) > REMEMBERED:
            self._recent.popitem(last=False)

    async def owner(self, response_id: str) -> Owner | None:
        """The owner of a response, or None if no metered request created it."""
        known = self._recent.get(response_id)
        if known is not None:
            return known
        try:
            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._database_url, min_size=0, max_size=2, timeout=QUERY_TIMEOUT_SEC,
                        command_timeout=QUERY_TIMEOUT_SEC)
            row = await self._pool.fetchrow(_OWNER, response_id)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("cannot look up the owner of response %s: %s", response_id, exc)
            raise GatewayError(503, "cannot check who owns this response right now; retry "
                               "later", code="owner_lookup_unavailable") from None
        if row is None:
            return None
        return Owner(Tenant(row["organization_id"], row["instance_id"]), row["model"],
                     row["replica"])

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except Exception:
                pool.terminate()


def not_found(response_id: str, param: str) -> GatewayError:
    """What a tenant hears about another tenant's response: the same as for none at all."""
    return GatewayError(404, f"Response with id '{response_id}' not found.", param=param,
                        code="response_not_found")
