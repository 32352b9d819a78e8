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

import pytest

from tests.workflow_helpers import REPO

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


@pytest.mark.slow
def test_image_builds_and_runs_the_quick_start(tmp_path: Path) -> None:
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
        [DOCKER, "build", "--build-arg", f"BASE_IMAGE={base}", "-t", tag, str(REPO)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir(mode=0o777)
    work.chmod(0o777)  # the image's user (uid 1000) writes here
    run = subprocess.run(
        [DOCKER, "run", "--rm", "-v", f"{work}:/work", "-e", "WANDB_MODE=offline", tag],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (work / "results/quickstart/results.md").exists()
    assert (work / "results/quickstart/plots/final_accuracy.png").exists()
