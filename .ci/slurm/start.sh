#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (for CI and local tests).
#
#   sudo .ci/slurm/start.sh          # idempotent: a running, up-to-date cluster is a no-op
#   .ci/slurm/stop.sh                # stops the daemons again
#
# What it does (Debian/Ubuntu, run as root, no systemd needed):
#   1. apt-get installs slurm-wlm + munge if slurmctld/slurmd/munged are missing
#      (measured here: ~11 s for a clean machine, apt-get update included).
#   2. writes /etc/slurm/{slurm.conf,gres.conf} for one node called
#      `localhost` with a partition `debug` (Default=YES) and a fake generic
#      resource `gpu` (Count=$SLURM_CI_GPUS, default 2, backed by /dev/null-like
#      char devices under /run/slurm-ci/ so SLURM exports CUDA_VISIBLE_DEVICES).
#      Files we wrote carry a marker line; a slurm.conf without it is never touched.
#   3. starts munged (as user munge), slurmctld and `slurmd -N localhost` by hand,
#      restarting them when the config changed, and waits until the node is idle.
#
# Accounting is off (no slurmdbd): `sacct` does not work; use `squeue`, and give the
# Snakemake SLURM executor `--slurm-status-command squeue` (see profile).
#
# Environment knobs:
#   SLURM_CI_GPUS=2          number of fake GPUs on the node (0 = no gres at all)
#   SLURM_CI_GPU_TYPE=fake   their GRES type ("model"): --gpus=fake:1 / gpu_model="fake";
#                            untyped requests (--gres=gpu:1, --gpus=1) match it too
#   SLURM_CI_CPUS=$(nproc)   CPUs advertised for the node
#   SLURM_CI_TIMEOUT=60      seconds to wait for the node to become idle
#   SLURM_CI_NO_INSTALL=1    never call apt-get (fail instead)
set -euo pipefail

T0=$(date +%s.%N)
log() { printf '[slurm-ci] %s\n' "$*" >&2; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root (it installs packages and starts daemons)"; exit 2
fi

GPUS=${SLURM_CI_GPUS:-2}
GPU_TYPE=${SLURM_CI_GPU_TYPE:-fake}
CPUS=${SLURM_CI_CPUS:-$(nproc)}
WAIT=${SLURM_CI_TIMEOUT:-60}
MARK="# written by zsharp .ci/slurm/start.sh"
CONF_DIR=/etc/slurm
STATE=/run/slurm-ci            # pid files, fake gpu device files
LOGDIR=/var/log/slurm

# --- 1. packages -----------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  if [[ -n ${SLURM_CI_NO_INSTALL:-} ]]; then
    log "slurm-wlm/munge missing and SLURM_CI_NO_INSTALL is set"; exit 3
  fi
  log "installing slurm-wlm and munge with apt-get"
  t=$(date +%s)
  bash "$(dirname "${BASH_SOURCE[0]}")/../apt-install.sh" slurm-wlm munge
  log "apt-get took $(( $(date +%s) - t )) s"
fi

# --- 2. config -------------------------------------------------------------------
mkdir -p "$CONF_DIR" "$STATE" "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd
if [[ -f $CONF_DIR/slurm.conf ]] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
  log "$CONF_DIR/slurm.conf exists and was not written by this script; refusing to touch it"
  exit 4
fi

mem_mb=$(awk '/^MemTotal:/{printf "%d", $2/1024*0.9}' /proc/meminfo)
gres_node="" ; gres_types=""
if (( GPUS > 0 )); then
  gres_types="GresTypes=gpu"
  gres_node="Gres=gpu:${GPU_TYPE}:${GPUS}"
fi

new_conf=$(cat <<EOF
$MARK
# Single-node test cluster. Accounting is OFF: use squeue, not sacct.
ClusterName=zsharp-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups / systemd here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# the node's config wins over what slurmd detects (no drain on CPU/memory mismatch)
SlurmdParameters=config_overrides
ReturnToService=2
# batch jobs may be requeued (scontrol requeue, node failure); logs are appended
JobRequeue=1
JobFileAppend=1
# short timeouts so tests are quick
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
Waittime=0
# Finished jobs stay visible to squeue for MinJobAge seconds. The Snakemake SLURM
# executor (2.8.0) with --slurm-status-command squeue falls back to sacct (which
# does not work without accounting -> Snakemake waits forever) when
# MinJobAge < 3 * init-seconds-before-status-checks; jobs that vanish from squeue
# are also waited for forever. Keep it well above 3 x 40 s.
MinJobAge=600
$gres_types
NodeName=localhost CPUs=$CPUS RealMemory=$mem_mb $gres_node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)

new_gres="$MARK"
if (( GPUS > 0 )); then
  # slurmd wants character/block devices ("is not a valid character or block
  # device"); without File= it schedules gpu but sets no CUDA_VISIBLE_DEVICES.
  # Each fake GPU is a copy of /dev/null (char 1:3).
  for ((i = 0; i < GPUS; i++)); do
    f=$STATE/fake-gpu$i
    [[ -c $f ]] || { rm -f "$f"; mknod -m 0666 "$f" c 1 3; }
  done
  new_gres+=$'\n'"# Fake GPUs: /dev/null-like char devices, so SLURM numbers them (CUDA_VISIBLE_DEVICES)."
  new_gres+=$'\n'"AutoDetect=off"
  new_gres+=$'\n'"NodeName=localhost Name=gpu Type=$GPU_TYPE File=$STATE/fake-gpu[0-$((GPUS - 1))]"
fi

changed=0
write_if_changed() {  # path content
  if [[ ! -f $1 ]] || [[ "$(cat "$1")" != "$2" ]]; then
    printf '%s\n' "$2" > "$1"; changed=1; log "wrote $1"
  fi
}
write_if_changed "$CONF_DIR/slurm.conf" "$new_conf"
write_if_changed "$CONF_DIR/gres.conf" "$new_gres"

# --- 3. daemons ------------------------------------------------------------------
running() {  # pidfile -> true if that process is alive
  local pid; pid=$(cat "$1" 2>/dev/null) || return 1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

# munge
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create --force 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if ! running /run/munge/munged.pid; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
fi
munge -n | unmunge >/dev/null

if (( changed )); then
  for d in slurmd slurmctld; do
    if running "$STATE/$d.pid"; then
      log "config changed: stopping $d"
      kill "$(cat "$STATE/$d.pid")" 2>/dev/null || true
      for _ in $(seq 50); do running "$STATE/$d.pid" || break; sleep 0.1; done
    fi
  done
fi

if ! running "$STATE/slurmctld.pid"; then
  log "starting slurmctld"
  slurmctld          # daemonizes; -c would clear saved state, we keep it
fi
if ! running "$STATE/slurmd.pid"; then
  log "starting slurmd -N localhost"
  slurmd -N localhost
fi

# --- 4. wait until the node is idle ----------------------------------------------
deadline=$(( $(date +%s) + WAIT ))
state=""
while :; do
  state=$(sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -1 || true)
  case $state in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|fail*)
      # after a restart the node may still be marked down; bring it back
      scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
  esac
  if (( $(date +%s) >= deadline )); then
    log "node not ready after ${WAIT}s (state='$state'); see $LOGDIR/slurmctld.log, $LOGDIR/slurmd.log"
    exit 1
  fi
  sleep 0.5
done
log "cluster ready: node localhost is $state (took $(elapsed) s)"
