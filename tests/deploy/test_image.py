"""The gateway's image, built here with podman and run against the dev Postgres.

The build (deploy/image/build.sh) makes its Debian base once and caches it under .dev/image/;
later builds reuse it and podman's layers. Containers use the host's network, so they reach the
simulator and Postgres on 127.0.0.1 like any process on this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from inference_gateway.db.migrate import migrate

from harness import ROOT, Proc, free_port, wait_http

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
UID = 10001  # the image's user

pytestmark = [
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed (scripts/test.sh installs it as root)"),
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="the base image is made with debootstrap, which needs root"),
]


def podman(*args: str, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:2])} failed ({done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def image() -> str:
    started = time.monotonic()
    done = subprocess.run([str(ROOT / "deploy" / "image" / "build.sh")], capture_output=True,
                          text=True, timeout=1200, check=False)
    assert done.returncode == 0, f"image build failed:\n{done.stderr[-4000:]}"
    print(f"\nimage built in {time.monotonic() - started:.1f} s")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def scratch_db(admin_url: str) -> Iterator[str]:
    name = f"image_test_{os.getpid()}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    yield admin_url.rsplit("/", 1)[0] + "/" + name
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class Container:
    """One ``podman run -d`` of the image on the host's network, removed at the end.

    Its root filesystem is read-only, as in the Kubernetes manifests: only the spool is written.
    """

    def __init__(self, image: str, env: dict[str, str], spool: Path, *args: str) -> None:
        self.name = f"igw-test-{os.getpid()}-{free_port()}"
        self.port = int(env["WEBSERVER_PORT"])
        flags = [f"--env={k}={v}" for k, v in env.items()]
        podman("run", "-d", "--read-only", "--name", self.name, "--network", "host", *LIMITS,
               *flags,
               "--volume", f"{spool}:/var/lib/inference-gateway/spool", image, *args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


def gateway_env(database_url: str, upstream: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "MODEL_SERVICE_PORT_MAP": f"facebook/opt-125m={upstream}",
            "WEBSERVER_HOST": "127.0.0.1", "WEBSERVER_PORT": str(free_port()),
            "WEBSERVER_WORKERS": "2", "MIGRATE_ON_START": "false",
            "USAGE_FLUSH_INTERVAL_MS": "20"}


def chat(url: str, org: str) -> str:
    body = json.dumps({"model": "facebook/opt-125m", "max_tokens": 3,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, method="POST",
        headers={"Content-Type": "application/json", "X-TEMBO-ORG": org,
                 "X-TEMBO-INSTANCE": "container"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        json.loads(resp.read())
        return str(resp.headers["X-Request-Id"])


async def rows(database_url: str, org: str, want: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        found: list[asyncpg.Record] = []
        for _ in range(150):
            found = list(await conn.fetch(
                "SELECT request_id, prompt_tokens, completion_tokens, status "
                "FROM inference.requests WHERE organization_id = $1", org))
            if len(found) >= want:
                break
            await asyncio.sleep(0.1)
        return found
    finally:
        await conn.close()


def test_image_runs_unprivileged_and_small(image: str) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]
    assert config["Config"]["User"] == f"{UID}:{UID}"
    assert config["Config"]["Entrypoint"] == ["inference-gateway"]
    assert config["Config"]["Cmd"] == ["serve"]
    size_mb = config["Size"] / 1e6
    print(f"\nimage size: {size_mb:.0f} MB")
    assert size_mb < 300
    # The build stage's tools are not in it.
    done = podman("run", "--rm", *LIMITS, "--entrypoint", "sh", image, "-c",
                  "id -u; test ! -e /opt/build && test ! -e /opt/venv/bin/pip && echo clean")
    assert done.stdout.split() == [str(UID), "clean"]


def test_migrate_command_fails_loudly_then_applies(image: str, scratch_db: str) -> None:
    # What the Kubernetes migration Job runs: a database it cannot reach is a non-zero exit.
    refused = podman("run", "--rm", "--network", "host", *LIMITS,
                     f"--env=DATABASE_URL=postgresql://postgres@127.0.0.1:{free_port()}/x",
                     image, "migrate", check=False)
    assert refused.returncode != 0
    assert "inference-gateway: " in refused.stderr
    done = podman("run", "--rm", "--network", "host", *LIMITS,
                  f"--env=DATABASE_URL={scratch_db}", image, "migrate")
    assert done.stdout.startswith("applied: 0001_requests.sql")
    assert asyncio.run(migrate(scratch_db)) == []  # all of them


def test_container_meters_and_its_spool_outlives_it(  # type: ignore[no-untyped-def]
    image: str, scratch_db: str, simulator: Proc, tmp_path: Path
) -> None:
    asyncio.run(migrate(scratch_db))  # done already if the migration test ran
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, UID, UID)  # what fsGroup does for a pod's volume
    org = f"image-{os.getpid()}"

    # A container that cannot reach Postgres still serves, and spools; then it is SIGKILLed.
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    first = Container(image, gateway_env(down, simulator.url), spool)
    try:
        wait_http(f"{first.url}/lively", timeout=60)
        spooled = chat(first.url, org)
        podman("kill", "--signal", "KILL", first.name)
    finally:
        first.remove()

    # Its successor on the same volume replays the record, and serves and meters its own.
    second = Container(image, gateway_env(scratch_db, simulator.url), spool)
    try:
        try:
            wait_http(f"{second.url}/ready", timeout=60)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{second.logs()}") from None
        served = chat(second.url, org)
        found = asyncio.run(rows(scratch_db, org, 2))
        assert sorted(str(r["request_id"]) for r in found) == sorted([spooled, served])
        assert all(r["status"] == 200 and r["completion_tokens"] == 3 for r in found)
        # SIGTERM: stop accepting, drain, exit 0.
        podman("stop", "--time", "60", second.name)
        state = json.loads(podman("inspect", second.name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, second.logs()
        assert "draining usage" in second.logs()
    finally:
        second.remove()
