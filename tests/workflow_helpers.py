"""Running the real Snakemake workflow of this repository in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"


def tiny_config(**changes: Any) -> dict[str, Any]:
    """A grid that trains in seconds: digits, ResNet-20, one epoch, a cheap evaluation."""
    config: dict[str, Any] = {
        "experiment": "tiny",
        "seeds": [0],
        "datasets": {"digits": {}},
        "models": {"resnet20": {}},
        "optimizers": {
            "sgd": {},
            "sam": {"opt_args": {"rho": 0.05}},
            "zsharp": {"opt_args": {"rho": 0.05, "percentile": 95.0}},
        },
        "train": {"epochs": 1, "batch_size": 256, "lr": 0.05},
        "evaluate": {"hessian_samples": 64, "hessian_iterations": 2},
        "resources": {"train": {"threads": 1, "gpu": 0}, "evaluate": {"threads": 1, "gpu": 0}},
        "wandb": {"mode": "disabled"},
    }
    config.update(changes)
    return config


def environment(**extra: str) -> dict[str, str]:
    """The test's environment with this interpreter's scripts (zsharp, snakemake) first."""
    scripts = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": scripts + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def write_config(directory: Path, config: dict[str, Any], name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_command(directory: Path, *args: str, config: Path | None = None) -> list[str]:
    """``snakemake -s <repo>/Snakefile -d <directory> [--configfile CONFIG] ARGS``."""
    command = [
        str(Path(sys.executable).parent / "snakemake"),
        "-s",
        str(SNAKEFILE),
        "-d",
        str(directory),
    ]
    if config is not None:
        command += ["--configfile", str(config)]
    return [*command, *args]


def snakemake(
    directory: Path,
    *args: str,
    config: Path | None = None,
    timeout: float = 900,
    check: bool = True,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run :func:`snakemake_command` as a subprocess; fail with its output unless ``check``
    is off."""
    result = subprocess.run(
        snakemake_command(directory, *args, config=config),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(**(extra_env or {})),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def mtimes(root: Path, pattern: str = "**/summary.json") -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob(pattern)}
