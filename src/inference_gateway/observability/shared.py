"""How the workers of one gateway instance see each other's numbers: a small file each.

Workers are forked processes sharing the port, so a scrape reaches one of them at random. Each
worker writes its snapshot to ``w-<pid>.json`` in the metrics directory about once a second
(only when it changed; an atomic rename, so a reader never sees half a file) and holds an
``flock`` on ``w-<pid>.lock`` for as long as it lives. The worker that answers a scrape adds the
others' files to its own numbers, taken fresh. Why files rather than shared memory or a socket
per worker: the request path keeps plain Python numbers (no locking, no serialising), a dead
worker's counters stay readable, and what it costs is one small write per worker per second.

A worker that died leaves its file behind, unlocked: its counters are still counted (its gauges
are not), and the next worker to start adopts them, so a crash never sets a counter back.
Adopting and reading hold ``adopt.lock`` (exclusively and shared), so no scrape sees a
dead worker's counters twice or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from inference_gateway.observability.series import Snapshot, counters_only, loads, merge
from inference_gateway.settings import ConfigError, Settings

log = logging.getLogger(__name__)

PREFIX = "w-"


def directory(settings: Settings) -> Path:
    """``METRICS_DIR``, by default beside the spool: one gateway instance's own directory."""
    return settings.metrics_dir or settings.spool_dir / "metrics"


def clear(directory: Path) -> None:
    """A new gateway starts its counters at zero: remove the files a previous run left (and
    nothing else: ``METRICS_DIR`` may name a directory that holds other things too)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"invalid METRICS_DIR: cannot create {directory}: "
                          f"{exc.strerror or exc}") from None
    for pattern in (f"{PREFIX}*.json", f"{PREFIX}*.lock", f"{PREFIX}*.tmp", "orgs.*",
                    "adopt.lock"):
        for path in directory.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class WorkerFiles:
    """This worker's file, and the other workers' as read at a scrape."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self._data = directory / f"{PREFIX}{self.pid}.json"
        self._lock_fd: int | None = None
        self._last: bytes | None = None

    @contextlib.contextmanager
    def _adoption(self, mode: int) -> Iterator[None]:
        fd = os.open(self.directory / "adopt.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def open(self, write_first: bytes) -> Snapshot:
        """Take this worker's lock, adopt what dead workers left; returns their counters.

        ``write_first`` is this worker's first snapshot, written under the same lock, so a
        scrape sees the adopted counters in exactly one place. It is written again (with the
        adopted counters in it) by the caller's next ``write``.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        adopted: Snapshot = {}
        with self._adoption(fcntl.LOCK_EX):
            fd = os.open(self.directory / f"{PREFIX}{self.pid}.lock",
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
            dead = [path for path, alive in self._others() if not alive]
            if self._data.exists():  # a dead worker whose process id this one was given
                dead.append(self._data)
            for path in dead:
                with contextlib.suppress(OSError, ValueError):
                    merge(adopted, counters_only(loads(path.read_bytes())))
            self._replace(write_first)
            for path in dead:
                if path == self._data:
                    continue
                for gone in (path, path.with_suffix(".lock")):
                    with contextlib.suppress(FileNotFoundError):
                        gone.unlink()
        if dead:
            log.info("metrics: adopted the counters of %d worker(s) that died", len(dead))
        return adopted

    def write(self, data: bytes) -> None:
        """Replace this worker's file, if what it holds changed."""
        if data != self._last:
            self._replace(data)

    def _replace(self, data: bytes) -> None:
        tmp = self._data.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self._data)
        self._last = data

    def others(self) -> list[tuple[Snapshot, bool]]:
        """The other workers' snapshots, and whether each worker is alive."""
        found: list[tuple[Snapshot, bool]] = []
        with self._adoption(fcntl.LOCK_SH):
            for path, alive in self._others():
                try:
                    found.append((loads(path.read_bytes()), alive))
                except (OSError, ValueError):
                    continue
        return found

    def _others(self) -> list[tuple[Path, bool]]:
        found: list[tuple[Path, bool]] = []
        for path in sorted(self.directory.glob(f"{PREFIX}*.json")):
            if path == self._data:
                continue
            found.append((path, _alive(path.with_suffix(".lock"))))
        return found

    def close(self, last: bytes) -> None:
        """The final snapshot, then the lock goes: the next worker adopts the counters."""
        with contextlib.suppress(OSError):
            self._replace(last)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _alive(lock: Path) -> bool:
    """A worker holds its lock for as long as it lives."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
