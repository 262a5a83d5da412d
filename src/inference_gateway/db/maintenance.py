"""Partition maintenance of the audit table: run it, show it, and schedule it where pg_cron can't.

The work itself is done by SQL functions created by the migrations (``optimized_run_maintenance``,
``parallel_run_maintenance``, ...); this module only calls them with parameters:

* :func:`apply_maintenance_settings` pushes retention, the slow-run threshold and the schedule from
  the settings into the database (and (re)creates the pg_cron job) after every migration;
* ``inference-gateway maintenance run|status|schedule`` (added to the CLI by :func:`register`);
* :func:`run_scheduler` runs maintenance on the configured schedule (GMT) for deployments without
  pg_cron; it stands by while a pg_cron job does the work, and only one process at a time is
  active (a session advisory lock elects it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from inference_gateway.settings import Settings

log = logging.getLogger(__name__)

_SCHEDULER_LOCK_KEY = 0x1A7E6A80  # one active scheduler per database, across processes and hosts
_STANDBY_RECHECK_SEC = 60.0

# What a lost or refused connection raises.
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

_RESULT_COLUMNS = (
    "parent_table, status, partitions_created, partitions_dropped, rows_moved, default_rows, "
    "seconds, log_id, detail"
)


# ---------------------------------------------------------------------------------------------
# Cron schedules (the subset pg_cron understands for minute schedules), evaluated in UTC.
# ---------------------------------------------------------------------------------------------

_MONTH_NAMES = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_WEEKDAY_NAMES = {
    name: number
    for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def _parse_field(text: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    def number(token: str) -> int:
        token = token.strip().lower()
        if token in names:
            return names[token]
        if not token.isdigit():
            raise ValueError(f"{token!r} is not a number")
        return int(token)

    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"empty item in {text!r}")
        span, _, step_text = item.partition("/")
        step = number(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"step must be at least 1 in {item!r}")
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first_text, _, last_text = span.partition("-")
            first, last = number(first_text), number(last_text)
        else:
            first = number(span)
            last = high if step_text else first
        if not (low <= first <= high and low <= last <= high) or first > last:
            raise ValueError(f"{item!r} is outside {low}-{high}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A five-field cron expression (minute hour day-of-month month day-of-week), in UTC."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        text = _MACROS.get(expression.strip().lower(), expression)
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(
                f"invalid cron schedule {expression!r}: expected 5 fields "
                "(minute hour day-of-month month day-of-week)"
            )
        try:
            weekdays = _parse_field(fields[4], 0, 7, _WEEKDAY_NAMES)
            return cls(
                expression=expression,
                minutes=_parse_field(fields[0], 0, 59, {}),
                hours=_parse_field(fields[1], 0, 23, {}),
                days=_parse_field(fields[2], 1, 31, {}),
                months=_parse_field(fields[3], 1, 12, _MONTH_NAMES),
                weekdays=frozenset(d % 7 for d in weekdays),
                any_day=fields[2].startswith("*"),
                any_weekday=fields[4].startswith("*"),
            )
        except ValueError as exc:
            raise ValueError(f"invalid cron schedule {expression!r}: {exc}") from None

    def _day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        in_days = day.day in self.days
        in_weekdays = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            # Like cron: when one of the two fields is '*', the other one decides.
            return in_days and in_weekdays
        return in_days or in_weekdays

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first time strictly after ``moment`` (aware, any zone) that matches, in UTC."""
        start = moment.astimezone(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(
            minutes=1
        )
        hours = sorted(self.hours)
        minutes = sorted(self.minutes)
        for offset in range(366 * 8 + 1):
            day = start.date() + dt.timedelta(days=offset)
            if not self._day_matches(day):
                continue
            for hour in hours:
                for minute in minutes:
                    candidate = dt.datetime(
                        day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC
                    )
                    if candidate >= start:
                        return candidate
        raise ValueError(f"cron schedule {self.expression!r} never fires")


# ---------------------------------------------------------------------------------------------
# Calls into the database
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaintenanceResult:
    """One row of ``inference.maintenance_result``: what a run did to one set (or to all)."""

    parent_table: str | None
    status: str
    partitions_created: int
    partitions_dropped: int
    rows_moved: int
    default_rows: int | None
    seconds: float
    log_id: int | None
    detail: str | None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> MaintenanceResult:
        return cls(
            parent_table=record["parent_table"],
            status=record["status"],
            partitions_created=record["partitions_created"] or 0,
            partitions_dropped=record["partitions_dropped"] or 0,
            rows_moved=record["rows_moved"] or 0,
            default_rows=record["default_rows"],
            seconds=float(record["seconds"] or 0),
            log_id=record["log_id"],
            detail=record["detail"],
        )

    def describe(self) -> str:
        target = self.parent_table or "every partition set"
        text = (
            f"{target}: {self.status}, {self.partitions_created} partition(s) created, "
            f"{self.partitions_dropped} dropped, {self.rows_moved} row(s) moved out of the "
            f"default partition"
        )
        if self.default_rows is not None:
            text += f" ({self.default_rows} left there)"
        text += f", {self.seconds:.3f} s"
        if self.detail:
            text += f" - {self.detail}"
        return text


async def apply_maintenance_settings(conn: asyncpg.Connection, settings: Settings) -> None:
    """Push retention, drop/detach, the slow-run threshold and the schedule into the database.

    Called right after migrations. Idempotent: the pg_cron job is created or updated by name, and
    where pg_cron is missing the database records that the gateway's scheduler is in charge.
    """
    CronSchedule.parse(settings.maintenance_schedule)  # fail early, naming the setting
    detail = await conn.fetchval(
        "SELECT inference.configure_maintenance($1, $2, $3, $4)",
        settings.requests_retention,
        settings.retention_keep_table,
        settings.maintenance_schedule,
        Decimal(str(settings.maintenance_warn_after_sec)),
    )
    log.info("partition maintenance: %s", detail)


def _notice_printer(out: Callable[[str], None]) -> Callable[[Any, Any], None]:
    def listener(_conn: Any, message: Any) -> None:
        severity = getattr(message, "severity", "NOTICE")
        out(f"{severity}: {getattr(message, 'message', message)}")

    return listener


async def run_maintenance_now(
    dsn: str,
    *,
    parallel: int | None = None,
    schemas: Sequence[str] | None = None,
    parent_table: str | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> list[MaintenanceResult]:
    """Run maintenance once (``optimized_run_maintenance``, or the parallel one)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        if on_notice is not None:
            conn.add_log_listener(_notice_printer(on_notice))
        if parallel is None:
            rows = await conn.fetch(
                f"SELECT {_RESULT_COLUMNS} FROM inference.optimized_run_maintenance($1)",
                parent_table,
            )
        else:
            rows = await conn.fetch(
                f"SELECT {_RESULT_COLUMNS} "
                "FROM inference.parallel_run_maintenance($1::text[], $2)",
                list(schemas) if schemas else None,
                parallel,
            )
    finally:
        await conn.close()
    return [MaintenanceResult.from_record(row) for row in rows]


def _size(num: int | None) -> str:
    if num is None:
        return "-"
    value = float(num)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{num} B"  # not reached


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    cells = [[("-" if value is None else str(value)) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return lines


async def maintenance_status(dsn: str, *, limit: int = 14, exact: bool = False) -> list[str]:
    """Lines describing the scheduler, the latest runs per day and the partitions."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        setting = await conn.fetchrow(
            "SELECT scheduler, scheduler_detail, schedule, warn_after_sec "
            "FROM inference.maintenance_settings"
        )
        jobs = await conn.fetch("SELECT * FROM inference.maintenance_cron_status()")
        analysis = await conn.fetch(
            "SELECT function_name, day, executions, avg_seconds, max_seconds, min_seconds, "
            "partitions_created, partitions_dropped, rows_moved, skipped, failed "
            "FROM inference.maintenance_performance_analysis "
            "ORDER BY day DESC, function_name LIMIT $1",
            limit,
        )
        last = await conn.fetchrow(
            "SELECT function_name, parent_table, status, started_at, duration_sec, detail "
            "FROM inference.maintenance_log ORDER BY id DESC LIMIT 1"
        )
        parts = await conn.fetch(
            "SELECT * FROM inference.partition_overview($1)", exact
        )
    finally:
        await conn.close()

    lines: list[str] = []
    if setting is not None:
        lines.append(f"scheduler:   {setting['scheduler']} - {setting['scheduler_detail']}")
        lines.append(
            f"schedule:    {setting['schedule']} (GMT); warning above "
            f"{setting['warn_after_sec']} s"
        )
    for job in jobs:
        mark = "maintenance job" if job["is_maintenance_job"] else "other job"
        lines.append(
            f"pg_cron:     job {job['jobid']} ({mark}, {job['jobname']}), "
            f"{job['schedule']}, {'active' if job['active'] else 'inactive'}; last run: "
            f"{job['last_status'] or 'never'}"
            + (f" at {job['last_start']:%Y-%m-%d %H:%M:%S%z}" if job["last_start"] else "")
            + (f" ({job['last_message']})" if job["last_message"] else "")
        )
    if last is not None:
        lines.append(
            f"last run:    {last['function_name']} on {last['parent_table'] or 'every set'}: "
            f"{last['status']} at {last['started_at']:%Y-%m-%d %H:%M:%S%z}, "
            f"{float(last['duration_sec']):.3f} s"
            + (f" - {last['detail']}" if last["detail"] else "")
        )
    lines.append("")
    lines.append("maintenance_performance_analysis (latest days):")
    lines += _table(
        ("function", "day", "runs", "avg s", "max s", "min s", "created", "dropped",
         "rows moved", "skipped", "failed"),
        (
            (r["function_name"], r["day"], r["executions"], r["avg_seconds"], r["max_seconds"],
             r["min_seconds"], r["partitions_created"], r["partitions_dropped"],
             r["rows_moved"], r["skipped"], r["failed"])
            for r in analysis
        ),
    )
    lines.append("")
    lines.append("partitions" + (" (exact row counts):" if exact else " (estimated row counts):"))
    lines += _table(
        ("parent", "partition", "from", "to", "rows", "size"),
        (
            (p["parent_table"], p["partition_name"],
             "DEFAULT" if p["is_default"] else p["range_from"], p["range_to"],
             f"{p['row_count']}" + ("" if p["row_count_exact"] else " (est.)"),
             _size(p["total_bytes"]))
            for p in parts
        ),
    )
    return lines


# ---------------------------------------------------------------------------------------------
# The scheduler for deployments without pg_cron
# ---------------------------------------------------------------------------------------------


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True if ``stop`` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))
    return stop.is_set()


async def _pg_cron_in_charge(conn: asyncpg.Connection) -> str | None:
    row = await conn.fetchrow(
        "SELECT jobid, jobname, schedule FROM inference.maintenance_cron_status() "
        "WHERE is_maintenance_job AND active LIMIT 1"
    )
    if row is None:
        return None
    return f"pg_cron job {row['jobid']} ({row['jobname']}, {row['schedule']} GMT)"


async def run_scheduler(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> None:
    """Run ``optimized_run_maintenance`` on ``settings.maintenance_schedule`` until ``stop``.

    Safe to start in every gateway worker: one holds the scheduler lock and the others stand by
    (taking over if it goes away). At each firing time it does nothing while an active pg_cron
    job runs maintenance for this database.
    """
    schedule = CronSchedule.parse(settings.maintenance_schedule)
    stop = stop or asyncio.Event()
    backoff = 1.0
    while not stop.is_set():
        try:
            conn = await asyncpg.connect(settings.database_url, timeout=10)
        except _DB_ERRORS as exc:
            log.warning("maintenance scheduler cannot connect: %s", exc)
            if await _wait(stop, backoff):
                return
            backoff = min(backoff * 2, 60.0)
            continue
        backoff = 1.0
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _SCHEDULER_LOCK_KEY):
                log.debug("another process runs the maintenance scheduler; standing by")
                if await _wait(stop, _STANDBY_RECHECK_SEC):
                    return
                continue
            log.info("maintenance scheduler active: %s (GMT)", schedule.expression)
            while not stop.is_set():
                fire_at = schedule.next_after(now())
                log.info("next partition maintenance at %s", fire_at.isoformat())
                while (remaining := (fire_at - now()).total_seconds()) > 0:
                    # Wake up now and then so a clock change or a lost connection is noticed.
                    if await _wait(stop, min(remaining, 300.0)):
                        return
                    await conn.fetchval("SELECT 1")
                cron_job = await _pg_cron_in_charge(conn)
                if cron_job is not None:
                    log.info("partition maintenance is run by %s; not running it here", cron_job)
                    continue
                for result in await run_maintenance_now(
                    settings.database_url, on_notice=lambda text: log.info("%s", text)
                ):
                    log.info("partition maintenance: %s", result.describe())
        except _DB_ERRORS as exc:
            log.warning("maintenance scheduler: %s", exc)
            if await _wait(stop, backoff):
                return
        finally:
            with contextlib.suppress(Exception):
                await conn.close()


# ---------------------------------------------------------------------------------------------
# inference-gateway maintenance ...
# ---------------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        results = asyncio.run(
            run_maintenance_now(
                settings.database_url,
                parallel=args.parallel,
                schemas=args.schema,
                parent_table=args.table,
                on_notice=print,
            )
        )
    except asyncpg.PostgresError as exc:
        print(f"partition maintenance failed: {exc}")
        return 1
    if not results:
        print("no partition set was selected")
    for result in results:
        print(result.describe())
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    for line in asyncio.run(
        maintenance_status(settings.database_url, limit=args.limit, exact=args.exact)
    ):
        print(line)
    return 0


async def _schedule_forever(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        cron_job = await _pg_cron_in_charge(conn)
    finally:
        await conn.close()
    if cron_job is not None:
        print(f"{cron_job} runs partition maintenance; this scheduler stands by and runs it "
              "only while that job is missing or inactive")
    else:
        print(f"running partition maintenance on {settings.maintenance_schedule} (GMT); "
              "Ctrl-C to stop")
    await run_scheduler(settings)


def _cmd_schedule(args: argparse.Namespace, settings: Settings) -> int:
    CronSchedule.parse(settings.maintenance_schedule)
    asyncio.run(_schedule_forever(settings))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``maintenance run|status|schedule`` to the ``inference-gateway`` command."""
    parser = subparsers.add_parser("maintenance", help="partition maintenance of the audit table")
    sub = parser.add_subparsers(dest="maintenance_command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run partition maintenance now and print what it did")
    run.add_argument(
        "--parallel", type=int, metavar="N", default=None,
        help="maintain the partition sets on N connections at once (parallel_run_maintenance)",
    )
    run.add_argument(
        "--schema", action="append", metavar="SCHEMA", default=None,
        help="with --parallel: a schema holding parent tables, or pg_partman's schema for all "
             "sets (repeatable; default: all sets)",
    )
    run.add_argument(
        "--table", metavar="SCHEMA.TABLE", default=None,
        help="without --parallel: maintain only this partition set",
    )
    run.set_defaults(handler=_cmd_run)

    status = sub.add_parser(
        "status", help="latest maintenance runs, the scheduler, and the partitions with sizes"
    )
    status.add_argument("--limit", type=int, default=14, help="rows of the analysis view")
    status.add_argument("--exact", action="store_true", help="count rows instead of estimating")
    status.set_defaults(handler=_cmd_status)

    schedule = sub.add_parser(
        "schedule",
        help="run maintenance on MAINTENANCE_SCHEDULE (GMT) where pg_cron does not",
    )
    schedule.set_defaults(handler=_cmd_schedule)
