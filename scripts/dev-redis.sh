#!/usr/bin/env bash
# Start the project's own Redis (the rate limiter's shared counters) under .dev/redis, on
# 127.0.0.1:${DEV_REDIS_PORT:-63799}, installing Debian's redis-server when it is missing, and
# add `export REDIS_URL=...` to .dev/env. Safe to run again: a running Redis is left as it is.
# No persistence: the counters are a fast path, Postgres holds the truth for quotas.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${DEV_REDIS_PORT:-63799}"
dir="$root/.dev/redis"

if ! command -v redis-server >/dev/null; then
  echo "dev-redis: installing redis-server from Debian"
  if [ "$(id -u)" -ne 0 ]; then
    echo "dev-redis: need root to install packages (or set REDIS_URL to an existing server)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q redis-server >/dev/null
fi

mkdir -p "$dir"
if ! redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
  redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --save "" --appendonly no
  for _ in $(seq 1 50); do
    redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
fi

url="redis://127.0.0.1:$port/0"
touch "$root/.dev/env"
grep -v '^export REDIS_URL=' "$root/.dev/env" > "$root/.dev/env.tmp" || true
printf 'export REDIS_URL=%s\n' "$url" >> "$root/.dev/env.tmp"
mv "$root/.dev/env.tmp" "$root/.dev/env"
echo "dev-redis: ready at $url"
