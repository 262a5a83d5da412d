"""The build, with the request path compiled to C when asked for.

``INFERENCE_GATEWAY_COMPILE=1`` (with mypy and a C compiler where the package is built) turns
the modules below into C extensions with mypyc, the compiler of mypy's own: the same source,
already checked by ``mypy --strict``, run without the interpreter's per-line work. A worker on
the protocol core then spends a fifth to a quarter less CPU on a request (docs/performance.md,
"The compiled build"). Without it the package is pure Python, as every other build and the test
suite use it.

Only modules that mypyc compiles and that pass the suite compiled are listed. Not the usage
record: the process crashed on the first request, as orjson wrote a compiled record. Not the
usage writer: compiled, it crashed the process when it wrote a batch Postgres already held.
Both cost little per request; the rest of the request path is here.
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "metering/meter.py",
    "metering/readers.py",
    "metering/spool.py",
    "observability/request_metrics.py",
    "proxy/endpoints.py",
    "proxy/handler.py",
    "proxy/http/connection.py",
    "proxy/http/request.py",
    "proxy/http/response.py",
    "proxy/payload.py",
    "proxy/relay.py",
    "proxy/sse.py",
    "proxy/upstream.py",
    "routing/replicas.py",
    "tenants/caches.py",
    "tenants/identity.py",
]


def extensions() -> list[object]:
    if os.environ.get("INFERENCE_GATEWAY_COMPILE", "") not in ("1", "true", "yes"):
        return []
    from mypyc.build import mypycify  # only the compiled build needs mypy

    return list(mypycify([f"src/inference_gateway/{path}" for path in COMPILED]))


setup(ext_modules=extensions())
