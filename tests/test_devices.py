"""GPU assignment on a multi-GPU box, simulated: one device per job, freed when a job dies."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
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
