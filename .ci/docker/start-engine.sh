#!/usr/bin/env bash
# Start a Docker engine by hand (no systemd) for CI / local tests. Idempotent.
#
#   .ci/docker/start-engine.sh     # as root; prints how long it took
#   .ci/docker/stop-engine.sh
#
# 1. apt-get installs Debian's docker.io if dockerd is missing (~17 s).
# 2. starts `dockerd` in the background (log: /var/log/dockerd-ci.log) with the
#    default settings (overlay2, bridge + iptables); if the engine does not come up,
#    retries once with the conservative fallback
#      --storage-driver=vfs --iptables=false --bridge=none
#    (no container networking then: RUN steps that download need --network=host).
# 3. waits until `docker info` answers.
#
# No image can be pulled here (no registry access): build a local base image with
# .ci/docker/make-base.sh and pass it as --build-arg BASE_IMAGE=...
#
# Docker CLI note: a newer `docker` client (28.x, in /usr/local/bin) may shadow Debian's
# 20.10 client (/usr/bin/docker). The 28.x client has no buildx plugin, so
# `DOCKER_BUILDKIT=1 docker build` fails with "buildx component is missing"; the
# legacy builder still works (prints a deprecation notice). For BuildKit use
# `DOCKER_BUILDKIT=1 /usr/bin/docker build ...`.
#
# Knobs: DOCKERD_ARGS="..." (extra/override flags, skips the fallback logic),
#        DOCKER_CI_TIMEOUT=60, DOCKER_CI_NO_INSTALL=1.
set -euo pipefail

T0=$(date +%s.%N)
log() { printf '[docker-ci] %s\n' "$*" >&2; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
WAIT=${DOCKER_CI_TIMEOUT:-60}
LOG=/var/log/dockerd-ci.log
PIDFILE=/run/docker-ci.pid

if [[ $(id -u) -ne 0 ]]; then log "must run as root"; exit 2; fi

if docker info >/dev/null 2>&1; then
  log "engine already running ($(docker info -f '{{.ServerVersion}} {{.Driver}}' 2>/dev/null))"
  exit 0
fi

# A machine restarted under a running engine leaves its pid files behind, and dockerd
# refuses to start while they exist ("pid file found"): remove those of dead processes.
for stale in "$PIDFILE" /var/run/docker/containerd/containerd.pid; do
  if [[ -f $stale ]] && ! kill -0 "$(cat "$stale" 2>/dev/null)" 2>/dev/null; then
    log "removing the stale $stale"
    rm -f "$stale"
  fi
done

if ! command -v dockerd >/dev/null; then
  if [[ -n ${DOCKER_CI_NO_INSTALL:-} ]]; then log "dockerd missing and DOCKER_CI_NO_INSTALL set"; exit 3; fi
  log "installing docker.io with apt-get"
  t=$(date +%s)
  bash "$(dirname "${BASH_SOURCE[0]}")/../apt-install.sh" docker.io
  log "apt-get took $(( $(date +%s) - t )) s"
fi

start_dockerd() {  # extra args...
  log "starting: dockerd $*"
  # setsid: the daemon must not die with this shell's session
  setsid dockerd --pidfile "$PIDFILE" "$@" >>"$LOG" 2>&1 < /dev/null &
  local deadline=$(( $(date +%s) + WAIT ))
  while (( $(date +%s) < deadline )); do
    docker info >/dev/null 2>&1 && return 0
    # dockerd exited already? then give up on this flavour early
    if [[ -f $PIDFILE ]] && ! kill -0 "$(cat "$PIDFILE" 2>/dev/null)" 2>/dev/null; then break; fi
    sleep 0.5
  done
  return 1
}

stop_dockerd() {
  local pid; pid=$(cat "$PIDFILE" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$PIDFILE"
}

if [[ -n ${DOCKERD_ARGS:-} ]]; then
  # shellcheck disable=SC2086
  start_dockerd $DOCKERD_ARGS || { log "dockerd did not come up; see $LOG"; exit 1; }
elif ! start_dockerd; then
  log "default dockerd failed (tail of $LOG below); retrying with vfs, no iptables, no bridge"
  tail -5 "$LOG" >&2 || true
  stop_dockerd
  start_dockerd --storage-driver=vfs --iptables=false --bridge=none \
    || { log "dockerd did not come up; see $LOG"; exit 1; }
fi
log "engine ready: $(docker info -f 'server {{.ServerVersion}}, storage {{.Driver}}' 2>/dev/null) (took $(elapsed) s)"
