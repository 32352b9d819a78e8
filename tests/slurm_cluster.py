"""Helpers for tests that run jobs on the single-node SLURM cluster of .ci/slurm/.

    from tests.slurm_cluster import ensure_cluster, job_ids_in, SNAKEMAKE_SLURM_ARGS

    status = ensure_cluster()
    if not status:
        pytest.skip(status.reason)

The cluster (one node ``localhost``, partition ``debug``, two fake GPUs of type ``fake``)
has accounting off, so ``sacct`` does not work: Snakemake needs
``--slurm-status-command squeue`` or it waits forever for finished jobs.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from tests.workflow_helpers import REPO

START_SCRIPT = REPO / ".ci" / "slurm" / "start.sh"
STOP_SCRIPT = REPO / ".ci" / "slurm" / "stop.sh"
PARTITION = "debug"

# Executor flags for `snakemake` (9.x, slurm plugin 2.8.0) against this cluster.
SNAKEMAKE_SLURM_ARGS = [
    "--executor",
    "slurm",
    "--slurm-status-command",
    "squeue",  # sacct needs accounting (slurmdbd)
    "--slurm-init-seconds-before-status-checks",
    "2",  # default 40 s
    "--default-resources",
    f"slurm_partition={PARTITION}",
    "runtime=10",
    "mem_mb=500",
]


@dataclass(frozen=True)
class ClusterStatus:
    """Truthy when the cluster answers; ``reason`` says why not (for pytest.skip)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _node_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    state = out.stdout.strip()  # "idle*" = not responding: not ready
    return out.returncode == 0 and state in {"idle", "mixed", "allocated", "completing"}


@functools.cache
def ensure_cluster(timeout: float = 600) -> ClusterStatus:
    """Make sure the test cluster runs; start it with .ci/slurm/start.sh if we may.

    Starting needs root (apt-get install of slurm-wlm/munge, daemons); it is skipped
    when ZSHARP_NO_SLURM is set. The result is cached for the session.
    """
    if os.environ.get("ZSHARP_NO_SLURM"):
        return ClusterStatus(False, "ZSHARP_NO_SLURM is set")
    if _node_ready():
        return ClusterStatus(True)
    if os.name != "posix" or os.geteuid() != 0:
        return ClusterStatus(
            False, "SLURM test cluster not running and not root (start: sudo .ci/slurm/start.sh)"
        )
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return ClusterStatus(False, "slurm-wlm not installed and no apt-get to install it")
    try:
        proc = subprocess.run(
            ["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return ClusterStatus(False, f"{START_SCRIPT.name} timed out after {timeout:.0f} s")
    if proc.returncode != 0 or not _node_ready():
        tail = " | ".join((proc.stderr + proc.stdout).strip().splitlines()[-3:])
        return ClusterStatus(False, f"{START_SCRIPT.name} failed (rc={proc.returncode}): {tail}")
    return ClusterStatus(True)


_JOB_ID_RE = re.compile(
    r"(?:SLURM job ?id|Submitted batch job)\s+(\d+)"  # snakemake / plain sbatch
    r"|^(\d+)(?:;\S+)?$",  # sbatch --parsable
    re.IGNORECASE | re.MULTILINE,
)


def job_ids_in(text: str) -> list[str]:
    """SLURM job ids mentioned in sbatch/Snakemake output, unique, in order seen.

    Matches "Job 3 has been submitted with SLURM jobid 17 (log: ...)",
    "Submitted batch job 17" and bare ``sbatch --parsable`` lines ("17", "17;cluster").
    """
    seen: dict[str, None] = {}
    for m in _JOB_ID_RE.finditer(text):
        seen.setdefault(m.group(1) or m.group(2), None)
    return list(seen)


def requeue_now(job_id: str, timeout: float = 30) -> None:
    """``scontrol requeue`` a running batch job and let it start again at once.

    SLURM holds a requeued job for ~2 minutes (Reason=BeginTime); once it is PENDING
    we reset its start time to now. It reruns with the same job id and command.
    """
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
        ).stdout.strip()
        if state == "PENDING":
            subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                check=True,
                capture_output=True,
                text=True,
            )
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not PENDING {timeout:.0f} s after requeue")
