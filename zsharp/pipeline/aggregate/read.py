"""Read finished cells: one row per seed (a cell folder) and its per-epoch curve.

A seed whose training failed for good (a divergence, a configuration that cannot run) is
``failed``; one with no result (a transient fault on its last attempt, which the next run
retries; a summary that is absent or unreadable) is ``missing``, with the reason and a
warning naming the file, instead of breaking the table.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from zsharp.pipeline.cell import folder
from zsharp.pipeline.cell.config import ConfigError

METRICS = (
    "final_test_acc",
    "best_test_acc",
    "test_loss",
    "ece",
    "sharpness",
    "final_train_loss",
    "train_seconds",
    "epsilon_norm",  # ‖ε‖, the last epoch's mean over its sharpness-aware steps
)
CELL = ["dataset", "model", "optimizer"]

# a cell's path in the workflow's layout: .../cells/<dataset>/<model>/<entry>/seed<k>
_LAYOUT = re.compile(r"seed(\d+)")


class AggregateError(ConfigError):
    """Nothing to aggregate: bad input (the command line exits 2); the message names the
    file."""


def cell_identity(cell: Path, summary: dict[str, Any]) -> tuple[str, str, str, int]:
    """(dataset, model, optimizer entry, seed) of a cell, as its summary records them: the
    entry is the grid's label (two entries may share one optimizer), else the optimizer."""
    config = summary.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{cell / folder.SUMMARY}: records no configuration")
    try:
        label = summary.get("label") or config["optimizer"]
        return str(config["dataset"]), str(config["model"]), str(label), int(config["seed"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{cell / folder.SUMMARY}: its configuration lacks {error}") from None


def _identity_from_path(cell: Path) -> tuple[str, str, str, int] | None:
    """The identity the workflow's layout gives a cell without a readable summary."""
    parts = cell.absolute().parts
    match = _LAYOUT.fullmatch(parts[-1]) if len(parts) >= 4 else None
    if match is None:
        return None
    return parts[-4], parts[-3], parts[-2], int(match.group(1))


def _no_result(cell: Path, reason: str, warn: list[str]) -> dict[str, Any] | None:
    """The row of a seed with no usable result (warned about), if its identity is known."""
    identity = _identity_from_path(cell)
    if identity is None:
        warn.append(f"{reason}; {cell} is left out (not a <dataset>/<model>/<entry>/seed<k> path)")
        return None
    warn.append(f"{reason}; {cell} shows as MISSING")
    dataset, model, label, seed = identity
    return {
        "dataset": dataset, "model": model, "optimizer": label, "seed": seed,
        "method": label, "status": "missing", "error": reason,
    }  # fmt: skip


def _row(cell: Path, warn: list[str]) -> dict[str, Any] | None:
    """One seed's row: its status and, for a result, its metrics (None: unplaceable)."""
    try:
        summary = folder.read_summary(cell)
        dataset, model, label, seed = cell_identity(cell, summary)
    except folder.RecordError as error:
        return _no_result(cell, str(error), warn)
    try:
        dataset, model, label, seed = cell_identity(cell, summary)
    except ValueError as error:
        return _no_result(cell, str(error), warn)
    status = summary.get("status", "ok")
    error = str(summary.get("error", ""))
    if status == "failed" and summary.get("transient"):  # no result: the next run retries
        status = "missing"
    matched = summary.get("matched")
    row: dict[str, Any] = {
        "dataset": dataset, "model": model, "optimizer": label, "seed": seed,
        "method": summary["config"].get("optimizer", label), "status": status, "error": error,
        # a matched control: the entry whose ‖ε‖ its ρ equals
        "matches": matched.get("entry") if isinstance(matched, dict) else None,
    }  # fmt: skip
    if status != "ok":
        return row
    evaluation, problem = folder.read_evaluation(cell)
    if problem is not None:
        warn.append(f"{problem}: ignored; no ECE or sharpness for this seed")
    evaluation = evaluation or {}
    try:
        final = summary["final"]
        row |= {
            "final_test_acc": float(final["test_acc"]),
            "best_test_acc": float(summary["best"]["test_acc"]),
            "test_loss": float(final["test_loss"]),
            "final_train_loss": float(final["train_loss"]),
            "train_seconds": float(summary["train_seconds"]),
            "ece": evaluation.get("ece", math.nan),
            "sharpness": evaluation.get("sharpness", math.nan),
            "epsilon_norm": _number(final.get("epsilon_norm")),
        }
    except (KeyError, TypeError, ValueError) as error:
        reason = f"{cell / folder.SUMMARY}: a result without {error}"
        warn.append(f"{reason}; {cell} shows as MISSING")
        return {**{k: row[k] for k in (*CELL, "seed", "method")}, "status": "missing",
                "error": reason}  # fmt: skip
    return row


def _curve(cell: Path, row: dict[str, Any], warn: list[str]) -> list[dict[str, Any]]:
    """The per-epoch test accuracy of a seed with a result (none if unreadable, warned)."""
    try:
        return [
            {
                **{k: row[k] for k in (*CELL, "seed")},
                "epoch": int(record["epoch"]),
                "test_acc": float(record["test_acc"]),
            }
            for record in folder.read_metrics(cell)
        ]
    except (OSError, ValueError, KeyError, TypeError) as error:
        warn.append(f"{cell / folder.METRICS}: unreadable ({error}); no curve for this seed")
        return []


def _number(value: object) -> float:
    """A recorded number, NaN where there is none (a base optimizer has no ‖ε‖)."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def seed_rows(cells: Sequence[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per cell directory (a seed) and the per-epoch curves of all of them. A cell
    without a usable summary is a MISSING seed, placed by its path in the workflow's
    layout (``<dataset>/<model>/<entry>/seed<k>``) and otherwise left out, with a warning
    either way; :class:`AggregateError` if no cell is left."""
    rows, curves, warn = [], [], []
    for cell in cells:
        cell = Path(cell)
        row = _row(cell, warn)
        if row is None:
            continue
        rows.append(row)
        if row["status"] == "ok":
            curves.extend(_curve(cell, row, warn))
    if not rows:
        first = warn[0].partition("; ")[0] if warn else "nothing readable"
        more = f" (and {len(cells) - 1} more)" if len(cells) > 1 else ""
        raise AggregateError(f"no cell to aggregate: {first}{more}")
    for message in warn:
        print(f"zsharp aggregate: warning: {message}", file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    for metric in METRICS:
        if metric not in frame:
            frame[metric] = math.nan
    return frame, pd.DataFrame(curves, columns=[*CELL, "seed", "epoch", "test_acc"])
