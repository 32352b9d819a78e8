"""GPU assignment on a multi-GPU box, simulated: one device per job, freed when a job dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workflow_helpers import environment

DEVICE = str(Path(sys.executable).parent / "zsharp-device")

# A job: record the devices it was given and when it held them, then maybe crash.
JOB = textwrap.dedent("""
    import json, os, sys, time
    start = time.time()
    time.sleep(float(sys.argv[2]))
    record = {"job": sys.argv[1], "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "start": start, "end": time.time()}
    with open(sys.argv[3], "a") as handle:
        handle.write(json.dumps(record) + "\\n")
    if sys.argv[4] == "crash":
        os.kill(os.getpid(), 9)
""")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_exclusive(jobs: list[dict]) -> None:
    """No two jobs that overlap in time hold the same device."""
    for i, a in enumerate(jobs):
        for b in jobs[i + 1 :]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            shared = set(a["devices"].split(",")) & set(b["devices"].split(","))
            assert not (overlap and shared), (a, b)


def test_concurrent_jobs_never_share_a_device(tmp_path: Path) -> None:
    script, log = tmp_path / "job.py", tmp_path / "jobs.jsonl"
    script.write_text(JOB)
    env = environment(ZSHARP_GPUS="3", ZSHARP_GPU_LOCK_DIR=str(tmp_path / "locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    processes = [
        subprocess.Popen(
            [DEVICE, "1", "--", sys.executable, str(script), str(i), "0.6", str(log), "ok"], env=env
        )
        for i in range(7)
    ]
    assert all(p.wait(timeout=120) == 0 for p in processes)
    jobs = records(log)
    assert len(jobs) == 7
    assert {j["devices"] for j in jobs} <= {"0", "1", "2"}
    assert_exclusive(jobs)


def test_a_crashed_job_frees_its_device(tmp_path: Path) -> None:
    script, log = tmp_path / "job.py", tmp_path / "jobs.jsonl"
    script.write_text(JOB)
    env = environment(ZSHARP_GPUS="1", ZSHARP_GPU_LOCK_DIR=str(tmp_path / "locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    crashed = subprocess.run(
        [DEVICE, "1", "--", sys.executable, str(script), "a", "0", str(log), "crash"],
        env=env,
        timeout=60,
    )
    assert crashed.returncode == -9  # SIGKILL, with the device's lock held
    after = subprocess.run(
        [DEVICE, "1", "--", sys.executable, str(script), "b", "0", str(log), "ok"],
        env=env,
        timeout=30,
    )
    assert after.returncode == 0
    assert [j["devices"] for j in records(log)] == ["0", "0"]


@pytest.mark.parametrize(("visible", "expected"), [("3", "3"), ("", "")])
def test_scheduler_assigned_devices_are_left_alone(visible, expected, tmp_path: Path) -> None:
    """Under SLURM (CUDA_VISIBLE_DEVICES already holds the allocation) nothing changes."""
    env = environment(
        ZSHARP_GPUS="4", ZSHARP_GPU_LOCK_DIR=str(tmp_path / "locks"), CUDA_VISIBLE_DEVICES=visible
    )
    out = subprocess.run(
        [
            DEVICE,
            "1",
            "--",
            sys.executable,
            "-c",
            "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == expected
    assert not (tmp_path / "locks").exists()


def test_no_gpu_or_zero_requested_runs_unchanged(tmp_path: Path) -> None:
    env = environment(ZSHARP_GPUS="0", ZSHARP_GPU_LOCK_DIR=str(tmp_path / "locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for wanted in ("0", "1"):
        out = subprocess.run(
            [
                DEVICE,
                wanted,
                "--",
                sys.executable,
                "-c",
                "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout.strip() == "None"


def test_asking_for_more_gpus_than_exist_fails_clearly(tmp_path: Path) -> None:
    env = environment(ZSHARP_GPUS="2", ZSHARP_GPU_LOCK_DIR=str(tmp_path / "locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run(
        [DEVICE, "3", "--", "true"], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2 and "gpu: 3 GPUs requested" in out.stderr


SNAKEFILE = textwrap.dedent("""
    rule all:
        input: expand("done/{i}", i=range(6))

    rule job:
        output: "done/{i}"
        resources: gpu=1
        params: crash=lambda wc: "crash" if wc.i == "1" else "ok"
        shell:
            "{DEVICE} {resources.gpu} -- {PYTHON} {SCRIPT} {wildcards.i} 1.0 {LOG} "
            "{params.crash}; touch {output}"
""")


def test_snakemake_resources_gpu_n_gives_each_job_its_own_device(tmp_path: Path) -> None:
    """`snakemake --cores 4 --resources gpu=2` on a simulated 2-GPU box, one job crashing."""
    script, log = tmp_path / "job.py", tmp_path / "jobs.jsonl"
    script.write_text(JOB)
    (tmp_path / "Snakefile").write_text(
        SNAKEFILE.replace("{DEVICE}", DEVICE)
        .replace("{PYTHON}", sys.executable)
        .replace("{SCRIPT}", str(script))
        .replace("{LOG}", str(log))
    )
    env = environment(ZSHARP_GPUS="2", ZSHARP_GPU_LOCK_DIR=str(tmp_path / "locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "--cores",
            "4",
            "--resources",
            "gpu=2",
            "--keep-going",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    jobs = records(log)
    assert len(jobs) == 6, result.stdout + result.stderr
    assert {j["devices"] for j in jobs} == {"0", "1"}
    assert_exclusive(jobs)
    # the crashed job (1) failed; every other one finished, on the devices it freed too
    assert result.returncode != 0
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["0", "2", "3", "4", "5"]
    assert (tmp_path / "locks").exists()


# --------------------------------------------------------------------------- k cells per GPU

# A cell that holds its slot: it records where it runs, marks its arrival, waits until
# `expected` cells have arrived (a barrier: proves that they run side by side) and until the
# release file exists, then records when it left.
HOLD = textwrap.dedent("""
    import json, os, sys, time
    name, log, barrier, expected, release = sys.argv[1:6]
    start = time.time()
    where = {"job": name, "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "slot": os.environ.get("ZSHARP_GPU_SLOT"),
             "k": os.environ.get("ZSHARP_CELLS_PER_GPU")}
    with open(log + ".started", "a") as handle:
        handle.write(json.dumps(where) + "\\n")
    open(os.path.join(barrier, name), "w").close()
    deadline = time.time() + 90
    while len(os.listdir(barrier)) < int(expected) or not os.path.exists(release):
        if time.time() > deadline:
            sys.exit(f"{name}: timed out at the barrier")
        time.sleep(0.05)
    with open(log, "a") as handle:
        handle.write(json.dumps({**where, "start": start, "end": time.time()}) + "\\n")
""")


def hold_env(tmp_path: Path, gpus: str, **extra: str) -> dict[str, str]:
    env = environment(ZSHARP_GPUS=gpus, ZSHARP_GPU_LOCK_DIR=str(tmp_path / "locks"))
    for name in ("CUDA_VISIBLE_DEVICES", "ZSHARP_CELLS_PER_GPU", "ZSHARP_GPU_MEM_MB"):
        env.pop(name, None)
    # fake devices have plenty of free memory (never the real GPUs' numbers, if any)
    env["ZSHARP_GPU_FREE_MB"] = ",".join(["80000/81920"] * 8)
    return {**env, **extra}


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen]]:
    """Processes a test started; any still running at its end (a failed test) are killed."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(predicate, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def started(log: Path) -> list[dict]:
    path = Path(str(log) + ".started")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def max_concurrent(jobs: list[dict], device: str) -> int:
    """The most jobs on ``device`` at one instant (their recorded intervals)."""
    events = sorted(
        (t, step)
        for j in jobs
        if device in j["devices"].split(",")
        for t, step in ((j["start"], 1), (j["end"], -1))
    )
    running = most = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        most = max(most, running)
    return most


class Cells:
    """Launches HOLD cells through zsharp-device; they share a log, a barrier and a release."""

    def __init__(self, tmp_path: Path, env: dict[str, str], spawned: list, barrier: int) -> None:
        self.script, self.log = tmp_path / "hold.py", tmp_path / "jobs.jsonl"
        self.barrier, self.release = tmp_path / "barrier", tmp_path / "release"
        self.script.write_text(HOLD)
        self.barrier.mkdir()
        self.env, self.spawned, self.expected = env, spawned, barrier

    def launch(self, name: str, *request: str) -> subprocess.Popen:
        cell = [self.script, name, self.log, self.barrier, self.expected, self.release]
        process = subprocess.Popen(
            [DEVICE, *request, "--", sys.executable, *map(str, cell)], env=self.env
        )
        self.spawned.append(process)
        return process

    def started(self) -> list[dict]:
        return started(self.log)

    def wait_started(self, count: int) -> None:
        wait_for(lambda: len(self.started()) >= count, f"{count} cells to start")


def test_k_cells_share_each_gpu_never_more(tmp_path: Path, spawned) -> None:
    """2 fake GPUs × 2 slots: 4 cells run side by side (a barrier proves it), 2 per device,
    each on its own (device, slot); a fifth waits for a slot."""
    cells = Cells(tmp_path, hold_env(tmp_path, "2"), spawned, barrier=4)
    # two spellings of "2 cells per GPU": the option and the fractional request
    first = [cells.launch(f"a{i}", "--cells-per-gpu", "2", "1") for i in range(2)]
    first += [cells.launch(f"b{i}", "0.5") for i in range(2)]
    cells.wait_started(4)
    fifth = cells.launch("c", "--cells-per-gpu", "2", "1")
    time.sleep(1.0)  # every slot is held: a wrong implementation would start it here
    assert [s["job"] for s in cells.started()].count("c") == 0
    cells.release.touch()
    assert all(p.wait(timeout=120) == 0 for p in [*first, fifth])
    jobs = records(cells.log)
    assert len(jobs) == 5
    assert {j["k"] for j in jobs} == {"2"}
    # least loaded first: the four spread 2 + 2 over the devices, slots 0 and 1 on each
    assert sorted((j["devices"], j["slot"]) for j in jobs if j["job"] != "c") == [
        ("0", "0"),
        ("0", "1"),
        ("1", "0"),
        ("1", "1"),
    ]
    for device in ("0", "1"):
        assert max_concurrent(jobs, device) <= 2
    locks = {p.name for p in (tmp_path / "locks").iterdir()}
    assert {f"gpu{d}.slot{s}.lock" for d in "01" for s in "01"} <= locks
    assert not any(".slot2." in name for name in locks)


def test_a_killed_cell_frees_its_slot(tmp_path: Path, spawned) -> None:
    env = hold_env(tmp_path, "1", ZSHARP_CELLS_PER_GPU="2")  # K from the environment
    cells = Cells(tmp_path, env, spawned, barrier=3)
    a, b = cells.launch("a", "1"), cells.launch("b", "1")
    cells.wait_started(2)
    slot_of = {s["job"]: s["slot"] for s in cells.started()}
    assert set(slot_of.values()) == {"0", "1"}
    c = cells.launch("c", "1")
    a.kill()  # SIGKILL (zsharp-device exec'd into the cell: this is the cell itself)
    assert a.wait(timeout=30) == -9
    cells.wait_started(3)
    assert {s["job"]: (s["devices"], s["slot"]) for s in cells.started()}["c"] == (
        "0",
        slot_of["a"],
    )
    cells.release.touch()
    assert b.wait(timeout=60) == 0 and c.wait(timeout=60) == 0


def test_exclusive_and_shared_jobs_never_share_a_device(tmp_path: Path, spawned) -> None:
    """A whole-GPU job (K = 1) and slot jobs (K = 2) exclude each other on a device."""
    cells = Cells(tmp_path, hold_env(tmp_path, "1"), spawned, barrier=1)
    whole = cells.launch("whole", "1")
    cells.wait_started(1)
    shared = cells.launch("shared", "--cells-per-gpu=2", "1")
    time.sleep(1.5)  # a wrong implementation would start it here
    assert [s["job"] for s in cells.started()] == ["whole"]
    cells.release.touch()
    assert whole.wait(timeout=60) == 0 and shared.wait(timeout=60) == 0
    jobs = {j["job"]: j for j in records(cells.log)}
    assert jobs["shared"]["start"] >= jobs["whole"]["end"]


def run_device(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    probe = (
        "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'), "
        "os.environ.get('ZSHARP_GPU_SLOT'), os.environ.get('ZSHARP_CELLS_PER_GPU'))"
    )
    return subprocess.run(
        [DEVICE, *args, "--", sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_fractional_request_is_one_slot_of_k(tmp_path: Path) -> None:
    env = hold_env(tmp_path, "3")
    out = run_device(["1/4"], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0", "4"]
    assert "CUDA_VISIBLE_DEVICES=0 (slot 0 of 4; CUDA MPS " in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0.3"], "a fractional GPU request must be 1/K"),
        (["--cells-per-gpu", "0", "1"], "cells_per_gpu must be an integer ≥ 1, got '0'"),
        (["--cells-per-gpu", "3", "0.5"], "N = 0.5 means 2 cells per GPU, not --cells-per-gpu 3"),
        (["--mem-mb", "lots", "1"], "gpu_mem_mb must be an integer ≥ 0, got 'lots'"),
        (["--slots", "2", "1"], "unknown option '--slots'"),
    ],
)
def test_bad_requests_fail_with_one_line(args, message, tmp_path: Path) -> None:
    out = run_device(args, hold_env(tmp_path, "2"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"zsharp-device: error: {message}"), lines
    assert out.stdout == ""


# --------------------------------------------------------------------------- memory check


@pytest.mark.parametrize(
    ("args", "free", "line"),
    [
        # fair share: 90 % of 81920 / 2 = 36864 MiB; device 0 is least loaded and first
        (
            ["--cells-per-gpu", "2", "1"],
            "1000/81920,60000/81920",
            "GPU 0 has 1000 MiB free of 81920 MiB; this cell needs 36864 MiB (slot 0 of 2), "
            "90 % of its share of 81920 MiB / 2: lower cells_per_gpu, or set gpu_mem_mb to "
            "what a cell needs",
        ),
        # an explicit need, whole GPU
        (
            ["--mem-mb", "2000", "1"],
            "1000/81920,60000/81920",
            "GPU 0 has 1000 MiB free of 81920 MiB; this cell needs 2000 MiB: lower "
            "cells_per_gpu, or set gpu_mem_mb to what a cell needs",
        ),
        # K cells of M cannot fit at all
        (
            ["--cells-per-gpu", "4", "--mem-mb", "30000", "1"],
            "81000/81920,81000/81920",
            "GPU 0: 4 cells × 30000 MiB do not fit in its 81920 MiB; lower cells_per_gpu or "
            "gpu_mem_mb",
        ),
    ],
)
def test_a_cell_that_does_not_fit_fails_with_one_clear_line(
    args, free, line, tmp_path: Path
) -> None:
    out = run_device(args, hold_env(tmp_path, "2", ZSHARP_GPU_FREE_MB=free))
    assert out.returncode == 75
    assert out.stdout == ""  # the cell never ran
    assert out.stderr.strip().splitlines()[-1] == f"zsharp-device: error: {line}"


def test_a_cell_that_fits_runs(tmp_path: Path) -> None:
    env = hold_env(tmp_path, "2", ZSHARP_GPU_FREE_MB="1000/81920,60000/81920")
    assert run_device(["--cells-per-gpu", "2", "--mem-mb", "900", "1"], env).returncode == 0
    assert run_device(["1"], env).returncode == 0  # whole GPU, no need given: not checked


def test_scheduler_assigned_device_is_still_checked(tmp_path: Path) -> None:
    """Under SLURM (CUDA_VISIBLE_DEVICES set) no lock is taken, but the memory is checked."""
    env = hold_env(tmp_path, "4", ZSHARP_GPU_FREE_MB="80000/81920,5000/81920")
    env["CUDA_VISIBLE_DEVICES"] = "1"
    out = run_device(["--cells-per-gpu", "4", "1"], env)
    assert out.returncode == 75
    assert out.stderr.strip() == (
        "zsharp-device: error: GPU 1 has 5000 MiB free of 81920 MiB; this cell needs 18432 MiB, "
        "90 % of its share of 81920 MiB / 4: lower cells_per_gpu, or set gpu_mem_mb to what a "
        "cell needs"
    )
    assert not (tmp_path / "locks").exists()
    env["CUDA_VISIBLE_DEVICES"] = "0"
    assert run_device(["--cells-per-gpu", "4", "1"], env).stdout.split() == ["0", "None", "None"]


FAKE_NVIDIA_SMI = textwrap.dedent("""\
    #!/bin/sh
    case "$*" in
      -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-aaaa)"; echo "GPU 1: NVIDIA H200 (UUID: GPU-bbbb)" ;;
      *--query-gpu=index,uuid,memory.free,memory.total*)
         echo "0, GPU-aaaa, 140000, 143771"; echo "1, GPU-bbbb, 3000, 143771" ;;
      *) exit 9 ;;
    esac
""")


def test_free_memory_is_read_from_nvidia_smi(tmp_path: Path) -> None:
    """The real query, answered by a stand-in nvidia-smi on PATH: device 1 (by UUID) is full."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = hold_env(tmp_path, "0")
    env.pop("ZSHARP_GPUS")
    env.pop("ZSHARP_GPU_FREE_MB")  # read from the stand-in nvidia-smi
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    fits = run_device(["--mem-mb", "100000", "1"], env)  # two GPUs listed: takes GPU 0
    assert fits.returncode == 0, fits.stderr
    assert fits.stdout.split()[0] == "0"
    env["CUDA_VISIBLE_DEVICES"] = "GPU-bbbb"
    full = run_device(["--mem-mb", "100000", "1"], env)
    assert full.returncode == 75
    assert "GPU GPU-bbbb has 3000 MiB free of 143771 MiB; this cell needs 100000 MiB" in (
        full.stderr
    )


# --------------------------------------------------------------------------- the workflow

SLOT_SNAKEFILE = textwrap.dedent("""
    rule all:
        input: expand("done/{i}", i=range(8))

    rule job:
        output: "done/{i}"
        resources: gpu_slot=1, cells_per_gpu=2, gpus_per_cell=1, gpu_mem_mb=0
        shell:
            "{DEVICE} --cells-per-gpu {resources.cells_per_gpu} --mem-mb {resources.gpu_mem_mb} "
            "{resources.gpus_per_cell} -- {PYTHON} {SCRIPT} {wildcards.i} 1.0 {LOG} ok; "
            "touch {output}"
""")


def test_snakemake_gpu_slot_pool_packs_k_cells_per_device(tmp_path: Path) -> None:
    """The proposed scheme: each job takes `gpu_slot=1` of a pool of GPUs × K
    (`--resources gpu_slot=4` on 2 fake GPUs, K = 2); never more than 2 cells per device."""
    script, log = tmp_path / "job.py", tmp_path / "jobs.jsonl"
    script.write_text(JOB)
    (tmp_path / "Snakefile").write_text(
        SLOT_SNAKEFILE.replace("{DEVICE}", DEVICE)
        .replace("{PYTHON}", sys.executable)
        .replace("{SCRIPT}", str(script))
        .replace("{LOG}", str(log))
    )
    env = hold_env(tmp_path, "2")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "--cores",
            "8",
            "--resources",
            "gpu_slot=4",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = records(log)
    assert len(jobs) == 8
    assert {j["devices"] for j in jobs} == {"0", "1"}
    for device in ("0", "1"):
        assert max_concurrent(jobs, device) <= 2
