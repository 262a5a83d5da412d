"""Sampling a gateway worker with py-spy while it is under load, and summing up where it spends
its time: own time (the innermost Python frame of each sample) and total time (any frame on the
stack) per function.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


def py_spy() -> str | None:
    """The py-spy command, installed into the project's virtualenv if it is missing."""
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    found = shutil.which("py-spy")
    if found:
        return found
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not local.exists():
        return None
    return str(local)


def record(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` (without pausing it) into a raw folded-stack file."""
    command = py_spy()
    if command is None:
        raise RuntimeError("py-spy is not installed and could not be installed")
    log = out.with_suffix(".log").open("wb")
    return subprocess.Popen(
        [command, "record", "--pid", str(pid), "--duration", str(int(seconds)),
         "--rate", str(rate), "--format", "raw", "--function", "--nonblocking",
         "--output", str(out)],
        stdout=log, stderr=subprocess.STDOUT,
    )


@dataclass
class FrameTime:
    frame: str
    own: float  # share of all samples where this frame was innermost
    total: float  # share of all samples where this frame was anywhere on the stack


def summarise(raw: Path, top: int = 15) -> tuple[int, list[FrameTime], list[FrameTime]]:
    """(samples, top frames by own time, top frames by total time) of a py-spy raw file."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        # py-spy puts the process and thread at the root of each stack; they are not code.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count

    def table(counter: Counter[str]) -> list[FrameTime]:
        return [FrameTime(frame, round(own[frame] / samples, 4), round(total[frame] / samples, 4))
                for frame, _ in counter.most_common(top)]

    return samples, table(own) if samples else [], table(total) if samples else []


def _short(frame: str) -> str:
    """``fn (/long/path/site-packages/aiohttp/web_protocol.py:123)`` as ``fn (aiohttp/...:123)``."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    for marker in ("site-packages/", "/src/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "lib/python3":
                where = "stdlib" + where[where.index("/"):] if "/" in where else where
            break
    return f"{name} ({where}"
