"""Reading a spool segment's lines for accounting, without disturbing the writer's reads.

Both use ``pread`` on the segment's descriptor, so the writer's position is not moved.
"""

from __future__ import annotations

import os

import orjson

CHUNK_BYTES = 1024 * 1024
FIRST_READ_BYTES = 2048  # a record line is about 400 bytes
MAX_LINE_BYTES = 1024 * 1024 + 16


def count_lines(fd: int, start: int, end: int) -> int:
    """Complete lines between two offsets (a torn last line is not a record)."""
    lines = 0
    while start < end:
        data = os.pread(fd, min(CHUNK_BYTES, end - start), start)
        if not data:
            break
        lines += data.count(b"\n")
        start += len(data)
    return lines


def completed_at(fd: int, offset: int, size: int) -> float | None:
    """The ``completed_at`` of the record that starts at ``offset``; None if unreadable."""
    data = os.pread(fd, min(FIRST_READ_BYTES, size - offset), offset)
    if b"\n" not in data and len(data) < size - offset:
        data = os.pread(fd, min(MAX_LINE_BYTES, size - offset), offset)
    line, found, _ = data.partition(b"\n")
    if not found or len(line) < 10:
        return None
    try:
        value = orjson.loads(line[9:]).get("completed_at")  # after "<crc32> "
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return float(value) if isinstance(value, float | int) else None
