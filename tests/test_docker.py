"""The CUDA Docker image: its Dockerfile is hadolint-clean; it builds and runs the quick start.

Building needs a Docker engine and a base image with PyTorch. The default base (a CUDA
PyTorch image) comes from a registry; where none can be reached, a locally made base is
used through BASE_IMAGE (``ZSHARP_DOCKER_BASE`` names it; ``.ci/docker/make-torch-base.sh``
makes one from Debian and the PyTorch wheels on this machine's disk).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.workflow_helpers import REPO, snakemake, write_config
from zsharp.pipeline.cell.folder import SUMMARY, read_summary

DOCKER = shutil.which("docker")


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_workflow_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in text and "FROM ${BASE_IMAGE}" in text
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert 'CMD ["snakemake"' in text


def _engine_problem() -> str | None:
    if DOCKER is None:
        return "no docker client installed"
    info = subprocess.run([DOCKER, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return "no Docker engine running (start one: sudo .ci/docker/start-engine.sh)"
    return None


def _base_image() -> str | None:
    """A base with PyTorch that is here already: ZSHARP_DOCKER_BASE, else the default's."""
    candidates = [os.environ.get("ZSHARP_DOCKER_BASE"), "zsharp-local/torch:latest"]
    for image in filter(None, candidates):
        found = subprocess.run([DOCKER, "image", "inspect", image], capture_output=True, timeout=60)
        if found.returncode == 0:
            return image
    return None


def _finals(experiment: Path) -> dict[str, dict]:
    """Each finished cell's summary (its ``final`` epoch among it), by its folder."""
    return {
        str(p.parent.relative_to(experiment)): read_summary(p.parent)
        for p in (experiment / "cells").glob(f"*/*/*/*/{SUMMARY}")
    }


@pytest.mark.slow
def test_image_builds_and_runs_the_quick_start(tmp_path: Path) -> None:
    """The image built on a PyTorch base, its default command (the quick start) run as uid
    1000 with the work folder mounted: every cell of the grid in the table, each cell's
    final epoch equal to the same cell trained on this host with the same PyTorch (CPU
    training is deterministic; seed 0's cells, to keep the test within its budget)."""
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    base = _base_image()
    if base is None:
        pytest.skip(
            "no base image with PyTorch: no registry can be reached from here and "
            "none was made locally (.ci/docker/make-torch-base.sh)"
        )
    tag = "zsharp-test:latest"
    build = subprocess.run(
        # the host's network: pip fetches the build backend (setuptools) from the registry
        # the host reaches, also on an engine without a bridge (start-engine.sh's fallback)
        [DOCKER, "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "-t", tag,
         str(REPO)],
        capture_output=True,
        text=True,
        timeout=1800,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # the build context is the package and its workflow (.dockerignore): no venv, data,
    # results or .git in the image, and the installed package carries its own workflow
    inspect = subprocess.run(
        [DOCKER, "run", "--rm", tag, "sh", "-c", "ls -A /opt/zsharp && zsharp snakefile"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    *copied, installed_snakefile = inspect.stdout.split()
    assert {"pyproject.toml", "setup.py", "Snakefile", "zsharp", "workflow", "config"} <= set(
        copied
    )
    assert not {".venv", ".git", "data", "results", "tests", "logs"} & set(copied), copied
    assert installed_snakefile.endswith("zsharp/_workflow/Snakefile"), installed_snakefile
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # the image's user (uid 1000) writes here
    run = subprocess.run(
        [DOCKER, "run", "--rm", "--user", "1000:1000", "-v", f"{work}:/work",
         "-e", "WANDB_MODE=offline", tag],
        capture_output=True,
        text=True,
        timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    experiment = work / "results/quickstart"
    grid = yaml.safe_load((REPO / "config/config.yaml").read_text())
    inside = _finals(experiment)
    assert len(inside) == len(grid["optimizers"]) * len(grid["seeds"])
    assert all(s["status"] == "ok" for s in inside.values())
    assert {p.lstat().st_uid for p in experiment.rglob("*")} == {1000}
    table = pd.read_csv(experiment / "results.csv")
    assert set(table["optimizer"]) == set(grid["optimizers"])
    assert (table["seeds"] == len(grid["seeds"])).all()
    assert (table["failed"] + table["missing"] == 0).all()
    assert (experiment / "plots/final_accuracy.png").stat().st_size > 10_000
    torch_inside = {s["versions"]["torch"] for s in inside.values()}
    assert torch_inside == {torch.__version__}, (
        f"the base image's torch {torch_inside} is not this host's {torch.__version__}: "
        "make the base with TORCH= set to it (.ci/docker/make-torch-base.sh)"
    )

    host = tmp_path / "host"
    host.mkdir()
    snakemake(host, "--cores", "all", config=write_config(host, {**grid, "seeds": [0]}))
    on_host = _finals(host / "results/quickstart")
    assert on_host and set(on_host) <= set(inside)
    for cell, summary in on_host.items():  # every number of the last epoch but its speed
        assert _numbers(summary) == _numbers(inside[cell]), cell


def _numbers(summary: dict) -> dict:
    return {k: v for k, v in summary["final"].items() if k != "images_per_second"}
