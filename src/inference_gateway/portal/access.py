"""Who may read which usage: a tenant's API key its own instance, an admin credential all of it.

Usage needs a credential: ``Authorization: Bearer <token>`` (or ``x-api-key``), the token being
an API key or ``ADMIN_TOKEN``. The tenant headers are never enough, whatever ``AUTH_MODE`` says:
anyone can set a header. Keys are looked up in Postgres on each call (one indexed read beside
the usage query), so a revoked key stops reading usage at once; the /v1 proxy never does this.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, replace

import asyncpg

from inference_gateway.errors import GatewayError
from inference_gateway.portal.params import UsageQuery
from inference_gateway.tenants.identity import bearer_token
from inference_gateway.tenants.keys import KeyRing, hash_key

_KEY = """
SELECT prefix, organization_id, instance_id, is_admin FROM inference.api_keys
 WHERE key_hash = $1 AND revoked_at IS NULL
"""


@dataclass(frozen=True, slots=True)
class Viewer:
    admin: bool
    organization_id: str | None = None  # a tenant's key: what it may read
    instance_id: str | None = None
    key_prefix: str | None = None  # the key used, if one was

    def describe(self) -> dict[str, object]:
        return {"object": "organization.usage.scope", "admin": self.admin,
                "organization_id": self.organization_id, "instance_id": self.instance_id,
                "api_key_id": self.key_prefix}


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key")


def admin_only(what: str) -> GatewayError:
    return GatewayError(403, f"{what} needs an admin credential.", code="admin_required")


def token_of(headers: Mapping[str, str]) -> str:
    token = bearer_token(headers)
    if token is None:
        raise unauthorized("Usage needs an API key or the admin token, sent as "
                           "`Authorization: Bearer <token>`; tenant headers are not enough.")
    if not token.isascii():
        raise unauthorized("Incorrect API key provided.")
    return token


async def identify(conn: asyncpg.Connection, token: str, admin_token: str | None) -> Viewer:
    if admin_token is not None and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Viewer(admin=True)
    row = await conn.fetchrow(_KEY, hash_key(token)) if KeyRing.recognizes(token) else None
    if row is None:
        raise unauthorized("Incorrect API key provided.")
    return Viewer(row["is_admin"], row["organization_id"], row["instance_id"], row["prefix"])


def scoped(viewer: Viewer, query: UsageQuery) -> UsageQuery:
    """The query narrowed to what the viewer may read; 403 if it names anything else."""
    if viewer.admin:
        return query
    filters = dict(query.filters)
    for column, own in (("organization_id", viewer.organization_id),
                        ("instance_id", viewer.instance_id)):
        assert own is not None  # a tenant's key names both (migration 0020)
        asked = filters.get(column, (own,))
        if asked != (own,):
            raise GatewayError(
                403, f"This API key reads the usage of its own {column.split('_')[0]} only.",
                param=column.replace("_id", "_ids"), code="permission_denied")
        filters[column] = (own,)
    return replace(query, filters=filters)
