"""The usage API's query strings, read into queries: every mistake is a 400 naming its parameter.

Names and defaults are OpenAI's (``start_time``, ``end_time``, ``bucket_width``, ``group_by``,
``limit``, ``page``, ``models``, ``project_ids``, ``api_key_ids``). OpenAI's projects are our
instances, so ``project_id`` and ``instance_id`` name the same thing; ``organization_id`` is
ours, for operators who see every organization. Arrays may be sent as ``group_by=a&group_by=b``
or ``group_by[]=a``. A parameter the API does not know is refused rather than ignored: a filter
silently dropped would return someone's usage as if it were the answer.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Literal

from multidict import MultiMapping

from inference_gateway.errors import GatewayError
from inference_gateway.portal.timegrid import DAY, HOUR, MINUTE, ceil_to, floor_to, page_buckets
from inference_gateway.tenants.tenant import is_valid_id

Family = Literal["completions", "embeddings"]

MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z
WIDTHS = {"1m": MINUTE, "1h": HOUR, "1d": DAY}
# Buckets per page (default, most), as OpenAI allows them.
USAGE_LIMITS = {MINUTE: (60, 1440), HOUR: (24, 168), DAY: (7, 31)}
COST_LIMITS = {DAY: (7, 180)}
# What a result may be grouped by or filtered on, and the rollup column it stands for.
USAGE_GROUPS = {"model": "model", "project_id": "instance_id", "instance_id": "instance_id",
                "api_key_id": "api_key_id", "organization_id": "organization_id"}
COST_GROUPS = {"line_item": "model", "project_id": "instance_id", "instance_id": "instance_id",
               "organization_id": "organization_id"}
FILTERS = {"models": "model", "project_ids": "instance_id", "instance_ids": "instance_id",
           "api_key_ids": "api_key_id", "organization_ids": "organization_id"}
GROUP_ORDER = ("organization_id", "instance_id", "model", "api_key_id")
_INTEGER = re.compile(r"[0-9]{1,15}")
_CURSOR = re.compile(r"page_([0-9]{1,15})")


def bad(param: str, message: str, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """One page of a usage or costs query. Times are Unix seconds, whole minutes."""

    start: int
    end: int  # exclusive
    width: int  # of a bucket, in seconds
    limit: int  # buckets in this page
    page_start: int  # where this page's first bucket starts
    group_by: tuple[str, ...] = ()  # rollup columns, in GROUP_ORDER
    filters: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column: values

    def buckets(self) -> tuple[list[tuple[int, int]], int | None]:
        """This page's buckets, and where the next page starts (None: this is the last)."""
        return page_buckets(self.page_start, self.end, self.width, self.limit)

    def page_end(self) -> int:
        return self.buckets()[0][-1][1]


class Params:
    """A request's query string, read one parameter at a time; what is left unread is refused."""

    def __init__(self, query: MultiMapping[str]) -> None:
        self._query = query
        self._read: set[str] = set()

    def _all(self, name: str) -> list[str]:
        self._read.update((name, name + "[]"))
        return [*self._query.getall(name, []), *self._query.getall(name + "[]", [])]

    def one(self, name: str) -> str | None:
        values = self._all(name)
        if len(values) > 1:
            raise bad(name, f"'{name}' is given more than once.")
        return values[0] if values else None

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int:
        raw = self.one(name)
        if raw is None:
            if default is None:
                raise bad(name, f"Missing required parameter: '{name}'.",
                          "missing_required_parameter")
            return default
        if not _INTEGER.fullmatch(raw) or not low <= int(raw) <= high:
            raise bad(name, f"'{name}' must be a whole number from {low} to {high}.")
        return int(raw)

    def choice(self, name: str, options: dict[str, int], default: str) -> int:
        raw = self.one(name)
        if raw is None:
            return options[default]
        if raw not in options:
            raise bad(name, f"'{name}' must be one of {', '.join(options)}.")
        return options[raw]

    def ids(self, name: str) -> tuple[str, ...]:
        values = self._all(name)
        for value in values:
            if not is_valid_id(value):
                raise bad(name, f"each of '{name}' must be 1 to 256 printable ASCII characters.")
        return tuple(dict.fromkeys(values))

    def groups(self, allowed: dict[str, str]) -> tuple[str, ...]:
        names = [n.strip() for raw in self._all("group_by") for n in raw.split(",") if n.strip()]
        for name in names:
            if name not in allowed:
                raise bad("group_by", f"Cannot group by '{name}': group_by takes "
                          f"{', '.join(allowed)}.")
        columns = {allowed[name] for name in names}
        return tuple(c for c in GROUP_ORDER if c in columns)

    def filters(self) -> dict[str, tuple[str, ...]]:
        found: dict[str, tuple[str, ...]] = {}
        for name, column in FILTERS.items():
            values = self.ids(name)
            if values and column in found:
                raise bad(name, f"'{name}' and another name for the same filter are both given.")
            if values:
                found[column] = values
        return found

    def finish(self) -> None:
        unknown = sorted(set(self._query) - self._read)
        if unknown:
            raise bad(unknown[0], f"Unknown parameter: '{unknown[0]}'.", "unknown_parameter")


def time_range(params: Params, now: int) -> tuple[int, int]:
    """``[start_time, end_time)`` widened to whole minutes; ``end_time`` defaults to now."""
    start = params.integer("start_time", 0, MAX_TIME)
    end = params.integer("end_time", 0, MAX_TIME, ceil_to(now, MINUTE))
    if end <= start:
        raise bad("end_time", "'end_time' must be later than 'start_time' (and 'start_time' "
                  "not in the future when 'end_time' is left out).")
    return floor_to(start, MINUTE), ceil_to(end, MINUTE)


def encode_cursor(at: int) -> str:
    return base64.urlsafe_b64encode(f"page_{at}".encode()).decode()


def decode_cursor(raw: str | None, start: int, end: int, width: int) -> int:
    """Where the page a ``next_page`` cursor names starts; it must belong to this query."""
    if raw is None:
        return start
    try:
        match = _CURSOR.fullmatch(base64.urlsafe_b64decode(raw.encode("ascii")).decode("ascii"))
    except (UnicodeError, binascii.Error, ValueError):
        match = None
    at = int(match.group(1)) if match else -1
    if not (start < at < end and at % width == 0):
        raise bad("page", "'page' is not a cursor this query returned in 'next_page'.")
    return at


def usage_query(params: Params, now: int, widths: dict[str, int] = WIDTHS,
                limits: dict[int, tuple[int, int]] = USAGE_LIMITS,
                groups: dict[str, str] = USAGE_GROUPS) -> UsageQuery:
    """The query of ``/v1/organization/usage/*`` (and, with its own options, of the costs)."""
    for name in ("user_ids", "batch"):
        if params.one(name) is not None:
            raise bad(name, f"'{name}' is not supported: the gateway has no users or batches.")
    start, end = time_range(params, now)
    width = params.choice("bucket_width", widths, "1d")
    default, most = limits[width]
    limit = params.integer("limit", 1, most, default)
    page = decode_cursor(params.one("page"), start, end, width)
    query = UsageQuery(start, end, width, limit, page, params.groups(groups), params.filters())
    params.finish()
    return query


def cost_query(params: Params, now: int) -> UsageQuery:
    return usage_query(params, now, {"1d": DAY}, COST_LIMITS, COST_GROUPS)


def ranking_query(params: Params, now: int) -> tuple[int, int, int]:
    """``(start, end, limit)`` of the organizations ranked by their usage."""
    start, end = time_range(params, now)
    limit = params.integer("limit", 1, 100, 10)
    params.finish()
    return start, end, limit
