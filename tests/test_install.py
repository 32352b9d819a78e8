"""A non-editable install (as the Docker image makes one) runs the workflow from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.workflow_helpers import REPO, tiny_config, write_config


@pytest.mark.slow
def test_installed_package_runs_its_own_workflow_and_training(tmp_path: Path) -> None:
    """`pip install .` into a fresh venv (its dependencies are this environment's: a .pth
    line lends them, without the editable checkout), then, from another folder, the
    installed Snakefile's dry run and a digits training run."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # a plain path line: the directory's own .pth files (the editable finder) stay inactive
    (Path(site) / "lent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    build = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", str(REPO)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ZSHARP_PLUGINS")}
    env |= {"WANDB_MODE": "disabled", "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [python, *args], capture_output=True, text=True, timeout=600, cwd=elsewhere, env=env
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    origin = run("-c", "import zsharp; print(zsharp.__file__)").stdout.strip()
    assert Path(origin).is_relative_to(site), origin  # the installed copy, not the checkout
    snakefile = Path(run("-m", "zsharp", "snakefile").stdout.strip())
    assert snakefile.is_relative_to(site) and snakefile.name == "Snakefile"
    config = write_config(elsewhere, tiny_config())
    dry = run("-m", "snakemake", "-s", str(snakefile), "-n", "--configfile", str(config))
    assert "digits/resnet20/zsharp/seed0" in dry.stdout
    default = run("-m", "snakemake", "-s", str(snakefile), "-n")  # the shipped quick start
    assert "quickstart" in default.stdout
    run(
        "-m", "zsharp", "train", "--dataset", "digits", "--model", "resnet20",
        "--optimizer", "zsharp", "--epochs", "1", "--out", "cell", "--threads", "1",
    )  # fmt: skip
    assert (elsewhere / "cell" / "summary.json").exists()
