"""The metering sink: ``submit(record)`` on the request path, durable batched writes behind it.

``submit`` appends the record to this process's spool (a write into the page cache, no network)
and returns. A background task drains the spool into Postgres in batches of up to
``USAGE_BATCH_SIZE`` records, at most ``USAGE_FLUSH_INTERVAL_MS`` after a record arrived,
retrying with capped exponential backoff while Postgres is away. Records are acknowledged in the
spool only after Postgres committed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

from inference_gateway.metering.record import UsageRecord
from inference_gateway.metering.spool import Batch, Spool
from inference_gateway.metering.writer import PACE_ROWS, PostgresWriter, WriteResult
from inference_gateway.settings import Settings

log = logging.getLogger(__name__)

ORPHAN_SCAN_INTERVAL_SEC = 10.0
DISK_CHECK_INTERVAL_SEC = 1.0  # also how often an idle writer wakes up at all


class Writer(Protocol):
    async def write(self, records: list[UsageRecord]) -> WriteResult: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class MeterHealth:
    database_ok: bool = False
    last_error: str | None = None
    written: int = 0
    failures: int = 0
    batches: int = 0  # batches committed (one transaction of COPY statements each)


class Meter:
    """Owns the spool and the writer task of one process."""

    def __init__(self, settings: Settings, writer: Writer | None = None) -> None:
        self.settings = settings
        self.spool = Spool(
            settings.spool_dir,
            settings.spool_segment_bytes,
            sync_always=settings.spool_sync == "always",
        )
        self.writer: Writer = writer or PostgresWriter(settings.database_url)
        self.health = MeterHealth()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._full = False
        self._unsynced = 0
        self._batch_size = settings.usage_batch_size
        self._interval = settings.usage_flush_interval_ms / 1000

    # -- request path ---------------------------------------------------------------------------

    def accepting(self) -> bool:
        """False when new requests must be refused rather than served unmetered."""
        return not (self._full and self.settings.spool_full_policy != "drop")

    def submit(self, record: UsageRecord) -> None:
        if self._full and self.settings.spool_full_policy == "drop":
            self.spool.stats.dropped += 1
            log.error("usage spool full: dropped the record of request %s", record.request_id)
            return
        try:
            self.spool.append(record)
        except ValueError as exc:  # too long for the spool: kept where an operator sees it
            log.error("usage record of request %s: %s; moved to the dead letters",
                      record.request_id, exc)
            self.spool.dead_letter(record.to_json(), str(exc))
            return
        self._idle.clear()
        self._unsynced += 1
        if self._unsynced >= self._batch_size:
            self._wake.set()
        elif self._unsynced == 1:
            # The first record since the last flush sets the time of the next one. A writer
            # polling every interval would wake each idle worker 20 times a second, and on a
            # busy machine every wake-up can land on the core a request needs.
            asyncio.get_running_loop().call_later(self._interval, self._wake.set)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.spool.open()
        if self.spool.has_pending():  # left by a process that died: replay it first
            self._wake.set()
        self._check_disk()
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def flush(self, within: float | None = None) -> bool:
        """Wait until every spooled record is in Postgres. False if that did not happen in time."""
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return True

    async def close(self, within: float = 10.0) -> None:
        """Drain for up to ``within`` seconds; the rest stays in the spool for the next start."""
        if self._task is None:
            return
        drained = await self.flush(within)
        if not drained:
            log.warning("usage writer: %d bytes left in the spool for the next start",
                        self.spool.pending_bytes())
        self._stopping = True
        self._wake.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self.spool.close()
        await self.writer.close()

    # -- writer task ----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.0
        last_scan = last_disk = time.monotonic()
        while not self._stopping:
            woken = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff or DISK_CHECK_INTERVAL_SEC)
                woken = True
            self._wake.clear()
            now = time.monotonic()
            claimed = 0
            if now - last_scan >= ORPHAN_SCAN_INTERVAL_SEC:
                last_scan = now
                claimed = self.spool.claim_orphans()
                if claimed:
                    self._idle.clear()
            if now - last_disk >= DISK_CHECK_INTERVAL_SEC:
                last_disk = now
                self._check_disk()
            if not (woken or backoff or claimed):
                continue  # an idle tick: what was spooled is written when its flush is due
            self._unsynced = 0
            if self.settings.spool_sync == "batch":
                await self._sync_spool()
            try:
                await self._drain()
            except Exception as exc:  # Postgres away or refusing: keep spooling, retry later
                self.health.database_ok = False
                self.health.failures += 1
                if self.health.last_error != str(exc):
                    log.warning("usage writer: cannot write to Postgres (%s); retrying", exc)
                self.health.last_error = str(exc)
                backoff = min(max(backoff * 2, 0.1), self.settings.writer_max_backoff_sec)
                continue
            backoff = 0.0
            if not self.spool.has_pending():
                self._idle.set()

    async def _sync_spool(self) -> None:
        handle = self.spool.sync_handle()
        if handle is None:
            return
        try:
            await asyncio.to_thread(_fsync_and_close, handle)
        except OSError as exc:
            log.error("usage spool: fsync failed: %s", exc)

    async def _drain(self) -> None:
        """Write what is spooled, a batch at a time, going on only while batches come out full.

        A short batch means the spool is caught up: what arrives while it is being written waits
        for the next flush. Going on would write a handful of rows at a time, back to back, and
        a COPY's fixed cost (a round trip, a commit) would then be paid for every few rows.
        """
        while True:
            batches, lines = await self._read_batches()
            if not batches:
                break
            records = [r for batch in batches for r in batch.records]
            try:
                result = await self.writer.write(records) if records else None
            except BaseException:
                for batch in batches:
                    self.spool.rewind(batch)
                raise
            self._settle(batches, result)
            if lines < self._batch_size:
                break
        if not self.health.database_ok:
            await self.writer.ping()
            self.health.database_ok = True
            self.health.last_error = None

    async def _read_batches(self) -> tuple[list[Batch], int]:
        """Up to ``USAGE_BATCH_SIZE`` lines, and how many lines that was (records and
        unreadable ones). What is read from the file is parsed in slices with a yield between
        them: parsing a thousand records takes milliseconds, and doing it in one go would hold
        up every request this process is serving for that long. Records handed over as they
        were appended are taken at once: a yield under load waits for every request ready to
        run, and one per slice kept a busy worker's writer behind its requests.
        """
        batches: list[Batch] = []
        count = 0
        while count < self._batch_size:
            batch = self.spool.read_batch(self._batch_size - count, PACE_ROWS)
            if batch is None:
                break
            batches.append(batch)
            count += len(batch.records) + len(batch.bad_lines)
            if not batch.kept:
                await asyncio.sleep(0)
        return batches, count

    def _settle(self, batches: list[Batch], result: WriteResult | None) -> None:
        for batch in batches:
            for line in batch.bad_lines:
                self.spool.dead_letter(line, "unreadable spool line (checksum or JSON)")
        if result is not None:
            for record, reason in result.rejected:
                log.error("usage writer: Postgres rejected request %s: %s",
                          record.request_id, reason)
                self.spool.dead_letter(record.to_json(), reason)
            self.health.written += result.inserted
            self.health.batches += 1
            self.health.database_ok = True
            self.health.last_error = None
        for batch in batches:
            self.spool.ack(batch)

    def _check_disk(self) -> None:
        settings = self.settings
        try:
            st = os.statvfs(settings.spool_dir)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        pending = self.spool.pending_bytes()
        below_floor = free < settings.spool_min_free_bytes
        over_cap = pending >= settings.spool_max_bytes
        full = below_floor if settings.spool_full_policy == "spill" else (below_floor or over_cap)
        if full != self._full:
            self._full = full
            if full:
                log.error("usage spool full (%d bytes pending, %d bytes free): policy %s",
                          pending, free, settings.spool_full_policy)
            else:
                log.info("usage spool has room again")


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
