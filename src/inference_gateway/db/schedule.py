"""Partition maintenance on its schedule where pg_cron does not run it: one process of the fleet
keeps the schedule (see ``leader``), and stands by while an active pg_cron job does the work.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

import asyncpg

from inference_gateway.db import locks
from inference_gateway.db.cron import CronSchedule
from inference_gateway.db.leader import LeaderJob
from inference_gateway.db.maintenance import pg_cron_in_charge, run_maintenance_now

log = logging.getLogger(__name__)

CHECK_EVERY_SEC = 300.0  # while waiting, wake now and then to notice a clock change


class Scheduler:
    """The steps of the maintenance job: wait for the next firing time, then run, unless an
    active pg_cron job does the work for this database."""

    def __init__(self, dsn: str, schedule: CronSchedule,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self._dsn = dsn
        self._schedule = schedule
        self._now = now
        self._fire_at: dt.datetime | None = None

    def restart(self) -> None:
        """A process that takes charge computes the next firing time afresh."""
        self._fire_at = None

    async def step(self, conn: asyncpg.Connection) -> float:
        if self._fire_at is None:
            self._fire_at = self._schedule.next_after(self._now())
            log.info("next partition maintenance at %s", self._fire_at.isoformat())
        remaining = (self._fire_at - self._now()).total_seconds()
        if remaining > 0:
            await conn.fetchval("SELECT 1")  # notice a lost connection while waiting
            return min(remaining, CHECK_EVERY_SEC)
        self._fire_at = None
        cron_job = await pg_cron_in_charge(conn)
        if cron_job is not None:
            log.info("partition maintenance is run by %s; not running it here", cron_job)
            return 0.0
        for result in await run_maintenance_now(self._dsn,
                                                on_notice=lambda text: log.info("%s", text)):
            log.info("partition maintenance: %s", result.describe())
        return 0.0


def maintenance_job(dsn: str, expression: str,
                    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                    ) -> LeaderJob:
    """Partition maintenance on ``expression`` (GMT), run by one process of the fleet."""
    scheduler = Scheduler(dsn, CronSchedule.parse(expression), now)
    return LeaderJob("maintenance scheduler", locks.MAINTENANCE_SCHEDULER, scheduler.step,
                     standby_sec=60.0, on_lead=scheduler.restart)
