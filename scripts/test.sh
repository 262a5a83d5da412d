#!/usr/bin/env bash
# `make test`: everything the suite needs, installed and started here, then the suite.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
scripts/bootstrap.sh
# The dashboard's test drives a real browser: Debian's chromium and its driver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing chromium and chromium-driver from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "test: chromium and chromium-driver are missing (need root to install them);" \
         "the dashboard's browser test will be skipped" >&2
  fi
fi
if [ -z "${TEST_DATABASE_URL:-}" ]; then
  scripts/dev-postgres.sh
fi
# The metrics tests scrape the gateway with a real Prometheus and check the alert rules with
# promtool: both come with Debian's prometheus package.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing prometheus from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends prometheus >/dev/null
  else
    echo "test: prometheus is missing (need root to install it); the metrics tests that" \
         "need it will be skipped" >&2
  fi
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
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing ${deploy_missing[*]} from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${deploy_missing[@]}" >/dev/null
  else
    echo "test: ${deploy_missing[*]} missing (need root to install them);" \
         "the image and scale-out tests will be skipped" >&2
  fi
fi
# The compiled build's test compiles the request path: a C compiler and Python's headers.
if ! command -v cc >/dev/null || ! .venv/bin/python -c \
    'import os, sysconfig, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing gcc and Python's headers from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q gcc python3-dev >/dev/null
  else
    echo "test: a C compiler or Python's headers are missing (need root to install them);" \
         "the compiled build's test will be skipped" >&2
  fi
fi
.venv/bin/ruff check src tests
.venv/bin/mypy src
echo "test: setup took $(( $(date +%s) - start )) s"
exec .venv/bin/python -m pytest "$@"
