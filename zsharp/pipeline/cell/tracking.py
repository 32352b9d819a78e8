"""Weights & Biases: one run per cell and job, offline unless the user asks for online.

Mode, project and entity come from the command line, else ``$WANDB_MODE``,
``$WANDB_PROJECT``, ``$WANDB_ENTITY``; the mode defaults to ``offline`` (no account, no
network: the run lands in ``<dir>/wandb/offline-run-*`` and ``wandb sync`` uploads it
later). Runs are grouped by dataset and model, named by optimizer and seed, and carry the
cell's resolved configuration; a resumed training run continues the same W&B run.

W&B never stops or stalls training. Every wait W&B can impose is bounded by
``$ZSHARP_WANDB_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT`): starting its service
process, creating the run on the server, and uploading at the end. An online run that
cannot start (no network, a bad key, a server that does not answer) costs that wait, one
warning line, and the run continues offline, its files syncable later with ``wandb sync``;
if even an offline run cannot start, or W&B fails later, training continues without it.
wandb itself waits 90 s and then raises (measured: ~94 s with no network).

The API key is never read, logged or written by this module: wandb reads it itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from zsharp.pipeline.cell.config import WANDB_MODES, ConfigError

# Configuration keys that could hold credentials are never sent.
_SECRET_MARKERS = ("key", "token", "secret", "password")
TIMEOUT_VARIABLE = "ZSHARP_WANDB_TIMEOUT"
# seconds: wandb.init on a dead network then returns after ~21 s in all, under 30
DEFAULT_TIMEOUT = 20.0


def resolve_mode(mode: str | None) -> str:
    """The W&B mode: ``mode``, else $WANDB_MODE, else offline (validated)."""
    resolved = mode or os.environ.get("WANDB_MODE") or "offline"
    if resolved == "dryrun":  # wandb's old name for offline
        resolved = "offline"
    if resolved not in WANDB_MODES:
        raise ConfigError(f"wandb_mode: must be one of {list(WANDB_MODES)}, got {resolved!r}")
    return resolved


def resolve_timeout() -> float:
    """The longest W&B may make a job wait, in seconds: $ZSHARP_WANDB_TIMEOUT, else
    :data:`DEFAULT_TIMEOUT`."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{TIMEOUT_VARIABLE}: expected a number of seconds > 0, got {text!r}")
    return value


def scrub(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without entries whose name suggests a credential."""
    clean: dict[str, Any] = {}
    for key, value in config.items():
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            continue
        clean[key] = scrub(value) if isinstance(value, dict) else value
    return clean


def _reason(error: BaseException) -> str:
    """The first line of an error, for a one-line warning."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")[:300]


def _warn(message: str) -> None:
    print(f"zsharp: warning: {message}", file=sys.stderr, flush=True)


class Tracker:
    """A thin wrapper around one wandb run; every method is a no-op when disabled, and no
    method raises: a W&B failure becomes one warning line (see the module docstring)."""

    def __init__(
        self,
        *,
        mode: str | None,
        project: str | None,
        entity: str | None,
        directory: Path,
        group: str,
        name: str,
        job_type: str,
        config: dict[str, Any],
        run_id: str | None = None,
    ) -> None:
        self.mode = resolve_mode(mode)
        self.timeout = resolve_timeout()
        self.run: Any = None
        self.directory = directory
        if self.mode == "disabled":
            return
        # wandb's own banner lines, and its error reports sent to the (perhaps unreachable)
        # server at exit, which add ~20 s to a failed start; a user's setting wins
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        arguments = {
            "project": project or os.environ.get("WANDB_PROJECT") or "zsharp",
            "entity": entity or os.environ.get("WANDB_ENTITY") or None,
            "dir": str(directory),
            "group": group,
            "name": name,
            "job_type": job_type,
            "config": scrub(config),
            "id": run_id,
            "resume": "allow" if run_id else None,
            "reinit": "finish_previous",
        }
        started = time.monotonic()
        try:
            self.run = self._start(self.mode, arguments, self.timeout)
            return
        except Exception as error:  # wandb raises many types, and its import may fail
            failure = error
        if self.mode == "online":
            where = directory / "wandb"
            _warn(
                f"W&B: the online run did not start within {self.timeout:g} s "
                f"(${TIMEOUT_VARIABLE}): {_reason(failure)}; continuing offline in {where} "
                f"(upload it later: wandb sync {where}/offline-run-*)"
            )
            remaining = max(self.timeout - (time.monotonic() - started), 5.0)
            try:
                self.run = self._start("offline", arguments, remaining)
                self.mode = "offline"
                return
            except Exception as error:
                failure = error
        _warn(f"W&B: no {self.mode} run ({_reason(failure)}); training continues without W&B")
        self.mode = "disabled"

    @staticmethod
    def _start(mode: str, arguments: dict[str, Any], timeout: float) -> Any:
        import wandb

        Path(arguments["dir"]).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            silent=True,
            console="off",
            init_timeout=timeout,  # creating the run on the server
            x_service_wait=timeout,  # starting wandb's service process
            finish_timeout=timeout,  # uploading at the end; the rest stays syncable
        )
        return wandb.init(mode=mode, settings=settings, **arguments)

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def _failed(self, action: str, error: Exception) -> None:
        _warn(f"W&B: {action} failed ({_reason(error)}); training continues without W&B")
        run, self.run = self.run, None
        with contextlib.suppress(Exception):  # already reported; nothing more to save
            run.finish(exit_code=1)

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            try:
                self.run.log(values, step=step)
            except Exception as error:
                self._failed("logging", error)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            try:
                for key, value in values.items():
                    self.run.summary[key] = value
            except Exception as error:
                self._failed("writing the summary", error)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            try:
                import wandb

                self.run.log({key: wandb.Table(columns=columns, data=rows)})
            except Exception as error:
                self._failed("logging a table", error)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as error:
                _warn(f"W&B: finishing the run failed ({_reason(error)})")
