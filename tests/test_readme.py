"""The README's promises that code can check: its library example runs, CI runs its test
command, and its quick start names commands that exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workflow_helpers import REPO

README = (REPO / "README.md").read_text()


def test_library_example_runs(tmp_path: Path) -> None:
    section = README.split("## The library", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(example.strip().splitlines()) <= 14
    script = tmp_path / "example.py"
    script.write_text(example + "\nassert not opt.perturbed\nprint('ok')\n")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_ci_runs_the_readme_test_command_and_then_the_slow_tests() -> None:
    """The README's `pytest -n 2` leaves the slow tests out (pyproject's addopts); CI runs it
    and then `pytest -m slow` (a test file to a process: their clusters and grids are
    per file), each to the end, and fails if either failed."""
    quick_start = README.split("## Quick start", 1)[1].split("##", 1)[0]
    test_line = next(line for line in quick_start.splitlines() if "'.[test]'" in line)
    command = test_line.split("&&")[-1].strip()
    ci = [
        line.strip()
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert command == "pytest -n 2"
    assert ci[-4:] == [
        "status=0",
        f"{command} || status=$?",
        "pytest -m slow -n 2 --dist loadfile || status=$?",
        'exit "$status"',
    ]
    addopts = re.search(r"^addopts = \"(.*)\"$", (REPO / "pyproject.toml").read_text(), re.M)
    assert shlex.split(addopts.group(1))[-2:] == ["-m", "not slow"]  # a later -m replaces it


def test_generated_tables_are_current() -> None:
    """The README's registry tables and config/README.md are what `python -m zsharp.pipeline.docs`
    writes from the registries and the schema (run it after changing a registry)."""
    from zsharp.pipeline.docs import config_reference, render_readme

    assert render_readme(README) == README, "run: python -m zsharp.pipeline.docs"
    assert "<!-- generated: optimizers -->" in README and "<!-- generated: models -->" in README
    assert (REPO / "config" / "README.md").read_text() == config_reference()


def _example(marker: str) -> str:
    """The README's Python example that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    return next(block for block in blocks if marker in block)


@pytest.mark.parametrize(
    "marker",
    [
        "SharpnessAwareStep(model",
        pytest.param("L.Trainer(", marks=pytest.mark.slow),
        pytest.param("SharpnessAwareTrainer(", marks=pytest.mark.slow),
    ],
)
def test_integration_examples_run(marker: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_example(marker) + "\nprint('ok')\n")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
