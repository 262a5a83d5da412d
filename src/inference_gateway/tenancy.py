"""Who is calling: the organization and instance a request is billed to.

The tenant comes from the ``X-TEMBO-ORG`` and ``X-TEMBO-INSTANCE`` headers, as in the original
server, for deployments behind a trusted proxy that sets them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from inference_gateway.errors import GatewayError

ORG_HEADER = "X-TEMBO-ORG"
INSTANCE_HEADER = "X-TEMBO-INSTANCE"
MAX_TENANT_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Tenant:
    organization_id: str
    instance_id: str


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
