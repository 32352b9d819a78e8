"""A cell on 2 CPU processes (gloo) through ``zsharp train --processes 2`` and torchrun.

The real launcher, real processes and real signals: a synced 2-process cell of a LayerNorm
model (a small ViT, no BatchNorm) ends with the weights of the 1-process cell with the same
global batch; m-sharpness runs and says so; a rank killed mid-epoch, a signal to one rank,
a non-finite loss and a rank that hangs keep the guarantees of a 1-process cell.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.workflow_helpers import environment, snakemake, tiny_config, write_config

VIT = ["depth=1", "hidden=32", "heads=2", "mlp_hidden=32"]


def command(out: Path, data_root: Path, *extra: str, processes: int = 2) -> list[str]:
    args = [sys.executable, "-m", "zsharp", "train", "--dataset", "digits"]
    args += ["--model", "vit", *(a for arg in VIT for a in ("--model-arg", arg))]
    args += ["--optimizer", "zsharp", "--base", "adam", "--lr", "0.003", "--epochs", "3"]
    args += ["--batch-size", "32", "--seed", "1", "--out", str(out)]
    args += ["--data-root", str(data_root), "--progress", "lines", "--wandb-mode", "disabled"]
    args += ["--threads", str(processes), "--processes", str(processes)]
    return [*args, *extra]


def run(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=600, env=environment(TMPDIR=str(tmp), **env)
    )


def start(args: list[str], tmp: Path, **env: str) -> subprocess.Popen[str]:
    """:func:`run`, started in the background (a test signals it or its ranks)."""
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment(TMPDIR=str(tmp), **env),
    )  # fmt: skip


def weights(cell: Path) -> dict[str, torch.Tensor]:
    return torch.load(cell / "model.pt", weights_only=True)


def metrics(cell: Path) -> list[dict[str, float]]:
    timing = {"epoch_seconds", "images_per_second"}
    lines = (cell / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process cell."""
    tmp = tmp_path_factory.mktemp("ddp")
    result = run(command(tmp / "cell", data_root), tmp)
    assert result.returncode == 0, result.stderr
    return tmp / "cell"


@pytest.mark.slow  # torchrun and 2 processes: 30–60 s on 2 cores
def test_synced_two_processes_equal_one_process(
    reference: Path, data_root: Path, tmp_path: Path
) -> None:
    one = run(command(tmp_path / "one", data_root, processes=1), tmp_path)
    assert one.returncode == 0, one.stderr
    two, single = weights(reference), weights(tmp_path / "one")
    assert two.keys() == single.keys()
    for key in two:
        torch.testing.assert_close(two[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    summary = json.loads((reference / "summary.json").read_text())
    assert (summary["processes"], summary["ddp"], summary["m"]) == (2, "synced", None)
    assert summary["config"]["ddp"] == "synced" and summary["config"]["sync_bn"] is False
    many, alone = metrics(reference), metrics(tmp_path / "one")
    for a, b in zip(many, alone, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=2e-3)  # ≤ 1 of 360 images
    # the comparison means something: the cell learned over its three epochs
    assert alone[-1]["train_loss"] < alone[0]["train_loss"] - 0.05


@pytest.mark.slow  # torchrun and 2 processes: 30–60 s on 2 cores
def test_m_sharpness_runs_and_is_recorded(data_root: Path, tmp_path: Path) -> None:
    result = run(command(tmp_path / "cell", data_root, "--ddp", "m-sharpness"), tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "cell" / "summary.json").read_text())
    assert (summary["processes"], summary["ddp"], summary["m"]) == (2, "m-sharpness", 16)
    assert summary["config"]["ddp"] == "m-sharpness"
    assert len(metrics(tmp_path / "cell")) == 3


def _rank_pid(tmp: Path, rank: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        found = list(tmp.glob(f"zsharp-ranks-*/rank{rank}.pid"))
        if found and found[0].read_text():
            return int(found[0].read_text())
        time.sleep(0.02)
    raise AssertionError(f"rank {rank} never started")


def _wait_for(path: Path, deadline: float) -> None:
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.slow  # torchrun and 2 processes: 30–60 s on 2 cores
def test_killed_rank_then_rerun_is_bit_identical(
    reference: Path, data_root: Path, tmp_path: Path
) -> None:
    cell = tmp_path / "cell"
    args = command(cell, data_root)
    launcher = start(args, tmp_path)
    deadline = time.monotonic() + 300
    pid = _rank_pid(tmp_path, 1, deadline)
    _wait_for(cell / "checkpoint.pt", deadline)  # epoch 1 done: now inside epoch 2
    os.kill(pid, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode not in (0, 3), stderr
    assert not (cell / "summary.json").exists()
    again = run(args, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    for key, value in weights(reference).items():
        assert torch.equal(value, weights(cell)[key]), key
    assert metrics(cell) == metrics(reference)


@pytest.mark.slow  # torchrun and 2 processes: 30–60 s on 2 cores
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_one_rank_checkpoints_every_rank(
    signum: signal.Signals, reference: Path, data_root: Path, tmp_path: Path
) -> None:
    """The signal reaches rank 1 alone; the ranks agree, rank 0 writes, the launcher exits 3."""
    cell = tmp_path / "cell"
    args = command(cell, data_root)
    launcher = start(args, tmp_path)
    deadline = time.monotonic() + 300
    pid = _rank_pid(tmp_path, 1, deadline)
    _wait_for(cell / "checkpoint.pt", deadline)
    os.kill(pid, signum)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 3, stderr
    assert "checkpoint written" in stderr
    again = run(args, tmp_path)
    assert again.returncode == 0, again.stderr
    for key, value in weights(reference).items():
        assert torch.equal(value, weights(cell)[key]), key
    assert metrics(cell) == metrics(reference)


@pytest.mark.slow  # torchrun and 2 processes: 30–60 s on 2 cores
def test_sigterm_to_the_launcher_exits_3(data_root: Path, tmp_path: Path) -> None:
    cell = tmp_path / "cell"
    launcher = start(command(cell, data_root), tmp_path)
    _wait_for(cell / "checkpoint.pt", time.monotonic() + 300)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 3, stderr
    assert (cell / "checkpoint.pt").exists() and not (cell / "summary.json").exists()


@pytest.mark.slow  # torchrun and 2 processes: 30–60 s on 2 cores
def test_non_finite_loss_stops_every_rank(data_root: Path, tmp_path: Path) -> None:
    cell = tmp_path / "cell"
    result = run(command(cell, data_root, "--base", "sgd", "--lr", "1e30"), tmp_path)
    assert result.returncode == 4, result.stderr
    assert "non-finite training loss at epoch 1" in result.stderr
    assert not (cell / "summary.json").exists()


@pytest.mark.slow  # torchrun and 2 processes: 30–60 s on 2 cores
def test_a_hanging_rank_does_not_hang_the_cell(data_root: Path, tmp_path: Path) -> None:
    """Rank 1 stopped (SIGSTOP): rank 0's collective times out, torchrun ends the cell."""
    cell = tmp_path / "cell"
    timeouts = {"ZSHARP_DDP_TIMEOUT": "5", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"}
    launcher = start(command(cell, data_root), tmp_path, **timeouts)
    deadline = time.monotonic() + 300
    pid = _rank_pid(tmp_path, 1, deadline)
    _wait_for(cell / "checkpoint.pt", deadline)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:  # the test failed: don't leave the processes behind
            os.kill(pid, signal.SIGKILL)
            launcher.kill()
    assert launcher.returncode not in (0, 3), stderr
    assert time.monotonic() - stopped < 120
    assert not (cell / "summary.json").exists()


def test_bad_world_refused_before_work(data_root: Path, tmp_path: Path) -> None:
    result = run(command(tmp_path / "a", data_root, "--sync-bn", "true"), tmp_path)
    assert result.returncode == 2, result.stderr
    assert "sync_bn: SyncBatchNorm runs on CUDA devices only" in result.stderr
    result = run(command(tmp_path / "b", data_root, processes=0), tmp_path)
    assert result.returncode == 2 and "--processes" in result.stderr
    result = run(command(tmp_path / "d", data_root, "--graphs"), tmp_path)
    assert result.returncode == 2 and "graphs: not with --processes > 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # a batch with fewer images than processes
    result = run(command(tmp_path / "c", data_root, "--batch-size", "1"), tmp_path)
    assert result.returncode == 2 and "batch_size: 1" in result.stderr, result.stderr


@pytest.mark.slow  # torchrun and 2 processes: 30–60 s on 2 cores
def test_workflow_runs_a_cell_on_two_processes(tmp_path: Path) -> None:
    """``resources.train.processes: 2`` through the real snakemake: the train job runs the
    cell on 2 processes (the summary says so), and the grid goes on to its table."""
    config = tiny_config(optimizers={"zsharp": {}})
    config["resources"]["train"] = {"threads": 2, "gpu": 0, "processes": 2}
    snakemake(tmp_path, "--cores", "2", config=write_config(tmp_path, config))
    cell = tmp_path / "results/tiny/cells/digits/resnet20/zsharp/seed0"
    summary = json.loads((cell / "summary.json").read_text())
    assert (summary["processes"], summary["ddp"], summary["status"]) == (2, "synced", "ok")
    assert (tmp_path / "results/tiny/results.md").exists()
