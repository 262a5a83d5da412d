"""The tenant a request is billed to: an organization and one of its instances."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TENANT_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Tenant:
    organization_id: str
    instance_id: str
    # The API key that named the tenant, when one did; not part of who the tenant is.
    key_id: int | None = field(default=None, compare=False)


def is_valid_id(value: str) -> bool:
    """What an organization or instance id may be: 1 to 256 printable ASCII characters."""
    return 0 < len(value) <= MAX_TENANT_LENGTH and value.isascii() and value.isprintable()
