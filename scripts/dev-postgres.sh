#!/usr/bin/env bash
# Start (creating it the first time) the project's own Postgres cluster under .dev/pg.
#
# Installs Debian's postgresql-15, pg_partman and pg_cron when they are missing, listens on
# 127.0.0.1:${DEV_PG_PORT:-54329} so it never clashes with a system Postgres, creates the
# database ${DEV_PG_DB:-inference} and writes .dev/env: DATABASE_URL, QUEUE_CONN_URL and SPOOL_DIR
# as exports, so that after `. .dev/env` the gateway's commands find the dev stack.
# Safe to run again: a running cluster is left as it is. Stop it with `make stop-dev`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${DEV_PG_PORT:-54329}"
db="${DEV_PG_DB:-inference}"
pgbin=/usr/lib/postgresql/15/bin
pgdir="$root/.dev/pg"
data="$pgdir/data"

need_packages() {
  [ -x "$pgbin/postgres" ] || return 0
  [ -f /usr/share/postgresql/15/extension/pg_partman.control ] || return 0
  [ -f /usr/share/postgresql/15/extension/pg_cron.control ] || return 0
  [ -f /usr/share/postgresql/15/extension/dblink.control ] || return 0
  return 1
}

if need_packages; then
  echo "dev-postgres: installing postgresql-15, pg_partman and pg_cron from Debian"
  if [ "$(id -u)" -ne 0 ]; then
    echo "dev-postgres: need root to install packages (or set DATABASE_URL to an existing server)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q postgresql-15 postgresql-15-partman postgresql-15-cron postgresql-contrib >/dev/null
fi

# Postgres refuses to run as root: run its tools as the 'postgres' system user then.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

mkdir -p "$pgdir"
if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$pgdir"; fi

if [ ! -f "$data/PG_VERSION" ]; then
  echo "dev-postgres: creating cluster in .dev/pg/data"
  as_pg "$pgbin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$pgdir'
shared_preload_libraries = 'pg_cron'
cron.database_name = 'postgres'
max_connections = 200
max_worker_processes = 16
fsync = on
log_min_messages = warning
CONF
fi

if ! as_pg "$pgbin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
  as_pg "$pgbin/pg_ctl" -D "$data" -l "$pgdir/log" -w -t 60 start >/dev/null
fi

psql_pg() { "$pgbin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -qAtX "$@"; }
if [ -z "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
  psql_pg -c "CREATE DATABASE \"$db\""
fi

url="postgresql://postgres@127.0.0.1:$port/$db"
# .dev/env: this script's lines replaced, any other script's kept.
touch "$root/.dev/env"
grep -v -e '^export DATABASE_URL=' -e '^export SPOOL_DIR=' -e '^export QUEUE_CONN_URL=' \
  "$root/.dev/env" >"$root/.dev/env.tmp" || true
printf 'export DATABASE_URL=%s\nexport SPOOL_DIR=%s\n' "$url" "$root/.dev/spool" \
  >>"$root/.dev/env.tmp"

# A queue database with PGMQ for the billing reporter's pgmq sink. PGMQ is not packaged for
# Debian; the pgmq Python package carries its SQL-only install.
queues_url="postgresql://postgres@127.0.0.1:$port/queues"
if [ -z "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname = 'queues'")" ]; then
  psql_pg -c 'CREATE DATABASE queues'
fi
if [ -x "$root/.venv/bin/python" ] && \
   [ -z "$("$pgbin/psql" "$queues_url" -qAtX -c "SELECT 1 FROM pg_namespace WHERE nspname = 'pgmq'")" ]; then
  "$root/.venv/bin/python" -c 'import pgmq, sys; pgmq.install_pgmq_from_sql(dsn=sys.argv[1])' \
    "$queues_url" >/dev/null 2>&1 || echo "dev-postgres: could not install PGMQ into 'queues'" >&2
fi
printf 'export QUEUE_CONN_URL=%s\n' "$queues_url" >>"$root/.dev/env.tmp"
mv "$root/.dev/env.tmp" "$root/.dev/env"
echo "dev-postgres: ready at $url"
