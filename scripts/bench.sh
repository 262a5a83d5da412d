#!/usr/bin/env bash
# The proxy benchmark: what the gateway adds over a fixed-cost backend, next to an nginx hop and
# (with LITELLM=1) LiteLLM's proxy. Options go to bench/proxy_bench.py:
#   --duration S   seconds per measurement (default 10)   --quick        a 3-second smoke run
#   --skip-stream  --skip-memory                          --profile S    py-spy a worker under load
# Results: bench/results/proxy.json and bench/results/proxy.md (--quick: .dev/bench/).
# Then the server-core benchmark (bench/results/server_core.json) and the scale-out benchmark:
# bench/results/scaleout.json.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/bootstrap.sh
scripts/dev-postgres.sh >/dev/null
scripts/dev-redis.sh >/dev/null  # the rate limits' counters, for the limits-on target

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v hey >/dev/null || missing+=(hey)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench: need ${missing[*]} (install them, or run as root to have them installed)" >&2
    exit 1
  fi
  echo "bench: installing ${missing[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
fi

.venv/bin/python bench/proxy_bench.py "$@"

# The server core of /v1 against aiohttp's server and uvicorn, in one run
# (bench/results/server_core.json); only --quick applies to it.
core_args=()
for arg in "$@"; do
  [ "$arg" = --quick ] && core_args+=(--quick)
done
.venv/bin/python bench/server_core_bench.py "${core_args[@]}"

# Two gateway instances against one behind HAProxy (bench/results/scaleout.json); only --quick
# and --duration apply to it.
scaleout_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) scaleout_args+=(--quick) ;;
    --duration) scaleout_args+=(--duration "$2"); shift ;;
    --duration=*) scaleout_args+=("$1") ;;
  esac
  shift
done
exec .venv/bin/python bench/scaleout_bench.py "${scaleout_args[@]}"
