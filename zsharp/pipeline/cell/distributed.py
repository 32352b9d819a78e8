"""One cell on N processes: the process group, the rank's view, and the torchrun launch.

A data-parallel cell runs under ``torchrun`` (or ``srun``, or any launcher that sets the
usual ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` variables):
every rank builds the same model from the same seed, takes its shard of every global batch
(:class:`zsharp.data.loader.DeviceLoader` with ``rank``/``world_size``) and DDP averages the
gradients. Rank 0 alone writes the cell (checkpoints, metrics, summary, W&B).

``zsharp train --processes N`` is a thin front: :func:`launch` runs
``python -m torch.distributed.run --standalone --nproc-per-node N -m zsharp train …``
as a child, waits for every rank to exit, and returns rank 0's exit status
(0, 3 = checkpointed on a signal, 4 = non-finite loss, …), which torchrun itself does not
pass on (it exits 1 whenever a worker exits non-zero). SIGTERM, SIGINT and SIGUSR1 are
passed on to torchrun, which signals every worker (``--signals-to-handle``): each rank
checkpoints at the next step boundary, after all ranks agree (:func:`agree`).

Collectives are bounded: ``ZSHARP_DDP_TIMEOUT`` seconds (default 600) for a rank that hangs;
past it the waiting ranks fail with an error and torchrun stops the rest.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT_ENV = "ZSHARP_DDP_TIMEOUT"
DEFAULT_TIMEOUT_S = 600
# where :func:`launch` collects the ranks' exit statuses (a folder it owns)
STATUS_ENV = "ZSHARP_RANK_STATUS_DIR"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# torchrun waits this long for workers to checkpoint on a signal before SIGKILL
SHUTDOWN_TIMEOUT_S = 120


@dataclass(frozen=True)
class World:
    """This process's place in the cell: its rank, its rank on the node, the world size."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the cell."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> World:
        """The world torchrun (or srun through its variables) describes; one process else."""
        env = os.environ if environ is None else environ
        size = int(env.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return cls()
        rank = int(env["RANK"])
        return cls(rank=rank, local_rank=int(env.get("LOCAL_RANK", rank)), size=size)


def timeout_seconds() -> float:
    """The collective timeout: ``$ZSHARP_DDP_TIMEOUT`` seconds (default 600)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        from zsharp.pipeline.cell.config import ConfigError

        raise ConfigError(f"{TIMEOUT_ENV}: must be a number of seconds > 0, got {text!r}")
    return value


def init(world: World, device_type: str) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPUs; collectives time out."""
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_seconds()),
    )


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(stop: bool, first_bad: Any) -> tuple[bool, int]:
    """Whether any rank was asked to stop, and the earliest step any rank saw a non-finite
    loss at (−1: none), in one all-reduce."""
    import torch
    import torch.distributed as dist

    none = torch.iinfo(torch.int64).max
    bad = torch.where(first_bad < 0, torch.full_like(first_bad, none), first_bad)
    both = torch.stack([-torch.tensor(int(stop), device=bad.device), bad]).to(torch.int64)
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    stop_any, at = (int(v) for v in both.tolist())
    return stop_any < 0, (-1 if at == none else at)


def all_sum(values: list[float], device: Any) -> list[float]:
    """Σ over ranks of each value (float64)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


# --- the front: zsharp train --processes N ---------------------------------------------------


def launched_rank() -> bool:
    """Whether this process is one of the ranks :func:`launch` started."""
    return bool(os.environ.get(STATUS_ENV))


def write_status(world: World, code: int) -> None:
    """Leave this rank's exit status where :func:`launch` looks for it."""
    folder = os.environ.get(STATUS_ENV)
    if not folder or not world.distributed:
        return
    path = Path(folder) / f"rank{world.rank}.status"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(code))
    tmp.replace(path)


def announce(world: World) -> None:
    """Record this rank's pid, so that :func:`launch` waits for it to exit."""
    folder = os.environ.get(STATUS_ENV)
    if folder and world.distributed:
        (Path(folder) / f"rank{world.rank}.pid").write_text(str(os.getpid()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by torchrun) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def torchrun_command(processes: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command that runs ``zsharp`` ``argv`` on ``processes`` local ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        "-m",
        "zsharp",
        *argv,
    ]


def launch(processes: int, argv: Sequence[str], wait_s: float = SHUTDOWN_TIMEOUT_S) -> int:
    """Run ``zsharp`` ``argv`` on ``processes`` ranks through torchrun; rank 0's status.

    Signals reaching this process are passed on to torchrun (once each), which signals the
    workers; after torchrun exits, ranks still writing (a checkpoint on a signal) are
    waited for, up to ``wait_s`` seconds. Without a status from rank 0 (it was killed)
    torchrun's own exit status is returned.
    """
    with tempfile.TemporaryDirectory(prefix="zsharp-ranks-") as folder:
        env = {**os.environ, STATUS_ENV: folder}
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, set quietly
        child = subprocess.Popen(torchrun_command(processes, argv), env=env)
        forwarded: set[int] = set()

        def forward(signum: int, _frame: Any) -> None:
            if signum not in forwarded and child.poll() is None:
                forwarded.add(signum)
                child.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in FORWARDED}
        try:
            code = child.wait()
            deadline = time.monotonic() + wait_s
            for pid_file in Path(folder).glob("rank*.pid"):
                pid = int(pid_file.read_text() or 0)
                while pid and _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        status = Path(folder) / "rank0.status"
        if status.exists():
            return int(status.read_text())
        return code if code >= 0 else 128 - code  # killed by a signal: as a shell says
