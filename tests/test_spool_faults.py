"""The spool when things go wrong: the disk fills, an acknowledgement is corrupt, a record is too
long, Postgres goes away in the middle of a COPY. Real files, and a real Postgres where the
claim is about what reaches it."""

from __future__ import annotations

import asyncio
import errno
import inspect
import itertools
import os
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

from inference_gateway.db.migrate import migrate
from inference_gateway.metering import spool as spool_module
from inference_gateway.metering.meter import Meter
from inference_gateway.metering.record import UsageRecord
from inference_gateway.metering.spool import (
    ACK_SUFFIX,
    DEAD_LETTER_FILE,
    MAX_RECORD_BYTES,
    Spool,
    SpoolStats,
    encode_line,
)
from inference_gateway.metering.writer import PostgresWriter, WriteResult
from inference_gateway.settings import load_settings

T = TypeVar("T")


def record(i: int, org: str = "o", instance: str = "i", upstream_id: str | None = None,
           ) -> UsageRecord:
    request_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{org}/{i}"))
    return UsageRecord(request_id, org, instance, "m", "m", "/v1/x", i, 1, 200, False, False, 1, 1,
                       1_790_000_000.0 + i, 1_790_000_001.0 + i, upstream_id=upstream_id)


def line_of(r: UsageRecord) -> bytes:
    return encode_line(r.to_json())


def record_of_line_length(i: int, length: int) -> UsageRecord:
    """A record whose spool line (checksum, JSON and newline) is exactly ``length`` bytes."""
    base = len(line_of(record(i, upstream_id="")))
    r = record(i, upstream_id="x" * (length - base))
    assert len(line_of(r)) == length
    return r


def drain(spool: Spool) -> tuple[list[int], int]:
    """Read and acknowledge everything: the prompt_tokens of each record, and the bad lines."""
    seen: list[int] = []
    bad = 0
    stuck: set[tuple[Path, int]] = set()
    while (batch := spool.read_batch(1000)) is not None:
        if not batch.records and not batch.bad_lines:  # allowed once: skipping a torn tail
            place = (batch.segment.path, batch.end_offset)
            assert place not in stuck, f"the spool reads nothing more at {place}"
            stuck.add(place)
        seen.extend(r.prompt_tokens for r in batch.records)
        bad += len(batch.bad_lines)
        spool.ack(batch)
    return seen, bad


def crash(spool: Spool) -> None:
    """The process dies: its descriptors go (and its locks with them), nothing is cleaned up."""
    for segment in spool._segments:
        os.close(segment.fd)
        if segment.ack_fd is not None:
            os.close(segment.ack_fd)


async def until(check: Callable[[], Awaitable[T] | T], what: str, timeout: float = 15.0) -> T:
    """Poll ``check`` until it returns something truthy; fail after a generous deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)


class MemoryWriter:
    """Stores what it is given; counts nothing twice so duplicates would show."""

    def __init__(self) -> None:
        self.stored: list[UsageRecord] = []

    async def write(self, records: list[UsageRecord]) -> WriteResult:
        self.stored.extend(records)
        return WriteResult(len(records), [])

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def settled(meter: Meter, timeout: float = 15.0) -> None:
    """Wait until the meter has written everything, failing at once if its writer fails."""
    flushing = asyncio.ensure_future(meter.flush())
    try:
        await until(lambda: flushing.done() or meter.health.failures,
                    "the meter drained its spool", timeout)
    finally:
        flushing.cancel()
    assert meter.health.failures == 0, meter.health.last_error
    assert not meter.spool.has_pending()


# -- the disk fills -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of 32 KiB of its own (tmpfs), so that writes to it really run out of room."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_cuts_the_torn_tail_and_keeps_every_appended_record(
    small_disk: Path,
) -> None:
    """The real thing: the kernel writes part of the last line and then has no room left."""
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 8192)  # what an operator frees later
    spool = Spool(small_disk / "spool", segment_bytes=1 << 20)
    spool.open()
    path = spool._segments[-1].path
    appended: list[int] = []
    with pytest.raises(OSError) as err:
        for i in itertools.count():
            size = path.stat().st_size
            spool.append(record(i))
            appended.append(i)
    # Where the last page had room for part of the line, the kernel wrote that part (a short
    # write); where it had none, it refused outright. Either way the file is as it was.
    if size % os.sysconf("SC_PAGE_SIZE"):
        assert str(err.value) == "short write to the usage spool"
    else:
        assert err.value.errno == errno.ENOSPC
    whole = b"".join(line_of(record(i)) for i in appended)
    assert path.read_bytes() == whole
    with pytest.raises(OSError):  # still full: refused again, and again nothing is left over
        spool.append(record(len(appended)))
    assert path.read_bytes() == whole

    filler.unlink()
    more = [len(appended) + 1, len(appended) + 2]
    for i in more:
        spool.append(record(i))
    crash(spool)
    after = Spool(small_disk / "spool", segment_bytes=1 << 20)
    after.open()
    assert drain(after) == (appended + more, 0)
    replayed = len(appended) + len(more)  # nothing torn, nothing corrupt, nothing else
    assert after.stats == SpoolStats(replayed=replayed, acknowledged=replayed)
    after.close()


@pytest.mark.parametrize("failure", ["short write", "ENOSPC"])
def test_a_failed_append_leaves_the_segment_well_formed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The same without a filesystem of its own: ``os.write`` writes half a line, or nothing."""
    spool = Spool(tmp_path, segment_bytes=1 << 20)
    spool.open()
    for i in range(3):
        spool.append(record(i))
    real_write = os.write

    def failing(fd: int, data: bytes) -> int:
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(spool_module.os, "write", failing)
    with pytest.raises(OSError):
        spool.append(record(3))
    monkeypatch.setattr(spool_module.os, "write", real_write)
    path = spool._segments[-1].path
    assert path.read_bytes() == b"".join(line_of(record(i)) for i in range(3))
    spool.append(record(4))
    crash(spool)
    after = Spool(tmp_path, segment_bytes=1 << 20)
    after.open()
    assert drain(after) == ([0, 1, 2, 4], 0)
    assert after.stats == SpoolStats(replayed=4, acknowledged=4)
    after.close()


# -- a corrupt acknowledgement ---------------------------------------------------------------


@pytest.mark.parametrize("ack", [
    pytest.param(b"not a number\n", id="garbage"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\0" * 21, id="zeros"),
    pytest.param(b"-%019d\n" % 1, id="negative"),
])
async def test_a_corrupt_ack_replays_the_segment_and_each_record_is_stored_once(
    tmp_path: Path, database_url: str, ack: bytes
) -> None:
    org = f"org-{uuid.uuid4().hex[:12]}"
    first = Spool(tmp_path, segment_bytes=1 << 20)
    first.open()
    for i in range(5):
        first.append(record(i, org))
    settings = load_settings(spool_dir=tmp_path, database_url=database_url,
                             usage_flush_interval_ms=10, writer_max_backoff_sec=0.05)
    # Records 0-4 reach Postgres and are acknowledged, 5-7 are not; then the process dies and
    # its acknowledgement file is found damaged.
    writer = PostgresWriter(database_url)
    try:
        batch = first.read_batch(1000)
        assert batch is not None
        assert (await writer.write(batch.records)).inserted == 5
        first.ack(batch)
    finally:
        await writer.close()
    for i in range(5, 8):
        first.append(record(i, org))
    crash(first)
    first._segments[0].path.with_suffix(ACK_SUFFIX).write_bytes(ack)

    meter = Meter(settings)  # the next process, with the real writer
    await meter.start()
    try:
        await settled(meter)
    finally:
        await meter.close(within=0.3)  # settled already, unless the test fails
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetch("SELECT request_id::text AS id, count(*) AS n "
                                  "FROM inference.requests WHERE organization_id = $1 "
                                  "GROUP BY 1", org)
    finally:
        await conn.close()
    assert sorted((r["id"], r["n"]) for r in stored) == sorted(
        (record(i, org).request_id, 1) for i in range(8))
    assert meter.health.written == 3  # the replayed five were already there
    assert not (tmp_path / DEAD_LETTER_FILE).exists()


# -- a record over the size limit ------------------------------------------------------------------


def test_a_record_of_exactly_the_size_limit_is_read_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=4 << 20)
    spool.open()
    spool.append(record(0))
    spool.append(record_of_line_length(1, MAX_RECORD_BYTES))
    spool.append(record(2))
    assert drain(spool) == ([0, 1, 2], 0)
    crash(spool)


async def test_a_record_over_the_size_limit_does_not_stall_the_writer(tmp_path: Path) -> None:
    writer = MemoryWriter()
    meter = Meter(load_settings(spool_dir=tmp_path, usage_flush_interval_ms=10,
                                writer_max_backoff_sec=0.05), writer)
    await meter.start()
    try:
        meter.submit(record(0))
        refused = False
        try:
            meter.submit(record_of_line_length(1, MAX_RECORD_BYTES + 1))
        except (ValueError, OSError):
            refused = True  # refusing it up front would do
        meter.submit(record(2))
        await settled(meter)
    finally:
        await meter.close(within=0.3)  # settled already, unless the test fails
    assert [r.prompt_tokens for r in writer.stored] == [0, 2]
    assert refused or meter.spool.stats.dead_letters == 1


def test_a_record_over_the_size_limit_does_not_take_the_records_after_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=4 << 20)
    spool.open()
    spool.append(record(0))
    refused = False
    try:
        spool.append(record_of_line_length(1, MAX_RECORD_BYTES + 1))
    except (ValueError, OSError):
        refused = True
    spool.append(record(2))
    spool.append(record(3))
    crash(spool)
    after = Spool(tmp_path, segment_bytes=4 << 20)
    after.open()  # the replay reads a sealed segment
    seen, bad = drain(after)
    after.close()
    assert seen == [0, 2, 3]
    assert refused or bad == 1


# -- Postgres lost in the middle of a COPY -------------------------------------------------------

HOLD_KEY = 0x7E57_5F00  # an advisory lock key of this test's own
HELD_INSTANCE = "held-mid-copy"


@pytest.fixture(scope="module")
def copy_db(admin_url: str) -> Iterator[str]:
    """A migrated database of this module's own, where inserting the row of instance
    ``held-mid-copy`` waits on an advisory lock the test holds: a COPY stops in its middle."""
    name = f"spool_faults_{uuid.uuid4().hex[:8]}"
    url = f"{admin_url.rpartition('/')[0]}/{name}"

    async def create() -> None:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"""
                CREATE FUNCTION public.hold_copy() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    PERFORM pg_advisory_lock_shared({HOLD_KEY});
                    PERFORM pg_advisory_unlock_shared({HOLD_KEY});
                    RETURN NEW;
                END $$;
                CREATE TRIGGER hold_copy BEFORE INSERT ON inference.requests FOR EACH ROW
                  WHEN (NEW.instance_id = '{HELD_INSTANCE}') EXECUTE FUNCTION public.hold_copy();
            """)
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    yield url
    asyncio.run(drop())


_BLOCKED_COPY = """
SELECT pid FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE 'COPY %'
   AND wait_event_type = 'Lock' AND wait_event = 'advisory'
"""


async def test_postgres_lost_mid_copy_the_batch_is_rewound_and_stored_once(
    copy_db: str, admin_url: str, tmp_path: Path
) -> None:
    org = f"org-{uuid.uuid4().hex[:12]}"
    db = copy_db.rpartition("/")[2]
    admin = await asyncpg.connect(copy_db)
    server = await asyncpg.connect(admin_url)  # another database: to refuse connections to this
    await admin.execute("SELECT pg_advisory_lock($1)", HOLD_KEY)
    settings = load_settings(spool_dir=tmp_path, database_url=copy_db, usage_batch_size=1000,
                             usage_flush_interval_ms=10, writer_max_backoff_sec=0.05)
    meter = Meter(settings)  # the real PostgresWriter
    await meter.start()
    try:
        # One batch of 1,000 records, COPYed in 8 statements of 125 in one transaction; the
        # 601st row (in the fifth statement) waits on the lock.
        batch = [record(i, org, HELD_INSTANCE if i == 600 else "i") for i in range(1000)]
        for r in batch:
            meter.submit(r)
        pid = await until(lambda: admin.fetchval(_BLOCKED_COPY), "the COPY reached the row")
        assert await admin.fetchval(  # rows of the batch are written, in an open transaction
            "SELECT backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = $1", pid)

        # Postgres goes away for this database: the backend is killed in the middle of its
        # COPY, and new connections are refused for a while.
        await server.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await until(lambda: meter.health.failures >= 3, "the writer retried while refused")
        assert not meter.health.database_ok
        later = [record(i, org) for i in range(1000, 1100)]
        for r in later:  # requests go on being served meanwhile
            meter.submit(r)
        assert await admin.fetchval(
            "SELECT count(*) FROM inference.requests WHERE organization_id = $1", org) == 0

        await server.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await admin.execute("SELECT pg_advisory_unlock($1)", HOLD_KEY)
        await until(lambda: meter.health.database_ok, "the writer caught up")
        assert await meter.flush(15)
        stored = await admin.fetch(
            "SELECT request_id::text AS id, count(*) AS n FROM inference.requests "
            "WHERE organization_id = $1 GROUP BY 1", org)
    finally:
        await server.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await server.close()
        await admin.close()
        await meter.close(within=0.3)
    assert sorted((r["id"], r["n"]) for r in stored) == sorted(
        (r.request_id, 1) for r in batch + later)
    assert meter.health.written == 1100
    assert meter.spool.stats == SpoolStats(appended=1100, acknowledged=1100)
    assert not (tmp_path / DEAD_LETTER_FILE).exists()
