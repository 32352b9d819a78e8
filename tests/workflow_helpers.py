"""Running the real Snakemake workflow of this repository in a scratch directory."""

from __future__ import annotations

import json
import os
import select
import signal
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


# --- the command line without paying for its imports on every run ---------------------------

# A long-lived process that has imported what every `zsharp` command imports (torch, and
# torch._dynamo, which torch loads on the first optimizer step) and then forks one child
# per command. Each child is a fresh process for the command: its own environment, working
# folder, umask, stdin/stdout/stderr and exit status; it runs zsharp as ``__main__``
# exactly as ``python -m zsharp`` does (uncaught exceptions print a traceback and exit
# 1; atexit handlers run). Only the imports are done once, in the server, under the test
# process's environment: a command given another HOME or MPL* variables would see matplotlib
# configured for the test's (wandb, which reads its settings when it starts, is not imported).
_CLI_SERVER = r"""
import json, os, runpy, sys

sys.path[0] = os.getcwd()  # the repository (the server starts there), not each child's cwd

import torch, torch._dynamo  # noqa: F401  (torch loads _dynamo on the first optimizer step)
# not the command line itself: runpy runs it fresh as __main__
import zsharp.pipeline.aggregate, zsharp.pipeline.cell.evaluate  # noqa: F401
import zsharp.pipeline.cell.train  # noqa: F401

requests, replies = sys.stdin, os.fdopen(os.dup(1), "w")
for line in requests:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)  # its own process group: a timeout kills the command and its children
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if request["umask"] is not None:
            os.umask(request["umask"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(out, fd)
            os.close(out)
        os.close(null)
        replies.close()
        sys.argv = [sys.argv[0], *request["argv"]]
        if os.environ.get("ZSHARP_CRASH_UNDER"):  # the crash-point matrix (tests/crash_points.py)
            import tests.crash_points

            tests.crash_points.install()
        runpy.run_module("zsharp", run_name="__main__", alter_sys=True)
        sys.exit(0)
    replies.write(json.dumps({"pid": pid}) + "\n")
    replies.flush()
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
    replies.flush()
"""


class CommandServer:
    """``python -m zsharp ARGS`` as a fresh process per command, forked from a server
    that did the imports once (about 5 s of CPU per command saved). ``run`` answers like
    :func:`subprocess.run` with ``capture_output=True, text=True``."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CLI_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=REPO,  # `import tests.crash_points` in a child
        )

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the command server exited ({self.process.wait()})")
        return json.loads(line)

    def run(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        umask: int | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        assert self.process.stdin is not None
        self.count += 1
        stdout, stderr = (self.scratch / f"{self.count}.{name}" for name in ("out", "err"))
        request = {
            "argv": [str(a) for a in args],
            "env": dict(os.environ if env is None else env),
            "cwd": str(cwd or Path.cwd()),
            "umask": umask,
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self._reply(60)["pid"]
        try:
            returncode = self._reply(timeout)["returncode"]
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            self._reply(60)
            raise subprocess.TimeoutExpired(args, timeout) from None
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "zsharp", *args],
            returncode,
            stdout.read_text(),
            stderr.read_text(),
        )

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
