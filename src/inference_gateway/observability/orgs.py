"""Which organizations get a label: the biggest ``METRICS_MAX_ORGS``, the rest ``other``.

Organization ids come from clients, so a label per id would grow without end (the memory leak
of gateways that label by tenant). The labelled set is one per gateway instance, in a small
file every worker reads, so that a series is counted under the same name by every worker and
stays monotonic:

* an organization that is not labelled counts under ``other`` and is weighed (tokens + 1 per
  request, decaying with a half-life of ``HALF_LIFE_SEC``) among a bounded set of candidates;
* while there is room, the heaviest candidate is labelled; once the set is full, it replaces
  the lightest labelled organization that has held its label ``TENURE_SEC``, if it weighs
  at least twice as much. A replaced organization's series ends; what it sends next counts
  under ``other``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

OTHER = "other"
HALF_LIFE_SEC = 300.0
TENURE_SEC = 600.0
REPLACE_RATIO = 2.0
MIN_CANDIDATES = 32


class OrgLabels:
    """This worker's copy of the labelled set, and its weights of the organizations it sees."""

    def __init__(self, limit: int, directory: Path | None) -> None:
        self.limit = limit
        self._path = None if directory is None else directory / "orgs.json"
        self._lock = None if directory is None else directory / "orgs.lock"
        self._labelled: dict[str, list[float]] = {}  # org → [weight]
        self._since: dict[str, float] = {}  # org → when it was labelled
        self._candidates: dict[str, float] = {}
        self._capacity = max(MIN_CANDIDATES, 4 * limit)
        self._stamp: tuple[int, int] | None = None
        self._ticked = time.monotonic()

    def label(self, org: str, weight: float) -> str:
        """The label to count ``org`` under (on the request path: two dictionary operations)."""
        entry = self._labelled.get(org)
        if entry is not None:
            entry[0] += weight
            return org
        candidates = self._candidates
        candidates[org] = candidates.get(org, 0.0) + weight
        if len(candidates) > 2 * self._capacity:
            self._trim()
        return OTHER

    def labelled(self) -> frozenset[str]:
        return frozenset(self._labelled)

    def _trim(self) -> None:
        keep = sorted(self._candidates.items(), key=lambda kv: kv[1], reverse=True)
        self._candidates = dict(keep[:self._capacity])

    # -- once a second, off the request path --------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Decay the weights, take in the shared set, and propose the heaviest candidate."""
        mono = time.monotonic()
        factor = 0.5 ** ((mono - self._ticked) / HALF_LIFE_SEC)
        self._ticked = mono
        for entry in self._labelled.values():
            entry[0] *= factor
        for org in self._candidates:
            self._candidates[org] *= factor
        self.sync()
        if self._candidates and self.limit > 0:
            self._propose(time.time() if now is None else now)

    def sync(self) -> None:
        """Take in the shared set if another worker changed it."""
        if self._path is None:
            return
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            self._adopt(self._read())

    def _read(self) -> dict[str, float]:
        assert self._path is not None
        try:
            raw = orjson.loads(self._path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return dict(self._since)
        if not isinstance(raw, dict):
            return dict(self._since)
        return {str(org): float(since) for org, since in raw.items()
                if isinstance(since, float | int)}

    def _adopt(self, labelled: dict[str, float]) -> None:
        for org in list(self._labelled):
            if org not in labelled:
                del self._labelled[org]
        for org in labelled:
            if org not in self._labelled:
                self._labelled[org] = [self._candidates.pop(org, 0.0)]
        self._since = labelled

    def _propose(self, now: float) -> None:
        best = max(self._candidates, key=self._candidates.__getitem__)
        weight = self._candidates[best]
        if best == OTHER:  # an organization named "other" stays in the bucket of that name
            del self._candidates[best]
            return
        with self._locked():
            labelled = self._read() if self._path is not None else dict(self._since)
            if best in labelled:
                self._adopt(labelled)
                return
            if len(labelled) >= self.limit:
                settled = [org for org, since in labelled.items() if now - since >= TENURE_SEC]
                lightest = min(settled, key=self._weight, default=None)
                if lightest is None or weight < REPLACE_RATIO * max(self._weight(lightest), 1.0):
                    return
                del labelled[lightest]
            labelled[best] = now
            self._write(labelled)
            self._adopt(labelled)

    def _weight(self, org: str) -> float:
        entry = self._labelled.get(org)
        return entry[0] if entry is not None else 0.0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock is None:
            yield
            return
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, labelled: dict[str, float]) -> None:
        if self._path is None:
            return
        tmp = self._path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(labelled))
        os.replace(tmp, self._path)
        st = os.stat(self._path)
        self._stamp = (st.st_mtime_ns, st.st_size)
