#!/usr/bin/env bash
# Stop the project's dev Postgres (.dev/pg); --status only tells whether it is running (exit 0).
# `make clean-dev` stops it and removes .dev with everything in it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$root/.dev/pg/data"
pg_ctl=/usr/lib/postgresql/15/bin/pg_ctl

if [ ! -f "$data/PG_VERSION" ] || [ ! -x "$pg_ctl" ]; then
  [ "${1:-}" = --status ] && exit 3
  exit 0
fi
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ "${1:-}" = --status ]; then
  as_pg "$pg_ctl" -D "$data" status
  exit $?
fi
if as_pg "$pg_ctl" -D "$data" status >/dev/null 2>&1; then
  as_pg "$pg_ctl" -D "$data" -m fast -w stop >/dev/null
  echo "stop-dev: the dev Postgres is stopped (its data stays in .dev/pg)"
fi
