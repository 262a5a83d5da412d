#!/usr/bin/env bash
# `make test`: everything the suite needs, installed and started here, then the suite.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
scripts/bootstrap.sh

# from_debian WHAT-IS-SKIPPED [--no-install-recommends] PACKAGE...: install them as root, or
# say which tests will be skipped without them.
from_debian() {
  local skipped="$1" options=()
  shift
  if [ "$1" = "--no-install-recommends" ]; then options=("$1"); shift; fi
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing $* from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${options[@]}" "$@" >/dev/null
  else
    echo "test: $* missing (need root to install them); $skipped will be skipped" >&2
  fi
}

# The dashboard's test drives a real browser: Debian's chromium and its driver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  from_debian "the dashboard's browser test" chromium chromium-driver
fi
if [ -z "${TEST_DATABASE_URL:-}" ]; then
  scripts/dev-postgres.sh
fi
# The metrics tests scrape the gateway with a real Prometheus and check the alert rules with
# promtool: both come with Debian's prometheus package.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  from_debian "the metrics tests that need it" --no-install-recommends prometheus
fi
# The rate limiter's shared counters.
if [ -z "${TEST_REDIS_URL:-}" ]; then
  scripts/dev-redis.sh
fi
# The deployment tests build and run the gateway's image (podman, runc, debootstrap) and put two
# gateways behind HAProxy.
deploy_missing=()
for tool in podman runc debootstrap haproxy; do
  command -v "$tool" >/dev/null || deploy_missing+=("$tool")
done
if [ "${#deploy_missing[@]}" -gt 0 ]; then
  from_debian "the image and scale-out tests" "${deploy_missing[@]}"
fi
# The compiled build's test compiles the request path: a C compiler and Python's headers.
if ! command -v cc >/dev/null || ! .venv/bin/python -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  from_debian "the compiled build's test" gcc python3-dev
fi
.venv/bin/ruff check src tests
.venv/bin/mypy src
echo "test: setup took $(( $(date +%s) - start )) s"
exec .venv/bin/python -m pytest "$@"
