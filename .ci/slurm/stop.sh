#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by .ci/slurm/start.sh (slurmd, slurmctld,
# munged). Cancels nothing explicitly: running jobs die with slurmd. Config and
# state stay in place, so start.sh brings the same cluster back.
#   SLURM_CI_KEEP_MUNGE=1  leave munged running
set -uo pipefail
STATE=/run/slurm-ci
log() { printf '[slurm-ci] %s\n' "$*" >&2; }

stop_pidfile() {  # name pidfile
  local pid
  [[ -f $2 ]] || return 0
  pid=$(cat "$2")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $1 (pid $pid)"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "$1 still alive, SIGKILL"; kill -9 "$pid"; fi
  fi
  rm -f "$2"
}

stop_pidfile slurmd "$STATE/slurmd.pid"
stop_pidfile slurmctld "$STATE/slurmctld.pid"
if [[ -z ${SLURM_CI_KEEP_MUNGE:-} ]]; then
  stop_pidfile munged /run/munge/munged.pid
fi
exit 0
