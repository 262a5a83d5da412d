"""Who is calling: the organization and instance a request is billed to.

Three ways to name the tenant, chosen by ``AUTH_MODE``:

* ``headers``: the ``X-TEMBO-ORG`` and ``X-TEMBO-INSTANCE`` headers, as in the original server,
  for deployments behind a trusted proxy that sets them;
* ``keys``: an API key sent as ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as the
  Anthropic SDK sends it), bound to one organization and one instance; tenant headers, if sent
  as well, must agree with the key;
* ``either`` (the default): a bearer token that looks like one of our keys is treated as a key,
  anything else (no token, or another service's token) falls back to the headers.

With ``ORG_AUTH_ENABLED`` the organization must also pass the org gate. Everything here works on
in-memory state: identifying a request is a few dictionary lookups, never a database call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from inference_gateway.errors import GatewayError
from inference_gateway.tenants.keys import KeyRing
from inference_gateway.tenants.orgs import OrgGate
from inference_gateway.tenants.tenant import MAX_TENANT_LENGTH, Tenant

ORG_HEADER = "X-TEMBO-ORG"
INSTANCE_HEADER = "X-TEMBO-INSTANCE"

AuthMode = Literal["headers", "keys", "either"]


def _header_value(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    if not value:
        raise GatewayError(400, f"header {name} is empty", param=name, code="invalid_header")
    if len(value) > MAX_TENANT_LENGTH:
        raise GatewayError(
            400, f"header {name} is longer than {MAX_TENANT_LENGTH} characters",
            param=name, code="invalid_header",
        )
    if not (value.isascii() and value.isprintable()):
        raise GatewayError(
            400, f"header {name} must be printable ASCII", param=name, code="invalid_header"
        )
    return value


def tenant_from_headers(headers: Mapping[str, str]) -> Tenant:
    """The tenant named by the headers; 403 when one is missing, 400 when one is malformed."""
    org = _header_value(headers, ORG_HEADER)
    instance = _header_value(headers, INSTANCE_HEADER)
    for name, value in ((ORG_HEADER, org), (INSTANCE_HEADER, instance)):
        if value is None:
            raise GatewayError(403, f"missing required header {name}", param=name,
                               code="missing_tenant_header")
    assert org is not None and instance is not None
    return Tenant(org, instance)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer <token>``, else of ``x-api-key``; None if neither."""
    value = headers.get("Authorization")
    if value is not None:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("x-api-key", "").strip() or None


def _check_headers_agree(headers: Mapping[str, str], tenant: Tenant) -> None:
    """Tenant headers sent along with a key must name the key's tenant: a mix-up is an error."""
    for name, expected in ((ORG_HEADER, tenant.organization_id),
                           (INSTANCE_HEADER, tenant.instance_id)):
        value = _header_value(headers, name)
        if value is not None and value != expected:
            raise GatewayError(
                403, f"header {name} does not match the tenant of the API key",
                param=name, code="tenant_mismatch",
            )


def _tenant_from_key(headers: Mapping[str, str], mode: AuthMode, keys: KeyRing) -> Tenant | None:
    """The tenant of the request's API key; None when its headers are to name the tenant."""
    token = bearer_token(headers)
    if token is None:
        if mode == "keys":
            raise GatewayError(
                401, "Missing API key: send it as `Authorization: Bearer <key>` or `x-api-key`.",
                code="invalid_api_key",
            )
        return None
    if mode == "either" and not keys.recognizes(token):
        return None
    entry = keys.lookup(token)
    if entry is None:
        raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
    _check_headers_agree(headers, entry.tenant)
    return entry.tenant


def identify(
    headers: Mapping[str, str], mode: AuthMode, keys: KeyRing | None, orgs: OrgGate | None
) -> Tenant:
    """The tenant of a request, or the OpenAI-style error (400, 401 or 403) to answer with.

    ``keys`` may be None only in ``headers`` mode; ``orgs`` is None when the org gate is off.
    """
    tenant = None
    if mode != "headers":
        assert keys is not None
        tenant = _tenant_from_key(headers, mode, keys)
    if tenant is None:
        tenant = tenant_from_headers(headers)
    if orgs is not None and not orgs.allows(tenant.organization_id):
        raise GatewayError(403, "Organization is not authorized",
                           code="organization_not_authorized")
    return tenant
