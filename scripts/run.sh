#!/usr/bin/env bash
# `make run`: Postgres, a model backend and the gateway on this machine, in one command.
#
#   BACKEND=sim  (default) the built-in vLLM simulator on :8000
#   BACKEND=vllm a real vLLM server on the CPU with a tiny local model (VLLM_MODEL=path for yours)
#
# With DATABASE_URL set, that database is used and no local Postgres is started.
# Ctrl-C stops everything this script started: the gateway, the backend, and the dev Postgres
# if this run started it (one that was already running, for the tests say, is left running).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
backend="${BACKEND:-sim}"
backend_port="${BACKEND_PORT:-8000}"
served_name="${SERVED_MODEL_NAME:-facebook/opt-125m}"

scripts/bootstrap.sh
stop_postgres=false
if [ -z "${DATABASE_URL:-}" ]; then
  scripts/stop-dev.sh --status >/dev/null 2>&1 || stop_postgres=true
  scripts/dev-postgres.sh
  . .dev/env
fi
export DATABASE_URL
stop_redis=false
if [ -z "${REDIS_URL:-}" ]; then  # the rate limiter's shared counters
  redis-cli -p "${DEV_REDIS_PORT:-63799}" ping >/dev/null 2>&1 || stop_redis=true
  scripts/dev-redis.sh
  . .dev/env
fi
export REDIS_URL

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if $stop_postgres && $stop_redis; then
    scripts/stop-dev.sh
  elif $stop_postgres; then
    scripts/stop-dev.sh --postgres
  elif $stop_redis; then
    scripts/stop-dev.sh --redis
  fi
}
trap cleanup INT TERM EXIT

case "$backend" in
  sim)
    .venv/bin/inference-gateway simulate --port "$backend_port" --model "$served_name" &
    pids+=($!)
    ;;
  vllm)
    scripts/vllm-setup.sh
    VLLM_PORT="$backend_port" VLLM_SERVED_NAME="$served_name" scripts/vllm-serve.sh \
      >.dev/vllm.log 2>&1 &
    pids+=($!)
    echo "run: starting vLLM (log in .dev/vllm.log)"
    ;;
  *) echo "run: BACKEND must be sim or vllm, not '$backend'" >&2; exit 2 ;;
esac

for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$backend_port/health" >/dev/null 2>&1 && break
  kill -0 "${pids[0]}" 2>/dev/null || { echo "run: the $backend backend exited" >&2;
    [ "$backend" = vllm ] && tail -n 40 .dev/vllm.log >&2; exit 1; }
  sleep 0.5
done

export MODEL_SERVICE_PORT_MAP="${MODEL_SERVICE_PORT_MAP:-$served_name=http://127.0.0.1:$backend_port}"
export SPOOL_DIR="${SPOOL_DIR:-$root/.dev/spool}"
echo "run: gateway on :${WEBSERVER_PORT:-8080} in front of $MODEL_SERVICE_PORT_MAP"
.venv/bin/inference-gateway serve &
pids+=($!)
wait "${pids[-1]}"
