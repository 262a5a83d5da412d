#!/usr/bin/env bash
# `make test`: everything the suite needs, installed and started here, then the suite.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
scripts/bootstrap.sh
if [ -z "${TEST_DATABASE_URL:-}" ]; then
  scripts/dev-postgres.sh
fi
.venv/bin/ruff check src tests
.venv/bin/mypy src
echo "test: setup took $(( $(date +%s) - start )) s"
exec .venv/bin/python -m pytest "$@"
