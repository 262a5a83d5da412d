"""The spool's file format and its recovery rules, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inference_gateway.metering import spool as spool_module
from inference_gateway.metering.record import UsageRecord
from inference_gateway.metering.spool import Spool, decode_line, encode_line
from inference_gateway.metering.spool_status import spool_status


def record(i: int) -> UsageRecord:
    return UsageRecord(f"00000000-0000-4000-8000-{i:012d}", "o", "i", "m", "m", "/v1/x",
                       i, i + 1, 200, False, False, 1, 1, 1000.0 + i, 1001.0 + i)


def drain(spool: Spool) -> list[UsageRecord]:
    out: list[UsageRecord] = []
    while (batch := spool.read_batch(1000)) is not None:
        out.extend(batch.records)
        spool.ack(batch)
    return out


def test_line_checksum() -> None:
    line = encode_line(b'{"a":1}')
    assert decode_line(line[:-1]) == b'{"a":1}'
    assert decode_line(line[:-1].replace(b"1", b"2")) is None
    assert decode_line(b"garbage") is None


def test_append_read_ack_and_rotation(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1024)
    spool.open()
    for i in range(30):
        spool.append(record(i))
    # A segment is sealed by the append that takes it to 1 KiB or more; a new one is opened.
    segments, size = 1, 0
    for i in range(30):
        size += len(encode_line(record(i).to_json()))
        if size >= 1024:
            segments, size = segments + 1, 0
    assert segments > 1
    assert len(list(tmp_path.glob("seg-*.log"))) == segments
    assert [r.prompt_tokens for r in drain(spool)] == list(range(30))
    assert not spool.has_pending()
    # Sealed, fully acknowledged segments are removed; only the active one is left.
    assert len(list(tmp_path.glob("seg-*.log"))) == 1
    spool.close()
    assert list(tmp_path.glob("seg-*")) == []


def test_crash_leaves_records_that_the_next_process_replays(tmp_path: Path) -> None:
    first = Spool(tmp_path, segment_bytes=1 << 20)
    first.open()
    for i in range(5):
        first.append(record(i))
    batch = first.read_batch(2)
    assert batch is not None
    first.ack(batch)  # two records reached Postgres before the "crash"
    for seg in first._segments:  # a crash: the descriptors go, nothing is cleaned up
        os.close(seg.fd)

    second = Spool(tmp_path, segment_bytes=1 << 20)
    second.open()
    assert [r.prompt_tokens for r in drain(second)] == [2, 3, 4]


def test_torn_last_write_is_skipped_and_reported(tmp_path: Path) -> None:
    first = Spool(tmp_path, segment_bytes=1 << 20)
    first.open()
    for i in range(3):
        first.append(record(i))
    active = first._segments[-1]
    half = encode_line(record(3).to_json())[:25]
    os.write(active.fd, half)  # the process died in the middle of this write
    for seg in first._segments:
        os.close(seg.fd)

    second = Spool(tmp_path, segment_bytes=1 << 20)
    second.open()
    assert [r.prompt_tokens for r in drain(second)] == [0, 1, 2]
    assert second.stats.torn == 1
    assert not second.has_pending()


def test_corrupt_line_is_set_aside_not_blocking(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1 << 20)
    spool.open()
    spool.append(record(0))
    os.write(spool._segments[-1].fd, b"0badc0de {\"broken\": true}\n")
    spool._segments[-1].size += 26
    spool.append(record(1))
    batches = list(iter(lambda: spool.read_batch(100), None))
    assert [r.prompt_tokens for batch in batches for r in batch.records] == [0, 1]
    assert sum(len(batch.bad_lines) for batch in batches) == 1 and spool.stats.corrupt == 1


def test_live_owner_keeps_its_segments(tmp_path: Path) -> None:
    owner = Spool(tmp_path, segment_bytes=1 << 20)
    owner.open()
    owner.append(record(0))
    other = Spool(tmp_path, segment_bytes=1 << 20)
    other.open()
    assert other.read_batch(10) is None  # the owner's flock keeps the segment its own
    owner.close()
    assert other.claim_orphans() == 1
    assert [r.prompt_tokens for r in drain(other)] == [0]


def test_status_counts_pending_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1 << 20)
    spool.open()
    for i in range(4):
        spool.append(record(i))
    batch = spool.read_batch(1)
    assert batch is not None
    spool.ack(batch)
    spool.dead_letter(b"x", "rejected")
    status = spool_status(tmp_path, now=2000.0)
    assert status.pending_records == 3
    assert status.dead_letters == 1
    assert status.oldest_pending_age_sec == 2000.0 - 1002.0


def test_a_record_longer_than_a_read_slice_is_read_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1 << 20)
    spool.open()
    long_model = "m" * 40_000  # far more than the bytes one small read asks for
    spool.append(record(0))
    spool.append(UsageRecord("00000000-0000-4000-8000-000000000001", "o", "i", long_model,
                             long_model, "/v1/x", 7, 8, 200, False, False, 1, 1, 1.0, 2.0))
    spool.append(record(2))
    seen: list[UsageRecord] = []
    while (batch := spool.read_batch(1)) is not None:
        assert not batch.bad_lines
        seen.extend(batch.records)
        spool.ack(batch)
    assert [r.prompt_tokens for r in seen] == [0, 7, 2]
    assert seen[1].model == long_model
    spool.close()


def test_sync_handle_only_when_something_was_appended(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1 << 20)
    spool.open()
    assert spool.sync_handle() is None
    spool.append(record(0))
    handle = spool.sync_handle()
    assert handle is not None
    os.fsync(handle)  # a descriptor of its own: usable after the spool moved on, then closed
    os.close(handle)
    assert spool.sync_handle() is None
    spool.close()


def test_records_just_appended_are_handed_over_as_the_file_has_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer gets a process's own new records without reading them back; a batch it
    could not write, records past the ones kept, and a replay come from the file, alike."""
    monkeypatch.setattr(spool_module, "MAX_FRESH", 5)
    spool = Spool(tmp_path, segment_bytes=1 << 20)
    spool.open()
    appended = [record(i) for i in range(8)]
    for item in appended:
        spool.append(item)
    first = spool.read_batch(3)
    assert first is not None and first.records == appended[:3]
    assert all(got is sent for got, sent in zip(first.records, appended, strict=False))
    spool.rewind(first)  # Postgres refused it: read again, from the file
    again = spool.read_batch(4)
    assert again is not None and again.records == appended[:4]
    assert again.records[0] is not appended[0] and again.end_offset > first.end_offset
    rest = drain(spool)  # one kept in memory (the fifth), then past what was kept
    assert rest == appended[4:]
    assert rest[0] is appended[4] and rest[1] is not appended[5]
    assert not spool.has_pending()

    spool.append(record(8))  # a process that dies before its writer read it
    spool._segments[-1].active = False
    os.close(spool._segments[-1].fd)
    later = Spool(tmp_path, segment_bytes=1 << 20)
    later.open()
    assert drain(later) == [record(8)]


def test_records_kept_are_read_at_once_and_the_file_in_slices(tmp_path: Path) -> None:
    """Parsing the file takes time, so the writer reads it a slice at a time; records handed
    over as they were appended are taken all at once."""
    spool = Spool(tmp_path, segment_bytes=1 << 20)
    spool.open()
    for i in range(100):
        spool.append(record(i))
    kept = spool.read_batch(1000, 16)
    assert kept is not None and kept.kept and len(kept.records) == 100
    spool.rewind(kept)
    from_file = spool.read_batch(1000, 16)
    assert from_file is not None and not from_file.kept and len(from_file.records) == 16
    fewer = spool.read_batch(5, 16)  # and never more than asked for
    assert fewer is not None and len(fewer.records) == 5
