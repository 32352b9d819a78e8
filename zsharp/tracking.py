"""Weights & Biases: one run per cell and job, offline unless the user asks for online.

Mode, project and entity come from the command line, else ``$WANDB_MODE``,
``$WANDB_PROJECT``, ``$WANDB_ENTITY``; the mode defaults to ``offline`` (no account, no
network: the run lands in ``<dir>/wandb/offline-run-*`` and ``wandb sync`` uploads it
later). Runs are grouped by dataset and model, named by optimizer and seed, and carry the
cell's resolved configuration; a resumed training run continues the same W&B run.

The API key is never read, logged or written by this module: wandb reads it itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zsharp.config import WANDB_MODES, ConfigError

# Configuration keys that could hold credentials are never sent.
_SECRET_MARKERS = ("key", "token", "secret", "password")


def resolve_mode(mode: str | None) -> str:
    """The W&B mode: ``mode``, else $WANDB_MODE, else offline (validated)."""
    resolved = mode or os.environ.get("WANDB_MODE") or "offline"
    if resolved == "dryrun":  # wandb's old name for offline
        resolved = "offline"
    if resolved not in WANDB_MODES:
        raise ConfigError(f"wandb_mode: must be one of {list(WANDB_MODES)}, got {resolved!r}")
    return resolved


def scrub(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without entries whose name suggests a credential."""
    clean: dict[str, Any] = {}
    for key, value in config.items():
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            continue
        clean[key] = scrub(value) if isinstance(value, dict) else value
    return clean


class Tracker:
    """A thin wrapper around one wandb run; every method is a no-op when disabled."""

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
        self.run: Any = None
        if self.mode == "disabled":
            return
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                mode=self.mode,
                project=project or os.environ.get("WANDB_PROJECT") or "zsharp",
                entity=entity or os.environ.get("WANDB_ENTITY") or None,
                dir=str(directory),
                group=group,
                name=name,
                job_type=job_type,
                config=scrub(config),
                id=run_id,
                resume="allow" if run_id else None,
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as error:  # wandb raises many types; say what to do
            hint = " (run `wandb login` first, or use --wandb-mode offline)"
            raise RuntimeError(f"wandb: could not start a {self.mode} run: {error}{hint}") from None

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
