"""An append-only spool of usage records on local disk.

A record is appended here before the client's response is finished, so a crashed process loses
nothing it already answered: the writer drains the spool into Postgres and acknowledges what
Postgres committed. Each process owns its own segment files, held with ``flock``; segments whose
lock nobody holds were left by a process that died and are claimed and replayed by whoever finds
them first.

File format: one record per line, ``<crc32 as 8 hex digits> <record JSON>\\n``. A segment's
acknowledged offset lives next to it in ``<segment>.ack``, replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from inference_gateway.metering.record import UsageRecord
from inference_gateway.metering.spool_lines import count_lines

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".log"
ACK_SUFFIX = ".ack"
DEAD_LETTER_FILE = "dead-letter.jsonl"
MAX_RECORD_BYTES = 1024 * 1024
READ_BYTES_PER_RECORD = 512  # a record line is about 400 bytes
# Records a process appended and the writer has not read yet, kept to be handed over as they
# are rather than read back and parsed (most of the writer's work); past this many (Postgres
# away, or behind), the rest is read from the file. About 540 bytes each: 9 MB at most.
MAX_FRESH = 16384


def encode_line(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_line(line: bytes) -> bytes | None:
    """The payload of one line (without its newline), or None if the checksum does not match."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:]
    try:
        expected = int(line[:8], 16)
    except ValueError:
        return None
    return payload if zlib.crc32(payload) == expected else None


def read_ack(segment: Path) -> int:
    """How far a segment was acknowledged; 0 (replay it all) when the file says nothing sound.

    A replay is harmless (the writer skips rows that are in Postgres already); an offset that
    is not one would make every read of the segment fail.
    """
    try:
        offset = int(segment.with_suffix(ACK_SUFFIX).read_text().strip() or "0")
    except (FileNotFoundError, ValueError):
        return 0
    return max(offset, 0)


def write_ack(segment: Segment, offset: int) -> None:
    """Overwrite the segment's acknowledged offset in place: one small write, no new file.

    The offset has a fixed width, so a write never leaves a shorter number's digits behind.
    An acknowledgement lost to a crash only means a replay, which the writer makes harmless.
    """
    if segment.ack_fd is None:
        segment.ack_fd = os.open(segment.path.with_suffix(ACK_SUFFIX),
                                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.pwrite(segment.ack_fd, b"%020d\n" % offset, 0)


@dataclass
class Segment:
    path: Path
    fd: int
    size: int
    acked: int
    read_pos: int
    active: bool  # this process is still appending to it
    ack_fd: int | None = None
    fresh: deque[tuple[int, int, UsageRecord]] = field(default_factory=deque)  # start, end

    @property
    def pending_bytes(self) -> int:
        return self.size - self.acked


@dataclass
class Batch:
    segment: Segment
    records: list[UsageRecord]
    end_offset: int
    bad_lines: list[bytes] = field(default_factory=list)
    kept: bool = False  # handed over as appended, not read from the file


@dataclass
class SpoolStats:
    torn: int = 0  # half-written last lines skipped in segments left by a crash
    corrupt: int = 0  # lines whose checksum did not match
    dead_letters: int = 0
    dropped: int = 0  # records not spooled because the spool was full (policy "drop")
    appended: int = 0  # records this process appended
    replayed: int = 0  # records pending in the segments it claimed from dead processes
    acknowledged: int = 0  # lines acknowledged (records and unreadable ones)


class Spool:
    """The segments one process owns: the one it appends to, and any it claimed for replay."""

    def __init__(self, directory: Path, segment_bytes: int, sync_always: bool = False) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.sync_always = sync_always
        self.stats = SpoolStats()
        self._segments: list[Segment] = []
        self._active: Segment | None = None
        self._dirty = False
        self._seq = 0

    # -- appending (request path) -------------------------------------------------------------

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.claim_orphans()
        self._rotate()

    def append(self, record: UsageRecord) -> None:
        """Append one record. A plain write to the page cache: survives a process crash."""
        active = self._active
        if active is None:
            raise RuntimeError("spool is not open")
        line = encode_line(record.to_json())
        if len(line) > MAX_RECORD_BYTES:  # the reader could not tell it from a torn tail
            raise ValueError(f"a usage record of {len(line)} bytes is longer than the spool's "
                             f"limit of {MAX_RECORD_BYTES}")
        written = os.write(active.fd, line)
        if written != len(line):  # disk full: cut the torn tail so the file stays well-formed
            os.ftruncate(active.fd, active.size)
            raise OSError("short write to the usage spool")
        if len(active.fresh) < MAX_FRESH:
            active.fresh.append((active.size, active.size + written, record))
        active.size += written
        self.stats.appended += 1
        self._dirty = True
        if self.sync_always:
            os.fsync(active.fd)
            self._dirty = False
        if active.size >= self.segment_bytes:
            self._rotate()

    def sync_handle(self) -> int | None:
        """A duplicate of the active segment's descriptor to fsync, if anything was appended.

        An fsync takes a disk round trip; the caller runs it (and closes the duplicate) on
        another thread, and a rotation or removal in the meantime cannot close it under it.
        """
        if not self._dirty or self._active is None:
            return None
        self._dirty = False
        return os.dup(self._active.fd)

    def _rotate(self) -> None:
        if self._active is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._active.fd)
            self._active.active = False
        self._seq += 1
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{self._seq}{SEGMENT_SUFFIX}"
        path = self.directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        segment = Segment(path, fd, 0, 0, 0, active=True)
        self._segments.append(segment)
        self._active = segment
        self._dirty = False

    # -- replaying what dead processes left ----------------------------------------------------

    def claim_orphans(self) -> int:
        """Take over segments whose owner is gone. Returns how many were claimed."""
        owned = {s.path for s in self._segments}
        claimed = 0
        for path in sorted(self.directory.glob(f"seg-*{SEGMENT_SUFFIX}")):
            if path in owned:
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if not path.exists():  # removed by its previous owner after our open
                os.close(fd)
                continue
            size = os.fstat(fd).st_size
            acked = min(read_ack(path), size)
            segment = Segment(path, fd, size, acked, acked, active=False)
            # Orphans go before this process's own segments: they are older.
            self._segments.insert(claimed, segment)
            claimed += 1
            if acked < size:
                self.stats.replayed += count_lines(fd, acked, size)
                log.info("spool: replaying %s (%d bytes pending)", path.name, size - acked)
        return claimed

    # -- draining (writer) ----------------------------------------------------------------------

    def read_batch(self, max_records: int, max_parsed: int | None = None) -> Batch | None:
        """The next run of unacknowledged records from the oldest segment that has any; at
        most ``max_parsed`` of them read from the file (parsing them takes time)."""
        for segment in self._segments:
            if segment.read_pos >= segment.size:
                continue
            fresh = segment.fresh
            while fresh and fresh[0][0] < segment.read_pos:  # read from the file already
                fresh.popleft()
            if fresh and fresh[0][0] == segment.read_pos:
                return _read_fresh(segment, max_records)
            return self._read(segment, min(max_records, max_parsed or max_records))
        return None

    def _read(self, segment: Segment, max_records: int) -> Batch:
        left = segment.size - segment.read_pos
        data = os.pread(segment.fd, min(max_records * READ_BYTES_PER_RECORD, left),
                        segment.read_pos)
        if b"\n" not in data and len(data) < left:  # a record longer than the usual ones
            data = os.pread(segment.fd, min(MAX_RECORD_BYTES, left), segment.read_pos)
        batch = Batch(segment, [], segment.read_pos)
        pos = 0
        while len(batch.records) < max_records:
            nl = data.find(b"\n", pos)
            if nl == -1:
                break
            line = data[pos:nl]
            pos = nl + 1
            payload = decode_line(line)
            record = None
            if payload is not None:
                try:
                    record = UsageRecord.from_json(payload)
                except (ValueError, TypeError):
                    record = None
            if record is None:
                self.stats.corrupt += 1
                batch.bad_lines.append(line)
                log.error("spool: skipping a corrupt line in %s", segment.path.name)
            else:
                batch.records.append(record)
        end = segment.read_pos + pos
        if pos == 0 and not batch.records and not batch.bad_lines:
            # No complete line left. In a segment nobody appends to any more, the rest is the
            # torn tail of a write the crash interrupted: skip it and say so.
            if not segment.active:
                self.stats.torn += 1
                log.warning("spool: skipping a torn last record (%d bytes) in %s",
                            segment.size - segment.read_pos, segment.path.name)
                end = segment.size
            elif len(data) >= MAX_RECORD_BYTES:
                raise RuntimeError(f"a record longer than {MAX_RECORD_BYTES} bytes in "
                                   f"{segment.path}")
        batch.end_offset = end
        segment.read_pos = end
        return batch

    def ack(self, batch: Batch) -> None:
        """Record that everything up to the batch's end is in Postgres; drop finished segments."""
        segment = batch.segment
        segment.acked = batch.end_offset
        self.stats.acknowledged += len(batch.records) + len(batch.bad_lines)
        if not segment.active and segment.acked >= segment.size:
            self._remove(segment)
        else:
            write_ack(segment, segment.acked)

    def rewind(self, batch: Batch) -> None:
        """Make a batch that could not be written readable again."""
        batch.segment.read_pos = min(batch.segment.read_pos, batch.segment.acked)

    def _remove(self, segment: Segment) -> None:
        for path in (segment.path, segment.path.with_suffix(ACK_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _close_fds(segment)
        self._segments.remove(segment)

    # -- accounting -------------------------------------------------------------------------------

    def pending_bytes(self) -> int:
        return sum(s.pending_bytes for s in self._segments)

    def has_pending(self) -> bool:
        return any(s.acked < s.size for s in self._segments)

    def oldest_pending(self) -> tuple[int, int, int] | None:
        """Where the oldest unacknowledged record is: descriptor, offset, segment size."""
        return next(((s.fd, s.acked, s.size) for s in self._segments if s.acked < s.size), None)

    def dead_letter(self, line: bytes, reason: str) -> None:
        """Set a record Postgres will never take aside, with the reason, and count it."""
        entry = b'{"reason": %s, "line": %s}\n' % (_json_str(reason), _json_str(
            line.decode("utf-8", "replace")))
        fd = os.open(self.directory / DEAD_LETTER_FILE,
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, entry)
        finally:
            os.close(fd)
        self.stats.dead_letters += 1

    def close(self) -> None:
        """Release every segment; what is not acknowledged stays on disk for the next start."""
        for segment in list(self._segments):
            if segment.active:
                with contextlib.suppress(OSError):
                    os.fsync(segment.fd)
                segment.active = False
            if segment.acked >= segment.size:
                self._remove(segment)
            else:
                write_ack(segment, segment.acked)
                _close_fds(segment)
                self._segments.remove(segment)
        self._active = None


def _read_fresh(segment: Segment, max_records: int) -> Batch:
    """The records just appended from ``read_pos`` on, as they were appended: the same lines
    the file holds (the file stays what acknowledgements and replays go by)."""
    batch = Batch(segment, [], segment.read_pos, kept=True)
    fresh, records, end = segment.fresh, batch.records, segment.read_pos
    while fresh and fresh[0][0] == end and len(records) < max_records:
        _, end, record = fresh.popleft()
        records.append(record)
    batch.end_offset = segment.read_pos = end
    return batch


def _close_fds(segment: Segment) -> None:
    os.close(segment.fd)
    if segment.ack_fd is not None:
        os.close(segment.ack_fd)
        segment.ack_fd = None


def _json_str(text: str) -> bytes:
    return orjson.dumps(text)
