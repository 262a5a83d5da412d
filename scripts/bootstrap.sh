#!/usr/bin/env bash
# Make .venv hold the package and its development tools. Reinstalls only when pyproject.toml
# changed since the last successful install, so a second run takes a moment.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: Python 3.11 or newer is needed (PYTHON=$python)" >&2
  exit 1
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null
  fi
fi

stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing the package and its tools into .venv"
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c 'import inference_gateway, aiohttp, asyncpg, openai' \
    || { echo "bootstrap: install failed" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
