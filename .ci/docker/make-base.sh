#!/usr/bin/env bash
# Build a local Debian base image without pulling from any registry, so that
#   docker build --build-arg BASE_IMAGE=zsharp-local/debian:bookworm .
# works on machines that can reach the apt mirror but not Docker Hub. Idempotent.
#
#   .ci/docker/make-base.sh [TAG]          # default TAG: zsharp-local/debian:bookworm
#
# How: debootstrap --variant=minbase (python3, python3-venv, ca-certificates) into a
# temp dir (~95 s), copy this host's extra CA certificates in (so https to PyPI/apt
# works from containers behind a TLS-intercepting proxy), then
# `tar | docker import` (~4 s). The rootfs tarball is cached in
# /var/cache/zsharp-ci/, so a later run only re-imports it.
#
# Knobs: MIRROR=http://deb.debian.org/debian  SUITE=bookworm  FORCE=1 (rebuild)
#        EXTRA_PACKAGES="pkg1,pkg2"  (comma-separated, added to --include)
set -euo pipefail

TAG=${1:-zsharp-local/debian:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PKGS="python3,python3-venv,ca-certificates${EXTRA_PACKAGES:+,$EXTRA_PACKAGES}"
CACHE=/var/cache/zsharp-ci
TARBALL=$CACHE/debian-$SUITE-rootfs-$(printf '%s' "$PKGS" | md5sum | cut -c1-8).tar
T0=$(date +%s)
log() { printf '[docker-base] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then log "must run as root (debootstrap)"; exit 2; fi
if ! docker info >/dev/null 2>&1; then log "no Docker engine: run .ci/docker/start-engine.sh"; exit 3; fi

if [[ -z ${FORCE:-} ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "$TAG already exists (FORCE=1 rebuilds)"; exit 0
fi

if [[ -n ${FORCE:-} || ! -s $TARBALL ]]; then
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
  fi
  mkdir -p "$CACHE"
  root=$(mktemp -d /var/tmp/zsharp-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  log "debootstrap --variant=minbase --include=$PKGS $SUITE ($MIRROR)"
  debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$root" "$MIRROR" \
    > "$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # this host's extra CAs (e.g. a TLS-intercepting egress proxy) -> image trust store
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
  fi
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
  log "rootfs ready after $(( $(date +%s) - T0 )) s: $TARBALL"
fi

docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  "$TARBALL" "$TAG" >/dev/null
log "imported $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%d MB", $1/1e6}')) in $(( $(date +%s) - T0 )) s total"
