"""The Snakemake workflow through the real `snakemake`: outputs, caching, failures, report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.workflow_helpers import (
    REPO,
    environment,
    mtimes,
    snakemake,
    snakemake_command,
    tiny_config,
    write_config,
)

EXP = Path("results/tiny")


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory) -> Path:
    """A tiny grid run to completion once for the module; tests read it as it is."""
    directory = tmp_path_factory.mktemp("grid")
    config = write_config(directory, tiny_config(wandb={"mode": "offline"}))
    snakemake(directory, "--cores", "2", config=config)
    return directory


@pytest.fixture
def own_grid(grid_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished grid (results, Snakemake's metadata, modification times) for
    a test that changes it: each such test starts from the finished grid, whatever ran
    before it."""
    copy = tmp_path / "grid"
    shutil.copytree(grid_run, copy, symlinks=True)
    return copy


def test_outputs_exist_and_say_what_ran(grid_run: Path) -> None:
    exp = grid_run / EXP
    table = pd.read_csv(exp / "results.csv")
    assert list(table["optimizer"]) == ["sgd", "sam", "zsharp"]
    assert (table["seeds"] == 1).all() and (table["failed"] == 0).all()
    assert table["final_test_acc_mean"].between(0, 1).all()
    assert table["sharpness_mean"].notna().all() and table["ece_mean"].notna().all()
    markdown = (exp / "results.md").read_text()
    assert "zsharp − sam" in markdown
    for png in ["final_accuracy", "accuracy_vs_sharpness", "curves_digits_resnet20"]:
        with Image.open(exp / "plots" / f"{png}.png") as image:
            assert image.size[0] > 300
    cell = exp / "cells/digits/resnet20/zsharp/seed0"
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["config"]["opt_args"] == {  # the registry's defaults filled in
        "rho": 0.05, "percentile": 95.0, "adaptive": False, "eta": 0.0, "variant": "paper"
    }  # fmt: skip
    assert summary["label"] == "zsharp" and summary["key"] == "digits/resnet20/zsharp/seed0"
    assert (cell / "model.pt").exists() and (cell / "eval.json").exists()
    assert not (cell / "checkpoint.pt").exists()
    # every rule has its log and benchmark; W&B runs are offline files beside the cells
    assert (grid_run / "logs/tiny/train/digits/resnet20/zsharp/seed0.log").exists()
    assert (exp / "benchmarks/train/digits/resnet20/zsharp/seed0.tsv").exists()
    assert list(cell.glob("wandb/offline-run-*/run-*.wandb"))
    assert list(exp.glob("wandb/offline-run-*/run-*.wandb"))  # the aggregate's table


def test_finished_grid_has_nothing_to_do(grid_run: Path) -> None:
    config = grid_run / "config.yaml"
    before = mtimes(grid_run, "results/**/*.*")
    result = snakemake(grid_run, "--cores", "2", config=config)
    assert "Nothing to be done" in result.stdout + result.stderr
    assert mtimes(grid_run, "results/**/*.*") == before


def test_changing_runtime_or_wandb_settings_reruns_nothing(grid_run: Path) -> None:
    config = tiny_config(
        wandb={"mode": "disabled", "project": "elsewhere"},
        runtime={"device": "cpu", "compile": False},
    )
    path = write_config(grid_run, config, name="runtime.yaml")
    result = snakemake(grid_run, "-n", config=path)
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow  # a workflow run of its own (> 10 s)
def test_changing_one_optimizers_hyperparameter_reruns_only_its_cells(own_grid: Path) -> None:
    config = tiny_config(wandb={"mode": "offline"})
    config["optimizers"]["zsharp"]["opt_args"]["rho"] = 0.1
    path = write_config(own_grid, config)
    before = mtimes(own_grid / EXP)
    snakemake(own_grid, "--cores", "2", config=path)
    after = mtimes(own_grid / EXP)
    changed = {cell for cell in before if before[cell] != after[cell]}
    assert changed == {"cells/digits/resnet20/zsharp/seed0/summary.json"}
    summary = json.loads(
        (own_grid / EXP / "cells/digits/resnet20/zsharp/seed0/summary.json").read_text()
    )
    assert summary["config"]["opt_args"]["rho"] == 0.1


@pytest.mark.slow  # a workflow run of its own (> 10 s)
def test_adding_a_seed_runs_only_the_new_cells(own_grid: Path) -> None:
    path = write_config(own_grid, tiny_config(wandb={"mode": "offline"}, seeds=[0, 1]))
    before = mtimes(own_grid / EXP)
    snakemake(own_grid, "--cores", "2", config=path)
    after = mtimes(own_grid / EXP)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {
        f"cells/digits/resnet20/{label}/seed1/summary.json" for label in ("sgd", "sam", "zsharp")
    }
    table = pd.read_csv(own_grid / EXP / "results.csv")
    assert (table["seeds"] == 2).all()


def test_report_holds_the_table_and_plots(grid_run: Path) -> None:
    config = grid_run / "config.yaml"
    snakemake(grid_run, "--report", "report.html", config=config, timeout=300)
    html = (grid_run / "report.html").read_text(errors="replace")
    assert len(html) > 50_000
    for name in [
        "results.csv",
        "comparison.csv",
        "final_accuracy.png",
        "accuracy_vs_sharpness.png",
        "curves_digits_resnet20.png",
    ]:
        assert name in html, name


@pytest.mark.slow
def test_keep_going_shows_a_failed_cell_and_retry_failed_retries_it(tmp_path: Path) -> None:
    """An entry whose loss diverges: its cell is FAILED in the table, the rest is fine."""
    config = tiny_config()
    config["optimizers"] = {
        "sgd": {},
        "diverges": {"optimizer": "sgd", "lr": 1.0e6, "schedule": "constant", "momentum": 0.0},
    }
    path = write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "2", "--keep-going", config=path)
    table = pd.read_csv(tmp_path / EXP / "results.csv").set_index("optimizer")
    assert table.loc["diverges", "failed"] == 1 and table.loc["sgd", "failed"] == 0
    assert "FAILED" in (tmp_path / EXP / "results.md").read_text()
    assert "non-finite training loss" in (tmp_path / EXP / "results.md").read_text()
    assert "1 cell(s) failed" in result.stdout + result.stderr
    failures = tmp_path / EXP / "cells/digits/resnet20/diverges/seed0/failures.jsonl"
    assert len(failures.read_text().splitlines()) == 1
    # a divergence is the cell's result: a rerun keeps it ...
    rerun = snakemake(tmp_path, "--cores", "2", config=path)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
    # ... unless asked to retry failed cells
    path = write_config(tmp_path, {**config, "retry_failed": True})
    snakemake(tmp_path, "--cores", "2", "--keep-going", config=path)  # retried, fails again
    assert len(failures.read_text().splitlines()) == 2


@pytest.mark.slow
def test_killed_workflow_continues_and_training_resumes(tmp_path: Path) -> None:
    config = tiny_config(optimizers={"zsharp": {}}, train={"epochs": 4, "batch_size": 64})
    path = write_config(tmp_path, config)
    command = snakemake_command(tmp_path, "--cores", "2", config=path)
    process = subprocess.Popen(
        command,
        env=environment(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / EXP / "cells/digits/resnet20/zsharp/seed0/checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the workflow and its jobs, like a lost node
    process.wait()
    snakemake(tmp_path, "--unlock", config=path)  # the killed workflow's lock stays behind
    result = snakemake(tmp_path, "--cores", "2", config=path, check=False)
    assert result.returncode != 0 and "incomplete" in (result.stdout + result.stderr).lower()
    snakemake(tmp_path, "--cores", "2", "--rerun-incomplete", config=path)
    log = (tmp_path / "logs/tiny/train/digits/resnet20/zsharp/seed0.log").read_text()
    assert "resuming" in log
    metrics = (tmp_path / EXP / "cells/digits/resnet20/zsharp/seed0/metrics.jsonl").read_text()
    assert [json.loads(line)["epoch"] for line in metrics.splitlines()] == [1, 2, 3, 4]


def test_lint_is_clean(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "--lint", check=False, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Congratulations, your workflow is in a good condition!" in output


def test_paper_config_builds_the_whole_dag(tmp_path: Path) -> None:
    result = snakemake(
        tmp_path, "-n", "--quiet", "rules", config=REPO / "config/paper.yaml", timeout=300
    )
    stats = dict(
        line.split()[:2]
        for line in result.stdout.splitlines()
        if line.split()[:1]
        and line.split()[0] in ("download", "train", "evaluate", "aggregate", "total")
    )
    # 4 datasets × 5 models × 6 optimizer entries × 3 seeds
    assert stats["train"] == stats["evaluate"] == "360"
    assert stats["download"] == "4" and stats["aggregate"] == "1"


def test_sgd_config_builds_the_whole_dag(tmp_path: Path) -> None:
    result = snakemake(
        tmp_path, "-n", "--quiet", "rules", config=REPO / "config/sgd.yaml", timeout=300
    )
    assert any(line.split()[:2] == ["train", "60"] for line in result.stdout.splitlines())
