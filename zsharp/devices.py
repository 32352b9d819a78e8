"""Give each job on a multi-GPU machine a GPU of its own: ``zsharp-device N -- COMMAND``.

Snakemake's ``--resources gpu=N`` bounds how many GPU jobs run at once but assigns no
device ids (snakemake issue 281). This wrapper does: it takes an exclusive ``flock`` on N
free slot files ``<lock dir>/gpu<i>.lock``, exports ``CUDA_VISIBLE_DEVICES`` with their
indices and ``exec``s COMMAND with the locks held. The kernel drops the locks when the job's
process ends, however it ends (a crash or SIGKILL included), so a device is never leaked.

It steps aside, running COMMAND unchanged, when N is 0, when the machine has no GPU, or when
a scheduler already chose the devices (``CUDA_VISIBLE_DEVICES`` lists no more than N, as
SLURM's allocation does); if ``CUDA_VISIBLE_DEVICES`` lists more, it picks among those.
The GPU count comes from ``$ZSHARP_GPUS`` (tests simulate devices with it), else from
``nvidia-smi``. The lock directory is ``$ZSHARP_GPU_LOCK_DIR`` (default
``/tmp/zsharp-gpu-locks-<uid>``); it must be local to the machine.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

POLL_SECONDS = 0.5


def gpu_count() -> int:
    """GPUs on this machine: ``$ZSHARP_GPUS``, else what ``nvidia-smi -L`` lists."""
    if "ZSHARP_GPUS" in os.environ:
        return int(os.environ["ZSHARP_GPUS"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def lock_dir() -> Path:
    default = Path("/tmp") / f"zsharp-gpu-locks-{os.getuid()}"
    return Path(os.environ.get("ZSHARP_GPU_LOCK_DIR", default))


def acquire(
    wanted: int, devices: Sequence[str], directory: Path, timeout: float | None = None
) -> list[str]:
    """Lock ``wanted`` free devices among ``devices`` (waiting for them); return their ids.

    The lock file descriptors are left open and inheritable, so they survive ``exec`` and
    are released only when the process that ends up holding them exits.
    """
    if wanted > len(devices):
        raise ValueError(f"gpu: {wanted} GPUs requested but only {len(devices)} can be used")
    directory.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        held: list[tuple[str, int]] = []
        for device in devices:
            fd = os.open(directory / f"gpu{device}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((device, fd))
            if len(held) == wanted:
                for _, kept in held:
                    os.set_inheritable(kept, True)
                return [i for i, _ in held]
        for _, fd in held:  # not enough free: let go and wait, so no two jobs deadlock
            os.close(fd)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no {wanted} free GPU(s) of {len(devices)} within {timeout} s")
        time.sleep(POLL_SECONDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        print("usage: zsharp-device N -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    wanted, command = int(args[0]), args[2:]
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    candidates = visible if "CUDA_VISIBLE_DEVICES" in os.environ else None
    if candidates is None:
        candidates = [str(i) for i in range(gpu_count())]
    if wanted > 0 and candidates and len(candidates) > (wanted if visible else 0):
        try:
            devices = acquire(wanted, candidates, lock_dir())
        except ValueError as error:
            print(f"zsharp-device: error: {error}", file=sys.stderr)
            return 2
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        print(
            f"zsharp-device: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}",
            file=sys.stderr,
            flush=True,
        )
    try:
        os.execvp(command[0], command)
    except OSError as error:
        print(f"zsharp-device: cannot run {command[0]!r}: {error}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
