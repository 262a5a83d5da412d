#!/usr/bin/env bash
# Stop the project's dev Postgres (.dev/pg) and dev Redis; --status only tells whether Postgres is
# running (exit 0); --redis / --postgres stops that one alone. `make clean-dev` stops them and
# removes .dev.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
redis_port="${DEV_REDIS_PORT:-63799}"
if [ "${1:-}" != --status ] && [ "${1:-}" != --postgres ] && command -v redis-cli >/dev/null \
    && redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  echo "stop-dev: the dev Redis is stopped"
fi
[ "${1:-}" = --redis ] && exit 0
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
