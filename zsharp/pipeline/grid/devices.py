"""Give each job on a multi-GPU machine a GPU, or a slot of one: ``zsharp-device N -- COMMAND``.

Snakemake's ``--resources gpu=N`` bounds how many GPU jobs run at once but assigns no
device ids (snakemake issue 281). This wrapper does: it locks N free devices with ``flock``
on files in a lock directory, exports ``CUDA_VISIBLE_DEVICES`` with their indices and
``exec``s COMMAND with the locks held. The kernel drops the locks when the job's process
ends, however it ends (a crash or SIGKILL included), so a device is never leaked.

``zsharp-device [--cells-per-gpu K] [--mem-mb M] N -- COMMAND``

* ``K = 1`` (the default): N whole devices, exclusive (an exclusive lock on
  ``gpu<i>.lock``).
* ``K > 1``: a small cell leaves most of a large GPU idle, so K of them share one. The job
  takes one of K slots on each of N devices: a shared lock on ``gpu<i>.lock`` (so an
  exclusive job and slot jobs never share a device) and an exclusive lock on
  ``gpu<i>.slot<s>.lock``. A job joins a device only while fewer than K slots there are
  held, and picks the least loaded devices first. ``N`` may also be a fraction 1/K
  (``zsharp-device 0.25 -- …`` is ``--cells-per-gpu 4 1``). The job sees
  ``ZSHARP_GPU_SLOT`` (its slot on each device) and ``ZSHARP_CELLS_PER_GPU``.
* Memory: with ``--mem-mb M`` (or K > 1) the devices' free memory is read once the slot is
  held (``nvidia-smi --query-gpu=memory.free``; tests give ``$ZSHARP_GPU_FREE_MB``). A job
  whose need is not free fails at once with one line naming the device and the numbers,
  exit status 75 (EX_TEMPFAIL: a retry may find the memory free), instead of an
  out-of-memory error later. Without ``--mem-mb`` a slot job needs 90 % of its fair share,
  total/K; ``K·M`` more than a device holds is refused outright.
* CUDA MPS (``nvidia-cuda-mps-control -d``) lets the K processes' kernels run concurrently
  instead of time-sliced; the wrapper reports whether an MPS control daemon is listening
  (``$CUDA_MPS_PIPE_DIRECTORY``, default ``/tmp/nvidia-mps``), and never starts one.

It steps aside (runs COMMAND on the devices it was given) when N is 0, when the machine has
no GPU, or when a scheduler already chose the devices (``CUDA_VISIBLE_DEVICES`` lists no
more than N, as SLURM's allocation does; the memory check still runs); if
``CUDA_VISIBLE_DEVICES`` lists more, it picks among those. The GPU count comes from
``$ZSHARP_GPUS`` (tests simulate devices with it), else from ``nvidia-smi``. The lock
directory is ``$ZSHARP_GPU_LOCK_DIR`` (default ``/tmp/zsharp-gpu-locks-<uid>``); it must be
local to the machine. ``$ZSHARP_CELLS_PER_GPU`` and ``$ZSHARP_GPU_MEM_MB`` give defaults for
K and M.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

POLL_SECONDS = 0.5
NO_MEMORY = 75  # EX_TEMPFAIL
FAIR_SHARE = 0.9  # a slot job's default need: this fraction of total/K
USAGE = "usage: zsharp-device [--cells-per-gpu K] [--mem-mb M] N -- COMMAND [ARG...]"

#: device id (index or UUID, as in CUDA_VISIBLE_DEVICES) → (free, total) MiB
Memory = Mapping[str, tuple[int, int]]


def gpu_count() -> int:
    """GPUs on this machine: ``$ZSHARP_GPUS``, else what ``nvidia-smi -L`` lists."""
    if "ZSHARP_GPUS" in os.environ:
        return int(os.environ["ZSHARP_GPUS"])
    listing = _nvidia_smi("-L")
    if listing is None:
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def _nvidia_smi(*args: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(
            ["nvidia-smi", *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_memory() -> dict[str, tuple[int, int]] | None:
    """Free and total MiB of every device, by index and by UUID; None if unknown.

    ``$ZSHARP_GPU_FREE_MB`` (``FREE[/TOTAL],…``, one entry per device index; TOTAL defaults
    to FREE) stands in for ``nvidia-smi`` in tests.
    """
    fake = os.environ.get("ZSHARP_GPU_FREE_MB")
    if fake is not None:
        memory = {}
        for index, entry in enumerate(e.strip() for e in fake.split(",") if e.strip()):
            free, _, total = entry.partition("/")
            memory[str(index)] = (int(free), int(total or free))
        return memory
    listing = _nvidia_smi(
        "--query-gpu=index,uuid,memory.free,memory.total", "--format=csv,noheader,nounits"
    )
    if listing is None:
        return None
    memory = {}
    for line in listing.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 4 and fields[0].isdigit():
            with contextlib.suppress(ValueError):
                memory[fields[0]] = memory[fields[1]] = (int(fields[2]), int(fields[3]))
    return memory or None


def mps_pipe_dir() -> Path | None:
    """The pipe directory of a running CUDA MPS control daemon, or None."""
    directory = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps")
    return directory if (directory / "control").exists() else None


def lock_dir() -> Path:
    default = Path("/tmp") / f"zsharp-gpu-locks-{os.getuid()}"
    return Path(os.environ.get("ZSHARP_GPU_LOCK_DIR", default))


# --------------------------------------------------------------------------- locking


def _try_lock(path: Path, operation: int) -> int | None:
    """An fd holding ``operation`` (LOCK_EX or LOCK_SH) on ``path``, or None if busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _mutex(directory: Path) -> Iterator[None]:
    """Serialise the choice of devices among wrappers (held for milliseconds)."""
    fd = os.open(directory / "acquire.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_SLOT_FILE = re.compile(r"gpu(?P<device>.+)\.slot(?P<slot>\d+)\.lock")


@dataclass
class _Offer:
    load: int  # slots held on the device by other jobs
    order: int
    device: str
    slot: int
    fds: list[int]


def _offer(directory: Path, device: str, order: int, slots: int) -> _Offer | None:
    """Lock what taking ``device`` needs, if it is available to a job of ``slots`` per GPU."""
    if slots == 1:
        fd = _try_lock(directory / f"gpu{device}.lock", fcntl.LOCK_EX)
        return None if fd is None else _Offer(0, order, device, 0, [fd])
    shared = _try_lock(directory / f"gpu{device}.lock", fcntl.LOCK_SH)
    if shared is None:  # an exclusive job holds the device
        return None
    indices = set(range(slots))
    for path in directory.glob(f"gpu{device}.slot*.lock"):  # slots of jobs with another K
        match = _SLOT_FILE.fullmatch(path.name)
        if match and match["device"] == device:
            indices.add(int(match["slot"]))
    free: dict[int, int] = {}
    for index in sorted(indices):
        fd = _try_lock(directory / f"gpu{device}.slot{index}.lock", fcntl.LOCK_EX)
        if fd is not None:
            free[index] = fd
    load = len(indices) - len(free)
    usable = [i for i in sorted(free) if i < slots]
    keep = usable[0] if load < slots and usable else None
    for index, fd in free.items():
        if index != keep:
            os.close(fd)
    if keep is None:
        os.close(shared)
        return None
    return _Offer(load, order, device, keep, [shared, free[keep]])


def acquire_slots(
    wanted: int,
    devices: Sequence[str],
    directory: Path,
    slots: int = 1,
    timeout: float | None = None,
) -> list[tuple[str, int]]:
    """Lock one of ``slots`` slots on each of ``wanted`` devices among ``devices`` (waiting
    for them); return ``(device, slot)`` pairs, least loaded devices first.

    The lock file descriptors are left open and inheritable, so they survive ``exec`` and
    are released only when the process that ends up holding them exits.
    """
    if wanted > len(devices):
        raise ValueError(f"gpu: {wanted} GPUs requested but only {len(devices)} can be used")
    if slots < 1:
        raise ValueError(f"cells_per_gpu must be at least 1, got {slots}")
    directory.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _mutex(directory):
            offers = [
                offer
                for order, device in enumerate(devices)
                if (offer := _offer(directory, device, order, slots)) is not None
            ]
            offers.sort(key=lambda o: (o.load, o.order))
            chosen = offers[:wanted] if len(offers) >= wanted else []
            for offer in chosen:
                for fd in offer.fds:
                    os.set_inheritable(fd, True)
            for offer in offers[len(chosen) :]:  # not enough free: let go and wait, so no
                for fd in offer.fds:  # two jobs deadlock
                    os.close(fd)
        if chosen:
            return [(o.device, o.slot) for o in chosen]
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"no {wanted} free GPU(s) of {len(devices)} within {timeout} s"
                + (f" ({slots} cells per GPU)" if slots > 1 else "")
            )
        time.sleep(POLL_SECONDS)


def acquire(
    wanted: int, devices: Sequence[str], directory: Path, timeout: float | None = None
) -> list[str]:
    """Lock ``wanted`` whole free devices among ``devices`` (waiting); return their ids."""
    return [device for device, _ in acquire_slots(wanted, devices, directory, 1, timeout)]


# --------------------------------------------------------------------------- memory


def memory_error(
    assigned: Sequence[tuple[str, int | None]], slots: int, need_mb: int | None, memory: Memory
) -> str | None:
    """Why the job does not fit on its devices (one line), or None if it does."""
    for device, slot in assigned:
        if device not in memory:
            continue
        free, total = memory[device]
        if need_mb is not None and slots * need_mb > total:
            return (
                f"GPU {device}: {slots} cells × {need_mb} MiB do not fit in its {total} MiB; "
                f"lower cells_per_gpu or gpu_mem_mb"
            )
        need = need_mb if need_mb is not None else int(FAIR_SHARE * total / slots)
        if free < need:
            where = f" (slot {slot} of {slots})" if slots > 1 and slot is not None else ""
            how = "" if need_mb is not None else f", 90 % of its share of {total} MiB / {slots}"
            return (
                f"GPU {device} has {free} MiB free of {total} MiB; this cell needs {need} MiB"
                f"{where}{how}: lower cells_per_gpu, or set gpu_mem_mb to what a cell needs"
            )
    return None


# --------------------------------------------------------------------------- command line


@dataclass
class Request:
    gpus: int
    cells_per_gpu: int
    mem_mb: int | None
    command: list[str]


class UsageError(ValueError):
    pass


def _positive_int(name: str, text: str, minimum: int = 1) -> int:
    if not text.isdigit() or int(text) < minimum:
        raise UsageError(f"{name} must be an integer ≥ {minimum}, got {text!r}")
    return int(text)


def parse(args: Sequence[str], environ: Mapping[str, str]) -> Request:
    """``[--cells-per-gpu K] [--mem-mb M] N -- COMMAND…`` (N an integer or 1/K)."""
    if "--" not in args:
        raise UsageError(USAGE)
    split = list(args).index("--")
    head, command = list(args[:split]), list(args[split + 1 :])
    options: dict[str, str] = {}
    positional: list[str] = []
    while head:
        item = head.pop(0)
        name, equals, value = item.partition("=")
        if name in ("--cells-per-gpu", "--mem-mb"):
            if not equals:
                if not head:
                    raise UsageError(f"{name} needs a value")
                value = head.pop(0)
            options[name] = value
        elif item.startswith("-"):
            raise UsageError(f"unknown option {item!r}; {USAGE}")
        else:
            positional.append(item)
    if len(positional) != 1 or not command:
        raise UsageError(USAGE)
    k_text = options.get("--cells-per-gpu", environ.get("ZSHARP_CELLS_PER_GPU") or "1")
    slots = _positive_int("cells_per_gpu", k_text.strip())
    mem_text = options.get("--mem-mb", environ.get("ZSHARP_GPU_MEM_MB") or "0").strip()
    mem_mb = _positive_int("gpu_mem_mb", mem_text, minimum=0) or None
    text = positional[0]
    if text.isdigit():
        return Request(int(text), slots, mem_mb, command)
    try:
        share = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"N must be a GPU count or a fraction 1/K, got {text!r}") from None
    if not 0 < share < 1 or share.numerator != 1:
        raise UsageError(f"a fractional GPU request must be 1/K (0.5, 0.25, 1/3), got {text!r}")
    if "--cells-per-gpu" in options and slots != share.denominator:
        raise UsageError(
            f"N = {text} means {share.denominator} cells per GPU, not --cells-per-gpu {slots}"
        )
    return Request(1, share.denominator, mem_mb, command)


def _say(message: str) -> None:
    print(f"zsharp-device: {message}", file=sys.stderr, flush=True)


def main(
    argv: Sequence[str] | None = None, read_memory: Callable[[], Memory | None] = gpu_memory
) -> int:
    """The ``zsharp-device`` command; ``read_memory`` is the free-memory source."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        request = parse(args, os.environ)
    except UsageError as error:
        print(f"zsharp-device: error: {error}" if str(error) != USAGE else USAGE, file=sys.stderr)
        return 2
    wanted, slots = request.gpus, request.cells_per_gpu
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    candidates = visible if "CUDA_VISIBLE_DEVICES" in os.environ else None
    if candidates is None:
        candidates = [str(i) for i in range(gpu_count())]
    assigned: list[tuple[str, int | None]] = []
    if wanted > 0 and candidates and len(candidates) > (wanted if visible else 0):
        try:
            assigned = list(acquire_slots(wanted, candidates, lock_dir(), slots))
        except ValueError as error:
            _say(f"error: {error}")
            return 2
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(d for d, _ in assigned)
        os.environ["ZSHARP_GPU_SLOT"] = ",".join(str(s) for _, s in assigned)
        os.environ["ZSHARP_CELLS_PER_GPU"] = str(slots)
        detail = ""
        if slots > 1:
            mps = mps_pipe_dir()
            detail = f" (slot {os.environ['ZSHARP_GPU_SLOT']} of {slots}; CUDA MPS " + (
                f"on, {mps})" if mps else "off)"
            )
        _say(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}{detail}")
    elif wanted > 0 and visible:  # a scheduler's devices: check they can take the job
        assigned = [(d.strip(), None) for d in visible]
    if assigned and (slots > 1 or request.mem_mb is not None):
        memory = read_memory()
        if memory is None:
            if request.mem_mb is not None:
                _say("cannot read the GPUs' free memory (no nvidia-smi): not checked")
        elif (error := memory_error(assigned, slots, request.mem_mb, memory)) is not None:
            _say(f"error: {error}")
            return NO_MEMORY
    command = request.command
    try:
        os.execvp(command[0], command)
    except OSError as error:
        _say(f"cannot run {command[0]!r}: {error}")
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
