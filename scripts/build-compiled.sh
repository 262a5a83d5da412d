#!/usr/bin/env bash
# `make compiled`: the gateway's wheel with its request path compiled to C (setup.py,
# INFERENCE_GATEWAY_COMPILE=1), built from a copy of the source, so the work tree never holds
# compiled modules (Python would load them instead of the .py files being edited).
#
#   scripts/build-compiled.sh [OUT]   OUT/dist/<wheel> and the same installed in OUT/site,
#                                     ready for PYTHONPATH (default OUT: build/compiled)
#
# Needs a C compiler and Python's headers; mypy, setuptools and wheel come with .venv.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m "${1:-$root/build/compiled}")"
python="${PYTHON:-$root/.venv/bin/python}"

rm -rf "$out/dist" "$out/site" "$out/source"  # only what it makes: OUT may hold more
mkdir -p "$out/source"
cp "$root/pyproject.toml" "$root/setup.py" "$root/README.md" "$out/source/"
cp -r "$root/src" "$out/source/src"
find "$out/source/src" \( -name __pycache__ -o -name '*.egg-info' -o -name '*.so' \) -prune \
  -exec rm -rf {} +
pip_=("$python" -m pip --disable-pip-version-check -q)
INFERENCE_GATEWAY_COMPILE=1 "${pip_[@]}" wheel --no-deps --no-build-isolation \
  --wheel-dir "$out/dist" "$out/source" 2>&1 | { grep -v "^WARNING: Location" || true; }
wheel="$(ls "$out"/dist/*.whl)"
"${pip_[@]}" install --no-deps --no-index --target "$out/site" "$wheel" 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
rm -rf "$out/source"
echo "$wheel"
