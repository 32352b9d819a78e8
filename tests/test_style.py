"""The code base stays `ruff` clean (lint and format) and the workflow `snakefmt` clean, as
CI and the README promise."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workflow_helpers import REPO

RUFF = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
SNAKEFMT = shutil.which("snakefmt") or str(Path(sys.executable).parent / "snakefmt")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command: list[str]) -> None:
    result = subprocess.run(
        [RUFF, *command, str(REPO)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt() -> None:
    """The Snakefile and every rule file as snakefmt writes them (pyproject's line length)."""
    result = subprocess.run(
        [SNAKEFMT, "--check", "Snakefile", "workflow"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
