"""The workflow on a real single-node SLURM cluster (localhost, two fake GPUs).

The cluster is started by .ci/slurm/start.sh (root and apt needed); without it these tests
skip and say why. Jobs go through sbatch via snakemake-executor-plugin-slurm and our
profile; results must equal a local run's, and a requeued (preempted) training job must
resume from its checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.slurm_cluster import ensure_cluster, job_ids_in, requeue_now
from tests.workflow_helpers import (
    REPO,
    environment,
    snakemake,
    snakemake_command,
    tiny_config,
    write_config,
)

pytestmark = pytest.mark.slow
EXP = Path("results/tiny")
DETERMINISTIC = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")
SLURM = [
    "--profile", str(REPO / "workflow/profiles/slurm"),
    "--slurm-init-seconds-before-status-checks", "2",
    "--default-resources", "slurm_partition=debug", "runtime=10", "mem_mb=1000",
    "--latency-wait", "5", "--slurm-keep-successful-logs",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    status = ensure_cluster()
    if not status:
        pytest.skip(f"no SLURM cluster: {status.reason}")


def slurm_config(**changes) -> dict:
    config = tiny_config(**{"optimizers": {"sgd": {}, "zsharp": {}}, **changes})
    config["resources"] = {
        "train": {"threads": 1, "gpu": 1, "mem_mb": 1000},
        "evaluate": {"threads": 1, "gpu": 0, "mem_mb": 1000},
    }
    return config


def cells(directory: Path) -> list[Path]:
    return sorted(p.parent for p in (directory / EXP / "cells").glob("*/*/*/*/summary.json"))


def assert_same_results(slurm_dir: Path, local_dir: Path) -> None:
    slurm_cells, local_cells = cells(slurm_dir), cells(local_dir)
    assert [c.relative_to(slurm_dir) for c in slurm_cells] == [
        c.relative_to(local_dir) for c in local_cells
    ]
    for a, b in zip(slurm_cells, local_cells, strict=True):
        ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
        mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
        assert [{k: r[k] for k in DETERMINISTIC} for r in ma] == [
            {k: r[k] for k in DETERMINISTIC} for r in mb
        ]
        wa = torch.load(a / "model.pt", weights_only=True)
        wb = torch.load(b / "model.pt", weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        ea, eb = (json.loads((c / "eval.json").read_text()) for c in (a, b))
        assert ea["test_acc"] == eb["test_acc"] and ea["sharpness"] == eb["sharpness"]


def test_grid_through_sbatch_equals_a_local_run(tmp_path: Path) -> None:
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir()
    local.mkdir()
    config = slurm_config()
    result = snakemake(on_slurm, *SLURM, config=write_config(on_slurm, config), timeout=900)
    output = result.stdout + result.stderr
    submitted = set(job_ids_in(output))
    assert len(submitted) >= 4, output  # 2 train + 2 evaluate jobs; download/aggregate local
    for cell in cells(on_slurm):
        summary = json.loads((cell / "summary.json").read_text())
        assert summary["slurm_job_id"] in submitted  # trained inside a SLURM allocation
        assert summary["cuda_visible_devices"] in {"0", "1"}  # its --gpus=1 request
    logs = list((on_slurm / ".snakemake/slurm_logs").rglob("*.log"))
    assert {p.stem for p in logs} <= submitted and logs
    snakemake(local, "--cores", "2", config=write_config(local, config))
    assert_same_results(on_slurm, local)


def _train_job_id(deadline: float) -> str:
    while time.monotonic() < deadline:
        listing = subprocess.run(
            ["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True
        ).stdout
        for line in listing.splitlines():
            job, comment, state = line.split("|")
            if comment.startswith("rule_train") and state == "RUNNING":
                return job
        time.sleep(0.2)
    raise TimeoutError("no running train job")


def test_requeued_training_job_resumes_and_ends_as_uninterrupted(tmp_path: Path) -> None:
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir()
    local.mkdir()
    config = slurm_config(optimizers={"zsharp": {}}, train={"epochs": 4, "batch_size": 64})
    path = write_config(on_slurm, config)
    command = snakemake_command(on_slurm, *SLURM, config=path)
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        job = _train_job_id(deadline)
        checkpoint = on_slurm / EXP / "cells/digits/resnet20/zsharp/seed0/checkpoint.pt"
        while not checkpoint.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        requeue_now(job)  # as a preemption would: SIGTERM, then the same job runs again
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            subprocess.run(["scancel", "--name", "*"], capture_output=True)
    assert process.returncode == 0, output
    cell = on_slurm / EXP / "cells/digits/resnet20/zsharp/seed0"
    log = (on_slurm / "logs/tiny/train/digits/resnet20/zsharp/seed0.log").read_text()
    assert "resuming" in log
    assert json.loads((cell / "summary.json").read_text())["slurm_job_id"] == job
    snakemake(local, "--cores", "2", config=write_config(local, config))
    assert_same_results(on_slurm, local)


def test_two_process_cell_through_sbatch(tmp_path: Path) -> None:
    """``processes: 2`` with ``gpu: 2``: one sbatch job holding both (fake) GPUs runs the cell
    through torchrun on 2 gloo processes (no CUDA here); equal to the same cell run locally."""
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir()
    local.mkdir()
    config = slurm_config(optimizers={"zsharp": {}}, train={"epochs": 2, "batch_size": 64})
    config["resources"]["train"] = {"threads": 2, "gpu": 2, "processes": 2, "mem_mb": 2000}
    result = snakemake(on_slurm, *SLURM, config=write_config(on_slurm, config), timeout=900)
    submitted = set(job_ids_in(result.stdout + result.stderr))
    (cell,) = cells(on_slurm)
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["ddp"] == "synced"
    assert summary["slurm_job_id"] in submitted
    assert sorted(summary["cuda_visible_devices"].split(",")) == ["0", "1"]
    snakemake(local, "--cores", "2", config=write_config(local, config))
    assert_same_results(on_slurm, local)
