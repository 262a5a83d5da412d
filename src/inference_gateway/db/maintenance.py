"""Partition maintenance of the audit table, from Python: the calls into the SQL functions.

The work itself is done by SQL functions created by the migrations (``optimized_run_maintenance``,
``parallel_run_maintenance``, ...); this module only calls them with parameters:

* :func:`apply_maintenance_settings` pushes retention, the slow-run threshold and the schedule from
  the settings into the database (and (re)creates the pg_cron job) after every migration;
* :func:`run_maintenance_now` runs it once; :func:`maintenance_state` reads what it did;
* :func:`pg_cron_in_charge` tells whether pg_cron runs it (see ``schedule`` for the rest).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from inference_gateway.db.cron import CronSchedule
from inference_gateway.settings import Settings

log = logging.getLogger(__name__)

_RESULT_COLUMNS = (
    "parent_table, status, partitions_created, partitions_dropped, rows_moved, default_rows, "
    "seconds, log_id, detail"
)


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


@dataclass(frozen=True)
class MaintenanceState:
    """What ``maintenance status`` shows: scheduler, pg_cron jobs, recent runs, partitions."""

    setting: asyncpg.Record | None
    jobs: list[asyncpg.Record]
    analysis: list[asyncpg.Record]
    last: asyncpg.Record | None
    partitions: list[asyncpg.Record]
    exact: bool


async def maintenance_state(dsn: str, *, limit: int = 14, exact: bool = False) -> MaintenanceState:
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
        parts = await conn.fetch("SELECT * FROM inference.partition_overview($1)", exact)
    finally:
        await conn.close()
    return MaintenanceState(setting, list(jobs), list(analysis), last, list(parts), exact)


async def pg_cron_in_charge(conn: asyncpg.Connection) -> str | None:
    """The active pg_cron job that runs maintenance for this database, described; or None."""
    row = await conn.fetchrow(
        "SELECT jobid, jobname, schedule FROM inference.maintenance_cron_status() "
        "WHERE is_maintenance_job AND active LIMIT 1"
    )
    if row is None:
        return None
    return f"pg_cron job {row['jobid']} ({row['jobname']}, {row['schedule']} GMT)"
