"""The compiled build (``INFERENCE_GATEWAY_COMPILE=1``, see setup.py), made as a deployment
makes it, from a copy of the source: the modules it lists are C extensions, and the request
path's own tests pass on them, gateways started by those tests included."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from inference_gateway.server import build

ROOT = Path(__file__).resolve().parents[1]
# The tests of what the compiled modules do: both HTTP servers, the relay and its streams, the
# upstream client, the payloads, the records and their spool, routing, tenants, and the gateway
# end to end.
SUITE = [
    "tests/test_endpoints.py",
    "tests/test_event_streams.py",
    "tests/test_gateway.py",
    "tests/test_gateway_endpoints.py",
    "tests/test_http_core.py",
    "tests/test_http_core_serve.py",
    "tests/test_malformed_requests.py",
    "tests/test_metering.py",
    "tests/test_payload.py",
    "tests/test_replicas.py",
    "tests/test_routing.py",
    "tests/test_spool.py",
    "tests/test_sse.py",
    "tests/test_tenancy.py",
    "tests/test_upstream.py",
    "tests/test_upstream_faults.py",
]
# Tests that replace a method or a module's global, which a compiled module does not allow.
PATCHING = [
    "tests/test_metering.py::test_records_that_arrive_during_a_write_wait_for_the_next_flush",
    "tests/test_metering.py::test_an_idle_writer_does_not_poll",
    "tests/test_tenancy.py::test_each_cache_is_reloaded_every_its_own_interval",
]


def compiled_modules() -> list[str]:
    """The module names setup.py compiles."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            paths: list[str] = ast.literal_eval(node.value)
            return ["inference_gateway." + p.removesuffix(".py").replace("/", ".")
                    for p in paths]
    raise AssertionError("setup.py lists no COMPILED modules")


@pytest.fixture(scope="module")
def compiled_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled wheel, built by ``make compiled``'s script and installed into a directory
    of its own (put first on PYTHONPATH)."""
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if shutil.which("cc") is None or not headers.exists():
        pytest.skip("no C compiler or no Python.h (scripts/test.sh installs them as root)")
    out = tmp_path_factory.mktemp("compiled")
    built = subprocess.run([str(ROOT / "scripts" / "build-compiled.sh"), str(out)],
                           env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                           text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = list((out / "dist").glob("*.whl"))
    assert len(wheels) == 1 and "linux" in wheels[0].name, wheels  # a platform wheel
    assert built.stdout.strip().endswith(wheels[0].name)
    return out / "site"


def run_on(site: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_the_listed_modules_are_compiled(compiled_site: Path) -> None:
    modules = compiled_modules()
    shown = run_on(compiled_site, ["-c", (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    print(name, importlib.import_module(name).__file__)\n"
        "from inference_gateway.server import build\n"
        "print('build', build())\n"
    ), *modules, "inference_gateway.metering.record"], timeout=60)
    assert shown.returncode == 0, shown.stderr
    files = dict(line.split(" ", 1) for line in shown.stdout.splitlines())
    for name in modules:
        assert files[name].startswith(str(compiled_site)) and files[name].endswith(".so"), \
            (name, files[name])
    # What is not listed stays Python, from the same installed package.
    record = files["inference_gateway.metering.record"]
    assert record.startswith(str(compiled_site)) and record.endswith(".py")
    assert files["build"] == "compiled request path"  # what a worker logs when it starts


def test_the_usual_build_says_it_is_pure_python() -> None:
    assert build() == "pure Python"


def test_the_request_path_passes_its_tests_compiled(compiled_site: Path) -> None:
    deselect = [arg for test in PATCHING for arg in ("--deselect", test)]
    ran = run_on(compiled_site, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                 *deselect, *SUITE], timeout=1800)
    assert ran.returncode == 0, ran.stdout[-6000:] + ran.stderr[-3000:]
    assert " passed" in ran.stdout.splitlines()[-1], ran.stdout[-2000:]
