#!/usr/bin/env bash
# Stop the Docker engine started by .ci/docker/start-engine.sh (images stay in
# /var/lib/docker). Leaves an engine started some other way alone.
set -uo pipefail
PIDFILE=/run/docker-ci.pid
pid=$(cat "$PIDFILE" 2>/dev/null) || { echo "[docker-ci] no $PIDFILE: nothing to stop" >&2; exit 0; }
if kill -0 "$pid" 2>/dev/null; then
  echo "[docker-ci] stopping dockerd (pid $pid)" >&2
  kill "$pid"
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && { echo "[docker-ci] dockerd still alive, SIGKILL" >&2; kill -9 "$pid"; }
fi
rm -f "$PIDFILE"
exit 0
