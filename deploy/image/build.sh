#!/usr/bin/env bash
# `make image`: build the gateway's image with podman, on a base made from Debian's packages
# (deploy/image/base.sh), so no image registry is needed. Prints the image's name on stdout.
#
#   IMAGE        the tag to build (default localhost/inference-gateway:dev)
#   BASE_IMAGE   build on this base instead (any Debian bookworm image)
#
# Installs podman, runc and debootstrap from Debian when they are missing (as root). The first
# build makes the base (about a minute, cached under .dev/image/) and installs the locked
# dependencies (about a minute); later builds reuse both and rebuild only what changed.
# pip's CA bundle (PIP_CERT or pip's `cert` setting), when there is one, is passed to the build
# as the secret pip-ca, for networks that intercept TLS.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
image="${IMAGE:-localhost/inference-gateway:dev}"
started=$SECONDS

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
if [ -z "${BASE_IMAGE:-}" ]; then command -v debootstrap >/dev/null || missing+=(debootstrap); fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "image: need ${missing[*]} (install them, or run as root on Debian)" >&2
    exit 1
  fi
  echo "image: installing ${missing[*]} from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
fi

base="${BASE_IMAGE:-$(deploy/image/base.sh)}"

secret=()
ca="${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}"
if [ -n "$ca" ] && [ -f "$ca" ]; then
  secret=(--secret "id=pip-ca,src=$ca")
fi

podman_() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
previous="$(podman_ image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"

# runc and cgroupfs work where crun or systemd cgroups do not; the ulimits are within what any
# container may ask for.
podman_ build --layers --network host \
  --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --build-arg "BASE_IMAGE=$base" "${secret[@]}" --tag "$image" --file Dockerfile . >&2

# The image this tag named before: each code change would otherwise leave one behind. The build
# stage's layers stay, for the next build's cache.
current="$(podman_ image inspect --format '{{.Id}}' "$image")"
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  podman_ rmi "$previous" >/dev/null 2>&1 || true
fi
echo "image: $image built in $((SECONDS - started)) s" >&2
echo "$image"
