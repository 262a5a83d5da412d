#!/usr/bin/env bash
# The gateway image's base without an image registry: a minimal Debian bookworm made with
# debootstrap from Debian's packages (python3, python3-venv, ca-certificates, security updates
# applied), imported into podman. Prints the base image's name on stdout.
#
# Built once: the root filesystem is kept as a tarball under .dev/image/, named after a hash of
# this script, and imported again from there when podman's store lacks it. Editing this script
# makes a new base. Needs root (debootstrap, chroot) and the packages debootstrap and podman.
#
#   DEBIAN_MIRROR   where debootstrap and apt get packages (default http://deb.debian.org/debian)
#   SECURITY_MIRROR the security archive (default http://deb.debian.org/debian-security)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
packages=python3,python3-venv,ca-certificates
key="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
name="localhost/inference-gateway-base:bookworm-$key"
cache="$root/.dev/image"
tarball="$cache/base-bookworm-$key.tar"

podman_() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
log() { echo "base: $*" >&2; }

if podman_ image exists "$name"; then
  echo "$name"
  exit 0
fi

mkdir -p "$cache"
if [ ! -f "$tarball" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "debootstrap needs root"
    exit 1
  fi
  started=$SECONDS
  rootfs="$(mktemp -d "$cache/rootfs.XXXXXX")"
  cleanup() {
    mountpoint -q "$rootfs/proc" && umount "$rootfs/proc"
    rm -rf "$rootfs"
  }
  trap cleanup EXIT
  log "debootstrap of a minimal bookworm with $packages (once, about a minute)"
  debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }

  cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
SOURCES
  log "applying bookworm-updates and bookworm-security"
  mount -t proc proc "$rootfs/proc"
  chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    sh -c 'apt-get update -q && apt-get upgrade -y -q --no-install-recommends && apt-get clean' \
    >>"$cache/debootstrap.log" 2>&1 || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
  umount "$rootfs/proc"

  # What no container needs: package lists, caches, documentation, translations, logs.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
  : >"$rootfs/etc/resolv.conf"
  : >"$rootfs/etc/machine-id"
  # dpkg would put the removed files back on the next install; keep it from doing so.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/01-slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
SLIM
  tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
  log "root filesystem built in $((SECONDS - started)) s: $(du -h "$tarball" | cut -f1)"
fi

log "importing $tarball"
podman_ import -q --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$name" \
  >/dev/null
echo "$name"
