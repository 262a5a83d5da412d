"""One process in the whole fleet runs a job: the one holding the job's advisory lock.

Every gateway process may start every job; each tries the job's session-level advisory lock,
and the one that gets it is in charge for as long as its connection lives. The others stand
by and try again every ``standby_sec``, so one of them takes over when the leader goes away
(its connection closes and Postgres releases the lock). Errors are logged and retried with a
capped exponential back-off; a lost connection gives up the lead until the lock is taken again,
any other error keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

log = logging.getLogger(__name__)

MAX_BACKOFF_SEC = 60.0
CONNECT_TIMEOUT_SEC = 10.0

# What a lost connection raises: the lead goes with it. Other errors keep both.
_LOST = (OSError, TimeoutError, asyncpg.InterfaceError)

# One turn of a job's work, done while holding its lock; returns the seconds until the next.
Step = Callable[[asyncpg.Connection], Awaitable[float]]


@dataclass(frozen=True)
class LeaderJob:
    name: str
    lock_key: int  # see ``db.locks``
    step: Step
    standby_sec: float = 60.0  # how often a process that is not in charge tries again
    on_lead: Callable[[], None] | None = None  # called each time this process takes charge


async def take_lead(conn: asyncpg.Connection, lock_key: int) -> bool:
    """Try the job's lock on this connection; True when this process is now in charge."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key))


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True if ``stop`` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))
    return stop.is_set()


async def run(dsn: str, job: LeaderJob, stop: asyncio.Event | None = None) -> None:
    """Run ``job`` whenever this process holds its lock, until ``stop`` is set or cancelled."""
    stop = stop or asyncio.Event()
    conn: asyncpg.Connection | None = None
    leading = False
    backoff = 1.0
    try:
        while not stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_SEC)
                    leading = False
                if not leading:
                    leading = await take_lead(conn, job.lock_key)
                    if not leading:  # another process is in charge: hold no connection
                        await conn.close(timeout=2)
                        conn = None
                        delay = job.standby_sec
                    else:
                        log.info("%s: this process is in charge", job.name)
                        if job.on_lead is not None:
                            job.on_lead()
                if leading:
                    assert conn is not None
                    delay = await job.step(conn)
                backoff = 1.0
            except Exception as exc:  # Postgres away, or the job failed: try again later
                log.warning("%s: %s: %s; retrying in %.0f s", job.name, type(exc).__name__,
                            exc, backoff)
                if conn is not None and (conn.is_closed() or isinstance(exc, _LOST)):
                    conn.terminate()
                    conn, leading = None, False
                delay = backoff
                backoff = min(backoff * 2, MAX_BACKOFF_SEC)
            if await _wait(stop, delay):
                return
    finally:
        if conn is not None:
            conn.terminate()
