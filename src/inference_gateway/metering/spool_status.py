"""What is waiting in a spool directory, for an operator: read without disturbing the
processes that append to it and drain it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from inference_gateway.metering.record import UsageRecord
from inference_gateway.metering.spool import (
    DEAD_LETTER_FILE,
    SEGMENT_SUFFIX,
    decode_line,
    read_ack,
)


@dataclass
class SpoolStatus:
    segments: int
    pending_records: int
    pending_bytes: int
    oldest_pending_age_sec: float | None
    dead_letters: int
    torn: int


def iter_pending_lines(path: Path) -> Iterator[bytes]:
    """Complete unacknowledged lines of one segment file (for reporting, not draining)."""
    acked = read_ack(path)
    with path.open("rb") as f:
        f.seek(acked)
        for line in f:
            if line.endswith(b"\n"):
                yield line[:-1]


def spool_status(directory: Path, now: float | None = None) -> SpoolStatus:
    """What is waiting in a spool directory, read without disturbing the processes using it."""
    now = time.time() if now is None else now
    segments = sorted(directory.glob(f"seg-*{SEGMENT_SUFFIX}")) if directory.exists() else []
    records = 0
    pending = 0
    torn = 0
    oldest: float | None = None
    for path in segments:
        try:
            size = path.stat().st_size
            pending += max(size - read_ack(path), 0)
            last_complete = True
            for line in iter_pending_lines(path):
                payload = decode_line(line)
                if payload is None:
                    continue
                records += 1
                if oldest is None:
                    with contextlib.suppress(ValueError, TypeError):
                        oldest = UsageRecord.from_json(payload).completed_at
            with path.open("rb") as f:
                if size:
                    f.seek(size - 1)
                    last_complete = f.read(1) == b"\n"
            torn += 0 if last_complete else 1
        except FileNotFoundError:
            continue
    dead = 0
    dead_path = directory / DEAD_LETTER_FILE
    if dead_path.exists():
        with dead_path.open("rb") as f:
            dead = sum(1 for _ in f)
    return SpoolStatus(
        segments=len(segments),
        pending_records=records,
        pending_bytes=pending,
        oldest_pending_age_sec=None if oldest is None else max(now - oldest, 0.0),
        dead_letters=dead,
        torn=torn,
    )
