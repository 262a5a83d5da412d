"""Cron schedules: five fields in UTC (GMT), the same text pg_cron is given.

An expression is checked to be one pg_cron accepts as well; ``croniter`` computes the times.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

MACROS = frozenset(("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                    "@hourly"))
_ITEM = re.compile(r"(\*|[0-9a-z]+(-[0-9a-z]+)?)(/[0-9]+)?")


def _check_field(field: str) -> None:
    for item in field.lower().split(","):
        match = _ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"{item!r} is not a cron item")
        span = match.group(1)
        first, _, last = span.partition("-")
        if last and first.isdigit() and last.isdigit() and int(first) > int(last):
            raise ValueError(f"{item!r} runs backwards")


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression (minute hour day-of-month month day-of-week) evaluated in UTC."""

    expression: str

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        text = expression.strip()
        try:
            if text.lower() not in MACROS:
                fields = text.split()
                if len(fields) != 5:
                    raise ValueError("expected 5 fields (minute hour day-of-month month "
                                     "day-of-week)")
                for field in fields:
                    _check_field(field)
            croniter(text)
        except (ValueError, CroniterError) as exc:
            raise ValueError(f"invalid cron schedule {expression!r}: {exc}") from None
        return cls(text)

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first time strictly after ``moment`` (aware, any zone) that matches, in UTC."""
        try:
            found: dt.datetime = croniter(self.expression,
                                          moment.astimezone(dt.UTC)).get_next(dt.datetime)
        except (CroniterBadDateError, CroniterBadCronError):
            raise ValueError(f"cron schedule {self.expression!r} never fires") from None
        return found.astimezone(dt.UTC)
