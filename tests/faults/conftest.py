"""A Postgres cluster of the fault tests' own, so they can stop it without disturbing others."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from inference_gateway.db.migrate import migrate

from harness import ROOT, free_port

PGBIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@dataclass
class Cluster:
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(
            _as_postgres([str(PGBIN / "pg_ctl"), "-D", str(self.data), "-l",
                          str(self.data / "log"), "-w", "-t", "60", "start", "-o",
                          f"-p {self.port} -c listen_addresses=127.0.0.1 "
                          f"-c unix_socket_directories={self.data}"]),
            check=True, stdout=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(PGBIN / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                                     "-w", "stop"]), check=False, stdout=subprocess.DEVNULL)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A new, migrated cluster (about two seconds to make)."""
    base = ROOT / ".dev" / "fault-pg"
    data = base / f"data-{os.getpid()}-{free_port()}"
    data.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(_as_postgres([str(PGBIN / "initdb"), "-D", str(data), "-U", "postgres",
                                 "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]),
                   check=True, stdout=subprocess.DEVNULL)
    cluster = Cluster(data, free_port())
    cluster.start()
    asyncio.run(migrate(cluster.url))
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(data, ignore_errors=True)
